"""The main job: train small, widen losslessly, keep training big; compare with training big from scratch.

``python train.py --config=configs/upscale.py`` (kexue.fm/archives/8444).

Arm B trains the big model from scratch for ``train.steps``; its final validation loss is the *target*.
Arm A trains the small model for ``upscale.widen_at`` steps, widens it k-fold inside the device mesh
(params and Adam state, ``kexue_jax.upscale.widen_sharded``: no host gather, so a model sharded over
several hosts grows in place), optionally grows depth (``upscale.depth_factor``, ``upscale.deepen``),
breaks the symmetry of the copies exactly (``upscale.noise_db``, ``upscale.symmetry``), checks that the
logits are unchanged, and continues with the big model **until it reaches the target** and has spent at
least B's FLOPs, or until it has spent ``upscale.cap`` x B's FLOPs. Both arms see the same batch at every
step (batches depend only on (seed, step)), and A's big phase evaluates every ``train.eval_every`` steps,
i.e. on B's grid of FLOPs.

Compute is counted as training FLOPs (``kexue_jax.flops.training_flops``: 6 x multiplications), F(.) the
FLOPs an arm has spent when its validation curve (linearly interpolated) first reaches a loss:

    compute_saving             = F_B(target) / F_A(target)                  (small phase included)
    compute_saving_given_small = F_B(target) / (F_A(target) - F_small)      (the small model exists already,
                                                                             as HyperCloning / bert2BERT report)
    saving_curve               = both ratios at 6 targets spread along B's curve after its warmup
    loss_gap_at_equal_flops    = loss_A(F_B total) - loss_B(F_B total)      (negative: A is better)

Why a run saves what it saves (``growth_figures``; L_w = A's loss right after widening, H = F_B(L_w), F_small =
A's FLOPs at the widening):

    equivalent_step            = B's step at which B first reaches L_w (the small phase's worth in B's steps)
    head_start_flops           = H
    after_growth_efficiency    = (F_B(target) - H) / (F_A(target) - F_small)   (> 1: the widened model learns faster
                                                                             than a fresh one from the same loss)
    ceiling                    = F_B(target) / (F_small + F_B(target) - H)     (the saving if A only kept pace with B)
    forgetting                 = {rise: max L_A after widening - L_w, recovery_steps: steps until A is back at L_w}

Scenarios (``upscale.scenario``): "grow_during" (above: the small phase is the first ``widen_at`` steps of B's own
schedule) or "released": the small model first trains to the end of its own schedule (``upscale.small_lr``,
``upscale.small_steps``), as a released checkpoint would, is widened there, and the big phase runs its own schedule
(``upscale.schedule`` "restart" over ``big_steps`` or "rewind") at ``upscale.big_lr``, continuing the global step
count (so it sees the batches B sees at those steps); the cap counts its FLOPs alone. The small phase is cached
under ``<upscale.small_cache or workdir/small_cache>/<hash of its own config>`` (``small_phase_config``), so jobs
that differ only in big-phase fields reuse it; the report adds

    family_saving              = (F_small + F_B(target)) / F_A(target)       (both sizes wanted)

Protocols (``upscale.protocol``): "to_target" (above) or "wsd" (``optim.schedule="wsd"``): each arm trains at its
stable rate and is cooled down (``training.cooldown_schedule``) from that stable run at each budget of
``upscale.wsd_budgets``, so every point of the loss-vs-FLOPs curves ``cooled`` is a finished run; widening happens in
the stable phase, both arms share the decay, and the compute figures above are read on the cooled curves.

With ``upscale.seeds=(0, 1, 2)`` each seed runs in ``workdir/seed_N`` and the report gives mean +/- std.
Outputs in the workdir: a table on stdout, ``report.json`` and ``compute.png`` (loss against FLOPs, and the
saving curve); each phase has its own sub-directory with metrics and checkpoints, so a killed job resumes
where it stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kexue_jax import config as config_lib
from kexue_jax import flops as flops_lib
from kexue_jax import metrics as metrics_lib
from kexue_jax import parallel, reporting, training, upscale
from kexue_jax.nn import Transformer

GROW_MODES = upscale.GROW_MODES
SCHEDULES = ("continue", "restart", "rewind")
ARMS = ("upscaled", "scratch")
SCENARIOS = ("grow_during", "released")
RELEASED_SCHEDULES = ("restart", "rewind")
PROTOCOLS = ("to_target", "wsd")
DEFAULT_WSD_BUDGETS = (0.25, 0.5, 0.75, 1.0)
SCALAR_KEYS = ("compute_saving", "compute_saving_given_small", "loss_gap_at_equal_flops", "final_loss_upscaled",
               "final_loss_scratch", "loss_before_widen", "loss_after_widen", "flops_to_target_upscaled",
               "flops_to_target_scratch", "target_loss", "max_abs_logit_diff", "equivalent_step", "head_start_flops",
               "after_growth_efficiency", "ceiling", "family_saving")


def validate(config):
    """Everything about the run, checked before any data is read or anything compiles.
    Returns (small TransformerConfig, mesh)."""
    small, mesh = training.prepare(config)
    u = config.upscale
    upscale.widen_config(small, u.factor, grow=u.grow)  # factor/grow errors
    check_scenario(config)
    if u.scenario == "grow_during" and (not isinstance(u.widen_at, int) or not 0 < u.widen_at < config.train.steps):
        raise ValueError(f"config.upscale.widen_at must be an integer in (0, train.steps={config.train.steps}), "
                         f"got {u.widen_at!r}")
    if u.symmetry not in upscale.SYMMETRY_METHODS:
        raise ValueError(f"config.upscale.symmetry must be one of {upscale.SYMMETRY_METHODS}, got {u.symmetry!r}")
    if u.noise_db is not None:
        try:
            upscale.check_symmetry(small, u.noise_db, u.symmetry, jax.random.PRNGKey(0), upscale.WidenRules())
        except ValueError as e:
            raise ValueError(f"config.upscale.{e}") from None
    if u.schedule not in SCHEDULES:
        raise ValueError(f"config.upscale.schedule must be one of {SCHEDULES}, got {u.schedule!r}")
    if u.big_steps is not None and (not isinstance(u.big_steps, int) or u.big_steps < 1):
        raise ValueError(f"config.upscale.big_steps must be None (train.steps - widen_at) or a positive integer, "
                         f"got {u.big_steps!r}")
    if u.lr_multiplier is not None and (not isinstance(u.lr_multiplier, (int, float)) or not u.lr_multiplier > 0):
        raise ValueError(f"config.upscale.lr_multiplier must be None (2 under the standard and NTK "
                         f"parameterizations, 1 under muP) or a number > 0, got {u.lr_multiplier!r}")
    if u.lr_tensors not in upscale.LR_TENSORS:
        raise ValueError(f"config.upscale.lr_tensors must be one of {upscale.LR_TENSORS}, got {u.lr_tensors!r}")
    if not isinstance(u.cap, (int, float)) or not u.cap >= 1.0:
        raise ValueError(f"config.upscale.cap must be a number >= 1 (arm A's FLOPs limit in units of arm B's "
                         f"total), got {u.cap!r}")
    try:
        upscale.depth_insertions(small.num_layers, u.depth_factor)
    except ValueError as e:
        raise ValueError(f"config.upscale.{e}") from None
    if u.depth_factor > 1 and small.residual in ("post", "alpha_post"):
        raise ValueError(f"config.upscale.depth_factor={u.depth_factor} needs model.residual 'pre' or 'alpha' "
                         f"(identity layers do not exist under Post-Norm), got {small.residual!r}")
    if u.scale_updates and small.parameterization == "mup":
        raise ValueError("config.upscale.scale_updates must be False with model.parameterization='mup': the big "
                         "model's muP learning rates (lr / (k m) on the hidden matrices) already make its first "
                         "step the widened small step")
    if u.scale_updates and u.depth_factor > 1:
        raise ValueError("config.upscale.scale_updates=True is defined for width growth only; "
                         "use depth_factor=1 with it")
    if not u.arms or any(arm not in ARMS for arm in u.arms):
        raise ValueError(f"config.upscale.arms must be a non-empty subset of {ARMS}, got {tuple(u.arms)}")
    seeds = tuple(u.seeds)
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"config.upscale.seeds must be () (use config.seed) or distinct integers, got {seeds!r}")
    if u.baseline is not None and not os.path.isdir(u.baseline):
        raise ValueError(f"config.upscale.baseline must be None or the workdir of a finished job whose arm B "
                         f"to reuse, got {u.baseline!r} (not a directory)")
    check_protocol(config)
    return small, mesh


def _none_or_positive(u, field: str, kind, default: str) -> None:
    v = u[field]
    if v is not None and (isinstance(v, bool) or not isinstance(v, kind) or not v > 0):
        what = "a positive integer" if kind is int else "a number > 0"
        raise ValueError(f"config.upscale.{field} must be None ({default}) or {what}, got {v!r}")


def check_scenario(config) -> None:
    """``upscale.scenario`` and its fields: small_lr / small_steps / small_cache belong to "released" only;
    big_lr to both. Raises ValueError naming the field."""
    u = config.upscale
    if u.scenario not in SCENARIOS:
        raise ValueError(f"config.upscale.scenario must be one of {SCENARIOS}, got {u.scenario!r}")
    _none_or_positive(u, "big_lr", (int, float), "optim.lr x lr_multiplier")
    check_big_schedule(config)
    if u.scenario == "grow_during":
        for field in ("small_lr", "small_steps", "small_cache"):
            if u[field] is not None:
                raise ValueError(f"config.upscale.{field} is used with upscale.scenario='released' only (the small "
                                 f"phase of 'grow_during' is B's first widen_at steps); set it to None or the "
                                 f"scenario to 'released', got {u[field]!r}")
        return
    _none_or_positive(u, "small_lr", (int, float), "optim.lr")
    _none_or_positive(u, "small_steps", int, "train.steps")
    if u.small_cache is not None and (not isinstance(u.small_cache, str) or not u.small_cache):
        raise ValueError(f"config.upscale.small_cache must be None (workdir/small_cache) or a directory, "
                         f"got {u.small_cache!r}")
    if u.schedule not in RELEASED_SCHEDULES:
        raise ValueError(f"config.upscale.schedule must be one of {RELEASED_SCHEDULES} with upscale.scenario="
                         f"'released' (the big phase runs a schedule of its own), got {u.schedule!r}")
    if config.optim.warmup_steps > small_steps(config):
        raise ValueError(f"config.upscale.small_steps={small_steps(config)} must be >= optim.warmup_steps="
                         f"{config.optim.warmup_steps} (the released small model warms up within its own run)")


def check_big_schedule(config) -> None:
    """``upscale.big_warmup`` (None or an integer >= 0, at most the big phase's planned length) and
    ``upscale.big_schedule`` (None or one of config.SCHEDULES); they shape a schedule that starts afresh after
    widening, so "continue" refuses them. Raises ValueError naming the field."""
    u = config.upscale
    w, shape = u.big_warmup, u.big_schedule
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
        raise ValueError(f"config.upscale.big_warmup must be None (optim.warmup_steps) or an integer >= 0, got {w!r}")
    if shape is not None and shape not in config_lib.SCHEDULES:
        raise ValueError(f"config.upscale.big_schedule must be None (optim.schedule) or one of "
                         f"{config_lib.SCHEDULES}, got {shape!r}")
    if (w is not None or shape is not None) and u.schedule == "continue":
        raise ValueError("config.upscale.big_warmup / big_schedule shape a schedule that starts afresh after "
                         "widening; set upscale.schedule to 'restart' or 'rewind' (or leave both None), got "
                         "schedule 'continue'")
    if w is not None and u.schedule == "restart" and w > big_phase_steps(config):
        raise ValueError(f"config.upscale.big_warmup={w} must be <= the big phase's planned length "
                         f"upscale.big_steps={big_phase_steps(config)}")


def check_protocol(config) -> None:
    """``upscale.protocol`` and its fields; "wsd" needs optim.schedule "wsd", the "grow_during" scenario, arm B
    trained here, and widening before the first budget's decay. Raises ValueError naming the field."""
    u = config.upscale
    if u.protocol not in PROTOCOLS:
        raise ValueError(f"config.upscale.protocol must be one of {PROTOCOLS}, got {u.protocol!r}")
    if u.protocol == "to_target":
        if u.wsd_budgets is not None:
            raise ValueError(f"config.upscale.wsd_budgets is used with upscale.protocol='wsd' only; set it to None, "
                             f"got {u.wsd_budgets!r}")
        return
    if config.optim.schedule != "wsd":
        raise ValueError(f"config.optim.schedule must be 'wsd' with upscale.protocol='wsd', "
                         f"got {config.optim.schedule!r}")
    if u.scenario != "grow_during":
        raise ValueError(f"config.upscale.scenario must be 'grow_during' with upscale.protocol='wsd', "
                         f"got {u.scenario!r}")
    if u.baseline is not None:
        raise ValueError(f"config.upscale.baseline must be None with upscale.protocol='wsd' (arm B's cooled-down "
                         f"budgets are trained by the job), got {u.baseline!r}")
    budgets = wsd_budget_steps(u.wsd_budgets, config.train.steps)
    first, start = budgets[0], wsd_decay_starts(config.optim, budgets)[0]
    if start <= u.widen_at:
        raise ValueError(f"config.upscale.wsd_budgets: the first budget ({first} steps) cools down from step "
                         f"{start}, not after upscale.widen_at={u.widen_at}; widening must happen inside the stable "
                         f"phase (a larger budget, a smaller widen_at or optim.decay_fraction)")


def wsd_budget_steps(budgets, total: int) -> list[int]:
    """The WSD protocol's budgets in steps, increasing: a float f in (0, 1] is round(f x total), an integer n in
    [1, total] is n; None is :data:`DEFAULT_WSD_BUDGETS`. Raises ValueError naming upscale.wsd_budgets."""
    given = DEFAULT_WSD_BUDGETS if budgets is None else tuple(budgets)

    def steps(b):
        if isinstance(b, float) and 0.0 < b <= 1.0:
            return round(b * total)
        return b if isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= total else None

    out = [steps(b) for b in given]
    if not out or any(n is None or n < 1 for n in out) or len(set(out)) != len(out):
        raise ValueError(f"config.upscale.wsd_budgets must be None or distinct budgets, each a fraction of "
                         f"train.steps in (0, 1] (a float) or a step count in [1, train.steps={total}] (an "
                         f"integer), got {budgets!r}")
    return sorted(out)


def wsd_decay_starts(optim, budgets: list[int]) -> list[int]:
    """S_i = T_i - D_i: the step where the run of budget T_i leaves the stable phase (``training.wsd_decay_steps``)."""
    return [t - training.wsd_decay_steps(optim, t) for t in budgets]


# ------------------------------------------------------------------------------------------------
# The released scenario's small phase.

def small_steps(config) -> int:
    """The released small phase's length: ``upscale.small_steps``, None = train.steps."""
    n = config.upscale.small_steps
    return int(config.train.steps if n is None else n)


def small_lr(config) -> float:
    """The released small phase's peak rate: ``upscale.small_lr``, None = optim.lr."""
    lr = config.upscale.small_lr
    return float(config.optim.lr if lr is None else lr)


def widen_step(config) -> int:
    """The global step at which arm A widens: upscale.widen_at ("grow_during") or the released small phase's end."""
    return small_steps(config) if config.upscale.scenario == "released" else int(config.upscale.widen_at)


def small_phase_config(config) -> ml_collections.ConfigDict:
    """The released small phase's own config: the job's config without the big phase, i.e. with
    ``upscale`` = {small_lr, small_steps} (resolved) and ``optim.lr`` removed (small_lr replaces it). Its identity
    (``config_lib.identity``) keys the cache and its resume check names only what the small phase depends on:
    the small model, data, optimizer, training fields and seed."""
    d = config_lib.to_dict(config)
    d["optim"].pop("lr")
    d["upscale"] = {"small_lr": small_lr(config), "small_steps": small_steps(config)}
    d["train"]["steps"] = small_steps(config)
    return ml_collections.ConfigDict(d)


def small_phase_dir(config, workdir: str) -> str:
    """``<upscale.small_cache or workdir/small_cache>/<key>``, key = the first 16 hex digits of the SHA-256 of the
    small phase's identity (``small_phase_config``): jobs whose small phases agree share this directory."""
    ident = json.dumps(config_lib.identity(small_phase_config(config)), sort_keys=True)
    root = config.upscale.small_cache or os.path.join(workdir, "small_cache")
    return os.path.join(root, hashlib.sha256(ident.encode()).hexdigest()[:16])


def check_small_phase(config, workdir: str) -> None:
    """Refuse, before anything trains, a cached small phase stored under another config (a copied or renamed
    directory): ConfigError naming each differing field of the small phase."""
    path = small_phase_dir(config, workdir)
    stored = os.path.join(path, metrics_lib.CONFIG_FILE)
    if not os.path.exists(stored):
        return
    with open(stored, encoding="utf-8") as f:
        changes = config_lib.config_changes(json.load(f), small_phase_config(config))
    if changes:
        raise config_lib.ConfigError(
            f"config.upscale.small_cache: {path} holds a small phase of another config, not reused ("
            f"{'; '.join(changes)}); its name is the hash of the config it was trained with, so it was copied or "
            f"renamed: remove it, or run with those small-phase fields")


# ------------------------------------------------------------------------------------------------
# Reading curves.

def _points(history: list[dict], x: str = "flops") -> list[tuple[float, float]]:
    return [(h[x], h["val_loss"]) for h in history if "val_loss" in h]


def _first_reach(pts: list[tuple[float, float]], target: float) -> float | None:
    """The first x where the curve (x, loss), linear between points, is at or below ``target``; None if never."""
    if pts and pts[0][1] <= target:
        return pts[0][0]
    for (x0, l0), (x1, l1) in zip(pts, pts[1:]):
        if l1 <= target:
            return x0 + (x1 - x0) * (l0 - target) / (l0 - l1)
    return None


def flops_to_reach(history: list[dict], target: float) -> float | None:
    """First training-FLOPs value where the validation loss reaches ``target`` (linear interpolation
    between evaluations); None if it never does."""
    return _first_reach(_points(history), target)


def step_to_reach(history: list[dict], target: float) -> float | None:
    """First step where the validation loss reaches ``target`` (linear interpolation between evaluations)."""
    return _first_reach(_points(history, "step"), target)


def loss_at_flops(history: list[dict], flops: float) -> float | None:
    """Validation loss at ``flops`` (linear interpolation between evaluations); None outside the curve."""
    pts = _points(history)
    for (f0, l0), (f1, l1) in zip(pts, pts[1:]):
        if f0 <= flops <= f1:
            return l0 if f1 == f0 else l0 + (l1 - l0) * (flops - f0) / (f1 - f0)
    return pts[-1][1] if pts and pts[-1][0] == flops else None


def saving_targets(scratch: list[dict], warmup_flops: float, n: int = 6) -> list[float]:
    """``n`` target losses evenly spaced from B's loss at the end of its warmup to its final loss."""
    start = loss_at_flops(scratch, warmup_flops)
    start = scratch[0]["val_loss"] if start is None else start
    end = scratch[-1]["val_loss"]
    return [float(start + (end - start) * i / (n - 1)) for i in range(n)]


def compute_saving(upscaled: list[dict], scratch: list[dict], *, small_flops: float = 0.0,
                   warmup_flops: float = 0.0) -> dict:
    """The report's compute figures from the two arms' (flops, val_loss) histories (see module docstring).
    ``small_flops``: FLOPs of arm A's small phase; ``warmup_flops``: FLOPs of B's warmup."""
    target = scratch[-1]["val_loss"]
    fb_total = scratch[-1]["flops"]

    def ratios(t):
        fb, fa = flops_to_reach(scratch, t), flops_to_reach(upscaled, t)
        return {"target": t, "flops_scratch": fb, "flops_upscaled": fa,
                "saving": fb / fa if fa else None,
                "saving_given_small": fb / (fa - small_flops) if fa and fa > small_flops else None,
                "reached_in_small_phase": bool(fa is not None and fa <= small_flops)}

    main = ratios(target)
    gap = loss_at_flops(upscaled, fb_total)
    return {"target_loss": target, "flops_to_target_scratch": main["flops_scratch"],
            "flops_to_target_upscaled": main["flops_upscaled"], "compute_saving": main["saving"],
            "compute_saving_given_small": main["saving_given_small"],
            "loss_gap_at_equal_flops": None if gap is None else gap - target,
            "saving_curve": [ratios(t) for t in saving_targets(scratch, warmup_flops)]}


# ------------------------------------------------------------------------------------------------
# Why a run saves what it saves: figures of A's curve (small phase + big phase) against B's, with widening at
# ``widen_step``; L_w = A's loss right after widening, target = B's final loss.

def _from(history: list[dict], step: int) -> list[dict]:
    return [h for h in history if h["step"] >= step and "val_loss" in h]


def loss_at_widening(upscaled: list[dict], widen_step: int) -> float | None:
    """L_w: A's validation loss at ``widen_step`` (the last evaluation recorded there; the widening is lossless,
    so the small model's loss before it and the big model's after it agree)."""
    at = [h["val_loss"] for h in _from(upscaled, widen_step) if h["step"] == widen_step]
    return at[-1] if at else None


def flops_at_widening(upscaled: list[dict], widen_step: int) -> float | None:
    """F_small: A's FLOPs at ``widen_step`` (its small phase)."""
    at = [h["flops"] for h in _from(upscaled, widen_step) if h["step"] == widen_step]
    return at[-1] if at else None


def equivalent_step(upscaled: list[dict], scratch: list[dict], *, widen_step: int) -> float | None:
    """s_eq = the step at which B's curve (linear between evaluations) first reaches L_w: how many of B's steps
    the small phase is worth. None if B never gets as low."""
    lw = loss_at_widening(upscaled, widen_step)
    return None if lw is None else step_to_reach(scratch, lw)


def head_start_flops(upscaled: list[dict], scratch: list[dict], *, widen_step: int) -> float | None:
    """H = F_B(L_w): B's FLOPs when it first reaches A's loss right after widening (B's FLOPs at s_eq)."""
    lw = loss_at_widening(upscaled, widen_step)
    return None if lw is None else flops_to_reach(scratch, lw)


def after_growth_efficiency(upscaled: list[dict], scratch: list[dict], *, widen_step: int) -> float | None:
    """E = (F_B(target) - H) / (F_A(target) - F_small), F_A(target) read on A's curve from the widening on: B's
    FLOPs from L_w to the target over A's big-phase FLOPs for the same stretch. E > 1: the widened model learns
    faster than a fresh one from the same loss. None if a figure is missing or A is at the target when widened."""
    target = scratch[-1]["val_loss"]
    h, fw = head_start_flops(upscaled, scratch, widen_step=widen_step), flops_at_widening(upscaled, widen_step)
    fb, fa = flops_to_reach(scratch, target), flops_to_reach(_from(upscaled, widen_step), target)
    if None in (h, fw, fb, fa) or not fa > fw:
        return None
    return (fb - h) / (fa - fw)


def ceiling(upscaled: list[dict], scratch: list[dict], *, widen_step: int) -> float | None:
    """C = F_B(target) / (F_small + F_B(target) - H): the compute saving if A, once widened, only kept pace with B
    (E = 1): it skips B's first H FLOPs for the price of its small phase. None if H is missing."""
    target = scratch[-1]["val_loss"]
    h, fw = head_start_flops(upscaled, scratch, widen_step=widen_step), flops_at_widening(upscaled, widen_step)
    fb = flops_to_reach(scratch, target)
    if None in (h, fw, fb) or not fw + fb - h > 0:
        return None
    return fb / (fw + fb - h)


def forgetting(upscaled: list[dict], *, widen_step: int) -> dict:
    """How far A's loss rises after widening, and for how long:
        rise           = max_{t >= t_w} L_A(t) - L_w   (0 when it never rises above L_w)
        recovery_steps = t_back - t_w, t_back the first step after the highest point where A's curve (linear
                         between evaluations) is back at L_w; 0 without a rise, None if it never comes back."""
    lw = loss_at_widening(upscaled, widen_step)
    pts = _points(_from(upscaled, widen_step), "step")
    if lw is None:
        return {"rise": None, "recovery_steps": None}
    peak = max(range(len(pts)), key=lambda i: pts[i][1])
    rise = pts[peak][1] - lw
    if not rise > 0:
        return {"rise": 0.0, "recovery_steps": 0}
    back = _first_reach(pts[peak:], lw)
    return {"rise": float(rise), "recovery_steps": None if back is None else float(back - widen_step)}


def family_saving(upscaled: list[dict], scratch: list[dict], *, widen_step: int) -> float | None:
    """(F_small + F_B(target)) / F_A(target), F_A counted with the small phase: the saving when both sizes are
    wanted (the released case: the small model is trained either way)."""
    fw, fb = flops_at_widening(upscaled, widen_step), flops_to_reach(scratch, scratch[-1]["val_loss"])
    fa = flops_to_reach(_from(upscaled, widen_step), scratch[-1]["val_loss"])
    return None if None in (fw, fb, fa) or not fa > 0 else (fw + fb) / fa


def growth_figures(upscaled: list[dict], scratch: list[dict], *, widen_step: int) -> dict:
    """The report's explanation of its saving: equivalent_step, head_start_flops, after_growth_efficiency,
    ceiling and forgetting (each function's docstring has its formula)."""
    kw = dict(widen_step=widen_step)
    return {"equivalent_step": equivalent_step(upscaled, scratch, **kw),
            "head_start_flops": head_start_flops(upscaled, scratch, **kw),
            "after_growth_efficiency": after_growth_efficiency(upscaled, scratch, **kw),
            "ceiling": ceiling(upscaled, scratch, **kw), "forgetting": forgetting(upscaled, **kw)}


# ------------------------------------------------------------------------------------------------
# Widening inside the mesh.

def _reset_schedule_count(opt_state, step: int):
    """A fresh optimizer state whose learning-rate schedule continues at ``step``."""
    def visit(node):
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=jnp.asarray(step, node.count.dtype))
        return node
    return jax.tree_util.tree_map(visit, opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByScheduleState))


def grow_state(state: training.TrainState, small_cfg, u, tx_big, mesh, key):
    """The big model's TrainState from the small one, computed under jit with the big state's shardings
    as outputs (each device builds only its shard; nothing is gathered to a host). Returns (state, cfg)."""
    big_cfg = upscale.widen_config(small_cfg, u.factor, grow=u.grow)
    insert = upscale.depth_insertions(small_cfg.num_layers, u.depth_factor)

    def grow(st):
        params = upscale.widen_params(st.params, small_cfg, u.factor, grow=u.grow, noise_db=u.noise_db,
                                      symmetry=u.symmetry, key=key if u.noise_db is not None else None)
        if u.map_optimizer:
            opt = upscale.widen_optimizer_state(st.opt_state, st.params, small_cfg, u.factor, grow=u.grow)
            if insert:
                opt = upscale.deepen_optimizer_state(opt, params, big_cfg, insert)
        if insert:
            params, _ = upscale.deepen(params, big_cfg, insert)
        if not u.map_optimizer:
            opt = _reset_schedule_count(tx_big.init(params), st.step)
        return training.TrainState(step=st.step, params=params, opt_state=opt)

    shardings = parallel.state_shardings(jax.eval_shape(grow, state), mesh)
    return jax.jit(grow, out_shardings=shardings)(state), grown_config(small_cfg, u)


def grown_config(small_cfg, u):
    """The big model of both arms: ``small_cfg`` widened by ``u.factor`` and, with ``u.depth_factor`` > 1,
    deepened by it (each layer followed by its copies, as ``upscale.depth_insertions`` inserts them)."""
    cfg = upscale.widen_config(small_cfg, u.factor, grow=u.grow)
    f = int(u.depth_factor)
    if f == 1:
        return cfg
    return cfg.replace(num_layers=cfg.num_layers * f,
                       layer_masks=tuple(m for m in cfg.layer_masks for _ in range(f)) if cfg.layer_masks else ())


def logit_gap(small_params, small_cfg, big_params, big_cfg, tokens) -> tuple[float, float]:
    """(max |logits_big - logits_small|, max |logits_small|) on ``tokens``, computed under jit with scalar
    outputs, so it works on parameters sharded over several hosts. Float32 matmuls run at full precision
    here: GPUs default to TF32 (10-bit mantissa), whose ~1e-3 relative error would hide (or fake) a
    widening error (measured on an H200: 1e-3 x the logit scale)."""
    def gap(ps, pb, toks):
        ls = Transformer(small_cfg).apply({"params": ps}, toks).astype(jnp.float32)
        lb = Transformer(big_cfg).apply({"params": pb}, toks).astype(jnp.float32)
        return jnp.max(jnp.abs(lb - ls)), jnp.max(jnp.abs(ls))
    with jax.default_matmul_precision("highest"):
        g, scale = jax.jit(gap)(small_params, big_params, jnp.asarray(tokens))
    return float(g), float(scale)


def _optim_with(optim, **fields) -> ml_collections.ConfigDict:
    """A copy of the optimizer section ``optim`` with ``fields`` replaced."""
    out = copy.deepcopy(optim)
    for name, value in fields.items():
        out[name] = value
    return out


def big_phase_rate(config) -> tuple[ml_collections.ConfigDict, float]:
    """(the optimizer section of the big phase, the multiplier on top of its rate): the peak rate is
    upscale.big_lr (multiplier 1) when set, else optim.lr x ``lr_multiplier(config)``; the warmup is
    upscale.big_warmup (None = optim.warmup_steps; 0 = none) and the shape upscale.big_schedule (None =
    optim.schedule), both applied where the big phase's schedule starts afresh ("restart", "rewind")."""
    u = config.upscale
    fields = {k: v for k, v in (("warmup_steps", u.big_warmup), ("schedule", u.big_schedule),
                                ("lr", None if u.big_lr is None else float(u.big_lr))) if v is not None}
    return _optim_with(config.optim, **fields), (1.0 if u.big_lr is not None else lr_multiplier(config))


def lr_multiplier(config) -> float:
    """``upscale.lr_multiplier``; None means the rule of the model's parameterization: 2 under the standard and
    NTK parameterizations (the sweep's "twice the small model's rate", which diverges at d 128 -> 256), 1 under
    muP, whose per-tensor rates already follow the width (lr / (k m) on the big model's hidden matrices)."""
    m = config.upscale.lr_multiplier
    if m is not None:
        return float(m)
    return 1.0 if config_lib.model_config(config.model).parameterization == "mup" else 2.0


def big_phase_steps(config) -> int:
    """The planned length of the big phase for the "restart" schedule: upscale.big_steps, None = train.steps -
    widen_at ("grow_during") or train.steps ("released": as long as B)."""
    u, steps = config.upscale, config.train.steps
    if u.big_steps is not None:
        return int(u.big_steps)
    return steps if u.scenario == "released" else steps - int(u.widen_at)


def big_phase_schedule(config, *, stable: bool = False):
    """Arm A's learning rate after widening at s = ``widen_step(config)`` (a function of the global step) at the
    big phase's rate (``big_phase_rate``: the multiplier applies here where ``lr_tensors == "all"``; per-tensor
    multipliers are applied by ``make_optimizer(lr_scales=)``):
      continue  B's schedule at the same step (warmup done, decaying over train.steps);
      restart   a fresh warmup and decay over the big phase's planned length ``big_phase_steps``;
      rewind    B's own schedule from its step 0 (warmup and the full decay), shifted to s (MSG).
    After the schedule's horizon the rate stays at its final value. ``stable``: the WSD protocol's stable rate
    (optim.schedule "constant": the warmup and no decay; each budget's cooldown is applied to it)."""
    u, steps, s_at = config.upscale, config.train.steps, widen_step(config)
    optim, m = big_phase_rate(config)
    if stable:
        optim = _optim_with(optim, schedule="constant")
    if u.schedule == "continue":
        base = training.make_schedule(optim, steps)
    elif u.schedule == "restart":
        base = training.make_schedule(optim, big_phase_steps(config), start=s_at)
    else:
        base = training.make_schedule(optim, steps, start=s_at)
    m = m if u.lr_tensors == "all" else 1.0
    return base if m == 1.0 else (lambda count: m * base(count))


def big_phase_optimizer(config, small_params, small_cfg, schedule) -> optax.GradientTransformation:
    """Arm A's optimizer after widening, on ``schedule`` (``big_phase_schedule``, or a WSD cooldown of it): AdamW
    with the per-tensor multipliers of ``lr_tensors`` (not "all": ``upscale.lr_multipliers``), the big model's own
    per-tensor rates (``model_cfg``: muP) and, with ``scale_updates``, the update scales of the widened small
    step. ``small_params``: the small model's parameters (their shapes, and values for ``update_scales``)."""
    u = config.upscale
    big_cfg = upscale.widen_config(small_cfg, u.factor, grow=u.grow)
    probe = jax.eval_shape(lambda p: upscale.widen_params(p, small_cfg, u.factor, grow=u.grow), small_params)
    insert = upscale.depth_insertions(small_cfg.num_layers, u.depth_factor)
    if insert:
        probe = jax.eval_shape(lambda p: upscale.deepen(p, big_cfg, insert)[0], probe)
    _, m = big_phase_rate(config)
    lr_scales = (None if u.lr_tensors == "all" or m == 1.0
                 else upscale.lr_multipliers(probe, m, tensors=u.lr_tensors))
    update_scales = (upscale.update_scales(small_params, small_cfg, u.factor, grow=u.grow)
                     if u.scale_updates and not insert else None)
    return training.make_optimizer(config.optim, config.train.steps, lr_scales=lr_scales, schedule=schedule,
                                   model_cfg=grown_config(small_cfg, u), update_scales=update_scales)


def widen_checked(config, small: training.PhaseResult, small_cfg, tx_big, mesh, corpus):
    """Arm A's widening: ``grow_state`` on the small phase's final state, then the lossless check on 4 validation
    windows (AssertionError above ``lossless_atol`` x the logit scale). Returns (big state, big config,
    {"max_abs_logit_diff", "logit_scale"})."""
    u, seq_len = config.upscale, config.data.seq_len
    key = jax.random.PRNGKey(int(config.seed) + 1)
    big_state, grown_cfg = grow_state(small.state, small_cfg, u, tx_big, mesh, key)
    # the same 4 validation windows on every process (a jit argument must be equal across processes)
    val = np.asarray(corpus.val[:4 * seq_len], np.int32).reshape(4, seq_len)
    gap, scale = logit_gap(small.state.params, small_cfg, big_state.params, grown_cfg, val)
    tol = u.lossless_atol * max(scale, 1.0)
    if not gap <= tol:
        raise AssertionError(f"widening was not lossless: max |logit diff| {gap:.3e} > {tol:.3e}")
    training.say(f"widened x{u.factor}{f', depth x{u.depth_factor}' if u.depth_factor > 1 else ''}: max |logit "
                 f"diff| {gap:.2e} (logit scale {scale:.1f}, tolerance {tol:.1e})")
    return big_state, grown_cfg, {"max_abs_logit_diff": gap, "logit_scale": scale}


def big_phase(config, workdir: str, small: training.PhaseResult, small_cfg, big_state, grown_cfg, tx_big,
              schedule, *, end: int, sub: str, stop_when=None) -> training.Phase:
    """Arm A's big phase as a Phase: the widened state from ``widen_step(config)`` to ``end`` in workdir/``sub``,
    counted after the small phase's FLOPs, recording how similar the copies stay (``eval_copy_cosine``)."""
    u, s_at = config.upscale, widen_step(config)
    copies = jax.jit(lambda p: upscale.copy_similarity(p, small_cfg, u.factor, grow=u.grow))
    return training.Phase(
        model_cfg=grown_cfg, tx=tx_big, start=s_at, end=end, workdir=os.path.join(workdir, sub), state=big_state,
        flops_offset=s_at * small.flops_per_step, name="A widened", schedule=schedule, stop_when=stop_when,
        eval_extra=lambda p: {"eval_copy_cosine": copies(p)})


def big_phase_end(config, small_flops: float, fb_total: float, f_big: float) -> int:
    """The step where arm A's big phase stops at the latest: once A has spent ``cap`` x B's FLOPs, counted with
    the small phase ("grow_during") or without it ("released": the small model exists already)."""
    budget = config.upscale.cap * fb_total - (small_flops if config.upscale.scenario == "grow_during" else 0.0)
    return widen_step(config) + max(1, math.ceil(budget / f_big))


# ------------------------------------------------------------------------------------------------
# One seed.

def _baseline_history(u, seed: int, multi: bool) -> list[dict]:
    path = os.path.join(u.baseline, f"seed_{seed}" if multi else "", "b_scratch")
    recs = metrics_lib.read_metrics(path) if os.path.isdir(path) else []
    hist = [{k: r[k] for k in ("step", "val_loss", "flops")} for r in recs if "val_loss" in r]
    if not hist:
        raise ValueError(f"config.upscale.baseline: no finished arm B in {path}")
    return sorted({h["step"]: h for h in hist}.values(), key=lambda h: h["step"])


def scratch_phase(config, model_cfg, *, end: int, workdir: str, name: str, optim=None,
                  horizon: int | None = None) -> training.Phase:
    """Training ``model_cfg`` from its initialization, steps [0, end), with AdamW on ``optim`` (default
    config.optim) scheduled over ``horizon`` steps (default train.steps)."""
    optim = config.optim if optim is None else optim
    horizon = config.train.steps if horizon is None else horizon
    tx, model = training.make_optimizer(optim, horizon, model_cfg=model_cfg), Transformer(model_cfg)
    return training.Phase(model_cfg=model_cfg, tx=tx, start=0, end=end, workdir=workdir,
                          init=training.state_initializer(model, tx, config.data.seq_len), name=name,
                          schedule=training.make_schedule(optim, horizon))


def run_small_phase(config, workdir: str, corpus, mesh, small_cfg) -> training.PhaseResult:
    """Arm A's small phase. "grow_during": B's schedule for widen_at steps in workdir/a_small. "released": a run of
    its own, small_lr over small_steps, in ``small_phase_dir`` under ``small_phase_config`` (resumed, i.e. reused,
    when it is there)."""
    if config.upscale.scenario == "grow_during":
        phase = scratch_phase(config, small_cfg, end=int(config.upscale.widen_at),
                              workdir=os.path.join(workdir, "a_small"), name="A small")
        return training.run_phase(phase, config, corpus, mesh)
    n = small_steps(config)
    phase = scratch_phase(config, small_cfg, end=n, workdir=small_phase_dir(config, workdir), name="A small (released)",
                          optim=_optim_with(config.optim, lr=small_lr(config)), horizon=n)
    return training.run_phase(phase, small_phase_config(config), corpus, mesh)


def widen_report(small: training.PhaseResult, big_history: list[dict], s_at: int, grown_cfg) -> dict:
    """The report's fields of the widening itself: the loss before and after, the small phase's FLOPs, how far
    the copies drift apart, the big model."""
    return {"loss_before_widen": small.history[-1]["val_loss"],
            "loss_after_widen": next((h["val_loss"] for h in big_history if h["step"] == s_at), None),
            "widen_flops": s_at * small.flops_per_step,
            "copy_cosine": [{"step": h["step"], "cosine": h["eval_copy_cosine"]}
                            for h in big_history if "eval_copy_cosine" in h],
            "big_model": grown_cfg.to_dict()}


def _curves(arms: dict[str, list[dict]]) -> dict:
    return {name: [{"step": h["step"], "flops": h["flops"], "val_loss": h["val_loss"]} for h in hist]
            for name, hist in arms.items()}


def run_seed(config, workdir: str, corpus, mesh, small_cfg, *, multi_seed: bool = False) -> dict:
    """Both arms for ``config.seed``; returns this seed's report (without plotting or printing a table)."""
    if config.upscale.protocol == "wsd":
        return run_seed_wsd(config, workdir, corpus, mesh, small_cfg)
    u = config.upscale
    steps, s_at, seq_len = config.train.steps, widen_step(config), config.data.seq_len
    say = training.say
    os.makedirs(workdir, exist_ok=True)
    report: dict = {"seed": int(config.seed)}
    arms: dict[str, list[dict]] = {}

    # -- arm B first: its final loss is arm A's target ------------------------------------------
    scratch = None
    if u.baseline is not None:
        scratch = _baseline_history(u, int(config.seed), multi_seed)
        say(f"arm B from {u.baseline}: final val loss {scratch[-1]['val_loss']:.4f} at step {scratch[-1]['step']}")
    elif "scratch" in u.arms:
        phase = scratch_phase(config, grown_config(small_cfg, u), end=steps, workdir=os.path.join(workdir, "b_scratch"),
                              name="B scratch")
        scratch = training.run_phase(phase, config, corpus, mesh).history
    if scratch is not None:
        report["final_loss_scratch"] = scratch[-1]["val_loss"]
        report["flops_scratch_total"] = scratch[-1]["flops"]
        arms["scratch (B)"] = scratch

    if "upscaled" in u.arms:
        # -- arm A, phase 1: the small model --------------------------------------------------
        small = run_small_phase(config, workdir, corpus, mesh, small_cfg)
        small_flops = s_at * small.flops_per_step
        if u.scenario == "released":
            report["small_phase"] = {"dir": small_phase_dir(config, workdir), "steps": s_at, "lr": small_lr(config),
                                     "resumed_from": small.resumed_from}
        # -- widen (and deepen) inside the mesh -------------------------------------------------
        schedule = big_phase_schedule(config)
        tx_big = big_phase_optimizer(config, small.state.params, small_cfg, schedule)
        big_state, grown_cfg, checked = widen_checked(config, small, small_cfg, tx_big, mesh, corpus)
        report.update(checked)
        # -- arm A, phase 2: the big model, until it reaches B's final loss or the cap ----------------
        f_big = float(flops_lib.training_flops(grown_cfg, seq_len, config.data.batch_size))
        # without arm B (arms=('upscaled',)), A runs to the cap of B's FLOPs counted analytically
        fb_total = scratch[-1]["flops"] if scratch is not None else steps * f_big
        end = big_phase_end(config, small_flops, fb_total, f_big)
        stop_when = None
        if scratch is not None:
            def stop_when(hist, fb_total=fb_total, target=scratch[-1]["val_loss"]):
                return hist[-1]["flops"] >= fb_total and hist[-1]["val_loss"] <= target
        big_a = training.run_phase(big_phase(config, workdir, small, small_cfg, big_state, grown_cfg, tx_big, schedule,
                                             end=end, sub="a_big", stop_when=stop_when), config, corpus, mesh)
        report.update(widen_report(small, big_a.history, s_at, grown_cfg))
        report["final_loss_upscaled"] = big_a.history[-1]["val_loss"]
        report["flops_upscaled_total"] = big_a.history[-1]["flops"]
        report["big_steps_run"] = big_a.history[-1]["step"] - s_at
        report["cap_hit"] = bool(scratch is not None and big_a.history[-1]["step"] >= end
                                 and not stop_when(big_a.history))
        arms["upscaled (A)"] = small.history + big_a.history[1:]

    if len(arms) == 2:
        a, b = arms["upscaled (A)"], arms["scratch (B)"]
        warm = config.optim.warmup_steps * b[-1]["flops"] / max(b[-1]["step"], 1)
        report.update(compute_saving(a, b, small_flops=report["widen_flops"], warmup_flops=warm))
        report.update(growth_figures(a, b, widen_step=s_at))
        if u.scenario == "released":
            report["family_saving"] = family_saving(a, b, widen_step=s_at)
    report["curves"] = _curves(arms)
    return report


# ------------------------------------------------------------------------------------------------
# The WSD protocol: every point of the loss-vs-FLOPs curves is a cooled-down run.

def run_wsd_arm(stable: training.Phase, make_tx, budgets: list[int], config, corpus, mesh):
    """One arm of the WSD protocol. The stable run ``stable`` (its ``end`` ignored) is trained up to each budget's
    decay start S_i in turn, and from there a cooldown to the budget T_i runs in ``stable.workdir``_cooled_to_T_i
    on ``training.cooldown_schedule(stable.schedule, config.optim, S_i, T_i)`` (optimizer ``make_tx(schedule)``).
    Every phase resumes, so a killed job goes on where it stopped. Returns (the stable run's evaluations,
    [{"budget": T_i, "step", "flops", "val_loss"} at the end of each cooldown])."""
    cooled, result = [], None
    for start, end in zip(wsd_decay_starts(config.optim, budgets), budgets):
        result = training.run_phase(dataclasses.replace(stable, end=start), config, corpus, mesh)
        schedule = training.cooldown_schedule(stable.schedule, config.optim, start, end)
        cool = training.run_phase(dataclasses.replace(
            stable, tx=make_tx(schedule), schedule=schedule, start=start, end=end, init=None, state=result.state,
            workdir=f"{stable.workdir}_cooled_to_{end}", name=f"{stable.name} cooled to {end}",
            flops_offset=stable.flops_offset + (start - stable.start) * result.flops_per_step), config, corpus, mesh)
        last = cool.history[-1]
        cooled.append({"budget": end, "step": last["step"], "flops": last["flops"], "val_loss": last["val_loss"]})
    return result.history, cooled


def wsd_points(cooled_a: list[dict], cooled_b: list[dict]) -> list[dict]:
    """Both arms' cooled-down loss and FLOPs at each budget (the same step count)."""
    return [{"budget": a["budget"], "loss_upscaled": a["val_loss"], "loss_scratch": b["val_loss"],
             "flops_upscaled": a["flops"], "flops_scratch": b["flops"]} for a, b in zip(cooled_a, cooled_b)]


def run_seed_wsd(config, workdir: str, corpus, mesh, small_cfg) -> dict:
    """The WSD protocol for ``config.seed``. The compute figures (``compute_saving``) are read on the cooled
    curves, with B's cooldown at the largest budget as the target; ``growth_figures`` on the stable runs'
    curves, with B's last stable loss as the target."""
    u, steps, s_at = config.upscale, config.train.steps, int(config.upscale.widen_at)
    budgets = wsd_budget_steps(u.wsd_budgets, steps)
    os.makedirs(workdir, exist_ok=True)
    report: dict = {"seed": int(config.seed), "wsd_budgets": budgets,
                    "wsd_decay_starts": wsd_decay_starts(config.optim, budgets)}
    arms, cooled = {}, {}
    if "scratch" in u.arms:
        big_cfg = grown_config(small_cfg, u)
        phase = scratch_phase(config, big_cfg, end=steps, workdir=os.path.join(workdir, "b_stable"), name="B stable")
        arms["scratch (B)"], cooled["scratch (B)"] = run_wsd_arm(
            phase, lambda s: training.make_optimizer(config.optim, steps, schedule=s, model_cfg=big_cfg), budgets,
            config, corpus, mesh)
    if "upscaled" in u.arms:
        small = run_small_phase(config, workdir, corpus, mesh, small_cfg)
        schedule = big_phase_schedule(config, stable=True)
        tx_big = big_phase_optimizer(config, small.state.params, small_cfg, schedule)
        big_state, grown_cfg, checked = widen_checked(config, small, small_cfg, tx_big, mesh, corpus)
        report.update(checked)
        phase = big_phase(config, workdir, small, small_cfg, big_state, grown_cfg, tx_big, schedule, end=steps,
                          sub="a_big_stable")
        big_history, cooled["upscaled (A)"] = run_wsd_arm(
            phase, lambda s: big_phase_optimizer(config, small.state.params, small_cfg, s), budgets, config, corpus,
            mesh)
        report.update(widen_report(small, big_history, s_at, grown_cfg))
        arms["upscaled (A)"] = small.history + big_history[1:]
    for name, key in (("upscaled (A)", "upscaled"), ("scratch (B)", "scratch")):
        if name in cooled:
            report[f"final_loss_{key}"] = cooled[name][-1]["val_loss"]
            report[f"flops_{key}_total"] = cooled[name][-1]["flops"]
    if len(arms) == 2:
        a, b = cooled["upscaled (A)"], cooled["scratch (B)"]
        report.update(compute_saving(a, b, small_flops=report["widen_flops"]))
        report["wsd_points"] = wsd_points(a, b)
        report.update(growth_figures(arms["upscaled (A)"], arms["scratch (B)"], widen_step=s_at))
    report["curves"], report["cooled"] = _curves(arms), cooled
    return report


# ------------------------------------------------------------------------------------------------
# The job.

def aggregate(per_seed: list[dict]) -> dict:
    """``reporting.seed_stats`` (mean, sample std, n reached, per-seed values) of every scalar figure over seeds;
    the saving curve per target index, the WSD points per budget, forgetting per field."""
    out = {"seeds": [r["seed"] for r in per_seed], "per_seed": per_seed}
    for key in SCALAR_KEYS:
        if any(key in r for r in per_seed):  # a figure of the other scenario (family_saving) stays absent
            out[key] = _seed_stats([r.get(key) for r in per_seed])
    curves = [r["saving_curve"] for r in per_seed if r.get("saving_curve")]
    if curves:
        out["saving_curve"] = _seed_stats_rows(curves, ("target", "saving", "saving_given_small"))
    points = [r["wsd_points"] for r in per_seed if r.get("wsd_points")]
    if points:
        rows = _seed_stats_rows(points, ("loss_upscaled", "loss_scratch", "flops_upscaled", "flops_scratch"))
        out["wsd_points"] = [{"budget": p["budget"], **row} for p, row in zip(points[0], rows)]
    found = [r["forgetting"] for r in per_seed if r.get("forgetting")]
    if found:
        out["forgetting"] = {k: _seed_stats([f[k] for f in found]) for k in ("rise", "recovery_steps")}
    out["cap_hit"] = [r.get("cap_hit") for r in per_seed]
    return out


def _seed_stats(values: list) -> dict | None:
    """``reporting.seed_stats`` of a figure over seeds; None where no seed has it (e.g. an arm that did not run)."""
    stats = reporting.seed_stats(values)
    return stats if stats["n"] else None


def _seed_stats_rows(rows: list[list[dict]], fields: tuple) -> list[dict]:
    """Per row index (up to the shortest list), ``_seed_stats`` over seeds of each of ``fields``."""
    return [{f: _seed_stats([r[i][f] for r in rows]) for f in fields} for i in range(min(len(r) for r in rows))]


def run(config, workdir: str) -> dict:
    """Run both arms (for each seed) and write the report (see module docstring). Returns the report dict."""
    small_cfg, mesh = validate(config)
    u = config.upscale
    big_cfg = grown_config(small_cfg, u)
    corpus = training.load_corpus(config.data)
    unigram = reporting.unigram_loss(corpus.val)
    seeds = list(u.seeds) or [int(config.seed)]
    say = training.say
    say(f"small: d_model {small_cfg.d_model}, heads {small_cfg.num_heads} x {small_cfg.head_dim}, d_ff "
        f"{small_cfg.d_ff}, {small_cfg.num_layers} layers; big (x{u.factor}, grow={u.grow}, depth x{u.depth_factor}): "
        f"d_model {big_cfg.d_model}, heads {big_cfg.num_heads} x {big_cfg.head_dim}, d_ff {big_cfg.d_ff}, "
        f"{big_cfg.num_layers} layers; widen at step {widen_step(config)} ({u.scenario}; B: "
        f"{config.train.steps} steps; protocol {u.protocol}); objective {config.data.objective}; unigram entropy of "
        f"the validation split {unigram:.3f} nats/token (a model that ignores context); seeds {seeds}")
    jobs = []
    for s in seeds:
        c = copy.deepcopy(config)
        with c.unlocked():
            c.seed = s
        jobs.append((c, workdir if len(seeds) == 1 else os.path.join(workdir, f"seed_{s}")))
    if u.scenario == "released":
        for c, sub in jobs:
            check_small_phase(c, sub)
    os.makedirs(workdir, exist_ok=True)
    per_seed = [run_seed(c, sub, corpus, mesh, small_cfg, multi_seed=len(seeds) > 1) for c, sub in jobs]
    settings = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in u.items()}
    settings.update(steps=config.train.steps, lr=config.optim.lr, objective=config.data.objective)
    report = {"settings": settings, "small_model": small_cfg.to_dict(), "unigram_entropy": unigram}
    report.update(per_seed[0] if len(seeds) == 1 else aggregate(per_seed))
    report["seeds"] = seeds
    if jax.process_index() == 0:
        reporting.write_json_atomic(os.path.join(workdir, "report.json"), report, indent=2)
        if config.train.plot:
            _plot(os.path.join(workdir, "compute.png"), per_seed, unigram)
        print(format_table(report), flush=True)
    return report


def _plot(path: str, per_seed: list[dict], unigram: float) -> bool:
    fig = reporting.figure(figsize=(11, 4.2))
    if fig is None:
        return False
    ax, ax2 = fig.subplots(1, 2)
    colors = {"upscaled (A)": "C0", "scratch (B)": "C1"}
    later = []
    for i, rep in enumerate(per_seed):
        for name, hist in rep["curves"].items():
            pts = [(h["flops"], h["val_loss"]) for h in hist]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=2, color=colors.get(name),
                    alpha=1.0 if i == 0 else 0.35, label=name if i == 0 else None)
            later += [h["val_loss"] for h in hist if h["step"] > 0]
        for name, pts in (rep.get("cooled") or {}).items():
            ax.plot([p["flops"] for p in pts], [p["val_loss"] for p in pts], marker="*", ms=7, ls="--",
                    color=colors.get(name), alpha=1.0 if i == 0 else 0.35, label=f"{name} cooled" if i == 0 else None)
        if rep.get("widen_flops") is not None:
            ax.axvline(rep["widen_flops"], color="gray", ls=":", label="widen" if i == 0 else None)
        _plot_head_start(ax, rep, first=i == 0)
    if per_seed and _growth_text(per_seed[0]):
        ax.text(0.98, 0.62, _growth_text(per_seed[0]), transform=ax.transAxes, ha="right", va="top", fontsize=7,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "lightgray"})
    ax.axhline(unigram, color="k", ls="--", lw=0.8, label=f"unigram entropy {unigram:.2f}")
    if later:  # the loss at initialization (ln V) would flatten everything else
        lo, hi = min(later), max(max(later), unigram)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), min(hi, unigram + 0.3) + 0.05 * (hi - lo + 1e-9))
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("lossless upscaling (kexue.fm/archives/8444)")
    ax.legend(fontsize=8)
    for i, rep in enumerate(per_seed):
        curve = rep.get("saving_curve") or []
        for key, style in (("saving", "-o"), ("saving_given_small", "--s")):
            xs = [c["target"] for c in curve if c[key] is not None]
            ys = [c[key] for c in curve if c[key] is not None]
            ax2.plot(xs, ys, style, ms=3, color="C0" if key == "saving" else "C2", alpha=1.0 if i == 0 else 0.35,
                     label=(key.replace("_", " ") if i == 0 else None))
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.invert_xaxis()
    ax2.set_xlabel("target validation loss (B's curve, after warmup -> final)")
    ax2.set_ylabel("FLOPs_B / FLOPs_A to reach it")
    ax2.set_title("compute saving along the way")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _plot_head_start(ax, rep: dict, *, first: bool) -> None:
    """A dotted line at A's loss right after widening, from the widening to where B reaches that loss."""
    lw, h, fw = rep.get("loss_after_widen"), rep.get("head_start_flops"), rep.get("widen_flops")
    if None in (lw, h, fw):
        return
    ax.plot([fw, h], [lw, lw], color="C2", ls=":", lw=1.0, alpha=1.0 if first else 0.35)
    ax.plot([h], [lw], marker="x", color="C2", alpha=1.0 if first else 0.35,
            label="B reaches A's loss after widening" if first else None)


def _growth_text(rep: dict) -> str:
    """The growth figures of one seed, a line each, for the plot."""
    def num(v, spec):
        return "-" if v is None else format(v, spec)
    forget = rep.get("forgetting") or {}
    if rep.get("equivalent_step") is None and not forget:
        return ""
    back = forget.get("recovery_steps")
    return "\n".join([
        f"seed {rep.get('seed')}: B's step at A's loss after widening {num(rep.get('equivalent_step'), '.0f')}",
        f"head start {num(rep.get('head_start_flops'), '.3g')} FLOPs",
        f"after-growth efficiency {num(rep.get('after_growth_efficiency'), '.2f')}",
        f"ceiling {num(rep.get('ceiling'), '.2f')}",
        f"forgetting +{num(forget.get('rise'), '.3f')}, back after "
        f"{'never' if back is None else format(back, '.0f') + ' steps'}"])


def format_table(report: dict) -> str:
    """The end-of-run table (mean +/- std over seeds when several ran)."""
    def fmt(v, missing="not reached"):
        if v is None:
            return missing
        if isinstance(v, dict):  # reporting.seed_stats
            if v["mean"] is None:
                return missing
            lost = len(v["values"]) - v["n"]
            tail = f" (n={v['n']}, {lost} not reached)" if lost else f" (n={v['n']})"
            return fmt(v["mean"]) + ("" if v["std"] is None else f" ± {v['std']:.2g}") + tail
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)
    cap = report.get("cap_hit")
    cap_any = any(cap) if isinstance(cap, list) else bool(cap)
    not_reached = "not reached (cap hit: see the loss gap)" if cap_any else "not reached"
    uni = report.get("unigram_entropy")
    forget = report.get("forgetting") or {}
    settings = report.get("settings") or {}
    scenario = f" ({settings['scenario']}, {settings['protocol']})" if "scenario" in settings else ""
    rows = [("seeds", report.get("seeds")),
            ("unigram entropy (validation)", uni),
            ("max |logit diff| after widening", report.get("max_abs_logit_diff")),
            ("val loss before widening (small)", report.get("loss_before_widen")),
            ("val loss after widening (big)", report.get("loss_after_widen")),
            ("final val loss, scratch (B) = target", report.get("final_loss_scratch")),
            ("final val loss, upscaled (A)", report.get("final_loss_upscaled")),
            ("FLOPs to target, B", report.get("flops_to_target_scratch")),
            ("FLOPs to target, A (small phase included)", report.get("flops_to_target_upscaled")),
            ("compute saving (B / A)", report.get("compute_saving")),
            ("compute saving given the small model", report.get("compute_saving_given_small")),
            *([("family saving (small + B) / (small + A's big phase)", report.get("family_saving"))]
              if "family_saving" in report else []),
            ("loss gap A - B at B's final FLOPs", report.get("loss_gap_at_equal_flops"), "-"),
            ("B's step at A's loss right after widening", report.get("equivalent_step")),
            ("head start: B's FLOPs at that step", report.get("head_start_flops")),
            ("after-growth efficiency (B / A FLOPs to target)", report.get("after_growth_efficiency")),
            ("ceiling: saving if A only kept pace with B", report.get("ceiling")),
            ("forgetting: rise of A's loss after widening", forget.get("rise"), "-"),
            ("forgetting: steps until back at that loss", forget.get("recovery_steps"), "never came back"),
            *[(f"cooled down at {p['budget']} steps: loss A / B", p["loss_upscaled"], "-", p["loss_scratch"])
              for p in report.get("wsd_points") or []],
            ("arm A hit the FLOPs cap", cap)]
    width = max(len(r[0]) for r in rows)
    lines = ["", f"lossless upscaling: results{scenario}", "-" * (width + 30)]
    lines += [f"{r[0]:<{width}}  {fmt(r[1], r[2] if len(r) > 2 else not_reached)}"
              + (f" / {fmt(r[3], '-')}" if len(r) > 3 else "") for r in rows]
    curve = report.get("saving_curve")
    if curve:
        lines.append(f"{'saving curve (target: total / given small)':<{width}}  " + "; ".join(
            f"{fmt(c['target'])}: {fmt(c['saving'], '-')} / {fmt(c['saving_given_small'], '-')}"
            if not isinstance(c["target"], dict) else
            f"{c['target']['mean']:.3f}: {fmt(c['saving'], '-')} / {fmt(c['saving_given_small'], '-')}"
            for c in curve))
    return "\n".join(lines)


__all__ = ["run", "run_seed", "validate", "compute_saving", "flops_to_reach", "loss_at_flops", "saving_targets",
           "aggregate", "format_table", "grow_state", "logit_gap", "big_phase_schedule",
           "big_phase_optimizer", "growth_figures", "equivalent_step", "head_start_flops", "after_growth_efficiency",
           "ceiling", "forgetting", "family_saving", "step_to_reach", "small_phase_config", "small_phase_dir",
           "check_small_phase", "check_big_schedule", "run_wsd_arm", "wsd_budget_steps", "wsd_decay_starts",
           "GROW_MODES", "SCHEDULES", "SCENARIOS", "PROTOCOLS"]
