"""Attention-mask algebra from segment ids (kexue.fm/archives/6933 UniLM, kexue.fm/archives/8475 UniVAE).

Every mask is a boolean array ``[batch, 1, q_len, k_len]``; True means query i may attend to key j.
Masks are built by broadcasting comparisons of per-position vectors (no Python loops over positions), so
building one costs O(B L^2) boolean ops, far below an attention forward pass.

Notation, per row of a batch: ``s`` are the segment ids (0 = source, 1 = target) and
``c = cumsum(s)`` (0 on the source, 1, 2, ... on the target). With packed documents (``document_ids``)
the cumsum restarts at each document and every mask is ANDed with "same document"; "key 0" becomes
"the first key of the query's document".

* ``causal``         j <= i
* ``bidirectional``  every j (within the document)
* ``unilm``          c_j <= c_i          source bidirectional, target sees the source + causal target
* ``independent``    s_j = s_i and c_j <= c_i    no cross-segment attention (UniVAE's lower layers)
* ``uniae``          j = 0  or  independent(i, j)   target sees only the source [CLS] + causal target
* ``padding``        key j is valid (optionally query i valid too)
* ``and_`` / ``or_`` combine masks elementwise (broadcasting).

Example, s = [0, 0, 0, 1, 1, 1]: under unilm target row 4 sees keys 0-4; under independent source rows
see keys 0-2 and row 4 sees keys 3-4; under uniae row 4 sees keys {0, 3, 4}.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

MASKS = ("causal", "bidirectional", "unilm", "uniae", "independent")


def _as_2d(ids, name: str) -> Array:
    ids = jnp.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, length], got shape {ids.shape}")
    return ids


def _pairwise(fn: Callable[[Array, Array], Array], q: Array, k: Array) -> Array:
    """[B, Lq] x [B, Lk] -> [B, 1, Lq, Lk] by broadcasting fn(q_i, k_j)."""
    return fn(q[:, None, :, None], k[:, None, None, :])


def document_start(document_ids: Array) -> Array:
    """Index of the first position of each position's document (packed rows), shape [B, L]."""
    doc = _as_2d(document_ids, "document_ids")
    pos = jnp.broadcast_to(jnp.arange(doc.shape[1]), doc.shape)
    is_start = jnp.concatenate([jnp.ones_like(doc[:, :1], bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(is_start, pos, 0), axis=1)


def same_document(document_ids) -> Array:
    """doc_i = doc_j: block-diagonal mask of packed documents."""
    doc = _as_2d(document_ids, "document_ids")
    return _pairwise(jnp.equal, doc, doc)


def _with_documents(mask: Array, document_ids) -> Array:
    return mask if document_ids is None else mask & same_document(document_ids)


def segment_cumsum(segment_ids, document_ids=None) -> Array:
    """c = cumsum(s), restarted at every packed document."""
    s = _as_2d(segment_ids, "segment_ids").astype(jnp.int32)
    c = jnp.cumsum(s, axis=1)
    if document_ids is None:
        return c
    start = document_start(document_ids)
    before = jnp.take_along_axis(c - s, start, axis=1)  # cumsum just before the document starts
    return c - before


def causal(ids, document_ids=None) -> Array:
    """j <= i. ``ids`` is any [batch, length] array (tokens or segment ids): only its shape is used."""
    ids = _as_2d(ids, "ids")
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return _with_documents(_pairwise(jnp.greater_equal, pos, pos), document_ids)


def bidirectional(ids, document_ids=None) -> Array:
    """Every query sees every key (of its document)."""
    ids = _as_2d(ids, "ids")
    b, n = ids.shape
    return _with_documents(jnp.ones((b, 1, n, n), bool), document_ids)


def unilm(segment_ids, document_ids=None) -> Array:
    """c_j <= c_i: source bidirectional, target sees the source and the causal target (UniLM)."""
    c = segment_cumsum(segment_ids, document_ids)
    return _with_documents(_pairwise(jnp.greater_equal, c, c), document_ids)


def independent(segment_ids, document_ids=None) -> Array:
    """s_j = s_i and c_j <= c_i: source bidirectional in itself, target causal in itself, no crossing."""
    s = _as_2d(segment_ids, "segment_ids")
    return unilm(segment_ids, document_ids) & _pairwise(jnp.equal, s, s)


def uniae(segment_ids, document_ids=None) -> Array:
    """j = 0 (the source [CLS]) or independent(i, j): the UniVAE bottleneck mask (first=True)."""
    s = _as_2d(segment_ids, "segment_ids")
    pos = jnp.broadcast_to(jnp.arange(s.shape[1]), s.shape)
    first = jnp.zeros_like(pos) if document_ids is None else document_start(document_ids)
    # key j is the first key of query i's document
    sees_cls = _pairwise(lambda qi, kj: kj == qi, first, pos)
    return or_(independent(segment_ids, document_ids), _with_documents(sees_cls, document_ids))


def padding(valid, *, queries: bool = False) -> Array:
    """Key j is valid (``valid`` is bool [batch, length], True = real token); with ``queries`` also i."""
    v = _as_2d(valid, "valid").astype(bool)
    keys = v[:, None, None, :]
    if not queries:
        return jnp.broadcast_to(keys, (v.shape[0], 1, v.shape[1], v.shape[1]))
    return keys & v[:, None, :, None]


def _combine(op, name: str, masks) -> Array:
    masks = [m for m in masks if m is not None]
    if not masks:
        raise ValueError(f"{name} needs at least one mask")
    return functools.reduce(op, masks)


def and_(*masks) -> Array:
    """Elementwise AND of masks (broadcasting); None entries are ignored."""
    return _combine(jnp.logical_and, "and_", masks)


def or_(*masks) -> Array:
    """Elementwise OR of masks (broadcasting); None entries are ignored."""
    return _combine(jnp.logical_or, "or_", masks)


def make(kind: str, segment_ids, document_ids=None) -> Array:
    """The mask named ``kind`` (one of MASKS) for these segment ids."""
    table = {"causal": causal, "bidirectional": bidirectional, "unilm": unilm, "uniae": uniae,
             "independent": independent}
    if kind not in table:
        raise ValueError(f"mask must be one of {MASKS}, got {kind!r}")
    return table[kind](segment_ids, document_ids)
