"""Lossless width upscaling of a Transformer (kexue.fm/archives/8444), as pure maps of params and Adam state.

The invariant of the post: every hidden vector of the big model is the small one repeated and scaled,

    x~ = rep(x) / sqrt(k),      rep = interleaved repetition [x1, .., x1, x2, .., x2, ...] (k copies),

so LayerNorm/RMSNorm (scale invariant) see the same normalized vector, the tied output h~ E~^T =
sum_{kd} (h/sqrt k)(e/sqrt k) = h E^T is unchanged, and every attention matrix is unchanged.

Each tensor is repeated along every grown axis (d_model -> k d_model, d_ff -> k d_ff, and
head_dim -> k head_dim for ``grow="head_dim"`` (the post) or heads -> k heads for ``grow="num_heads"``
(HyperCloning)) and multiplied by one scalar. For a dense layer whose input is alpha_in rep(x) and whose
output must be alpha_out rep(y), the kernel factor is alpha_out / (k alpha_in) (the k copies of each input
sum up) and the bias factor is alpha_out. With s = 1/sqrt(k):

    tensor                              alpha_out           kernel            bias
    embeddings (token/position/segment) s                   rep * s
    norm gamma, beta (input s rep(x))   s                   rep * s,  eps -> eps / k           (erratum E3)
    q, k, 1/sqrt(d) scale, head_dim     k^{-1/4}            k^{1/4} / k       k^{1/4} / sqrt(k)
    q, k, T5 (no scale), head_dim       s                   1 / k             s
    q, k, 1/d (muP) or grow=num_heads   1                   s                 1
    v, out                              s                   1 / k             s
    FFN-1 (any activation, two-step)    1 (pure repeat)     s                 1
    FFN-2 after it                      s                   1 / (k sqrt k)    s  (post: 1/k, erratum E1)
    MLM dense (+ act)                   1                   s                 1
    MLM norm (input a pure repeat)      s                   rep * s, eps unchanged   (erratum E2)
    untied output W [d, V]              1 (logits)          s
    vocab bias, T5 relative bias        1                   (rel. bias repeated over heads)

Under the NTK parameterization (forward multiplier m = sqrt(extra / fan_in)) the rule applies to the
effective weight W m; the stored weight is rescaled by m_small / m_big.

Under muP (``parameterization="mup"``, ``kexue_jax.nn.mup``) the invariant is x~ = rep(x): s = 1 in every row
of the table (``hidden_scale``), so vectors are pure repeats, kernels rep(W)/k, norms keep their eps, and the
readout multiplier 1/m -> 1/(k m) absorbs the k copies of the tied output sum (rep(h).rep(e) = k h.e); the
untied head is a pure repeat. Theta(1) coordinates at every width are what muP asks of a hidden vector. Linear attention (post 8610) is
exact with pure-repeat q and k in both grow modes (its normalised kernel cancels the k copies).

RoPE with ``grow="head_dim"`` repeats pairs, (x1,x2,x3,x4) -> (x1,x2,x1,x2,x3,x4,x3,x4)/sqrt(k); copy r of
pair i then rotates at theta_i * base^{-2r/(k d)}, so the logits drift with relative distance
(``rope_widening_error``). ``grow="num_heads"`` keeps RoPE exact.

Symmetry breaking (``noise_db``, ``symmetry``): a kernel whose input axis was repeated reads k identical
copies of each input, so adding perturbations N_1..N_k with sum_r N_r = 0 to the copies' rows leaves every
output exactly unchanged, while the backward pass through the perturbed rows now sends different gradients
to the copies of the previous layer's units. Without noise, copies get identical gradients and stay
identical forever. The strength is a signal-to-noise ratio in dB, as HyperCloning states it:

    std(N) = 10^(noise_db / 20) * RMS(W~)          (noise_db = -10: std = 0.316 RMS; 0 dB: std = RMS)

Two exact constructions (``SYMMETRY_METHODS``), with z_1..z_k iid N(0, 1) per entry and
z^_r = (z_r - mean_r z) sqrt(k / (k - 1)) (zero-sum over the copies, unit variance):
  "zero_sum"  additive, W~_r <- W~_r + sigma RMS(W~) z^_r  (HyperCloning's +N / -N blocks, any k);
  "fan_out"   multiplicative, W~_r <- W~_r (1 + sigma z^_r): LEMON's unequal split of a copied fan-out
              (alpha_r = (1 + sigma z^_r) / k, sum_r alpha_r = 1), zero where the weight is zero.
A kernel with several grown input axes gets sigma / sqrt(#axes) per axis. Under a bfloat16/float16 compute
dtype a perturbation below the dtype's resolution (sigma < 2^-8 for bfloat16, i.e. noise_db < -48 dB)
would round away, so ``widen`` refuses it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kexue_jax.nn.activations import HOMOGENEOUS_ACTIVATIONS
from kexue_jax.nn.attention import qk_init_variance_factor
from kexue_jax.nn.transformer import Transformer, TransformerConfig

GROW_MODES = ("head_dim", "num_heads")
SYMMETRY_METHODS = ("zero_sum", "fan_out")
#: unit roundoff of the low-precision compute dtypes: a relative perturbation below it rounds away.
_UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WidenRules:
    """Which version of each rule to apply. The defaults are the exact (corrected) rules; the other
    values reproduce the post's literal text or naive variants, for regression tests and ablations.

    ffn:            "two_step" (FFN-1 output a pure repeat; exact for any activation) or "plain"
                    (W/k, b/sqrt(k) on both layers; exact only for ReLU/linear).
    ffn2_bias:      "corrected" (b/sqrt(k), erratum E1) or "post" (the post's literal b/k).
    mlm_norm:       "plain" (rep/sqrt(k), erratum E2) or "post" (the literal extra 1/sqrt(k): rep/k).
    qk_compensation: True multiplies q and k by k^{1/4} under the 1/sqrt(d) scale; False omits it.
    repetition:     "interleave" (the post) or "tile" ([x, x] blocks; scrambles heads when head_dim grows).
    """

    ffn: str = "two_step"
    ffn2_bias: str = "corrected"
    mlm_norm: str = "plain"
    qk_compensation: bool = True
    repetition: str = "interleave"

    def __post_init__(self):
        for name, allowed in (("ffn", ("two_step", "plain")), ("ffn2_bias", ("corrected", "post")),
                              ("mlm_norm", ("plain", "post")), ("repetition", ("interleave", "tile"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"WidenRules.{name} must be one of {allowed}, got {getattr(self, name)!r}")


def _check_factor(factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)):
        if isinstance(factor, float) and factor.is_integer():
            factor = int(factor)
        else:
            raise ValueError(f"factor must be an integer >= 2 (widths grow by interleaved repetition; "
                             f"a target width that is not an integer multiple is not supported), got {factor!r}")
    if factor < 2:
        raise ValueError(f"factor must be an integer >= 2, got {factor}")
    return int(factor)


def hidden_scale(cfg: TransformerConfig, factor: int) -> float:
    """s in the invariant x~ = s rep(x) of the widened model's hidden vectors: 1/sqrt(k) (the post; norms and the
    tied readout see the same function), or 1 under muP (coordinates stay Theta(1); the readout's 1/m absorbs k)."""
    return 1.0 if cfg.parameterization == "mup" else 1.0 / math.sqrt(factor)


def _check_grow(grow: str) -> None:
    if grow not in GROW_MODES:
        raise ValueError(f"grow must be one of {GROW_MODES}, got {grow!r}")


def _ffn_rule(cfg: TransformerConfig, rules: WidenRules) -> str:
    if rules.ffn == "plain" and cfg.ffn == "gated":
        raise ValueError("WidenRules.ffn='plain' is not defined for a gated FFN; use 'two_step'")
    return rules.ffn


def widen_config(cfg: TransformerConfig, factor: int, *, grow: str = "head_dim",
                 rules: WidenRules = WidenRules()) -> TransformerConfig:
    """The config of the widened model: d_model, d_ff and head_dim (or num_heads) times k; eps -> eps s^2 for
    norms whose input is scaled by s = ``hidden_scale`` (eps/k; unchanged under muP); the MLM-head norm (input a
    pure repeat) keeps its eps. A muP model keeps its ``mup_base_d_model`` (None: the small model's d_model), so its
    width multiplier becomes k m."""
    k = _check_factor(factor)
    _check_grow(grow)
    if cfg.residual in ("rezero", "deepnorm"):
        raise ValueError(f"widen: residual={cfg.residual!r} has no widening rule yet (ReZero's trainable scalar "
                         f"and DeepNorm's init gains are not mapped); use residual 'post', 'pre', 'alpha' or "
                         f"'alpha_post'")
    k_eps = 1 if cfg.parameterization == "mup" else k  # 1 / s^2, exactly (eps / k, not eps x 0.5000000000000001)
    head_eps = cfg.norm_eps if cfg.head_norm_eps is None else cfg.head_norm_eps
    if _ffn_rule(cfg, rules) == "plain":
        head_eps = head_eps / k_eps
    return cfg.replace(
        d_model=cfg.d_model * k, d_ff=cfg.d_ff * k, norm_eps=cfg.norm_eps / k_eps,
        head_norm_eps=head_eps if cfg.head == "mlm" else cfg.head_norm_eps,
        num_heads=cfg.num_heads * (k if grow == "num_heads" else 1),
        head_dim=cfg.head_dim * (k if grow == "head_dim" else 1), **_mixer_config_changes(cfg, k),
        **({"mup_base_d_model": cfg.mup_base_d_model or cfg.d_model} if cfg.parameterization == "mup" else {}))


# ------------------------------------------------------------------------------------------------
# The per-tensor rule: axis kinds, scalar factor on the effective weight, and the kernel's input axes.

@dataclasses.dataclass(frozen=True)
class _Rule:
    axes: tuple[str, ...]  # model | ff | heads | head_dim | fixed
    factor: float          # multiplies the repeated effective weight
    in_axes: int = 0       # number of leading input axes (kernels), 0 for vectors/embeddings
    qk: bool = False       # q/k kernel: the T5 init-variance factor enters its NTK multiplier
    readout: bool = False  # the untied output layer: muP's readout multiplier 1/m enters its multiplier


def _qk_alpha(cfg: TransformerConfig, k: int, grow: str, rules: WidenRules) -> float:
    """Scale of the widened q and k vectors: q~ = alpha rep(q) (see module table)."""
    if cfg.token_mixer == "linear" or grow == "num_heads":
        return 1.0
    if not rules.qk_compensation:
        return hidden_scale(cfg, k)
    return {"sqrt": k ** -0.25, "t5": 1.0 / math.sqrt(k), "none": 1.0 / math.sqrt(k), "mup": 1.0}[cfg.attn_scale]


def _mixer_config_changes(cfg: TransformerConfig, k: int) -> dict:
    """Config changes of a widened non-attention mixer (kexue.fm/archives/8431), as ``mixer_options``: the gMLP
    gate norm sees a pure repeat, so its eps stays the small model's; FNet's hidden DFT keeps the small width."""
    opts = cfg.mixer_options
    if cfg.token_mixer in ("gmlp", "amlp"):
        eps = cfg.norm_eps if opts.mixer_norm_eps is None else opts.mixer_norm_eps
        return {"mixer_options": opts.replace(mixer_norm_eps=eps)}
    if cfg.token_mixer == "fnet":
        return {"mixer_options": opts.replace(mixer_copies=opts.mixer_copies * k)}
    return {}


def _mixer_rule(path: Path, k: int, s: float) -> _Rule | None:
    """Widening rules of the non-attention token mixers (``kexue_jax.nn.mixers``, kexue.fm/archives/8431).

    The mixer's input is s rep(x) and its output must be s rep(y) (s = ``hidden_scale``: 1/sqrt(k), or 1 under
    muP). A kernel reading s rep(x) whose output must be a pure repeat (or keep a fixed size) gets r = 1/(k s)
    (= s when s = 1/sqrt(k)). Token-axis (n x n) matrices act on every channel alike, so they are never
    repeated; only their scale and biases change:

        Synthesizer logits [H, n, n], ResMLP A, gMLP W and b, conv kernels [H, K]   unchanged (heads repeated
                                                                                   under grow="num_heads")
        Mixer W_1 (reads s rep x, GELU needs x)  1/s;  b_1 unchanged;  W_2, b_2  s
        ResMLP Aff alpha unchanged, beta s;  A's per-token bias s (it adds one scalar to every channel)
        gMLP U [D, 2F]  r (gelu(X U) a pure repeat; interleaved repetition of the 2F axis is the repetition of
                        each half, so the [Z_1 | Z_2] split survives; a tiled [x, x] copy would not);
                        gate norm unchanged with the small eps (``mixer_options.mixer_norm_eps``);  V  s / k, bias s
        aMLP tiny attention (size fixed)  q, k, v kernels r (input rows repeated);  out [1, da, F] repeated
        External M_k [D, S]  r (logits unchanged);  M_v [S, D]  s
        conv GLU: value kernel 1/k, bias s; gate kernel r, bias 1; dynamic kernel r; output 1/k, bias s
        Synthesizer-Dense W_1 r (bias 1, hidden a pure repeat); W_2 [D, H, n] 1/k; value / out as attention
        FNet  no parameters; the config's ``mixer_options.mixer_copies`` x k keeps the small hidden DFT (see fnet_mix)
    """
    r = 1.0 / (k * s)
    name, parent = path[-1], path[-2]
    direct = {  # parameters of layer_i/mixer itself: (axes, factor, in_axes)
        "logits": (("heads", "fixed", "fixed"), 1.0, 0), "conv_kernel": (("heads", "fixed"), 1.0, 0),
        "token_in": (("fixed", "fixed"), 1.0 / s, 0), "token_in_bias": (("fixed",), 1.0, 0),
        "token_out": (("fixed", "fixed"), s, 0), "token_out_bias": (("fixed",), s, 0),
        "aff_in_alpha": (("model",), 1.0, 0), "aff_in_beta": (("model",), s, 0),
        "aff_out_alpha": (("model",), 1.0, 0), "aff_out_beta": (("model",), s, 0),
        "token": (("fixed", "fixed"), 1.0, 0), "token_bias": (("fixed",), s, 0),
        "spatial": (("fixed", "fixed"), 1.0, 0), "spatial_bias": (("fixed",), 1.0, 0),
        "memory_key": (("model", "fixed"), r, 1), "memory_value": (("fixed", "model"), s, 1),
    }
    if parent == "mixer" and name in direct:
        return _Rule(*direct[name])
    if parent == "sgu_norm":
        return _Rule(("ff",), 1.0)
    tiny_qkv = (("model", "fixed", "fixed"), r, 1, ("fixed", "fixed"), 1.0)
    dense = {  # kernel axes, kernel factor, kernel input axes, bias axes, bias factor
        "dense_hidden": (("model", "model"), r, 1, ("model",), 1.0),
        "dense_logits": (("model", "heads", "fixed"), 1.0 / k, 1, ("heads", "fixed"), 1.0),
        "proj_in": (("model", "ff"), r, 1, ("ff",), 1.0),
        "proj_out": (("ff", "model"), s / k, 1, ("model",), s),
        "tiny_query": tiny_qkv, "tiny_key": tiny_qkv, "tiny_value": tiny_qkv,
        "tiny_out": (("fixed", "fixed", "ff"), 1.0, 2, ("ff",), 1.0),
        "glu_in": (("model", "model"), 1.0 / k, 1, ("model",), s),
        "glu_gate": (("model", "model"), r, 1, ("model",), 1.0),
        "dynamic": (("model", "heads", "fixed"), r, 1, ("heads", "fixed"), 1.0),
        "conv_out": (("model", "model"), 1.0 / k, 1, ("model",), s),
    }
    if parent in dense:
        k_axes, k_factor, in_axes, b_axes, b_factor = dense[parent]
        return _Rule(k_axes, k_factor, in_axes) if name == "kernel" else _Rule(b_axes, b_factor)
    return None  # value / out: the attention rules


def _rule(path: Path, cfg: TransformerConfig, k: int, grow: str, rules: WidenRules) -> _Rule:
    s = hidden_scale(cfg, k)
    if "mixer" in path[:-1]:
        mixer_rule = _mixer_rule(path, k, s)
        if mixer_rule is not None:
            return mixer_rule
    two_step = _ffn_rule(cfg, rules) == "two_step"
    name, parent = path[-1], (path[-2] if len(path) > 1 else "")
    if parent == "embed":
        return _Rule(("fixed", "model"), s)
    if parent.endswith("norm"):
        post_literal = parent == "mlm_norm" and rules.mlm_norm == "post"
        return _Rule(("model",), s * s if post_literal else s)
    if name == "rel_bias":
        return _Rule(("fixed", "heads"), 1.0)
    if name == "output_bias":
        return _Rule(("fixed",), 1.0)
    kind = path[-2] if name in ("kernel", "bias") else None
    dense_out = {  # alpha_in, alpha_out, kernel axes, bias axes, extra
        "query": (s, _qk_alpha(cfg, k, grow, rules), ("model", "heads", "head_dim"), ("heads", "head_dim"), True),
        "value": (s, s, ("model", "heads", "head_dim"), ("heads", "head_dim"), False),
        "out": (s, s, ("heads", "head_dim", "model"), ("model",), False),
        "wi": (s, 1.0 if two_step else s, ("model", "ff"), ("ff",), False),
        "wo": (1.0 if two_step else s, s, ("ff", "model"), ("model",), False),
        "mlm_dense": (s, 1.0 if two_step else s, ("model", "model"), ("model",), False),
        "head": (s, 1.0, ("model", "fixed"), ("fixed",), False),
    }
    dense_out["key"] = dense_out["query"]
    dense_out["wi_gate"] = dense_out["wi"]
    if kind not in dense_out:
        raise ValueError(f"widen: no rule for parameter {'/'.join(path)}")
    a_in, a_out, k_axes, b_axes, qk = dense_out[kind]
    if name == "kernel":
        return _Rule(k_axes, a_out / (k * a_in), in_axes=len(k_axes) - (2 if kind in ("query", "key", "value")
                                                                       else 1), qk=qk, readout=kind == "head")
    if kind == "wo" and rules.ffn2_bias == "post":
        return _Rule(b_axes, 1.0 / k)
    return _Rule(b_axes, a_out)


def _growth(axis_kind: str, k: int, grow: str) -> int:
    grown = ("model", "ff", "heads" if grow == "num_heads" else "head_dim")
    return k if axis_kind in grown else 1


def _multiplier(cfg: TransformerConfig, shape: Sequence[int], rule: _Rule) -> float:
    if not rule.in_axes:
        return 1.0
    extra = qk_init_variance_factor(cfg.attn_scale, cfg.mixer_head_dim) if rule.qk else 1.0
    readout = cfg.readout_multiplier if rule.readout else 1.0
    return cfg.kernel_multiplier(int(np.prod(shape[:rule.in_axes])), extra) * readout


def _pairwise(cfg: TransformerConfig, axis_kind: str, grow: str) -> bool:
    """RoPE rotates pairs: under head_dim growth, repeat pairs rather than coordinates."""
    return axis_kind == "head_dim" and grow == "head_dim" and cfg.position == "rope"


def _repeat_axis(x, axis: int, k: int, pairwise: bool):
    if not pairwise:
        return jnp.repeat(x, k, axis=axis)
    n = x.shape[axis]
    xp = x.reshape(x.shape[:axis] + (n // 2, 2) + x.shape[axis + 1:])
    return jnp.repeat(xp, k, axis=axis).reshape(x.shape[:axis] + (n * k,) + x.shape[axis + 1:])


def _repeat(x, axes: tuple[str, ...], cfg: TransformerConfig, k: int, grow: str, repetition: str):
    """Repeat x along every grown axis (interleaved, or tiled for the regression variant)."""
    if repetition == "tile" and "heads" in axes and grow == "head_dim":
        # Tiling a fused (heads * head_dim) axis, as a naive [x, x] copy of the projection does.
        i = axes.index("heads")
        fused = x.reshape(x.shape[:i] + (x.shape[i] * x.shape[i + 1],) + x.shape[i + 2:])
        fused = jnp.concatenate([fused] * k, axis=i)
        x = fused.reshape(x.shape[:i] + (x.shape[i], x.shape[i + 1] * k) + x.shape[i + 2:])
        axes = axes[:i] + ("fixed", "fixed") + axes[i + 2:]
    for ax, kind in enumerate(axes):
        if _growth(kind, k, grow) > 1:
            if repetition == "tile":
                x = jnp.concatenate([x] * k, axis=ax)
            else:
                x = _repeat_axis(x, ax, k, _pairwise(cfg, kind, grow))
    return x


def noise_std(noise_db: float | None) -> float:
    """Relative noise std sigma = 10^(noise_db / 20) (0 for None): noise_db = -10 -> 0.316, 0 -> 1."""
    return 0.0 if noise_db is None else 10.0 ** (float(noise_db) / 20.0)


def check_symmetry(cfg: TransformerConfig, noise_db, symmetry: str, key, rules: WidenRules) -> None:
    """Raise a clear ValueError for bad symmetry-breaking arguments (before anything is computed): an unknown
    ``symmetry``, a non-numeric ``noise_db``, a missing key, tiled repetition, or a strength below the
    resolution of a low-precision compute dtype."""
    if symmetry not in SYMMETRY_METHODS:
        raise ValueError(f"symmetry must be one of {SYMMETRY_METHODS}, got {symmetry!r}")
    if noise_db is None:
        return
    if isinstance(noise_db, bool) or not isinstance(noise_db, (int, float)) or not math.isfinite(noise_db):
        raise ValueError(f"noise_db must be None (no noise) or a finite number of dB, got {noise_db!r}")
    if key is None:
        raise ValueError("noise_db needs a PRNG key: widen(..., noise_db=-10, key=jax.random.PRNGKey(0))")
    if rules.repetition != "interleave":
        raise ValueError("noise_db needs WidenRules.repetition='interleave'")
    roundoff = _UNIT_ROUNDOFF.get(cfg.dtype)
    if roundoff is not None and noise_std(noise_db) < roundoff:
        raise ValueError(f"noise_db={noise_db} is below the resolution of the compute dtype {cfg.dtype} "
                         f"({20 * math.log10(roundoff):.1f} dB): the perturbation would round away and the "
                         f"copies would stay identical; use noise_db >= {math.ceil(20 * math.log10(roundoff))}")


def _zero_sum_noise(key, shape, axis: int, k: int, pairwise: bool, dtype):
    """Unit-variance Gaussian noise whose k copies along ``axis`` (interleaved layout) sum to zero:
    z^_r = (z_r - mean_r z) sqrt(k / (k - 1)) (for k = 2 exactly +/- the same value in any dtype)."""
    n = shape[axis] // k
    split = (n // 2, k, 2) if pairwise else (n, k)
    full = shape[:axis] + split + shape[axis + 1:]
    z = jax.random.normal(key, full, jnp.float32).astype(dtype)  # centred in ``dtype``: sums to 0 to its rounding
    z = (z - jnp.mean(z, axis=axis + 1, keepdims=True)) * jnp.asarray(math.sqrt(k / (k - 1)), dtype)
    return z.reshape(shape)


def _break_symmetry(big, grown_axes, noise_db: float, symmetry: str, key, k: int, pairwise):
    """Add the function-preserving perturbation of ``symmetry`` to one widened kernel (see module doc)."""
    sigma = noise_std(noise_db) / math.sqrt(len(grown_axes))
    rms = jnp.sqrt(jnp.mean(jnp.square(big.astype(jnp.float32)))).astype(big.dtype)
    for ax in grown_axes:
        z = _zero_sum_noise(jax.random.fold_in(key, ax), big.shape, ax, k, pairwise(ax), big.dtype)
        big = big + sigma * rms * z if symmetry == "zero_sum" else big * (1 + sigma * z)
    return big


def copy_similarity(big_params, cfg: TransformerConfig, factor: int, *, grow: str = "head_dim") -> jax.Array:
    """How alike the k copies still are: the mean, over kernels with a grown input axis, of the cosine
    between each copy's rows and the copies' mean along that axis (1 = identical copies, as right after
    a noise-free ``widen``). ``cfg`` is the small model's config. Used to log how fast training drifts
    the copies apart."""
    k = _check_factor(factor)
    big_cfg = widen_config(cfg, k, grow=grow)
    vals = []
    for path, x in jax.tree_util.tree_leaves_with_path(big_params):
        rule = _rule(_path_names(path), cfg, k, grow, WidenRules())
        for ax, kind in enumerate(rule.axes[:rule.in_axes]):
            if _growth(kind, k, grow) == 1:
                continue
            pairwise = _pairwise(big_cfg, kind, grow)
            n = x.shape[ax] // k
            split = (n // 2, k, 2) if pairwise else (n, k)
            xr = jnp.moveaxis(x.astype(jnp.float32).reshape(x.shape[:ax] + split + x.shape[ax + 1:]), ax + 1, 0)
            xr = xr.reshape(k, -1)
            mean = jnp.mean(xr, axis=0)
            cos = xr @ mean / (jnp.linalg.norm(xr, axis=1) * jnp.linalg.norm(mean) + 1e-30)
            vals.append(jnp.mean(cos))
    return jnp.mean(jnp.stack(vals)) if vals else jnp.asarray(1.0)


def _path_names(path) -> Path:
    return tuple(getattr(p, "key", getattr(p, "name", str(p))) for p in path)


def _check_tree(params, cfg: TransformerConfig) -> None:
    """Raise a clear error if ``params`` is not a parameter tree of ``Transformer(cfg)``."""
    expected = jax.eval_shape(lambda key: Transformer(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"],
                              jax.random.PRNGKey(0))
    exp = {_path_names(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {_path_names(p): jnp.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    if set(exp) != set(got):
        missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
        raise ValueError(f"params do not match the config: missing {['/'.join(m) for m in missing][:5]}, "
                         f"unexpected {['/'.join(e) for e in extra][:5]}")
    for p, shape in exp.items():
        if tuple(got[p]) != tuple(shape):
            raise ValueError(f"params do not match the config: {'/'.join(p)} has shape {tuple(got[p])}, "
                             f"the config implies {tuple(shape)}")


def _map_leaves(fn: Callable, params, cfg: TransformerConfig, k: int, grow: str, rules: WidenRules):
    """Apply fn(path, leaf, rule) to every leaf of a params-shaped tree."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(_path_names(p), x, _rule(_path_names(p), cfg, k, grow, rules)), params)


def widen_params(params, cfg: TransformerConfig, factor: int, *, grow: str = "head_dim",
                 noise_db: float | None = None, symmetry: str = "zero_sum", key=None,
                 rules: WidenRules = WidenRules()):
    """The widened parameter tree (jittable; see ``widen``)."""
    k = _check_factor(factor)
    _check_grow(grow)
    check_symmetry(cfg, noise_db, symmetry, key, rules)
    _check_tree(params, cfg)
    big_cfg = widen_config(cfg, k, grow=grow, rules=rules)
    leaves = jax.tree_util.tree_leaves(params)
    keys = iter(jax.random.split(key, len(leaves)) if noise_db is not None else [None] * len(leaves))

    def one(path, x, rule):
        eff = x * jnp.asarray(_multiplier(cfg, x.shape, rule), x.dtype)
        big = _repeat(eff, rule.axes, cfg, k, grow, rules.repetition) * jnp.asarray(rule.factor, x.dtype)
        big = big / jnp.asarray(_multiplier(big_cfg, big.shape, rule), x.dtype)
        sub = next(keys)
        grown = [i for i, kind in enumerate(rule.axes[:rule.in_axes]) if _growth(kind, k, grow) > 1]
        if noise_db is not None and grown:
            big = _break_symmetry(big, grown, noise_db, symmetry, sub, k,
                                  lambda ax: _pairwise(cfg, rule.axes[ax], grow))
        return big

    return _map_leaves(one, params, cfg, k, grow, rules)


def widen(params, cfg: TransformerConfig, factor: int, *, grow: str = "head_dim", noise_db: float | None = None,
          symmetry: str = "zero_sum", key=None, rules: WidenRules = WidenRules()):
    """Widen a Transformer k-fold so it computes the same function (kexue.fm/archives/8444).

    Returns (big_params, big_cfg). ``grow`` picks what grows in attention: "head_dim" (the post) or
    "num_heads" (heads x k, head_dim fixed). ``noise_db`` (None: no noise) adds a function-preserving
    perturbation with std 10^(noise_db/20) x each kernel's RMS that breaks the symmetry of the copies, built
    by ``symmetry`` ("zero_sum" or "fan_out", see the module docstring); it needs ``key``.
    Pure and jittable in ``params``: run ``widen_params`` under ``jax.jit(..., out_shardings=...)`` to grow
    a sharded model in place (``widen_sharded``).
    """
    big_cfg = widen_config(cfg, factor, grow=grow, rules=rules)  # validates factor and grow first
    check_symmetry(cfg, noise_db, symmetry, key, rules)
    _check_tree(params, cfg)
    noise_db = None if noise_db is None else float(noise_db)
    return _jitted_widen(cfg, int(factor), grow, noise_db, symmetry, rules)(params, key), big_cfg


@functools.lru_cache(maxsize=64)
def _jitted_widen(cfg: TransformerConfig, factor: int, grow: str, noise_db, symmetry: str, rules: WidenRules):
    return jax.jit(lambda p, key: widen_params(p, cfg, factor, grow=grow, noise_db=noise_db, symmetry=symmetry,
                                               key=key, rules=rules))


def widen_sharded(params, cfg: TransformerConfig, factor: int, out_shardings, *, grow: str = "head_dim",
                  noise_db: float | None = None, symmetry: str = "zero_sum", key=None,
                  rules: WidenRules = WidenRules()):
    """``widen`` compiled with ``out_shardings`` (a pytree of shardings for the big tree, or a function
    big_cfg -> that pytree): each device computes only its shard of the big parameters, so a model
    sharded over several hosts grows without ever being gathered."""
    big_cfg = widen_config(cfg, factor, grow=grow, rules=rules)
    check_symmetry(cfg, noise_db, symmetry, key, rules)
    shardings = out_shardings(big_cfg) if callable(out_shardings) else out_shardings
    fn = jax.jit(lambda p, kk: widen_params(p, cfg, factor, grow=grow, noise_db=noise_db, symmetry=symmetry,
                                            key=kk, rules=rules), out_shardings=shardings)
    return fn(params, key), big_cfg


# ------------------------------------------------------------------------------------------------
# Optimizer state.

def _copies(rule: _Rule, k: int, grow: str) -> int:
    return int(np.prod([_growth(kind, k, grow) for kind in rule.axes]))


def update_scales(params, cfg: TransformerConfig, factor: int, *, grow: str = "head_dim",
                  rules: WidenRules = WidenRules()):
    """Per-tensor c with theta~ = c rep(theta) (stored weights): a tree of scalars shaped like params.

    Multiplying Adam's normalized update by c (``scale_updates``) makes the big model's update the exact
    widened image c rep(u) of the small model's update (see ``widen_optimizer_state``)."""
    k = _check_factor(factor)
    big_cfg = widen_config(cfg, k, grow=grow, rules=rules)

    def one(path, x, rule):
        big_shape = tuple(d * _growth(kind, k, grow) for d, kind in zip(x.shape, rule.axes))
        return jnp.asarray(rule.factor * _multiplier(cfg, x.shape, rule) / _multiplier(big_cfg, big_shape, rule),
                           x.dtype)

    return _map_leaves(one, params, cfg, k, grow, rules)


LR_TENSORS = ("all", "matrices", "hidden")
_HIDDEN_KERNELS = ("query", "key", "value", "out", "wi", "wi_gate", "wo", "mlm_dense")


def lr_multipliers(params, multiplier: float, *, tensors: str = "all"):
    """A per-tensor learning-rate multiplier tree for the widened model (``make_optimizer(lr_scales=)``).

    ``tensors`` picks where ``multiplier`` applies (1 elsewhere): "all"; "matrices" (every tensor with
    ndim >= 2: kernels and embedding tables); "hidden" (the width x width kernels of attention, the FFN and
    the MLM-head dense: the tensors whose input copies carry the symmetry, muP's "hidden" weights)."""
    if tensors not in LR_TENSORS:
        raise ValueError(f"tensors must be one of {LR_TENSORS}, got {tensors!r}")
    if not isinstance(multiplier, (int, float)) or isinstance(multiplier, bool) or not multiplier > 0:
        raise ValueError(f"multiplier must be a number > 0, got {multiplier!r}")

    def one(path, x):
        names = _path_names(path)
        pick = {"all": True, "matrices": jnp.ndim(x) >= 2,
                "hidden": names[-1] == "kernel" and len(names) > 1 and names[-2] in _HIDDEN_KERNELS}[tensors]
        return jnp.asarray(multiplier if pick else 1.0, jnp.float32)

    return jax.tree_util.tree_map_with_path(one, params)


def scale_updates(scales) -> optax.GradientTransformation:
    """Multiply each update leaf by a fixed per-tensor scale (a tree shaped like params)."""
    return optax.stateless(lambda updates, params=None: jax.tree_util.tree_map(
        lambda u, c: u * c.astype(u.dtype), updates, scales))


def widen_optimizer_state(opt_state, params, cfg: TransformerConfig, factor: int, *, grow: str = "head_dim",
                          rules: WidenRules = WidenRules()):
    """Map Adam/AdamW state (mu, nu, count) to the widened model.

    Derivation. With theta~ = c rep(theta) and copies of each entry receiving equal gradients, the
    chain rule gives g~ = rep(g) / (c m), m = number of copies of each entry (k per grown axis). Adam's
    moments are linear and quadratic in g, so mapping

        mu~ = rep(mu) / (c m),     nu~ = rep(nu) / (c m)^2,     count~ = count

    keeps them equal to the moments the big model would have accumulated on the same data, and the next
    normalized step is mu^/(sqrt(nu^) + eps) = rep(mu^/(sqrt(nu^) + eps c m)), i.e. rep(u) up to eps.
    The widened image of the small update is c rep(u): the two agree where c = 1 and, elsewhere, once the
    update is multiplied by c (``scale_updates(update_scales(...))`` placed right after the Adam scaling,
    before decoupled weight decay, which is already proportional to theta~). Gradient clipping by global
    norm changes (||g~||^2 = sum ||g||^2 / (c^2 m)), so the equality needs clipping inactive.
    """
    k = _check_factor(factor)
    _check_grow(grow)
    _check_tree(params, cfg)
    scales = update_scales(params, cfg, k, grow=grow, rules=rules)
    rules_tree = jax.tree_util.tree_map_with_path(lambda p, x: _rule(_path_names(p), cfg, k, grow, rules), params)

    def moment(tree, power):
        return jax.tree_util.tree_map(
            lambda x, c, rule: _repeat(x, rule.axes, cfg, k, grow, rules.repetition)
            / (c * _copies(rule, k, grow)) ** power,
            tree, scales, rules_tree, is_leaf=lambda r: isinstance(r, _Rule))

    return _map_adam_moments(opt_state, params, moment, "widen_optimizer_state")


def _map_adam_moments(opt_state, params, moment: Callable, who: str):
    """Replace mu and nu of every Adam state node by moment(mu, 1) and moment(nu, 2); refuse any other
    params-shaped optimizer state (it would silently keep the small model's shapes)."""
    param_struct = jax.tree_util.tree_structure(params)

    def params_shaped(x):
        return not isinstance(x, (jax.Array, np.ndarray)) and jax.tree_util.tree_structure(x) == param_struct

    def holds_params(x):  # an optimizer-state namedtuple with a params-shaped field
        return hasattr(x, "_fields") and any(params_shaped(getattr(x, f)) for f in x._fields)

    def visit(node):
        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(mu=moment(node.mu, 1), nu=moment(node.nu, 2))
        if holds_params(node) or params_shaped(node):
            raise ValueError(f"{who}: unsupported params-shaped optimizer state "
                             f"{type(node).__name__}; supported: optax Adam/AdamW (ScaleByAdamState)")
        return node

    def is_node(x):
        return isinstance(x, optax.ScaleByAdamState) or holds_params(x) or params_shaped(x)

    return jax.tree_util.tree_map(visit, opt_state, is_leaf=is_node)


# ------------------------------------------------------------------------------------------------
# Checking losslessness.

def _rep_model(x, k: int):
    return jnp.repeat(x, k, axis=-1)


def assert_lossless(small_params, small_cfg: TransformerConfig, big_params, big_cfg: TransformerConfig, batch,
                    *, atol: float = 1e-5, rtol: float = 1e-5, segment_ids=None):
    """chex-check that the widened model computes the same function as the small one on ``batch``.

    Checks (1) logits equal; (2) every hidden state h~ = s rep(h), s = ``hidden_scale`` (the embedding output, each block
    output, the final norm output and the MLM-head norm output) and the MLM-head dense output a pure
    repeat; (3) every attention probability matrix equal per head (repeated over head copies under
    grow="num_heads"). Tolerances are relative to each tensor's scale: |a - b| <= atol * max|b| + rtol |b|.
    On failure raises AssertionError naming the layer and tensor with the largest deviation.
    Returns a dict {tensor name: max abs deviation}.
    """
    k = big_cfg.d_model // small_cfg.d_model
    if k * small_cfg.d_model != big_cfg.d_model or k < 2:
        raise ValueError(f"big_cfg.d_model={big_cfg.d_model} is not an integer multiple >= 2 of "
                         f"small_cfg.d_model={small_cfg.d_model}")
    grow = "num_heads" if big_cfg.num_heads != small_cfg.num_heads else "head_dim"
    tokens = jnp.asarray(batch["inputs"] if isinstance(batch, dict) else batch)
    if segment_ids is None and isinstance(batch, dict):
        segment_ids = batch.get("segment_ids")

    def run(cfg, params):
        return _jitted_intermediates(cfg)(params, tokens, segment_ids)

    small_logits, small_aux = run(small_cfg, small_params)
    big_logits, big_aux = run(big_cfg, big_params)
    s = hidden_scale(small_cfg, k)
    # logits are unchanged; with head="none" the output is the final hidden state, s rep(h)
    want_out = s * _rep_model(small_logits, k) if small_cfg.head == "none" else small_logits
    pairs: list[tuple[str, Any, Any]] = [("logits", big_logits, want_out)]
    for i, (hb, hs) in enumerate(zip(big_aux["hidden"], small_aux["hidden"])):
        name = "embeddings" if i == 0 else f"layer_{i - 1}/output"
        pairs.append((name, hb, s * _rep_model(hs, k)))
    if "final" in small_aux:
        pairs.append(("final_norm/output", big_aux["final"], s * _rep_model(small_aux["final"], k)))
    if "mlm_hidden" in small_aux:
        pairs.append(("mlm_dense/output", big_aux["mlm_hidden"], _rep_model(small_aux["mlm_hidden"], k)))
        pairs.append(("mlm_norm/output", big_aux["mlm_normed"], s * _rep_model(small_aux["mlm_normed"], k)))
    for i, (pb, ps) in enumerate(zip(big_aux["attention"], small_aux["attention"])):
        if pb is None or ps is None:
            continue
        pairs.append((f"layer_{i}/attention_probs", pb, jnp.repeat(ps, k, axis=1) if grow == "num_heads" else ps))
    report, worst = {}, ("", 0.0, 0.0)
    for name, got, want in pairs:
        chex.assert_equal_shape([got, want])
        dev = float(jnp.max(jnp.abs(got - want)))
        bound = atol * float(jnp.max(jnp.abs(want))) + rtol * float(jnp.max(jnp.abs(want)))
        report[name] = dev
        excess = dev / bound if bound > 0 else (math.inf if dev > 0 else 0.0)
        if excess > worst[2]:
            worst = (name, dev, excess)
    if worst[2] > 1.0:
        raise AssertionError(f"not lossless: largest deviation in {worst[0]} (max |diff| = {worst[1]:.3e}, "
                             f"{worst[2]:.1f}x the tolerance atol={atol}, rtol={rtol} relative to its scale)")
    return report


@functools.lru_cache(maxsize=64)
def _jitted_intermediates(cfg: TransformerConfig):
    return jax.jit(lambda p, t, s: Transformer(cfg).apply({"params": p}, t, s, return_intermediates=True))


def rope_widening_error(head_dim: int, factor: int, distances: Sequence[int], *, base: float = 10000.0,
                        num_samples: int = 256, seed: int = 0) -> np.ndarray:
    """Mean |logit~ - logit| of one RoPE head widened by pairwise repetition (grow="head_dim"), against
    the relative distance m - n. Returns an array [len(distances)] (float64 numpy, 1/sqrt(d) scale).

    The small logit is q R_{m-n} k / sqrt(d); the widened one uses the k copies of every pair, where copy
    r of pair i rotates at theta_i base^{-2r/(k d)}, so the error is 0 at distance 0 and grows with it.
    """
    k = _check_factor(factor)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((num_samples, head_dim))
    kk = rng.standard_normal((num_samples, head_dim))

    def logit(qv, kv, d, dist):
        theta = base ** (-np.arange(0, d, 2) / d)
        qc = qv[:, 0::2] + 1j * qv[:, 1::2]
        kc = kv[:, 0::2] + 1j * kv[:, 1::2]
        return np.real(np.sum(qc * np.conj(kc) * np.exp(1j * dist * theta), axis=-1)) / math.sqrt(d)

    def widen_pairs(v):
        pairs = v.reshape(v.shape[0], head_dim // 2, 2)
        return np.repeat(pairs, k, axis=1).reshape(v.shape[0], head_dim * k) / math.sqrt(k)

    c = math.sqrt(k) * k ** -0.25  # q~ = k^{-1/4} rep(q) under the 1/sqrt(d) scale
    qb, kb = widen_pairs(q) * c, widen_pairs(kk) * c
    return np.array([np.mean(np.abs(logit(qb, kb, head_dim * k, d) - logit(q, kk, head_dim, d)))
                     for d in distances])


# ------------------------------------------------------------------------------------------------
# Depth.

def deepen(params, cfg: TransformerConfig, insert_after: Sequence[int]):
    """Insert exactly-identity layers (beyond the post). Returns (params, cfg).

    ``insert_after``: indices of existing layers after which a new layer is inserted (-1: before the
    first). The new layer copies its neighbour's weights (G_stack-style) with the residual branch outputs
    (attention ``out`` and FFN ``wo``, kernel and bias) set to zero, so F(x) = 0 and the block
    x + F(Norm x) (Pre-Norm) or x + alpha F(x) (alpha residual) is the identity. Post-Norm blocks
    Norm(x + F(x)) are Norm(x), not the identity, so ``residual`` "post" and "alpha_post" raise.
    """
    if cfg.residual in ("rezero", "deepnorm"):
        raise ValueError(f"deepen: residual={cfg.residual!r} is not supported (DeepNorm's constants depend on "
                         f"the depth N, and ReZero's scalars are not mapped); use residual 'pre' or 'alpha'")
    if cfg.residual in ("post", "alpha_post"):
        raise ValueError(f"deepen: residual={cfg.residual!r} cannot host an identity layer: the block is "
                         f"Norm(x + F(x)), which is Norm(x) != x even when F = 0; use residual 'pre' or 'alpha'")
    idx = sorted(int(i) for i in insert_after)
    if any(i < -1 or i >= cfg.num_layers for i in idx):
        raise ValueError(f"insert_after entries must be in [-1, {cfg.num_layers - 1}], got {list(insert_after)}")
    _check_tree(params, cfg)
    old = [params[f"layer_{i}"] for i in range(cfg.num_layers)]
    kinds = list(cfg.masks_per_layer)

    def identity_copy(layer):
        out = jax.tree_util.tree_map(lambda x: x, layer)
        out["attn"] = dict(out["attn"])
        out["attn"]["out"] = jax.tree_util.tree_map(jnp.zeros_like, layer["attn"]["out"])
        out["ffn"] = dict(out["ffn"])
        out["ffn"]["wo"] = jax.tree_util.tree_map(jnp.zeros_like, layer["ffn"]["wo"])
        return out

    layers, new_kinds = [], []
    for j in idx:
        if j == -1:
            layers.append(identity_copy(old[0]))
            new_kinds.append(kinds[0])
    for i in range(cfg.num_layers):
        layers.append(old[i])
        new_kinds.append(kinds[i])
        for _ in range(idx.count(i)):
            layers.append(identity_copy(old[i]))
            new_kinds.append(kinds[i])
    new_params = {key: v for key, v in params.items() if not key.startswith("layer_")}
    new_params.update({f"layer_{i}": layer for i, layer in enumerate(layers)})
    new_cfg = cfg.replace(num_layers=len(layers), layer_masks=tuple(new_kinds) if cfg.layer_masks else ())
    return new_params, new_cfg


def deepen_optimizer_state(opt_state, params, cfg: TransformerConfig, insert_after: Sequence[int]):
    """Map Adam/AdamW state to the model ``deepen(params, cfg, insert_after)`` builds: each new layer's
    moments are its neighbour's, with zeros for the zeroed residual outputs (as MSG keeps and copies the
    optimizer state when it grows); the step count is kept."""
    return _map_adam_moments(opt_state, params, lambda tree, power: deepen(tree, cfg, insert_after)[0],
                             "deepen_optimizer_state")


def depth_insertions(num_layers: int, depth_factor: int) -> list[int]:
    """``insert_after`` for growing depth by an integer factor: depth_factor - 1 identity layers after
    every existing layer (L -> depth_factor x L, each copy next to its source, G_stack's interleaving)."""
    if isinstance(depth_factor, bool) or not isinstance(depth_factor, int) or depth_factor < 1:
        raise ValueError(f"depth_factor must be an integer >= 1, got {depth_factor!r}")
    return [i for i in range(num_layers) for _ in range(depth_factor - 1)]
