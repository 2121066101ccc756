"""Token mixers beyond attention (kexue.fm/archives/8431), as pure functions plus one Flax module.

The post's frame: attention is O = A V with A = softmax(B), B = Q K^T in R^{n x n}. Most of the May-2021
"non-Transformer" models change only how A is made:

* ``synthesizer_random``  A = softmax(R), R in R^{h x n x n} a parameter (trained, or frozen after random
                          init: ``synthesizer_frozen``); O = A (X W_v) W_o            (Tay et al., 2005.00743)
* ``synthesizer_dense``   row i of B is W_2 relu(W_1 x_i + b_1) + b_2 in R^{h x n}; A = softmax(B)
* ``mixer``               MLP-Mixer's token-mixing MLP, per channel: Y = W_2 act(W_1 X + b_1) + b_2,
                          W_1 in R^{S x n}, W_2 in R^{n x S}; with one linear layer it is A = B without softmax
* ``resmlp``              Y = Aff_out(A Aff_in(X) + b), one n x n layer A, Aff(x) = alpha * x + beta in place of
                          the norm (the block's mixer norm is the identity)                   (2105.03404)
* ``gmlp``                Z = act(X U); Y = (Z_1 * (W LN(Z_2) + b)) V, W = 0 and b = 1 at init, so the
                          sub-layer starts as the plain FFN act(X U_1) V; act = cfg.activation (2105.08050)
* ``amlp``                gMLP whose gate adds a tiny single-head attention of X (size ``tiny_attention_dim``)
* ``fnet``                Y = Re(FFT_seq(FFT_hidden(X))), no parameters; as attention: A = exp(-i B) with
                          B = r r^T, r = (0..n-1) sqrt(2 pi / n), i.e. the DFT matrix     (2105.03824)
* ``external``            A = X M_k (n x S memory slots), softmax over the token axis, then L1 over the S
                          slots; Y = A M_v                                                     (2105.02358)
* ``conv``                lightweight (softmax-normalised kernels shared by the channels of a head) or dynamic
                          (kernels predicted from x_i) convolution over tokens, after a GLU input projection
                          (Wu et al. 2019; the pre-trained-CNN paper 2105.03322 uses them)

One mechanism with parameters where models share one: ``token_matrix_mix`` (a learned [.., n_out, n] matrix
applied along the token axis, optional softmax, optional causal triangle, padding by zeroed columns) is
Synthesizer's A V, each of the Mixer's token layers, ResMLP's linear layer and gMLP's spatial unit.

Length. Models with n x n parameters size them by ``max_len``: a shorter input uses the leading
[L, L] block (the same rule as learned position embeddings, and for causal use the exact prefix model), a
longer one raises a ValueError naming ``max_len``. FNet, External Attention and the convolution run at
any length.

Masks. Each mixer runs bidirectionally; all but ``fnet`` and ``external`` also causally (lower-triangular
matrices, causal padding, causal tiny attention); those two raise under a causal mask. A key-padding mask
(``valid``) zeroes the padded columns of every token matrix (softmax excludes them), the padded inputs of
the convolution and of the token-axis softmax of External Attention; FNet raises (a DFT has no masked form).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kexue_jax.nn import init as initializers
from kexue_jax.nn.activations import ACTIVATIONS
from kexue_jax.nn.attention import Dense, dot_product_attention, rope
from kexue_jax.nn.norms import make_norm

Array = jax.Array

MIXERS = ("synthesizer_random", "synthesizer_dense", "mixer", "resmlp", "gmlp", "amlp", "fnet", "external",
          "conv")
#: mixers that cannot be made causal (they raise under mask="causal")
BIDIRECTIONAL_ONLY = ("fnet", "external")
#: mixers with parameters of size max_len along the token axis
LENGTH_BOUND = ("synthesizer_random", "synthesizer_dense", "mixer", "resmlp", "gmlp", "amlp")
CONV_KINDS = ("lightweight", "dynamic")
EXTERNAL_NORMALIZATIONS = ("token", "slots")
_EXTERNAL_EPS = 1e-9  # the L1 normaliser's eps of the External Attention code


def _fill(dtype) -> Any:
    return jnp.finfo(dtype).min


def token_matrix_mix(x: Array, w: Array, *, bias: Array | None = None, softmax: bool = False,
                     causal: bool = False, valid: Array | None = None) -> Array:
    """Mix along the token axis with a matrix: y_i = sum_j A_ij x_j (+ bias_i), A = w or softmax_j(w).

    Shapes: x [B, L, C] with w [Lo, L] (one matrix, e.g. Mixer/ResMLP/gMLP; ``bias`` [Lo] broadcast over
    channels), or x [B, L, H, C] with w [H, Lo, L] (per head, Synthesizer-Random) or [B, H, Lo, L] (per
    sample, Synthesizer-Dense). ``causal``: A_ij = 0 for j > i (logits -> -inf before the softmax; needs
    Lo = L). ``valid`` [B, L] bool: padded keys j get A_ij = 0 (excluded from the softmax). A fully masked
    softmax row is uniform (finite fill), as in attention. Softmax in float32 (float64 for float64).
    """
    lo, length = w.shape[-2], w.shape[-1]
    if x.shape[1] != length:
        raise ValueError(f"token_matrix_mix: w mixes {length} tokens, x has length {x.shape[1]}")
    if causal and lo != length:
        raise ValueError(f"token_matrix_mix: causal mixing needs a square matrix, got [{lo}, {length}]")
    if not softmax:
        a = w if not causal else w * jnp.tril(jnp.ones((lo, length), w.dtype))
        if valid is not None:
            x = x * valid.reshape(valid.shape + (1,) * (x.ndim - 2)).astype(x.dtype)
    else:
        sdt = jnp.promote_types(w.dtype, jnp.float32)
        logits = w.astype(sdt)
        keep = None
        if causal:
            keep = jnp.tril(jnp.ones((lo, length), bool))
        if valid is not None:  # [B, 1(H), 1(Lo), L]
            vk = valid[:, None, None, :] if w.ndim >= 3 else valid[:, None, :]
            keep = vk if keep is None else keep & vk
        if keep is not None:
            logits = jnp.where(keep, logits, _fill(sdt))
        a = jax.nn.softmax(logits, axis=-1)
    a = a.astype(x.dtype)
    if x.ndim == 3:  # one matrix [Lo, L], or per sample [B, Lo, L] after a padding mask
        y = jnp.einsum("ij,bjc->bic" if a.ndim == 2 else "bij,bjc->bic", a, x)
    else:  # per head [H, Lo, L], or per sample [B, H, Lo, L]
        y = jnp.einsum("hij,bjhc->bihc" if a.ndim == 3 else "bhij,bjhc->bihc", a, x)
    if bias is not None:
        y = y + bias.astype(y.dtype).reshape((lo,) + (1,) * (y.ndim - 2))
    return y


def token_mlp(x: Array, w1: Array, b1: Array, w2: Array, b2: Array, *, activation=None, causal: bool = False,
              valid: Array | None = None) -> Array:
    """MLP-Mixer's token-mixing MLP on x [B, L, C], per channel: W_2 act(W_1 x + b_1) + b_2 (2105.01601).

    w1 [S, L], w2 [L, S]; ``activation`` defaults to exact GELU. Causal: both layers lower-triangular
    (hidden unit j reads tokens <= j, output i reads hidden units <= i), which needs S = L. With one
    linear layer (identity activation, w2 = I, no biases) it is Synthesizer-Random without softmax.
    """
    act = (lambda z: jax.nn.gelu(z, approximate=False)) if activation is None else activation
    h = act(token_matrix_mix(x, w1, bias=b1, causal=causal, valid=valid))
    return token_matrix_mix(h, w2, bias=b2, causal=causal)


def affine(x: Array, alpha: Array, beta: Array) -> Array:
    """ResMLP's Aff(x) = alpha * x + beta (per channel), used in place of LayerNorm (2105.03404)."""
    return x * alpha.astype(x.dtype) + beta.astype(x.dtype)


def spatial_gating(z1: Array, z2: Array, w: Array, b: Array, *, extra: Array | None = None, causal: bool = False,
                   valid: Array | None = None) -> Array:
    """gMLP's spatial gating unit: z1 * (W z2 + b [+ extra]) with W [L, L] along tokens (2105.08050).

    ``z2`` is already normalised; ``extra`` is aMLP's tiny-attention output added to the gate. With W = 0 and
    b = 1 (the init) the gate is 1 and the unit returns z1.
    """
    gate = token_matrix_mix(z2, w, bias=b, causal=causal, valid=valid)
    if extra is not None:
        gate = gate + extra
    return z1 * gate


def fnet_mix(x: Array, *, copies: int = 1) -> Array:
    """FNet: Re(FFT_seq(FFT_hidden(x))) for x [B, L, D] (2105.03824); any L, no parameters.

    ``copies`` c > 1 (set by ``kexue_jax.upscale.widen``): the hidden axis holds c interleaved copies of a
    D/c-wide state; the hidden DFT of length D/c acts on their sum and its output is repeated c times / c.
    This keeps a widened FNet the same function (the kD-point DFT of a repeated vector is not a repetition).
    """
    if x.shape[-1] % copies:
        raise ValueError(f"fnet_mix: d_model={x.shape[-1]} is not divisible by copies={copies}")
    cdt = jnp.promote_types(x.dtype, jnp.float32)
    z = x.astype(cdt)
    if copies > 1:
        z = z.reshape(z.shape[:-1] + (z.shape[-1] // copies, copies)).sum(-1)
    y = jnp.real(jnp.fft.fft(jnp.fft.fft(z, axis=-1), axis=-2))
    if copies > 1:
        y = jnp.repeat(y, copies, axis=-1) / copies
    return y.astype(x.dtype)


def fnet_attention_matrix(n: int) -> np.ndarray:
    """The post's reading of FNet as attention: A = exp(-i B), B = r r^T, r = (0, .., n-1) sqrt(2 pi / n).

    Equals the DFT matrix exp(-2 pi i jk / n) (complex128 numpy). The post's own Q = K = (0..n-1) without
    the sqrt(2 pi / n) and the sign is its "crude" version.
    """
    r = np.arange(n, dtype=np.float64) * math.sqrt(2 * math.pi / n)
    return np.exp(-1j * np.outer(r, r))


def external_attention(x: Array, m_k: Array, m_v: Array, *, normalize: str = "token",
                       valid: Array | None = None) -> Array:
    """External Attention (2105.02358): A = x M_k [B, L, S]; Y = A' M_v with M_k [D, S], M_v [S, D].

    normalize="token" (the paper's code): softmax over the token axis L, then L1 over the S slots
    (A' = A / (1e-9 + sum_S A)): tokens are coupled through the token-axis softmax. normalize="slots":
    softmax over S only, each token's output depends on that token alone. ``valid``: padded tokens are
    excluded from the token-axis softmax.
    """
    if normalize not in EXTERNAL_NORMALIZATIONS:
        raise ValueError(f"external_attention normalize must be one of {EXTERNAL_NORMALIZATIONS}, got {normalize!r}")
    sdt = jnp.promote_types(x.dtype, jnp.float32)
    logits = jnp.einsum("bld,ds->bls", x, m_k.astype(x.dtype)).astype(sdt)
    if normalize == "slots":
        a = jax.nn.softmax(logits, axis=-1)
    else:
        if valid is not None:
            logits = jnp.where(valid[:, :, None], logits, _fill(sdt))
        a = jax.nn.softmax(logits, axis=1)
        a = a / (_EXTERNAL_EPS + jnp.sum(a, axis=-1, keepdims=True))
    return jnp.einsum("bls,sd->bld", a.astype(x.dtype), m_v.astype(x.dtype))


def conv_mix(x: Array, kernel: Array, *, causal: bool) -> Array:
    """Depthwise convolution over tokens with kernels shared by the channels of each head.

    x [B, L, H, C]; kernel [H, K] (lightweight: one kernel per head) or [B, L, H, K] (dynamic: one per
    position). y_i = sum_t kernel[t] x_{i + t - o}, o = K - 1 (causal: taps i-K+1..i) or K // 2 (centred,
    K odd); zero padding. Any length.
    """
    k = kernel.shape[-1]
    if not causal and k % 2 == 0:
        raise ValueError(f"conv_mix: a bidirectional (centred) kernel needs an odd size, got {k}")
    left = k - 1 if causal else k // 2
    pad = [(0, 0), (left, k - 1 - left)] + [(0, 0)] * (x.ndim - 2)
    xp = jnp.pad(x, pad)
    length = x.shape[1]
    windows = jnp.stack([xp[:, t:t + length] for t in range(k)], axis=2)  # [B, L, K, H, C]
    kernel = kernel.astype(x.dtype)
    if kernel.ndim == 2:
        return jnp.einsum("blkhc,hk->blhc", windows, kernel)
    return jnp.einsum("blkhc,blhk->blhc", windows, kernel)


# ------------------------------------------------------------------------------------------------
# The Flax module: one sub-layer per mixer, same call signature as MultiHeadAttention.

def check_length(cfg, length: int) -> None:
    """Raise if a mixer with n x n parameters (sized by max_len) gets a longer input."""
    if cfg.token_mixer in LENGTH_BOUND and length > cfg.max_len:
        raise ValueError(f"token_mixer={cfg.token_mixer!r} has {cfg.max_len} x {cfg.max_len} token-mixing "
                         f"parameters (TransformerConfig.max_len={cfg.max_len}); got length {length}. Shorter "
                         f"inputs use the leading block; longer ones need a larger max_len (or pad/crop the "
                         f"input). fnet, external and conv run at any length.")


def token_mlp_dim(cfg) -> int:
    """MLP-Mixer's token hidden size S (``token_mlp_dim``, default max_len)."""
    return cfg.max_len if cfg.token_mlp_dim is None else cfg.token_mlp_dim


def _activation(cfg):
    """The model's activation (``cfg.activation``; GELU in MLP-Mixer and gMLP)."""
    return ACTIVATIONS[cfg.activation]


def _matrix_init(cfg, fan_in: int):
    """Init of a token-mixing matrix: the model's ``init_std`` (truncated normal) like every kernel, or LeCun
    N(0, 1/fan_in) when init_std is None or under NTK (token matrices carry no forward multiplier). With
    LeCun at init_std = 0.02 embeddings the Mixer's token MLP adds O(1) random mixing to a residual stream of
    std 0.02, and it stayed at the unigram loss in the study."""
    if cfg.init_std is not None and cfg.parameterization != "ntk":  # fixed-size (n x n): muP leaves it alone
        return initializers.truncated_normal(cfg.init_std)
    return nn.initializers.normal(1.0 / math.sqrt(fan_in))


class TokenMixer(nn.Module):
    """The token-mixing sub-layer ``cfg.token_mixer`` (one of MIXERS; see the module docstring).

    Call: (x [B, L, d_model], *, mask (the model's _MixerMask: kind and key validity), positions,
    deterministic, return_probs, cache_index) -> (y [B, L, d_model], probs [B, H, L, L] for the synthesizers
    when asked, else None).
    """

    cfg: Any  # TransformerConfig

    @nn.compact
    def __call__(self, x, *, mask=None, positions=None, deterministic=True, return_probs=False, cache_index=None):
        cfg = self.cfg
        kind = cfg.token_mixer
        if cache_index is not None:
            raise ValueError(f"cache_index (KV-cache decoding) is not supported by token_mixer={kind!r}")
        causal = getattr(mask, "kind", "bidirectional") == "causal"
        valid = getattr(mask, "valid", None)
        length, d = x.shape[1], x.shape[-1]
        check_length(cfg, length)
        if kind in BIDIRECTIONAL_ONLY and causal:
            raise ValueError(f"token_mixer={kind!r} has no causal form; use mask='bidirectional'")
        dt, pdt, n = cfg.compute_dtype, cfg.param_jnp_dtype, cfg.max_len

        def dense(name, features, in_axes=1, fan_in=None, use_bias=None, kernel_init=None):
            fan = fan_in if fan_in is not None else int(np.prod(x.shape[-1:]))
            return Dense(tuple(features), in_axes=in_axes, use_bias=cfg.use_bias if use_bias is None else use_bias,
                         kernel_init=kernel_init or cfg.kernel_init(in_axes), multiplier=cfg.kernel_multiplier(fan),
                         dtype=dt, param_dtype=pdt, name=name)

        def matrix(name, shape, init):
            return self.param(name, init, shape, pdt)

        probs = None
        if kind in ("synthesizer_random", "synthesizer_dense"):
            h, hd = cfg.num_heads, cfg.head_dim
            v = dense("value", (h, hd))(x)
            if kind == "synthesizer_random":
                logits = matrix("logits", (h, n, n), nn.initializers.normal(0.02))[:, :length, :length]
                if cfg.synthesizer_frozen:
                    logits = jax.lax.stop_gradient(logits)
            else:
                hidden = jax.nn.relu(dense("dense_hidden", (d,))(x))
                logits = dense("dense_logits", (h, n), fan_in=d)(hidden)[..., :length]  # [B, L, H, L]
                logits = jnp.transpose(logits, (0, 2, 1, 3))
            out = token_matrix_mix(v, logits, softmax=True, causal=causal, valid=valid)
            if return_probs:
                probs = _synth_probs(logits, causal, valid, x.shape[0])
            y = dense("out", (d,), in_axes=2, fan_in=h * hd)(out)
        elif kind == "mixer":
            s = token_mlp_dim(cfg)
            w1 = matrix("token_in", (s, n), _matrix_init(cfg, n))
            w2 = matrix("token_out", (n, s), _matrix_init(cfg, s))
            b1 = matrix("token_in_bias", (s,), nn.initializers.zeros)
            b2 = matrix("token_out_bias", (n,), nn.initializers.zeros)
            if s == n:
                w1, b1 = w1[:length, :length], b1[:length]
                w2 = w2[:length, :length]
            else:
                w1, w2 = w1[:, :length], w2[:length]
            y = token_mlp(x, w1.astype(dt), b1, w2.astype(dt), b2[:length], activation=_activation(cfg),
                          causal=causal, valid=valid)
        elif kind == "resmlp":
            aff = {name: (matrix(f"{name}_alpha", (d,), nn.initializers.constant(a0)),
                          matrix(f"{name}_beta", (d,), nn.initializers.zeros))
                   for name, a0 in (("aff_in", 1.0), ("aff_out", 0.1))}
            w = matrix("token", (n, n), _matrix_init(cfg, n))[:length, :length]
            b = matrix("token_bias", (n,), nn.initializers.zeros)[:length]
            z = token_matrix_mix(affine(x, *aff["aff_in"]), w.astype(dt), bias=b, causal=causal, valid=valid)
            y = affine(z, *aff["aff_out"])
        elif kind in ("gmlp", "amlp"):
            f = cfg.d_ff
            z = _activation(cfg)(dense("proj_in", (2 * f,))(x))
            z1, z2 = z[..., :f], z[..., f:]
            eps = cfg.norm_eps if cfg.mixer_norm_eps is None else cfg.mixer_norm_eps
            z2 = make_norm(cfg.norm, eps, cfg.use_bias, dt, pdt, "sgu_norm")(z2)
            w = matrix("spatial", (n, n), nn.initializers.zeros)[:length, :length]
            b = matrix("spatial_bias", (n,), nn.initializers.ones)[:length]
            extra = self._tiny_attention(x, causal, valid, positions) if kind == "amlp" else None
            y = dense("proj_out", (d,), fan_in=f)(spatial_gating(z1, z2, w.astype(dt), b, extra=extra,
                                                                 causal=causal, valid=valid))
        elif kind == "fnet":
            if valid is not None:
                raise ValueError("token_mixer='fnet' cannot respect a padding mask (valid): the DFT mixes every "
                                 "position; pass valid=None (pad with a token instead)")
            y = fnet_mix(x, copies=cfg.mixer_copies)
        elif kind == "external":
            s = cfg.external_slots
            m_k = self.param("memory_key", cfg.kernel_init(), (d, s), pdt) * cfg.kernel_multiplier(d)
            m_v = self.param("memory_value", cfg.kernel_init(), (s, d), pdt) * cfg.kernel_multiplier(s)
            y = external_attention(x, m_k, m_v, normalize="token", valid=valid)
        elif kind == "conv":
            h = cfg.num_heads
            v = dense("glu_in", (d,))(x) * jax.nn.sigmoid(dense("glu_gate", (d,))(x))
            if valid is not None:
                v = v * valid[:, :, None].astype(v.dtype)
            vh = v.reshape(v.shape[:2] + (h, d // h))
            if cfg.conv_kind == "lightweight":
                kernel = jax.nn.softmax(matrix("conv_kernel", (h, cfg.conv_kernel_size), nn.initializers.zeros)
                                        .astype(jnp.float32), axis=-1)
            else:
                kernel = jax.nn.softmax(dense("dynamic", (h, cfg.conv_kernel_size))(x).astype(jnp.float32), -1)
            y = dense("conv_out", (d,))(conv_mix(vh, kernel, causal=causal).reshape(v.shape))
        else:
            raise ValueError(f"token_mixer must be one of {MIXERS}, got {kind!r}")
        return y, probs

    def _tiny_attention(self, x, causal, valid, positions):
        """aMLP's tiny single-head attention of the block input, projected to the gate width d_ff."""
        cfg = self.cfg
        da, d = cfg.tiny_attention_dim, x.shape[-1]
        dt, pdt = cfg.compute_dtype, cfg.param_jnp_dtype

        def proj(name, features, in_axes, fan):
            return Dense(features, in_axes=in_axes, use_bias=cfg.use_bias, kernel_init=cfg.kernel_init(in_axes),
                         multiplier=cfg.kernel_multiplier(fan), dtype=dt, param_dtype=pdt, name=name)

        q, k, v = (proj(f"tiny_{p}", (1, da), 1, d)(x) for p in ("query", "key", "value"))
        if cfg.position == "rope" and da % 2 == 0:
            pos = jnp.arange(x.shape[1]) if positions is None else positions
            q, k = rope(q, pos, cfg.rope_base), rope(k, pos, cfg.rope_base)
        length = x.shape[1]
        m = jnp.tril(jnp.ones((length, length), bool)) if causal else jnp.ones((length, length), bool)
        m = m[None, None]
        if valid is not None:
            m = m & valid[:, None, None, :]
        out, _ = dot_product_attention(q, k, v, mask=m, scale=1.0 / math.sqrt(da), implementation="einsum")
        return proj("tiny_out", (cfg.d_ff,), 2, da)(out)


def _synth_probs(logits, causal: bool, valid, batch: int):
    """The synthesizers' attention matrices [B, H, L, L] (what assert_lossless compares)."""
    sdt = jnp.promote_types(logits.dtype, jnp.float32)
    lg = logits.astype(sdt)
    if lg.ndim == 3:
        lg = jnp.broadcast_to(lg[None], (batch,) + lg.shape)
    length = lg.shape[-1]
    keep = jnp.ones((length, length), bool)
    if causal:
        keep = jnp.tril(keep)
    keep = keep[None, None]
    if valid is not None:
        keep = keep & valid[:, None, None, :]
    return jax.nn.softmax(jnp.where(keep, lg, _fill(sdt)), axis=-1)


def validate_config(cfg, fail) -> None:
    """Cross-field checks of the mixer options (called by TransformerConfig; ``fail(field, allowed, got)``)."""
    for name in ("external_slots", "conv_kernel_size", "tiny_attention_dim", "mixer_copies"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(name, "a positive integer", value)
    if cfg.token_mlp_dim is not None and (not isinstance(cfg.token_mlp_dim, int) or cfg.token_mlp_dim < 1):
        fail("token_mlp_dim", "None (= max_len) or a positive integer", cfg.token_mlp_dim)
    if cfg.mixer_norm_eps is not None and not (isinstance(cfg.mixer_norm_eps, (int, float))
                                               and cfg.mixer_norm_eps > 0):
        fail("mixer_norm_eps", "None (= norm_eps) or a number > 0", cfg.mixer_norm_eps)
    if not isinstance(cfg.synthesizer_frozen, bool):
        fail("synthesizer_frozen", "True or False", cfg.synthesizer_frozen)
    if cfg.conv_kind not in CONV_KINDS:
        fail("conv_kind", f"one of {CONV_KINDS}", cfg.conv_kind)
    kind = cfg.token_mixer
    if kind not in MIXERS:
        return
    masks = cfg.masks_per_layer
    if any(m not in ("causal", "bidirectional") for m in masks):
        fail("mask", f"'causal' or 'bidirectional' with token_mixer={kind!r}", cfg.mask)
    if kind in BIDIRECTIONAL_ONLY and "causal" in masks:
        fail("mask", f"'bidirectional' with token_mixer={kind!r}, which has no causal form: it trains an MLM "
                     "(data.objective='mlm'), never a causal LM (choose another token_mixer for one)", cfg.mask)
    if cfg.position == "relative":
        fail("position", f"one of ('learned', 'rope', 'none') with token_mixer={kind!r}", cfg.position)
    if kind == "mixer" and "causal" in masks and token_mlp_dim(cfg) != cfg.max_len:
        fail("token_mlp_dim", f"None or max_len={cfg.max_len} for a causal mixer (hidden units index positions)",
             cfg.token_mlp_dim)
    if kind == "conv":
        if cfg.d_model % cfg.num_heads:
            fail("num_heads", f"a divisor of d_model={cfg.d_model} with token_mixer='conv'", cfg.num_heads)
        if "bidirectional" in masks and cfg.conv_kernel_size % 2 == 0:
            fail("conv_kernel_size", "odd for a bidirectional (centred) convolution", cfg.conv_kernel_size)
    if kind == "fnet" and cfg.d_model % cfg.mixer_copies:
        fail("mixer_copies", f"a divisor of d_model={cfg.d_model}", cfg.mixer_copies)
    if cfg.mixer_copies != 1 and kind != "fnet":
        fail("mixer_copies", "1 unless token_mixer='fnet' (set by upscale.widen)", cfg.mixer_copies)
