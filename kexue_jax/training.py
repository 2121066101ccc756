"""Training: TrainState, optimizer, jitted train/eval steps, and the loop.

Design (JAX Training Cookbook, big_vision): explicit PRNG keys derived from the step; the batch of step t
and the dropout key of step t depend only on (seed, t), so a resumed run repeats an uninterrupted one
bitwise on CPU; state born sharded (``parallel.init_sharded``) and donated to the step; metrics fetched a
step late so the host never waits on the device; process 0 alone writes logs; every process checkpoints.

Loss: token cross-entropy in float32, sum over weighted positions divided by the global weight count,
so the sharded mode (one global mean) and the pmap mode (psum of per-device sums and counts) give the
same gradients. Gradient accumulation scans over micro-batches and sums gradients of the summed loss.
The alpha-residual scale alpha_t = min(1, t / T) (kexue.fm/archives/8620) is computed inside the step.

Faults: a workdir stores the config that started it (``config.json``) and refuses a resume with another
one (``check_resume``); every process restores the same checkpoint step (unreadable steps are moved to
``checkpoints/corrupt/`` and written again); SIGTERM on any process stops all of them at the same step,
after saving it (Ctrl-C too, on one process).

One loop for every job: a :class:`Phase` describes a stretch of training (init, a loss
``loss_fn(params, batch, key, step) -> (loss, aux)``, batches addressed by step, named evaluators, optimizer
and schedule, FLOPs per step) and ``run_loop`` = ``check_resume`` -> ``restore_or_init`` -> ``compile_steps``
-> ``train_loop`` trains it. The language model is one instance: ``run_phase`` = ``lm_phase`` (the token
loss, corpus batches, validation loss) + ``run_loop``; the UniVAE, similarity, init-study and mixer jobs
build their own phases.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from kexue_jax import checkpoint as ckpt_lib
from kexue_jax import config as config_lib
from kexue_jax import data as data_lib
from kexue_jax import flops as flops_lib
from kexue_jax import metrics as metrics_lib
from kexue_jax import parallel
from kexue_jax.streams import stream_seed
from kexue_jax.nn import Transformer, TransformerConfig, alpha_schedule, mup_lr_scales

log = logging.getLogger("kexue_jax")


class NonFiniteLoss(FloatingPointError):
    """Raised when the training loss becomes NaN or Inf; no checkpoint is written for that state. ``step``:
    the step where it was seen (None where unknown)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


# ------------------------------------------------------------------------------------------------
# Optimizer.

def make_schedule(optim, total_steps: int, *, start: int = 0):
    """Linear warmup to ``optim.lr`` over ``optim.warmup_steps``, then cosine/linear decay to
    ``lr * min_lr_ratio`` at ``total_steps`` (or constant), as a function of the optimizer step count.
    ``"wsd"`` (warmup-stable-decay): the constant rate, then :func:`cooldown_schedule` over the last
    ``wsd_decay_steps(optim, total_steps)`` steps (Hagele et al. 2024; MiniCPM).

    ``start`` shifts the whole schedule: lr(t) = base(t - start). Arm A of the upscaling job uses it to
    re-warm the learning rate after widening (a fresh warmup and decay over the big model's steps)."""
    lr, warm = float(optim.lr), int(optim.warmup_steps)
    decay_steps = max(1, total_steps - warm)
    end = lr * float(optim.min_lr_ratio)
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim.min_lr_ratio))
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(lr)
    base = optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm]) if warm else decay
    if optim.schedule == "wsd":
        base = cooldown_schedule(base, optim, total_steps - wsd_decay_steps(optim, total_steps), total_steps)
    if not start:
        return base
    return lambda count: base(jnp.maximum(count - start, 0))


#: ``optim.decay_fraction`` when it is None: the share of the steps a WSD schedule spends decaying.
DEFAULT_DECAY_FRACTION = 0.2


def wsd_decay_steps(optim, total_steps: int) -> int:
    """D = max(1, round(decay_fraction x total_steps)): the length of a WSD schedule's final decay
    (``optim.decay_fraction``, default :data:`DEFAULT_DECAY_FRACTION`)."""
    frac = getattr(optim, "decay_fraction", None)
    return max(1, round((DEFAULT_DECAY_FRACTION if frac is None else float(frac)) * total_steps))


def wsd_factor(x, min_lr_ratio: float, shape: str | None = "linear"):
    """The WSD decay's multiplier at the fraction x in [0, 1] of the decay, from 1 down to r = min_lr_ratio:
    "linear" (the default, None) 1 - (1 - r) x; "1-sqrt" 1 - (1 - r) sqrt(x) (Hagele et al. 2024)."""
    drop = jnp.sqrt(x) if shape == "1-sqrt" else x
    return 1.0 - (1.0 - float(min_lr_ratio)) * drop


def cooldown_schedule(schedule, optim, start: int, end: int):
    """``schedule`` until step ``start``, then its rate at ``start`` decayed to ``min_lr_ratio`` of it at
    ``end`` and kept there:

        lr(t) = schedule(min(t, start)) x wsd_factor(clip((t - start) / (end - start), 0, 1))

    with ``optim.min_lr_ratio`` and ``optim.decay_shape``. A WSD run of length T is the warmup-then-constant
    schedule cooled down from T - D to T, so a stable-phase run cooled down from T_i - D_i reproduces the
    WSD run of length T_i exactly."""
    length, ratio, shape = max(1, end - start), float(optim.min_lr_ratio), getattr(optim, "decay_shape", None)

    def lr(count):
        x = jnp.clip((count - start) / length, 0.0, 1.0)
        return schedule(jnp.minimum(count, start)) * wsd_factor(x, ratio, shape)
    return lr


def _per_tensor_scale(scales) -> optax.GradientTransformation:
    """Multiply each update leaf by a fixed scalar of ``scales`` (a params-shaped tree); identity if None."""
    if scales is None:
        return optax.identity()
    return optax.stateless(lambda u, p=None: jax.tree_util.tree_map(lambda a, c: a * c.astype(a.dtype), u, scales))


def model_lr_scales(model_cfg: TransformerConfig | None):
    """The per-tensor learning-rate multipliers the model's parameterization asks for: muP's
    (``kexue_jax.nn.mup.mup_lr_scales``: lr / m on the hidden matrices) under ``parameterization="mup"``,
    None (all 1) otherwise."""
    if model_cfg is None or model_cfg.parameterization != "mup":
        return None
    shapes = jax.eval_shape(lambda key: Transformer(model_cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"],
                            jax.random.PRNGKey(0))
    return mup_lr_scales(shapes, model_cfg)


def optim_key(optim) -> tuple | None:
    """The settings of the optim section ``optim`` as a sorted tuple of (name, value), or None where a value is
    not hashable: the key under which :func:`make_optimizer` caches the optimizer of equal settings."""
    try:
        items = tuple(sorted((str(k), v) for k, v in optim.items()))
        hash(items)
    except (AttributeError, TypeError):
        return None
    return items


@functools.lru_cache(maxsize=64)
def _cached_optimizer(items: tuple, total_steps: int, start: int, model_cfg) -> optax.GradientTransformation:
    return _build_optimizer(ml_collections.ConfigDict(dict(items)), total_steps, start=start,
                            model_cfg=model_cfg)


def make_optimizer(optim, total_steps: int, *, update_scales=None, start: int = 0, lr_scales=None,
                   schedule=None, model_cfg: TransformerConfig | None = None) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and decoupled weight decay on matrices (ndim >= 2).

    The chain always has the same structure, clip -> scale_by_adam -> [per-tensor update scale] ->
    decay -> -lr -> [per-tensor learning-rate multiplier], so Adam state maps between a small and a widened
    model (``upscale``). ``lr_scales`` multiplies the whole step of each tensor (decay included), i.e. a
    per-tensor learning rate lr_i = lr x lr_scales_i. ``model_cfg``: the model the optimizer trains; under
    muP its per-tensor rates (``model_lr_scales``) multiply ``lr_scales``. ``schedule`` replaces
    ``make_schedule(optim, total_steps, start=start)``.

    Without ``update_scales``, ``lr_scales`` and ``schedule``, the optimizer is cached on the settings
    (:func:`optim_key`), ``total_steps``, ``start`` and ``model_cfg``: equal settings give the same object, so
    a rerun or a resume in the same process reuses the compiled step (:func:`make_step` is cached on it)."""
    key = None if update_scales is not None or lr_scales is not None or schedule is not None else optim_key(optim)
    try:
        hash(model_cfg)
    except TypeError:
        key = None
    if key is not None:
        return _cached_optimizer(key, int(total_steps), int(start), model_cfg)
    return _build_optimizer(optim, total_steps, update_scales=update_scales, start=start, lr_scales=lr_scales,
                            schedule=schedule, model_cfg=model_cfg)


def _build_optimizer(optim, total_steps: int, *, update_scales=None, start: int = 0, lr_scales=None,
                     schedule=None, model_cfg: TransformerConfig | None = None) -> optax.GradientTransformation:
    def decay_mask(params):
        return jax.tree_util.tree_map(lambda x: jnp.ndim(x) >= 2, params)

    param_scales = model_lr_scales(model_cfg)
    if param_scales is not None:
        lr_scales = param_scales if lr_scales is None else jax.tree_util.tree_map(jnp.multiply, param_scales,
                                                                                   lr_scales)

    clip = optax.identity() if optim.clip_norm is None else optax.clip_by_global_norm(float(optim.clip_norm))
    return optax.chain(
        clip,
        optax.scale_by_adam(b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps)),
        _per_tensor_scale(update_scales),
        optax.add_decayed_weights(float(optim.weight_decay), mask=decay_mask),
        optax.scale_by_learning_rate(schedule or make_schedule(optim, total_steps, start=start)),
        _per_tensor_scale(lr_scales),
    )


# ------------------------------------------------------------------------------------------------
# Steps: one train step for any loss.

#: A phase's loss, ``loss_fn(params, batch, key, step) -> (loss, aux)``: ``batch`` a dict of global arrays (rows
#: of the batch of ``step``), ``key`` this step's PRNG key, ``step`` the traced optimizer step (for schedules
#: inside the model, e.g. the alpha ramp; ignore it otherwise). ``aux`` is a dict of scalars; its entry
#: ``"count"`` (default 1: the loss is a mean already) is the number of items ``loss`` sums over.
LossFn = Callable[[Any, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


def _loss_and_count(loss_fn: LossFn):
    """``loss_fn`` as f(...) -> (loss, (count, other aux entries)), count 1.0 (float32) where aux has none."""
    def f(params, batch, key, step):
        loss, aux = loss_fn(params, batch, key, step)
        aux = dict(aux or {})
        return loss, (jnp.asarray(aux.pop("count", 1.0), jnp.float32), aux)
    return f


@functools.lru_cache(maxsize=32)
def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, grad_accum: int = 1,
              axis_name: str | None = None):
    """The train step of any loss: ``step(state, batch, key) -> (state, metrics)``.

    The step's key is fold_in(key, state.step) (then the device index inside pmap, the micro-batch index
    under accumulation), so it depends only on the run's key and the step. The loss is a sum over
    ``aux["count"]`` items (:data:`LossFn`); the loss, the count, the other aux entries and the gradients
    are summed over ``grad_accum`` micro-batches (the batch's leading axis cut in that many pieces) and over
    the devices (``axis_name`` set: inside pmap, psum), then divided by the count:

        g = sum_i grad loss_i / sum_i count_i

    so an accumulated or pmapped step takes the gradient of one big batch. ``metrics``: ``loss`` (divided),
    ``grad_norm`` (of g) and the other aux entries divided by the count. Cached on its arguments (the same
    loss and optimizer give the same function, so jit reuses its compilation across runs of several seeds)."""
    grad_fn = jax.value_and_grad(_loss_and_count(loss_fn), has_aux=True)

    def step(state: TrainState, batch, key):
        rng = jax.random.fold_in(key, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        if grad_accum == 1:
            (loss, (count, aux)), grads = grad_fn(state.params, batch, rng, state.step)
        else:
            micro = jax.tree_util.tree_map(
                lambda x: jnp.swapaxes(x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]), 0, 1),
                batch)

            def body(carry, inp):
                mb, i = inp
                (s, (c, a)), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), state.step)
                return jax.tree_util.tree_map(jnp.add, carry, (g, s, c, a)), None

            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            (loss_aval, rest), _ = jax.eval_shape(grad_fn, state.params, first, rng, state.step)
            zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), (loss_aval, rest))
            zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.params), zeros[0], *zeros[1])
            (grads, loss, count, aux), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum)))
        if axis_name is not None:
            grads, loss, count, aux = jax.lax.psum((grads, loss, count, aux), axis_name)
        grads = jax.tree_util.tree_map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss / count, "grad_norm": optax.tree.norm(grads),
                   **{k: v / count for k, v in aux.items()}}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def loss_terms(logits, batch) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token cross-entropies, sum of weights), in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = batch.get("weights")
    w = jnp.ones_like(nll) if w is None else w.astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def _forward(model: Transformer, params, batch, *, train: bool, alpha, rng):
    return model.apply({"params": params}, batch["inputs"], batch.get("segment_ids"), deterministic=not train,
                       alpha=alpha, rngs={"dropout": rng} if train else None)


@functools.lru_cache(maxsize=64)
def lm_loss(model: Transformer, *, alpha_warmup_steps: int = 0) -> LossFn:
    """The language model's loss as a :data:`LossFn`: (sum of weighted token cross-entropies, {"count": sum of
    weights}) (:func:`loss_terms`), dropout on where the model has it (key = the step's key), and the
    alpha-residual scale alpha_t = min(1, t / T) of the step (``alpha_warmup_steps`` = T; 8620). Cached: an
    equal model (modules of equal configs are equal) gets the same function, and so the same compiled step."""
    dropout = model.cfg.dropout_rate > 0.0

    def loss_fn(params, batch, key, step):
        alpha = alpha_schedule(step, alpha_warmup_steps)
        s, c = loss_terms(_forward(model, params, batch, train=dropout, alpha=alpha, rng=key), batch)
        return s, {"count": c}

    return loss_fn


def make_train_step(model: Transformer, tx: optax.GradientTransformation, *, seed: int = 0,
                    grad_accum: int = 1, alpha_warmup_steps: int = 0, axis_name: str | None = None):
    """step(state, batch) -> (state, metrics): :func:`make_step` of :func:`lm_loss` with the key of ``seed``.
    ``axis_name`` set: inside pmap (psum over devices)."""
    step = make_step(lm_loss(model, alpha_warmup_steps=alpha_warmup_steps), tx, grad_accum=grad_accum,
                     axis_name=axis_name)
    key = jax.random.PRNGKey(seed)
    return lambda state, batch: step(state, batch, key)


@functools.lru_cache(maxsize=64)
def make_eval_step(model: Transformer):
    """eval(params, batch) -> (sum of token NLL, token count). Cached on the model, as :func:`lm_loss`."""
    def step(params, batch):
        return loss_terms(_forward(model, params, batch, train=False, alpha=1.0, rng=None), batch)
    return step


def mean_over_batches(sum_and_count: Callable[[Any], tuple[Any, Any]], batches) -> float:
    """sum_i s_i / max(1, sum_i n_i) over (s_i, n_i) = ``sum_and_count(batch_i)``: the mean over every item of
    ``batches`` (a validation loss from per-batch sums of a loss and counts of its items)."""
    tot = cnt = 0.0
    for batch in batches:
        s, n = sum_and_count(batch)
        tot, cnt = tot + float(s), cnt + float(n)
    return tot / max(cnt, 1.0)


def init_state(model: Transformer, tx: optax.GradientTransformation, key, seq_len: int) -> TrainState:
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(key, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


@functools.lru_cache(maxsize=64)
def state_initializer(model: Transformer, tx: optax.GradientTransformation, seq_len: int) -> Callable:
    """key -> :func:`init_state` (``model``, ``tx``, key, ``seq_len``): a phase's ``init``. Cached, so that an
    equal model and optimizer (:func:`make_optimizer` caches it) give the same function, whose jitted
    initialization a rerun in the same process reuses."""
    return lambda key: init_state(model, tx, key, seq_len)

# ------------------------------------------------------------------------------------------------
# Data for the loop.

@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray
    val: np.ndarray


def load_corpus(data_cfg) -> Corpus:
    """The train / validation bytes of ``config.data`` (``data.split_corpus``: whole documents, or a
    single document's last ``val_fraction`` of bytes at a line start), checked to hold a training
    window and one validation batch. Raises ConfigError naming the fields before anything is written."""
    try:
        plays = data_lib.load_plays(data_cfg.path or None)
    except ValueError as e:
        raise config_lib.ConfigError(f"config.{e}" if str(e).startswith("data.")
                                     else f"config.data.path: {e}") from None
    train, val = data_lib.split_corpus(plays, data_cfg.val_fraction, data_cfg.split_seed)
    seq_len, batch = data_cfg.seq_len, data_cfg.batch_size
    need = seq_len + 2
    if len(train) < need or len(val) < need:
        raise config_lib.ConfigError(
            f"config.data.path: the text is too short for data.seq_len={seq_len} (train {len(train)} bytes, "
            f"validation {len(val)} bytes)")
    windows = (len(val) - 1) // seq_len
    if data_cfg.objective == "lm" and windows < batch:
        raise config_lib.ConfigError(
            f"config.data: the validation split ({len(val):,} bytes, data.val_fraction={data_cfg.val_fraction}) "
            f"holds {windows} windows of data.seq_len={seq_len}, fewer than one batch (data.batch_size={batch}); "
            f"raise data.val_fraction, lower data.batch_size or data.seq_len, or give more text")
    return Corpus(train, val)


def host_batch(corpus: Corpus, data_cfg, step: int, seed: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of ``step`` (content depends only on seed and step)."""
    kw = dict(step=step, seed=seed, batch_size=data_cfg.batch_size, seq_len=data_cfg.seq_len,
              process_index=jax.process_index(), process_count=jax.process_count())
    if data_cfg.objective == "mlm":
        return data_lib.mlm_batch(corpus.train, mask_rate=data_cfg.mask_rate, **kw)
    return data_lib.lm_batch(corpus.train, **kw)


def eval_host_batches(corpus: Corpus, data_cfg, num_batches: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Fixed validation batches: contiguous windows for LM; for MLM, masked windows with a fixed seed."""
    num = min(num_batches, max(1, (len(corpus.val) - 1) // data_cfg.seq_len // data_cfg.batch_size))
    if data_cfg.objective == "mlm":
        return [data_lib.mlm_batch(corpus.val, step=i, seed=stream_seed(seed, "mlm_validation"), batch_size=data_cfg.batch_size,
                                   seq_len=data_cfg.seq_len, mask_rate=data_cfg.mask_rate,
                                   process_index=jax.process_index(), process_count=jax.process_count())
                for i in range(num)]
    return data_lib.eval_batches(corpus.val, batch_size=data_cfg.batch_size, seq_len=data_cfg.seq_len,
                                 num_batches=num, process_index=jax.process_index(),
                                 process_count=jax.process_count())


# ------------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass(kw_only=True)
class Phase:
    """One stretch of training, steps [start, end) logged and checkpointed under ``workdir``: what
    :func:`run_loop` trains. A job describes its training as a phase and nothing else:

    * ``init``: key -> TrainState (called under jit with sharded outputs) when the phase's checkpoint
      directory has nothing to resume; or ``state``: a ready TrainState (e.g. a widened one);
    * ``loss_fn``: the loss (:data:`LossFn`), ``tx`` the optimizer (its ``schedule`` for the "lr" column);
    * ``batch_fn``: step -> this process's rows of the batch of that step (a dict of host arrays; a pure
      function of the step, so a resumed run replays the same batches);
    * ``evaluators``: name -> fn(params, step) -> {metric: float} (no key named "loss"), run at ``start``
      (``eval_at_start``), every ``train.eval_every`` steps, at the steps of ``eval_steps`` and at ``end``;
      their merged records are the phase's evaluation history;
    * ``flops_per_step`` (None: no FLOPs count), ``flops_offset`` (training FLOPs spent before this phase:
      compute curves), ``tokens_per_step`` (None: no tokens/s in the progress line);
    * ``log_extra``: fetched training metrics -> further ones computed on the host (the LM's bits/byte);
    * ``keep_evaluated``: checkpoint at every evaluation and keep every checkpoint (model selection: the job
      restores the step it selects, :func:`restore_step`).

    :func:`run_phase` trains a Transformer language model: it fills ``loss_fn``, ``batch_fn``, the
    validation evaluator, FLOPs and tokens from ``model_cfg`` and the corpus (:func:`lm_phase`).
    """

    tx: optax.GradientTransformation
    start: int
    end: int
    workdir: str
    init: Callable[[Any], TrainState] | None = None
    state: TrainState | None = None
    model_cfg: TransformerConfig | None = None
    loss_fn: LossFn | None = None
    batch_fn: Callable[[int], dict] | None = None
    evaluators: Mapping[str, Callable[[Any, int], dict]] = dataclasses.field(default_factory=dict)
    eval_at_start: bool = True
    eval_steps: tuple[int, ...] = ()
    keep_evaluated: bool = False
    flops_per_step: float | None = None
    flops_offset: float = 0.0
    tokens_per_step: int | None = None
    log_extra: Callable[[dict], dict] | None = None
    name: str = ""
    schedule: Callable[[int], Any] | None = None  # for the "lr" column of the metrics
    #: optional early stop: called with the evaluation history after each evaluation (and on resume);
    #: True ends the phase there, with a checkpoint (e.g. "the target loss is reached").
    stop_when: Callable[[list[dict]], bool] | None = None
    #: optional extra evaluation metrics: params -> {name: float}, recorded with each evaluation (an
    #: evaluator that does not need the step).
    eval_extra: Callable[[Any], dict] | None = None


@dataclasses.dataclass
class PhaseResult:
    state: TrainState
    history: list[dict]
    flops_per_step: float
    resumed_from: int | None


def _is_primary() -> bool:
    return jax.process_index() == 0


def say(msg: str) -> None:
    """Print a progress message on process 0 only (the others stay silent)."""
    if _is_primary():
        print(msg, flush=True)



def itstime(step: int, every: int, *, last: int | None = None) -> bool:
    """Whether a periodic action is due after ``step``: at multiples of ``every`` (0 = never) and at
    ``last`` (the phase's final step), as big_vision's ``itstime``."""
    return (every > 0 and step % every == 0) or (last is not None and step == last)


class _Preemption:
    """Whether to stop for SIGTERM or Ctrl-C (SIGINT) after a step, decided alike on every process.

    One process: SIGTERM and SIGINT set a flag (Python handlers, restored on exit); a second SIGINT raises
    KeyboardInterrupt at once (a user who presses Ctrl-C twice does not wait for the save). Several
    processes: ``jax.distributed`` catches SIGTERM on whichever process receives it, and
    ``multihost_utils.reached_preemption_sync_point(step)`` becomes True at the same step on all processes
    (no Python SIGTERM handler is installed there: it would replace jax's; SIGINT keeps Python's default,
    KeyboardInterrupt, since one process's Ctrl-C is not agreed with the others)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGTERM  # the signal that asked to stop (SIGTERM in the multi-process case)
        self._old: dict = {}
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if not self._multi:
            for signum in self.SIGNALS:
                try:
                    self._old[signum] = signal.signal(signum, self._handle)
                except ValueError:  # not the main thread
                    break
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signal.Signals(signum)

    def reached(self, step: int) -> bool:
        """Call once per step, on every process, with the same ``step``."""
        if self._multi:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def __exit__(self, *exc):
        for signum, old in self._old.items():
            signal.signal(signum, old)


class Preempted(RuntimeError):
    """The run received SIGTERM or SIGINT (``signum``) and saved a checkpoint; rerun the same command to
    resume. ``train.py`` prints its message as one line and exits with status 128 + ``signum``."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)


def check_resume(config, workdir: str) -> None:
    """Refuse to resume ``workdir`` with another config: ConfigError listing the differing fields if
    ``workdir/config.json`` (the stored config of the run there) differs from ``config`` outside
    ``config.RESUMABLE_FIELDS``. Nothing is written; a workdir without a stored config passes."""
    path = os.path.join(workdir, metrics_lib.CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    changes = config_lib.config_changes(stored, config)
    if changes:
        raise config_lib.ConfigError(
            f"config: {workdir} holds a run of another config, not resumed ({len(changes)} field(s) differ: "
            f"{'; '.join(changes)}). Use another --workdir, or the same config (fields that may change on "
            f"resume: {', '.join(config_lib.RESUMABLE_FIELDS)})")


def store_config(config, workdir: str) -> None:
    """Write the resolved ``config`` to ``workdir/config.json`` (process 0), unless the run there stored
    one already (the config that started a run stays its reference). Jobs that do not train through
    :func:`run_phase` call :func:`check_resume` and this themselves."""
    path = os.path.join(workdir, metrics_lib.CONFIG_FILE)
    if _is_primary() and not os.path.exists(path):
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(config_lib.to_dict(config), indent=2, sort_keys=True, default=str) + "\n")


def restore_or_init(phase: Phase, ckpt: ckpt_lib.Checkpointer, mesh, seed: int):
    """``(state, state shardings, resumed step or None)``: the phase's newest readable checkpoint
    (every process restores the same step), else ``phase.state`` or ``phase.init(key)``, sharded for
    ``mesh``. A checkpoint that does not fit the phase's model raises ``CheckpointMismatch``."""
    tag = f"[{phase.name}] " if phase.name else ""
    if phase.state is not None:
        abstract = jax.eval_shape(lambda s: s, phase.state)
    else:
        abstract = jax.eval_shape(phase.init, jax.random.PRNGKey(seed))
    shardings = parallel.state_shardings(abstract, mesh)
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
    state, resumed_from = (None, None) if ckpt.latest_step() is None else ckpt.restore(target)
    if state is not None:
        say(f"{tag}resumed from step {resumed_from} ({ckpt.directory})")
    elif phase.state is not None:
        state = jax.device_put(phase.state, shardings)
    else:
        state = jax.jit(phase.init, out_shardings=shardings)(jax.random.PRNGKey(seed))
    step = int(jax.device_get(state.step))
    if resumed_from is None and step != phase.start:
        raise ValueError(f"{tag}the initial state is at step {step}, the phase starts at {phase.start}")
    return state, shardings, resumed_from


def restore_step(workdir: str, like: TrainState, step: int) -> TrainState:
    """The TrainState a phase saved at ``step`` in ``workdir/checkpoints``, in the structure, dtypes and
    shardings of ``like`` (e.g. the phase's final state): the model a job selects after a phase run with
    ``keep_evaluated``."""
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None) as ckpt:
        state, _ = ckpt.restore(ckpt_lib.abstract_like(like), step=step)
    return state


#: Fields of a config that :func:`run_loop` reads and a job's config may leave out, with the value used then.
LOOP_DEFAULTS = {"train.grad_accum": 1, "train.checkpoint_every": 0, "train.keep_checkpoints": 3,
                 "parallel.mode": "sharded"}


def loop_setting(config, field: str):
    """``config.<field>`` (``"section.name"``), or its :data:`LOOP_DEFAULTS` value where the config has no
    such field (e.g. the similarity job's config has no ``parallel`` section)."""
    section, name = field.split(".")
    if section in config and name in config[section]:
        return config[section][name]
    return LOOP_DEFAULTS[field]


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every entry of every array of ``tree`` is finite (one jitted function: compiled once per
    structure, shared by every phase)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


@dataclasses.dataclass
class Compiled:
    """The phase's compiled functions. ``run_state``: the state in the steps' layout (replicated under
    pmap); ``step(run_state, t)`` -> (run_state, metrics on device); ``current(run_state)`` -> the
    TrainState; ``eval_params(params)`` -> the params in the evaluators' layout (sharded)."""

    run_state: Any
    step: Callable
    current: Callable
    eval_params: Callable


def compile_steps(phase: Phase, config, mesh, state: TrainState, shardings) -> Compiled:
    """Jit (sharded mode: each batch a global array split over ``mesh``) or pmap (``parallel.mode="pmap"``)
    the step of ``phase.loss_fn`` (:func:`make_step`, ``train.grad_accum`` micro-batches) on the batches of
    ``phase.batch_fn``, with the run's key PRNGKey(``config.seed``)."""
    key = jax.random.PRNGKey(int(config.seed))
    grad_accum = int(loop_setting(config, "train.grad_accum"))
    if loop_setting(config, "parallel.mode") == "pmap":
        pstep = jax.pmap(make_step(phase.loss_fn, phase.tx, grad_accum=grad_accum, axis_name="batch"),
                         axis_name="batch", in_axes=(0, 0, None), donate_argnums=0)
        n_local = jax.local_device_count()

        def do_step(s, t):
            s, m = pstep(s, parallel.split_for_pmap(phase.batch_fn(t), n_local), key)
            return s, parallel.unreplicate(m)

        return Compiled(parallel.replicate(jax.device_get(state)), do_step, parallel.unreplicate,
                        lambda p: jax.device_put(p, shardings.params))
    jstep = jax.jit(make_step(phase.loss_fn, phase.tx, grad_accum=grad_accum), donate_argnums=0,
                    out_shardings=(shardings, None))
    batch_sharding = parallel.batch_sharding(mesh)

    def do_step(s, t):
        return jstep(s, data_lib.to_global(phase.batch_fn(t), batch_sharding), key)

    return Compiled(state, do_step, lambda s: s, lambda p: p)


class _Recorder:
    """Metrics, evaluations and checkpoints of one phase (process 0 writes the logs)."""

    def __init__(self, phase: Phase, config, compiled: Compiled, writer, ckpt, history: list[dict]):
        self.phase, self.compiled, self.writer, self.ckpt, self.history = phase, compiled, writer, ckpt, history
        self.tag = f"[{phase.name}] " if phase.name else ""
        self.evaluators = dict(phase.evaluators)
        if phase.eval_extra is not None:
            self.evaluators["eval_extra"] = lambda params, step: phase.eval_extra(params)
        peak = None if phase.flops_per_step is None else parallel.peak_flops_per_device() * jax.device_count()
        self.progress = metrics_lib.ProgressLine(phase.end, tokens_per_step=phase.tokens_per_step,
                                                 flops_per_step=phase.flops_per_step, peak_flops=peak)

    def flops(self, t: int) -> float | None:
        """Training FLOPs spent by step ``t`` (None for a phase without a FLOPs count)."""
        if self.phase.flops_per_step is None:
            return None
        return self.phase.flops_offset + (t - self.phase.start) * self.phase.flops_per_step

    def log(self, t: int, metrics) -> None:
        """Write the training metrics of step ``t`` (fetched now: call it a step late)."""
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in m.values()):
            raise NonFiniteLoss(f"{self.tag}non-finite loss at step {t} ({m}); stopped. The last good checkpoint "
                                f"is step {self.ckpt.latest_step()} in {self.ckpt.directory}; nothing was saved "
                                f"after it", step=t)
        shown = {"loss": m["loss"]}
        if self.phase.log_extra is not None:
            extra = {k: float(v) for k, v in self.phase.log_extra(m).items()}
            m.update(extra)
            shown.update(extra)
        if self.phase.flops_per_step is not None:
            m["flops"] = self.flops(t)
        if self.phase.schedule is not None:
            m["lr"] = float(self.phase.schedule(t - 1))
        self.writer.write(t, m)
        say(self.tag + self.progress(t, shown))

    def evaluate(self, t: int, run_state) -> dict:
        """Run every evaluator on the params of step ``t``; record and return the merged record."""
        params = self.compiled.eval_params(self.compiled.current(run_state).params)
        rec: dict = {"step": t}
        for fn in self.evaluators.values():
            rec.update({k: float(x) for k, x in fn(params, t).items()})
        if self.phase.flops_per_step is not None:
            rec["flops"] = self.flops(t)
        self.history.append(rec)
        self.writer.write(t, {k: x for k, x in rec.items() if k != "step"})
        return rec

    def check_loss(self, t: int, bad) -> None:
        if bool(jax.device_get(bad)):
            raise NonFiniteLoss(f"{self.tag}non-finite loss before step {t}; stopped. The last good "
                                f"checkpoint is step {self.ckpt.latest_step()} in {self.ckpt.directory}", step=t)

    def save(self, t: int, run_state) -> None:
        state = self.compiled.current(run_state)
        if not bool(jax.device_get(all_finite(state.params))):
            raise NonFiniteLoss(f"{self.tag}non-finite parameters at step {t}; not checkpointed", step=t)
        if not self.ckpt.save(t, state) and t not in self.ckpt.all_steps():
            raise RuntimeError(f"{self.tag}checkpoint step {t} was not written to {self.ckpt.directory}")

    def stop_requested(self, t: int) -> bool:
        """The phase's ``stop_when`` says stop, right after the evaluation of step ``t``."""
        return (self.phase.stop_when is not None and bool(self.history) and self.history[-1]["step"] == t
                and self.phase.stop_when(self.history))


def _previous_history(workdir: str, step: int) -> list[dict]:
    """Evaluations an earlier run of this workdir recorded up to ``step`` (for a resumed phase): its metrics
    records without a training ``loss``, the last one of each step."""
    if not os.path.exists(os.path.join(workdir, metrics_lib.METRICS_FILE)):
        return []
    by_step = {r["step"]: r for r in metrics_lib.read_metrics(workdir) if "loss" not in r and r["step"] <= step}
    return [by_step[t] for t in sorted(by_step)]


def _describe(record: dict) -> str:
    """``val_loss 1.2345, val_bpb 1.7810``: an evaluation record for the log (step and FLOPs left out)."""
    return ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "flops"))


def train_loop(phase: Phase, config, compiled: Compiled, rec: _Recorder, step: int, *,
               stop_after: int | None = None):
    """Steps [step, phase.end): train, log a step late, evaluate, checkpoint; returns the run state.
    SIGTERM (agreed by all processes) or Ctrl-C (one process) saves the current step and raises
    :class:`Preempted`."""
    c = config.train
    checkpoint_every = int(loop_setting(config, "train.checkpoint_every"))
    run_state, pending, bad, ran = compiled.run_state, None, jnp.zeros((), bool), 0
    with _Preemption() as preempt:
        if step == phase.start and not rec.history and phase.eval_at_start:
            rec.evaluate(step, run_state)
        while step < phase.end and not (phase.stop_when is not None and rec.history and phase.stop_when(rec.history)):
            run_state, m = compiled.step(run_state, step)
            bad = bad | ~jnp.isfinite(m["loss"])
            step += 1
            ran += 1
            if pending is not None:
                rec.log(*pending)
                pending = None
            if itstime(step, c.log_every, last=phase.end):
                pending = (step, m)
            evaluated = itstime(step, c.eval_every, last=phase.end) or step in phase.eval_steps
            if evaluated:
                rec.check_loss(step, bad)
                say(f"{rec.tag}step {step}: {_describe(rec.evaluate(step, run_state))}")
            preempted = preempt.reached(step)
            if (itstime(step, checkpoint_every, last=phase.end) or preempted or rec.stop_requested(step)
                    or (evaluated and phase.keep_evaluated)):
                rec.check_loss(step, bad)
                rec.save(step, run_state)
                if preempted:
                    if pending is not None:  # the saved step's metrics: a resumed run starts after it
                        rec.log(*pending)
                    rec.ckpt.wait()
                    raise Preempted(f"{rec.tag}{preempt.signum.name}: saved step {step}; rerun to resume",
                                    preempt.signum)
            if stop_after is not None and ran >= stop_after:
                break
        if pending is not None:
            rec.log(*pending)
    return run_state


def _check_phase(phase: Phase) -> None:
    """ValueError naming the first field of ``phase`` that :func:`run_loop` cannot use."""
    for name in ("loss_fn", "batch_fn"):
        if getattr(phase, name) is None:
            raise ValueError(f"Phase.{name} is required (run_phase fills it for a Transformer language model "
                             f"from Phase.model_cfg)")
    if phase.init is None and phase.state is None:
        raise ValueError("Phase.init (key -> TrainState) or Phase.state (a TrainState) is required")
    for name, fn in phase.evaluators.items():
        if not callable(fn):
            raise ValueError(f"Phase.evaluators[{name!r}] must be a function (params, step) -> dict, got {fn!r}")


def run_loop(phase: Phase, config, mesh, *, stop_after: int | None = None) -> PhaseResult:
    """Train ``phase`` (resuming from its latest good checkpoint), logging, evaluating and checkpointing:
    :func:`check_resume`, :func:`restore_or_init`, :func:`compile_steps`, :func:`train_loop`; the workdir
    stores ``config`` the first time (:func:`store_config`). Reads ``config.seed`` (init key and the steps'
    keys) and ``config.train``'s ``log_every``, ``eval_every``, ``checkpoint_every``, ``keep_checkpoints``,
    ``grad_accum`` and ``config.parallel.mode`` (:data:`LOOP_DEFAULTS` for those a job's config lacks).

    ``stop_after``: stop (without a final checkpoint) once this many steps ran in this call, as a killed
    run would (used by the resume tests).
    """
    _check_phase(phase)
    check_resume(config, phase.workdir)
    os.makedirs(phase.workdir, exist_ok=True)
    writer = metrics_lib.MetricWriter(phase.workdir, is_primary=_is_primary())
    keep = None if phase.keep_evaluated else int(loop_setting(config, "train.keep_checkpoints"))
    ckpt = ckpt_lib.Checkpointer(os.path.join(phase.workdir, "checkpoints"), max_to_keep=keep)
    try:
        state, shardings, resumed_from = restore_or_init(phase, ckpt, mesh, int(config.seed))
        step = int(jax.device_get(state.step))
        compiled = compile_steps(phase, config, mesh, state, shardings)
        history = _previous_history(phase.workdir, step) if resumed_from is not None else []
        store_config(config, phase.workdir)
        rec = _Recorder(phase, config, compiled, writer, ckpt, history)
        run_state = train_loop(phase, config, compiled, rec, step, stop_after=stop_after)
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    return PhaseResult(state=compiled.current(run_state), history=history,
                       flops_per_step=float(phase.flops_per_step or 0.0), resumed_from=resumed_from)


def bits_per_byte(metrics: dict) -> dict:
    """{"bpb": loss / ln 2}: the training loss (nats per byte) in bits per byte."""
    return {"bpb": metrics["loss"] / math.log(2.0)}


def lm_evaluator(model: Transformer, batches: list[dict], mesh) -> Callable[[Any, int], dict]:
    """fn(params, step) -> {"val_loss", "val_bpb"}: the mean token NLL (nats) of the fixed validation
    ``batches`` (host rows, made global arrays on ``mesh`` at each call), and in bits."""
    eval_step, sharding = jax.jit(make_eval_step(model)), parallel.batch_sharding(mesh)

    def evaluate(params, step) -> dict:
        v = mean_over_batches(lambda b: eval_step(params, data_lib.to_global(b, sharding)), batches)
        return {"val_loss": v, "val_bpb": v / math.log(2.0)}

    return evaluate


def lm_phase(phase: Phase, config, corpus: Corpus, mesh) -> Phase:
    """A Transformer language-model phase (``phase.model_cfg``) as :func:`run_loop` takes it: the loss
    :func:`lm_loss` (alpha ramp ``train.alpha_warmup_steps``), the batches :func:`host_batch` of ``corpus``,
    the validation evaluator :func:`lm_evaluator` on :func:`eval_host_batches` (``train.eval_batches``),
    training FLOPs (``flops.training_flops``), tokens per step and bits/byte in the log. Fields the phase
    sets already are kept (its evaluators run after the validation loss)."""
    if phase.model_cfg is None:
        raise ValueError("Phase.model_cfg is required by run_phase (a Transformer language model); "
                         "run_loop trains a phase with its own loss_fn")
    c, seed, model = config, int(config.seed), Transformer(phase.model_cfg)
    filled = dict(
        loss_fn=lm_loss(model, alpha_warmup_steps=c.train.alpha_warmup_steps),
        batch_fn=lambda t: host_batch(corpus, c.data, t, seed),
        flops_per_step=float(flops_lib.training_flops(phase.model_cfg, c.data.seq_len, c.data.batch_size)),
        tokens_per_step=c.data.batch_size * c.data.seq_len, log_extra=bits_per_byte)
    val = lm_evaluator(model, eval_host_batches(corpus, c.data, c.train.eval_batches, seed), mesh)
    return dataclasses.replace(phase, evaluators={"val": val, **phase.evaluators},
                               **{k: v for k, v in filled.items() if getattr(phase, k) is None})


def run_phase(phase: Phase, config, corpus: Corpus, mesh, *, stop_after: int | None = None) -> PhaseResult:
    """Train the language-model ``phase`` (:func:`lm_phase`) with :func:`run_loop`.

    ``stop_after``: stop (without a final checkpoint) once this many steps ran in this call, as a killed
    run would (used by the resume tests).
    """
    return run_loop(lm_phase(phase, config, corpus, mesh), config, mesh, stop_after=stop_after)


def build_mesh(config):
    return parallel.make_mesh(config.parallel.data, config.parallel.fsdp)


def prepare(config):
    """Validate the config against the devices it will run on: returns (model TransformerConfig, mesh).
    Raises ConfigError (a ValueError) naming the field before any data is read or anything compiles."""
    mesh = build_mesh(config)
    devices = mesh.size if config.parallel.mode == "sharded" else jax.local_device_count() * jax.process_count()
    return config_lib.validate(config, num_devices=devices), mesh


def train(config, workdir: str, *, stop_after: int | None = None) -> PhaseResult:
    """Train one model as ``config`` says (the ``lm`` experiment). Validates everything first."""
    model_cfg, mesh = prepare(config)
    corpus = load_corpus(config.data)
    check_resume(config, workdir)
    tx = make_optimizer(config.optim, config.train.steps, model_cfg=model_cfg)
    model = Transformer(model_cfg)
    say(f"model: {model_cfg.to_dict()}")
    say(f"devices: {parallel.describe(mesh)}; corpus: {len(corpus.train):,} train / {len(corpus.val):,} val bytes")
    phase = Phase(model_cfg=model_cfg, tx=tx, start=0, end=config.train.steps, workdir=workdir,
                  init=state_initializer(model, tx, config.data.seq_len),
                  schedule=make_schedule(config.optim, config.train.steps))
    result = run_phase(phase, config, corpus, mesh, stop_after=stop_after)
    if _is_primary() and config.train.plot:
        out = os.path.join(workdir, "loss.png")
        if metrics_lib.plot_curves(workdir, out):
            say(f"wrote {out}")
    return result
