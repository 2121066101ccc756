"""Training: TrainState, optimizer, jitted train/eval steps, and the loop.

Design (JAX Training Cookbook, big_vision): explicit PRNG keys derived from the step; the batch of step t
and the dropout key of step t depend only on (seed, t), so a resumed run repeats an uninterrupted one
bitwise on CPU; state born sharded (``parallel.init_sharded``) and donated to the step; metrics fetched a
step late so the host never waits on the device; process 0 alone writes logs; every process checkpoints.

Loss: token cross-entropy in float32, sum over weighted positions divided by the global weight count,
so the sharded mode (one global mean) and the pmap mode (psum of per-device sums and counts) give the
same gradients. Gradient accumulation scans over micro-batches and sums gradients of the summed loss.
The alpha-residual scale alpha_t = min(1, t / T) (kexue.fm/archives/8620) is computed inside the step.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kexue_jax import checkpoint as ckpt_lib
from kexue_jax import config as config_lib
from kexue_jax import data as data_lib
from kexue_jax import flops as flops_lib
from kexue_jax import metrics as metrics_lib
from kexue_jax import parallel
from kexue_jax.nn import Transformer, TransformerConfig, alpha_schedule

log = logging.getLogger("kexue_jax")


class NonFiniteLoss(FloatingPointError):
    """Raised when the training loss becomes NaN or Inf; no checkpoint is written for that state."""


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
    if not start:
        return base
    return lambda count: base(jnp.maximum(count - start, 0))


def make_optimizer(optim, total_steps: int, *, update_scales=None, start: int = 0) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and decoupled weight decay on matrices (ndim >= 2).

    The chain always has the same structure, clip -> scale_by_adam -> [per-tensor update scale] ->
    decay -> -lr, so Adam state maps between a small and a widened model (``upscale``)."""
    def decay_mask(params):
        return jax.tree_util.tree_map(lambda x: jnp.ndim(x) >= 2, params)

    scale = (optax.identity() if update_scales is None else
             optax.stateless(lambda u, p=None: jax.tree_util.tree_map(lambda a, c: a * c.astype(a.dtype),
                                                                       u, update_scales)))
    clip = optax.identity() if optim.clip_norm is None else optax.clip_by_global_norm(float(optim.clip_norm))
    return optax.chain(
        clip,
        optax.scale_by_adam(b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps)),
        scale,
        optax.add_decayed_weights(float(optim.weight_decay), mask=decay_mask),
        optax.scale_by_learning_rate(make_schedule(optim, total_steps, start=start)),
    )


# ------------------------------------------------------------------------------------------------
# Steps.

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


def make_train_step(model: Transformer, tx: optax.GradientTransformation, *, seed: int = 0,
                    grad_accum: int = 1, alpha_warmup_steps: int = 0, axis_name: str | None = None):
    """step(state, batch) -> (state, metrics). ``axis_name`` set: inside pmap (psum over devices)."""
    dropout = model.cfg.dropout_rate > 0.0

    def sum_loss(params, mb, rng, alpha):
        s, c = loss_terms(_forward(model, params, mb, train=dropout, alpha=alpha, rng=rng), mb)
        return s, c

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        alpha = alpha_schedule(state.step, alpha_warmup_steps)
        grad_fn = jax.value_and_grad(sum_loss, has_aux=True)
        if grad_accum == 1:
            (loss_sum, count), grads = grad_fn(state.params, batch, rng, alpha)
        else:
            micro = jax.tree_util.tree_map(
                lambda x: jnp.swapaxes(x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]), 0, 1),
                batch)

            def body(carry, inp):
                mb, i = inp
                (s, c), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), alpha)
                acc_g, acc_s, acc_c = carry
                return (jax.tree_util.tree_map(jnp.add, acc_g, g), acc_s + s, acc_c + c), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            (grads, loss_sum, count), _ = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
                (micro, jnp.arange(grad_accum)))
        if axis_name is not None:
            grads, loss_sum, count = jax.lax.psum((grads, loss_sum, count), axis_name)
        grads = jax.tree_util.tree_map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / count, "grad_norm": optax.tree.norm(grads)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def make_eval_step(model: Transformer):
    """eval(params, batch) -> (sum of token NLL, token count)."""
    def step(params, batch):
        return loss_terms(_forward(model, params, batch, train=False, alpha=1.0, rng=None), batch)
    return step


def init_state(model: Transformer, tx: optax.GradientTransformation, key, seq_len: int) -> TrainState:
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(key, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# ------------------------------------------------------------------------------------------------
# Data for the loop.

@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray
    val: np.ndarray


def load_corpus(data_cfg) -> Corpus:
    plays = data_lib.load_plays(data_cfg.path or None)
    train, val = data_lib.split_corpus(plays, data_cfg.val_fraction, data_cfg.split_seed)
    need = data_cfg.seq_len + 2
    if len(train) < need or len(val) < need:
        raise ValueError(f"config.data.path: the text is too short for data.seq_len={data_cfg.seq_len} "
                         f"(train {len(train)} bytes, validation {len(val)} bytes)")
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
        return [data_lib.mlm_batch(corpus.val, step=i, seed=seed + 7919, batch_size=data_cfg.batch_size,
                                   seq_len=data_cfg.seq_len, mask_rate=data_cfg.mask_rate,
                                   process_index=jax.process_index(), process_count=jax.process_count())
                for i in range(num)]
    return data_lib.eval_batches(corpus.val, batch_size=data_cfg.batch_size, seq_len=data_cfg.seq_len,
                                 num_batches=num, process_index=jax.process_index(),
                                 process_count=jax.process_count())


# ------------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class Phase:
    """One stretch of training: a model, an optimizer and steps [start, end) logged under ``workdir``.

    ``init``: a function key -> TrainState (called under jit with sharded outputs) used when the phase's
    checkpoint directory has nothing to resume; or ``state``: a ready TrainState (e.g. a widened one).
    ``flops_offset``: training FLOPs spent before this phase (for compute curves); ``total_steps``: the
    denominator of the progress line.
    """

    model_cfg: TransformerConfig
    tx: optax.GradientTransformation
    start: int
    end: int
    workdir: str
    init: Callable[[Any], TrainState] | None = None
    state: TrainState | None = None
    flops_offset: float = 0.0
    name: str = ""
    schedule: Callable[[int], Any] | None = None  # for the "lr" column of the metrics


@dataclasses.dataclass
class PhaseResult:
    state: TrainState
    history: list[dict]
    flops_per_step: float
    resumed_from: int | None


def _is_primary() -> bool:
    return jax.process_index() == 0


def _say(msg: str) -> None:
    if _is_primary():
        print(msg, flush=True)


class _Preemption:
    """SIGTERM sets a flag; the loop then saves a checkpoint at the current step and stops cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class Preempted(RuntimeError):
    """The run received SIGTERM and saved a checkpoint; rerun the same command to resume."""


def run_phase(phase: Phase, config, corpus: Corpus, mesh, *, stop_after: int | None = None) -> PhaseResult:
    """Train ``phase`` (resuming from its latest good checkpoint), logging, evaluating and checkpointing.

    ``stop_after``: stop (without a final checkpoint) once this many steps ran in this call, as a killed
    run would (used by the resume tests).
    """
    c = config
    mode = c.parallel.mode
    model = Transformer(phase.model_cfg)
    os.makedirs(phase.workdir, exist_ok=True)
    writer = metrics_lib.MetricWriter(phase.workdir, is_primary=_is_primary())
    ckpt = ckpt_lib.Checkpointer(os.path.join(phase.workdir, "checkpoints"), max_to_keep=c.train.keep_checkpoints)
    seed = int(c.seed)
    tag = f"[{phase.name}] " if phase.name else ""

    # -- state: resume, given, or born sharded --------------------------------------------------
    if phase.state is not None:
        abstract = jax.eval_shape(lambda s: s, phase.state)
    else:
        abstract = jax.eval_shape(phase.init, jax.random.PRNGKey(seed))
    shardings = parallel.state_shardings(abstract, mesh)
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
    resumed_from = None
    state = None
    if ckpt.latest_step() is not None:
        state, resumed_from = ckpt.restore(target)
        _say(f"{tag}resumed from step {resumed_from} ({ckpt.directory})")
    if state is None:
        if phase.state is not None:
            state = jax.device_put(phase.state, shardings)
        else:
            state = jax.jit(phase.init, out_shardings=shardings)(jax.random.PRNGKey(seed))
    step = int(jax.device_get(state.step))
    if resumed_from is None and step != phase.start:
        raise ValueError(f"{tag}the initial state is at step {step}, the phase starts at {phase.start}")

    # -- compiled steps --------------------------------------------------------------------------
    seq_len, batch_size = c.data.seq_len, c.data.batch_size
    flops_per_step = float(flops_lib.training_flops(phase.model_cfg, seq_len, batch_size))
    step_kw = dict(seed=seed, grad_accum=c.train.grad_accum, alpha_warmup_steps=c.train.alpha_warmup_steps)
    eval_step = jax.jit(make_eval_step(model))
    batch_sharding = parallel.batch_sharding(mesh)
    if mode == "pmap":
        pstep = jax.pmap(make_train_step(model, phase.tx, axis_name="batch", **step_kw), axis_name="batch",
                         donate_argnums=0)
        n_local = jax.local_device_count()
        run_state = parallel.replicate(jax.device_get(state))

        def do_step(s, t):
            return pstep(s, parallel.split_for_pmap(host_batch(corpus, c.data, t, seed), n_local))

        def current(s):
            return parallel.unreplicate(s)
    else:
        jstep = jax.jit(make_train_step(model, phase.tx, **step_kw), donate_argnums=0,
                        out_shardings=(shardings, None))
        run_state = state

        def do_step(s, t):
            return jstep(s, data_lib.to_global(host_batch(corpus, c.data, t, seed), batch_sharding))

        def current(s):
            return s

    val_batches = eval_host_batches(corpus, c.data, c.train.eval_batches, seed)

    all_finite = jax.jit(lambda p: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(p)])))

    def evaluate(params) -> float:
        if mode == "pmap":
            params = jax.device_put(params, shardings.params)
        tot = cnt = 0.0
        for vb in val_batches:
            s, n = eval_step(params, data_lib.to_global(vb, batch_sharding))
            tot, cnt = tot + float(s), cnt + float(n)
        return tot / max(cnt, 1.0)

    def save(s, t):
        if not bool(jax.device_get(all_finite(current(s).params))):
            raise NonFiniteLoss(f"{tag}non-finite parameters at step {t}; not checkpointed")
        ckpt.save(t, current(s))

    progress = metrics_lib.ProgressLine(phase.end, tokens_per_step=batch_size * seq_len,
                                        flops_per_step=flops_per_step,
                                        peak_flops=parallel.peak_flops_per_device() * jax.device_count())
    history: list[dict] = []
    if resumed_from is not None and os.path.exists(os.path.join(phase.workdir, metrics_lib.METRICS_FILE)):
        # evaluations of the earlier run(s), up to the restored step
        by_step = {r["step"]: {k: r[k] for k in ("step", "val_loss", "val_bpb", "flops") if k in r}
                   for r in metrics_lib.read_metrics(phase.workdir) if "val_loss" in r and r["step"] <= step}
        history = [by_step[t] for t in sorted(by_step)]
    pending = None  # (step, metrics on device): fetched one step late
    bad = jnp.zeros((), bool)
    ran = 0
    if _is_primary() and step == phase.start and resumed_from is None:
        writer.write_config(config_lib.to_dict(c))

    def flush(p):
        t, m = p
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not all(math.isfinite(v) for v in m.values()):
            raise NonFiniteLoss(f"{tag}non-finite loss at step {t} ({m}); stopped. The last good checkpoint "
                                f"is step {ckpt.latest_step()} in {ckpt.directory}; nothing was saved after it")
        m["bpb"] = m["loss"] / math.log(2.0)
        m["flops"] = phase.flops_offset + (t - phase.start) * flops_per_step
        if phase.schedule is not None:
            m["lr"] = float(phase.schedule(t - 1))
        writer.write(t, m)
        _say(tag + progress(t, {"loss": m["loss"], "bpb": m["bpb"]}))

    def record_eval(t: int) -> float:
        v = evaluate(current(run_state).params)
        rec = {"step": t, "val_loss": v, "val_bpb": v / math.log(2.0),
               "flops": phase.flops_offset + (t - phase.start) * flops_per_step}
        history.append(rec)
        writer.write(t, {k: x for k, x in rec.items() if k != "step"})
        return v

    def check_loss(t: int) -> None:
        if bool(jax.device_get(bad)):
            raise NonFiniteLoss(f"{tag}non-finite loss before step {t}; stopped. The last good "
                                f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")

    with _Preemption() as preempt:
        try:
            if step == phase.start and resumed_from is None:
                record_eval(step)
            while step < phase.end:
                run_state, m = do_step(run_state, step)
                bad = bad | ~jnp.isfinite(m["loss"] if mode != "pmap" else m["loss"][0])
                step += 1
                ran += 1
                if pending is not None:
                    flush(pending)
                    pending = None
                if step % c.train.log_every == 0 or step == phase.end:
                    pending = (step, m if mode != "pmap" else parallel.unreplicate(m))
                if step % c.train.eval_every == 0 or step == phase.end:
                    check_loss(step)
                    v = record_eval(step)
                    _say(f"{tag}step {step}: val_loss {v:.4f} (val bpb {v / math.log(2.0):.3f})")
                if step % c.train.checkpoint_every == 0 or step == phase.end or preempt.requested:
                    check_loss(step)
                    save(run_state, step)
                    if preempt.requested:
                        ckpt.wait()
                        raise Preempted(f"{tag}SIGTERM: saved step {step}; rerun to resume")
                if stop_after is not None and ran >= stop_after:
                    break
            if pending is not None:
                flush(pending)
        finally:
            ckpt.wait()
            ckpt.close()
            writer.close()
    return PhaseResult(state=current(run_state), history=history, flops_per_step=flops_per_step,
                       resumed_from=resumed_from)


def build_mesh(config):
    return parallel.make_mesh(config.parallel.data, config.parallel.fsdp)


def prepare(config):
    """Validate the config against the devices it will run on: returns (model TransformerConfig, mesh).
    Raises ValueError naming the field before any data is read or anything compiles."""
    mesh = build_mesh(config)
    devices = mesh.size if config.parallel.mode == "sharded" else jax.local_device_count() * jax.process_count()
    return config_lib.validate(config, num_devices=devices), mesh


def train(config, workdir: str, *, stop_after: int | None = None) -> PhaseResult:
    """Train one model as ``config`` says (the ``lm`` experiment). Validates everything first."""
    model_cfg, mesh = prepare(config)
    corpus = load_corpus(config.data)
    tx = make_optimizer(config.optim, config.train.steps)
    model = Transformer(model_cfg)
    _say(f"model: {model_cfg.to_dict()}")
    _say(f"devices: {parallel.describe(mesh)}; corpus: {len(corpus.train):,} train / {len(corpus.val):,} val bytes")
    phase = Phase(model_cfg=model_cfg, tx=tx, start=0, end=config.train.steps, workdir=workdir,
                  init=lambda key: init_state(model, tx, key, config.data.seq_len),
                  schedule=make_schedule(config.optim, config.train.steps))
    result = run_phase(phase, config, corpus, mesh, stop_after=stop_after)
    if _is_primary() and config.train.plot:
        out = os.path.join(workdir, "loss.png")
        if metrics_lib.plot_curves(workdir, out):
            _say(f"wrote {out}")
    return result
