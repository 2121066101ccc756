"""Named random streams: one seed, many independent uses of it, and no magic offsets.

A job has one ``config.seed``. Each further use of randomness (the validation batches, a fine-tune's init and
batches, the draws of a figure) takes its own *named stream* of that seed instead of ``seed + 7919`` or
``PRNGKey(50 + r)``: offsets collide across seeds (seed 0's ``seed + 11`` is seed 11's own stream) and say nothing
about what they are for. A stream is identified by the CRC-32 of its name, stable across processes and versions.

    stream_key(key, name, *index)   jax.random.fold_in(key, id(name)), then each index folded in
    stream_seed(seed, name, *index) a host seed (numpy, or an int config field): the first word of
                                    numpy.random.SeedSequence([seed, id(name), *index])
"""
from __future__ import annotations

import zlib

import jax
import numpy as np


def stream_id(name: str) -> int:
    """The stream's 31-bit id: CRC-32 of its name (the same in every process, platform and version)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a stream name must be a non-empty str, got {name!r}")
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def stream_key(key: jax.Array, name: str, *index: int) -> jax.Array:
    """The key of the named stream of ``key``: ``fold_in(key, stream_id(name))``, then ``fold_in`` of each index
    (e.g. the layer, the draw)."""
    key = jax.random.fold_in(key, stream_id(name))
    for i in index:
        key = jax.random.fold_in(key, int(i))
    return key


def stream_seed(seed: int, name: str, *index: int) -> int:
    """A non-negative 31-bit host seed for the named stream of ``seed`` (and ``index``):
    ``SeedSequence([seed, stream_id(name), *index]).generate_state(1)[0]`` masked to 31 bits, so that it is a
    valid seed for numpy, ``jax.random.PRNGKey`` and an int config field."""
    words = [int(seed), stream_id(name), *(int(i) for i in index)]
    if min(words) < 0:
        raise ValueError(f"stream_seed needs non-negative seed and indices, got {words}")
    return int(np.random.SeedSequence(words).generate_state(1)[0]) & 0x7FFFFFFF
