"""Tests for kexue_jax.nn.norms: LayerNorm, RMSNorm and the residual wirings (kexue.fm/archives/8620, 8998)."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kexue_jax.nn import Transformer, TransformerConfig, init, norms
from kexue_jax.nn.norms import LayerNorm, RMSNorm, alpha_schedule, make_norm, residual


def np_layernorm(x, g, b, eps):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def np_rmsnorm(x, g, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def _random_params(module, x, key):
    """Init, then replace scale/bias by random values so that they are really tested."""
    params = module.init(jax.random.key(0), x)["params"]
    keys = dict(zip(sorted(params), jax.random.split(key, len(params))))
    return {k: 1.0 + 0.5 * jax.random.normal(keys[k], v.shape, v.dtype) for k, v in params.items()}


# -- the two norms against numpy fp64 -----------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_layernorm_matches_numpy_fp64(eps):
    # Small-variance input, so that eps = 0.1 changes the result a lot.
    x = 0.2 * jax.random.normal(jax.random.key(1), (4, 7, 48)) + 0.3
    ln = LayerNorm(eps=eps)
    p = _random_params(ln, x, jax.random.key(2))
    y = ln.apply({"params": p}, x)
    expected = np_layernorm(x, np.asarray(p["scale"]), np.asarray(p["bias"]), eps)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert sorted(p) == ["bias", "scale"]
    if eps == 0.1:  # eps really enters
        assert np.abs(np_layernorm(x, 1.0, 0.0, 0.0) - np_layernorm(x, 1.0, 0.0, eps)).max() > 0.1


@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_rmsnorm_matches_numpy_fp64_no_centring_no_bias(eps):
    x = 0.2 * jax.random.normal(jax.random.key(3), (4, 7, 48)) + 0.3
    rms = RMSNorm(eps=eps, use_bias=True)  # RMSNorm has no beta even when use_bias is passed
    p = _random_params(rms, x, jax.random.key(4))
    assert sorted(p) == ["scale"]
    y = rms.apply({"params": p}, x)
    np.testing.assert_allclose(y, np_rmsnorm(x, np.asarray(p["scale"]), eps), rtol=1e-5, atol=1e-5)
    # no centring: the output mean is not removed (LayerNorm's would be 0)
    assert float(jnp.abs(jnp.mean(rms.apply({"params": {"scale": jnp.ones(48)}}, x), -1)).min()) > 0.5


def test_norms_fp64_exact_and_bf16_statistics_in_fp32():
    x64 = np.random.default_rng(0).normal(size=(3, 40)) * 1e-3 + 5.0  # large mean: cancellation-prone
    with jax.enable_x64(True):
        for cls, ref in ((LayerNorm, lambda x: np_layernorm(x, 1.0, 0.0, 1e-9)),
                         (RMSNorm, lambda x: np_rmsnorm(x, 1.0, 1e-9))):
            m = cls(eps=1e-9, dtype=jnp.float64, param_dtype=jnp.float64)
            xj = jnp.asarray(x64, jnp.float64)
            y = m.apply(m.init(jax.random.key(0), xj), xj)
            assert y.dtype == jnp.float64
            np.testing.assert_allclose(y, ref(x64), rtol=1e-9, atol=1e-9)
    xb = jax.random.normal(jax.random.key(5), (8, 256), jnp.bfloat16) + 2
    m = LayerNorm(dtype=jnp.bfloat16)
    y = m.apply(m.init(jax.random.key(0), xb), xb)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np_layernorm(np.asarray(xb, np.float32), 1, 0, 1e-5),
                               atol=2e-2)  # bf16 output rounding (8 bits of mantissa) only


def test_layernorm_large_mean_fp32_and_gradients_fp64():
    # One-pass variance on the shifted z = x - x_0: no cancellation for |mean| >> std (a plain
    # E[x^2] - E[x]^2 would lose ~6% of the variance here in fp32).
    x = np.random.default_rng(1).normal(size=(4, 64)) + 1000.0
    ln = LayerNorm(eps=1e-6)
    p = ln.init(jax.random.key(0), jnp.zeros((1, 64)))
    np.testing.assert_allclose(ln.apply(p, jnp.asarray(x, jnp.float32)), np_layernorm(x, 1, 0, 1e-6), atol=2e-3)
    with jax.enable_x64(True):
        ln64 = LayerNorm(eps=1e-3, dtype=jnp.float64, param_dtype=jnp.float64)
        xs = jnp.asarray(np.random.default_rng(2).normal(size=(3, 16)) * 2 + 1, jnp.float64)
        w = jnp.asarray(np.random.default_rng(3).normal(size=(3, 16)), jnp.float64)
        p64 = jax.tree_util.tree_map(lambda a: a + 0.3, ln64.init(jax.random.key(0), xs))

        def two_pass(params, x):  # the textbook formula, differentiated by autodiff independently
            mu = x.mean(-1, keepdims=True)
            var = ((x - mu) ** 2).mean(-1, keepdims=True)
            return (x - mu) / jnp.sqrt(var + 1e-3) * params["params"]["scale"] + params["params"]["bias"]

        for f in (lambda p_, x_: ln64.apply(p_, x_), two_pass):
            assert f(p64, xs).dtype == jnp.float64
        g_ours = jax.grad(lambda p_, x_: jnp.sum(w * ln64.apply(p_, x_)), argnums=(0, 1))(p64, xs)
        g_ref = jax.grad(lambda p_, x_: jnp.sum(w * two_pass(p_, x_)), argnums=(0, 1))(p64, xs)
        chex.assert_trees_all_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
        # forward mode works too (no custom_vjp)
        t_ours = jax.jvp(lambda x_: ln64.apply(p64, x_), (xs,), (w,))[1]
        t_ref = jax.jvp(lambda x_: two_pass(p64, x_), (xs,), (w,))[1]
        np.testing.assert_allclose(t_ours, t_ref, rtol=1e-10, atol=1e-12)


def test_make_norm_kinds_and_errors():
    assert isinstance(make_norm("layernorm", 1e-5, True, jnp.float32, jnp.float32, "n"), LayerNorm)
    assert isinstance(make_norm("rmsnorm", 1e-5, True, jnp.float32, jnp.float32, "n"), RMSNorm)
    with pytest.raises(ValueError, match=r"norm must be one of \('layernorm', 'rmsnorm'\)"):
        make_norm("batchnorm", 1e-5, True, jnp.float32, jnp.float32, "n")
    with pytest.raises(ValueError, match=r"residual must be one of \('post', 'pre', 'alpha', 'alpha_post', 'rezero', 'deepnorm'\)"):
        residual("sandwich", jnp.ones(3), lambda y: (y, None), None)


# -- residual wirings at init ---------------------------------------------------------------------------

D, N = 256, 4096


def _lecun_branch(key):
    w = init.lecun("normal")(key, (D, D))  # unit second moment out for unit second moment in

    def branch(y):
        return y @ w, None

    return branch


def _unit_layernorm():
    ln = LayerNorm(eps=1e-6)
    params = ln.init(jax.random.key(0), jnp.zeros((1, D)))
    return lambda y: ln.apply(params, y)


def _noise_branch(key):
    """A branch of unit variance independent of its input (the post's assumption for the 2^{-l/2} law)."""
    return lambda y: (jax.random.normal(key, y.shape), None)


def test_post_norm_weight_of_x0_decays_as_2_pow_minus_half_l():
    # x_{t+1} = Norm(x_t + F_t) with F_t of unit variance independent of x (post 8620): the regression
    # coefficient of x_l on x_0 is 2^{-l/2}. Its s.e. over N*D = 2^20 samples is 1e-3 absolute, i.e. 0.8% of
    # 2^{-3}; tolerance 3% relative. (A LeCun linear branch leaks ~tr(W)/D = O(1/D) of x_0 per layer.)
    x0 = jax.random.normal(jax.random.key(6), (N, D))
    x, norm, coefs = x0, _unit_layernorm(), []
    for k in jax.random.split(jax.random.key(7), 6):
        x, _ = residual("post", x, _noise_branch(k), norm)
        coefs.append(float(jnp.sum(x * x0) / jnp.sum(x0 * x0)))
        assert float(jnp.var(x)) == pytest.approx(1.0, abs=0.01)  # Post-Norm keeps the variance at 1
    np.testing.assert_allclose(coefs, 2.0 ** (-np.arange(1, 7) / 2), rtol=0.03)
    # Pre-Norm with the same branches keeps x_0 at full weight 1 (the control: every branch equal weight)
    x = x0
    for k in jax.random.split(jax.random.key(7), 6):
        x, _ = residual("pre", x, _noise_branch(k), norm)
    assert float(jnp.sum(x * x0) / jnp.sum(x0 * x0)) == pytest.approx(1.0, abs=0.01)


def test_pre_norm_variance_grows_as_l_plus_1():
    # x_{t+1} = x_t + F_t(Norm(x_t)): each branch adds unit variance, so Var(x_l) = l + 1 (within 5%).
    x = jax.random.normal(jax.random.key(8), (N, D))
    norm, variances = _unit_layernorm(), []
    for k in jax.random.split(jax.random.key(9), 8):
        x, _ = residual("pre", x, _lecun_branch(k), norm)
        variances.append(float(jnp.var(x)))
    np.testing.assert_allclose(variances, np.arange(2, 10), rtol=0.05)


def test_alpha_residual_and_alpha_post_formulas():
    x = jax.random.normal(jax.random.key(10), (16, D))
    branch, norm = _lecun_branch(jax.random.key(11)), _unit_layernorm()
    fx = np.asarray(branch(x)[0], np.float64)
    # alpha = 0: exactly the identity, whatever the branch
    y0, _ = residual("alpha", x, branch, None, 0.0)
    np.testing.assert_array_equal(y0, x)
    for a in (0.0, 0.3, 1.0):
        ya, _ = residual("alpha", x, branch, None, a)
        np.testing.assert_allclose(ya, np.asarray(x, np.float64) + a * fx, rtol=1e-5, atol=1e-5)
        # alpha_post = Norm(x + alpha F(x)) (post 8998); at alpha 0 it is Norm(x)
        yp, _ = residual("alpha_post", x, branch, norm, a)
        np.testing.assert_allclose(yp, np_layernorm(np.asarray(x, np.float64) + a * fx, 1, 0, 1e-6),
                                   rtol=1e-4, atol=1e-4)
    # traced alpha (the step's schedule value under jit)
    yj = jax.jit(lambda a: residual("alpha", x, branch, None, a)[0])(jnp.float32(0.0))
    np.testing.assert_array_equal(yj, x)
    # aux of the branch is passed through
    assert residual("pre", x, lambda y: (y, "aux"), norm)[1] == "aux"


TINY = dict(vocab_size=50, num_layers=3, d_model=32, num_heads=2, head_dim=8, d_ff=64, max_len=16)


@functools.lru_cache(maxsize=None)
def _pre_norm_params():
    """One init of a Pre-Norm model; the alpha trees are sub-trees of it (one compile instead of two)."""
    model = Transformer(TransformerConfig(**TINY, residual="pre"))
    tokens = jnp.zeros((2, 16), jnp.int32)
    return jax.jit(model.init)(jax.random.key(13, impl="rbg"), tokens)["params"]  # rbg: faster compile


def _params_for(cfg):
    """The Pre-Norm params restricted to cfg's tree (alpha: no block norms; alpha_post: no final norm)."""
    pre, block_norms = _pre_norm_params(), cfg.residual != "alpha"
    params = {k: ({n: v for n, v in sub.items() if block_norms or not n.endswith("_norm")}
                  if k.startswith("layer_") else sub)
              for k, sub in pre.items() if k != "final_norm" or cfg.has_final_norm}
    expected = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((2, 16), jnp.int32))["params"]
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
    return params


def test_alpha_zero_makes_the_whole_transformer_the_identity_on_hidden_states():
    cfg = TransformerConfig(**TINY, residual="alpha")
    tokens = jnp.asarray(np.random.default_rng(12).integers(0, 50, (2, 16)), jnp.int32)
    model, params = Transformer(cfg), _params_for(cfg)
    assert not any(k in params["layer_0"] for k in ("attn_norm", "ffn_norm"))  # no norms in alpha blocks
    assert "final_norm" in params
    apply = jax.jit(lambda p, a: model.apply({"params": p}, tokens, alpha=a, return_intermediates=True))
    _, aux = apply(params, 0.0)
    assert len(aux["hidden"]) == cfg.num_layers + 1
    for h in aux["hidden"][1:]:
        np.testing.assert_array_equal(h, aux["hidden"][0])  # every block exactly the identity
    emb = params["embed"]["token"][tokens] + params["embed"]["position"][None, :16]
    np.testing.assert_allclose(aux["hidden"][0], emb, rtol=1e-6, atol=1e-7)
    _, aux_half = apply(params, 0.5)
    assert float(jnp.abs(aux_half["hidden"][-1] - aux_half["hidden"][0]).max()) > 1e-4  # control: not identity


def test_alpha_post_zero_is_norm_of_norm_in_a_whole_transformer():
    cfg = TransformerConfig(**TINY, residual="alpha_post")
    tokens = jnp.asarray(np.random.default_rng(14).integers(0, 50, (2, 16)), jnp.int32)
    model, params = Transformer(cfg), _params_for(cfg)
    assert "attn_norm" in params["layer_0"] and "final_norm" not in params
    _, aux = jax.jit(lambda p: model.apply({"params": p}, tokens, alpha=0.0, return_intermediates=True))(params)
    for i in range(cfg.num_layers):  # block i is ffn_norm(attn_norm(x)) at alpha = 0 (unit scale, zero bias)
        h = np.asarray(aux["hidden"][i], np.float64)
        expected = np_layernorm(np_layernorm(h, 1, 0, cfg.norm_eps), 1, 0, cfg.norm_eps)
        np.testing.assert_allclose(aux["hidden"][i + 1], expected, rtol=1e-4, atol=1e-4)


# -- alpha schedule -----------------------------------------------------------------------------------------

def test_alpha_schedule_values():
    t = 100
    got = [float(alpha_schedule(s, t)) for s in (0, 1, 25, 50, 99, 100, 101, 10**6)]
    np.testing.assert_allclose(got, [0.0, 0.01, 0.25, 0.5, 0.99, 1.0, 1.0, 1.0], rtol=1e-6)
    assert float(alpha_schedule(0, 0)) == 1.0 and float(alpha_schedule(7, 0)) == 1.0
    steps = jnp.arange(0, 300, 50)
    np.testing.assert_allclose(jax.jit(lambda s: alpha_schedule(s, 200))(steps),
                               [0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert alpha_schedule(3, 10).dtype == jnp.float32
    with pytest.raises(ValueError, match="warmup_steps"):
        alpha_schedule(0, -1)


def test_module_constants():
    assert norms.RESIDUALS == ("post", "pre", "alpha", "alpha_post", "rezero", "deepnorm")
    assert norms.NORMS == ("layernorm", "rmsnorm")
