"""TransformerConfig and Transformer: BERT-, GPT- and T5-style models as one configurable module.

Posts: init/parameterization/normalization (kexue.fm/archives/8620), masks (6933, 8475), upscaling
layout (8444). Every option is a field of the frozen, validated ``TransformerConfig``; presets are
``TransformerConfig.preset("bert"|"gpt"|"t5", **overrides)``.

Parameter tree (plain nested dict; the upscaling maps of ``kexue_jax.upscale`` act on it):

    embed/{token [V, D], position [max_len, D]?, segment [T, D]?}
    embed_norm/{scale, bias?}?                       (BERT's embedding LayerNorm)
    layer_{i}/attn/{query,key,value}/{kernel [D, H, Dh], bias [H, Dh]?}
    layer_{i}/attn/out/{kernel [H, Dh, D], bias [D]?}
    layer_{i}/attn/rel_bias [buckets, H]?            (T5 relative position bias)
    layer_{i}/mixer/...                              (other token_mixer values: kexue_jax.nn.mixers, 8431)
    layer_{i}/{attn_norm, ffn_norm}/{scale, bias?}   (not with residual="alpha" or "rezero")
    layer_{i}/rezero_alpha []                        (residual="rezero": trainable, 0 at init)
    layer_{i}/ffn/{wi, wi_gate?}/{kernel [D, F], bias [F]?};  layer_{i}/ffn/wo/{kernel [F, D], bias [D]?}
    final_norm/{scale, bias?}?                       (Pre-Norm, alpha and rezero residuals)
    mlm_dense/{kernel [D, D], bias [D]?}, mlm_norm/{scale, bias?}   (BERT MLM head)
    head/kernel [D, V]?                              (untied output layer)
    output_bias [V]?                                 (MLM head vocab bias)

``Transformer(cfg).apply({"params": p}, tokens, segment_ids=None, ...)`` returns logits [B, L, V]
(the final hidden states [B, L, D] with ``head="none"``);
with ``return_intermediates=True`` it returns (logits, aux) where aux holds the hidden state entering
the first block and after every block, the final-norm output, the MLM-head hidden states and each
layer's attention probabilities (what the lossless-upscaling check compares).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from kexue_jax.nn import init as initializers
from kexue_jax.nn import masks as masks_lib
from kexue_jax.nn.activations import ACTIVATIONS, HOMOGENEOUS_ACTIVATIONS  # noqa: F401 (re-exported)
from kexue_jax.nn.attention import ATTN_SCALES, IMPLEMENTATIONS, Dense
from kexue_jax.nn import mixers as mixers_lib
from kexue_jax.nn.norms import (NORM_FREE_RESIDUALS, NORMS, RESIDUALS, deepnorm_alpha, deepnorm_beta, make_norm,
                                 residual)

FFNS = ("plain", "gated")
POSITIONS = ("learned", "rope", "relative", "none")
HEADS = ("lm", "mlm", "none")
PARAMETERIZATIONS = ("standard", "ntk", "mup")
#: token mixers with a width x fixed-size kernel other than the readout (an "output-like" tensor that muP would
#: give a 1/m forward multiplier of its own): not supported under parameterization="mup".
MUP_UNSUPPORTED_MIXERS = mixers_lib.mixer_names(mup=False)
#: every token mixer: the keys of the registry (kexue.fm/archives/8431, nn/mixers.py)
TOKEN_MIXERS = tuple(mixers_lib.REGISTRY)
MixerOptions = mixers_lib.MixerOptions
DTYPES = ("float32", "bfloat16", "float16", "float64")

_PRESETS: dict[str, dict[str, Any]] = {
    "bert": dict(position="learned", type_vocab_size=2, embed_norm=True, residual="post", activation="gelu",
                 ffn="plain", use_bias=True, head="mlm", tie_embeddings=True, attn_scale="sqrt",
                 mask="bidirectional", norm="layernorm", norm_eps=1e-12, init_std=0.02),
    "gpt": dict(position="learned", type_vocab_size=0, embed_norm=False, residual="pre", activation="gelu",
                ffn="plain", use_bias=True, head="lm", tie_embeddings=True, attn_scale="sqrt", mask="causal",
                norm="layernorm", norm_eps=1e-5, init_std=0.02),
    "t5": dict(position="relative", type_vocab_size=0, embed_norm=False, residual="pre", activation="relu",
               ffn="plain", use_bias=False, head="lm", tie_embeddings=False, attn_scale="t5", mask="causal",
               norm="rmsnorm", norm_eps=1e-6, init_std=None),
}


def _fail(field: str, allowed: str, got: Any) -> None:
    raise ValueError(f"TransformerConfig.{field} must be {allowed}, got {got!r}")


def _moved(names) -> str:
    """The hint for former fields that are options of the token mixers now ('' for none)."""
    moved = sorted(set(names) & set(mixers_lib.OPTION_NAMES))
    if not moved:
        return ""
    return (f" ({', '.join(moved)} moved into mixer_options: e.g. mixer_options=MixerOptions({moved[0]}=...), "
            f"or --config.model.mixer_options.{moved[0]}=...)")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """All options of the model; validated at construction (errors name the field and allowed values).

    ``TransformerConfig()`` is a small valid GPT-like model. See ``preset`` for BERT/GPT/T5.
    """

    vocab_size: int = 260
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    head_dim: int = 16
    d_ff: int = 256
    max_len: int = 128
    type_vocab_size: int = 0          # > 0 adds segment embeddings (BERT: 2)
    position: str = "learned"         # learned | rope | relative (T5 buckets) | none
    rope_base: float = 10000.0
    rel_buckets: int = 32
    rel_max_distance: int = 128
    embed_norm: bool = False          # LayerNorm after the embeddings (BERT)
    norm: str = "layernorm"           # layernorm | rmsnorm
    norm_eps: float = 1e-5
    head_norm_eps: float | None = None  # eps of the MLM-head norm (None: norm_eps)
    residual: str = "pre"             # post | pre | alpha | alpha_post | rezero | deepnorm
    final_norm: bool | None = None    # None: True for pre/alpha, False for post/alpha_post
    activation: str = "gelu"
    ffn: str = "plain"                # plain | gated (act(x W_gate) * (x W_in))
    use_bias: bool = True
    attn_scale: str = "sqrt"          # sqrt (1/sqrt(d)) | t5 (none; q/k init var / sqrt(d)) | mup (1/d) | none
    mask: str = "causal"              # causal | bidirectional | unilm | uniae | independent
    layer_masks: tuple[str, ...] = ()  # per-layer override of ``mask`` (UniVAE: independent then uniae)
    token_mixer: str = "attention"    # attention | linear (kexue.fm/archives/8610) | the mixers of 8431
    linear_head_multiplier: int = 1   # head size r * head_dim for linear attention
    # options of the non-attention mixers (kexue.fm/archives/8431, kexue_jax/nn/mixers.py); a dict of some of
    # its fields is read as MixerOptions(**dict)
    mixer_options: MixerOptions = MixerOptions()
    head: str = "lm"                  # lm (h E^T or h W) | mlm (dense + act + norm + E^T + bias) | none (h)
    tie_embeddings: bool = True
    init_std: float | None = 0.02     # None: second-moment (LeCun) init, embeddings N(0, 1/D)
    parameterization: str = "standard"  # standard | ntk (W ~ N(0,1), forward x 1/sqrt(fan_in)) | mup (nn/init.py)
    mup_base_d_model: int | None = None  # muP base width: multiplier m = d_model / mup_base_d_model (None: m = 1)
    dropout_rate: float = 0.0
    dtype: str = "float32"            # compute dtype
    param_dtype: str = "float32"
    attention_impl: str = "auto"      # auto | einsum | xla | cudnn

    def __post_init__(self):
        # a dict (to_dict, a config section) -> MixerOptions; errors name TransformerConfig.mixer_options.<field>
        object.__setattr__(self, "mixer_options", MixerOptions.of(self.mixer_options))
        for name in ("dtype", "param_dtype"):  # jnp.bfloat16 / np.dtype as in flax; stored as the name
            value = getattr(self, name)
            if not isinstance(value, str):
                try:
                    object.__setattr__(self, name, jnp.dtype(value).name)
                except TypeError:
                    _fail(name, f"one of {DTYPES} (a name or a jnp/numpy dtype)", value)
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "d_ff", "max_len",
                     "rel_buckets", "rel_max_distance", "linear_head_multiplier"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, "a positive integer", value)
        if (not isinstance(self.type_vocab_size, int) or isinstance(self.type_vocab_size, bool)
                or self.type_vocab_size < 0):
            _fail("type_vocab_size", "an integer >= 0", self.type_vocab_size)
        choices = dict(position=POSITIONS, norm=NORMS, residual=RESIDUALS, activation=tuple(ACTIVATIONS),
                       ffn=FFNS, attn_scale=ATTN_SCALES, mask=masks_lib.MASKS, token_mixer=TOKEN_MIXERS,
                       head=HEADS, parameterization=PARAMETERIZATIONS, dtype=DTYPES, param_dtype=DTYPES,
                       attention_impl=IMPLEMENTATIONS)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                _fail(name, f"one of {allowed}", getattr(self, name))
        if not isinstance(self.layer_masks, tuple):
            object.__setattr__(self, "layer_masks", tuple(self.layer_masks))
        if self.layer_masks:
            if len(self.layer_masks) != self.num_layers:
                _fail("layer_masks", f"empty or of length num_layers={self.num_layers}", self.layer_masks)
            for m in self.layer_masks:
                if m not in masks_lib.MASKS:
                    _fail("layer_masks", f"a tuple of {masks_lib.MASKS}", self.layer_masks)
        for name in ("norm_eps", "rope_base"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                _fail(name, "a number > 0", getattr(self, name))
        if self.head_norm_eps is not None and not (isinstance(self.head_norm_eps, (int, float))
                                                   and self.head_norm_eps > 0):
            _fail("head_norm_eps", "None or a number > 0", self.head_norm_eps)
        for name in ("embed_norm", "use_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "True or False", getattr(self, name))
        if self.final_norm is not None and not isinstance(self.final_norm, bool):
            _fail("final_norm", "None (automatic), True or False", self.final_norm)
        if self.init_std is not None and not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            _fail("init_std", "None (second-moment init) or a number > 0", self.init_std)
        if not (isinstance(self.dropout_rate, (int, float)) and 0.0 <= self.dropout_rate < 1.0):
            _fail("dropout_rate", "a number in [0, 1)", self.dropout_rate)
        if self.position == "rope" and self.head_dim % 2:
            _fail("head_dim", "even when position='rope'", self.head_dim)
        if self.head == "mlm" and not self.tie_embeddings:
            _fail("tie_embeddings", "True with head='mlm' (the MLM head reads the token embedding)",
                  self.tie_embeddings)
        mixers_lib.validate_config(self, _fail)
        self._validate_mup()

    def _validate_mup(self) -> None:
        """muP's cross-field rules (Tensor Programs V, Table 3; see ``kexue_jax.nn.init`` "muP")."""
        if self.parameterization != "mup":
            if self.mup_base_d_model is not None:
                _fail("mup_base_d_model", "None unless parameterization='mup'", self.mup_base_d_model)
            return
        base = self.mup_base_d_model
        if base is not None and (not isinstance(base, int) or isinstance(base, bool) or base < 1):
            _fail("mup_base_d_model", "None (= d_model, m = 1) or a positive integer", base)
        if self.attn_scale != "mup":
            _fail("attn_scale", "'mup' (logits q.k / d_head) with parameterization='mup' (muP's attention scale; "
                  "TransformerConfig.preset sets it when parameterization='mup' is given)", self.attn_scale)
        if self.token_mixer in MUP_UNSUPPORTED_MIXERS:
            _fail("token_mixer", f"not one of {MUP_UNSUPPORTED_MIXERS} with parameterization='mup' (their "
                  f"width x fixed-size kernels have no muP multiplier here)", self.token_mixer)
        if self.token_mixer == "conv" and self.mixer_options.conv_kind == "dynamic":
            _fail("mixer_options.conv_kind", "'lightweight' with parameterization='mup' (the dynamic kernel "
                  "[D, H, K] is output-like and has no muP multiplier here)", self.mixer_options.conv_kind)

    # -- presets ------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "TransformerConfig":
        """BERT (Post-LN, MLM head), GPT (Pre-LN, tied LM head) or T5 (RMSNorm, no biases, T5 scale).

        ``overrides`` are any fields; e.g. ``preset("t5", ffn="gated", activation="gelu")``.
        """
        if name not in _PRESETS:
            raise ValueError(f"preset must be one of {tuple(_PRESETS)}, got {name!r}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TransformerConfig field(s) {sorted(unknown)}{_moved(unknown)}; fields are "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        preset = dict(_PRESETS[name])
        if overrides.get("parameterization") == "mup":  # muP's 1/d attention, unless the caller chose one
            preset["attn_scale"] = "mup"
        return cls(**{**preset, **overrides})

    def replace(self, **changes) -> "TransformerConfig":
        """A copy with ``changes``; ``mixer_options`` may be a dict of some options, which replace this config's
        (``cfg.replace(mixer_options={"mixer_copies": 2})`` keeps the other options)."""
        moved = set(changes) & set(mixers_lib.OPTION_NAMES)
        if moved:
            raise TypeError(f"TransformerConfig.replace: no field(s) {sorted(moved)}{_moved(moved)}")
        if "mixer_options" in changes and not isinstance(changes["mixer_options"], MixerOptions):
            options = changes["mixer_options"]
            if hasattr(options, "keys"):
                options = MixerOptions.of({**dataclasses.asdict(self.mixer_options), **options})
            changes["mixer_options"] = options
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- derived ------------------------------------------------------------------------------
    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def param_jnp_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def has_final_norm(self) -> bool:
        return self.residual in ("pre",) + NORM_FREE_RESIDUALS if self.final_norm is None else self.final_norm

    @property
    def branch_init_gain(self) -> float:
        """Init gain of the value, attention-output and FFN kernels: DeepNorm's (8N)^{-1/4} with
        residual="deepnorm" (DeepNet, arXiv:2203.00555), else 1."""
        return deepnorm_beta(self.num_layers) if self.residual == "deepnorm" else 1.0

    @property
    def masks_per_layer(self) -> tuple[str, ...]:
        return self.layer_masks or (self.mask,) * self.num_layers

    @property
    def mixer_spec(self) -> mixers_lib.MixerSpec:
        """The registry entry of ``token_mixer`` (``kexue_jax.nn.mixers.REGISTRY``, kexue.fm/archives/8431)."""
        return mixers_lib.mixer_spec(self.token_mixer)

    @property
    def mixer_head_dim(self) -> int:
        """Head size of the token mixer: head_dim, times linear_head_multiplier for linear attention."""
        return self.head_dim * (self.linear_head_multiplier if self.mixer_spec.head_multiplier else 1)

    @property
    def width_mult(self) -> float:
        """muP's width multiplier m = d_model / mup_base_d_model (1 when the base is None or not muP)."""
        if self.parameterization != "mup" or self.mup_base_d_model is None:
            return 1.0
        return self.d_model / self.mup_base_d_model

    @property
    def readout_multiplier(self) -> float:
        """Forward multiplier of the logits: 1/m under muP (microsoft/mup's MuReadout / MuSharedReadout for a
        tied embedding), else 1."""
        return 1.0 / self.width_mult

    def kernel_init(self, in_axes: int = 1, extra: float = 1.0, *, readout: bool = False):
        """Initializer of a dense kernel: N(0,1) under NTK, else truncated normal with std
        init_std * sqrt(extra), or second-moment (LeCun) init with variance extra/fan_in.

        Under muP a hidden kernel (``readout=False``) has variance proportional to 1/fan_in: init_std^2 extra / m
        (the standard init at the base width), or extra / fan_in; the readout keeps the base width's variance,
        init_std^2 extra, or extra m / fan_in = extra / base_fan_in (microsoft/mup rescales MuReadout so)."""
        if self.parameterization == "ntk":
            return initializers.normal(1.0)
        m = self.width_mult
        if self.init_std is None:
            return initializers.second_moment(1.0, "truncated_normal", in_axes, extra=extra * (m if readout else 1.0))
        return initializers.truncated_normal(self.init_std * math.sqrt(extra / (1.0 if readout else m)))

    def kernel_multiplier(self, fan_in: int, extra: float = 1.0) -> float:
        """Forward multiplier of a dense kernel: sqrt(extra / fan_in) under NTK, else 1."""
        return math.sqrt(extra / fan_in) if self.parameterization == "ntk" else 1.0

    def embed_init(self):
        """Embedding init: truncated normal with init_std, or N(0, 1/d_model) when init_std is None
        (N(0, 1/mup_base_d_model) under muP: input weights keep their base-width init)."""
        if self.init_std is None:
            return initializers.normal(1.0 / math.sqrt(self.d_model / self.width_mult))
        return initializers.truncated_normal(self.init_std)


def _dropout(cfg: TransformerConfig, x, deterministic: bool):
    if cfg.dropout_rate == 0.0 or deterministic:
        return x
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=False)


class FeedForward(nn.Module):
    """FFN: act(x W_i + b_i) W_o + b_o, or gated act(x W_gate) * (x W_i) W_o (T5.1.1 / GLU)."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg

        gain2 = cfg.branch_init_gain ** 2  # DeepNorm's beta^2 on the init variance (1 otherwise)

        def dense(name, features, fan_in):
            return Dense((features,), use_bias=cfg.use_bias, kernel_init=cfg.kernel_init(extra=gain2),
                         multiplier=cfg.kernel_multiplier(fan_in, gain2), dtype=cfg.compute_dtype,
                         param_dtype=cfg.param_jnp_dtype, name=name)

        act = ACTIVATIONS[cfg.activation]
        if cfg.ffn == "gated":
            h = act(dense("wi_gate", cfg.d_ff, cfg.d_model)(x)) * dense("wi", cfg.d_ff, cfg.d_model)(x)
        else:
            h = act(dense("wi", cfg.d_ff, cfg.d_model)(x))
        return dense("wo", cfg.d_model, cfg.d_ff)(h)


class Block(nn.Module):
    """One Transformer layer: token mixer and FFN sub-layers, each wired by ``cfg.residual``."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, *, mask, positions, deterministic=True, alpha=1.0, return_probs=False,
                 cache_index=None):
        cfg = self.cfg
        wants_norm = cfg.residual not in NORM_FREE_RESIDUALS

        def norm(name):
            return make_norm(cfg.norm, cfg.norm_eps, cfg.use_bias, cfg.compute_dtype, cfg.param_jnp_dtype,
                             name) if wants_norm else None

        if cfg.residual == "rezero":  # ReZero/SkipInit: one trainable scalar per block, 0 at init
            alpha = self.param("rezero_alpha", nn.initializers.zeros, (), cfg.param_jnp_dtype)
        elif cfg.residual == "deepnorm":  # the skip multiplier (2N)^{1/4}; the ramp alpha is not used
            alpha = deepnorm_alpha(cfg.num_layers)
        spec = cfg.mixer_spec  # MultiHeadAttention ("attn") or TokenMixer ("mixer"), kexue.fm/archives/8431
        mixer = spec.module(cfg, name=spec.scope)

        def mix(y):
            out, probs = mixer(y, mask=mask, positions=positions, deterministic=deterministic,
                               return_probs=return_probs, cache_index=cache_index)
            return _dropout(cfg, out, deterministic), probs

        # ResMLP: the Aff affines inside the mixer take the place of the norm (kexue.fm/archives/8431)
        mix_norm = (lambda y: y) if spec.replaces_norm else norm("attn_norm")
        x, probs = residual(cfg.residual, x, mix, mix_norm, alpha)
        ffn = FeedForward(cfg, name="ffn")
        x, _ = residual(cfg.residual, x, lambda y: (_dropout(cfg, ffn(y), deterministic), None),
                        norm("ffn_norm"), alpha)
        return x, probs


class Transformer(nn.Module):
    """The configurable Transformer (see module docstring for the parameter tree)."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens, segment_ids=None, *, positions=None, document_ids=None, valid=None,
                 deterministic: bool = True, alpha=1.0, inject: Mapping[int, Any] | None = None,
                 return_intermediates: bool = False, cache_index=None):
        """tokens int [B, L] -> logits [B, L, vocab] (and aux with ``return_intermediates``).

        segment_ids: [B, L] (0 = source, 1 = target; default zeros), used by the masks and the segment
          embedding. positions: [B, L] (default arange). document_ids: packed-document ids (masks
          become block-diagonal). valid: bool [B, L] key-padding mask. alpha: the alpha-residual scale
          (``norms.alpha_schedule(step, T)``). inject: {layer: [B, d_model]} overwrites position 0 of
          the hidden state entering that layer (UniVAE latents, kexue.fm/archives/8475); a value may be
          a function of the current position-0 state [B, d_model] (UniVAE's hierarchical encoder).
          cache_index: incremental decoding (apply with {'cache': init_cache(...)} and mutable=['cache']):
          the tokens fill cache slots [cache_index, cache_index + L) and attend to every slot written so
          far, masked by ``cfg``'s masks over the cached segment ids (positions default to the slots).
        """
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, length], got {tokens.shape}")
        b, n = tokens.shape
        if cfg.position == "learned" and n > cfg.max_len:
            raise ValueError(f"sequence length {n} exceeds TransformerConfig.max_len={cfg.max_len}")
        if inject is not None and any(not (isinstance(i, int) and 0 <= i < cfg.num_layers) for i in inject):
            raise ValueError(f"inject keys must be layer indices in [0, {cfg.num_layers}), got {sorted(inject)}")
        if segment_ids is None:
            segment_ids = jnp.zeros((b, n), jnp.int32)
        default_positions = positions is None
        mask_segments = segment_ids  # with a KV cache: the segment ids of every cached slot
        if cache_index is not None:
            mask_segments, positions, default_positions = _cached_segments(self, cfg, segment_ids, positions,
                                                                           cache_index, document_ids, valid)
        if default_positions:
            positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        dt = cfg.compute_dtype

        token_table = self.param("embed", lambda k: _embed_params(k, cfg))
        x = jnp.take(token_table["token"], tokens, axis=0).astype(dt)
        if cfg.position == "learned":
            if default_positions:  # a slice: its gradient is a sum over the batch, not a scatter-add
                x = x + token_table["position"][:n].astype(dt)[None]
            else:
                x = x + jnp.take(token_table["position"], positions, axis=0).astype(dt)
        if cfg.type_vocab_size:
            x = x + jnp.take(token_table["segment"], segment_ids, axis=0).astype(dt)
        if cfg.embed_norm:
            x = make_norm(cfg.norm, cfg.norm_eps, cfg.use_bias, dt, cfg.param_jnp_dtype, "embed_norm")(x)
        x = _dropout(cfg, x, deterministic)

        padding = None if valid is None else masks_lib.padding(valid)
        built: dict[str, jax.Array] = {}
        dense_mask = cfg.mixer_spec.dense_mask  # else the mixer takes the kind and key validity (_MixerMask)

        def mask_for(kind):
            if not dense_mask:
                return kind
            if kind not in built:
                built[kind] = masks_lib.and_(masks_lib.make(kind, mask_segments, document_ids), padding)
                if cache_index is not None:  # rows of this call's queries, keys = the slots written so far
                    rows = jax.lax.dynamic_slice_in_dim(built[kind], cache_index, n, axis=2)
                    built[kind] = rows & (jnp.arange(mask_segments.shape[1]) < cache_index + n)
            return built[kind]

        hidden, probs_all = [], []
        for i, kind in enumerate(cfg.masks_per_layer):
            if inject is not None and i in inject:
                new = inject[i](x[:, 0]) if callable(inject[i]) else inject[i]  # callable: h_l[:, 0] -> new
                x = x.at[:, 0].set(jnp.asarray(new, dt))
            hidden.append(x)
            x, probs = Block(cfg, name=f"layer_{i}")(
                x, mask=mask_for(kind) if dense_mask else _MixerMask(mask_for(kind), valid),
                positions=positions, deterministic=deterministic, alpha=alpha,
                return_probs=return_intermediates, cache_index=cache_index)
            probs_all.append(probs)
        hidden.append(x)
        aux: dict[str, Any] = {"hidden": hidden, "attention": probs_all}
        if cfg.has_final_norm:
            x = make_norm(cfg.norm, cfg.norm_eps, cfg.use_bias, dt, cfg.param_jnp_dtype, "final_norm")(x)
            aux["final"] = x
        logits = _output_head(self, cfg, x, token_table["token"], aux)
        return (logits, aux) if return_intermediates else logits


def init_cache(cfg: TransformerConfig, batch_size: int, length: int) -> dict:
    """An empty KV cache of ``length`` slots: {layer_i: {attn: {cached_key, cached_value [B, N, H, Dh]}},
    segment_ids [B, N]}.

    Use: ``logits, v = Transformer(cfg).apply({"params": p, "cache": cache}, tokens, seg,
    cache_index=i, mutable=["cache"])``; then ``cache = v["cache"]``. Prefill with many tokens at
    cache_index=0, then feed one token per step (kexue.fm/archives/8475: UniVAE decoding)."""
    kv = jnp.zeros((batch_size, length, cfg.num_heads, cfg.mixer_head_dim), cfg.compute_dtype)
    cache = {f"layer_{i}": {"attn": {"cached_key": kv, "cached_value": kv}} for i in range(cfg.num_layers)}
    cache["segment_ids"] = jnp.zeros((batch_size, length), jnp.int32)
    return cache


def _cached_segments(module: nn.Module, cfg: TransformerConfig, segment_ids, positions, cache_index,
                     document_ids, valid):
    """Write this call's segment ids into the cache; return (all cached segment ids, positions, default?)."""
    if not cfg.mixer_spec.kv_cache or cfg.position == "relative":
        raise ValueError(f"cache_index (KV-cache decoding) needs TransformerConfig.token_mixer in "
                         f"{mixers_lib.mixer_names(kv_cache=True)} and position in ('learned', 'rope', 'none'), "
                         f"got {cfg.token_mixer!r} / {cfg.position!r}")
    if document_ids is not None or valid is not None:
        raise ValueError("cache_index does not take document_ids or valid (masked slots are never written)")
    if not module.has_variable("cache", "segment_ids"):
        raise ValueError("cache_index needs {'cache': init_cache(cfg, batch, length)} and mutable=['cache']")
    seg = module.variable("cache", "segment_ids", None)
    seg.value = jax.lax.dynamic_update_slice_in_dim(seg.value, segment_ids.astype(jnp.int32), cache_index, axis=1)
    if positions is None:
        b, n = segment_ids.shape
        positions = jnp.broadcast_to(cache_index + jnp.arange(n, dtype=jnp.int32), (b, n))
    return seg.value, positions, False


@dataclasses.dataclass(frozen=True)
class _MixerMask:
    """What a linear-attention mixer receives instead of a dense mask: the kind and key validity."""

    kind: str
    valid: Any


def _embed_params(key, cfg: TransformerConfig) -> dict:
    keys = jax.random.split(key, 3)
    init = cfg.embed_init()
    pdt = cfg.param_jnp_dtype
    out = {"token": init(keys[0], (cfg.vocab_size, cfg.d_model), pdt)}
    if cfg.position == "learned":
        out["position"] = init(keys[1], (cfg.max_len, cfg.d_model), pdt)
    if cfg.type_vocab_size:
        out["segment"] = init(keys[2], (cfg.type_vocab_size, cfg.d_model), pdt)
    return out


def _output_head(module: nn.Module, cfg: TransformerConfig, x, token_table, aux: dict):
    """Logits: [MLM dense + act + norm], then h E^T (tied) or h W (untied), [+ vocab bias].
    With head="none" the final hidden states [B, L, d_model] are returned (encoders, sentence embeddings)."""
    dt = cfg.compute_dtype
    if cfg.head == "none":
        return x
    if cfg.head == "mlm":
        dense = Dense((cfg.d_model,), use_bias=cfg.use_bias, kernel_init=cfg.kernel_init(),
                      multiplier=cfg.kernel_multiplier(cfg.d_model), dtype=dt,
                      param_dtype=cfg.param_jnp_dtype, name="mlm_dense")
        x = ACTIVATIONS[cfg.activation](dense(x))
        aux["mlm_hidden"] = x
        eps = cfg.norm_eps if cfg.head_norm_eps is None else cfg.head_norm_eps
        x = make_norm(cfg.norm, eps, cfg.use_bias, dt, cfg.param_jnp_dtype, "mlm_norm")(x)
        aux["mlm_normed"] = x
    if cfg.tie_embeddings:
        logits = jnp.einsum("bld,vd->blv", x, token_table.astype(dt))
        if cfg.readout_multiplier != 1.0:  # muP: MuSharedReadout's 1/m
            logits = logits * jnp.asarray(cfg.readout_multiplier, dt)
    else:
        logits = Dense((cfg.vocab_size,), use_bias=False, kernel_init=cfg.kernel_init(readout=True),
                       multiplier=cfg.kernel_multiplier(cfg.d_model) * cfg.readout_multiplier, dtype=dt,
                       param_dtype=cfg.param_jnp_dtype, name="head")(x)
    if cfg.head == "mlm":
        logits = logits + module.param("output_bias", nn.initializers.zeros, (cfg.vocab_size,),
                                       cfg.param_jnp_dtype).astype(dt)
    return logits
