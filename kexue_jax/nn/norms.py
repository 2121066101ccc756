"""Normalization and residual wiring (kexue.fm/archives/8620, 8998).

LayerNorm  y = (x - mu) / sqrt(sigma^2 + eps) * gamma + beta     (over the feature axis)
RMSNorm    y = x / sqrt(mean(x^2) + eps) * gamma                  (no centring, no beta; T5)

Residual wirings of a block with branch F (``residual`` in TransformerConfig):

* ``post``        x_{t+1} = Norm(x_t + F(x_t))            (original Transformer, BERT). At init it acts
                  like (x_t + F(x_t))/sqrt(2), so x_0 carries weight 2^{-l/2} after l blocks.
* ``pre``         x_{t+1} = x_t + F(Norm(x_t)), final Norm before the head. Var(x_l) ~ l + 1 at init.
* ``alpha``       x_{t+1} = x_t + alpha_t F(x_t), alpha_t = min(1, step/T) not trained (the post's
                  preference; SkipInit/ReZero with a fixed ramp). alpha = 0 makes every block the identity.
* ``alpha_post``  x_{t+1} = Norm(x_t + alpha_t F(x_t))    (RoFormerV2, kexue.fm/archives/8998).
* ``rezero``      x_{t+1} = x_t + a F(x_t), a a *trainable* scalar per block initialised to 0 (ReZero,
                  Bachlechner et al. 2020; SkipInit, De & Smith 2020): the form the post contrasts with its
                  fixed ramp (the post: alpha should not be trained like the other weights). No sub-layer norms.
* ``deepnorm``    x_{t+1} = Norm(a x_t + F(x_t)) with the constant a = (2N)^{1/4} for an N-layer encoder-only
                  or decoder-only stack, and the value, output and FFN kernels initialised with gain
                  b = (8N)^{-1/4} (query and key keep gain 1) (DeepNet, Wang et al. 2022, arXiv:2203.00555).

The ramp's alpha is an input of ``Transformer.__call__`` computed from the step by ``alpha_schedule``
(its length T is ``config.train.alpha_warmup_steps``), so it is never a parameter and the model stays a
pure function of (params, inputs). ReZero's a is a parameter (``layer_i/rezero_alpha``); DeepNorm's a is
the constant ``deepnorm_alpha(N)``.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

RESIDUALS = ("post", "pre", "alpha", "alpha_post", "rezero", "deepnorm")
#: wirings without sub-layer norms (a final norm before the head is still on by default)
NORM_FREE_RESIDUALS = ("alpha", "rezero")
NORMS = ("layernorm", "rmsnorm")


def l2_normalize(x, eps: float = 1e-12):
    """x / max(||x||_2, eps) over the last axis (torch.nn.functional.normalize)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class LayerNorm(nn.Module):
    """LayerNorm with eps; statistics in float32 (or float64) whatever the compute dtype.

    The variance is computed in one pass as E[z^2] - E[z]^2 on z = x - x_0 (x_0 the first feature, a
    stop-gradient shift: the variance does not depend on it, and it keeps the difference from cancelling
    when |mean| >> std). Computing z^2 before the means lets XLA CPU fuse the two reductions and keep the
    backward pass linear in depth: the two-pass E[(x - mu)^2] form made a 4-layer GPT's training step
    1.4x slower than flax's LayerNorm (benchmarks/train_throughput.py).
    """

    eps: float = 1e-5
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype).astype(stat_dtype)
        z = x.astype(stat_dtype)
        z = z - jax.lax.stop_gradient(z[..., :1])
        z2 = jax.lax.square(z)  # before the means (see the docstring)
        m1 = jnp.mean(z, axis=-1, keepdims=True)
        var = jnp.maximum(jnp.mean(z2, axis=-1, keepdims=True) - jax.lax.square(m1), 0.0)
        y = (z - m1) * (jax.lax.rsqrt(var + self.eps) * scale)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (d,), self.param_dtype).astype(stat_dtype)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm y = x / sqrt(mean(x^2) + eps) * gamma (Zhang & Sennrich 2019; T5)."""

    eps: float = 1e-6
    use_bias: bool = False  # accepted for a uniform signature; RMSNorm has no beta
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        xs = x.astype(stat_dtype)
        ms = jnp.mean(jnp.square(xs), axis=-1, keepdims=True)
        y = xs * jax.lax.rsqrt(ms + self.eps)
        y = y * self.param("scale", nn.initializers.ones, (d,), self.param_dtype).astype(stat_dtype)
        return y.astype(self.dtype)


def make_norm(kind: str, eps: float, use_bias: bool, dtype, param_dtype, name: str) -> nn.Module:
    """The norm module named ``kind`` (layernorm or rmsnorm)."""
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
    cls = LayerNorm if kind == "layernorm" else RMSNorm
    return cls(eps=eps, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def residual(kind: str, x, branch: Callable, norm: Callable | None, alpha=1.0):
    """Apply one residual sub-layer ``branch`` to ``x`` with the wiring ``kind`` (see module doc).

    ``norm`` is the sub-layer's norm (unused by ``alpha`` and ``rezero``); ``alpha`` scales the branch
    for ``alpha``/``alpha_post`` (the ramp value) and ``rezero`` (the trainable scalar), and the skip
    path for ``deepnorm`` (the constant (2N)^{1/4}). Returns (new_x, branch_aux) where branch returns
    (out, aux).
    """
    if kind == "post":
        out, aux = branch(x)
        return norm(x + out), aux
    if kind == "pre":
        out, aux = branch(norm(x))
        return x + out, aux
    if kind == "alpha":
        out, aux = branch(x)
        return x + jnp.asarray(alpha, out.dtype) * out, aux
    if kind == "alpha_post":
        out, aux = branch(x)
        return norm(x + jnp.asarray(alpha, out.dtype) * out), aux
    if kind == "rezero":
        out, aux = branch(x)
        return x + jnp.asarray(alpha, out.dtype) * out, aux
    if kind == "deepnorm":
        out, aux = branch(x)
        return norm(jnp.asarray(alpha, out.dtype) * x + out), aux
    raise ValueError(f"residual must be one of {RESIDUALS}, got {kind!r}")


def alpha_schedule(step, warmup_steps: int):
    """alpha_t = min(1, step / T) (kexue.fm/archives/8620): ramp from 0 to 1 in T steps, then frozen.

    ``warmup_steps`` T = 0 gives alpha = 1 from the first step. Works on ints and traced arrays.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / float(warmup_steps))


def deepnorm_alpha(num_layers: int) -> float:
    """DeepNorm's skip multiplier a = (2N)^{1/4} for an N-layer encoder-only or decoder-only stack
    (DeepNet, Wang et al. 2022, arXiv:2203.00555: the constants for encoder-only and decoder-only models;
    encoder-decoder models use other ones). N = 6: 1.8612; N = 48: 3.1302."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    return (2.0 * num_layers) ** 0.25


def deepnorm_beta(num_layers: int) -> float:
    """DeepNorm's init gain b = (8N)^{-1/4} on the value, output and FFN kernels (query and key keep
    gain 1) for an N-layer encoder-only or decoder-only stack (DeepNet, arXiv:2203.00555; microsoft/torchscale
    divides v_proj, out_proj, fc1 and fc2 by (8N)^{1/4}). N = 6: 0.3799; N = 48: 0.2259."""
    deepnorm_alpha(num_layers)  # validates num_layers
    return (8.0 * num_layers) ** -0.25
