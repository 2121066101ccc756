"""Does what post 8620 derives at step 0 decide what trains? A measured study (kexue.fm/archives/8620).

``python train.py --config=configs/init_study.py[:tiny|:default|:full] --workdir=DIR``

The post derives, at initialization, why attention needs 1/sqrt(d) (Var(q.k) = d), why Post-Norm
x <- Norm(x + F(x)) weakens the identity path (x_0 weight 2^{-l/2}) and Pre-Norm x <- x + F(Norm x) does
not, and recommends x <- x + alpha_t F(x) with alpha_t = min(1, t / T) not trained. This module trains
narrow byte-level LMs on Shakespeare to see what those step-0 facts do to training. Sections (cells):

* ``residual``   residual {post, pre, alpha, alpha_post, rezero, deepnorm} x depth x lr-warmup, at one
                 learning rate chosen for Pre-LN (``study.lr``);
* ``lr``         each residual's best of ``study.lrs`` at ``study.sweep_depths`` x ``study.sweep_warmups``
                 (the base-lr cell counts as one of the three when its lr is in the list);
* ``attention``  attn_scale {sqrt (1/sqrt d), none (standard init), t5 (none, q/k init var / sqrt d),
                 mup (1/d)} x head size, with the attention entropy at init;
* ``param``      parameterization {standard, ntk} x Adam lr (the post's "every parameter moves ~1% per step");
* ``truncation`` second-moment init from a truncated normal with and without the 1.1368 std correction;
* ``no_norm``    the alpha ramp (and ReZero) with no normalization layer at all, not even a final one.

Every cell records: its settings; validation loss at fixed steps; ``diverged`` (a non-finite loss, or a
final validation loss above the initial one); the gradient norm of every layer at ``study.grad_steps``;
the alpha trajectory (ramp value, ReZero's learned scalars, DeepNorm's constant); the attention entropy
at init for the attention cells. Cells are written one JSON each under ``DIR/cells/`` as they finish, named
by the cell and a digest of all the settings that train it (:func:`cell_key`), so a rerun skips finished
cells of the same settings and trains anew those whose settings changed (another batch size, width, seed,
number of steps ...): a report never mixes cells of two configs. Outputs: ``DIR/report.json`` (one record
per run), ``DIR/table.md`` (a heat-map-style table: final loss per cell, "div" where it diverged) and
``DIR/loss_curves.png``.

Each cell trains as a ``training.Phase`` run by ``training.run_loop`` (:func:`run_cell`), the loop of every
job: ``training.make_optimizer`` with the cell's lr and warmup (:func:`cell_schedule`: linear warmup, cosine
decay), the language-model loss, batches addressed by step, and an evaluator recording the validation
loss, the residual scale and, at ``study.grad_steps``, the gradient norm of every layer. While it trains, a
cell keeps checkpoints and metrics in ``DIR/cells/<name>-<key>/`` (a killed study resumes the cell in progress
from its last checkpoint, every ``train.checkpoint_every`` steps); once its record is written they are
deleted. Cells with the same model share one compiled step whatever their lr and warmup: both are values in
the optimizer state (:func:`cell_optimizer`). The alpha ramp alpha_t = ``norms.alpha_schedule(t,
config.train.alpha_warmup_steps)`` is computed from the step counter inside the step: it is never a parameter
and no gradient reaches it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kexue_jax import config as config_lib
from kexue_jax import metrics as metrics_lib
from kexue_jax import parallel
from kexue_jax import reporting
from kexue_jax import training
from kexue_jax.nn import Transformer, TransformerConfig, alpha_schedule
from kexue_jax.nn import init as init_lib
from kexue_jax.nn.attention import ATTN_SCALES
from kexue_jax.nn.norms import RESIDUALS, deepnorm_alpha
from kexue_jax.nn.transformer import PARAMETERIZATIONS

SECTIONS = ("residual", "lr", "attention", "param", "truncation", "no_norm")
NO_NORM_RESIDUALS = ("alpha", "rezero")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run: a model, a peak learning rate, an lr-warmup length and its settings record."""

    name: str
    section: str
    model: TransformerConfig
    lr: float
    warmup: int
    truncation_correction: bool = True
    entropy: bool = False  # record the attention entropy at init

    @property
    def settings(self) -> dict:
        m = self.model
        return dict(section=self.section, residual=m.residual, depth=m.num_layers, warmup=self.warmup,
                    lr=self.lr, d_model=m.d_model, num_heads=m.num_heads, head_dim=m.head_dim,
                    attn_scale=m.attn_scale, parameterization=m.parameterization, init_std=m.init_std,
                    final_norm=m.has_final_norm, truncation_correction=self.truncation_correction)


def _tag(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _cell(section: str, model: TransformerConfig, lr: float, warmup: int, **kw) -> Cell:
    parts = [model.residual, f"L{model.num_layers}", f"w{warmup}", f"lr{_tag(lr)}"]
    if model.attn_scale != "sqrt" or section == "attention":
        parts.append(f"attn-{model.attn_scale}-h{model.num_heads}x{model.head_dim}-d{model.d_model}")
    if model.parameterization != "standard":
        parts.append(model.parameterization)
    if not kw.get("truncation_correction", True):
        parts.append("trunc-uncorrected")
    if model.residual in NO_NORM_RESIDUALS and not model.has_final_norm:
        parts.append("nonorm")
    return Cell(name="_".join(parts), section=section, model=model, lr=float(lr), warmup=int(warmup), **kw)


def validate(config) -> TransformerConfig:
    """Check the ``study`` section (errors name the field and allowed values); returns the base model."""
    base = config_lib.validate(config)  # one device: the cells are small; no mesh or batch split
    s = config.study

    def fail(field, allowed, got):
        raise ValueError(f"config.study.{field} must be {allowed}, got {got!r}")

    subsets = dict(sections=SECTIONS, residuals=RESIDUALS, attn_scales=ATTN_SCALES,
                   parameterizations=PARAMETERIZATIONS, truncation_residuals=RESIDUALS,
                   no_norm_residuals=NO_NORM_RESIDUALS)
    for name, allowed in subsets.items():
        if any(v not in allowed for v in s[name]):
            fail(name, f"a subset of {allowed}", tuple(s[name]))
    if s.attn_residual not in RESIDUALS:
        fail("attn_residual", f"one of {RESIDUALS}", s.attn_residual)
    for name in ("depths", "sweep_depths", "head_dims"):
        if not s[name] or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in s[name]):
            fail(name, "a non-empty tuple of positive integers", s[name])
    for name in ("warmups", "sweep_warmups"):
        if not s[name] or any(not isinstance(v, int) or not 0 <= v <= config.train.steps for v in s[name]):
            fail(name, f"a non-empty tuple of integers in [0, train.steps={config.train.steps}]", s[name])
    for name in ("lrs", "param_lrs"):
        if not s[name] or any(not isinstance(v, (int, float)) or v <= 0 for v in s[name]):
            fail(name, "a non-empty tuple of numbers > 0", s[name])
    for name in ("attn_depth", "param_depth", "truncation_depth", "no_norm_depth", "attn_num_heads"):
        if isinstance(s[name], bool) or not isinstance(s[name], int) or s[name] < 1:
            fail(name, "a positive integer", s[name])
    if not s.lr > 0:
        fail("lr", "a number > 0", s.lr)
    if any(not isinstance(t, int) or not 0 <= t <= config.train.steps for t in s.grad_steps):
        fail("grad_steps", f"a tuple of integers in [0, train.steps={config.train.steps}]", s.grad_steps)
    if base.init_std is not None:
        raise ValueError("config.model.init_std must be None for this study (the post's second-moment init, "
                         "where Var(q.k) = d at init); a fixed std such as 0.02 makes q.k tiny at any d")
    if base.token_mixer != "attention" or base.position == "relative":
        raise ValueError("config.model.token_mixer must be 'attention' and position not 'relative' here")
    return base


def grid(config, base: TransformerConfig) -> list[Cell]:
    """The cells of ``config.study`` in run order: cheap and most informative first, so that a run cut
    short (a shared CPU) still answers every claim at the shallowest depth and the main ones deeper:
    every cell of the shallowest depth (residual, attention trigger case, parameterization), then the
    no-warmup residual cells by depth, the no-norm goal, the lr-warmup cells by depth, the lr sweep and
    the truncation cells. A cell asked for twice (e.g. the base-lr cell of the lr sweep) appears once,
    under the first section that asks for it."""
    s = config.study
    lr0 = float(s.lr)
    cells: list[Cell] = []

    def add(cell: Cell):
        if all(c.name != cell.name for c in cells):
            cells.append(cell)

    def residual_cells(warmups):
        if "residual" in s.sections:
            for depth in s.depths:
                for res in s.residuals:
                    for w in warmups:
                        add(_cell("residual", base.replace(num_layers=depth, residual=res), lr0, w))

    residual_cells([w for w in s.warmups if w == 0])
    if "attention" in s.sections:
        for hd in s.head_dims:
            for scale in s.attn_scales:
                m = base.replace(num_layers=s.attn_depth, head_dim=hd, num_heads=s.attn_num_heads,
                                 attn_scale=scale, residual=s.attn_residual)
                add(_cell("attention", m, lr0, s.attn_warmup, entropy=True))
    if "no_norm" in s.sections:
        for res in s.no_norm_residuals:
            m = base.replace(num_layers=s.no_norm_depth, residual=res, final_norm=False)
            add(_cell("no_norm", m, lr0, 0))
    residual_cells([w for w in s.warmups if w != 0])
    if "lr" in s.sections:
        for depth in s.sweep_depths:
            for res in s.residuals:
                for w in s.sweep_warmups:
                    for lr in s.lrs:
                        add(_cell("lr", base.replace(num_layers=depth, residual=res), lr, w))
    if "param" in s.sections:
        for p in s.parameterizations:
            for lr in s.param_lrs:
                m = base.replace(num_layers=s.param_depth, residual="pre", parameterization=p)
                add(_cell("param", m, lr, s.param_warmup))
    if "truncation" in s.sections:
        for res in s.truncation_residuals:
            for corrected in (True, False):
                m = base.replace(num_layers=s.truncation_depth, residual=res)
                add(_cell("truncation", m, lr0, 0, truncation_correction=corrected))
    shallow = min(c.model.num_layers for c in cells) if cells else 0
    late = {"residual": 1, "no_norm": 2, "lr": 4, "truncation": 5}

    def priority(c: Cell):
        if c.model.num_layers == shallow or c.section in ("attention", "param"):
            return (0, c.model.num_layers)
        group = late[c.section] + (2 if c.section == "residual" and c.warmup else 0)
        return (group, c.model.num_layers)

    return sorted(cells, key=priority)  # stable: the section order above within a group


# ------------------------------------------------------------------------------------------------
# Training one cell.

def layer_grad_norms(grads, num_layers: int) -> jax.Array:
    """[num_layers] L2 norm of each ``layer_i`` subtree of the gradient."""
    return jnp.stack([optax.tree.norm(grads[f"layer_{i}"]) for i in range(num_layers)])


def cell_optim(cell: Cell, config) -> ml_collections.ConfigDict:
    """``config.optim`` with the cell's peak rate and warmup and a cosine decay: ``training.make_schedule``
    (linear warmup from 0 over ``cell.warmup`` steps, cosine to lr x ``optim.min_lr_ratio`` at train.steps)."""
    optim = config.optim.copy_and_resolve_references()
    optim.update(lr=float(cell.lr), warmup_steps=int(cell.warmup), schedule="cosine")
    return optim


def cell_schedule(count, lr, warmup, total_steps: int, min_lr_ratio: float):
    """``training.make_schedule`` of :func:`cell_optim` at optimizer step ``count`` with the peak rate ``lr`` and
    the warmup length ``warmup`` given as (traced) arrays: a linear warmup from 0 over ``warmup`` steps, then a
    cosine from ``lr`` to lr x ``min_lr_ratio`` over the remaining max(1, total_steps - warmup) steps, and
    lr x ``min_lr_ratio`` after them. The same values as ``make_schedule`` up to float32 rounding; one compiled
    step serves every lr and warmup (:func:`cell_optimizer`)."""
    lr = jnp.asarray(lr)
    count, warmup = jnp.asarray(count, jnp.float32), jnp.asarray(warmup, jnp.float32)
    ramp = -lr * (1.0 - jnp.clip(count, 0.0, warmup) / jnp.maximum(warmup, 1.0)) + lr  # optax.linear_schedule's
    decay_steps = jnp.maximum(float(total_steps) - warmup, 1.0)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(count - warmup, decay_steps) / decay_steps))
    decay = lr * ((1.0 - float(min_lr_ratio)) * cosine + float(min_lr_ratio))
    return jnp.where(count < warmup, ramp, decay)


def _cell_hyperparams(optim_items: tuple, total: int):
    """``optax.inject_hyperparams`` of (lr, warmup_steps) -> ``training.make_optimizer`` of the optimizer
    ``optim_items`` (without lr and warmup) with :func:`cell_schedule`."""
    optim = ml_collections.ConfigDict(dict(optim_items))

    def optimizer(lr, warmup_steps):
        return training.make_optimizer(optim, total, schedule=lambda count: cell_schedule(
            count, lr, warmup_steps, total, optim.min_lr_ratio))

    return optax.inject_hyperparams(optimizer)


def _shared_items(cell_opt: ml_collections.ConfigDict) -> tuple:
    return tuple(sorted((k, v) for k, v in cell_opt.items() if k not in ("lr", "warmup_steps")))


@functools.lru_cache(maxsize=32)
def _shared_optimizer(optim_items: tuple, total: int) -> optax.GradientTransformation:
    # one object per optimizer config: training.make_step is cached on it (and the loss), so is its compilation.
    # Its update reads lr and warmup from the state (cell_optimizer's); the placeholders here are never used
    return _cell_hyperparams(optim_items, total)(lr=0.0, warmup_steps=0)


def cell_optimizer(cell: Cell, config, params) -> tuple[optax.GradientTransformation, Any]:
    """(tx, opt_state) training ``cell``'s ``params``: ``training.make_optimizer`` of :func:`cell_optim` whose
    peak lr and warmup are in the optimizer state (``optax.inject_hyperparams``; ``opt_state.hyperparams``
    holds ``lr`` and ``warmup_steps``) rather than in the compiled step. ``tx`` is one object for every cell of
    the same ``config.optim`` and ``train.steps``: cells with the same model share one compiled train step
    (``training.make_step`` is cached on the loss and the tx) whatever their lr and warmup."""
    optim, total = cell_optim(cell, config), int(config.train.steps)
    items = _shared_items(optim)
    warmup = jnp.asarray(int(cell.warmup), jnp.int32)  # not weakly typed: a restored state has the same types
    state = _cell_hyperparams(items, total)(lr=float(cell.lr), warmup_steps=warmup).init(params)
    return _shared_optimizer(items, total), state


@functools.lru_cache(maxsize=32)
def _cell_functions(model_cfg: TransformerConfig, alpha_ramp: int):
    """(loss_fn, eval step, layer gradient norms) of one architecture, cached: the cells of one architecture
    share them and their compilations. The alpha ramp alpha_t = ``alpha_schedule(t, alpha_ramp)`` comes from
    the step counter: never a parameter, no gradient reaches it."""
    model = Transformer(model_cfg)

    def forward(params, batch, t):
        return model.apply({"params": params}, batch["inputs"], alpha=alpha_schedule(t, alpha_ramp))

    def mean_loss(params, batch, t):
        s, c = training.loss_terms(forward(params, batch, t), batch)
        return s / c

    evaluate = jax.jit(lambda params, batch, t: training.loss_terms(forward(params, batch, t), batch))
    grad_norms = jax.jit(lambda params, batch, t: layer_grad_norms(jax.grad(mean_loss)(params, batch, t),
                                                                   model_cfg.num_layers))
    return training.lm_loss(model, alpha_warmup_steps=alpha_ramp), evaluate, grad_norms


def uncorrect_truncation(params):
    """The params a hand-rolled ``std * truncated_normal(-2, 2)`` init would have given: every dense
    kernel (sampled from the corrected truncated normal) times sqrt(gamma) = 0.8796 (post 8620: the
    uncorrected sampler's variance is gamma std^2, gamma = 0.7737413)."""
    shrink = math.sqrt(init_lib.truncated_normal_variance(2.0))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * shrink if getattr(path[-1], "key", None) == "kernel" else x, params)


def attention_entropy(model_cfg: TransformerConfig, params, tokens) -> dict:
    """Mean softmax entropy (nats) of the causal attention rows at init, per layer and overall, and the
    uniform rows' mean entropy mean_i ln(i + 1) for comparison (post 8620's claim 4: near 0 when the
    logits span +-3 sqrt(d))."""
    _, aux = Transformer(model_cfg).apply({"params": params}, tokens, return_intermediates=True)
    per_layer = []
    for p in aux["attention"]:
        p = p.astype(jnp.float32)
        per_layer.append(float(jnp.mean(-jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0), axis=-1))))
    n = tokens.shape[1]
    return {"entropy_init": float(np.mean(per_layer)), "entropy_init_per_layer": per_layer,
            "entropy_uniform": float(np.mean(np.log(np.arange(1, n + 1))))}


def alpha_record(cell: Cell, params, t: int, ramp: int) -> Any:
    """The residual scale at step t: the ramp value, ReZero's learned scalars, or DeepNorm's constant."""
    res = cell.model.residual
    if res in ("alpha", "alpha_post"):
        return float(alpha_schedule(t, ramp))
    if res == "rezero":
        return [float(params[f"layer_{i}"]["rezero_alpha"]) for i in range(cell.model.num_layers)]
    if res == "deepnorm":
        return deepnorm_alpha(cell.model.num_layers)
    return None


def _numbered(prefix: str, values) -> dict:
    """{"prefix_0": v0, ...}: a list as scalar metrics (an evaluation record holds scalars)."""
    return {f"{prefix}_{i}": float(v) for i, v in enumerate(values)}


def _unnumbered(record: dict, prefix: str) -> list | None:
    """The list :func:`_numbered` made of ``prefix`` in ``record``; None if it has none."""
    n = sum(1 for k in record if re.fullmatch(rf"{prefix}_\d+", k))
    return [record[f"{prefix}_{i}"] for i in range(n)] if n else None


def cell_evaluator(cell: Cell, config, corpus, val_batches):
    """fn(params, step) -> {"val_loss" (with alpha_t, nats/byte), the residual scale (``alpha`` or
    ``alpha_<layer>``), and at ``study.grad_steps`` the gradient norm of every layer on the batch of that step
    (``grad_norm_<layer>``: the step's own gradient, taken at its params)}."""
    c, total, ramp = config, int(config.train.steps), int(config.train.alpha_warmup_steps)
    _, evaluate, grad_norms = _cell_functions(cell.model, ramp)
    grad_steps = {int(t) for t in c.study.grad_steps if int(t) < total}

    def fn(params, step) -> dict:
        out = {"val_loss": training.mean_over_batches(lambda b: evaluate(params, b, step), val_batches)}
        alpha = alpha_record(cell, params, step, ramp)
        out.update(_numbered("alpha", alpha) if isinstance(alpha, list) else {} if alpha is None else {"alpha": alpha})
        if step in grad_steps:
            batch = {k: jnp.asarray(v) for k, v in training.host_batch(corpus, c.data, step, int(c.seed)).items()}
            out.update(_numbered("grad_norm", np.asarray(grad_norms(params, batch, step))))
        return out

    return fn


def cell_run_config(cell: Cell, config) -> ml_collections.ConfigDict:
    """What trains ``cell`` as a config for ``training.run_loop`` (stored in the cell's run directory): the
    seed, data, train and parallel sections, the cell's optimizer (:func:`cell_optim`) and the cell itself."""
    cell_dict = json.loads(json.dumps(dataclasses.asdict(cell), default=str))
    return ml_collections.ConfigDict(dict(
        experiment="init_study_cell", seed=int(config.seed), data=config.data.to_dict(),
        optim=cell_optim(cell, config).to_dict(), train=config.train.to_dict(), parallel=config.parallel.to_dict(),
        cell=cell_dict))


def cell_record(cell: Cell, config, workdir: str, diverged_at: int | None) -> dict:
    """A cell's record (module docstring) from the metrics log of its run: evaluations (records without a
    training ``loss``) and training losses, the last line of each step."""
    total, ramp = int(config.train.steps), int(config.train.alpha_warmup_steps)
    evals, losses = {}, {}
    for r in metrics_lib.read_metrics(workdir):
        (losses if "loss" in r else evals)[str(r["step"])] = r
    record: dict[str, Any] = {"name": cell.name, **cell.settings, "steps": total, "alpha_ramp_steps": ramp}
    steps = sorted(evals, key=int)
    record["val_loss"] = {t: evals[t]["val_loss"] for t in steps}
    record["alpha"] = {t: evals[t].get("alpha", _unnumbered(evals[t], "alpha")) for t in steps}
    record["grad_norm_per_layer"] = {t: _unnumbered(evals[t], "grad_norm") for t in steps
                                     if _unnumbered(evals[t], "grad_norm") is not None}
    vals = record["val_loss"]
    initial, final = vals["0"], vals.get(str(total), float("nan"))
    record.update(
        train_loss={t: losses[t]["loss"] for t in sorted(losses, key=int)}, initial_val_loss=initial,
        final_val_loss=final, best_val_loss=min((v for v in vals.values() if math.isfinite(v)), default=float("nan")),
        diverged=bool(diverged_at is not None or not math.isfinite(final) or final > initial), diverged_at=diverged_at)
    return record


def run_cell(cell: Cell, config, corpus, val_batches, workdir: str, *, stop_after: int | None = None) -> dict:
    """Train one cell for ``config.train.steps`` steps as a ``training.Phase`` run by ``training.run_loop`` in
    ``workdir`` (one device; checkpoints every ``train.checkpoint_every`` steps, so a cell in progress resumes
    from its last one); returns its record. A non-finite loss ends the cell as diverged (``diverged_at``).
    ``stop_after``: stop after this many steps, as a killed run would (tests)."""
    c, total, ramp = config, int(config.train.steps), int(config.train.alpha_warmup_steps)
    optim, (loss_fn, _, _) = cell_optim(cell, c), _cell_functions(cell.model, ramp)
    start = time.time()
    tokens = jnp.zeros((1, c.data.seq_len), jnp.int32)
    params = Transformer(cell.model).init(jax.random.PRNGKey(int(c.seed)), tokens)["params"]  # eager: fast
    if not cell.truncation_correction:
        params = uncorrect_truncation(params)
    entropy = attention_entropy(cell.model, params, jnp.asarray(val_batches[0]["inputs"])) if cell.entropy else {}
    tx, opt_state = cell_optimizer(cell, c, params)
    phase = training.Phase(
        tx=tx, start=0, end=total, workdir=workdir, name=cell.name,
        state=training.TrainState(jnp.zeros((), jnp.int32), params, opt_state), loss_fn=loss_fn,
        batch_fn=lambda t: training.host_batch(corpus, c.data, t, int(c.seed)),
        evaluators={"cell": cell_evaluator(cell, c, corpus, val_batches)},
        eval_steps=tuple(int(t) for t in c.study.grad_steps), schedule=training.make_schedule(optim, total))
    diverged_at = None
    try:
        training.run_loop(phase, cell_run_config(cell, c), parallel.make_mesh(1), stop_after=stop_after)
    except training.NonFiniteLoss as e:
        diverged_at = e.step
        training.say(f"[{cell.name}] diverged: {e}")
    return {**cell_record(cell, c, workdir, diverged_at), **entropy, "seconds": round(time.time() - start, 1)}


# ------------------------------------------------------------------------------------------------
# Reports.

def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


#: config fields that do not change what a cell trains, left out of its cache key (the model section is
#: in the key through each cell's own TransformerConfig; of the study section only ``grad_steps`` is)
KEY_EXCLUDED = ("experiment", "model", "parallel", "study", "train.plot", "train.checkpoint_every",
                "train.keep_checkpoints")


def cell_key(cell: Cell, config) -> str:
    """A digest (12 hex digits) of everything that decides what ``cell`` trains and records: the cell (its
    model, lr, warmup, truncation and entropy settings) and the config outside :data:`KEY_EXCLUDED` (data,
    optimizer, steps and evaluation cadence, seed, alpha ramp, ``study.grad_steps``). A finished cell is
    reused only by a run whose key is the same, so a rerun with other settings never mixes cells."""
    shared = {k: v for k, v in config_lib.to_dict(config).items() if k not in KEY_EXCLUDED}
    shared["train"] = {k: v for k, v in shared["train"].items() if f"train.{k}" not in KEY_EXCLUDED}
    shared["grad_steps"] = [int(t) for t in config.study.grad_steps]
    spec = json.dumps({"cell": dataclasses.asdict(cell), "config": shared}, sort_keys=True, default=str)
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()[:12]


def cell_path(cell_dir: str, cell: Cell, config) -> str:
    """``cell_dir/<cell name>-<cell_key>.json``: where the record of ``cell`` trained under ``config`` is kept."""
    return os.path.join(cell_dir, f"{_safe(cell.name)}-{cell_key(cell, config)}.json")


#: a run whose final loss is within this of the unigram cross-entropy learned nothing beyond byte frequencies
UNIGRAM_MARGIN = 0.05


def _fmt(r: dict | None) -> str:
    if r is None:
        return "-"
    if r["diverged"]:
        return "div"
    return f"{r['final_val_loss']:.3f}" + (" u" if r.get("at_unigram") else "")


def best_of(records: list[dict], **match) -> dict | None:
    """The record with the lowest final loss among non-diverged runs matching ``match`` (None if none;
    a diverged run if all diverged)."""
    rs = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    ok = [r for r in rs if not r["diverged"]]
    return min(ok, key=lambda r: r["final_val_loss"]) if ok else (rs[0] if rs else None)


def tables(records: list[dict], config) -> str:
    """Markdown heat-map-style tables: final validation loss (nats/byte) per cell, "div" where it diverged."""
    s, lr0 = config.study, float(config.study.lr)
    unigram = next((r["unigram_val_loss"] for r in records if "unigram_val_loss" in r), float("nan"))
    out = [f"Final validation loss (nats/byte) after {config.train.steps} steps; 'div' = diverged "
           f"(non-finite or above its initial loss); 'u' = stuck at the unigram solution (within "
           f"{UNIGRAM_MARGIN} of the byte-unigram cross-entropy {unigram:.3f}); '-' = not run."]
    main = [r for r in records if r["section"] in ("residual", "lr", "truncation", "no_norm")
            and r["attn_scale"] == "sqrt" and r["parameterization"] == "standard" and r["truncation_correction"]
            and r["final_norm"] == TransformerConfig(residual=r["residual"]).has_final_norm]
    if "residual" in s.sections:
        cols = [(d, w) for d in s.depths for w in s.warmups]
        out += ["", f"### Residual x depth x lr-warmup at lr {lr0:g} (chosen for Pre-LN)", "",
                "| residual | " + " | ".join(f"L{d} w{w}" for d, w in cols) + " |",
                "|---" * (len(cols) + 1) + "|"]
        for res in s.residuals:
            out.append(f"| {res} | " + " | ".join(
                _fmt(best_of(main, residual=res, depth=d, warmup=w, lr=lr0)) for d, w in cols) + " |")
    if "lr" in s.sections:
        cols = [(d, w) for d in s.sweep_depths for w in s.sweep_warmups]
        out += ["", f"### Best of lr {tuple(s.lrs)} (the winning lr in brackets)", "",
                "| residual | " + " | ".join(f"L{d} w{w}" for d, w in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for res in s.residuals:
            cells = []
            for d, w in cols:
                b = best_of([r for r in main if r["lr"] in tuple(s.lrs)], residual=res, depth=d, warmup=w)
                cells.append("-" if b is None else f"{_fmt(b)} ({b['lr']:g})")
            out.append(f"| {res} | " + " | ".join(cells) + " |")
    att = [r for r in records if r["section"] == "attention"]
    if att:
        out += ["", f"### Attention scale x head size (depth {s.attn_depth}, residual {s.attn_residual}, "
                    f"{s.attn_num_heads} head(s), d_model {att[0]['d_model']}): final loss "
                    f"[attention entropy at init / uniform]", "",
                "| attn_scale | " + " | ".join(f"head {d}" for d in s.head_dims) + " |",
                "|---" * (len(s.head_dims) + 1) + "|"]
        for scale in s.attn_scales:
            row = []
            for d in s.head_dims:
                r = best_of(att, attn_scale=scale, head_dim=d)
                row.append("-" if r is None else
                           f"{_fmt(r)} [{r['entropy_init']:.2f} / {r['entropy_uniform']:.2f}]")
            out.append(f"| {scale} | " + " | ".join(row) + " |")
    par = [r for r in records if r["section"] == "param"]
    if par:
        out += ["", f"### Parameterization x Adam lr (depth {s.param_depth}, pre)", "",
                "| parameterization | " + " | ".join(f"lr {lr:g}" for lr in s.param_lrs) + " |",
                "|---" * (len(s.param_lrs) + 1) + "|"]
        for p in s.parameterizations:
            out.append(f"| {p} | " + " | ".join(_fmt(best_of(par, parameterization=p, lr=float(lr)))
                                                for lr in s.param_lrs) + " |")
    if "truncation" in s.sections:
        out += ["", f"### Truncated-normal init at depth {s.truncation_depth} (lr {lr0:g}, no warmup)", "",
                "| residual | corrected (x1.1368) | uncorrected |", "|---|---|---|"]
        for res in s.truncation_residuals:
            rs = [r for r in records if r["residual"] == res and r["depth"] == s.truncation_depth
                  and r["warmup"] == 0 and r["lr"] == lr0 and r["final_norm"] ==
                  TransformerConfig(residual=res).has_final_norm and r["attn_scale"] == "sqrt"
                  and r["parameterization"] == "standard"]
            out.append(f"| {res} | {_fmt(best_of(rs, truncation_correction=True))} | "
                       f"{_fmt(best_of(rs, truncation_correction=False))} |")
    nn_ = [r for r in records if r["section"] == "no_norm"]
    if nn_:
        ref = best_of([r for r in main if r["depth"] == s.no_norm_depth])  # any arm with a norm layer
        out += ["", f"### No normalization layer at all, depth {s.no_norm_depth} (lr {lr0:g}, no warmup)", "",
                "| arm | final loss | gap to the best normalized arm |", "|---|---|---|"]
        for r in nn_:
            gap = ("-" if ref is None or r["diverged"] or ref["diverged"]
                   else f"{r['final_val_loss'] - ref['final_val_loss']:+.3f} (vs {ref['name']})")
            out.append(f"| {r['residual']} (no norm) | {_fmt(r)} | {gap} |")
    return "\n".join(out) + "\n"


def plot(records: list[dict], config, path: str) -> bool:
    """Validation-loss curves: one panel per depth of the residual section (lr-warmup 0 solid, the
    longest dashed), one for the attention cells and one for the no-norm arms. False without matplotlib."""
    s, lr0 = config.study, float(config.study.lr)
    panels = [(f"depth {d}, lr {lr0:g}", [r for r in records if r["section"] in ("residual", "truncation",
                                                                                 "no_norm")
                                        and r["depth"] == d and r["lr"] == lr0 and r["truncation_correction"]])
              for d in s.depths]
    panels.append(("attention scale x head size", [r for r in records if r["section"] == "attention"]))
    panels.append(("parameterization x lr", [r for r in records if r["section"] == "param"]))
    panels = [(t, rs) for t, rs in panels if rs]
    fig = reporting.figure(figsize=(5.5 * len(panels), 4.5), dpi=90) if panels else None
    if fig is None:
        return False
    colors = dict(zip(RESIDUALS, ("C3", "C0", "C2", "C1", "C4", "C5")))
    for i, (title, rs) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for j, r in enumerate(rs):
            xs = sorted(int(k) for k in r["val_loss"])
            ys = [r["val_loss"][str(x)] for x in xs]
            if r["section"] in ("attention", "param"):
                label = (f"{r['attn_scale']} hd{r['head_dim']}" if r["section"] == "attention"
                         else f"{r['parameterization']} lr {r['lr']:g}")
                ax.plot(xs, ys, color=f"C{j % 10}", label=label)
            else:
                label = f"{r['residual']} w{r['warmup']}" + ("" if r["final_norm"] or r["residual"] not in
                                                             NO_NORM_RESIDUALS else " no-norm")
                ax.plot(xs, ys, color=colors.get(r["residual"], "k"),
                        linestyle="-" if r["warmup"] == 0 else "--", linewidth=2.5 if "no-norm" in label else 1.2,
                        label=label)
        finite = [v for r in rs for v in r["val_loss"].values() if math.isfinite(v)]
        if finite:  # from the best loss up to 3 nats above it (the initial ~6 nats would flatten the rest)
            ax.set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 3.0) + 0.05)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def run(config, workdir: str) -> dict:
    """Run every cell of ``config.study`` not already in ``workdir/cells``; write the reports.
    ``study.report_only``: run nothing, write the reports of the finished cells (e.g. while a run goes on)."""
    base = validate(config)
    cells = grid(config, base)
    corpus = training.load_corpus(config.data)
    host_val = training.eval_host_batches(corpus, config.data, config.train.eval_batches, int(config.seed))
    val_batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in host_val]
    # the validation bytes' cross-entropy under the training bytes' add-one smoothed frequencies: the loss of a
    # model that ignores its context, where a collapsed run gets stuck
    unigram = reporting.unigram_loss(corpus.train, np.concatenate([b["targets"].ravel() for b in host_val]),
                                     add_one=True)
    cell_dir = os.path.join(workdir, "cells")
    os.makedirs(cell_dir, exist_ok=True)
    print(f"init study: {len(cells)} cells, {config.train.steps} steps each, batch {config.data.batch_size} x "
          f"{config.data.seq_len} bytes; workdir {workdir}", flush=True)
    records = []
    t0 = time.time()
    for i, cell in enumerate(cells):
        path = cell_path(cell_dir, cell, config)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                records.append(json.load(f))
            continue
        if config.study.report_only:
            continue
        run_dir = os.path.splitext(path)[0]  # the cell's checkpoints and metrics while it trains
        rec = run_cell(cell, config, corpus, val_batches, run_dir)
        reporting.write_json_atomic(path, rec, indent=None)
        shutil.rmtree(run_dir, ignore_errors=True)  # the record is what a rerun reuses
        records.append(rec)
        write_reports(records, config, workdir, with_plot=False, unigram=unigram)  # a cut-short run keeps them
        print(f"[{i + 1}/{len(cells)} {time.time() - t0:.0f}s] {cell.name}: final val {rec['final_val_loss']:.4f}"
              f"{' DIVERGED' if rec['diverged'] else ''} ({rec['seconds']}s)", flush=True)
    report = write_reports(records, config, workdir, with_plot=True, unigram=unigram)
    print(report["table"], flush=True)
    return report


def write_reports(records: list[dict], config, workdir: str, *, with_plot: bool,
                  unigram: float | None = None) -> dict:
    """Write report.json (one record per run), table.md and (``with_plot``) loss_curves.png. With
    ``unigram`` (``reporting.unigram_loss``), each record gets ``unigram_val_loss`` and ``at_unigram``."""
    if unigram is not None:
        for r in records:
            r["unigram_val_loss"] = unigram
            r["at_unigram"] = bool(not r["diverged"] and r["final_val_loss"] > unigram - UNIGRAM_MARGIN)
    table = tables(records, config)
    report = {"post": "kexue.fm/archives/8620", "config": config_lib.to_dict(config), "runs": records,
              "table": table}
    reporting.write_json_atomic(os.path.join(workdir, "report.json"), report, indent=1)
    with open(os.path.join(workdir, "table.md"), "w", encoding="utf-8") as f:
        f.write(table)
    if with_plot and plot(records, config, os.path.join(workdir, "loss_curves.png")):
        print(f"wrote {os.path.join(workdir, 'loss_curves.png')}", flush=True)
    return report
