"""Linear attention (kexue.fm/archives/8610; the kernel form of kexue.fm/archives/7546).

Softmax attention o_i = sum_j e^{q_i.k_j} v_j / sum_j e^{q_i.k_j} costs O(n^2 d) per head.  Replacing the
similarity e^{q.k} by a kernel phi(q).phi(k) with a positive feature map phi (elu(x) + 1 by default) lets the
sums be regrouped:

    o_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / phi(q_i)^T (sum_j phi(k_j)),          cost 2 n d_k d_v per head,

which post 8610 counts as 2nd^2 per head (against 2n^2 d for standard attention).

Causal version: the sums run over j <= i.  It is computed chunk by chunk: a `lax.scan` over chunks of
`chunk_size` positions carries the running state S = sum_j phi(k_j) v_j^T [d_k x d_v] and z = sum_j phi(k_j);
inside a chunk the (masked) c x c kernel matrix is used directly.  Memory is O(d_k d_v + c^2) per head; no
n x d_k x d_v tensor of per-position prefix sums is ever built.
"""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp

FeatureMap = Union[str, Callable[[jax.Array], jax.Array]]


def _elu1(x):
    return jax.nn.elu(x) + 1.0


_FEATURE_MAPS = {"elu1": _elu1, "exp": jnp.exp}


def resolve_feature_map(feature_map: FeatureMap) -> Callable[[jax.Array], jax.Array]:
    """The positive feature map phi of the kernel phi(q).phi(k): "elu1" = elu(x) + 1 (post 7546), "exp", or a callable."""
    if callable(feature_map):
        return feature_map
    if feature_map not in _FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(_FEATURE_MAPS)} or a callable, got {feature_map!r}")
    return _FEATURE_MAPS[feature_map]


def _safe_divide(num, den):
    """num / den[..., None], with 0 where den == 0 (a query that sees no key: fully padded / masked)."""
    ok = den > 0
    return jnp.where(ok[..., None], num / jnp.where(ok, den, 1.0)[..., None], 0.0)


def _check_inputs(q, k, v, key_mask, chunk_size):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape [batch, len, heads, head_dim], got shape {x.shape}")
    if q.shape[:3] != k.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same shape [batch, len, heads, head_dim], got {q.shape} and {k.shape}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape [batch, len, heads, v_dim] matching k's {k.shape[:3]}, got {v.shape}")
    if key_mask is not None and tuple(jnp.shape(key_mask)) != tuple(q.shape[:2]):
        raise ValueError(f"key_mask must have shape [batch, len] = {q.shape[:2]}, got {tuple(jnp.shape(key_mask))}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


DEFAULT_CHUNK_SIZE = 64


def linear_attention(q, k, v, *, causal: bool = False, key_mask=None, feature_map: FeatureMap = "elu1",
                     chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Kernelised (linear) attention phi(Q)(phi(K)^T V) / phi(Q) sum_j phi(K_j) (kexue.fm/archives/8610).

    Args:
      q, k: [batch, len, heads, d_k]; v: [batch, len, heads, d_v] (the layout of jax.nn.dot_product_attention).
      causal: if True, position i attends to j <= i (chunked prefix sums, see module docstring).
      key_mask: optional key padding mask [batch, len], bool, True = keep.  Masked keys get phi(k) = 0.
      feature_map: "elu1" (elu(x) + 1, default), "exp", or a callable applied elementwise to q and k; it must be
        positive for the normaliser to be.
      chunk_size: chunk length of the causal scan (ignored when causal=False); any length is allowed, the
        sequence is zero-padded to a multiple of it internally.

    Returns [batch, len, heads, d_v] in q's dtype (accumulation in at least float32).  A query that sees no
    unmasked key returns 0.  No 1/sqrt(d) scale is applied: scale q beforehand if wanted.
    """
    _check_inputs(q, k, v, key_mask, chunk_size)
    phi = resolve_feature_map(feature_map)
    out_dtype = q.dtype
    dt = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
    fq = phi(q.astype(dt))
    fk = phi(k.astype(dt))
    v = v.astype(dt)
    if key_mask is not None:
        fk = fk * jnp.asarray(key_mask).astype(dt)[:, :, None, None]
    if not causal:
        kv = jnp.einsum("blhd,blhe->bhde", fk, v)
        z = jnp.sum(fk, axis=1)  # [b, h, d]
        num = jnp.einsum("blhd,bhde->blhe", fq, kv)
        den = jnp.einsum("blhd,bhd->blh", fq, z)
        return _safe_divide(num, den).astype(out_dtype)
    return _causal_linear_attention(fq, fk, v, min(chunk_size, q.shape[1])).astype(out_dtype)


def _causal_linear_attention(fq, fk, v, chunk_size):
    """Causal phi-attention by a scan over chunks carrying S = sum phi(k) v^T and z = sum phi(k)."""
    b, n, h, dk = fq.shape
    dv = v.shape[-1]
    c = chunk_size
    num_chunks = -(-n // c)
    pad = num_chunks * c - n
    if pad:  # padded keys have phi(k) = 0 (no contribution); padded queries are dropped at the end
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        fq, fk, v = jnp.pad(fq, widths), jnp.pad(fk, widths), jnp.pad(v, widths)

    def chunks(x):  # [b, n, h, e] -> [num_chunks, b, c, h, e]
        return jnp.moveaxis(x.reshape(b, num_chunks, c, h, x.shape[-1]), 1, 0)

    tril = jnp.tril(jnp.ones((c, c), dtype=bool))

    def step(carry, xs):
        s, z = carry  # [b, h, dk, dv], [b, h, dk]
        cq, ck, cv = xs
        a = jnp.einsum("bihd,bjhd->bhij", cq, ck)
        a = jnp.where(tril, a, 0.0)
        num = jnp.einsum("bhij,bjhe->bihe", a, cv) + jnp.einsum("bihd,bhde->bihe", cq, s)
        den = jnp.sum(a, axis=-1).transpose(0, 2, 1) + jnp.einsum("bihd,bhd->bih", cq, z)
        s = s + jnp.einsum("bjhd,bjhe->bhde", ck, cv)
        z = z + jnp.sum(ck, axis=1)
        return (s, z), _safe_divide(num, den)

    init = (jnp.zeros((b, h, dk, dv), fq.dtype), jnp.zeros((b, h, dk), fq.dtype))
    _, out = jax.lax.scan(step, init, (chunks(fq), chunks(fk), chunks(v)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, num_chunks * c, h, dv)
    return out[:, :n]
