"""Tests for kexue_jax.nn.attention: logit scales, T5 init, the fused/einsum paths, RoPE, T5 buckets, dtypes
(kexue.fm/archives/8620). Independent references: numpy fp64 attention, numpy complex RoPE, numpy T5 buckets."""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kexue_jax.nn import TransformerConfig, attention
from kexue_jax.nn.attention import (MultiHeadAttention, logit_scale, qk_init_variance_factor,
                                    relative_position_bucket, rope)

# One compile per call pattern instead of one per eager op (keeps this file fast on 2 cores).
dot_product_attention = jax.jit(attention.dot_product_attention,
                                static_argnames=("scale", "dropout_rate", "return_probs", "implementation"))


def np_attention(q, k, v, mask=None, bias=None, scale=1.0):
    """fp64 numpy reference: softmax(q k^T scale + bias, masked) v; q [B, Lq, H, D]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -np.inf)
    with np.errstate(invalid="ignore"):  # fully masked rows -> nan here; the tests compare the others
        logits = logits - logits.max(-1, keepdims=True)
        p = np.exp(logits)
        p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v), p


def _qkv(seed, b=2, lq=10, lk=12, h=3, d=16, dtype=jnp.float32):
    """Random q, k, v from numpy (no per-shape PRNG compiles)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(b, l, h, d)), dtype) for l in (lq, lk, lk))


def _mask_and_bias(seed, b=2, lq=10, lk=12, h=3, fully_masked_row=True):
    rng = np.random.default_rng(seed)
    mask = rng.random((b, 1, lq, lk)) < 0.6
    mask[:, :, :, 0] = True  # every row has a key ...
    if fully_masked_row:
        mask[0, 0, 3, :] = False  # ... except one fully masked row
    return jnp.asarray(mask), jnp.asarray(rng.normal(size=(b, h, lq, lk)), jnp.float32)


# -- why scale: Var(q.k) -----------------------------------------------------------------------------------------

def test_var_qk_direct_iid_vectors_and_softmax_saturation():
    d, n = 64, 200_000
    q, k = np.random.default_rng(0).standard_normal((2, n, d), np.float32)
    qk = np.sum(q * k, -1, dtype=np.float64)
    assert float(np.var(qk)) == pytest.approx(d, rel=0.05)  # E[(q.k)^2] = d
    assert float(np.var(qk / math.sqrt(d))) == pytest.approx(1.0, rel=0.05)
    # logits over 64 keys: unscaled (std 8) the softmax is nearly one-hot; scaled it is spread out
    q, k = np.random.default_rng(1).standard_normal((2, 512, 64, d), np.float32)
    logits = np.einsum("nd,nkd->nk", q[:, 0].astype(np.float64), k)

    def entropy(x):
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return float(np.mean(-np.sum(p * np.log(p + 1e-300), -1)))

    assert entropy(logits) < 0.8  # measured 0.60 nats (one-hot: 0)
    assert entropy(logits / math.sqrt(d)) > 3.3  # log 64 = 4.16


def test_logit_scale_conventions():
    assert logit_scale("sqrt", 64) == pytest.approx(1 / 8)
    assert logit_scale("t5", 64) == 1.0
    assert logit_scale("mup", 64) == pytest.approx(1 / 64)
    assert qk_init_variance_factor("t5", 64) == pytest.approx(1 / 8)
    assert qk_init_variance_factor("sqrt", 64) == 1.0 and qk_init_variance_factor("mup", 64) == 1.0
    assert logit_scale("none", 64) == 1.0 and qk_init_variance_factor("none", 64) == 1.0  # the post's failing model
    with pytest.raises(ValueError, match=r"attn_scale must be one of \('sqrt', 't5', 'mup', 'none'\)"):
        logit_scale("bogus", 64)


D_MODEL, HEADS, HEAD_DIM = 256, 4, 64


@pytest.mark.parametrize("parameterization", ["standard", "ntk"])
@pytest.mark.parametrize("attn_scale,var_qk,var_logit", [
    ("sqrt", HEAD_DIM, 1.0), ("t5", 1.0, 1.0), ("mup", HEAD_DIM, 1.0 / HEAD_DIM)])
def test_var_qk_on_the_models_own_projections(attn_scale, var_qk, var_logit, parameterization):
    # Unit-variance input through the model's query/key projections at init (second-moment init, or NTK).
    cfg = TransformerConfig(d_model=D_MODEL, num_heads=HEADS, head_dim=HEAD_DIM, attn_scale=attn_scale,
                            init_std=None, use_bias=False, parameterization=parameterization)
    mha = MultiHeadAttention(cfg)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((64, 32, D_MODEL), np.float32))

    @jax.jit
    def q_and_k(key):
        variables = mha.init(key, x)
        _, state = mha.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        return state["intermediates"]["query"]["__call__"][0], state["intermediates"]["key"]["__call__"][0]

    q, k = q_and_k(jax.random.key(3, impl="rbg"))
    # q and k of different (independent) tokens: pair batch row b with row b+1
    qk = jnp.sum(q * jnp.roll(k, 1, axis=0), -1)  # [64, 32, heads], 8192 samples
    assert float(jnp.var(qk)) == pytest.approx(var_qk, rel=0.05)
    assert float(jnp.var(qk * logit_scale(attn_scale, HEAD_DIM))) == pytest.approx(var_logit, rel=0.05)


# -- the fused (jax.nn.dot_product_attention) path equals the einsum path ---------------------------------------

@pytest.mark.parametrize("implementation", ["auto", "xla"])  # 'auto' is the einsum path on CPU, fused on GPU
def test_fused_path_equals_einsum_path_and_numpy(implementation):
    q, k, v = _qkv(4)
    mask, bias = _mask_and_bias(5)
    for m, bb in ((mask, bias), (mask, None), (None, bias), (None, None), (mask[:1], bias[:1, :1])):
        fused, none = dot_product_attention(q, k, v, mask=m, bias=bb, scale=0.25, implementation=implementation)
        assert none is None
        ein, _ = dot_product_attention(q, k, v, mask=m, bias=bb, scale=0.25, implementation="einsum")
        assert fused.shape == (2, 10, 3, 16) and fused.dtype == jnp.float32
        chex_close(fused, ein, 1e-5)
        assert np.isfinite(np.asarray(fused)).all() and np.isfinite(np.asarray(ein)).all()
    ref, _ = np_attention(q, k, v, mask, bias, 0.25)
    ok = np.asarray(mask).any(-1)[:, 0]  # [B, Lq] rows with at least one key
    ein, _ = dot_product_attention(q, k, v, mask=mask, bias=bias, scale=0.25, implementation="einsum")
    np.testing.assert_allclose(np.asarray(ein)[ok], ref[ok], rtol=1e-5, atol=1e-5)
    # a fully masked row is finite: the uniform average of v (documented), in both paths
    np.testing.assert_allclose(ein[0, 3], np.asarray(v[0]).mean(0), rtol=1e-5, atol=1e-5)


def chex_close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


def test_return_probs_rows_sum_to_one_and_masked_entries_are_zero():
    q, k, v = _qkv(6)
    mask, bias = _mask_and_bias(7)
    out, probs = dot_product_attention(q, k, v, mask=mask, bias=bias, scale=0.25, return_probs=True)
    assert probs.shape == (2, 3, 10, 12) and probs.dtype == jnp.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    full = np.broadcast_to(np.asarray(mask), probs.shape)
    ok_rows = full.any(-1, keepdims=True)
    assert np.all(np.asarray(probs)[~full & ok_rows] == 0.0)  # exactly zero
    _, ref = np_attention(q, k, v, mask, bias, 0.25)
    np.testing.assert_allclose(np.asarray(probs)[np.broadcast_to(ok_rows, probs.shape)],
                               ref[np.broadcast_to(ok_rows, probs.shape)], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs[0, :, 3], 1.0 / 12, rtol=1e-6)  # fully masked row: uniform, finite


def test_bad_implementation_and_unsupported_fused_requests():
    q, k, v = _qkv(8)
    with pytest.raises(ValueError, match=r"implementation must be one of \('auto', 'einsum', 'xla', 'cudnn'\)"):
        dot_product_attention(q, k, v, scale=1.0, implementation="flash")
    with pytest.raises(ValueError, match="cannot return probabilities"):
        dot_product_attention(q, k, v, scale=1.0, return_probs=True, implementation="xla")
    with pytest.raises(ValueError, match="dropout_rng"):
        dot_product_attention(q, k, v, scale=1.0, dropout_rate=0.1)


# -- dropout -------------------------------------------------------------------------------------------------------

def test_attention_dropout_keeps_or_rescales_each_weight():
    b, lq, lk, h = 2, 6, 8, 2
    q, k, _ = _qkv(9, b, lq, lk, h, 8)
    v = jnp.broadcast_to(jnp.eye(lk)[None, :, None, :], (b, lk, h, lk))  # out[b, q, h, :] = weights[b, h, q, :]
    rate = 0.25
    out, probs = dot_product_attention(q, k, v, scale=0.3, dropout_rate=rate, dropout_rng=jax.random.key(10),
                                       return_probs=True)
    weights = np.asarray(jnp.transpose(out, (0, 2, 1, 3)))
    p = np.asarray(probs)
    kept = np.isclose(weights, p / (1 - rate), rtol=1e-5, atol=0)
    dropped = weights == 0
    assert np.all(kept | dropped)
    assert 0.15 < dropped.mean() < 0.35  # rate 0.25 of 192 weights
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)  # the returned probs are before dropout
    out2, _ = dot_product_attention(q, k, v, scale=0.3, dropout_rate=rate, dropout_rng=jax.random.key(11),
                                    return_probs=True)
    assert not np.allclose(out, out2)  # a different rng drops different weights
    # keeping with probability 1 - rate and scaling by 1/(1 - rate) makes the weights unbiased: E[w] = p


def test_module_dropout_needs_rng_and_changes_outputs():
    cfg = TransformerConfig(d_model=32, num_heads=2, head_dim=16, dropout_rate=0.3)
    mha = MultiHeadAttention(cfg)
    x = jnp.asarray(np.random.default_rng(13).standard_normal((2, 8, 32), np.float32))
    variables = jax.jit(mha.init)(jax.random.key(14), x)
    det, _ = jax.jit(mha.apply)(variables, x)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        mha.apply(variables, x, deterministic=False)
    train = jax.jit(lambda k: mha.apply(variables, x, deterministic=False, rngs={"dropout": k})[0])
    d1, d1b, d2 = train(jax.random.key(1)), train(jax.random.key(1)), train(jax.random.key(2))
    np.testing.assert_array_equal(d1, d1b)  # same rng, same output
    assert float(jnp.abs(d1 - det).max()) > 1e-3 and float(jnp.abs(d1 - d2).max()) > 1e-3


# -- RoPE ------------------------------------------------------------------------------------------------------------

def np_rope_complex(x, positions, base=10000.0):
    """Independent RoPE: pairs (x_{2i}, x_{2i+1}) as complex numbers times e^{i m theta_i}."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    z = x[..., 0::2] + 1j * x[..., 1::2]
    theta = base ** (-2.0 * np.arange(d // 2) / d)
    rot = np.exp(1j * np.asarray(positions, np.float64)[..., None] * theta)  # [B, L, D/2]
    z = z * rot[:, :, None, :]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def test_rope_equals_numpy_complex_implementation():
    x = jnp.asarray(np.random.default_rng(15).standard_normal((2, 20, 3, 16), np.float32))
    pos = np.stack([np.arange(20), np.arange(20) * 7 + 3])
    np.testing.assert_allclose(rope(x, pos), np_rope_complex(x, pos), atol=2e-4)  # fp32 angles up to 136 rad
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x), jnp.float64)
        y64 = rope(x64, jnp.asarray(pos), base=500.0)
        assert y64.dtype == jnp.float64
        np.testing.assert_allclose(y64, np_rope_complex(x64, pos, 500.0), atol=1e-12)
    # positions [L] broadcast over the batch
    np.testing.assert_allclose(rope(x, np.arange(20)), rope(x, np.stack([np.arange(20)] * 2)), atol=1e-6)
    with pytest.raises(ValueError, match="head_dim"):
        rope(jnp.ones((1, 2, 1, 5)), np.arange(2))


def test_rope_logits_depend_only_on_relative_position():
    q, k = np.random.default_rng(16).standard_normal((2, 16), np.float32)
    n = 64
    qs = rope(jnp.broadcast_to(q, (1, n, 1, 16)), np.arange(n))[0, :, 0]
    ks = rope(jnp.broadcast_to(k, (1, n, 1, 16)), np.arange(n))[0, :, 0]
    logits = np.asarray(qs @ ks.T, np.float64)  # [m, n]
    for offset in (-20, -1, 0, 5, 30):  # every diagonal m - n = offset is constant
        diag = np.diagonal(logits, offset=-offset)
        np.testing.assert_allclose(diag, diag[0], atol=2e-4)
    assert np.ptp(np.diagonal(logits, 0)) < 1e-4 and abs(logits[0, 0] - float(q @ k)) < 1e-4  # m = n: q.k
    assert np.ptp(logits[0]) > 0.5  # but it does depend on m - n


# -- T5 relative-position buckets ------------------------------------------------------------------------------------

def np_t5_bucket(rel, bidirectional, num_buckets, max_distance):
    """Per-element T5 bucket, written from the T5 paper's description (exact below half, log-spaced above)."""
    out = np.zeros_like(rel)
    for idx, r in np.ndenumerate(rel):
        nb, n, b = num_buckets, -int(r), 0
        if bidirectional:
            nb //= 2
            if n < 0:
                b = nb
            n = abs(n)
        else:
            n = max(n, 0)
        exact = nb // 2
        if n < exact:
            out[idx] = b + n
        else:
            large = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (nb - exact))
            out[idx] = b + min(large, nb - 1)
    return out


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64)])
def test_t5_bucket_matches_numpy(bidirectional, num_buckets, max_distance):
    rel = np.arange(-300, 301)
    got = np.asarray(relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                              num_buckets=num_buckets, max_distance=max_distance))
    expected = np_t5_bucket(rel, bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(got, expected)
    assert got.min() == 0 and got.max() == num_buckets - 1


def test_t5_bucket_hand_values():
    f = lambda r, bi: int(relative_position_bucket(jnp.asarray(r), bidirectional=bi, num_buckets=32,
                                                   max_distance=128))
    # bidirectional: key before query (r < 0) in [0, 16), after in [16, 32); exact below 8
    assert [f(0, True), f(-1, True), f(1, True), f(-7, True), f(-8, True), f(-127, True), f(-1000, True)] == \
        [0, 1, 17, 7, 8, 15, 15]
    # causal: future keys all in bucket 0; exact below 16; 20 -> 16 + int(ln(20/16)/ln(8) * 16) = 17
    assert [f(5, False), f(-15, False), f(-16, False), f(-20, False), f(-500, False)] == [0, 15, 16, 17, 31]


# -- fp64, bf16, the module against numpy ----------------------------------------------------------------------------

def test_float64_attention_is_exact():
    with jax.enable_x64(True):
        q, k, v = _qkv(18, dtype=jnp.float64)
        mask, bias = _mask_and_bias(19, fully_masked_row=False)
        bias = bias.astype(jnp.float64)
        out, probs = dot_product_attention(q, k, v, mask=mask, bias=bias, scale=0.25, return_probs=True)
        auto, _ = dot_product_attention(q, k, v, mask=mask, bias=bias, scale=0.25)  # 'auto' -> einsum in fp64
        assert out.dtype == jnp.float64 and probs.dtype == jnp.float64 and auto.dtype == jnp.float64
        ref, pref = np_attention(q, k, v, mask, bias, 0.25)
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(auto, ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(probs, pref, rtol=1e-12, atol=1e-14)
        with pytest.raises(ValueError, match="float64"):
            dot_product_attention(q, k, v, scale=1.0, implementation="xla")


def test_bfloat16_compute_has_float32_softmax():
    q, k, v = _qkv(20)
    mask, bias = _mask_and_bias(21)
    ref, ref_p = dot_product_attention(q, k, v, mask=mask, bias=bias, scale=0.25, return_probs=True)
    qb, kb, vb = (a.astype(jnp.bfloat16) for a in (q, k, v))
    out, probs = dot_product_attention(qb, kb, vb, mask=mask, bias=bias, scale=0.25, return_probs=True)
    assert out.dtype == jnp.bfloat16 and probs.dtype == jnp.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)  # normalized in fp32
    # bf16 tolerance: inputs rounded to 8 bits of mantissa (rel. 2^-9), logits |x| ~ 4 -> abs error ~ 0.03
    np.testing.assert_allclose(np.asarray(probs), np.asarray(ref_p), atol=0.03)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.06)
    fused, _ = dot_product_attention(qb, kb, vb, mask=mask, bias=bias, scale=0.25, implementation="xla")
    assert fused.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(out, np.float32), atol=0.03)


def _np_mha(x, p, cfg, mask, positions):
    """Numpy fp64 multi-head attention from the module's parameter tree (no RoPE)."""
    x = np.asarray(x, np.float64)
    proj = {}
    for name in ("query", "key", "value"):
        proj[name] = np.einsum("bld,dhk->blhk", x, np.asarray(p[name]["kernel"], np.float64))
        if "bias" in p[name]:
            proj[name] = proj[name] + np.asarray(p[name]["bias"])
    bias = None
    if cfg.position == "relative":
        rel = positions[:, None, :] - positions[:, :, None]
        buckets = np_t5_bucket(rel, cfg.mask != "causal", cfg.rel_buckets, cfg.rel_max_distance)
        bias = np.transpose(np.asarray(p["rel_bias"], np.float64)[buckets], (0, 3, 1, 2))
    out, probs = np_attention(proj["query"], proj["key"], proj["value"], mask, bias,
                              logit_scale(cfg.attn_scale, cfg.head_dim))
    y = np.einsum("blhk,hkd->bld", out, np.asarray(p["out"]["kernel"], np.float64))
    if "bias" in p["out"]:
        y = y + np.asarray(p["out"]["bias"])
    return y, probs


@pytest.mark.parametrize("cfg", [
    TransformerConfig(d_model=48, num_heads=3, head_dim=20, use_bias=True, attn_scale="sqrt", mask="causal"),
    TransformerConfig(d_model=48, num_heads=3, head_dim=20, use_bias=False, attn_scale="t5",
                      position="relative", mask="bidirectional", rel_buckets=8, rel_max_distance=16,
                      init_std=None)], ids=["bert-like", "t5-like"])
def test_module_matches_numpy_with_free_heads_times_head_dim(cfg):
    x = jnp.asarray(np.random.default_rng(22).standard_normal((2, 12, 48), np.float32))
    positions = np.broadcast_to(np.arange(12), (2, 12))
    mask = np.tril(np.ones((12, 12), bool))[None, None] if cfg.mask == "causal" else None
    mha = MultiHeadAttention(cfg)
    variables = mha.init(jax.random.key(23), x, mask=mask, positions=positions)
    p = variables["params"]
    assert p["query"]["kernel"].shape == (48, 3, 20) and p["out"]["kernel"].shape == (3, 20, 48)
    if cfg.use_bias:  # give the biases values so that they are tested
        p = jax.tree_util.tree_map_with_path(
            lambda path, a: a + 0.1 if "bias" in jax.tree_util.keystr(path) else a, p)
    y, probs = mha.apply({"params": p}, x, mask=mask, positions=positions, return_probs=True)
    y_fused, none = mha.apply({"params": p}, x, mask=mask, positions=positions)
    ref, ref_probs = _np_mha(x, p, cfg, mask, positions)
    assert y.shape == (2, 12, 48) and none is None
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y_fused, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-4, atol=1e-6)

