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

Options. The mixers' options (``synthesizer_frozen``, ``token_mlp_dim``, ``external_slots``, ``conv_kind``,
``conv_kernel_size``, ``tiny_attention_dim``, ``mixer_norm_eps``, ``mixer_copies``) are one nested field of the
model config, ``TransformerConfig.mixer_options`` (a frozen :class:`MixerOptions`; on the command line
``--config.model.mixer_options.<option>=...``).

Registry. :data:`REGISTRY` maps every value of ``TransformerConfig.token_mixer`` (attention and linear
attention included) to a :class:`MixerSpec`: the Flax module and function that build it and the properties the
rest of the library asks about (dense mask, KV-cache decoding, replaces the block's norm, bidirectional only,
length bound, muP support, its multiplication count in ``kexue_jax.flops``). ``mixer_spec(name)`` looks one up;
``mixer_names(**properties)`` lists the mixers with given properties.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kexue_jax import flops
from kexue_jax.nn import init as initializers
from kexue_jax.nn.activations import ACTIVATIONS
from kexue_jax.nn.attention import (Dense, MultiHeadAttention, dot_product_attention, linear_attend, rope,
                                    softmax_attend)
from kexue_jax.nn.norms import make_norm

Array = jax.Array

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
# The options of the mixers: one nested field of TransformerConfig.

def _fail_option(field: str, allowed: str, got: Any) -> None:
    raise ValueError(f"TransformerConfig.mixer_options.{field} must be {allowed}, got {got!r}")


@dataclasses.dataclass(frozen=True)
class MixerOptions:
    """The options of the non-attention token mixers (kexue.fm/archives/8431): ``TransformerConfig.mixer_options``.

    Each field is read by one mixer and ignored by the others. The fields are checked one by one here
    (errors name ``TransformerConfig.mixer_options.<field>``); checks against the rest of the model (mask,
    max_len, d_model, num_heads) are ``validate_config``'s, run by TransformerConfig. Command line:
    ``--config.model.mixer_options.<field>=...``.
    """

    synthesizer_frozen: bool = False  # synthesizer_random: logits fixed at their random init
    token_mlp_dim: int | None = None  # mixer: token-MLP hidden size S (None: max_len; causal needs max_len)
    external_slots: int = 64          # external: memory slots S
    conv_kind: str = "lightweight"    # conv: lightweight | dynamic
    conv_kernel_size: int = 7         # conv: kernel width (odd when bidirectional)
    tiny_attention_dim: int = 64      # amlp: size of the tiny single-head attention
    mixer_norm_eps: float | None = None  # gmlp/amlp gate norm eps (None: norm_eps; widen keeps it fixed)
    mixer_copies: int = 1             # fnet: interleaved channel copies (set by upscale.widen)

    def __post_init__(self):
        for name in ("external_slots", "conv_kernel_size", "tiny_attention_dim", "mixer_copies"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail_option(name, "a positive integer", value)
        if self.token_mlp_dim is not None and (not isinstance(self.token_mlp_dim, int) or self.token_mlp_dim < 1):
            _fail_option("token_mlp_dim", "None (= max_len) or a positive integer", self.token_mlp_dim)
        if self.mixer_norm_eps is not None and not (isinstance(self.mixer_norm_eps, (int, float))
                                                    and self.mixer_norm_eps > 0):
            _fail_option("mixer_norm_eps", "None (= norm_eps) or a number > 0", self.mixer_norm_eps)
        if not isinstance(self.synthesizer_frozen, bool):
            _fail_option("synthesizer_frozen", "True or False", self.synthesizer_frozen)
        if self.conv_kind not in CONV_KINDS:
            _fail_option("conv_kind", f"one of {CONV_KINDS}", self.conv_kind)

    @classmethod
    def of(cls, value) -> "MixerOptions":
        """``value`` as MixerOptions: a MixerOptions, or a mapping of some of its fields (the rest default).
        Raises ValueError naming the fields for anything else, or for a key that is not a field."""
        if isinstance(value, cls):
            return value
        names = tuple(f.name for f in dataclasses.fields(cls))
        if not (hasattr(value, "keys") and hasattr(value, "__getitem__")):
            raise ValueError(f"TransformerConfig.mixer_options must be a MixerOptions or a dict of its fields "
                             f"{names}, got {value!r}")
        unknown = sorted(set(value.keys()) - set(names))
        if unknown:
            raise ValueError(f"TransformerConfig.mixer_options has no field(s) {unknown}; fields are {names}")
        return cls(**{k: value[k] for k in value.keys()})

    def replace(self, **changes) -> "MixerOptions":
        return dataclasses.replace(self, **changes)


#: the option names (also the keys that were fields of TransformerConfig itself before mixer_options)
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(MixerOptions))


def token_mlp_dim(cfg) -> int:
    """MLP-Mixer's token hidden size S (``mixer_options.token_mlp_dim``, default max_len)."""
    s = cfg.mixer_options.token_mlp_dim
    return cfg.max_len if s is None else s


# ------------------------------------------------------------------------------------------------
# The Flax module: one sub-layer per mixer, same call signature as MultiHeadAttention.

def check_length(cfg, length: int) -> None:
    """Raise if a mixer with n x n parameters (sized by max_len) gets a longer input."""
    spec = REGISTRY.get(cfg.token_mixer)
    if spec is not None and spec.length_bound and length > cfg.max_len:
        raise ValueError(f"token_mixer={cfg.token_mixer!r} has {cfg.max_len} x {cfg.max_len} token-mixing "
                         f"parameters (TransformerConfig.max_len={cfg.max_len}); got length {length}. Shorter "
                         f"inputs use the leading block; longer ones need a larger max_len (or pad/crop the "
                         f"input). fnet, external and conv run at any length.")


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


@dataclasses.dataclass(frozen=True)
class MixerCall:
    """What one call of a TokenMixer passes to its mixer's ``apply`` besides the module and x [B, L, D]."""

    causal: bool             # mask kind "causal" (else bidirectional)
    valid: Any               # [B, L] bool key validity, or None
    positions: Any           # [B, L] positions (aMLP's tiny attention under RoPE), or None
    return_probs: bool       # the synthesizers return their attention matrices


def _dense(m: nn.Module, name: str, features, fan_in: int, in_axes: int = 1) -> Dense:
    """A Dense of the mixer ``m`` with the model's init, NTK multiplier (of ``fan_in``), dtypes and biases."""
    cfg = m.cfg
    return Dense(tuple(features), in_axes=in_axes, use_bias=cfg.use_bias, kernel_init=cfg.kernel_init(in_axes),
                 multiplier=cfg.kernel_multiplier(fan_in), dtype=cfg.compute_dtype, param_dtype=cfg.param_jnp_dtype,
                 name=name)


def _matrix(m: nn.Module, name: str, shape, init):
    """A parameter of the mixer ``m`` itself (token matrices, biases, affines), in the model's param dtype."""
    return m.param(name, init, shape, m.cfg.param_jnp_dtype)


def _apply_synthesizer(m, x, c: MixerCall, *, dense_logits: bool):
    """Synthesizer: softmax(B) (x W_v) W_o, B a parameter R [H, n, n] (Random) or predicted from x_i (Dense)."""
    cfg = m.cfg
    h, hd, n, length, d = cfg.num_heads, cfg.head_dim, cfg.max_len, x.shape[1], x.shape[-1]
    v = _dense(m, "value", (h, hd), d)(x)
    if not dense_logits:
        logits = _matrix(m, "logits", (h, n, n), nn.initializers.normal(0.02))[:, :length, :length]
        if cfg.mixer_options.synthesizer_frozen:
            logits = jax.lax.stop_gradient(logits)
    else:
        hidden = jax.nn.relu(_dense(m, "dense_hidden", (d,), d)(x))
        logits = _dense(m, "dense_logits", (h, n), d)(hidden)[..., :length]  # [B, L, H, L]
        logits = jnp.transpose(logits, (0, 2, 1, 3))
    out = token_matrix_mix(v, logits, softmax=True, causal=c.causal, valid=c.valid)
    probs = _synth_probs(logits, c.causal, c.valid, x.shape[0]) if c.return_probs else None
    return _dense(m, "out", (d,), h * hd, in_axes=2)(out), probs


def _apply_token_mlp(m, x, c: MixerCall):
    """MLP-Mixer's token-mixing MLP (``token_mlp``) with [S, n] and [n, S] matrices sized by max_len."""
    cfg = m.cfg
    n, length, dt = cfg.max_len, x.shape[1], cfg.compute_dtype
    s = token_mlp_dim(cfg)
    w1 = _matrix(m, "token_in", (s, n), _matrix_init(cfg, n))
    w2 = _matrix(m, "token_out", (n, s), _matrix_init(cfg, s))
    b1 = _matrix(m, "token_in_bias", (s,), nn.initializers.zeros)
    b2 = _matrix(m, "token_out_bias", (n,), nn.initializers.zeros)
    if s == n:
        w1, b1 = w1[:length, :length], b1[:length]
        w2 = w2[:length, :length]
    else:
        w1, w2 = w1[:, :length], w2[:length]
    return token_mlp(x, w1.astype(dt), b1, w2.astype(dt), b2[:length], activation=_activation(cfg),
                     causal=c.causal, valid=c.valid), None


def _apply_resmlp(m, x, c: MixerCall):
    """ResMLP: Aff_out(A Aff_in(x) + b) with one n x n matrix A; the affines replace the block's norm."""
    cfg = m.cfg
    n, length, d = cfg.max_len, x.shape[1], x.shape[-1]
    aff = {name: (_matrix(m, f"{name}_alpha", (d,), nn.initializers.constant(a0)),
                  _matrix(m, f"{name}_beta", (d,), nn.initializers.zeros))
           for name, a0 in (("aff_in", 1.0), ("aff_out", 0.1))}
    w = _matrix(m, "token", (n, n), _matrix_init(cfg, n))[:length, :length]
    b = _matrix(m, "token_bias", (n,), nn.initializers.zeros)[:length]
    z = token_matrix_mix(affine(x, *aff["aff_in"]), w.astype(cfg.compute_dtype), bias=b, causal=c.causal,
                         valid=c.valid)
    return affine(z, *aff["aff_out"]), None


def _apply_gmlp(m, x, c: MixerCall, *, tiny_attention: bool):
    """gMLP's spatial gating unit between act(x U) and V; aMLP adds a tiny attention of x to the gate."""
    cfg = m.cfg
    n, length, d, f, dt = cfg.max_len, x.shape[1], x.shape[-1], cfg.d_ff, cfg.compute_dtype
    z = _activation(cfg)(_dense(m, "proj_in", (2 * f,), d)(x))
    z1, z2 = z[..., :f], z[..., f:]
    eps = cfg.norm_eps if cfg.mixer_options.mixer_norm_eps is None else cfg.mixer_options.mixer_norm_eps
    z2 = make_norm(cfg.norm, eps, cfg.use_bias, dt, cfg.param_jnp_dtype, "sgu_norm")(z2)
    w = _matrix(m, "spatial", (n, n), nn.initializers.zeros)[:length, :length]
    b = _matrix(m, "spatial_bias", (n,), nn.initializers.ones)[:length]
    extra = _tiny_attention(m, x, c.causal, c.valid, c.positions) if tiny_attention else None
    return _dense(m, "proj_out", (d,), f)(spatial_gating(z1, z2, w.astype(dt), b, extra=extra, causal=c.causal,
                                                         valid=c.valid)), None


def _apply_fnet(m, x, c: MixerCall):
    """FNet: Re(FFT_seq(FFT_hidden(x))), no parameters (``fnet_mix``)."""
    if c.valid is not None:
        raise ValueError("token_mixer='fnet' cannot respect a padding mask (valid): the DFT mixes every "
                         "position; pass valid=None (pad with a token instead)")
    return fnet_mix(x, copies=m.cfg.mixer_options.mixer_copies), None


def _apply_external(m, x, c: MixerCall):
    """External Attention with memories M_k [D, S], M_v [S, D] (``external_attention``, token normalisation)."""
    cfg = m.cfg
    s, d, pdt = cfg.mixer_options.external_slots, x.shape[-1], cfg.param_jnp_dtype
    m_k = m.param("memory_key", cfg.kernel_init(), (d, s), pdt) * cfg.kernel_multiplier(d)
    m_v = m.param("memory_value", cfg.kernel_init(), (s, d), pdt) * cfg.kernel_multiplier(s)
    return external_attention(x, m_k, m_v, normalize="token", valid=c.valid), None


def _apply_conv(m, x, c: MixerCall):
    """GLU input projection, then a lightweight or dynamic convolution over tokens (``conv_mix``), then W_out."""
    cfg = m.cfg
    h, d, opts = cfg.num_heads, x.shape[-1], cfg.mixer_options
    v = _dense(m, "glu_in", (d,), d)(x) * jax.nn.sigmoid(_dense(m, "glu_gate", (d,), d)(x))
    if c.valid is not None:
        v = v * c.valid[:, :, None].astype(v.dtype)
    vh = v.reshape(v.shape[:2] + (h, d // h))
    if opts.conv_kind == "lightweight":
        kernel = jax.nn.softmax(_matrix(m, "conv_kernel", (h, opts.conv_kernel_size), nn.initializers.zeros)
                                .astype(jnp.float32), axis=-1)
    else:
        kernel = jax.nn.softmax(_dense(m, "dynamic", (h, opts.conv_kernel_size), d)(x).astype(jnp.float32), -1)
    return _dense(m, "conv_out", (d,), d)(conv_mix(vh, kernel, causal=c.causal).reshape(v.shape)), None


class TokenMixer(nn.Module):
    """The token-mixing sub-layer ``cfg.token_mixer`` (one of MIXERS; see the module docstring): its registry
    entry's ``apply`` builds it.

    Call: (x [B, L, d_model], *, mask (the model's _MixerMask: kind and key validity), positions,
    deterministic, return_probs, cache_index) -> (y [B, L, d_model], probs [B, H, L, L] for the synthesizers
    when asked, else None).
    """

    cfg: Any  # TransformerConfig

    @nn.compact
    def __call__(self, x, *, mask=None, positions=None, deterministic=True, return_probs=False, cache_index=None):
        cfg = self.cfg
        kind = cfg.token_mixer
        spec = mixer_spec(kind)
        if spec.apply is None:
            raise ValueError(f"TokenMixer runs token_mixer in {MIXERS}; {kind!r} is {spec.module.__name__}'s")
        if cache_index is not None and not spec.kv_cache:
            raise ValueError(f"cache_index (KV-cache decoding) is not supported by token_mixer={kind!r}")
        causal = getattr(mask, "kind", "bidirectional") == "causal"
        check_length(cfg, x.shape[1])
        if spec.bidirectional_only and causal:
            raise ValueError(f"token_mixer={kind!r} has no causal form; use mask='bidirectional'")
        call = MixerCall(causal=causal, valid=getattr(mask, "valid", None), positions=positions,
                         return_probs=return_probs)
        return spec.apply(self, x, call)


def _tiny_attention(m, x, causal, valid, positions):
    """aMLP's tiny single-head attention of the block input, projected to the gate width d_ff."""
    cfg = m.cfg
    da, d = cfg.mixer_options.tiny_attention_dim, x.shape[-1]
    q, k, v = (_dense(m, f"tiny_{p}", (1, da), d)(x) for p in ("query", "key", "value"))
    if cfg.position == "rope" and da % 2 == 0:
        pos = jnp.arange(x.shape[1]) if positions is None else positions
        q, k = rope(q, pos, cfg.rope_base), rope(k, pos, cfg.rope_base)
    length = x.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool)) if causal else jnp.ones((length, length), bool)
    mask = mask[None, None]
    if valid is not None:
        mask = mask & valid[:, None, None, :]
    out, _ = dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(da), implementation="einsum")
    return _dense(m, "tiny_out", (cfg.d_ff,), da, in_axes=2)(out)


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


# ------------------------------------------------------------------------------------------------
# The registry: every value of TransformerConfig.token_mixer, what builds it and what the model asks of it.

@dataclasses.dataclass(frozen=True)
class MixerSpec:
    """One token mixer (kexue.fm/archives/8431): the module that builds the sub-layer and its properties, read
    by TransformerConfig's checks, Block, Transformer, init_cache, UniVAE and kexue_jax.flops."""

    name: str
    module: type                     # the sub-layer's Flax module: MultiHeadAttention or TokenMixer
    scope: str                       # the sub-layer's name in a layer's parameter tree: "attn" or "mixer"
    apply: Callable | None = None    # TokenMixer: (module, x, MixerCall) -> (y, probs or None)
    attend: Callable | None = None   # MultiHeadAttention: (module, q, k, v, *, mask, bias, deterministic,
    #                                  return_probs) -> (weighted sum of v [B, L, H, Dh], probs or None)
    dense_mask: bool = False         # takes the dense [B, 1, Lq, Lk] mask of any mask kind and T5 relative
    #                                  positions; else a _MixerMask (kind, valid) of 'causal' / 'bidirectional'
    kv_cache: bool = False           # incremental decoding with cache_index (init_cache, UniVAE's decoder)
    replaces_norm: bool = False      # its own affines replace the block's mixer norm (ResMLP)
    bidirectional_only: bool = False  # no causal form: MLM only
    length_bound: bool = False       # parameters of size max_len along the token axis (longer inputs raise)
    mup: bool = True                 # supported under parameterization="mup"
    head_multiplier: bool = False    # its head size is head_dim x linear_head_multiplier
    mults: Callable | None = None    # its multiplication count: a function of kexue_jax.flops


def _attention_like(name: str, attend: Callable, mults: Callable, **properties) -> MixerSpec:
    return MixerSpec(name, MultiHeadAttention, "attn", attend=attend, mults=mults, **properties)


def _token_mixer(name: str, apply: Callable, **properties) -> MixerSpec:
    return MixerSpec(name, TokenMixer, "mixer", apply=apply, mults=flops.MIXER_MULTS[name], **properties)


#: name -> MixerSpec, for every value of TransformerConfig.token_mixer (consulted through ``mixer_spec``)
REGISTRY: dict[str, MixerSpec] = {spec.name: spec for spec in (
    _attention_like("attention", softmax_attend, flops.softmax_attention_mults, dense_mask=True, kv_cache=True),
    _attention_like("linear", linear_attend, flops.linear_attention_mults, head_multiplier=True),
    _token_mixer("synthesizer_random", functools.partial(_apply_synthesizer, dense_logits=False), length_bound=True),
    _token_mixer("synthesizer_dense", functools.partial(_apply_synthesizer, dense_logits=True), length_bound=True,
                 mup=False),
    _token_mixer("mixer", _apply_token_mlp, length_bound=True),
    _token_mixer("resmlp", _apply_resmlp, length_bound=True, replaces_norm=True),
    _token_mixer("gmlp", functools.partial(_apply_gmlp, tiny_attention=False), length_bound=True),
    _token_mixer("amlp", functools.partial(_apply_gmlp, tiny_attention=True), length_bound=True, mup=False),
    _token_mixer("fnet", _apply_fnet, bidirectional_only=True),
    _token_mixer("external", _apply_external, bidirectional_only=True, mup=False),
    _token_mixer("conv", _apply_conv),
)}


def mixer_spec(name: str) -> MixerSpec:
    """The registry entry of token mixer ``name``; ValueError naming the allowed values for another name."""
    if name not in REGISTRY:
        raise ValueError(f"token_mixer must be one of {tuple(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def mixer_names(**properties) -> tuple[str, ...]:
    """The token mixers (registry order) whose entries have all of ``properties``, e.g.
    ``mixer_names(bidirectional_only=True)`` -> ('fnet', 'external'); TypeError for a property MixerSpec lacks."""
    fields = {f.name for f in dataclasses.fields(MixerSpec)}
    unknown = sorted(set(properties) - fields)
    if unknown:
        raise TypeError(f"mixer_names: MixerSpec has no field(s) {unknown}; fields are {sorted(fields)}")
    return tuple(name for name, spec in REGISTRY.items()
                 if all(getattr(spec, k) == v for k, v in properties.items()))


#: the mixers of this module (TokenMixer), in registry order
MIXERS = mixer_names(scope="mixer")
#: mixers that cannot be made causal (they raise under mask="causal")
BIDIRECTIONAL_ONLY = mixer_names(bidirectional_only=True)
#: mixers with parameters of size max_len along the token axis
LENGTH_BOUND = mixer_names(length_bound=True)


def validate_config(cfg, fail) -> None:
    """Checks of ``cfg.token_mixer`` and ``cfg.mixer_options`` against the rest of the model (called by
    TransformerConfig; ``fail(field, allowed, got)``). The options alone are checked by MixerOptions."""
    spec = REGISTRY.get(cfg.token_mixer)
    if spec is None:  # TransformerConfig names the allowed values
        return
    kind, masks, opts = spec.name, cfg.masks_per_layer, cfg.mixer_options
    if not spec.dense_mask:
        if any(m not in ("causal", "bidirectional") for m in masks):
            fail("mask", f"'causal' or 'bidirectional' with token_mixer={kind!r}", cfg.mask)
        if spec.bidirectional_only and "causal" in masks:
            fail("mask", f"'bidirectional' with token_mixer={kind!r}, which has no causal form: it trains an MLM "
                         "(data.objective='mlm'), never a causal LM (choose another token_mixer for one)", cfg.mask)
        if cfg.position == "relative":
            fail("position", f"one of ('learned', 'rope', 'none') with token_mixer={kind!r}", cfg.position)
    if spec.scope != "mixer":
        return
    if kind == "mixer" and "causal" in masks and token_mlp_dim(cfg) != cfg.max_len:
        fail("mixer_options.token_mlp_dim", f"None or max_len={cfg.max_len} for a causal mixer (hidden units "
             "index positions)", opts.token_mlp_dim)
    if kind == "conv":
        if cfg.d_model % cfg.num_heads:
            fail("num_heads", f"a divisor of d_model={cfg.d_model} with token_mixer='conv'", cfg.num_heads)
        if "bidirectional" in masks and opts.conv_kernel_size % 2 == 0:
            fail("mixer_options.conv_kernel_size", "odd for a bidirectional (centred) convolution",
                 opts.conv_kernel_size)
    if kind == "fnet" and cfg.d_model % opts.mixer_copies:
        fail("mixer_options.mixer_copies", f"a divisor of d_model={cfg.d_model}", opts.mixer_copies)
    if opts.mixer_copies != 1 and kind != "fnet":
        fail("mixer_options.mixer_copies", "1 unless token_mixer='fnet' (set by upscale.widen)", opts.mixer_copies)
