"""muP (Tensor Programs V; beyond kexue.fm/archives/8620): per-tensor rates, init, readout, exact widening."""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from kexue_jax import training, upscale
from kexue_jax.nn import Transformer, TransformerConfig, mup_lr_scales
from kexue_jax.nn.mup import hidden_tensors

SMALL = dict(vocab_size=50, num_layers=2, d_model=16, num_heads=2, head_dim=8, d_ff=32, max_len=16)
#: every option that changes a widening rule, in one model per preset (the base model has the tied readout)
MUP_OPTIONS = {"ffn": "gated", "activation": "silu", "head": "lm", "tie_embeddings": False, "norm": "rmsnorm",
               "norm_eps": 1e-2, "residual": "alpha", "type_vocab_size": 2, "init_std": None}


def mup_cfg(preset, base=8, dtype="float64", **kw):
    return TransformerConfig.preset(preset, parameterization="mup", mup_base_d_model=base, dtype=dtype,
                                    param_dtype=dtype, **{**SMALL, **kw})


def random_params(cfg, seed=0):
    key = jax.random.PRNGKey(seed)
    params = Transformer(cfg).init(key, jnp.zeros((1, 4), jnp.int32))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
                                               for x, k in zip(leaves, keys)])


def tokens(n=10, batch=2, vocab=50, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, n), 0, vocab)


def test_lr_scales_match_the_hand_written_table():
    """GPT, untied head, d_model 32 over a base of 8: m = 4, hidden matrices lr / 4, everything else lr."""
    cfg = TransformerConfig.preset("gpt", parameterization="mup", mup_base_d_model=8, tie_embeddings=False,
                                   **{**SMALL, "num_layers": 1, "d_model": 32})
    params = Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    got = {"/".join(k.key for k in p): float(v)
           for p, v in jax.tree_util.tree_leaves_with_path(mup_lr_scales(params, cfg))}
    want = {
        "embed/token": 1.0, "embed/position": 1.0, "head/kernel": 1.0, "final_norm/scale": 1.0,
        "final_norm/bias": 1.0,
        "layer_0/attn_norm/scale": 1.0, "layer_0/attn_norm/bias": 1.0, "layer_0/ffn_norm/scale": 1.0,
        "layer_0/ffn_norm/bias": 1.0,
        "layer_0/attn/query/kernel": 0.25, "layer_0/attn/key/kernel": 0.25, "layer_0/attn/value/kernel": 0.25,
        "layer_0/attn/out/kernel": 0.25, "layer_0/ffn/wi/kernel": 0.25, "layer_0/ffn/wo/kernel": 0.25,
        "layer_0/attn/query/bias": 1.0, "layer_0/attn/key/bias": 1.0, "layer_0/attn/value/bias": 1.0,
        "layer_0/attn/out/bias": 1.0, "layer_0/ffn/wi/bias": 1.0, "layer_0/ffn/wo/bias": 1.0,
    }
    assert got == want
    assert cfg.attn_scale == "mup" and cfg.width_mult == 4.0 and cfg.readout_multiplier == 0.25


@pytest.mark.parametrize("mixer", ["attention", "linear", "gmlp", "resmlp", "mixer", "conv", "synthesizer_random",
                                   "fnet"])
def test_hidden_tensors_are_the_kernels_whose_two_axes_widen(mixer):
    """The shape rule agrees with the widening rules: hidden <=> two grown axes of ``upscale``'s table."""
    mask = "bidirectional" if mixer == "fnet" else "causal"
    cfg = TransformerConfig.preset("gpt", parameterization="mup", token_mixer=mixer, mask=mask,
                                   **{**SMALL, "d_model": 16, "num_heads": 2})
    hidden = hidden_tensors(cfg)
    for path, is_hidden in hidden.items():
        rule = upscale._rule(path, cfg, 2, "head_dim", upscale.WidenRules())
        grown = sum(upscale._growth(kind, 2, "head_dim") > 1 for kind in rule.axes)
        assert is_hidden == (grown >= 2), (mixer, path)
    assert any(hidden.values())


def test_mup_at_base_width_is_the_standard_model_with_1_over_d_attention():
    cfg = mup_cfg("bert", base=SMALL["d_model"], dtype="float32")
    sp = cfg.replace(parameterization="standard", mup_base_d_model=None)
    key = jax.random.PRNGKey(3)
    p_mup = Transformer(cfg).init(key, jnp.zeros((1, 4), jnp.int32))["params"]
    p_sp = Transformer(sp).init(key, jnp.zeros((1, 4), jnp.int32))["params"]
    chex.assert_trees_all_equal(p_mup, p_sp)
    chex.assert_trees_all_equal(Transformer(cfg).apply({"params": p_mup}, tokens()),
                                Transformer(sp).apply({"params": p_sp}, tokens()))
    scales = mup_lr_scales(p_mup, cfg)
    assert all(float(x) == 1.0 for x in jax.tree_util.tree_leaves(scales))


@pytest.mark.parametrize("init_std", [0.02, None])
def test_init_variances_follow_the_table(init_std):
    """Hidden kernels: variance x 1/m; embeddings and the untied readout: the base width's variance."""
    stds = {}
    for m in (1, 8):
        cfg = TransformerConfig.preset("gpt", parameterization="mup", mup_base_d_model=32, init_std=init_std,
                                       tie_embeddings=False, vocab_size=512, num_layers=1, d_model=32 * m,
                                       num_heads=4, head_dim=8 * m, d_ff=128 * m, max_len=8)
        p = Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
        stds[m] = {name: float(jnp.std(x)) for name, x in (("wi", p["layer_0"]["ffn"]["wi"]["kernel"]),
                                                           ("embed", p["embed"]["token"]),
                                                           ("head", p["head"]["kernel"]))}
    assert stds[8]["wi"] / stds[1]["wi"] == pytest.approx(1 / math.sqrt(8), rel=0.03)
    assert stds[8]["embed"] / stds[1]["embed"] == pytest.approx(1.0, rel=0.03)
    assert stds[8]["head"] / stds[1]["head"] == pytest.approx(1.0, rel=0.03)
    if init_std is not None:
        assert stds[1]["wi"] == pytest.approx(init_std, rel=0.03)


def test_readout_multiplies_the_logits_by_one_over_m():
    cfg = mup_cfg("gpt", base=4, dtype="float32")  # m = 4
    p = random_params(cfg)
    h = Transformer(cfg.replace(head="none")).apply({"params": {k: v for k, v in p.items()}}, tokens())
    want = jnp.einsum("bld,vd->blv", h, p["embed"]["token"]) / 4.0
    chex.assert_trees_all_close(Transformer(cfg).apply({"params": p}, tokens()), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field,kw,message", [
    ("attn_scale", dict(attn_scale="sqrt"), "TransformerConfig.attn_scale must be 'mup'"),
    ("token_mixer", dict(token_mixer="external", mask="bidirectional"), "TransformerConfig.token_mixer must be not"),
    ("conv_kind", dict(token_mixer="conv", mixer_options={"conv_kind": "dynamic"}),
     "TransformerConfig.mixer_options.conv_kind must be 'lightweight'"),
    ("mup_base_d_model", dict(mup_base_d_model=0), "TransformerConfig.mup_base_d_model must be None"),
])
def test_options_that_cannot_work_under_mup_are_refused(field, kw, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig.preset("gpt", parameterization="mup", **{**SMALL, **kw})


def test_base_width_without_mup_is_refused():
    with pytest.raises(ValueError, match="mup_base_d_model must be None unless parameterization='mup'"):
        TransformerConfig.preset("gpt", mup_base_d_model=8, **SMALL)
    with pytest.raises(ValueError, match="needs TransformerConfig.parameterization='mup'"):
        cfg = TransformerConfig.preset("gpt", **SMALL)
        mup_lr_scales(Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"], cfg)


# ---------------------------------------------------------------------------------------------- widening

def _assert_exact_widening(cfg, k, grow, noise_db, symmetry):
    params = random_params(cfg)
    toks = tokens()
    big, big_cfg = upscale.widen(params, cfg, k, grow=grow, noise_db=noise_db, symmetry=symmetry,
                                 key=jax.random.PRNGKey(k))
    scale = max(1.0, float(jnp.max(jnp.abs(Transformer(cfg).apply({"params": params}, toks)))))
    report = upscale.assert_lossless(params, cfg, big, big_cfg, toks, atol=1e-10, rtol=0.0)
    assert report["logits"] <= 1e-10 * scale, (k, grow, noise_db, report["logits"])
    assert big_cfg.width_mult == k * cfg.width_mult and big_cfg.norm_eps == cfg.norm_eps


@pytest.mark.parametrize("preset", [pytest.param("bert", marks=pytest.mark.slow), "gpt", "t5"])  # bert: ~30 s
def test_widening_under_mup_is_exact_fp64(x64, preset):
    """Each preset (tied readout, MuSharedReadout) at k in {2, 3, 4}, both grow modes among them, without noise
    and with -10 dB zero-sum (bert, t5) / 0 dB fan-out (gpt) noise: max |logits~ - logits| <= 1e-10 x the
    logit scale, hidden states s rep(h) with s = 1 (assert_lossless), the big model's m = k m, norm eps
    unchanged. The grow mode alternates with k from a start shifted by the preset (3 widenings per preset, each
    one compiles), so the presets together cover all six (k, grow) pairs; noise goes with grow="num_heads"."""
    cfg = mup_cfg(preset)
    shift = ("bert", "gpt", "t5").index(preset)
    for i, (k, noise) in enumerate(((2, None), (3, -10.0), (4, 0.0))):
        grow = ("head_dim", "num_heads")[(shift + i) % 2]
        _assert_exact_widening(cfg, k, grow, noise if grow == "num_heads" else None,
                               "fan_out" if k == 4 else "zero_sum")


@pytest.mark.parametrize("preset", ["bert", "gpt", "t5"])
def test_widening_under_mup_is_exact_fp64_with_every_option(x64, preset):
    """Gated SiLU FFN, untied head (MuReadout), RMSNorm with a large eps, alpha residual, segments, LeCun init."""
    cfg = mup_cfg(preset, **{**MUP_OPTIONS, "head": "mlm" if preset == "bert" else "lm",
                             "tie_embeddings": preset == "bert"})
    _assert_exact_widening(cfg, 2, "head_dim", -10.0, "zero_sum")
    _assert_exact_widening(cfg, 3, "num_heads", None, "zero_sum")


@pytest.mark.parametrize("mixer,grow", [("linear", "head_dim"), ("gmlp", "num_heads"), ("resmlp", "head_dim"),
                                        ("mixer", "num_heads"), ("conv", "head_dim"),
                                        ("synthesizer_random", "num_heads")])
def test_widening_under_mup_is_exact_for_the_mixers(x64, mixer, grow):
    cfg = mup_cfg("gpt", token_mixer=mixer, linear_head_multiplier=2 if mixer == "linear" else 1)
    _assert_exact_widening(cfg, 2, grow, -10.0, "zero_sum")


def test_widening_a_mup_model_without_a_base_takes_its_own_width_as_the_base(x64):
    cfg = mup_cfg("gpt", base=None)
    assert cfg.width_mult == 1.0
    big_cfg = upscale.widen_config(cfg, 2)
    assert big_cfg.mup_base_d_model == cfg.d_model and big_cfg.width_mult == 2.0
    _assert_exact_widening(cfg, 2, "head_dim", None, "zero_sum")


def test_widened_hidden_states_are_pure_repeats(x64):
    cfg = mup_cfg("bert")
    params = random_params(cfg)
    big, big_cfg = upscale.widen(params, cfg, 3)
    _, small = Transformer(cfg).apply({"params": params}, tokens(), return_intermediates=True)
    _, wide = Transformer(big_cfg).apply({"params": big}, tokens(), return_intermediates=True)
    for hs, hb in zip(small["hidden"], wide["hidden"]):
        chex.assert_trees_all_close(hb, jnp.repeat(hs, 3, -1), atol=1e-12)


def test_update_scales_are_the_ratio_of_the_big_and_small_mup_rates(x64):
    """upscale.update_scales (what makes the first widened step exact) = mup rates(big) / mup rates(small)."""
    cfg = mup_cfg("gpt", tie_embeddings=False, head="lm")
    params = random_params(cfg)
    for grow in ("head_dim", "num_heads"):
        big, big_cfg = upscale.widen(params, cfg, 2, grow=grow)
        ratio = jax.tree_util.tree_map(lambda a, b: a / b, mup_lr_scales(big, big_cfg), mup_lr_scales(params, cfg))
        chex.assert_trees_all_close(upscale.update_scales(params, cfg, 2, grow=grow), ratio, rtol=1e-12)


def _loss(cfg, params, toks):
    logits = Transformer(cfg).apply({"params": params}, toks[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], -1))


@pytest.mark.parametrize("preset,grow", [pytest.param("bert", "head_dim", marks=pytest.mark.slow),  # ~30 s
                                         ("gpt", "num_heads"), ("t5", "head_dim")])
def test_first_step_after_widening_uses_the_big_models_mup_rates_and_nothing_else(x64, preset, grow):
    """Small model: two steps of make_optimizer(model_cfg=small) (muP rates). Widen after the first; one step of
    make_optimizer(model_cfg=big) with the mapped Adam state, no update scale or multiplier: the update is the
    widened image of the small model's second update (weight decay 0: muP's decoupled decay is lr_i x wd, which
    the widened model applies at its own rate)."""
    import ml_collections
    optim = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, schedule="constant", min_lr_ratio=1.0,
                                           weight_decay=0.0, b1=0.9, b2=0.99, eps=1e-30, clip_norm=None))
    cfg = mup_cfg(preset)
    p0 = random_params(cfg)
    tx = training.make_optimizer(optim, 10, model_cfg=cfg)

    @functools.partial(jax.jit, static_argnums=(0, 1))  # one compilation per model, not one per eager op
    def step(c, t, p, s, toks):
        g = jax.grad(lambda q: _loss(c, q, toks))(p)
        u, s = t.update(g, s, p)
        return optax.apply_updates(p, u), s

    p1, s1 = step(cfg, tx, p0, tx.init(p0), tokens(seed=5))
    p2, _ = step(cfg, tx, p1, s1, tokens(seed=6))
    big1, big_cfg = upscale.widen(p1, cfg, 2, grow=grow)
    big2, _ = upscale.widen(p2, cfg, 2, grow=grow)
    tx_big = training.make_optimizer(optim, 10, model_cfg=big_cfg)
    s_big = upscale.widen_optimizer_state(s1, p1, cfg, 2, grow=grow)
    got, _ = step(big_cfg, tx_big, big1, s_big, tokens(seed=6))
    delta = jax.tree_util.tree_map(lambda a, b: a - b, got, big1)
    want = jax.tree_util.tree_map(lambda a, b: a - b, big2, big1)
    for d in (delta, want):  # the key bias has a zero true gradient (see test_upscale): compared elsewhere
        for name in d:
            if name.startswith("layer_") and "bias" in d[name]["attn"]["key"]:
                d[name]["attn"]["key"]["bias"] = jnp.zeros(())
    chex.assert_trees_all_close(delta, want, atol=1e-9, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- coordinate check

COORD_WIDTHS = (32, 64, 128, 256, 512)


@pytest.fixture(scope="module")
def coord_check():
    """microsoft/mup's coordinate check: 4 Adam steps at lr 1e-2 at d_model 32 ... 512 (GPT, 2 layers, heads
    fixed, muP base 32), mean |x| of every layer output after each step (benchmarks/mup_coord_check.py plots it)."""
    from kexue_jax.experiments import mup as mup_study
    out = {}
    for param in ("mup", "standard"):
        kw = dict(parameterization="mup", mup_base_d_model=32) if param == "mup" else {}
        base = TransformerConfig.preset("gpt", vocab_size=64, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                                        d_ff=128, max_len=16, **kw)
        out[param] = mup_study.coord_data(base, COORD_WIDTHS, lr=1e-2, steps=4, batch_size=4, seq_len=16)
    return out


def test_coordinate_check_mup_is_flat_and_standard_grows(coord_check):
    """After 4 steps: under muP every output (embedding, each block's attention and FFN output, logits) has a
    log-log slope against width in [-0.4, 0.3] and max/min over the x16 width range <= 3 (measured: |slope| <=
    0.3, band <= 2.4); under the standard parameterization the logits grow like the width (slope >= 0.6; measured
    0.9) and the hidden outputs faster (slope >= 1; measured 1.6-2.0)."""
    from kexue_jax.experiments import mup as mup_study
    mup_data, sp_data = coord_check["mup"], coord_check["standard"]
    names = list(mup_data[32])
    assert sorted(names) == sorted(["embedding", "layer_0/mixer", "layer_0/ffn", "layer_1/mixer", "layer_1/ffn",
                                    "logits"])
    for name in names:
        assert -0.4 <= mup_study.growth_exponent(mup_data, name) <= 0.3, name
        assert mup_study.coord_band(mup_data, name) <= 3.0, name
    assert mup_study.growth_exponent(sp_data, "logits") >= 0.6
    assert min(mup_study.growth_exponent(sp_data, n) for n in names if n.startswith("layer_")) >= 1.0
    # muP's init is already width-stable (hidden variance 1/fan_in; measured bands <= 1.3 at t = 0, the logits
    # excepted: at init they shrink like 1/sqrt(m), muP's readout, slope -0.43); the standard init_std = 0.02 is
    # not: the FFN output of a LayerNorm'd input grows like d_model at t = 0 already (slope 1.06)
    for name in names:
        if name != "logits":
            assert mup_study.coord_band(mup_data, name, t=0) <= 1.5, name
    assert mup_study.growth_exponent(sp_data, "layer_0/ffn", t=0) >= 0.6


@pytest.mark.parametrize("config_file,variant", [("lm", "tiny"), ("upscale", "tiny"), ("upscale", "pod")])
def test_job_configs_take_mup_from_the_command_line_field(config_file, variant):
    """``--config.model.parameterization=mup`` alone gives a muP model (1/d attention picked by the preset) whose
    optimizer carries the muP rates; the upscaling job's multiplier after widening is then 1 (2 otherwise)."""
    import importlib

    from kexue_jax import config as config_lib
    from kexue_jax.experiments import upscale as upscale_job
    c = importlib.import_module(f"configs.{config_file}").get_config(variant)
    if variant != "pod":  # :pod is muP already
        c.model.parameterization = "mup"
        c.model.mup_base_d_model = c.model.d_model // 2
    cfg = config_lib.model_config(c.model)
    assert cfg.parameterization == "mup" and cfg.attn_scale == "mup"
    scales = training.model_lr_scales(cfg)
    m = cfg.width_mult
    assert float(scales["layer_0"]["ffn"]["wi"]["kernel"]) == pytest.approx(1 / m)
    assert float(scales["embed"]["token"]) == 1.0
    if config_file == "upscale":
        assert upscale_job.lr_multiplier(c) == 1.0
        c.model.parameterization = "standard"
        c.model.mup_base_d_model = None
        assert upscale_job.lr_multiplier(c) == 2.0
