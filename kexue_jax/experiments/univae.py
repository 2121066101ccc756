"""UniVAE job and CLI (kexue.fm/archives/8475): ``python train.py --config=configs/univae.py[:tiny]``.

Data: Shakespeare's spoken lines (speaker-name lines dropped) of at most ``src_len - 2`` bytes, each as
``[CLS] bytes [SEP] PAD...`` (fixed length ``src_len``), or the lines of ``data.path`` (a file, folder or
glob of UTF-8 text); train and held-out lines come from disjoint plays or files (``data.split_documents``;
a single file holds out its last ``data.val_fraction`` of lines). Training: a ``training.Phase``
(:func:`univae_phase`: AdamW of ``training.make_optimizer``, z ~ vMF(mu, kappa), batches a pure function of
(seed, step), the held-out reconstruction loss as its evaluator) run by ``training.run_loop``, the loop of
every job: checkpoints (a rerun resumes bitwise), SIGTERM / Ctrl-C save the current step, metrics.jsonl /
progress line / loss.png. After training,
process 0 writes into the workdir:

* ``samples.md``: 10 prior samples, 10 held-out reconstructions, and for 5 held-out lines 5 resamples of
  the lowest latent layer and 5 of the highest;
* latent layers are numbered from 0 = the lowest, everywhere: ``--layers`` of the CLI, ``univae.resample``,
  report.json's ``multiscale.layers`` and samples.md; the Transformer layer each one sits on (counted from
  0) is given beside it (``multiscale.transformer_layers``);
* ``report.json``: reconstruction from mu on held-out lines (exact-match rate, byte accuracy); the
  multi-scale claim (resample the lowest vs the highest latent layer of ``eval.n_resample`` held-out lines:
  byte edit distance to the source and MiniLM cosine similarity, ``kexue_jax.hf.embed``); prior-sample
  bits/byte under an independently trained byte LM (``configs/lm.py:<eval.lm_variant>``, trained or
  resumed under ``workdir/lm``) against the same LM's bits/byte on real held-out lines.

CLI for a trained workdir::

    python -m kexue_jax.experiments.univae sample --workdir DIR [--n 10] [--method greedy|beam|sample]
    python -m kexue_jax.experiments.univae reconstruct --workdir DIR --text "To be, or not to be"
    python -m kexue_jax.experiments.univae resample --workdir DIR --text "..." --layers 0 [--n 5]
    python -m kexue_jax.experiments.univae interpolate --workdir DIR --text "..." --text2 "..." [--steps 5]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kexue_jax import checkpoint as ckpt_lib
from kexue_jax import config as config_lib
from kexue_jax import data as data_lib
from kexue_jax import metrics as metrics_lib
from kexue_jax import parallel
from kexue_jax import reporting
from kexue_jax import training
from kexue_jax import univae as U
from kexue_jax.streams import stream_key, stream_seed

_SPEAKER_LINE = re.compile(r"^[^\s:][^:]*:$")


# ------------------------------------------------------------------------------------------------
# Data.

#: what ``distinct_lines`` does with a line longer than max_bytes (``config.data.long_lines``)
LONG_LINES = ("drop", "split")


def line_pieces(line: str, max_bytes: int) -> list[str]:
    """``line`` cut at spaces into consecutive pieces of at most ``max_bytes`` UTF-8 bytes, each as long as the
    words allow (greedy packing, words in order, single spaces). A word longer than ``max_bytes`` ends the
    current piece and is left out. A line that fits is its own single piece."""
    pieces, cur = [], ""
    for word in line.split():
        cand = f"{cur} {word}" if cur else word
        if len(cand.encode("utf-8")) <= max_bytes:
            cur = cand
            continue
        if cur:
            pieces.append(cur)
        cur = word if len(word.encode("utf-8")) <= max_bytes else ""
    return pieces + ([cur] if cur else [])


def distinct_lines(plays, max_bytes: int, min_bytes: int = 1, long_lines: str = "drop") -> list[str]:
    """Distinct spoken lines (speaker-name lines ``NAME:`` dropped) of min_bytes..max_bytes UTF-8 bytes,
    in corpus order. ``long_lines="split"`` also keeps the ``line_pieces`` of every longer line (more distinct
    training text from the same plays: 93,696 spoken lines in the 34 training plays, 76,690 of them longer
    than 30 bytes); "drop" leaves them out."""
    if long_lines not in LONG_LINES:
        raise ValueError(f"long_lines must be one of {LONG_LINES}, got {long_lines!r}")
    seen, out = set(), []
    for play in plays:
        for line in play.text.split("\n"):
            line = line.strip()
            if not line or _SPEAKER_LINE.match(line):
                continue
            n = len(line.encode("utf-8"))
            pieces = line_pieces(line, max_bytes) if n > max_bytes and long_lines == "split" else [line]
            for piece in pieces:
                if min_bytes <= len(piece.encode("utf-8")) <= max_bytes and piece not in seen:
                    seen.add(piece)
                    out.append(piece)
    return out


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A tokenizer for lines: ids of a text (no specials), text of ids, and the special ids."""

    encode: Callable[[str], np.ndarray]
    decode: Callable[[np.ndarray], str]
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int


BYTES = Vocab(data_lib.encode, data_lib.decode, data_lib.CLS, data_lib.SEP, data_lib.PAD, data_lib.MASK)


def wordpiece_vocab(model_dir) -> Vocab:
    """The WordPiece tokenizer of a HF BERT directory (all-MiniLM-L6-v2: [CLS]=101, [SEP]=102, [PAD]=0)."""
    from kexue_jax import hf  # noqa: PLC0415

    tok = hf.load_tokenizer(model_dir)
    ids = {name: tok.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]", "[MASK]")}
    return Vocab(lambda t: np.asarray(tok.encode(t, add_special_tokens=False).ids, np.int32),
                 lambda x: tok.decode([int(i) for i in x if int(i) not in ids.values()]),
                 ids["[CLS]"], ids["[SEP]"], ids["[PAD]"], ids["[MASK]"])


def vocab_for(c) -> Vocab:
    if c.univae.init_from == "minilm":
        from kexue_jax import hf  # noqa: PLC0415

        return wordpiece_vocab(hf.minilm_path())
    return BYTES


def to_tokens(lines: Sequence[str], src_len: int, vocab: Vocab = BYTES) -> np.ndarray:
    """[N, src_len] int32: [CLS] ids [SEP] PAD ... (lines longer than src_len - 2 tokens are cut)."""
    out = np.full((len(lines), src_len), vocab.pad_id, np.int32)
    for i, line in enumerate(lines):
        b = vocab.encode(line)[:src_len - 2]
        out[i, 0] = vocab.cls_id
        out[i, 1:1 + len(b)] = b
        out[i, 1 + len(b)] = vocab.sep_id
    return out


def to_text(tokens, vocab: Vocab = BYTES) -> str:
    """Text of one generated / source row: tokens up to the first [SEP] (specials dropped)."""
    t = np.asarray(tokens).reshape(-1)
    stop = np.flatnonzero(t == vocab.sep_id)
    t = t[:stop[0]] if stop.size else t
    return vocab.decode(t[(t != vocab.pad_id) & (t != vocab.cls_id)])


def load_lines(c) -> tuple[list[str], list[str]]:
    """(train lines, held-out lines) from disjoint documents (``data.split_documents``: whole plays or files;
    a single file gives its last ``data.val_fraction`` of lines, as ``configs/lm.py`` splits it). Raises
    ConfigError naming ``data.path`` for a path that gives no text or too few lines."""
    try:
        plays = data_lib.load_plays(c.data.path or None)
    except ValueError as e:
        message = f"config.{e}" if str(e).startswith("data.") else f"config.data.path: {e}"
        raise config_lib.ConfigError(message) from None
    train, val = data_lib.split_documents(plays, c.data.val_fraction, c.data.split_seed)
    mx = c.univae.src_len - 2
    tr = distinct_lines(train, mx, c.data.min_bytes, c.data.get("long_lines", "drop"))
    va = distinct_lines(val, mx, c.data.min_bytes)  # whole lines only: the held-out set never changes
    if len(tr) < c.data.batch_size or len(va) < 10:
        source = repr(c.data.path) if c.data.path else "the embedded corpus"
        raise config_lib.ConfigError(
            f"config.data.path: {source} has too few distinct lines of {c.data.min_bytes}..{mx} bytes (train "
            f"{len(tr)}, need data.batch_size={c.data.batch_size}; held-out {len(va)}, need 10); give more text, "
            f"lower data.min_bytes or data.batch_size, or raise univae.src_len")
    return tr, va


def host_batch(tokens: np.ndarray, step: int, seed: int, batch_size: int) -> np.ndarray:
    """This process's rows of the batch of ``step``: lines drawn by ``data.batch_rng(seed, step)``."""
    idx = data_lib.batch_rng(seed, step).integers(0, tokens.shape[0], size=batch_size)
    return tokens[idx[data_lib.process_rows(batch_size, jax.process_index(), jax.process_count())]]


# ------------------------------------------------------------------------------------------------
# Config.

#: ``config.univae`` fields a run stored before they existed lacks: UniVAEConfig's defaults stand in for them
OPTIONAL_LATENT_FIELDS = ("quantize", "codebook_size", "commitment", "word_dropout")


def univae_config(c, vocab: Vocab = BYTES) -> U.UniVAEConfig:
    """The model config of ``c`` (a workdir's config.json from before the VQ fields reads as quantize=False)."""
    u = c.univae
    return U.UniVAEConfig(model=config_lib.model_config(c.model), n_latent=u.n_latent, z_dim=u.z_dim,
                          kappa=float(u.kappa), src_len=u.src_len, cls_id=vocab.cls_id, sep_id=vocab.sep_id,
                          pad_id=vocab.pad_id, mask_id=vocab.mask_id,
                          **{k: u[k] for k in OPTIONAL_LATENT_FIELDS if k in u})


def load_minilm(params):
    """Every Transformer tensor all-MiniLM-L6-v2 has, overwritten by it (embeddings, layers); the MLM-head
    dense/norm/bias and the latent Dense layers keep their fresh initialisation."""
    from kexue_jax import hf  # noqa: PLC0415

    _, loaded = hf.load_bert(hf.minilm_path(), head="none")
    flat = flax.traverse_util.flatten_dict(params["transformer"])
    for name, value in flax.traverse_util.flatten_dict(loaded).items():
        if name not in flat or flat[name].shape != value.shape:
            raise ValueError(f"config.model does not match all-MiniLM-L6-v2 at {'/'.join(name)}: "
                             f"{value.shape} vs {getattr(flat.get(name), 'shape', None)} "
                             "(use configs/univae.py:minilm)")
        flat[name] = jnp.asarray(value, flat[name].dtype)
    params["transformer"] = flax.traverse_util.unflatten_dict(flat)
    return params


def validate(c) -> U.UniVAEConfig:
    """Check everything before data is read or anything compiles (errors name the config field)."""
    for field in ("data.batch_size", "data.min_bytes", "train.steps", "train.log_every", "train.eval_every",
                  "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints", "eval.n_heldout",
                  "eval.n_resample", "eval.n_prior"):
        section, name = field.split(".")
        v = c[section][name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config.{field} must be a positive integer, got {v!r}")
    if not 0.0 < c.data.val_fraction < 1.0:
        raise ValueError(f"config.data.val_fraction must be a number in (0, 1), got {c.data.val_fraction!r}")
    if c.data.get("long_lines", "drop") not in LONG_LINES:
        raise ValueError(f"config.data.long_lines must be one of {LONG_LINES}, got {c.data.long_lines!r}")
    if c.eval.method not in U.METHODS:
        raise ValueError(f"config.eval.method must be one of {U.METHODS}, got {c.eval.method!r}")
    if c.eval.lm_variant not in ("", "tiny", "default", "bert", "pod"):
        raise ValueError(f"config.eval.lm_variant must be '' (no LM) or a configs/lm.py variant, "
                         f"got {c.eval.lm_variant!r}")
    if c.optim.warmup_steps > c.train.steps:
        raise ValueError(f"config.optim.warmup_steps must be <= train.steps={c.train.steps}")
    if c.univae.init_from not in ("", "minilm"):
        raise ValueError(f"config.univae.init_from must be '' (random init, bytes) or 'minilm', "
                         f"got {c.univae.init_from!r}")
    vocab = vocab_for(c)
    try:
        cfg = univae_config(c, vocab)
    except ValueError as e:
        raise ValueError(f"config.univae / config.model: {e}") from None
    if c.univae.init_from == "" and cfg.model.vocab_size < data_lib.VOCAB_SIZE:
        raise ValueError(f"config.model.vocab_size must be >= {data_lib.VOCAB_SIZE} (bytes + specials)")
    if c.data.batch_size % jax.device_count():
        raise ValueError(f"config.data.batch_size={c.data.batch_size} must be divisible by the "
                         f"{jax.device_count()} devices")
    return cfg, vocab


# ------------------------------------------------------------------------------------------------
# Training.

@functools.lru_cache(maxsize=16)
def state_init(cfg: U.UniVAEConfig, tx):
    """key -> TrainState(step 0, U.init params, fresh optimizer state). Cached, as :func:`univae_loss`."""
    def init_fn(key):
        params = U.init(key, cfg)
        return training.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    return init_fn


@functools.lru_cache(maxsize=16)
def univae_loss(cfg: U.UniVAEConfig) -> training.LossFn:
    """The phase loss: ``U.loss_terms`` of batch["x"] with z ~ vMF(mu, kappa) drawn with the step's key
    (sum of the target tokens' NLL (+ VQ terms), {"count": target tokens}). Cached on ``cfg``: a rerun or a
    resume in the same process gets the same function and reuses the compiled step."""
    def loss_fn(params, batch, key, step):
        s, n = U.loss_terms(params, cfg, batch["x"], key)
        return s, {"count": n}
    return loss_fn


@functools.lru_cache(maxsize=16)
def make_eval_step(cfg: U.UniVAEConfig):
    """(sum NLL, count) with z = mu (no noise), or its code with quantize (NLL only, no VQ term): the
    reconstruction loss of held-out lines. Cached on ``cfg``, as :func:`univae_loss`."""
    return lambda params, tokens: U.loss_terms(params, cfg, tokens, None, vq=False)


def reconstruction_evaluator(cfg: U.UniVAEConfig, batches: list[np.ndarray], mesh):
    """fn(params, step) -> {"val_loss": mean reconstruction NLL from mu (nats/token) of the held-out ``batches``}."""
    jeval = jax.jit(make_eval_step(cfg))
    sharding = parallel.batch_sharding(mesh)

    def evaluate(params, step) -> dict:
        return {"val_loss": training.mean_over_batches(
            lambda b: jeval(params, data_lib.to_global({"x": b}, sharding)["x"]), batches)}

    return evaluate


def univae_phase(c, cfg: U.UniVAEConfig, tr: np.ndarray, va: np.ndarray, workdir: str, mesh) -> training.Phase:
    """The UniVAE training as a ``training.Phase``: AdamW (``training.make_optimizer``), batches of
    ``data.batch_size`` lines drawn by (seed, step) from ``tr``, the reconstruction loss of the first
    ``train.eval_batches`` batches of ``va``. ``univae.init_from="minilm"``: the initial state holds
    all-MiniLM-L6-v2's tensors (Adam's moments start at zero whatever the params)."""
    tx = training.make_optimizer(c.optim, c.train.steps)
    seed, bs = int(c.seed), c.data.batch_size
    init_fn = state_init(cfg, tx)
    state = None
    if c.univae.init_from == "minilm":
        state = jax.jit(init_fn)(jax.random.PRNGKey(seed))
        state = state.replace(params=load_minilm(jax.device_get(state.params)))
    n_eval = min(c.train.eval_batches, max(1, va.shape[0] // bs))
    return training.Phase(
        tx=tx, start=0, end=c.train.steps, workdir=workdir, init=None if state is not None else init_fn,
        state=state, loss_fn=univae_loss(cfg), batch_fn=lambda t: {"x": host_batch(tr, t, seed, bs)},
        evaluators={"reconstruction": reconstruction_evaluator(cfg, [va[i * bs:(i + 1) * bs] for i in range(n_eval)],
                                                               mesh)},
        tokens_per_step=bs * 2 * cfg.src_len, schedule=training.make_schedule(c.optim, c.train.steps))


def train(c, workdir: str, *, stop_after: int | None = None):
    """Train (or resume) under ``workdir`` with ``training.run_loop``; returns (cfg, params, vocab, held-out
    lines). SIGTERM / Ctrl-C save the current step (``training.Preempted``)."""
    cfg, vocab = validate(c)
    tr_lines, va_lines = load_lines(c)
    tr, va = to_tokens(tr_lines, cfg.src_len, vocab), to_tokens(va_lines, cfg.src_len, vocab)
    mesh = training.build_mesh(c)
    result = training.run_loop(univae_phase(c, cfg, tr, va, workdir, mesh), c, mesh, stop_after=stop_after)
    if jax.process_index() == 0 and c.train.plot:
        metrics_lib.plot_curves(workdir, os.path.join(workdir, "loss.png"))
    return cfg, result.state.params, vocab, va_lines


# ------------------------------------------------------------------------------------------------
# Measurements.

def edit_distance(a: bytes, b: bytes) -> int:
    """Levenshtein distance between two byte strings (unit costs)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _batched(fn, tokens: np.ndarray, batch: int) -> np.ndarray:
    """fn over row chunks padded to ``batch`` rows (one compilation)."""
    outs = []
    for i in range(0, tokens.shape[0], batch):
        chunk = tokens[i:i + batch]
        pad = batch - chunk.shape[0]
        full = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        outs.append(np.asarray(fn(jnp.asarray(full)))[:chunk.shape[0]])
    return np.concatenate(outs)


def reconstruction_metrics(src: np.ndarray, out: np.ndarray, pad_id: int) -> dict:
    """Exact match of the whole line (bytes and [SEP]) and byte accuracy over the source's bytes + [SEP]."""
    want = src[:, 1:]
    valid = want != pad_id
    got = out[:, :want.shape[1]]
    hit = (got == want) & valid
    exact = np.all(hit | ~valid, axis=1)
    return {"n": int(src.shape[0]), "exact_match": float(exact.mean()),
            "byte_accuracy": float(hit.sum() / valid.sum())}


def _summary(x) -> dict:
    x = np.asarray(x, np.float64)
    q = np.percentile(x, [25, 50, 75])
    return {"mean": float(x.mean()), "std": float(x.std()), "q25": float(q[0]), "median": float(q[1]),
            "q75": float(q[2])}


def text_change(sources: Sequence[str], texts: dict[str, Sequence[str]]) -> dict:
    """Per named list of outputs: byte edit distance to the source, fraction changed, and the MiniLM cosine
    similarity to the source (``kexue_jax.hf.embed``; skipped with a note when MiniLM is not installed)."""
    out: dict = {}
    try:
        from kexue_jax import hf  # noqa: PLC0415

        emb_src = hf.embed(list(sources))
        cos = {name: np.sum(emb_src * hf.embed(list(t)), -1) for name, t in texts.items()}
    except (ImportError, FileNotFoundError, ModuleNotFoundError) as err:  # MiniLM not installed
        out["minilm_error"], cos = str(err), {}
    for name, t in texts.items():
        out[name] = {"edit_distance": _summary([edit_distance(a.encode(), b.encode()) for a, b in zip(sources, t)]),
                     "changed": float(np.mean([a != b for a, b in zip(sources, t)]))}
        if name in cos:
            out[name]["minilm_cosine"] = _summary(cos[name])
    return out


def line_bits_per_byte(lm_cfg, lm_params, lines: Sequence[str], seq_len: int) -> float:
    """Bits/byte of each line's bytes and its closing newline under a byte LM, given a preceding "\\n"."""
    from kexue_jax.nn import Transformer  # noqa: PLC0415

    model = Transformer(lm_cfg)
    fn = jax.jit(lambda p, x: jax.nn.log_softmax(model.apply({"params": p}, x).astype(jnp.float32), -1))
    tot = cnt = 0.0
    rows = [np.concatenate([[10], data_lib.encode(t)[:seq_len - 1], [10]]) for t in lines]
    x = np.full((len(rows), seq_len + 1), 10, np.int32)
    w = np.zeros((len(rows), seq_len), np.float32)
    for i, r in enumerate(rows):
        x[i, :len(r)] = r
        w[i, :len(r) - 1] = 1.0
    for i in range(0, len(rows), 64):
        logp = np.asarray(fn(lm_params, jnp.asarray(x[i:i + 64, :-1])))
        nll = -np.take_along_axis(logp, x[i:i + 64, 1:, None], -1)[..., 0]
        tot += float((nll * w[i:i + 64]).sum())
        cnt += float(w[i:i + 64].sum())
    return tot / cnt / math.log(2.0)


def byte_lm(c, workdir: str):
    """The independent byte LM (configs/lm.py:<eval.lm_variant>, steps eval.lm_steps if set), trained or
    resumed under workdir/lm: returns (TransformerConfig, params)."""
    from configs import lm as lm_configs  # noqa: PLC0415

    lc = lm_configs.get_config(c.eval.lm_variant)
    if c.eval.lm_steps:
        lc.train.steps = int(c.eval.lm_steps)
        lc.optim.warmup_steps = min(lc.optim.warmup_steps, lc.train.steps)
        lc.train.checkpoint_every = lc.train.eval_every = min(lc.train.eval_every, lc.train.steps)
    lc.data.path = c.data.path
    lc.data.val_fraction, lc.data.split_seed = c.data.val_fraction, c.data.split_seed  # same held-out plays
    lc.train.plot = False
    result = training.train(lc, os.path.join(workdir, "lm"))
    return config_lib.model_config(lc.model), jax.device_get(result.state.params), lc.data.seq_len


def evaluate_run(c, workdir: str, cfg: U.UniVAEConfig, params, vocab: Vocab, va_lines: list[str]) -> dict:
    """samples.md and report.json (see the module docstring)."""
    e = c.eval
    rng = np.random.default_rng(stream_seed(int(c.seed), "evaluation_lines"))
    base_key = jax.random.PRNGKey(int(c.seed))  # the report's resampling streams fold into it
    va_lines = list(va_lines)
    order = rng.permutation(len(va_lines))
    held = [va_lines[i] for i in order[:e.n_heldout]]
    bs = 64
    dkw = dict(method=e.method, beam_size=e.beam_size)
    params = jax.device_get(params)
    rec_fn = functools.partial(jax.jit(lambda p, x: U.reconstruct(p, cfg, x, **dkw)), params)
    src = to_tokens(held, cfg.src_len, vocab)
    rec = _batched(rec_fn, src, bs)
    report = {"reconstruction": reconstruction_metrics(src, rec, cfg.pad_id)}
    training.say(f"reconstruction (held-out, from mu): {report['reconstruction']}")
    if cfg.quantize:  # how much of each codebook the held-out lines use (unused codes decode to junk)
        codes = _batched(functools.partial(jax.jit(lambda p, x: U.encode_indices(p, cfg, x)), params), src, bs)
        report["codes_used"] = [int(np.unique(codes[:, i]).size) for i in range(cfg.n_latent)]
        training.say(f"codes used by {len(held)} held-out lines, per latent layer (of {cfg.codebook_size}): "
                     f"{report['codes_used']}")

    # multi-scale: resample the lowest vs the highest latent layer
    ms_lines = [va_lines[i] for i in order[:e.n_resample]]
    ms_src = to_tokens(ms_lines, cfg.src_len, vocab)
    resample = functools.partial(jax.jit(lambda p, x, k, layer: U.resample(p, cfg, x, [layer], k, **dkw)[0],
                                         static_argnums=3), params)
    texts = {}
    for name, layer in (("lowest", 0), ("highest", cfg.n_latent - 1)):
        key = stream_key(base_key, "multiscale_resample", layer)
        texts[name] = [to_text(r, vocab) for r in _batched(lambda x, k=key, layer=layer: resample(x, k, layer),
                                                           ms_src, bs)]
    # reference points: the plain reconstruction (nothing resampled) and an unrelated held-out line
    texts["reconstruction"] = [to_text(r, vocab) for r in _batched(rec_fn, ms_src, bs)]
    texts["other_line"] = ms_lines[1:] + ms_lines[:1]
    ms = {"n": len(ms_lines), "layers": {"lowest": 0, "highest": cfg.n_latent - 1},
          "transformer_layers": {"lowest": cfg.latent_layers[0], "highest": cfg.latent_layers[-1]}}
    ms.update(text_change(ms_lines, texts))
    low, high = ms["lowest"], ms["highest"]
    ms["supports_claim"] = bool(high["edit_distance"]["mean"] > low["edit_distance"]["mean"] and
                                ("minilm_cosine" not in high or
                                 high["minilm_cosine"]["mean"] < low["minilm_cosine"]["mean"]))
    report["multiscale"] = ms
    training.say(f"multi-scale: lowest {low}  highest {high}")

    # prior samples
    prior_fn = jax.jit(lambda p, k: U.decode(p, cfg, U.sample_prior(k, cfg, e.n_prior, p), **dkw))
    prior = [to_text(r, vocab) for r in np.asarray(prior_fn(params, jax.random.PRNGKey(7)))]
    report["prior"] = {"n": len(prior), "distinct": len(set(prior)),
                       "mean_bytes": float(np.mean([len(p.encode()) for p in prior]))}
    if e.lm_variant:
        lm_cfg, lm_params, lm_len = byte_lm(c, workdir)
        real = line_bits_per_byte(lm_cfg, lm_params, held[:e.n_prior], lm_len)
        fake = line_bits_per_byte(lm_cfg, lm_params, [p for p in prior if p] or [""], lm_len)
        report["prior"].update({"lm_variant": e.lm_variant, "bits_per_byte_prior": fake,
                                "bits_per_byte_heldout": real, "gap": fake - real})
        training.say(f"prior samples {fake:.3f} bits/byte vs held-out lines {real:.3f} under the byte LM")

    # samples.md
    lines_md = ["# UniVAE samples", "", f"Decoding: {e.method}. Held-out lines come from plays never trained on.",
                "", "## 10 prior samples (z uniform " + ("over each codebook)" if cfg.quantize else "on each sphere)"),
                ""]
    lines_md += [f"{i + 1}. `{p}`" for i, p in enumerate(prior[:10])]
    lines_md += ["", "## 10 held-out reconstructions (from mu)", "", "| source | reconstruction |", "|---|---|"]
    lines_md += [f"| `{held[i]}` | `{to_text(rec[i], vocab)}` |" for i in range(min(10, len(held)))]
    five = np.concatenate([to_tokens(held[:5], cfg.src_len, vocab)] * (bs // 5 + 1))[:bs]  # the compiled batch
    for name, layer in (("lowest", 0), ("highest", cfg.n_latent - 1)):
        lines_md += ["", f"## Resampling the {name} latent layer (`--layers {layer}`; Transformer layer "
                         f"{cfg.latent_layers[layer]}), 5 draws each", ""]
        outs = [np.asarray(resample(jnp.asarray(five), stream_key(base_key, "resample_draw", r), layer))
                for r in range(5)]
        for i in range(min(5, len(held))):
            lines_md += [f"- `{held[i]}` ->"] + [f"  - `{to_text(o[i], vocab)}`" for o in outs]
    with open(os.path.join(workdir, "samples.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines_md) + "\n")
    reporting.write_json_atomic(os.path.join(workdir, "report.json"), report, indent=2)
    return report


def run(config, workdir: str) -> dict:
    """Train (resuming if possible), then write samples.md and report.json (process 0)."""
    cfg, params, vocab, va_lines = train(config, workdir)
    if jax.process_index() != 0:
        return {}
    return evaluate_run(config, workdir, cfg, params, vocab, va_lines)


# ------------------------------------------------------------------------------------------------
# CLI.

def load(workdir: str):
    """(config, UniVAEConfig, Vocab, params) of a trained workdir (its config.json and latest checkpoint)."""
    path = os.path.join(workdir, metrics_lib.CONFIG_FILE)
    if not os.path.exists(path):
        what = "has no config.json" if os.path.isdir(workdir) else "does not exist"
        raise FileNotFoundError(f"--workdir {workdir!r} {what}: train a UniVAE there first with "
                                f"python train.py --config=configs/univae.py --workdir={workdir}")
    with open(path, encoding="utf-8") as f:
        c = ml_collections.ConfigDict(json.load(f))
    vocab = vocab_for(c)
    cfg = univae_config(c, vocab)
    init_fn = state_init(cfg, training.make_optimizer(c.optim, c.train.steps))
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        state, step = ckpt.restore(jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    if state is None:
        raise FileNotFoundError(f"--workdir {workdir!r} has no readable checkpoint")
    return c, cfg, vocab, state.params


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: ...``) and status 2, without the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_layers(spec: str, n_latent: int) -> list[int]:
    """The latent indices of ``--layers`` ("0,2"; 0 = the lowest latent layer, as ``univae.resample`` and
    report.json's ``multiscale.layers`` count them). Raises ValueError naming ``--layers``."""
    try:
        layers = [int(x) for x in spec.split(",")]
    except ValueError:
        layers = []
    if not layers or len(set(layers)) != len(layers) or any(not 0 <= i < n_latent for i in layers):
        raise ValueError(f"--layers must be distinct comma-separated latent indices in [0, {n_latent}) "
                         f"(0 = the lowest latent layer), got {spec!r}")
    return layers


def source_tokens(texts: Sequence[str], cfg: U.UniVAEConfig, vocab: Vocab) -> np.ndarray:
    """``to_tokens`` of command-line texts, with one warning line on stderr for each text longer than the
    model reads (``univae.src_len - 2`` tokens): it is cut, and the warning shows what is left."""
    limit = cfg.src_len - 2
    for text in texts:
        ids = vocab.encode(text)
        if len(ids) > limit:
            print(f"warning: --text is {len(ids)} tokens, more than univae.src_len - 2 = {limit}: cut to "
                  f"{vocab.decode(ids[:limit])!r}", file=sys.stderr)
    return to_tokens(texts, cfg.src_len, vocab)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (module docstring). A bad argument, or a workdir without a trained run, ends in one line
    ``error: ...`` and status 2."""
    ap = _OneLineParser(prog="python -m kexue_jax.experiments.univae", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("sample", "reconstruct", "resample", "interpolate"))
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--text", action="append", default=[], help="source line(s) (repeatable)")
    ap.add_argument("--text2", default=None, help="interpolate: the other end")
    ap.add_argument("--layers", default="0", help="resample: comma-separated latent indices (0 = lowest)")
    ap.add_argument("--n", type=int, default=5, help="sample / resample: how many")
    ap.add_argument("--steps", type=int, default=5, help="interpolate: points including both ends (>= 2)")
    ap.add_argument("--method", default="greedy", choices=U.METHODS)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.command != "sample" and not a.text:
        ap.error(f"{a.command} needs --text")
    if a.command == "interpolate" and a.text2 is None:
        ap.error("interpolate needs --text and --text2")
    if a.n < 1:
        ap.error(f"--n must be a positive integer, got {a.n}")
    if a.steps < 2:
        ap.error(f"--steps must be an integer >= 2 (both ends included), got {a.steps}")
    if not a.temperature > 0:
        ap.error(f"--temperature must be a number > 0, got {a.temperature}")
    try:
        _, cfg, vocab, params = load(a.workdir)
        layers = parse_layers(a.layers, cfg.n_latent) if a.command == "resample" else []
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    key = jax.random.PRNGKey(a.seed)
    dkw = dict(method=a.method, temperature=a.temperature, key=jax.random.fold_in(key, 1))
    if a.command == "sample":
        for row in np.asarray(U.decode(params, cfg, U.sample_prior(key, cfg, a.n, params), **dkw)):
            print(to_text(row, vocab))
    elif a.command == "reconstruct":
        src = source_tokens(a.text, cfg, vocab)
        for t, row in zip(a.text, np.asarray(U.reconstruct(params, cfg, src, **dkw))):
            print(f"{t}\t->\t{to_text(row, vocab)}")
    elif a.command == "resample":
        src = source_tokens(a.text, cfg, vocab)
        for r in range(a.n):
            out, _ = U.resample(params, cfg, src, layers, jax.random.fold_in(key, r),
                                method=a.method, temperature=a.temperature)
            for t, row in zip(a.text, np.asarray(out)):
                print(f"{t}\t->\t{to_text(row, vocab)}")
    else:
        z = U.encode(params, cfg, source_tokens([a.text[0], a.text2], cfg, vocab))
        zs = U.interpolate(z[0], z[1], a.steps)
        for i, row in enumerate(np.asarray(U.decode(params, cfg, zs, **dkw))):
            print(f"{i / (a.steps - 1):.2f}\t{to_text(row, vocab)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
