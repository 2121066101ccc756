"""Token mixers side by side (kexue.fm/archives/8431): quality, speed, length transfer and task transfer.

``python train.py --config=configs/mixers.py[:tiny] --workdir=DIR`` or ``python -m kexue_jax.experiments.mixers
--workdir DIR [--variant tiny]``.

For every mixer of ``study.mixers`` (``attention`` is the reference):

1. Parameters matched: ``d_ff`` is chosen so that the model's parameter count is closest to the reference's
   (parameters are affine in d_ff); every arm trains on the same batches for the same steps (same tokens),
   and its FLOPs per token (``kexue_jax.flops``, 6 x multiplications) are reported next to the losses.
2. Pre-training on Shakespeare bytes: MLM (bidirectional) for every mixer, next-byte LM (causal) for those
   with a causal form (``kexue_jax.nn.mixers.BIDIRECTIONAL_ONLY`` have none). Measured: validation loss
   (nats per predicted byte), parameters, tokens/s of the jitted training step: right after each arm (median of
   ``study.time_steps``) and, with ``study.speed_rounds`` > 0, best of that many rounds interleaved over all arms
   (``tokens_per_s_interleaved``, robust to load from other processes; ``--speed-only`` re-measures it).
3. Length transfer: the models trained at ``data.seq_len`` (128) evaluated at ``study.eval_lengths`` (64, 256).
   n x n mixers use the leading block at 64 and raise at 256 (recorded as "raises", the post's claim 4).
4. Task transfer (the author's central critique): a classifier of each spoken line's play genre (First Folio
   labels of ``kexue_jax.analytic``; mean-pooled final states over the line's bytes + a linear layer) is
   fine-tuned from the MLM encoder and, with the same budget, from scratch; test accuracy of both.
   Genre gains nothing from MLM pre-training even for attention (a line says little about its play's genre,
   and a small MLM learns nothing of it), so it cannot show which mixers transfer. Hence a second task,
   where pre-training demonstrably helps attention: **word order** (:func:`order_lines`): is a line as spoken
   or are its words shuffled? Both classes have the same bytes (a bag-of-bytes model is at chance), so it
   needs context, what MLM pre-training teaches. Fine-tuned with a fraction of the labels
   (``study.ft_label_fractions``, nested seeded subsets of the training lines, :func:`label_subset`, the same
   for every mixer) from the MLM encoder and from scratch: the gain (accuracy pre-trained - scratch) per
   fraction is how much of the pre-training transfers, largest where labels are few.

Every arm trains through ``training``'s one loop: the pre-training with ``training.run_phase`` (the language
model phase), each fine-tune as a ``training.Phase`` of its own (:func:`finetune`: ``training.make_optimizer``,
batches addressed by step) run by ``training.run_loop``.
Positions: ``attention`` uses RoPE, the other mixers none (their token matrices, kernels or DFT phases carry
position; FNet and conv run at any length). Outputs in the workdir: ``report.json``, ``table.md``,
``mixers.png`` and one sub-directory per pre-training arm (metrics, checkpoints: a killed study resumes), with
``genre_pretrained/`` and ``genre_scratch/`` for its fine-tunes and ``<task>_f<fraction>_pretrained/`` /
``_scratch/`` for the label-fraction ones (e.g. ``order_f0.01_pretrained/``); a finished fine-tune is read back
from its metrics, not rerun.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kexue_jax.experiments import analytic  # GENRES, FOLIO_GENRE, spoken_lines
from kexue_jax import config as config_lib
from kexue_jax import data as data_lib
from kexue_jax import flops as flops_lib
from kexue_jax import metrics as metrics_lib
from kexue_jax import reporting
from kexue_jax import training
from kexue_jax.nn import Transformer, TransformerConfig
from kexue_jax.nn.mixers import BIDIRECTIONAL_ONLY, MIXERS
from kexue_jax.streams import stream_seed

ALL_MIXERS = ("attention",) + MIXERS
OBJECTIVES = ("mlm", "lm")


# ------------------------------------------------------------------------------------------------
# Models at matched parameter count.

def param_count(cfg: TransformerConfig) -> int:
    shapes = jax.eval_shape(lambda key: Transformer(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"],
                            jax.random.PRNGKey(0))
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


def match_d_ff(cfg: TransformerConfig, target: int, multiple: int = 8) -> int:
    """The d_ff (a multiple of ``multiple``, >= multiple) whose parameter count is closest to ``target``:
    the count is affine in d_ff, so two evaluations give it."""
    a, b = param_count(cfg.replace(d_ff=multiple)), param_count(cfg.replace(d_ff=2 * multiple))
    per = (b - a) / multiple
    best = multiple + (target - a) / per if per > 0 else multiple
    return max(multiple, int(round(best / multiple)) * multiple)


def mixer_config(base: TransformerConfig, mixer: str, objective: str, target_params: int | None) -> TransformerConfig:
    """The study's model for ``mixer`` and ``objective``: causal for LM, bidirectional for MLM; RoPE for
    attention, no position embedding otherwise; d_ff matched to ``target_params`` (None: base d_ff)."""
    if mixer not in ALL_MIXERS:
        raise ValueError(f"config.study.mixers entries must be in {ALL_MIXERS}, got {mixer!r}")
    cfg = base.replace(token_mixer=mixer, mask="causal" if objective == "lm" else "bidirectional",
                       position="rope" if mixer == "attention" else "none")
    return cfg if target_params is None else cfg.replace(d_ff=match_d_ff(cfg, target_params))


def arms(study) -> list[tuple[str, str]]:
    """(mixer, objective) pairs the study trains: MLM for all, LM where the mixer has a causal form."""
    out = []
    for objective in study.objectives:
        for mixer in study.mixers:
            if objective == "lm" and mixer in BIDIRECTIONAL_ONLY:
                continue
            out.append((mixer, objective))
    return out


# ------------------------------------------------------------------------------------------------
# Pre-training, speed and length transfer.

def _arm_config(config, objective: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.objective = objective
    c.experiment = "lm"
    return c


def tokens_per_second(model: Transformer, tx, state, batch, steps: int) -> float:
    """Median tokens/s of the jitted training step over ``steps`` timed steps (after one warm-up)."""
    step = jax.jit(training.make_train_step(model, tx))
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return float(batch["inputs"].size / np.median(times))


def interleaved_speed(config, base: TransformerConfig, target: int, rounds: int) -> dict:
    """Tokens/s of every arm's training step measured in interleaved rounds (best of ``rounds``), so that load
    from other processes hits all mixers alike: {"mixer/objective": tokens/s}."""
    c = _arm_config(config, "mlm")
    steps = {}
    for mixer, objective in arms(config.study):
        cfg = mixer_config(base, mixer, objective, target)
        c.data.objective = objective
        batch = {k: jnp.asarray(v) for k, v in training.host_batch(load_corpus_cached(config), c.data, 0, 0).items()}
        tx = training.make_optimizer(c.optim, c.train.steps)
        model = Transformer(cfg)
        state = training.init_state(model, tx, jax.random.PRNGKey(0), c.data.seq_len)
        step = jax.jit(training.make_train_step(model, tx))
        jax.block_until_ready(step(state, batch))
        steps[f"{mixer}/{objective}"] = (step, state, batch)
    best = {name: math.inf for name in steps}
    for _ in range(rounds):
        for name, (step, state, batch) in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(step(state, batch))
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: float(steps[name][2]["inputs"].size / t) for name, t in best.items()}


_CORPUS: dict = {}


def load_corpus_cached(config):
    key = (config.data.path, config.data.val_fraction, config.data.split_seed, config.data.seq_len)
    if key not in _CORPUS:
        _CORPUS[key] = training.load_corpus(config.data)
    return _CORPUS[key]


def eval_loss(cfg: TransformerConfig, params, corpus, data_cfg, seq_len: int, num_batches: int, seed: int):
    """Validation loss at ``seq_len`` (nats per predicted byte), or the error message when the mixer cannot
    take that length (n x n parameters beyond max_len)."""
    d = ml_collections.ConfigDict(data_cfg.to_dict())
    d.seq_len = seq_len
    batches = training.eval_host_batches(corpus, d, num_batches, seed)
    step = jax.jit(training.make_eval_step(Transformer(cfg)))
    tot = cnt = 0.0
    try:
        for b in batches:
            s, n = step(params, {k: jnp.asarray(v) for k, v in b.items()})
            tot, cnt = tot + float(s), cnt + float(n)
    except ValueError as e:
        if "max_len" not in str(e):
            raise
        return "raises"
    return tot / max(cnt, 1.0)


def pretrain(config, cfg: TransformerConfig, objective: str, workdir: str, corpus, mesh) -> dict:
    """Train one arm with ``training.run_phase``; return its measurements and parameters."""
    c = _arm_config(config, objective)
    tx = training.make_optimizer(c.optim, c.train.steps)
    model = Transformer(cfg)
    phase = training.Phase(model_cfg=cfg, tx=tx, start=0, end=c.train.steps, workdir=workdir,
                           init=training.state_initializer(model, tx, c.data.seq_len),
                           name=f"{cfg.token_mixer}/{objective}")
    t0 = time.perf_counter()
    result = training.run_phase(phase, c, corpus, mesh)
    wall = time.perf_counter() - t0
    batch = {k: jnp.asarray(v) for k, v in training.host_batch(corpus, c.data, 0, int(c.seed)).items()}
    speed = tokens_per_second(model, tx, jax.device_get(result.state), batch, config.study.time_steps)
    seq = c.data.seq_len
    out = {"mixer": cfg.token_mixer, "objective": objective, "params": param_count(cfg), "d_ff": cfg.d_ff,
           "flops_per_token": flops_lib.training_flops(cfg, seq, 1) / seq, "tokens_per_s": speed,
           "wall_s": wall, "val_loss": result.history[-1]["val_loss"],
           "curve": [(h["step"], h["val_loss"]) for h in result.history]}
    for length in config.study.eval_lengths:
        out[f"val_loss_at_{length}"] = eval_loss(cfg, result.state.params, corpus, c.data, length,
                                                 config.train.eval_batches, int(c.seed))
    return out, result.state.params


# ------------------------------------------------------------------------------------------------
# Task transfer: genre of a line.

def _encode_lines(texts: list[str], labels, length: int):
    """``(ids [n, length] PAD-padded / cropped bytes, real [n, length] 1 on the line's bytes, labels [n])``."""
    ids = np.full((len(texts), length), data_lib.PAD, np.int32)
    real = np.zeros((len(texts), length), np.float32)
    for r, text in enumerate(texts):
        b = data_lib.encode(text)[:length]
        ids[r, :len(b)], real[r, :len(b)] = b, 1.0
    return ids, real, np.asarray(labels, np.int32)


def _task_data(train, test, num_classes: int) -> dict:
    """A fine-tuning task: its splits, class count and the test accuracy of the training majority class."""
    return {"train": train, "test": test, "num_classes": num_classes,
            "majority": float(np.mean(test[2] == np.bincount(train[2], minlength=num_classes).argmax()))}


def _all_spoken_lines() -> tuple[list[str], list[int]]:
    """Every spoken line of every play and its play's First Folio genre (index into ``analytic.GENRES``)."""
    texts, labels = [], []
    for play in data_lib.load_plays():
        lines = analytic.spoken_lines(play.text)
        texts += lines
        labels += [analytic.GENRES.index(analytic.FOLIO_GENRE[play.name])] * len(lines)
    return texts, labels


def genre_lines(study, seed: int) -> dict:
    """Spoken lines (bytes, PAD-padded/cropped to ``study.ft_seq_len``), First Folio genre labels; a seeded
    split of ``ft_train_lines`` / ``ft_test_lines`` lines (as the analytic experiment: all plays)."""
    texts, labels = _all_spoken_lines()
    order = np.random.default_rng(seed).permutation(len(texts))
    n_tr, n_te = study.ft_train_lines, study.ft_test_lines
    if n_tr + n_te > len(texts):
        raise ValueError(f"config.study.ft_train_lines + ft_test_lines must be <= {len(texts)} lines")

    def encode(idx):
        return _encode_lines([texts[i] for i in idx], [labels[i] for i in idx], study.ft_seq_len)

    return _task_data(encode(order[:n_tr]), encode(order[n_tr:n_tr + n_te]), len(analytic.GENRES))


#: Lines of the word-order task have at least this many words, two of them different (a shuffle can differ).
ORDER_MIN_WORDS = 4


def order_lines(study, seed: int) -> dict:
    """The word-order task: is a spoken line as spoken (label 0) or are its words shuffled (label 1)?

    Lines with >= ``ORDER_MIN_WORDS`` words (two distinct); a seeded split of ``ft_train_lines`` /
    ``ft_test_lines`` of them, exactly half of all labelled 1 (seeded); a label-1 line's words are put in a
    seeded random order other than the spoken one (the text differs). Both classes are written with single
    spaces between words (whitespace carries no label) and PAD-padded / cropped to ``study.ft_seq_len``.
    The bytes of a line are the same in both classes, so a classifier of byte counts is at chance: the task
    needs the order of the words, what a masked language model learns (kexue.fm/archives/8431 asks whether
    mixers with learned fixed token matrices transfer it as attention does)."""
    texts = [t for t in _all_spoken_lines()[0] if len(t.split()) >= ORDER_MIN_WORDS and len(set(t.split())) > 1]
    n_tr, n_te = study.ft_train_lines, study.ft_test_lines
    if n_tr + n_te > len(texts):
        raise ValueError(f"config.study.ft_train_lines + ft_test_lines must be <= {len(texts)} lines "
                         f"(the lines of >= {ORDER_MIN_WORDS} words)")
    rng = np.random.default_rng([seed, 8431])
    chosen = rng.permutation(len(texts))[:n_tr + n_te]
    labels = rng.permutation(n_tr + n_te) % 2
    out = []
    for i, y in zip(chosen, labels):
        words = texts[i].split()
        line = " ".join(words)
        while y:
            shuffled = " ".join(words[j] for j in rng.permutation(len(words)))
            if shuffled != line:
                line = shuffled
                break
        out.append(line)
    return _task_data(_encode_lines(out[:n_tr], labels[:n_tr], study.ft_seq_len),
                      _encode_lines(out[n_tr:], labels[n_tr:], study.ft_seq_len), 2)


#: The tasks of the label-fraction fine-tunes (``study.ft_fraction_task``).
FRACTION_TASKS = {"order": order_lines, "genre": genre_lines}


def label_subset(n_train: int, fraction: float, seed: int) -> np.ndarray:
    """The training lines (sorted indices into ``range(n_train)``) whose labels a fine-tune with ``fraction`` of
    the labels uses: the first ``max(1, round(fraction * n_train))`` of one seeded permutation, so the subsets
    are nested (1% inside 10% inside all) and depend on the seed alone, the same for every mixer and arm."""
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"config.study.ft_label_fractions entries must be in (0, 1], got {fraction!r}")
    n = max(1, int(round(fraction * n_train)))
    return np.sort(np.random.default_rng([seed, 8431, 1]).permutation(n_train)[:n])


def with_labels(data: dict, idx: np.ndarray) -> dict:
    """``data`` with the training split cut to the lines ``idx`` (the test split whole)."""
    return {**data, "train": tuple(a[idx] for a in data["train"])}


def genre_config(config, steps: int | None = None, **data) -> ml_collections.ConfigDict:
    """The config of a fine-tune (a ``training.run_loop`` phase): ``study.ft_*`` as optim / train / data
    fields. AdamW (``training.make_optimizer``, no clipping, b2 0.999, weight decay 0.01 on matrices) at
    ``ft_lr`` with a linear warmup over a tenth of the steps and a cosine decay to 0; the test accuracy at the
    end; seed: the "fine_tune" stream of ``config.seed`` (the init key and the batches). ``steps``: the fine-tune's steps (None:
    ``study.ft_steps``, the genre fine-tune); ``data``: further ``data`` fields (a label-fraction fine-tune
    names its task, fraction and lines, so that its workdir resumes under that data only)."""
    s = config.study
    steps = int(s.ft_steps if steps is None else steps)
    return ml_collections.ConfigDict(dict(
        experiment="mixers_genre", seed=stream_seed(int(config.seed), "fine_tune"),
        optim=dict(lr=float(s.ft_lr), warmup_steps=max(1, steps // 10), schedule="cosine", min_lr_ratio=0.0,
                   weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip_norm=None),
        train=dict(steps=steps, log_every=max(1, steps // 4), eval_every=steps, checkpoint_every=steps,
                   keep_checkpoints=1),
        data=dict(batch_size=int(s.ft_batch), seq_len=int(s.ft_seq_len), **data),
        parallel=config.parallel.to_dict()))


def genre_logits(model: Transformer, params, ids, real):
    """Mean-pooled final states over the line's bytes (``real`` = 1), then the linear classifier."""
    h = model.apply({"params": params["encoder"]}, ids)
    pooled = jnp.sum(h * real[..., None], 1) / jnp.maximum(jnp.sum(real, 1, keepdims=True), 1.0)
    return pooled @ params["cls"]["kernel"] + params["cls"]["bias"]


def _finished_accuracy(fc, workdir: str) -> float | None:
    """The test accuracy a finished fine-tune of config ``fc`` recorded in ``workdir`` (None: not finished),
    read from its metrics, so that a finished study reruns without restoring or compiling anything.
    A workdir of another config raises (``training.check_resume``)."""
    training.check_resume(fc, workdir)
    if not os.path.exists(os.path.join(workdir, metrics_lib.METRICS_FILE)):
        return None
    done = [r for r in metrics_lib.read_metrics(workdir) if r.get("step") == fc.train.steps and "test_accuracy" in r]
    return float(done[-1]["test_accuracy"]) if done else None


def finetune(cfg: TransformerConfig, encoder_params, data: dict, config, workdir: str, mesh,
             fc: ml_collections.ConfigDict | None = None) -> float:
    """Fine-tune the mean-pooled encoder + a linear classifier (``data["num_classes"]``, default the 3 genres)
    for ``fc.train.steps`` steps, a ``training.Phase`` run by ``training.run_loop`` in ``workdir`` (``fc``: the
    fine-tune's config, default :func:`genre_config`; resumable; a finished one is read back from its
    metrics); returns its test accuracy. ``encoder_params`` None: the encoder starts from its random init (the
    scratch arm)."""
    fc = genre_config(config) if fc is None else fc
    done = _finished_accuracy(fc, workdir)
    if done is not None:
        return done
    model = Transformer(cfg.replace(head="none"))
    k_init, k_cls = jax.random.split(jax.random.PRNGKey(fc.seed))
    if encoder_params is None:
        encoder_params = model.init(k_init, jnp.zeros((1, fc.data.seq_len), jnp.int32))["params"]
    num = int(data.get("num_classes", len(analytic.GENRES)))
    params = {"encoder": jax.tree_util.tree_map(jnp.array, encoder_params),
              "cls": {"kernel": jax.random.normal(k_cls, (cfg.d_model, num)) / math.sqrt(cfg.d_model),
                      "bias": jnp.zeros((num,))}}
    tx = training.make_optimizer(fc.optim, fc.train.steps)
    ids, real, y = data["train"]

    def loss_fn(p, batch, key, step):
        logits = genre_logits(model, p, batch["ids"], batch["real"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])), {}

    def batch_fn(step):
        idx = data_lib.batch_rng(fc.seed, step).integers(0, len(y), fc.data.batch_size)
        return {"ids": ids[idx], "real": real[idx], "y": y[idx]}

    predict = jax.jit(lambda p, i, r: jnp.argmax(genre_logits(model, p, i, r), -1))

    def accuracy(p, step) -> dict:
        p, (ti, tr, ty) = jax.device_get(p), data["test"]
        correct = sum(int(np.sum(np.asarray(predict(p, ti[s:s + 256], tr[s:s + 256])) == ty[s:s + 256]))
                      for s in range(0, len(ty), 256))
        return {"test_accuracy": correct / len(ty)}

    phase = training.Phase(
        tx=tx, start=0, end=fc.train.steps, workdir=workdir, name=os.path.basename(workdir),
        state=training.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), loss_fn=loss_fn,
        batch_fn=batch_fn, evaluators={"test": accuracy}, eval_at_start=False,
        schedule=training.make_schedule(fc.optim, fc.train.steps))
    return training.run_loop(phase, fc, mesh).history[-1]["test_accuracy"]


# ------------------------------------------------------------------------------------------------
# The study.

def validate(config) -> TransformerConfig:
    """Check the study's config before anything is read or compiled; returns the base model config."""
    base = config_lib.validate(_arm_config(config, "mlm"))
    if base.layer_masks:  # the study sets the mask per objective (causal for LM): per-layer masks would override it
        raise config_lib.ConfigError(f"config.model.layer_masks must be () in the mixer study (it uses a causal mask "
                                     f"for LM and a bidirectional one for MLM), got {base.layer_masks!r}")
    s = config.study
    for m in s.mixers:
        if m not in ALL_MIXERS:
            raise ValueError(f"config.study.mixers entries must be in {ALL_MIXERS}, got {m!r}")
    for o in s.objectives:
        if o not in OBJECTIVES:
            raise ValueError(f"config.study.objectives entries must be in {OBJECTIVES}, got {o!r}")
    if s.reference not in ALL_MIXERS:
        raise ValueError(f"config.study.reference must be one of {ALL_MIXERS}, got {s.reference!r}")
    for name in ("ft_steps", "ft_batch", "ft_seq_len", "ft_train_lines", "ft_test_lines", "time_steps"):
        if not isinstance(s[name], int) or s[name] < 1:
            raise ValueError(f"config.study.{name} must be a positive integer, got {s[name]!r}")
    if s.ft_seq_len > base.max_len:
        raise ValueError(f"config.study.ft_seq_len must be <= model.max_len={base.max_len}")
    fractions = s.get("ft_label_fractions", ())
    if not isinstance(fractions, (tuple, list)):
        raise ValueError(f"config.study.ft_label_fractions must be a tuple of fractions in (0, 1], got {fractions!r}")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ValueError(f"config.study.ft_label_fractions entries must be in (0, 1], got {f!r}")
    if len(set(fractions)) != len(fractions):
        raise ValueError(f"config.study.ft_label_fractions entries must be distinct, got {tuple(fractions)!r}")
    if fractions:
        if s.get("ft_fraction_task") not in FRACTION_TASKS:
            raise ValueError(f"config.study.ft_fraction_task must be one of {tuple(FRACTION_TASKS)}, "
                             f"got {s.get('ft_fraction_task')!r}")
        steps = s.get("ft_fraction_steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"config.study.ft_fraction_steps must be a positive integer, got {steps!r}")
    devices = training.build_mesh(config).size
    if s.ft_batch % devices:
        raise ValueError(f"config.study.ft_batch must be a multiple of the {devices} devices of the mesh, "
                         f"got {s.ft_batch}")
    for m in s.mixers:  # every model the study builds must be a valid config
        for o in s.objectives:
            if not (o == "lm" and m in BIDIRECTIONAL_ONLY):
                mixer_config(base, m, o, None)
    return base


def run(config, workdir: str) -> dict:
    """Run the whole study (see the module docstring); returns and writes the results."""
    base = validate(config)
    study = config.study
    os.makedirs(workdir, exist_ok=True)
    corpus = load_corpus_cached(config)
    mesh = training.build_mesh(config)
    target = param_count(mixer_config(base, study.reference, "mlm", None))
    results: dict = {"reference": study.reference, "target_params": target, "seq_len": config.data.seq_len,
                     "arms": [], "transfer": []}
    data = genre_lines(study, int(config.seed)) if study.ft_steps else None
    if data is not None:
        results["majority"] = data["majority"]
    fractions = tuple(float(f) for f in study.get("ft_label_fractions", ()))
    if fractions:
        task = study.ft_fraction_task
        fdata = FRACTION_TASKS[task](study, int(config.seed))
        subsets = {f: label_subset(len(fdata["train"][2]), f, int(config.seed)) for f in fractions}
        results["fraction_task"] = {"task": task, "steps": int(study.ft_fraction_steps),
                                    "num_classes": fdata["num_classes"], "majority": fdata["majority"],
                                    "train_lines": len(fdata["train"][2]), "test_lines": len(fdata["test"][2])}
        results["transfer_fractions"] = []
    for mixer, objective in arms(study):
        cfg = mixer_config(base, mixer, objective, target)
        print(f"== {mixer} / {objective}: d_ff {cfg.d_ff}, {param_count(cfg):,} params", flush=True)
        arm = os.path.join(workdir, f"{mixer}_{objective}")
        row, params = pretrain(config, cfg, objective, arm, corpus, mesh)
        results["arms"].append(row)
        if objective == "mlm" and data is not None:  # task transfer right away: partial runs keep it
            pre = finetune(cfg, params, data, config, os.path.join(arm, "genre_pretrained"), mesh)
            scratch = finetune(cfg, None, data, config, os.path.join(arm, "genre_scratch"), mesh)
            results["transfer"].append({"mixer": mixer, "pretrained": pre, "scratch": scratch})
            print(f"   genre accuracy {mixer}: pre-trained {pre:.4f}, scratch {scratch:.4f}", flush=True)
        if objective == "mlm" and fractions:
            results["transfer_fractions"] += transfer_by_fraction(cfg, params, fdata, subsets, config, arm, mesh)
        _write(results, workdir)
    if study.speed_rounds:
        add_speed(results, config, base, target)
    _write(results, workdir, final=True)
    return results


def transfer_by_fraction(cfg: TransformerConfig, params, data: dict, subsets: dict, config, arm: str,
                         mesh) -> list[dict]:
    """Fine-tune on ``study.ft_fraction_task`` with each fraction of the labels (``subsets``: fraction ->
    :func:`label_subset`), from the MLM encoder ``params`` and from scratch, ``study.ft_fraction_steps`` steps
    each, in ``arm/<task>_f<fraction>_{pretrained,scratch}``; one row per fraction with both test accuracies
    and the gain (pre-trained - scratch): how much the pre-training transfers when labels are few."""
    task, rows = config.study.ft_fraction_task, []
    for fraction, idx in subsets.items():
        fc = genre_config(config, int(config.study.ft_fraction_steps), task=task, label_fraction=fraction,
                          labelled_lines=len(idx), train_lines=len(data["train"][2]),
                          test_lines=len(data["test"][2]))
        sub, name = with_labels(data, idx), os.path.join(arm, f"{task}_f{fraction:g}")
        pre = finetune(cfg, params, sub, config, name + "_pretrained", mesh, fc)
        scratch = finetune(cfg, None, sub, config, name + "_scratch", mesh, fc)
        rows.append({"mixer": cfg.token_mixer, "task": task, "fraction": fraction, "labelled_lines": len(idx),
                     "pretrained": pre, "scratch": scratch, "gain": pre - scratch})
        print(f"   {task} accuracy {cfg.token_mixer} with {fraction * 100:g}% of the labels ({len(idx)} lines): "
              f"pre-trained {pre:.4f}, scratch {scratch:.4f}, gain {pre - scratch:+.4f}", flush=True)
    return rows


def add_speed(results: dict, config, base: TransformerConfig, target: int) -> None:
    """Put the interleaved tokens/s of every arm into ``results`` (``tokens_per_s_interleaved``)."""
    speed = interleaved_speed(config, base, target, config.study.speed_rounds)
    for row in results["arms"]:
        row["tokens_per_s_interleaved"] = speed.get(f"{row['mixer']}/{row['objective']}")


def _fmt(v, spec=".3f"):
    return v if isinstance(v, str) else format(v, spec)


def table(results: dict) -> str:
    """The markdown table of the study."""
    lengths = sorted({int(k.rsplit("_", 1)[1]) for r in results["arms"] for k in r if k.startswith("val_loss_at_")})
    head = (f"| mixer | objective | params | d_ff | MFLOPs/token (train) | tokens/s | "
            f"val loss @{results.get('seq_len', 128)} | "
            + " | ".join(f"@{n}" for n in lengths) + " |")
    lines = [head, "|" + "---|" * (7 + len(lengths))]
    for r in results["arms"]:
        lines.append(f"| {r['mixer']} | {r['objective']} | {r['params']:,} | {r['d_ff']} | "
                     f"{r['flops_per_token'] / 1e6:.2f} | "
                     f"{r.get('tokens_per_s_interleaved') or r['tokens_per_s']:.0f} | "
                     f"{r['val_loss']:.3f} | "
                     + " | ".join(_fmt(r.get(f'val_loss_at_{n}', '-')) for n in lengths) + " |")
    if results.get("transfer"):
        lines += ["", f"Genre of a line (3 classes, majority {results['majority']:.3f}), test accuracy:", "",
                  "| mixer | from MLM pre-training | from scratch | gain |", "|---|---|---|---|"]
        for t in results["transfer"]:
            lines.append(f"| {t['mixer']} | {t['pretrained']:.3f} | {t['scratch']:.3f} | "
                         f"{t['pretrained'] - t['scratch']:+.3f} |")
    if results.get("transfer_fractions"):
        ft = results["fraction_task"]
        what = TASK_TITLES.get(ft["task"], ft["task"])
        lines += ["", f"{what} ({ft['num_classes']} classes, majority {ft['majority']:.3f}), test accuracy "
                  f"({ft['test_lines']:,} lines) after {ft['steps']} fine-tuning steps on a fraction of the "
                  f"{ft['train_lines']:,} training lines (the same lines for every mixer):", "",
                  "| mixer | labels (lines) | from MLM pre-training | from scratch | gain |", "|---|---|---|---|---|"]
        for t in results["transfer_fractions"]:
            lines.append(f"| {t['mixer']} | {t['fraction'] * 100:g}% ({t['labelled_lines']:,}) | "
                         f"{t['pretrained']:.3f} | {t['scratch']:.3f} | {t['gain']:+.3f} |")
    return "\n".join(lines) + "\n"


#: Titles of the label-fraction tasks in the table.
TASK_TITLES = {"order": "Word order of a line (as spoken / words shuffled)", "genre": "Genre of a line"}


def _write(results: dict, workdir: str, final: bool = False) -> None:
    reporting.write_json_atomic(os.path.join(workdir, "report.json"), results, indent=1)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table(results))
    if final:
        print(table(results), flush=True)
        plot(results, os.path.join(workdir, "mixers.png"))


def plot(results: dict, out: str) -> bool:
    """Validation loss against tokens/s (both objectives), the genre accuracies per mixer and, when the study
    fine-tuned with fractions of the labels, the gain (pre-trained - scratch) per mixer and fraction."""
    by_fraction = results.get("transfer_fractions") or []
    fig = reporting.figure(figsize=(18 if by_fraction else 12, 4.5))
    if fig is None:
        return False
    axes = fig.subplots(1, 3 if by_fraction else 2)
    for objective, marker in (("mlm", "o"), ("lm", "s")):
        rows = [r for r in results["arms"] if r["objective"] == objective]
        speed = [r.get("tokens_per_s_interleaved") or r["tokens_per_s"] for r in rows]
        axes[0].scatter(speed, [r["val_loss"] for r in rows], marker=marker,
                        label=objective)
        for r, v in zip(rows, speed):
            axes[0].annotate(r["mixer"], (v, r["val_loss"]), fontsize=7)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("training tokens/s (log scale)")
    axes[0].set_ylabel("validation loss (nats/byte) at length 128")
    axes[0].legend()
    if results.get("transfer"):
        names = [t["mixer"] for t in results["transfer"]]
        x = np.arange(len(names))
        axes[1].bar(x - 0.2, [t["pretrained"] for t in results["transfer"]], 0.4, label="from MLM")
        axes[1].bar(x + 0.2, [t["scratch"] for t in results["transfer"]], 0.4, label="scratch")
        axes[1].axhline(results["majority"], color="k", lw=0.8, ls="--", label="majority")
        axes[1].set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        accs = [t[k] for t in results["transfer"] for k in ("pretrained", "scratch")] + [results["majority"]]
        axes[1].set_ylim(min(accs) - 0.03, max(accs) + 0.03)
        axes[1].set_ylabel("genre test accuracy")
        axes[1].legend()
    if by_fraction:
        names = list(dict.fromkeys(t["mixer"] for t in by_fraction))
        fractions = sorted({t["fraction"] for t in by_fraction})
        gain = {(t["mixer"], t["fraction"]): t["gain"] for t in by_fraction}
        x, width = np.arange(len(names)), 0.8 / len(fractions)
        for i, f in enumerate(fractions):
            axes[2].bar(x + (i - (len(fractions) - 1) / 2) * width, [gain.get((m, f), np.nan) for m in names],
                        width, label=f"{f * 100:g}% of the labels")
        axes[2].axhline(0.0, color="k", lw=0.8)
        axes[2].set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        axes[2].set_ylabel(f"{results['fraction_task']['task']}: accuracy pre-trained - scratch")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kexue_jax.experiments.mixers", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--variant", default="default", help="configs/mixers.py variant (tiny, default, gpu)")
    parser.add_argument("--speed-only", action="store_true",
                        help="only (re)measure the interleaved tokens/s into an existing WORKDIR/report.json "
                        "(or the results.json of an older study)")
    args = parser.parse_args(argv)
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "mixers.py")
    spec = importlib.util.spec_from_file_location("mixers_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(args.variant)
    if args.speed_only:
        base = validate(config)
        path = os.path.join(args.workdir, "report.json")
        if not os.path.exists(path):  # a study finished before the file was renamed from results.json
            path = os.path.join(args.workdir, "results.json")
        with open(path) as f:
            results = json.load(f)
        add_speed(results, config, base, results["target_params"])
        _write(results, args.workdir, final=True)
        return 0
    run(config, args.workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
