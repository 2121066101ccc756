"""Tests for kexue_jax.nn.linear_attention (kexue.fm/archives/8610): equal to the explicit quadratic kernel form."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kexue_jax.nn.linear_attention import linear_attention, resolve_feature_map


def _np_feature(x, name):
    return np.where(x > 0, x + 1.0, np.exp(x)) if name == "elu1" else np.exp(x)


def quadratic_kernel_attention(q, k, v, causal=False, mask=None, feature_map="elu1"):
    """Independent fp64 numpy reference: softmax replaced by the normalised kernel phi(q_i).phi(k_j), an n x n matrix."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    w = np.einsum("bihd,bjhd->bhij", _np_feature(q, feature_map), _np_feature(k, feature_map))
    n = q.shape[1]
    keep = np.ones((q.shape[0], 1, n, n), bool)
    if causal:
        keep = keep & np.tril(np.ones((n, n), bool))
    if mask is not None:
        keep = keep & np.asarray(mask, bool)[:, None, None, :]
    w = np.where(keep, w, 0.0)
    den = w.sum(-1, keepdims=True)
    a = np.divide(w, den, out=np.zeros_like(w), where=den > 0)
    return np.einsum("bhij,bjhe->bihe", a, v)


def _qkv(seed, b=2, n=37, h=3, dk=8, dv=5, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, n, h, e)), dtype) for e in (dk, dk, dv))


# One compile per shape/static configuration (eager dispatch of the scan is slow on CPU).
_la = jax.jit(linear_attention, static_argnames=("causal", "feature_map", "chunk_size"))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,chunk", [(37, 8), (32, 8), (5, 64), (41, 41)])
@pytest.mark.parametrize("feature_map", ["elu1", "exp"])
def test_equals_quadratic_form_fp32(causal, n, chunk, feature_map):
    q, k, v = _qkv((n * 7 + chunk), n=n)
    if feature_map == "exp":  # keep e^{q.k} well conditioned
        q, k = 0.3 * q, 0.3 * k
    out = _la(q, k, v, causal=causal, chunk_size=chunk, feature_map=feature_map)
    ref = quadratic_kernel_attention(q, k, v, causal=causal, feature_map=feature_map)
    chex.assert_shape(out, v.shape)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_equals_quadratic_form_fp64(causal):
    enable_x64 = getattr(jax, "enable_x64", None)
    if enable_x64 is None:
        pytest.skip("jax.enable_x64 context manager not available")
    with enable_x64(True):
        q, k, v = _qkv((1), n=53, dtype=jnp.float64)
        mask = np.ones((2, 53), bool)
        mask[0, 40:] = False
        mask[1, ::3] = False
        out = jax.jit(lambda q, k, v, m: linear_attention(q, k, v, causal=causal, key_mask=m, chunk_size=16))(
            q, k, v, jnp.asarray(mask))
        assert out.dtype == jnp.float64
        ref = quadratic_kernel_attention(q, k, v, causal=causal, mask=mask)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(causal):
    q, k, v = _qkv((2), n=29)
    mask = np.ones((2, 29), bool)
    mask[0, 20:] = False
    mask[1, 0] = False  # with causal, query 0 of batch 1 sees no key -> output 0
    out = np.asarray(_la(q, k, v, causal=causal, key_mask=jnp.asarray(mask), chunk_size=6))
    ref = quadratic_kernel_attention(q, k, v, causal=causal, mask=mask)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(out))
    if causal:
        np.testing.assert_array_equal(out[1, 0], 0.0)
    # Masked keys do not matter: changing them leaves the output unchanged.
    k2 = k.at[0, 20:].set(100.0)
    v2 = v.at[0, 20:].set(-7.0)
    out2 = np.asarray(_la(q, k2, v2, causal=causal, key_mask=jnp.asarray(mask), chunk_size=6))
    np.testing.assert_allclose(out2, out, rtol=1e-6, atol=1e-6)


def test_causal_prefix_property_and_chunk_independence():
    q, k, v = _qkv((3), n=50)
    full = _la(q, k, v, causal=True, chunk_size=7)
    prefix = _la(q[:, :23], k[:, :23], v[:, :23], causal=True, chunk_size=7)
    np.testing.assert_allclose(np.asarray(full[:, :23]), np.asarray(prefix), rtol=1e-5, atol=1e-6)
    for c in (1, 16, 1000):
        np.testing.assert_allclose(np.asarray(_la(q, k, v, causal=True, chunk_size=c)),
                                   np.asarray(full), rtol=1e-5, atol=1e-6)


def test_bf16_inputs_accumulate_in_fp32():
    q, k, v = _qkv((4), n=64)
    out = _la(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), causal=True, chunk_size=16)
    assert out.dtype == jnp.bfloat16
    ref = quadratic_kernel_attention(q.astype(jnp.bfloat16).astype(jnp.float32),
                                     k.astype(jnp.bfloat16).astype(jnp.float32),
                                     v.astype(jnp.bfloat16).astype(jnp.float32), causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2e-2, atol=2e-2)


def test_gradients_match_reference():
    q, k, v = _qkv((5), b=1, n=19, h=2, dk=4, dv=3)

    def ref_jnp(q, k, v):  # the explicit quadratic form in jnp, for autodiff
        w = jnp.einsum("bihd,bjhd->bhij", jax.nn.elu(q) + 1, jax.nn.elu(k) + 1)
        w = jnp.where(jnp.tril(jnp.ones((19, 19), bool)), w, 0.0)
        return jnp.einsum("bhij,bjhe->bihe", w / w.sum(-1, keepdims=True), v)

    loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))))
    g = jax.jit(jax.grad(loss(lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=4)),
                         argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(loss(ref_jnp), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_custom_feature_map_and_resolve():
    q, k, v = _qkv((6), n=11)
    out = jax.jit(lambda q, k, v: linear_attention(q, k, v, feature_map=lambda x: jax.nn.elu(x) + 1.0))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_la(q, k, v)), rtol=1e-6)
    assert resolve_feature_map("exp") is jnp.exp


@pytest.mark.parametrize("kwargs,word", [
    (dict(feature_map="softmax"), "feature_map"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(key_mask=jnp.ones((2, 5), bool)), "key_mask"),
])
def test_bad_arguments(kwargs, word):
    q, k, v = _qkv((7), n=9)
    with pytest.raises(ValueError, match=word):
        linear_attention(q, k, v, **kwargs)


def test_bad_shapes():
    q, k, v = _qkv((8), n=9)
    with pytest.raises(ValueError, match="q must have shape"):
        linear_attention(q[0], k, v)
    with pytest.raises(ValueError, match="q and k"):
        linear_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="v must have shape"):
        linear_attention(q, k, v[:, :5])
