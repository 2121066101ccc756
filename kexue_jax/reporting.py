"""What every job's report is made of: an atomic JSON write, seed statistics under one rule, markdown
tables, one guarded plotting helper and the context-free (unigram) baseline of a token stream.

Only numpy is imported here (matplotlib on demand), so any job or benchmark can use it. Which process
writes (process 0) is the caller's business.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence

import numpy as np


def write_json_atomic(path: str | os.PathLike, obj, *, indent: int | None = 2, newline: bool = False) -> None:
    """Write ``json.dumps(obj, indent=indent)`` (plus ``"\\n"`` with ``newline``) to ``path`` atomically: a
    temporary file in the same directory, flushed and fsynced, then ``os.replace``. A crash at any point
    (serialization included) leaves the previous file intact and no temporary file behind."""
    path = os.fspath(path)
    text = json.dumps(obj, indent=indent) + ("\n" if newline else "")  # before touching the disk
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _plain(x):
    """A numpy scalar as the Python number it holds (JSON-serializable); anything else unchanged."""
    return x.item() if isinstance(x, np.generic) else x


def seed_stats(values: Sequence) -> dict:
    """Statistics over seeds, the one rule of every report: ``mean`` and sample ``std`` (ddof 1) of the values
    that are not None (a seed that never reached a target gives None), ``n`` = how many those are, and
    ``values``: the per-seed values as given (None kept, so ``len(values)`` is the number of seeds).
    ``std`` is None for fewer than two values, ``mean`` None for none. Nothing is rounded."""
    values = [_plain(v) for v in values]
    present = np.asarray([v for v in values if v is not None], np.float64)
    return {"mean": float(present.mean()) if present.size else None,
            "std": float(present.std(ddof=1)) if present.size > 1 else None,
            "n": int(present.size), "values": values}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table: ``| h1 | h2 |``, ``|---|---|`` and one line per row (cells as ``str``), newline-ended."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def figure(**kwargs):
    """A ``matplotlib.figure.Figure(**kwargs)`` (no pyplot state, no display needed), or None with one printed
    line when matplotlib is not installed: every plot of the project is optional."""
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415 (optional dependency)
    except ImportError:
        print("matplotlib is not installed: no plot written", flush=True)
        return None
    return Figure(**kwargs)


def unigram_loss(train: np.ndarray, val: np.ndarray | None = None, *, add_one: bool = False) -> float:
    """The loss (nats/token) of a model that ignores its context: the cross-entropy of ``val`` under the token
    frequencies of ``train`` (``add_one``: add-one smoothed, so a token unseen in ``train`` has a finite
    cost). ``val=None``: the entropy of ``train``'s own frequencies."""
    train = np.asarray(train).ravel().astype(np.int64)
    if val is None:
        counts = np.bincount(train).astype(np.float64) + (1.0 if add_one else 0.0)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())
    val = np.asarray(val).ravel().astype(np.int64)
    n = int(max(train.max(), val.max())) + 1
    counts = np.bincount(train, minlength=n).astype(np.float64) + (1.0 if add_one else 0.0)
    return float(-np.mean(np.log(counts / counts.sum())[val]))


__all__ = ["write_json_atomic", "seed_stats", "markdown_table", "figure", "unigram_loss"]
