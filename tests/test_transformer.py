"""Tests for kexue_jax.nn.transformer: presets, config validation, parameter trees, NTK, dtypes, jit/traces,
gradients, intermediates and the UniVAE injection hook (kexue.fm/archives/8620, 8475, 8444)."""
import dataclasses
import functools
import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kexue_jax.nn import Transformer, TransformerConfig, transformer
from kexue_jax.nn.attention import qk_init_variance_factor
from kexue_jax.nn.transformer import FeedForward

V, B, L = 64, 2, 8
TINY = dict(vocab_size=V, num_layers=2, d_model=32, num_heads=2, head_dim=16, d_ff=64, max_len=16)
PRESETS = ("bert", "gpt", "t5")


def _tokens(seed=0, b=B, n=L):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, n)), jnp.int32)


SEG = jnp.asarray([[0] * (L // 2) + [1] * (L // 2)] * B, jnp.int32)


@functools.lru_cache(maxsize=None)
def _params(cfg: TransformerConfig):
    """Jitted init, cached per config. The "rbg" key compiles about 2x faster than threefry on CPU (init compiles
    are the slow part of this file); the initializers' distributions do not depend on the key type."""
    return jax.jit(Transformer(cfg).init)(jax.random.key(0, impl="rbg"), _tokens(), SEG)["params"]


@functools.lru_cache(maxsize=None)
def _forward(cfg: TransformerConfig, intermediates: bool = False):
    model = Transformer(cfg)
    return jax.jit(lambda p, t, s: model.apply({"params": p}, t, s, return_intermediates=intermediates))


def _paths(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf.shape
            for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# -- config and presets ----------------------------------------------------------------------------------------------

def test_default_config_is_a_small_valid_gpt_like_model():
    cfg = TransformerConfig()
    assert (cfg.residual, cfg.mask, cfg.head, cfg.tie_embeddings, cfg.has_final_norm) == ("pre", "causal", "lm",
                                                                                        True, True)
    assert cfg.d_model <= 128 and cfg.num_layers <= 4
    assert TransformerConfig(**cfg.to_dict()) == cfg
    assert cfg.replace(num_layers=3).num_layers == 3 and cfg.num_layers == 2  # frozen, replace copies
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3


def test_presets_values_and_overrides():
    bert, gpt, t5 = (TransformerConfig.preset(n) for n in PRESETS)
    assert (bert.residual, bert.head, bert.attn_scale, bert.type_vocab_size, bert.embed_norm, bert.mask,
            bert.norm_eps, bert.activation, bert.use_bias) == ("post", "mlm", "sqrt", 2, True, "bidirectional",
                                                               1e-12, "gelu", True)
    assert (gpt.residual, gpt.has_final_norm, gpt.tie_embeddings, gpt.position, gpt.mask) == ("pre", True, True,
                                                                                         "learned", "causal")
    assert (t5.norm, t5.use_bias, t5.attn_scale, t5.activation, t5.tie_embeddings, t5.position,
            t5.init_std) == ("rmsnorm", False, "t5", "relu", False, "relative", None)
    gated = TransformerConfig.preset("t5", ffn="gated", activation="gelu", num_layers=3)
    assert (gated.ffn, gated.activation, gated.num_layers, gated.norm) == ("gated", "gelu", 3, "rmsnorm")
    with pytest.raises(ValueError, match=r"preset must be one of \('bert', 'gpt', 't5'\)"):
        TransformerConfig.preset("llama")
    with pytest.raises(ValueError, match=r"unknown TransformerConfig field\(s\) \['hidden_size'\]"):
        TransformerConfig.preset("gpt", hidden_size=3)


# field, bad value, the allowed values that the message must list
BAD_FIELDS = [
    ("vocab_size", 0, ["positive integer"]),
    ("num_layers", -1, ["positive integer"]),
    ("d_model", 32.0, ["positive integer"]),
    ("num_heads", True, ["positive integer"]),
    ("head_dim", 0, ["positive integer"]),
    ("d_ff", None, ["positive integer"]),
    ("max_len", 0, ["positive integer"]),
    ("rel_buckets", 0, ["positive integer"]),
    ("rel_max_distance", -3, ["positive integer"]),
    ("linear_head_multiplier", 0, ["positive integer"]),
    ("type_vocab_size", -1, [">= 0"]),
    ("position", "absolute", ["learned", "rope", "relative", "none"]),
    ("norm", "batchnorm", ["layernorm", "rmsnorm"]),
    ("residual", "sandwich", ["post", "pre", "alpha", "alpha_post"]),
    ("activation", "swish", ["gelu", "gelu_tanh", "relu", "silu", "linear"]),
    ("ffn", "moe", ["plain", "gated"]),
    ("attn_scale", "inverse", ["sqrt", "t5", "mup", "none"]),
    ("mask", "prefix", ["causal", "bidirectional", "unilm", "uniae", "independent"]),
    ("token_mixer", "mlp", ["attention", "linear"]),
    ("head", "cls", ["lm", "mlm"]),
    ("parameterization", "mup-ish", ["standard", "ntk", "mup"]),
    ("dtype", "int8", ["float32", "bfloat16", "float16", "float64"]),
    ("param_dtype", "fp32", ["float32", "bfloat16", "float16", "float64"]),
    ("attention_impl", "flash", ["auto", "einsum", "xla", "cudnn"]),
    ("layer_masks", ("causal",), ["num_layers=2"]),
    ("layer_masks", ("causal", "prefix"), ["causal", "bidirectional", "unilm", "uniae", "independent"]),
    ("norm_eps", 0.0, ["> 0"]),
    ("rope_base", -1.0, ["> 0"]),
    ("head_norm_eps", 0.0, ["None", "> 0"]),
    ("head_norm_eps", "1e-5", ["None", "> 0"]),
    ("init_std", 0.0, ["None", "> 0"]),
    ("dropout_rate", 1.0, ["[0, 1)"]),
    ("dropout_rate", -0.1, ["[0, 1)"]),
    ("final_norm", "yes", ["None", "True", "False"]),
    ("use_bias", 1, ["True", "False"]),
    ("tie_embeddings", None, ["True", "False"]),
    ("embed_norm", "no", ["True", "False"]),
]


@pytest.mark.parametrize("field,value,allowed", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_config_errors_name_the_field_and_allowed_values(field, value, allowed):
    with pytest.raises(ValueError) as e:
        TransformerConfig(**{field: value})
    msg = str(e.value)
    assert f"TransformerConfig.{field}" in msg and repr(value) in msg
    for a in allowed:
        assert a in msg, (a, msg)


@pytest.mark.parametrize("changes,field,allowed", [
    (dict(position="rope", head_dim=15), "head_dim", "even"),
    (dict(token_mixer="linear", mask="unilm"), "mask", "'causal' or 'bidirectional'"),
    (dict(token_mixer="linear", position="relative"), "position", "'learned', 'rope', 'none'"),
    (dict(head="mlm", tie_embeddings=False), "tie_embeddings", "True with head='mlm'"),
])
def test_config_cross_field_errors(changes, field, allowed):
    with pytest.raises(ValueError, match=f"TransformerConfig.{field}") as e:
        TransformerConfig(**changes)
    assert allowed in str(e.value)


def test_call_argument_errors():
    cfg = TransformerConfig(**TINY)
    model, params = Transformer(cfg), _params(cfg)
    with pytest.raises(ValueError, match="tokens must have shape"):
        model.apply({"params": params}, jnp.zeros((8,), jnp.int32))
    with pytest.raises(ValueError, match="max_len=16"):
        model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match=r"inject.*\[0, 2\)"):
        model.apply({"params": params}, _tokens(), inject={2: jnp.zeros((B, 32))})


# -- every preset: build, run, parameter tree, gradients, intermediates -----------------------------------------------

@functools.lru_cache(maxsize=None)
def _preset(name):
    return TransformerConfig.preset(name, **TINY)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_runs_has_documented_tree_and_finite_gradients(name):
    cfg = _preset(name)
    model, params = Transformer(cfg), _params(cfg)
    tokens, targets = _tokens(1), _tokens(2)

    @jax.jit
    def loss_and_grad(p):
        def loss(p):
            logits, aux = model.apply({"params": p}, tokens, SEG, return_intermediates=True)
            onehot = jax.nn.one_hot(targets, V)
            return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * onehot, -1)), (logits, aux)

        return jax.value_and_grad(loss, has_aux=True)(p)

    (value, (logits, aux)), grads = loss_and_grad(params)
    chex.assert_shape(logits, (B, L, V))
    chex.assert_tree_all_finite((value, logits, grads))
    # near-uniform predictions at init: log V, plus Var(logits)/2 (~0.5 for T5's unit-variance untied head)
    assert math.log(V) - 0.05 < float(value) < math.log(V) + 1.0
    # every parameter gets a non-zero gradient (nothing is dead or disconnected)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
    # intermediates: num_layers + 1 hidden states, per-layer probabilities [B, H, L, L]
    assert len(aux["hidden"]) == cfg.num_layers + 1 and len(aux["attention"]) == cfg.num_layers
    chex.assert_shape(aux["hidden"], (B, L, cfg.d_model))
    chex.assert_shape(aux["attention"], (B, cfg.num_heads, L, L))
    for probs in aux["attention"]:
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)

    paths = _paths(params)
    D, H, Dh, F = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff
    for i in range(cfg.num_layers):
        assert paths[f"layer_{i}/attn/query/kernel"] == (D, H, Dh)
        assert paths[f"layer_{i}/attn/key/kernel"] == (D, H, Dh)
        assert paths[f"layer_{i}/attn/out/kernel"] == (H, Dh, D)
        assert paths[f"layer_{i}/ffn/wi/kernel"] == (D, F) and paths[f"layer_{i}/ffn/wo/kernel"] == (F, D)
        assert f"layer_{i}/attn_norm/scale" in paths and f"layer_{i}/ffn_norm/scale" in paths
    assert paths["embed/token"] == (V, D)
    if name == "bert":
        assert paths["embed/position"] == (16, D) and paths["embed/segment"] == (2, D)
        for key in ("embed_norm/scale", "embed_norm/bias", "mlm_dense/kernel", "mlm_dense/bias", "mlm_norm/scale",
                    "mlm_norm/bias", "output_bias", "layer_0/attn/query/bias", "layer_0/ffn/wi/bias"):
            assert key in paths, key
        assert not any(p.startswith(("final_norm", "head")) for p in paths)
        assert set(aux) >= {"mlm_hidden", "mlm_normed"}
    if name == "gpt":
        assert "final_norm/scale" in paths and "final_norm/bias" in paths and "embed/position" in paths
        assert not any(p.startswith(("head", "embed_norm", "mlm", "output_bias", "embed/segment")) for p in paths)
        assert "final" in aux
    if name == "t5":
        assert not [p for p in paths if p.endswith("bias") and not p.endswith("rel_bias")]  # no biases anywhere
        assert paths["head/kernel"] == (D, V)  # untied
        assert paths["layer_0/attn/rel_bias"] == (cfg.rel_buckets, H)
        assert "final_norm/scale" in paths and "embed/position" not in paths


# -- FFN variants ---------------------------------------------------------------------------------------------------------

def _np_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


@pytest.mark.parametrize("ffn,activation,use_bias", [("gated", "gelu", False), ("plain", "gelu", True),
                                                     ("plain", "relu", False)])
def test_feed_forward_matches_numpy(ffn, activation, use_bias):
    cfg = TransformerConfig(d_model=16, d_ff=24, ffn=ffn, activation=activation, use_bias=use_bias)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 16)), jnp.float32)
    ff = FeedForward(cfg)
    rng = np.random.default_rng(4)  # any values will do: the test is of the forward formula
    p = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.2, a.dtype),
                               jax.eval_shape(ff.init, jax.random.key(1), x)["params"])
    assert ("wi_gate" in p) == (ffn == "gated")
    y = ff.apply({"params": p}, x)
    act = _np_gelu if activation == "gelu" else (lambda z: np.maximum(z, 0))
    xn = np.asarray(x, np.float64)

    def dense(name, h):
        out = h @ np.asarray(p[name]["kernel"], np.float64)
        return out + np.asarray(p[name]["bias"]) if "bias" in p[name] else out

    h = act(dense("wi_gate", xn)) * dense("wi", xn) if ffn == "gated" else act(dense("wi", xn))
    np.testing.assert_allclose(y, dense("wo", h), rtol=1e-5, atol=1e-6)


# -- NTK parameterization -----------------------------------------------------------------------------------------------

def test_ntk_params_are_unit_normal_and_equal_to_scaled_standard_model():
    cfg_ntk = TransformerConfig.preset("t5", parameterization="ntk", **TINY)  # T5: includes the q/k extra factor
    p_ntk = _params(cfg_ntk)
    kernels = jnp.concatenate([leaf.ravel() for path, leaf in jax.tree_util.tree_leaves_with_path(p_ntk)
                               if jax.tree_util.keystr(path).endswith("['kernel']")])
    assert kernels.size > 15_000
    assert float(jnp.std(kernels)) == pytest.approx(1.0, abs=0.02)  # N(0, 1), not 1/fan_in
    # The same function as the standard parameterization with W_std = W_ntk * sqrt(extra / fan_in).
    extra = qk_init_variance_factor("t5", cfg_ntk.head_dim)
    D, F, HD = cfg_ntk.d_model, cfg_ntk.d_ff, cfg_ntk.num_heads * cfg_ntk.head_dim

    def to_standard(path, a):
        s = jax.tree_util.keystr(path, simple=True, separator="/")
        if not s.endswith("kernel"):
            return a
        fan_in = {"out": HD, "wo": F}.get(s.split("/")[-2], D)
        factor = extra if s.split("/")[-2] in ("query", "key") else 1.0
        return a * math.sqrt(factor / fan_in)

    p_std = jax.tree_util.tree_map_with_path(to_standard, p_ntk)
    cfg_std = cfg_ntk.replace(parameterization="standard")
    y_ntk = _forward(cfg_ntk)(p_ntk, _tokens(4), SEG)
    y_std = _forward(cfg_std)(p_std, _tokens(4), SEG)
    np.testing.assert_allclose(y_ntk, y_std, rtol=1e-4, atol=1e-4)


# -- jit / no-jit, traces, dtypes --------------------------------------------------------------------------------------------

class TestJitVariants(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_no_jit_equal(self):
        cfg = TransformerConfig(**TINY)
        model, params = Transformer(cfg), _params(cfg)

        @self.variant
        def apply(p, tokens, seg, alpha):
            return model.apply({"params": p}, tokens, seg, alpha=alpha)

        y = apply(params, _tokens(5), SEG, 1.0)
        chex.assert_shape(y, (B, L, V))
        chex.assert_tree_all_finite(y)
        reference = _forward(cfg)(params, _tokens(5), SEG)
        chex.assert_trees_all_close(y, reference, rtol=1e-5, atol=1e-5)


def test_one_trace_per_shape():
    cfg = TransformerConfig(**TINY, residual="alpha")
    # the alpha tree is the Pre-Norm tree without the per-block norms
    params = {k: ({n: v for n, v in sub.items() if not n.endswith("_norm")} if k.startswith("layer_") else sub)
              for k, sub in _params(TransformerConfig(**TINY)).items()}
    chex.assert_trees_all_equal_shapes(params, jax.eval_shape(Transformer(cfg).init, jax.random.key(0), _tokens()
                                                              )["params"])
    model = Transformer(cfg)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(p, tokens, seg, alpha):
        return model.apply({"params": p}, tokens, seg, alpha=alpha)

    outs = [apply(params, _tokens(i), SEG * (i % 2), jnp.float32(a)) for i, a in enumerate((0.0, 0.3, 1.0))]
    assert not np.allclose(outs[0], outs[1])  # new tokens, segments and alpha: computed, not retraced
    with pytest.raises(AssertionError, match="traced > 1"):  # a new shape is a new trace (the counter works)
        apply(params, _tokens(0, n=L + 1), jnp.zeros((B, L + 1), jnp.int32), jnp.float32(1.0))
    chex.clear_trace_counter()


def test_float64_run_matches_float32():
    cfg = TransformerConfig(**TINY)
    params = _params(cfg)
    y32 = _forward(cfg)(params, _tokens(6), SEG)
    with jax.enable_x64(True):
        cfg64 = cfg.replace(dtype="float64", param_dtype="float64")
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        y64 = jax.jit(lambda p: Transformer(cfg64).apply({"params": p}, _tokens(6), SEG))(p64)
        assert y64.dtype == jnp.float64
        chex.assert_tree_all_finite(y64)
        np.testing.assert_allclose(np.asarray(y64), np.asarray(y32), rtol=1e-4, atol=1e-5)


def test_bfloat16_run_is_finite_with_float32_softmax():
    cfg = TransformerConfig(**TINY)
    params = _params(cfg)
    y32 = _forward(cfg)(params, _tokens(7), SEG)
    cfg16 = cfg.replace(dtype="bfloat16")
    y16, aux = _forward(cfg16, True)(params, _tokens(7), SEG)
    assert y16.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(y16)
    assert all(p.dtype == jnp.float32 for p in aux["attention"])
    # bf16 activations (8-bit mantissa) through 2 layers: logits within 5% of their spread
    err = float(jnp.abs(y16.astype(jnp.float32) - y32).max())
    assert err < 0.05 * float(jnp.abs(y32).max()), err
    # param_dtype bfloat16 gives bf16 parameters (shape-only evaluation, no compile)
    shapes = jax.eval_shape(Transformer(cfg.replace(param_dtype="bfloat16")).init, jax.random.key(0), _tokens())
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}


def test_einsum_and_fused_attention_give_the_same_model():
    cfg = TransformerConfig(**TINY)
    params = _params(cfg)
    y_auto = _forward(cfg)(params, _tokens(8), SEG)
    y_ein = _forward(cfg.replace(attention_impl="einsum"))(params, _tokens(8), SEG)
    np.testing.assert_allclose(y_auto, y_ein, rtol=1e-5, atol=1e-5)


def test_dropout_needs_rng_and_changes_outputs():
    cfg = TransformerConfig(**TINY, dropout_rate=0.2)
    params = _params(TransformerConfig(**TINY))  # dropout adds no parameters
    model = Transformer(cfg)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        model.apply({"params": params}, _tokens(9), deterministic=False)
    train = jax.jit(lambda k: model.apply({"params": params}, _tokens(9), deterministic=False,
                                          rngs={"dropout": k}))
    y1, y1b, y2 = train(jax.random.key(1)), train(jax.random.key(1)), train(jax.random.key(2))
    np.testing.assert_array_equal(y1, y1b)
    assert float(jnp.abs(y1 - y2).max()) > 1e-3
    y_det = _forward(cfg)(params, _tokens(9), jnp.zeros_like(SEG))
    np.testing.assert_allclose(y_det, _forward(TransformerConfig(**TINY))(params, _tokens(9), jnp.zeros_like(SEG)),
                               rtol=1e-6)  # deterministic=True: no dropout at all
    assert float(jnp.abs(y1 - y_det).max()) > 1e-3


# -- UniVAE hook: inject at position 0 -------------------------------------------------------------------------------------

def test_inject_overwrites_position_0_and_reaches_the_target_under_uniae():
    cfg = TransformerConfig(**TINY, layer_masks=("independent", "uniae"))
    model, params = Transformer(cfg), _params(TransformerConfig(**TINY))  # masks add no parameters

    @jax.jit
    def run(tokens, z):
        return model.apply({"params": params}, tokens, SEG, inject={1: z}, return_intermediates=True)

    rng = np.random.default_rng(10)
    z1, z2 = (jnp.asarray(rng.normal(size=(B, 32)), jnp.float32) for _ in range(2))
    t = _tokens(11)
    y1, aux1 = run(t, z1)
    y2, aux2 = run(t, z2)
    np.testing.assert_array_equal(aux1["hidden"][1][:, 0], z1)  # the state entering layer 1 has z at position 0
    np.testing.assert_array_equal(aux1["hidden"][1][:, 1:], aux2["hidden"][1][:, 1:])  # nothing else changed
    tgt = slice(L // 2, L)
    assert float(jnp.abs(y1[:, tgt] - y2[:, tgt]).max()) > 1e-3  # the latent reaches the target side
    # the independent layer 0 keeps the target blind to the source: new source tokens, same target states
    t_new_src = t.at[:, : L // 2].set(_tokens(12)[:, : L // 2])
    y3, aux3 = run(t_new_src, z1)
    np.testing.assert_array_equal(aux3["hidden"][1][:, tgt], aux1["hidden"][1][:, tgt])
    np.testing.assert_array_equal(y3[:, tgt], y1[:, tgt])  # and with z fixed, the target output too


def test_module_constants():
    assert transformer.FFNS == ("plain", "gated")
    assert transformer.POSITIONS == ("learned", "rope", "relative", "none")
    assert transformer.PARAMETERIZATIONS == ("standard", "ntk", "mup")


def test_option_combination_runs():
    # options combine freely: RoPE + RMSNorm + gated SiLU + alpha_post + unilm + muP scale + NTK + embed norm
    cfg = TransformerConfig(**TINY, position="rope", norm="rmsnorm", ffn="gated", activation="silu",
                            residual="alpha_post", mask="unilm", attn_scale="mup", parameterization="ntk",
                            embed_norm=True, type_vocab_size=2, tie_embeddings=False, use_bias=False)
    params = _params(cfg)
    assert "position" not in params["embed"] and "wi_gate" in params["layer_0"]["ffn"] and "head" in params
    y, aux = _forward(cfg, True)(params, _tokens(13), SEG)
    chex.assert_shape(y, (B, L, V))
    chex.assert_tree_all_finite((y, aux))
    probs = np.asarray(aux["attention"][0])  # unilm: source rows never see the target
    assert np.all(probs[:, :, : L // 2, L // 2:] == 0)
