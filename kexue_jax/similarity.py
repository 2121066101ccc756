"""Supervised sentence similarity (kexue.fm/archives/8541, background 8454): the Sentence-BERT pair head
with the post's task masking, the cosine losses the post tried first, CoSENT and in-batch contrastive
losses for comparison, scipy-free rank correlations, and the retrieval-distillation loss.

Sentence vectors u, v come from an encoder (``sentence_vectors``: mean pooling over real tokens, then L2
normalisation, as sentence-transformers' all-MiniLM-L6-v2); retrieval ranks pairs by cos(u, v).

Pair head (InferSent -> Sentence-BERT, the loss the post adopts)::

    f = [u; v; |u - v|]                    (``pair_features``; ``parts`` selects the ablations)
    z = f W,   W: [len(parts) D, 5]        (one Dense(5) without bias shared by both tasks)
    2-way task (label in {0, 1}):  logits 2..4 set to -1e12     (``task_mask``)
    3-way task (label in {2, 3, 4}): logits 0..1 set to -1e12
    L = mean cross-entropy(softmax(z_masked), label)

Masking is a ``where``: a masked logit is replaced, so the other task's logits get exactly zero gradient.

The three cosine losses the post tried first (t in {0, 1} the pair label, c = cos(u, v))::

    cos_sq:      t (c - 1)^2 + (1 - t) c^2
    cos_sq_sym:  t (c - 1)^2 + (1 - t) (c + 1)^2
    margin:      t max(0.9 - c, 0) + (1 - t) max(c - 0.1, 0)

(with a soft target t = score / 5, ``cos_sq`` is Sentence-BERT's CosineSimilarityLoss: (c - t)^2 plus a
constant t - t^2.) Beyond the post: CoSENT (kexue.fm/archives/8847), with s the gold scores::

    L = log(1 + sum_{(i, j): s_i > s_j} exp(lambda (c_j - c_i))),   lambda = 20

and multiple-negatives ranking (in-batch InfoNCE): L = mean_i CE(scale cos(a_i, b_j) over j, target i).

Retrieval distillation (post 8454, used in 8541 to distil the fine-tuned model back), teacher vectors
u_i, student vectors v_i of the same n sentences::

    L_sim = (lambda / n^2) sum_{i, j} (cos(u_i, u_j) - cos(v_i, v_j))^2,   lambda = 100

Evaluation: Spearman x 100 between cos(u, v) and the gold score (``spearman``; average ranks for ties,
as ``scipy.stats.spearmanr``), ``pearson`` likewise.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kexue_jax import hf
from kexue_jax.nn.transformer import Transformer, TransformerConfig

#: the post's head: logits 0-1 are the 2-way task, 2-4 the 3-way task
NUM_LOGITS = 5
BINARY_LOGITS = (0, 2)
THREE_WAY_LOGITS = (2, 5)
MASK_VALUE = -1e12
#: feature blocks of the pair head; the post's (and Sentence-BERT's best) choice is all three
PARTS = ("u", "v", "|u-v|")
COSINE_LOSSES = ("cos_sq", "cos_sq_sym", "margin")
LOSSES = ("softmax",) + COSINE_LOSSES + ("cosent", "mnrl")


# ------------------------------------------------------------------------------------------------
# Encoder.

def sentence_vectors(cfg: TransformerConfig, params, ids, valid, *, rng=None):
    """L2-normalised mean-pooled final hidden states [B, D] of a ``head="none"`` encoder (the released
    all-MiniLM-L6-v2 pipeline, ``hf.sentence_embedding``), with dropout when ``rng`` is given."""
    hidden = Transformer(cfg).apply({"params": params}, ids, jnp.zeros_like(ids) if cfg.type_vocab_size else None,
                                    valid=valid, deterministic=rng is None,
                                    rngs=None if rng is None else {"dropout": rng})
    return hf.l2_normalize(hf.mean_pool(hidden, valid))


def cosine(u, v, eps: float = 1e-12):
    """Row-wise cos(u_i, v_i) = <u_i, v_i> / (|u_i| |v_i|): [B, D] x [B, D] -> [B]."""
    return jnp.sum(hf.l2_normalize(u, eps) * hf.l2_normalize(v, eps), axis=-1)


def cosine_matrix(x, eps: float = 1e-12):
    """All pairwise cosines cos(x_i, x_j): [n, D] -> [n, n]."""
    x = hf.l2_normalize(x, eps)
    return x @ x.T


# ------------------------------------------------------------------------------------------------
# The pair head and task masking (the post's loss).

def _check_parts(parts: Sequence[str]) -> tuple[str, ...]:
    parts = tuple(parts)
    if not parts or len(set(parts)) != len(parts) or any(p not in PARTS for p in parts):
        raise ValueError(f"parts must be a non-empty tuple of distinct names from {PARTS}, got {parts!r}")
    return parts


def pair_features(u, v, parts: Sequence[str] = PARTS):
    """Concatenation of the chosen blocks of [u; v; |u - v|] along the last axis: [B, len(parts) D]."""
    blocks = {"u": lambda: u, "v": lambda: v, "|u-v|": lambda: jnp.abs(u - v)}
    return jnp.concatenate([blocks[p]() for p in _check_parts(parts)], axis=-1)


def head_init(key, dim: int, parts: Sequence[str] = PARTS) -> dict:
    """The post's ``Dense(5, use_bias=False)`` on pair features: {"kernel": [len(parts) dim, 5]},
    Glorot-uniform (Keras' default)."""
    fan_in = len(_check_parts(parts)) * dim
    return {"kernel": jax.nn.initializers.glorot_uniform()(key, (fan_in, NUM_LOGITS), jnp.float32)}


def task_mask(logits, labels):
    """The post's task masking: a label < 1.5 is the 2-way task (logits 2-4 replaced by -1e12), any other
    the 3-way task (logits 0-1 replaced). logits [..., 5], labels [...] -> masked logits [..., 5]."""
    binary = (labels < 1.5)[..., None]
    idx = jnp.arange(NUM_LOGITS)
    in_binary = (idx >= BINARY_LOGITS[0]) & (idx < BINARY_LOGITS[1])
    return jnp.where(binary != in_binary, jnp.asarray(MASK_VALUE, logits.dtype), logits)


def softmax_loss(head_params, u, v, labels, parts: Sequence[str] = PARTS):
    """Mean cross-entropy of softmax(task_mask([u; v; |u - v|] W)) (the post's loss).

    labels: int [B] or [B, T] (a pair may carry a label of each task; every entry is one term)."""
    logits = pair_features(u, v, parts).astype(jnp.float32) @ head_params["kernel"]
    labels = jnp.asarray(labels)
    if labels.ndim == 2:
        logits = jnp.broadcast_to(logits[:, None, :], labels.shape + (NUM_LOGITS,))
    logp = jax.nn.log_softmax(task_mask(logits, labels), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1))


# ------------------------------------------------------------------------------------------------
# Cosine losses (the post's three, then CoSENT and MNRL).

def cos_sq_loss(cos, t):
    """mean[t (cos - 1)^2 + (1 - t) cos^2] (the post's first cosine loss)."""
    return jnp.mean(t * (cos - 1.0) ** 2 + (1.0 - t) * cos ** 2)


def cos_sq_sym_loss(cos, t):
    """mean[t (cos - 1)^2 + (1 - t) (cos + 1)^2] (the post's second)."""
    return jnp.mean(t * (cos - 1.0) ** 2 + (1.0 - t) * (cos + 1.0) ** 2)


def margin_loss(cos, t, positive: float = 0.9, negative: float = 0.1):
    """mean[t max(0.9 - cos, 0) + (1 - t) max(cos - 0.1, 0)] (the post's third)."""
    return jnp.mean(t * jax.nn.relu(positive - cos) + (1.0 - t) * jax.nn.relu(cos - negative))


def cosent_loss(cos, scores, scale: float = 20.0):
    """CoSENT: log(1 + sum_{s_i > s_j} exp(scale (cos_j - cos_i))) over all ordered pairs of the batch
    (kexue.fm/archives/8847), computed as a logsumexp with a 0 logit for the 1."""
    diff = scale * (cos[None, :] - cos[:, None])                      # [i, j] = scale (cos_j - cos_i)
    wanted = scores[:, None] > scores[None, :]
    diff = jnp.where(wanted, diff, -jnp.inf).reshape(-1)
    return jax.nn.logsumexp(jnp.concatenate([jnp.zeros((1,), diff.dtype), diff]))


def mnrl_loss(u, v, scale: float = 20.0):
    """Multiple-negatives ranking: mean_i -log softmax_j(scale cos(u_i, v_j))[i]; (u_i, v_i) are positive
    pairs and every other v_j in the batch is a negative (sentence-transformers' default scale 20).
    Computed in at least float32: bf16 / fp16 inputs are upcast, float64 stays float64."""
    dtype = jnp.promote_types(jnp.result_type(u, v), jnp.float32)
    sims = scale * (hf.l2_normalize(u.astype(dtype)) @ hf.l2_normalize(v.astype(dtype)).T)
    logp = jax.nn.log_softmax(sims, axis=-1)
    return -jnp.mean(jnp.diagonal(logp))


def retrieval_distillation_loss(teacher, student, lam: float = 100.0):
    """L_sim = (lambda / n^2) sum_{i,j} (cos(u_i, u_j) - cos(v_i, v_j))^2 (kexue.fm/archives/8454),
    teacher vectors u [n, D_t], student vectors v [n, D_s] (the dimensions may differ)."""
    return lam * jnp.mean((cosine_matrix(teacher) - cosine_matrix(student)) ** 2)


def pair_loss(name: str, *, u, v, scores, binary, labels, head_params=None, parts: Sequence[str] = PARTS,
              cosent_scale: float = 20.0, mnrl_scale: float = 20.0):
    """The loss ``name`` (one of LOSSES) of a batch of pairs: u, v [B, D] sentence vectors, scores [B] the
    gold scores, binary [B] the (possibly soft) targets t of the post's cosine losses, labels [B, T] the
    head's task labels. ``softmax`` needs ``head_params``."""
    if name == "softmax":
        if head_params is None:
            raise ValueError("loss 'softmax' needs head_params (see head_init)")
        return softmax_loss(head_params, u, v, labels, parts)
    cos = cosine(u, v)
    if name == "cos_sq":
        return cos_sq_loss(cos, binary)
    if name == "cos_sq_sym":
        return cos_sq_sym_loss(cos, binary)
    if name == "margin":
        return margin_loss(cos, binary)
    if name == "cosent":
        return cosent_loss(cos, scores, cosent_scale)
    if name == "mnrl":
        return mnrl_loss(u, v, mnrl_scale)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


# ------------------------------------------------------------------------------------------------
# Labels from scored pairs.

def binary_labels(scores, threshold: float = 2.5) -> np.ndarray:
    """The post's rule for STS-B: int(score > threshold), threshold 2.5 on the 0-5 scale."""
    return (np.asarray(scores, np.float64) > threshold).astype(np.int32)


def three_way_labels(scores, bins: Sequence[float] = (5 / 3, 10 / 3)) -> np.ndarray:
    """A 3-way task from scores (no NLI data is available offline): score < bins[0] -> 2 (the post's
    "contradiction" slot), score >= bins[1] -> 3 ("entailment"), otherwise 4 ("neutral")."""
    s = np.asarray(scores, np.float64)
    lo, hi = bins
    if not lo < hi:
        raise ValueError(f"bins must be increasing, got {tuple(bins)!r}")
    return np.where(s < lo, 2, np.where(s >= hi, 3, 4)).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Rank correlation (scipy-free).

def rankdata(x) -> np.ndarray:
    """Ranks 1..n of a 1-d array, ties getting the average of their ranks (scipy's method="average")."""
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new) - 1]
    return ranks


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length 1-d arrays (NaN when either is constant)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape or len(x) < 2:
        raise ValueError(f"pearson needs two arrays of the same length >= 2, got {x.shape} and {y.shape}")
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.dot(x, x) * np.dot(y, y))
    return float(np.dot(x, y) / denom) if denom > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks (ties averaged)."""
    return pearson(rankdata(x), rankdata(y))


__all__ = ["LOSSES", "COSINE_LOSSES", "PARTS", "NUM_LOGITS", "MASK_VALUE", "sentence_vectors", "cosine",
           "cosine_matrix", "pair_features", "head_init", "task_mask", "softmax_loss", "cos_sq_loss",
           "cos_sq_sym_loss", "margin_loss", "cosent_loss", "mnrl_loss", "retrieval_distillation_loss",
           "pair_loss", "binary_labels", "three_way_labels", "rankdata", "pearson", "spearman"]
