"""ReZero and DeepNorm residuals, and the alpha ramp that is never trained (kexue.fm/archives/8620).

ReZero/SkipInit: x + a F(x), a trainable, 0 at init. DeepNorm (DeepNet, arXiv:2203.00555):
Norm(a x + F(x)), a = (2N)^{1/4}, value/output/FFN init gain b = (8N)^{-1/4}.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kexue_jax import training, upscale
from kexue_jax.nn import Transformer, TransformerConfig
from kexue_jax.nn.norms import LayerNorm, deepnorm_alpha, deepnorm_beta, residual

TINY = dict(num_layers=2, d_model=32, num_heads=2, head_dim=16, d_ff=64, max_len=16, vocab_size=64)


def _optim(lr, weight_decay=0.0):
    return ml_collections.ConfigDict(dict(lr=lr, warmup_steps=0, schedule="constant", min_lr_ratio=1.0,
                                          weight_decay=weight_decay, b1=0.9, b2=0.99, eps=1e-8, clip_norm=None))


def _batch(seed=0, b=4, n=16, vocab=64):
    x = jax.random.randint(jax.random.PRNGKey(seed), (b, n + 1), 0, vocab)
    return {"inputs": x[:, :-1], "targets": x[:, 1:]}


def _leaf_names(tree):
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_deepnorm_constants_match_deepnet_formulas():
    # DeepNet, encoder-only / decoder-only stack of N layers: alpha = (2N)^(1/4), beta = (8N)^(-1/4)
    for n in (1, 6, 12, 48, 1000):
        assert deepnorm_alpha(n) == pytest.approx((2 * n) ** 0.25, rel=1e-12)
        assert deepnorm_beta(n) == pytest.approx((8 * n) ** -0.25, rel=1e-12)
    assert deepnorm_alpha(6) == pytest.approx(1.8612097, abs=1e-6)
    assert deepnorm_beta(48) == pytest.approx(0.2259005, abs=1e-6)
    assert deepnorm_alpha(1000) == pytest.approx(6.6874030, abs=1e-6)  # their 1,000-layer model
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="num_layers must be a positive integer"):
            deepnorm_alpha(bad)


def test_deepnorm_block_formula_and_init_gains():
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 8))
    norm = LayerNorm()
    p = norm.init(jax.random.PRNGKey(0), x)

    def branch(y):
        return jnp.tanh(y) * 0.7, None

    a = deepnorm_alpha(4)
    y, _ = residual("deepnorm", x, branch, lambda z: norm.apply(p, z), a)
    np.testing.assert_allclose(y, norm.apply(p, a * x + jnp.tanh(x) * 0.7), rtol=1e-6, atol=1e-6)

    n = 6
    cfg = TransformerConfig(num_layers=n, d_model=64, num_heads=2, head_dim=32, d_ff=256, max_len=8,
                            vocab_size=64, residual="deepnorm", init_std=None)
    assert not cfg.has_final_norm and cfg.branch_init_gain == pytest.approx((8 * n) ** -0.25)
    params = Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    beta = (8 * n) ** -0.25
    stds = {}
    for name in ("query", "key", "value", "out"):
        stds[name] = float(np.std(np.stack([params[f"layer_{i}"]["attn"][name]["kernel"] for i in range(n)])))
    for name in ("wi", "wo"):
        stds[name] = float(np.std(np.stack([params[f"layer_{i}"]["ffn"][name]["kernel"] for i in range(n)])))
    # second-moment init: std = gain / sqrt(fan_in); q and k keep gain 1 (about 25k samples each: ~0.5% error)
    assert stds["query"] == pytest.approx(1 / math.sqrt(64), rel=0.02)
    assert stds["key"] == pytest.approx(1 / math.sqrt(64), rel=0.02)
    assert stds["value"] == pytest.approx(beta / math.sqrt(64), rel=0.02)
    assert stds["out"] == pytest.approx(beta / math.sqrt(64), rel=0.02)
    assert stds["wi"] == pytest.approx(beta / math.sqrt(64), rel=0.02)
    assert stds["wo"] == pytest.approx(beta / math.sqrt(256), rel=0.02)
    assert sorted(params["layer_0"]) == ["attn", "attn_norm", "ffn", "ffn_norm"] and "final_norm" not in params
    # NTK parameterization: weights N(0, 1), the gain moves into the forward multiplier
    ntk = cfg.replace(parameterization="ntk")
    assert ntk.kernel_multiplier(64, ntk.branch_init_gain ** 2) == pytest.approx(beta / 8)
    assert TransformerConfig(residual="post").branch_init_gain == 1.0


def test_rezero_alpha_is_trainable_and_starts_at_zero():
    cfg = TransformerConfig(**TINY, residual="rezero")
    assert cfg.has_final_norm  # like the alpha ramp: no block norms, a final norm unless final_norm=False
    model = Transformer(cfg)
    batch = _batch()
    params = model.init(jax.random.PRNGKey(0), batch["inputs"])["params"]
    for i in range(cfg.num_layers):
        assert sorted(params[f"layer_{i}"]) == ["attn", "ffn", "rezero_alpha"]
        assert params[f"layer_{i}"]["rezero_alpha"].shape == () and float(params[f"layer_{i}"]["rezero_alpha"]) == 0.0
    # a = 0: every block is the identity on the hidden state
    _, aux = jax.jit(lambda p: model.apply({"params": p}, batch["inputs"], return_intermediates=True))(params)
    for h in aux["hidden"][1:]:
        np.testing.assert_array_equal(h, aux["hidden"][0])

    def loss(p):
        s, c = training.loss_terms(model.apply({"params": p}, batch["inputs"]), batch)
        return s / c

    grads = jax.jit(jax.grad(loss))(params)
    for i in range(cfg.num_layers):
        g = grads[f"layer_{i}"]
        assert abs(float(g["rezero_alpha"])) > 1e-6  # a gets a gradient ...
        assert float(jnp.max(jnp.abs(g["ffn"]["wo"]["kernel"]))) == 0.0  # ... the branch (times a = 0) none
    # one Adam step moves a by about lr (Adam's first step is lr * g / (|g| + eps))
    lr = 1e-2
    tx = training.make_optimizer(_optim(lr), 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    for i in range(cfg.num_layers):
        assert abs(float(updates[f"layer_{i}"]["rezero_alpha"])) == pytest.approx(lr, rel=1e-3)


def test_alpha_ramp_is_never_a_parameter_and_gets_no_gradient():
    cfg = TransformerConfig(**TINY, residual="alpha")
    model = Transformer(cfg)
    batch = _batch(1)
    params = model.init(jax.random.PRNGKey(0), batch["inputs"])["params"]
    assert not [n for n in _leaf_names(params) if "alpha" in n]  # the ramp's alpha is not in the tree
    tx = training.make_optimizer(_optim(1e-2), 10)  # no weight decay: untouched leaves stay bitwise equal
    state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(training.make_train_step(model, tx, alpha_warmup_steps=4))
    new, metrics = step(state, batch)
    # step 0: alpha_0 = 0, so no gradient reaches any branch weight and they do not move ...
    for i in range(cfg.num_layers):
        for a, b in zip(jax.tree_util.tree_leaves(params[f"layer_{i}"]), jax.tree_util.tree_leaves(new.params[f"layer_{i}"])):
            np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(new.params["embed"]["token"] - params["embed"]["token"]))) > 1e-3  # ... the rest does
    # the loss the step reports is the model at alpha_t = t / 4 (here t = 0 and, two steps on, t = 2)
    @jax.jit
    def forward(p, a):
        s, c = training.loss_terms(model.apply({"params": p}, batch["inputs"], alpha=a), batch)
        return s / c

    def direct(p, a):
        return float(forward(p, jnp.float32(a)))

    assert float(metrics["loss"]) == pytest.approx(direct(params, 0.0), rel=1e-5)
    s1, _ = step(new, batch)
    p2 = s1.params
    _, m2 = step(s1, batch)
    assert float(m2["loss"]) == pytest.approx(direct(p2, 0.5), rel=1e-5)
    assert float(m2["loss"]) != pytest.approx(direct(p2, 1.0), rel=1e-3)
    # the gradient tree is the parameter tree: nothing named alpha is ever differentiated
    grads = jax.eval_shape(jax.grad(lambda p: training.loss_terms(
        model.apply({"params": p}, batch["inputs"], alpha=0.5), batch)[0]), params)
    assert _leaf_names(grads) == _leaf_names(params)


def test_widen_and_deepen_reject_rezero_and_deepnorm():
    for res in ("rezero", "deepnorm"):
        cfg = TransformerConfig(**TINY, residual=res)
        with pytest.raises(ValueError, match=f"widen: residual='{res}'"):
            upscale.widen_config(cfg, 2)
        params = Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
        with pytest.raises(ValueError, match=f"deepen: residual='{res}' is not supported"):
            upscale.deepen(params, cfg, [0])
    with pytest.raises(ValueError, match=r"residual must be one of \(.*'rezero', 'deepnorm'\)"):
        TransformerConfig(residual="admin")
