"""Lossless width upscaling (kexue.fm/archives/8444): exactness, errata regressions, noise, Adam state."""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import enable_x64

from kexue_jax import parallel, upscale
from kexue_jax.nn import Transformer, TransformerConfig
from kexue_jax.upscale import WidenRules

SMALL = dict(vocab_size=50, num_layers=2, d_model=16, num_heads=2, head_dim=8, d_ff=32, max_len=16)
# Every option of TransformerConfig that changes a rule, grouped so each preset covers all of them.
OPTIONS = {
    "base": {},
    "gated_ntk": {"ffn": "gated", "activation": "gelu", "parameterization": "ntk"},
    "mup_untied_rmsnorm": {"attn_scale": "mup", "head": "lm", "tie_embeddings": False, "norm": "rmsnorm",
                           "norm_eps": 1e-3},
    "t5scale_alpha_relu": {"attn_scale": "t5", "residual": "alpha", "activation": "relu", "norm_eps": 1e-2},
    "sqrt_alphapost_bigeps": {"attn_scale": "sqrt", "residual": "alpha_post", "norm_eps": 1e-2,
                              "position": "learned", "type_vocab_size": 2},
}


def make_cfg(preset, dtype="float64", **kw):
    return TransformerConfig.preset(preset, dtype=dtype, param_dtype=dtype, **{**SMALL, **kw})


def random_params(cfg, seed=0):
    """Init, then perturb every tensor (biases, norm gains/offsets included) so the errata show."""
    key = jax.random.PRNGKey(seed)
    params = Transformer(cfg).init(key, jnp.zeros((1, 4), jnp.int32))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def tokens(n=10, batch=2, vocab=50, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, n), 0, vocab)


def logits_of(cfg, params, toks):
    return Transformer(cfg).apply({"params": params}, toks)


def max_logit_diff(cfg, params, big_cfg, big_params, toks):
    return float(jnp.max(jnp.abs(logits_of(cfg, params, toks) - logits_of(big_cfg, big_params, toks))))


PRESETS = ("bert", "gpt", "t5")
GROWS = ("head_dim", "num_heads")


def factor_grow_cases(preset, option):
    """k = 2, 3, 4 once each, the grow mode alternating from a start shifted by the preset's and the option
    group's index. So each (preset, option) model sees every k and both grow modes, every preset sees all six
    (k, grow) pairs (over its 5 option groups), and so does every option group (over the 3 presets)."""
    shift = PRESETS.index(preset) + sorted(OPTIONS).index(option)
    return [(k, GROWS[(shift + i) % 2]) for i, k in enumerate((2, 3, 4))]


def test_factor_grow_cases_cover_every_pair_per_preset_and_per_option():
    pairs = {(k, g) for k in (2, 3, 4) for g in GROWS}
    for preset in PRESETS:
        assert {c for o in OPTIONS for c in factor_grow_cases(preset, o)} == pairs
    for option in OPTIONS:
        assert {c for p in PRESETS for c in factor_grow_cases(p, option)} == pairs
        for preset in PRESETS:
            cases = factor_grow_cases(preset, option)
            assert sorted(k for k, _ in cases) == [2, 3, 4] and {g for _, g in cases} == set(GROWS)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_exact_fp64_every_preset_option_factor_and_grow_mode(x64, preset, option):
    """Exact to 1e-10 in fp64 (logits, every hidden state, every attention matrix) for every preset x option
    group, each at k = 2, 3, 4 with both grow modes among them; ``factor_grow_cases`` spreads the six (k, grow)
    pairs over the presets and option groups (3 widenings per model instead of 6: each one compiles)."""
    cfg = make_cfg(preset, **OPTIONS[option])
    params = random_params(cfg)
    toks = tokens()
    for k, grow in factor_grow_cases(preset, option):
        big_params, big_cfg = upscale.widen(params, cfg, k, grow=grow)
        report = upscale.assert_lossless(params, cfg, big_params, big_cfg, toks, atol=1e-10, rtol=0.0)
        assert report["logits"] <= 1e-10, (k, grow, report["logits"])
        assert big_cfg.d_model == k * cfg.d_model and big_cfg.d_ff == k * cfg.d_ff


@pytest.mark.parametrize("grow", ["head_dim", "num_heads"])
def test_linear_attention_mixer_is_exact(x64, grow):
    cfg = make_cfg("gpt", token_mixer="linear", linear_head_multiplier=2)
    params = random_params(cfg)
    big_params, big_cfg = upscale.widen(params, cfg, 2, grow=grow)
    assert max_logit_diff(cfg, params, big_cfg, big_params, tokens()) <= 1e-10


@pytest.mark.parametrize("preset", ["bert", "gpt", "t5"])
@pytest.mark.parametrize("grow", ["head_dim", "num_heads"])
def test_exact_fp32_relative_to_logit_scale(preset, grow):
    cfg = make_cfg(preset, dtype="float32")
    params = random_params(cfg)
    toks = tokens()
    big_params, big_cfg = upscale.widen(params, cfg, 2, grow=grow)
    scale = float(jnp.max(jnp.abs(logits_of(cfg, params, toks))))
    assert max_logit_diff(cfg, params, big_cfg, big_params, toks) <= 1e-5 * scale
    upscale.assert_lossless(params, cfg, big_params, big_cfg, toks, atol=1e-5, rtol=0.0)


def test_hidden_states_follow_the_stated_relation(x64):
    """h~ = rep(h)/sqrt(k) layer by layer; the MLM dense output is a pure repeat (claim 2)."""
    cfg = make_cfg("bert")
    params = random_params(cfg)
    big_params, big_cfg = upscale.widen(params, cfg, 3)
    toks = tokens()
    _, small = Transformer(cfg).apply({"params": params}, toks, return_intermediates=True)
    _, big = Transformer(big_cfg).apply({"params": big_params}, toks, return_intermediates=True)
    for hs, hb in zip(small["hidden"], big["hidden"]):
        chex.assert_trees_all_close(hb, jnp.repeat(hs, 3, -1) / math.sqrt(3), atol=1e-12)
    chex.assert_trees_all_close(big["mlm_hidden"], jnp.repeat(small["mlm_hidden"], 3, -1), atol=1e-12)
    for ps, pb in zip(small["attention"], big["attention"]):  # claim 3: same attention per head
        chex.assert_trees_all_close(pb, ps, atol=1e-12)


# ---------------------------------------------------------------------------------------------- regressions

@pytest.mark.parametrize("k", [2, 3])
def test_post_literal_ffn2_bias_is_not_exact(x64, k):
    """Erratum E1: the post's b/k for the FFN-2 bias breaks exactness once biases are non-zero."""
    cfg = make_cfg("bert")
    params = random_params(cfg)
    toks = tokens()
    lit_params, lit_cfg = upscale.widen(params, cfg, k, rules=WidenRules(ffn2_bias="post"))
    fix_params, fix_cfg = upscale.widen(params, cfg, k)
    assert max_logit_diff(cfg, params, lit_cfg, lit_params, toks) > 1e-2
    assert max_logit_diff(cfg, params, fix_cfg, fix_params, toks) < 1e-10


def test_post_literal_extra_sqrt_in_mlm_norm_is_not_exact(x64):
    """Erratum E2: the literal extra 1/sqrt(k) on the MLM LayerNorm changes the logits."""
    cfg = make_cfg("bert")
    params = random_params(cfg)
    lit_params, lit_cfg = upscale.widen(params, cfg, 2, rules=WidenRules(mlm_norm="post"))
    assert max_logit_diff(cfg, params, lit_cfg, lit_params, tokens()) > 1e-2


def test_eps_must_shrink_by_k(x64):
    """Erratum E3: keeping eps unchanged is not exact when eps is not negligible."""
    cfg = make_cfg("gpt", norm_eps=1e-2)
    params = random_params(cfg)
    big_params, big_cfg = upscale.widen(params, cfg, 2)
    assert big_cfg.norm_eps == pytest.approx(5e-3)
    assert max_logit_diff(cfg, params, big_cfg.replace(norm_eps=1e-2), big_params, tokens()) > 1e-6
    assert max_logit_diff(cfg, params, big_cfg, big_params, tokens()) < 1e-10


def test_tiled_repetition_breaks_heads_but_not_a_single_head(x64):
    """Claim 5: [x, x] tiling scrambles heads when head_dim grows; with one head it is exact."""
    cfg = make_cfg("bert")
    params = random_params(cfg)
    bp, bc = upscale.widen(params, cfg, 2, rules=WidenRules(repetition="tile"))
    assert max_logit_diff(cfg, params, bc, bp, tokens()) > 1e-3
    one = make_cfg("bert", num_heads=1, head_dim=16)
    p1 = random_params(one)
    bp1, bc1 = upscale.widen(p1, one, 2, rules=WidenRules(repetition="tile"))
    assert max_logit_diff(one, p1, bc1, bp1, tokens()) < 1e-10


def test_omitting_the_fourth_root_breaks_sqrt_scaling(x64):
    """Claim 4: without q, k x k^(1/4) the 1/sqrt(d) logits shrink and the output changes."""
    cfg = make_cfg("bert")
    params = random_params(cfg)
    bp, bc = upscale.widen(params, cfg, 2, rules=WidenRules(qk_compensation=False))
    assert max_logit_diff(cfg, params, bc, bp, tokens()) > 1e-3


def test_plain_ffn_rule_needs_a_homogeneous_activation(x64):
    """Claims 6-7: the uniform W/k, b/sqrt(k) rule is exact for ReLU, not for GELU."""
    for act, exact in (("relu", True), ("gelu", False)):
        cfg = make_cfg("gpt", activation=act)
        params = random_params(cfg)
        bp, bc = upscale.widen(params, cfg, 2, rules=WidenRules(ffn="plain"))
        diff = max_logit_diff(cfg, params, bc, bp, tokens())
        assert (diff < 1e-10) == exact, (act, diff)


def test_rope_error_grows_with_distance_and_num_heads_is_exact(x64):
    """Claim 9: pairwise RoPE repetition under head_dim growth drifts with relative distance."""
    err = upscale.rope_widening_error(64, 2, [0, 1, 4, 16, 64, 256])
    assert err[0] < 1e-12
    assert np.all(np.diff(err[:4]) > 0) and err[-1] > 1e-2
    cfg = make_cfg("gpt", position="rope")
    params = random_params(cfg)
    bp, bc = upscale.widen(params, cfg, 2, grow="num_heads")
    assert max_logit_diff(cfg, params, bc, bp, tokens()) < 1e-10
    bp, bc = upscale.widen(params, cfg, 2, grow="head_dim")
    assert max_logit_diff(cfg, params, bc, bp, tokens()) > 1e-6


# ---------------------------------------------------------------------------------------------- noise

def _loss(cfg, params, toks):
    logits = Transformer(cfg).apply({"params": params}, toks)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])


@functools.lru_cache(maxsize=None)
def _loss_grad(cfg):
    """jax.grad of ``_loss`` in (params, tokens), jitted once per config."""
    return jax.jit(jax.grad(lambda p, toks: _loss(cfg, p, toks)))


def _copy_gap(x, k, axis):
    """max |copy r - copy 0| of an interleaved axis."""
    n = x.shape[axis] // k
    xr = np.asarray(x).reshape(x.shape[:axis] + (n, k) + x.shape[axis + 1:])
    return float(np.max(np.abs(xr - np.take(xr, [0], axis=axis + 1))))


NTK_GATED, ROPE = {"parameterization": "ntk", "ffn": "gated"}, {"position": "rope"}
# (preset, options, factor, grow, symmetry methods). Each method on its own covers k = 2, 3, 4, both grow modes, the
# three presets, NTK with a gated FFN and RoPE with grow=num_heads (each noisy widening compiles: 10 of them, not
# the 16 of every case with both methods).
NOISE_CASES = [
    ("gpt", {}, 2, "head_dim", ("zero_sum",)), ("gpt", {}, 3, "num_heads", ("fan_out",)),
    ("gpt", {}, 4, "head_dim", ("zero_sum",)),
    ("bert", {}, 3, "head_dim", ("fan_out",)), ("bert", {}, 2, "num_heads", ("zero_sum",)),
    ("gpt", NTK_GATED, 3, "head_dim", ("zero_sum", "fan_out")),
    ("gpt", ROPE, 2, "num_heads", ("fan_out",)), ("t5", ROPE, 4, "num_heads", ("zero_sum", "fan_out")),
]
NOISE_PARAMS = [(symmetry, preset, opts, k, grow) for preset, opts, k, grow, methods in NOISE_CASES
                for symmetry in methods]


def test_noise_cases_cover_every_factor_grow_mode_preset_and_option_per_method():
    assert {s for s, *_ in NOISE_PARAMS} == set(upscale.SYMMETRY_METHODS)
    for method in upscale.SYMMETRY_METHODS:
        cases = [c for s, *c in NOISE_PARAMS if s == method]
        assert {k for _, _, k, _ in cases} == {2, 3, 4} and {g for *_, g in cases} == {"head_dim", "num_heads"}
        assert {p for p, *_ in cases} == {"bert", "gpt", "t5"}
        assert NTK_GATED in [o for _, o, _, _ in cases]
        assert any(o == ROPE and g == "num_heads" for _, o, _, g in cases)


@pytest.mark.parametrize("symmetry,preset,opts,k,grow", NOISE_PARAMS)
def test_symmetry_breaking_is_exact_at_any_strength(x64, symmetry, preset, opts, k, grow):
    """0 dB (noise as large as the weights) still cancels exactly: the copies read identical inputs."""
    cfg = make_cfg(preset, **opts)
    params = random_params(cfg)
    plain, bc = upscale.widen(params, cfg, k, grow=grow)
    noisy, _ = upscale.widen(params, cfg, k, grow=grow, noise_db=0.0, symmetry=symmetry, key=jax.random.PRNGKey(3))
    scale = float(jnp.max(jnp.abs(logits_of(cfg, params, tokens()))))
    assert max_logit_diff(cfg, params, bc, noisy, tokens()) <= 1e-10 * max(scale, 1.0)
    assert _copy_gap(noisy["layer_0"]["ffn"]["wo"]["kernel"], k, 0) > 0.05  # the copies really differ
    assert _copy_gap(plain["layer_0"]["ffn"]["wo"]["kernel"], k, 0) == 0.0


@pytest.mark.parametrize("symmetry", upscale.SYMMETRY_METHODS)
@pytest.mark.parametrize("noise_db", [-20.0, -10.0, 0.0])
def test_noise_strength_is_the_stated_snr(symmetry, noise_db):
    """std(noise) / RMS(weights) = 10^(dB/20), measured on a 512 x 2048 kernel (sampling error < 1%)."""
    cfg = make_cfg("gpt", dtype="float32", d_model=256, d_ff=1024, num_heads=4, head_dim=64, num_layers=1)
    params = random_params(cfg)
    plain, _ = upscale.widen(params, cfg, 2)
    noisy, _ = upscale.widen(params, cfg, 2, noise_db=noise_db, symmetry=symmetry, key=jax.random.PRNGKey(0))
    w, wn = plain["layer_0"]["ffn"]["wi"]["kernel"], noisy["layer_0"]["ffn"]["wi"]["kernel"]
    ratio = float(jnp.std(wn - w) / jnp.sqrt(jnp.mean(w ** 2)))
    assert ratio == pytest.approx(10 ** (noise_db / 20), rel=0.02)
    assert upscale.noise_std(noise_db) == pytest.approx(10 ** (noise_db / 20)) and upscale.noise_std(None) == 0.0


def test_noise_breaks_gradient_symmetry(x64):
    cfg = make_cfg("gpt")
    params = random_params(cfg)
    toks = tokens()
    plain, bc = upscale.widen(params, cfg, 2)
    noisy, _ = upscale.widen(params, cfg, 2, noise_db=-20.0, key=jax.random.PRNGKey(3))
    g_plain, g_noisy = _loss_grad(bc)(plain, toks), _loss_grad(bc)(noisy, toks)
    wi = lambda g: g["layer_0"]["ffn"]["wi"]["kernel"]  # noqa: E731  columns = FFN units (copies interleaved)
    assert _copy_gap(wi(g_plain), 2, 1) < 1e-12
    assert _copy_gap(wi(g_noisy), 2, 1) > 1e-6


def test_noise_survives_bfloat16_and_still_cancels():
    """Under bf16 compute: -10 dB changes almost every bf16 weight of the copies, and the logits move by
    no more than bf16 rounding already moves them (<= 2 x the noise-free widening's bf16 error + 2^-8 x
    the logit scale); -60 dB would round away, so it is refused."""
    cfg = TransformerConfig.preset("gpt", **{**SMALL, "d_model": 32, "d_ff": 64, "num_heads": 2, "head_dim": 16},
                                   dtype="bfloat16", param_dtype="float32")
    params = random_params(cfg)
    plain, bc = upscale.widen(params, cfg, 2)
    noisy, _ = upscale.widen(params, cfg, 2, noise_db=-10.0, key=jax.random.PRNGKey(1))
    w16 = lambda p: p["layer_0"]["ffn"]["wo"]["kernel"].astype(jnp.bfloat16)  # noqa: E731
    changed = float(jnp.mean((w16(noisy) != w16(plain)).astype(jnp.float32)))
    assert changed > 0.9
    small = logits_of(cfg, params, tokens()).astype(jnp.float32)
    scale = float(jnp.max(jnp.abs(small)))
    err_plain = float(jnp.max(jnp.abs(logits_of(bc, plain, tokens()).astype(jnp.float32) - small)))
    err_noisy = float(jnp.max(jnp.abs(logits_of(bc, noisy, tokens()).astype(jnp.float32) - small)))
    assert err_noisy <= 2 * err_plain + 2 ** -8 * scale, (err_noisy, err_plain, scale)
    # in float32 the same perturbed weights cancel to float32 rounding
    f32 = lambda c: c.replace(dtype="float32")  # noqa: E731
    err32 = float(jnp.max(jnp.abs(logits_of(f32(bc), noisy, tokens()) - logits_of(f32(cfg), params, tokens()))))
    assert err32 <= 1e-5 * max(scale, 1.0)
    with pytest.raises(ValueError, match=r"noise_db=-60.0 is below the resolution of the compute dtype bfloat16 "
                                         r"\(-48.2 dB\)"):
        upscale.widen(params, cfg, 2, noise_db=-60.0, key=jax.random.PRNGKey(1))


@functools.lru_cache(maxsize=None)
def _jitted_adam(cfg, lr):
    """Adam at ``lr`` and its training step on ``_loss``, jitted once per (config, lr)."""
    tx = optax.adam(lr)

    def step(params, state, toks):
        g = jax.grad(lambda p: _loss(cfg, p, toks))(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    return tx, jax.jit(step)


def _train(cfg, params, steps, lr=1e-2):
    tx, step = _jitted_adam(cfg, lr)
    state = tx.init(params)
    for i in range(steps):
        params, state = step(params, state, tokens(seed=i))
    return params


def test_without_noise_copies_stay_identical_under_training(x64):
    """The symmetry problem: pure copies are a fixed point of Adam."""
    cfg = make_cfg("gpt")
    params, bc = upscale.widen(random_params(cfg), cfg, 2)
    params = _train(bc, params, 5)
    assert _copy_gap(params["layer_0"]["ffn"]["wi"]["kernel"], 2, 1) < 1e-12
    assert _copy_gap(params["layer_1"]["attn"]["value"]["kernel"], 2, 2) < 1e-12
    assert float(upscale.copy_similarity(params, cfg, 2)) == pytest.approx(1.0, abs=1e-12)


def test_copies_drift_apart_with_noise_and_training(x64):
    """copy_similarity (the job logs it as eval_copy_cosine): 1 for pure copies; 1/sqrt(1 + sigma^2) right
    after an additive widening at sigma = 10^(dB/20) (copy r = W + N_r around the copies' mean W); under
    training the copies' deviations N_r themselves change (they receive different updates), while
    noise-free copies stay exactly equal (cosine 1)."""
    cfg = make_cfg("gpt", d_model=32, d_ff=64, num_heads=2, head_dim=16)
    params = random_params(cfg)

    def deviation(p):  # copy 0 minus the copies' mean, FFN input kernel (columns = FFN units, interleaved)
        w = np.asarray(p["layer_0"]["ffn"]["wi"]["kernel"]).reshape(32 * 2, 64, 2)
        return w[..., 0] - w.mean(-1)

    moved = {}
    for db in (-20.0, -10.0):
        noisy, bc = upscale.widen(params, cfg, 2, noise_db=db, key=jax.random.PRNGKey(2))
        c0 = float(upscale.copy_similarity(noisy, cfg, 2))
        assert c0 == pytest.approx(1 / math.sqrt(1 + 10 ** (db / 10)), abs=0.02)
        trained = _train(bc, noisy, 8, lr=3e-2)
        d0, d1 = deviation(noisy), deviation(trained)
        moved[db] = float(np.linalg.norm(d1 - d0) / np.linalg.norm(d0 + 1e-30))
        assert float(upscale.copy_similarity(trained, cfg, 2)) < 1.0 - 1e-4
    assert moved[-20.0] > 1e-3 and moved[-10.0] > 1e-3
    plain, bc = upscale.widen(params, cfg, 2)
    assert float(upscale.copy_similarity(_train(bc, plain, 8, lr=3e-2), cfg, 2)) == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------- optimizer

def _adam_step(cfg, tx, params, state, toks):
    g = _loss_grad(cfg)(params, toks)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state


@pytest.mark.parametrize("preset,grow", [("bert", "head_dim"), ("gpt", "num_heads"), ("t5", "head_dim")])
def test_first_update_after_widening_is_the_widened_small_update(x64, preset, grow):
    """widen_optimizer_state + update_scales: theta~_2 - theta~_1 = c rep(theta_2 - theta_1)."""
    cfg = make_cfg(preset)
    p0 = random_params(cfg)
    # the same chain structure on both sides (identity where the big model scales its updates)
    tx = optax.chain(optax.scale_by_adam(eps=1e-30), optax.identity(), optax.add_decayed_weights(0.1),
                     optax.scale(-1e-2))
    p1, s1 = _adam_step(cfg, tx, p0, tx.init(p0), tokens(seed=5))
    p2, _ = _adam_step(cfg, tx, p1, s1, tokens(seed=6))
    big1, bc = upscale.widen(p1, cfg, 2, grow=grow)
    big2, _ = upscale.widen(p2, cfg, 2, grow=grow)
    scales = upscale.update_scales(p1, cfg, 2, grow=grow)
    tx_big = optax.chain(optax.scale_by_adam(eps=1e-30), upscale.scale_updates(scales),
                         optax.add_decayed_weights(0.1), optax.scale(-1e-2))
    s_big = upscale.widen_optimizer_state(s1, p1, cfg, 2, grow=grow)
    got, _ = _adam_step(bc, tx_big, big1, s_big, tokens(seed=6))
    delta = jax.tree_util.tree_map(lambda a, b: a - b, got, big1)
    want = jax.tree_util.tree_map(lambda a, b: a - b, big2, big1)
    # The key bias adds q.b_k to every logit of a row, which the softmax ignores: its true gradient is 0
    # and Adam normalizes rounding noise, so it is compared separately (its decay part only, via delta size).
    for d in (delta, want):
        for name in d:
            if name.startswith("layer_") and "bias" in d[name]["attn"]["key"]:
                d[name]["attn"]["key"]["bias"] = jnp.zeros(())
    chex.assert_trees_all_close(delta, want, atol=1e-9, rtol=1e-6)
    # the mapped moments are what the big model would have accumulated: nu~ = rep(nu) / (c m)^2
    s_small = s1[0]
    nu_big = s_big[0].nu["layer_0"]["ffn"]["wo"]["kernel"]
    c = float(scales["layer_0"]["ffn"]["wo"]["kernel"])
    want_nu = jnp.repeat(jnp.repeat(s_small.nu["layer_0"]["ffn"]["wo"]["kernel"], 2, 0), 2, 1) / (c * 4) ** 2
    chex.assert_trees_all_close(nu_big, want_nu, rtol=1e-12)
    assert int(s_big[0].count) == int(s1[0].count)


def test_gradient_of_widened_model_is_rep_over_cm(x64):
    """The derivation's premise: g~ = rep(g) / (c m) for every tensor."""
    cfg = make_cfg("bert")
    p = random_params(cfg)
    toks = tokens()
    big, bc = upscale.widen(p, cfg, 2)
    g = jax.grad(lambda q: _loss(cfg, q, toks))(p)
    gb = jax.grad(lambda q: _loss(bc, q, toks))(big)
    state = optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=g, nu=g)
    mapped = upscale.widen_optimizer_state(state, p, cfg, 2)
    chex.assert_trees_all_close(mapped.mu, gb, atol=1e-12)


def test_unsupported_optimizer_state_is_refused():
    cfg = make_cfg("gpt", dtype="float32")
    p = random_params(cfg)
    state = optax.sgd(0.1, momentum=0.9).init(p)
    with pytest.raises(ValueError, match="unsupported params-shaped optimizer state TraceState"):
        upscale.widen_optimizer_state(state, p, cfg, 2)


# ---------------------------------------------------------------------------------------------- sharding

def test_sharded_widen_equals_unsharded():
    cfg = make_cfg("bert", dtype="float32", d_model=32, d_ff=64, num_heads=4, head_dim=8)
    params = random_params(cfg)
    mesh = parallel.make_mesh(data=1, fsdp=8)
    abstract_big = jax.eval_shape(lambda p: upscale.widen_params(p, cfg, 2), params)
    shardings = parallel.state_shardings(abstract_big, mesh, min_size=1)
    small_sharded = jax.device_put(params, parallel.state_shardings(params, mesh, min_size=1))
    big, bc = upscale.widen_sharded(small_sharded, cfg, 2, shardings)
    want, _ = upscale.widen(params, cfg, 2)
    chex.assert_trees_all_equal(jax.device_get(big), jax.device_get(want))
    kernel = big["layer_0"]["ffn"]["wi"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and kernel.addressable_shards[0].data.shape[1] == 64 * 2 // 8
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


# ---------------------------------------------------------------------------------------------- errors

def test_errors_are_clear():
    cfg = make_cfg("gpt", dtype="float32")
    p = random_params(cfg)
    with pytest.raises(ValueError, match="factor must be an integer >= 2"):
        upscale.widen(p, cfg, 1)
    with pytest.raises(ValueError, match="not an integer multiple is not supported"):
        upscale.widen(p, cfg, 1.5)
    with pytest.raises(ValueError, match=r"grow must be one of \('head_dim', 'num_heads'\)"):
        upscale.widen(p, cfg, 2, grow="depth")
    with pytest.raises(ValueError, match="noise_db needs a PRNG key"):
        upscale.widen(p, cfg, 2, noise_db=-10)
    with pytest.raises(ValueError, match=r"symmetry must be one of \('zero_sum', 'fan_out'\), got 'dropout'"):
        upscale.widen(p, cfg, 2, noise_db=-10, symmetry="dropout", key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="noise_db must be None .no noise. or a finite number of dB, got 'loud'"):
        upscale.widen(p, cfg, 2, noise_db="loud", key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"layer_0/ffn/wi/bias has shape \(32,\), the config implies \(64,\)"):
        upscale.widen(p, cfg.replace(d_ff=64), 2)
    other = random_params(make_cfg("bert", dtype="float32"))
    with pytest.raises(ValueError, match="params do not match the config: missing"):
        upscale.widen(other, cfg, 2)
    with pytest.raises(ValueError, match="WidenRules.ffn must be one of"):
        WidenRules(ffn="three_step")
    with pytest.raises(ValueError, match="not defined for a gated FFN"):
        upscale.widen(random_params(make_cfg("gpt", ffn="gated")), make_cfg("gpt", ffn="gated"), 2,
                      rules=WidenRules(ffn="plain"))


def test_assert_lossless_names_the_worst_tensor():
    cfg = make_cfg("gpt", dtype="float32")
    p = random_params(cfg)
    big, bc = upscale.widen(p, cfg, 2)
    big["layer_1"]["ffn"]["wo"]["bias"] = big["layer_1"]["ffn"]["wo"]["bias"] + 0.5
    with pytest.raises(AssertionError, match=r"largest deviation in (layer_1/output|final_norm/output|logits)"):
        upscale.assert_lossless(p, cfg, big, bc, tokens(), atol=1e-5, rtol=0.0)
    with pytest.raises(ValueError, match="not an integer multiple"):
        upscale.assert_lossless(p, cfg, big, bc.replace(d_model=40), tokens())


# ---------------------------------------------------------------------------------------------- depth

@pytest.mark.parametrize("residual", ["pre", "alpha"])
def test_deepen_inserts_identity_layers(x64, residual):
    cfg = make_cfg("gpt", residual=residual)
    params = random_params(cfg)
    deep, dc = upscale.deepen(params, cfg, insert_after=[-1, 0, 1])
    assert dc.num_layers == 5
    chex.assert_trees_all_close(logits_of(dc, deep, tokens()), logits_of(cfg, params, tokens()), atol=1e-12)
    # and it can be widened afterwards, still exactly
    wide, wc = upscale.widen(deep, dc, 2)
    assert max_logit_diff(cfg, params, wc, wide, tokens()) < 1e-10


def test_deepen_keeps_per_layer_masks(x64):
    cfg = make_cfg("gpt", mask="bidirectional", layer_masks=("independent", "uniae"))
    deep, dc = upscale.deepen(random_params(cfg), cfg, insert_after=[1])
    assert dc.layer_masks == ("independent", "uniae", "uniae")


@pytest.mark.parametrize("residual", ["post", "alpha_post"])
def test_deepen_refuses_post_norm(residual):
    cfg = make_cfg("bert", residual=residual, dtype="float32")
    with pytest.raises(ValueError, match=r"Norm\(x \+ F\(x\)\), which is Norm\(x\) != x"):
        upscale.deepen(random_params(cfg), cfg, insert_after=[0])
    with pytest.raises(ValueError, match="insert_after entries must be in"):
        upscale.deepen(random_params(make_cfg("gpt")), make_cfg("gpt"), insert_after=[7])


def test_headless_encoder_widens_to_scaled_repeat(x64):
    """head="none" (sentence encoders): the output is the final hidden state, rep(h)/sqrt(k)."""
    cfg = make_cfg("bert", head="none")
    params = random_params(cfg)
    big, bc = upscale.widen(params, cfg, 2)
    upscale.assert_lossless(params, cfg, big, bc, tokens(), atol=1e-10, rtol=0.0)
    h, hb = logits_of(cfg, params, tokens()), logits_of(bc, big, tokens())
    chex.assert_trees_all_close(hb, jnp.repeat(h, 2, -1) / math.sqrt(2), atol=1e-12)


# ---------------------------------------------------------------------------------------------- learning rates

def test_lr_multipliers_pick_the_stated_tensors():
    cfg = make_cfg("bert", dtype="float32")
    big, _ = upscale.widen(random_params(cfg), cfg, 2)
    for tensors, want in (("all", lambda path, x: True), ("matrices", lambda path, x: x.ndim >= 2),
                          ("hidden", lambda path, x: path[-1] == "kernel" and path[-2] in (
                              "query", "key", "value", "out", "wi", "wo", "mlm_dense"))):
        tree = upscale.lr_multipliers(big, 3.0, tensors=tensors)
        for path, m in jax.tree_util.tree_leaves_with_path(tree):
            names = tuple(getattr(p, "key", str(p)) for p in path)
            x = big
            for n in names:
                x = x[n]
            assert float(m) == (3.0 if want(names, x) else 1.0), (tensors, names)
    hidden = upscale.lr_multipliers(big, 3.0, tensors="hidden")
    assert float(hidden["embed"]["token"]) == 1.0 and float(hidden["layer_0"]["ffn"]["wi"]["kernel"]) == 3.0
    with pytest.raises(ValueError, match=r"tensors must be one of \('all', 'matrices', 'hidden'\), got 'bias'"):
        upscale.lr_multipliers(big, 2.0, tensors="bias")
    with pytest.raises(ValueError, match="multiplier must be a number > 0, got 0"):
        upscale.lr_multipliers(big, 0)


def test_make_optimizer_lr_scales_multiply_the_whole_step():
    """lr_scales = m on a tensor: its step (Adam part and decoupled weight decay) is m times the plain one."""
    import ml_collections

    from kexue_jax import training
    optim = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, schedule="constant", min_lr_ratio=0.1,
                                           weight_decay=0.1, b1=0.9, b2=0.99, eps=1e-8, clip_norm=None))
    params = {"w": jnp.ones((3, 2)), "b": jnp.full((2,), 0.5)}
    grads = {"w": jnp.arange(6.0).reshape(3, 2) - 2.0, "b": jnp.array([0.3, -0.1])}
    scales = {"w": jnp.asarray(4.0), "b": jnp.asarray(1.0)}
    plain, scaled = training.make_optimizer(optim, 10), training.make_optimizer(optim, 10, lr_scales=scales)
    u0, _ = plain.update(grads, plain.init(params), params)
    u1, _ = scaled.update(grads, scaled.init(params), params)
    np.testing.assert_allclose(u1["w"], 4.0 * u0["w"], rtol=1e-6)
    np.testing.assert_allclose(u1["b"], u0["b"], rtol=1e-6)
    assert jax.tree_util.tree_structure(plain.init(params)) == jax.tree_util.tree_structure(scaled.init(params))


# ---------------------------------------------------------------------------------------------- depth growth in the job

def test_deepen_optimizer_state_copies_neighbours_and_zeroes_the_residual_outputs():
    cfg = make_cfg("gpt", dtype="float32")
    params = random_params(cfg)
    tx = optax.adamw(1e-3)
    state = tx.init(params)
    g = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) * 0.5, params)
    _, state = tx.update(g, state, params)
    insert = upscale.depth_insertions(cfg.num_layers, 2)
    assert insert == [0, 1]
    deep, dc = upscale.deepen(params, cfg, insert)
    deep_state = upscale.deepen_optimizer_state(state, params, cfg, insert)
    mu = deep_state[0].mu
    chex.assert_trees_all_equal_shapes(mu, deep)
    chex.assert_trees_all_equal(mu["layer_1"]["attn"]["query"], state[0].mu["layer_0"]["attn"]["query"])
    assert float(jnp.max(jnp.abs(mu["layer_1"]["ffn"]["wo"]["kernel"]))) == 0.0
    assert float(jnp.max(jnp.abs(mu["layer_0"]["ffn"]["wo"]["kernel"]))) > 0.0
    assert int(deep_state[0].count) == 1
    u, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, deep), deep_state, deep)  # the state fits the model
    chex.assert_tree_all_finite(u)
    with pytest.raises(ValueError, match="depth_factor must be an integer >= 1, got 0"):
        upscale.depth_insertions(2, 0)
