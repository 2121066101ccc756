"""Multi-head attention, logit-scale conventions and rotary positions (kexue.fm/archives/8620, 8444).

Why scale the logits (8620): for q, k with iid zero-mean unit-variance entries, E[(q.k)^2] = d, so
logits span about +-3 sqrt(d) and the softmax saturates. The conventions (``attn_scale``):

* ``sqrt``  logits = q.k / sqrt(d)                 (BERT; NTK-style)
* ``t5``    logits = q.k, with the q and k init variances each divided by sqrt(d) so Var(q.k) = 1
* ``mup``   logits = q.k / d                       (muP)
* ``none``  logits = q.k with the standard init: Var(q.k) = d, the post's failing model (a control)

``num_heads x head_dim`` is free (not forced to d_model / num_heads). Projections are kept with an
explicit head axis: query/key/value kernels are [d_model, heads, head_dim] and the output kernel is
[heads, head_dim, d_model], which is the layout the upscaling maps (post 8444) act on.

RoPE rotates adjacent pairs (x_{2i}, x_{2i+1}) by the angle m * theta_i, theta_i = base^{-2i/d}.

The core ``dot_product_attention`` with ``implementation="auto"`` dispatches on GPU to
``jax.nn.dot_product_attention`` (cuDNN when the dtype and shapes allow) when no probabilities or
attention dropout are needed and the dtype is not float64 (its softmax is float32), and to an explicit
einsum otherwise (on CPU the einsum path is the faster one); "xla"/"cudnn" force the fused call. The two
paths agree (tests). Logits and
softmax are computed in float32 (float64 for float64 inputs) whatever the compute dtype.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kexue_jax.nn import init as initializers

Array = jax.Array

ATTN_SCALES = ("sqrt", "t5", "mup", "none")
IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")


def logit_scale(kind: str, head_dim: int) -> float:
    """The factor on q.k: 1/sqrt(d) (sqrt), 1 (t5, none), 1/d (mup)."""
    if kind == "sqrt":
        return 1.0 / math.sqrt(head_dim)
    if kind in ("t5", "none"):
        return 1.0
    if kind == "mup":
        return 1.0 / head_dim
    raise ValueError(f"attn_scale must be one of {ATTN_SCALES}, got {kind!r}")


def qk_init_variance_factor(kind: str, head_dim: int) -> float:
    """Extra factor on the q and k init variances: 1/sqrt(d) under the T5 convention, else 1."""
    return 1.0 / math.sqrt(head_dim) if kind == "t5" else 1.0


class Dense(nn.Module):
    """y = (x . W) * multiplier + b, contracting the last ``in_axes`` axes of x with W's first ones.

    ``multiplier`` is 1 in the standard parameterization and 1/sqrt(fan_in) (times any convention
    factor) in the NTK parameterization (kexue.fm/archives/8620), where W ~ N(0, 1).
    """

    features: tuple[int, ...]
    in_axes: int = 1
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    multiplier: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_shape = tuple(x.shape[-self.in_axes:])
        kernel = self.param("kernel", self.kernel_init, in_shape + tuple(self.features), self.param_dtype)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.in_axes)
        if self.multiplier != 1.0:
            y = y * jnp.asarray(self.multiplier, self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def rope(x: Array, positions: Array, base: float = 10000.0) -> Array:
    """Rotary position embedding on adjacent pairs: x [B, L, H, D] (D even), positions [B, L] or [L].

    (x_{2i}, x_{2i+1}) -> (x_{2i} cos m theta_i - x_{2i+1} sin m theta_i,
                           x_{2i} sin m theta_i + x_{2i+1} cos m theta_i),  theta_i = base^{-2i/D}.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    dt = jnp.promote_types(x.dtype, jnp.float32)
    theta = base ** (-jnp.arange(0, d, 2, dtype=dt) / d)  # [D/2]
    angle = jnp.asarray(positions, dt)[..., None] * theta  # [B, L, D/2] or [L, D/2]
    if angle.ndim == 2:
        angle = angle[None]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    xr = x.astype(dt).reshape(x.shape[:-1] + (d // 2, 2))
    x1, x2 = xr[..., 0], xr[..., 1]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's bucketing of relative positions (key - query): exact buckets for small distances,
    log-spaced up to ``max_distance``; half the buckets per direction when bidirectional."""
    ret = jnp.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_large = max_exact + (
        jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
    val_large = jnp.minimum(val_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_large)


def _softmax_dtype(dtype) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def dot_product_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None,
                          bias: Array | None = None, scale: float, dropout_rate: float = 0.0,
                          dropout_rng: Array | None = None, return_probs: bool = False,
                          implementation: str = "auto"):
    """softmax(q k^T * scale + bias, masked) v for q, k, v [B, L, H, D]; mask [B|1, 1|H, Lq, Lk] bool.

    Returns (out [B, Lq, H, D], probs [B, H, Lq, Lk] or None). Fully masked rows give a uniform
    distribution (finite large-negative fill, never NaN).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rng is required when dropout_rate > 0 (pass dropout_rate=0.0 to disable)")
    dropout = dropout_rate > 0.0
    fused_ok = not return_probs and not dropout and q.dtype != jnp.float64
    # 'auto' fuses on GPU only (cuDNN): on CPU the einsum path trains ~5% faster (benchmarks/train_throughput.py)
    auto_fused = implementation == "auto" and fused_ok and jax.default_backend() == "gpu"
    if implementation in ("xla", "cudnn") or auto_fused:
        if not fused_ok:
            raise ValueError("attention implementation 'xla'/'cudnn' cannot return probabilities, apply "
                             "attention dropout or run in float64; use 'einsum' or 'auto'")
        impl = None if implementation == "auto" else implementation
        if impl is None and jax.default_backend() == "gpu" and q.dtype not in (jnp.float16, jnp.bfloat16):
            impl = "xla"  # cuDNN needs half precision; stay on XLA for fp32
        if bias is not None:
            bias = bias.astype(q.dtype)
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl)
        return out, None
    sdt = _softmax_dtype(q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=sdt) * jnp.asarray(scale, sdt)
    if bias is not None:
        logits = logits + bias.astype(sdt)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(sdt).min)
    probs = jax.nn.softmax(logits, axis=-1)
    weights = probs
    if dropout:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        weights = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    return out, (probs if return_probs else None)


def write_kv_cache(module: nn.Module, k: Array, v: Array, index) -> tuple[Array, Array]:
    """KV cache: write this call's keys/values [B, n, H, D] into the module's ``cache`` collection
    (``cached_key``/``cached_value`` [B, N, H, D], made by ``transformer.init_cache``) at slots [index, index + n) and
    return the whole cache, so a decoding step costs O(N) instead of recomputing the prefix."""
    if not (module.has_variable("cache", "cached_key") and module.has_variable("cache", "cached_value")):
        raise ValueError("cache_index needs a KV cache: pass {'cache': transformer.init_cache(cfg, batch, length)} "
                         "and mutable=['cache'] to apply")
    ck, cv = module.variable("cache", "cached_key", None), module.variable("cache", "cached_value", None)
    ck.value = jax.lax.dynamic_update_slice_in_dim(ck.value, k.astype(ck.value.dtype), index, axis=1)
    cv.value = jax.lax.dynamic_update_slice_in_dim(cv.value, v.astype(cv.value.dtype), index, axis=1)
    return ck.value.astype(k.dtype), cv.value.astype(v.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention token mixer (see module docstring): projections, positions and KV cache here, the
    weighted sum ``cfg.mixer_spec.attend`` (``softmax_attend``, or ``linear_attend`` for token_mixer="linear").

    Call: (x [B, L, d_model], *, mask, positions [B, L], deterministic, return_probs) ->
    (y [B, L, d_model], probs [B, H, L, L] or None).
    """

    cfg: Any  # TransformerConfig

    @nn.compact
    def __call__(self, x, *, mask=None, positions=None, deterministic=True, return_probs=False,
                 cache_index=None):
        cfg = self.cfg
        h, d = cfg.num_heads, cfg.mixer_head_dim
        qk_extra = qk_init_variance_factor(cfg.attn_scale, d)

        def proj(name, features, in_axes, extra=1.0):
            return Dense(features, in_axes=in_axes, use_bias=cfg.use_bias,
                         kernel_init=cfg.kernel_init(in_axes, extra),
                         multiplier=cfg.kernel_multiplier(x.shape[-1] if in_axes == 1 else h * d, extra),
                         dtype=cfg.compute_dtype, param_dtype=cfg.param_jnp_dtype, name=name)

        q = proj("query", (h, d), 1, qk_extra)(x)
        k = proj("key", (h, d), 1, qk_extra)(x)
        v = proj("value", (h, d), 1, cfg.branch_init_gain ** 2)(x)  # DeepNorm beta (1 otherwise)
        if cfg.position == "rope":
            q, k = rope(q, positions, cfg.rope_base), rope(k, positions, cfg.rope_base)
        if cache_index is not None:  # incremental decoding: attend to every cached key (see write_kv_cache)
            k, v = write_kv_cache(self, k, v, cache_index)
        bias = None
        if cfg.position == "relative":
            rel = positions[:, None, :] - positions[:, :, None]  # key - query, [B, Lq, Lk]
            buckets = relative_position_bucket(
                rel, bidirectional=cfg.mask != "causal", num_buckets=cfg.rel_buckets,
                max_distance=cfg.rel_max_distance)
            table = self.param("rel_bias", cfg.embed_init(), (cfg.rel_buckets, h), cfg.param_jnp_dtype)
            bias = jnp.transpose(table[buckets], (0, 3, 1, 2))  # [B, H, Lq, Lk]
        # the weighted sum of the token mixer's registry entry (kexue_jax.nn.mixers.REGISTRY): softmax or linear
        out, probs = cfg.mixer_spec.attend(self, q, k, v, mask=mask, bias=bias, deterministic=deterministic,
                                           return_probs=return_probs)
        y = proj("out", (x.shape[-1],), 2, cfg.branch_init_gain ** 2)(out)
        return y, probs


def softmax_attend(module: nn.Module, q, k, v, *, mask, bias, deterministic: bool, return_probs: bool):
    """token_mixer="attention": softmax(q k^T scale + bias) v (``dot_product_attention``) with the model's logit
    scale, attention dropout (rate ``cfg.dropout_rate`` unless deterministic) and implementation."""
    cfg = module.cfg
    rate = 0.0 if deterministic else cfg.dropout_rate
    rng = module.make_rng("dropout") if rate > 0.0 else None
    return dot_product_attention(q, k, v, mask=mask, bias=bias, scale=logit_scale(cfg.attn_scale, q.shape[-1]),
                                 dropout_rate=rate, dropout_rng=rng, return_probs=return_probs,
                                 implementation=cfg.attention_impl)


def linear_attend(module: nn.Module, q, k, v, *, mask, bias, deterministic: bool, return_probs: bool):
    """token_mixer="linear" (kexue.fm/archives/8610): ``linear_attention`` under the mask's kind and key validity
    (``mask`` is the model's _MixerMask); no probabilities, no bias."""
    from kexue_jax.nn.linear_attention import linear_attention  # noqa: PLC0415 (optional mixer)

    return linear_attention(q, k, v, causal=mask.kind == "causal", key_mask=mask.valid), None
