"""Multiplication counts of a Transformer, the crossover lengths, and linear attention (kexue.fm/archives/8610).

Post 8610 ("Linear Transformer should not be the model you are waiting for") counts multiplications: an
(a x b)(b x c) matmul costs abc; softmax, norms, residuals, biases, activations and embeddings are ignored.
With n = length, h = heads, d = head size, hd = hidden size, one BERT layer costs

    Q, K, V, O projections       4 n (hd)^2
    scores QK^T + weighted sum   2 n^2 hd
    FFN (inner 4hd)              8 n (hd)^2          -> layer total 12 n (hd)^2 + 2 n^2 hd,

so self-attention exceeds the FFN only for n > 2hd (BERT-base: 1536) and the n^2 term dominates the layer only
for n > 6hd (4608).  Linear attention phi(Q)(phi(K)^T V) costs 2 n d^2 per head; with the ~4x wider head it needs
to match quality it costs 2 n (4d)^2 and breaks even with standard attention only for n > 16 d (1024).

Generalised here to any d_model, d_ff, plain (2 matrices) or gated (3 matrices) FFNs, linear attention with
head size r d (`linear_head_multiplier`, which widens the q, k, v heads and so the projections too), the causal
chunked linear attention of `kexue_jax.nn.linear_attention`, and the MLM / LM output head.  Real FLOPs are 2 per
multiply-add; `training_flops` = 2 x 3 x multiplications (forward + backward).  `count_matmul_mults` measures the
same quantity from a traced function's jaxpr, and the tests compare both with XLA's `cost_analysis()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import sys
from typing import Any, Callable

FFN_MATRICES = {"plain": 2, "gated": 3}
#: the options of TransformerConfig.mixer_options that the counts read, with the defaults of kexue_jax.nn.mixers'
#: MixerOptions (mirrored, not imported: no jax here)
MIXER_DEFAULTS = {"token_mlp_dim": None, "external_slots": 64, "conv_kind": "lightweight", "conv_kernel_size": 7,
                  "tiny_attention_dim": 64}
HEADS = ("lm", "mlm", "none")
DEFAULT_LINEAR_CHUNK_SIZE = 64  # = kexue_jax.nn.linear_attention.DEFAULT_CHUNK_SIZE (not imported: no jax here)


def _pos_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Per-part multiplication counts (one sequence of length n).
# ---------------------------------------------------------------------------------------------------------------

def projection_mults(n: int, d_model: int, num_heads: int, head_dim: int) -> dict[str, int]:
    """Q, K, V and output projections: 3 n D (h d) + n (h d) D = 4 n (hd)^2 when D = hd (kexue.fm/archives/8610)."""
    n, d_model, num_heads, head_dim = (_pos_int(k, v) for k, v in
                                       (("n", n), ("d_model", d_model), ("num_heads", num_heads),
                                        ("head_dim", head_dim)))
    inner = num_heads * head_dim
    return {"qkv": 3 * n * d_model * inner, "out": n * inner * d_model}


def softmax_attention_mults(n: int, num_heads: int, head_dim: int) -> dict[str, int]:
    """Standard attention: scores QK^T h n^2 d and weighted sum A V h n^2 d, together 2 n^2 hd (8610).

    A causal mask does not change the count: the masked half of the n x n matrix is still computed.
    """
    n, num_heads, head_dim = (_pos_int(k, v) for k, v in (("n", n), ("num_heads", num_heads),
                                                          ("head_dim", head_dim)))
    return {"scores": num_heads * n * n * head_dim, "weighted_sum": num_heads * n * n * head_dim}


def linear_attention_mults(n: int, num_heads: int, head_dim: int, *, causal: bool = False,
                           chunk_size: int = DEFAULT_LINEAR_CHUNK_SIZE) -> dict[str, int]:
    """Linear attention phi(Q)(phi(K)^T V) / phi(Q) sum phi(K), per head of size d (kexue.fm/archives/8610).

    Non-causal: phi(K)^T V costs n d^2, phi(Q) S costs n d^2 (together the post's 2 n d^2) and the normaliser
    phi(Q) z costs n d.  Causal (chunks of c, as in `kexue_jax.nn.linear_attention`, the length padded to a
    multiple of c): additionally the masked c x c kernel matrix and its weighted sum, c^2 (d + d) per chunk.
    """
    n, num_heads, head_dim = (_pos_int(k, v) for k, v in (("n", n), ("num_heads", num_heads),
                                                          ("head_dim", head_dim)))
    chunk_size = _pos_int("chunk_size", chunk_size)
    h, d = num_heads, head_dim
    if not causal:
        return {"kv_state": h * n * d * d, "query_state": h * n * d * d, "normaliser": h * n * d,
                "intra_chunk": 0}
    c = min(chunk_size, n)
    padded = -(-n // c) * c
    return {"kv_state": h * padded * d * d, "query_state": h * padded * d * d, "normaliser": h * padded * d,
            "intra_chunk": h * padded * c * (d + d)}


def ffn_mults(n: int, d_model: int, d_ff: int, ffn: str = "plain") -> int:
    """FFN: 2 n D F for act(x W_i) W_o (8 n (hd)^2 for F = 4hd, kexue.fm/archives/8610); 3 n D F when gated."""
    n, d_model, d_ff = (_pos_int(k, v) for k, v in (("n", n), ("d_model", d_model), ("d_ff", d_ff)))
    return FFN_MATRICES[_choice("ffn", ffn, FFN_MATRICES)] * n * d_model * d_ff


def head_mults(n: int, d_model: int, vocab_size: int, head: str = "lm") -> int:
    """Output head: n D V logits (LM); BERT's MLM head adds its D x D transform, n D^2 + n D V (ignored in 8610)."""
    n, d_model, vocab_size = (_pos_int(k, v) for k, v in (("n", n), ("d_model", d_model),
                                                          ("vocab_size", vocab_size)))
    head = _choice("head", head, HEADS)
    if head == "none":
        return 0
    return n * d_model * vocab_size + (n * d_model * d_model if head == "mlm" else 0)


@dataclasses.dataclass(frozen=True)
class MixerDims:
    """The sizes one mixer's count reads: n = length, D = d_model, F = d_ff, h heads of size d, N = max_len,
    a = tiny-attention size, and the other options of ``TransformerConfig.mixer_options`` (checked where used)."""

    n: int
    D: int
    F: int
    h: int
    d: int
    N: int
    a: int
    token_mlp_dim: int | None
    external_slots: int
    conv_kind: str
    conv_kernel_size: int


def _synthesizer_random_mults(s: MixerDims) -> tuple[dict[str, int], dict[str, int]]:
    return {"value": s.n * s.D * s.h * s.d, "out": s.n * s.h * s.d * s.D}, {"weighted_sum": s.h * s.n * s.n * s.d}


def _synthesizer_dense_mults(s: MixerDims) -> tuple[dict[str, int], dict[str, int]]:
    p, m = _synthesizer_random_mults(s)
    p.update(dense_hidden=s.n * s.D * s.D, dense_logits=s.n * s.D * s.h * s.N)
    return p, m


def _token_mlp_mults(s: MixerDims) -> tuple[dict[str, int], dict[str, int]]:
    width = s.N if s.token_mlp_dim is None else _pos_int("token_mlp_dim", s.token_mlp_dim)
    width = s.n if width == s.N else width
    return {}, {"token_in": width * s.n * s.D, "token_out": s.n * width * s.D}


def _resmlp_mults(s: MixerDims) -> tuple[dict[str, int], dict[str, int]]:
    return {}, {"token": s.n * s.n * s.D}


def _gmlp_mults(s: MixerDims) -> tuple[dict[str, int], dict[str, int]]:
    return {"proj_in": 2 * s.n * s.D * s.F, "proj_out": s.n * s.F * s.D}, {"spatial": s.n * s.n * s.F}


def _amlp_mults(s: MixerDims) -> tuple[dict[str, int], dict[str, int]]:
    p, m = _gmlp_mults(s)
    p.update(tiny_qkv=3 * s.n * s.D * s.a, tiny_out=s.n * s.a * s.F)
    m.update(tiny_scores=s.n * s.n * s.a, tiny_weighted_sum=s.n * s.n * s.a)
    return p, m


def _fnet_mults(s: MixerDims) -> tuple[dict[str, int], dict[str, int]]:
    return {}, {"fft": 0}


def _external_mults(s: MixerDims) -> tuple[dict[str, int], dict[str, int]]:
    slots = _pos_int("external_slots", s.external_slots)
    return {}, {"memory_key": s.n * s.D * slots, "memory_value": s.n * slots * s.D}


def _conv_mults(s: MixerDims) -> tuple[dict[str, int], dict[str, int]]:
    k = _pos_int("conv_kernel_size", s.conv_kernel_size)
    p = {"glu": 2 * s.n * s.D * s.D, "conv_out": s.n * s.D * s.D}
    if _choice("conv_kind", s.conv_kind, ("lightweight", "dynamic")) == "dynamic":
        p["dynamic_kernels"] = s.n * s.D * s.h * k
    return p, {"taps": s.n * s.D * k}


#: name -> (MixerDims -> (projection parts, mixing parts)) for the non-attention mixers of kexue_jax.nn.mixers
#: (kexue.fm/archives/8431); their registry entries (kexue_jax.nn.mixers.REGISTRY) carry these functions, which
#: live here so that this module needs no jax
MIXER_MULTS = {"synthesizer_random": _synthesizer_random_mults, "synthesizer_dense": _synthesizer_dense_mults,
               "mixer": _token_mlp_mults, "resmlp": _resmlp_mults, "gmlp": _gmlp_mults, "amlp": _amlp_mults,
               "fnet": _fnet_mults, "external": _external_mults, "conv": _conv_mults}
OTHER_MIXERS = tuple(MIXER_MULTS)
TOKEN_MIXERS = ("attention", "linear") + OTHER_MIXERS


def mixer_mults(token_mixer: str, n: int, *, d_model: int, num_heads: int, head_dim: int, d_ff: int,
                max_len: int | None = None, token_mlp_dim: int | None = None, external_slots: int = 64,
                conv_kind: str = "lightweight", conv_kernel_size: int = 7, tiny_attention_dim: int = 64
                ) -> dict[str, int]:
    """Multiplications of one non-attention token-mixing sub-layer (kexue_jax.nn.mixers, kexue.fm/archives/8431).

    n = length, D = d_model, F = d_ff, h d = heads x head size, N = max_len (default n), S = slots / token-MLP
    width, K = kernel width, a = tiny-attention size (the keywords after max_len are the model's
    ``mixer_options``). Returns "projections" (channel matmuls) and "mixing" (token-axis matmuls) with their
    parts (``MIXER_MULTS``):

        synthesizer_random  value + out 2 n D hd;   A V  h n^2 d
        synthesizer_dense   value + out 2 n D hd, dense_hidden n D^2, dense_logits n D h N;  A V  h n^2 d
        mixer               two token layers 2 n S' D (S' = n when S = N: the leading block is used)
        resmlp              n^2 D
        gmlp                U 2 n D F, V n F D;  spatial n^2 F
        amlp                gmlp + tiny q, k, v 3 n D a + tiny out n a F;  tiny scores + sum 2 n^2 a
        fnet                0 (FFTs, no matmul: O(n D log(n D)) elementwise work, not counted)
        external            n D S + n S D
        conv                GLU 2 n D^2 + output n D^2 [+ dynamic kernels n D h K];  taps n D K
    A causal mask does not change any count (masked entries are still computed).
    """
    _choice("token_mixer", token_mixer, OTHER_MIXERS)
    n, d_model, num_heads, head_dim, d_ff = (_pos_int(k, v) for k, v in (
        ("n", n), ("d_model", d_model), ("num_heads", num_heads), ("head_dim", head_dim), ("d_ff", d_ff)))
    dims = MixerDims(n=n, D=d_model, F=d_ff, h=num_heads, d=head_dim,
                     N=n if max_len is None else _pos_int("max_len", max_len),
                     a=_pos_int("tiny_attention_dim", tiny_attention_dim), token_mlp_dim=token_mlp_dim,
                     external_slots=external_slots, conv_kind=conv_kind, conv_kernel_size=conv_kernel_size)
    p, m = MIXER_MULTS[token_mixer](dims)
    out = {**p, **m}
    out["projections"], out["mixing"] = sum(p.values()), sum(m.values())
    return out


def layer_mults(n: int, *, d_model: int, num_heads: int, head_dim: int, d_ff: int, ffn: str = "plain",
                token_mixer: str = "attention", linear_head_multiplier: int = 1, causal: bool = False,
                chunk_size: int = DEFAULT_LINEAR_CHUNK_SIZE, **mixer_options) -> dict[str, int]:
    """Multiplications of one layer by part, plus "projections", "mixing", "total" (kexue.fm/archives/8610).

    token_mixer="attention": 4 n D hd + 2 n^2 hd + FFN.  token_mixer="linear": heads of size r d
    (r = linear_head_multiplier) in the projections and in `linear_attention_mults`.
    """
    _choice("token_mixer", token_mixer, TOKEN_MIXERS)
    if token_mixer in OTHER_MIXERS:  # kexue.fm/archives/8431: mixer sub-layer + the same FFN
        parts = mixer_mults(token_mixer, n, d_model=d_model, num_heads=num_heads, head_dim=head_dim, d_ff=d_ff,
                            **mixer_options)
        parts["ffn"] = ffn_mults(n, d_model, d_ff, ffn)
        parts["total"] = parts["projections"] + parts["mixing"] + parts["ffn"]
        return parts
    r = _pos_int("linear_head_multiplier", linear_head_multiplier)
    mixer_dim = _pos_int("head_dim", head_dim) * (r if token_mixer == "linear" else 1)
    parts: dict[str, int] = dict(projection_mults(n, d_model, num_heads, mixer_dim))
    if token_mixer == "attention":
        mixing = softmax_attention_mults(n, num_heads, mixer_dim)
    else:
        mixing = linear_attention_mults(n, num_heads, mixer_dim, causal=causal, chunk_size=chunk_size)
    parts.update(mixing)
    parts["ffn"] = ffn_mults(n, d_model, d_ff, ffn)
    parts["projections"] = parts["qkv"] + parts["out"]
    parts["mixing"] = sum(mixing.values())
    parts["total"] = parts["projections"] + parts["mixing"] + parts["ffn"]
    return parts


def _cfg_field(cfg: Any, name: str, default):
    return getattr(cfg, name, default)


def model_mults(cfg: Any, seq_len: int, batch_size: int = 1) -> dict[str, int]:
    """Multiplications of a forward pass of `kexue_jax.nn.Transformer(cfg)` by part, summed over layers.

    Reads cfg.num_layers, d_model, num_heads, head_dim, d_ff, vocab_size and, with defaults when absent, ffn
    ("plain"), head ("lm"), token_mixer ("attention"), linear_head_multiplier (1), mask / layer_masks (for the
    causal chunked linear attention), and for the other mixers max_len and mixer_options (`MIXER_DEFAULTS`).
    Keys: the parts of `layer_mults` (times num_layers), "head", "total".  Embedding look-ups and all elementwise
    work are not counted (kexue.fm/archives/8610).
    """
    seq_len, batch_size = _pos_int("seq_len", seq_len), _pos_int("batch_size", batch_size)
    num_layers = _pos_int("cfg.num_layers", cfg.num_layers)
    layer_masks = tuple(_cfg_field(cfg, "layer_masks", ()) or ())
    masks = layer_masks or (_cfg_field(cfg, "mask", "bidirectional"),) * num_layers
    common = dict(d_model=cfg.d_model, num_heads=cfg.num_heads, head_dim=cfg.head_dim, d_ff=cfg.d_ff,
                  ffn=_cfg_field(cfg, "ffn", "plain"), token_mixer=_cfg_field(cfg, "token_mixer", "attention"),
                  linear_head_multiplier=_cfg_field(cfg, "linear_head_multiplier", 1),
                  chunk_size=_cfg_field(cfg, "linear_chunk_size", DEFAULT_LINEAR_CHUNK_SIZE))
    if common["token_mixer"] in OTHER_MIXERS:  # max_len and the mixer's options (cfg.mixer_options)
        options = _cfg_field(cfg, "mixer_options", None)
        common["max_len"] = _cfg_field(cfg, "max_len", None)
        common.update({name: _cfg_field(options, name, default) for name, default in MIXER_DEFAULTS.items()})
    total: dict[str, int] = {}
    for kind in masks:
        for key, value in layer_mults(seq_len, causal=kind == "causal", **common).items():
            total[key] = total.get(key, 0) + value
    total["head"] = head_mults(seq_len, cfg.d_model, cfg.vocab_size, _cfg_field(cfg, "head", "lm"))
    total["total"] += total["head"]
    return {k: v * batch_size for k, v in total.items()}


def forward_flops(cfg: Any, seq_len: int, batch_size: int = 1) -> int:
    """Matmul FLOPs of one forward pass: 2 x model_mults (a multiply-add is 2 FLOPs)."""
    return 2 * model_mults(cfg, seq_len, batch_size)["total"]


def training_flops(cfg: Any, seq_len: int, batch_size: int = 1) -> int:
    """Real FLOPs of one training step on `batch_size` sequences of length `seq_len` (kexue.fm/archives/8610).

        training_flops = 2 FLOPs per multiply-add x 3 (forward 1 + backward 2: gradients of the activations and of
                         the weights) x model_mults(cfg, seq_len)["total"].

    Unlike the 6 N_params rule it counts the attention matmuls (2 n^2 hd per layer) and the output head, and not
    the embedding look-ups; elementwise work (softmax, norms, activations, optimizer) is not counted.  This is
    the compute axis of the training loop and the upscaling experiments.
    """
    return 6 * model_mults(cfg, seq_len, batch_size)["total"]


# ---------------------------------------------------------------------------------------------------------------
# Crossover lengths (post 8610's "n > 2hd", "n > 6hd", "n > 16d").
# ---------------------------------------------------------------------------------------------------------------

def _widths(num_heads, head_dim, d_model, d_ff, ffn):
    h, d = _pos_int("num_heads", num_heads), _pos_int("head_dim", head_dim)
    hd = h * d
    d_model = hd if d_model is None else _pos_int("d_model", d_model)
    d_ff = 4 * d_model if d_ff is None else _pos_int("d_ff", d_ff)
    return hd, d_model, d_ff, FFN_MATRICES[_choice("ffn", ffn, FFN_MATRICES)]


def sa_exceeds_ffn_length(num_heads: int, head_dim: int, *, d_model: int | None = None, d_ff: int | None = None,
                          ffn: str = "plain") -> float:
    """Length beyond which self-attention costs more than the FFN (kexue.fm/archives/8610).

        4 n D hd + 2 n^2 hd > k n D F   <=>   n > D (k F - 4 hd) / (2 hd)      (k = 2 plain, 3 gated)

    = 2hd for D = hd, F = 4hd (BERT-base 1536, BERT-large 2048); 0 if attention always costs more.
    Defaults: d_model = hd, d_ff = 4 d_model.
    """
    hd, d_model, d_ff, k = _widths(num_heads, head_dim, d_model, d_ff, ffn)
    return max(0.0, d_model * (k * d_ff - 4 * hd) / (2 * hd))


def quadratic_dominates_length(num_heads: int, head_dim: int, *, d_model: int | None = None,
                               d_ff: int | None = None, ffn: str = "plain") -> float:
    """Length beyond which the n^2 term exceeds all linear-in-n terms of a layer (kexue.fm/archives/8610).

        2 n^2 hd > 4 n D hd + k n D F   <=>   n > D (4 hd + k F) / (2 hd)

    = 6hd for D = hd, F = 4hd (BERT-base 4608, BERT-large 6144).
    """
    hd, d_model, d_ff, k = _widths(num_heads, head_dim, d_model, d_ff, ffn)
    return d_model * (4 * hd + k * d_ff) / (2 * hd)


def linear_breakeven_length(head_dim: int, multiplier: int = 4) -> float:
    """Length beyond which linear attention with head size r d is cheaper than softmax attention of head size d.

        h 2 n (r d)^2 < h 2 n^2 d   <=>   n > r^2 d          (kexue.fm/archives/8610: r = 4 gives n > 16 d = 1024)

    Counts the token mixing only, as the post does (not the r-times wider projections; see
    `linear_layer_crossover_length`).
    """
    d, r = _pos_int("head_dim", head_dim), _pos_int("multiplier", multiplier)
    return float(r * r * d)


def linear_layer_crossover_length(num_heads: int, head_dim: int, multiplier: int = 4, *,
                                  d_model: int | None = None) -> float:
    """Whole-layer break-even of linear attention with head size r d, counting its wider Q, K, V, O projections.

        4 n D hd + 2 n^2 hd  >  4 r n D hd + 2 n h (r d)^2   <=>   n > 2 (r - 1) D + r^2 d

    (FFN identical on both sides cancels; the normaliser's n r d per head is ignored as in post 8610.)
    BERT-base, r = 4: n > 5632; r = 1: n > d = 64.  [derived here, not in the post]
    """
    h, d, r = _pos_int("num_heads", num_heads), _pos_int("head_dim", head_dim), _pos_int("multiplier", multiplier)
    d_model = h * d if d_model is None else _pos_int("d_model", d_model)
    return float(2 * (r - 1) * d_model + r * r * d)


def per_part_table(num_heads: int, head_dim: int, seq_lens, *, d_model: int | None = None,
                   d_ff: int | None = None, ffn: str = "plain") -> list[dict]:
    """The digest's table of post 8610 for each n: projections, scores (2 n^2 hd), FFN, total, shares.

    score_share = scores / layer total; sa_over_ffn = (projections + scores) / FFN.
    """
    hd, d_model, d_ff, _ = _widths(num_heads, head_dim, d_model, d_ff, ffn)
    rows = []
    for n in seq_lens:
        p = layer_mults(n, d_model=d_model, num_heads=num_heads, head_dim=head_dim, d_ff=d_ff, ffn=ffn)
        rows.append({"n": n, "projections": p["projections"], "scores": p["mixing"], "ffn": p["ffn"],
                     "total": p["total"], "score_share": p["mixing"] / p["total"],
                     "sa_over_ffn": (p["projections"] + p["mixing"]) / p["ffn"]})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Measured counts: the matmuls of a traced function.
# ---------------------------------------------------------------------------------------------------------------

def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _jaxpr_mults(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            rhs_free = [s for i, s in enumerate(rhs) if i not in set(rhs_contract) | set(rhs_batch)]
            total += math.prod(lhs) * math.prod(rhs_free)
            continue
        if name == "while":
            raise ValueError("count_matmul_mults cannot count a while loop (no static trip count); use lax.scan")
        subs = [_jaxpr_mults(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if name == "cond":
            total += max(subs, default=0)
        elif name == "scan":
            total += eqn.params["length"] * sum(subs)
        else:
            total += sum(subs)
    return total


def count_matmul_mults(fn: Callable, *args, **kwargs) -> int:
    """Multiplications of all dot_generals (einsum, matmul, tensordot) in fn(*args, **kwargs), from its jaxpr.

    Scans count `length` times; a cond counts its most expensive branch.  The measured counterpart of
    `model_mults` (for a Transformer forward pass the two agree exactly).
    """
    import jax  # noqa: PLC0415 (no jax work at import time of this module)

    return _jaxpr_mults(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def xla_flops(compiled) -> float:
    """FLOPs XLA's cost model assigns to a compiled computation (`jax.jit(f).lower(...).compile()`).

    `cost_analysis()` returns a dict, or on some versions a list of dicts (one per computation): summed.  It
    counts 2 FLOPs per multiply-add plus elementwise work, and a while/scan body only once.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, dict):
        cost = [cost]
    return float(sum(c.get("flops", 0.0) for c in cost if c))


# ---------------------------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------------------------

def analysis(num_heads: int, head_dim: int, *, d_model: int | None = None, d_ff: int | None = None,
             ffn: str = "plain", seq_lens=(128, 512, 1536, 4608), linear_multiplier: int = 4) -> dict:
    """All of post 8610's numbers for one width, as a JSON-ready dict (the CLI's output)."""
    hd, d_model, d_ff, _ = _widths(num_heads, head_dim, d_model, d_ff, ffn)
    seq_lens = [_pos_int("seq_len", n) for n in seq_lens]
    width = dict(d_model=d_model, d_ff=d_ff, ffn=ffn)
    return {
        "num_heads": num_heads, "head_dim": head_dim, "hidden": hd, **width,
        "sa_exceeds_ffn": sa_exceeds_ffn_length(num_heads, head_dim, **width),
        "quadratic_dominates": quadratic_dominates_length(num_heads, head_dim, **width),
        "linear_multiplier": linear_multiplier,
        "linear_breakeven": linear_breakeven_length(head_dim, linear_multiplier),
        "linear_layer_crossover": linear_layer_crossover_length(num_heads, head_dim, linear_multiplier,
                                                                d_model=d_model),
        "table": per_part_table(num_heads, head_dim, seq_lens, **width),
    }


def main(argv=None) -> int:
    """`python -m kexue_jax.flops --heads 12 --head-dim 64 [--d-model D] [--d-ff F] [--ffn gated] [--seq-len N ...]`."""
    parser = argparse.ArgumentParser(prog="python -m kexue_jax.flops",
                                     description="Multiplication counts and crossover lengths of post 8610.")
    parser.add_argument("--heads", type=int, required=True, help="number of heads h")
    parser.add_argument("--head-dim", type=int, required=True, help="head size d")
    parser.add_argument("--d-model", type=int, default=None, help="hidden size (default h*d)")
    parser.add_argument("--d-ff", type=int, default=None, help="FFN inner size (default 4*d_model)")
    parser.add_argument("--ffn", default="plain", choices=tuple(FFN_MATRICES))
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128, 512, 1536, 4608],
                        help="sequence lengths of the per-part table")
    parser.add_argument("--linear-multiplier", type=int, default=4, help="linear-attention head size multiplier r")
    args = parser.parse_args(argv)
    try:
        out = analysis(args.heads, args.head_dim, d_model=args.d_model, d_ff=args.d_ff, ffn=args.ffn,
                       seq_lens=args.seq_len, linear_multiplier=args.linear_multiplier)
    except (TypeError, ValueError) as e:
        parser.error(str(e).replace("num_heads", "--heads").replace("head_dim", "--head-dim")
                     .replace("d_model", "--d-model").replace("d_ff", "--d-ff").replace("seq_len", "--seq-len")
                     .replace("multiplier", "--linear-multiplier"))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
