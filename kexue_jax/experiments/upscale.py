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

With ``upscale.seeds=(0, 1, 2)`` each seed runs in ``workdir/seed_N`` and the report gives mean +/- std.
Outputs in the workdir: a table on stdout, ``report.json`` and ``compute.png`` (loss against FLOPs, and the
saving curve); each phase has its own sub-directory with metrics and checkpoints, so a killed job resumes
where it stopped.
"""
from __future__ import annotations

import copy
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kexue_jax import flops as flops_lib
from kexue_jax import metrics as metrics_lib
from kexue_jax import parallel, training, upscale
from kexue_jax.nn import Transformer

GROW_MODES = upscale.GROW_MODES
SCHEDULES = ("continue", "restart", "rewind")
ARMS = ("upscaled", "scratch")
SCALAR_KEYS = ("compute_saving", "compute_saving_given_small", "loss_gap_at_equal_flops", "final_loss_upscaled",
               "final_loss_scratch", "loss_before_widen", "loss_after_widen", "flops_to_target_upscaled",
               "flops_to_target_scratch", "target_loss", "max_abs_logit_diff")


def validate(config):
    """Everything about the run, checked before any data is read or anything compiles.
    Returns (small TransformerConfig, mesh)."""
    small, mesh = training.prepare(config)
    u = config.upscale
    upscale.widen_config(small, u.factor, grow=u.grow)  # factor/grow errors
    if not isinstance(u.widen_at, int) or not 0 < u.widen_at < config.train.steps:
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
    if not isinstance(u.lr_multiplier, (int, float)) or not u.lr_multiplier > 0:
        raise ValueError(f"config.upscale.lr_multiplier must be a number > 0, got {u.lr_multiplier!r}")
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
    return small, mesh


# ------------------------------------------------------------------------------------------------
# Reading curves.

def _points(history: list[dict]) -> list[tuple[float, float]]:
    return [(h["flops"], h["val_loss"]) for h in history if "val_loss" in h]


def flops_to_reach(history: list[dict], target: float) -> float | None:
    """First training-FLOPs value where the validation loss reaches ``target`` (linear interpolation
    between evaluations); None if it never does."""
    pts = _points(history)
    if pts and pts[0][1] <= target:
        return pts[0][0]
    for (f0, l0), (f1, l1) in zip(pts, pts[1:]):
        if l1 <= target:
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    return None


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


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats/token) of the token frequencies: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(tokens).ravel().astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


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


def big_phase_schedule(optim, u, steps: int):
    """Arm A's learning rate after widening (a function of the global step), times ``u.lr_multiplier``
    where ``u.lr_tensors == "all"`` (per-tensor multipliers are applied by ``make_optimizer(lr_scales=)``):
      continue  B's schedule at the same step (warmup done, decaying over train.steps);
      restart   a fresh warmup and decay over the big phase's planned length ``big_steps``;
      rewind    B's own schedule from its step 0 (warmup and the full decay), shifted to ``widen_at`` (MSG).
    After the schedule's horizon the rate stays at its final value."""
    s_at = u.widen_at
    if u.schedule == "continue":
        base = training.make_schedule(optim, steps)
    elif u.schedule == "restart":
        base = training.make_schedule(optim, u.big_steps or steps - s_at, start=s_at)
    else:
        base = training.make_schedule(optim, steps, start=s_at)
    m = float(u.lr_multiplier) if u.lr_tensors == "all" else 1.0
    return base if m == 1.0 else (lambda count: m * base(count))


# ------------------------------------------------------------------------------------------------
# One seed.

def _baseline_history(u, seed: int, multi: bool) -> list[dict]:
    path = os.path.join(u.baseline, f"seed_{seed}" if multi else "", "b_scratch")
    recs = metrics_lib.read_metrics(path) if os.path.isdir(path) else []
    hist = [{k: r[k] for k in ("step", "val_loss", "flops")} for r in recs if "val_loss" in r]
    if not hist:
        raise ValueError(f"config.upscale.baseline: no finished arm B in {path}")
    return sorted({h["step"]: h for h in hist}.values(), key=lambda h: h["step"])


def run_seed(config, workdir: str, corpus, mesh, small_cfg, *, multi_seed: bool = False) -> dict:
    """Both arms for ``config.seed``; returns this seed's report (without plotting or printing a table)."""
    u = config.upscale
    big_cfg = upscale.widen_config(small_cfg, u.factor, grow=u.grow)
    steps, s_at, seq_len = config.train.steps, u.widen_at, config.data.seq_len
    say = training.say
    os.makedirs(workdir, exist_ok=True)
    report: dict = {"seed": int(config.seed)}
    arms: dict[str, list[dict]] = {}

    def from_scratch(model_cfg, end: int, sub: str, name: str) -> training.PhaseResult:
        tx, model = training.make_optimizer(config.optim, steps), Transformer(model_cfg)
        return training.run_phase(training.Phase(
            model_cfg=model_cfg, tx=tx, start=0, end=end, workdir=os.path.join(workdir, sub),
            init=lambda key: training.init_state(model, tx, key, seq_len), name=name,
            schedule=training.make_schedule(config.optim, steps)), config, corpus, mesh)

    # -- arm B first: its final loss is arm A's target ------------------------------------------
    scratch = None
    if u.baseline is not None:
        scratch = _baseline_history(u, int(config.seed), multi_seed)
        say(f"arm B from {u.baseline}: final val loss {scratch[-1]['val_loss']:.4f} at step {scratch[-1]['step']}")
    elif "scratch" in u.arms:
        scratch = from_scratch(grown_config(small_cfg, u), steps, "b_scratch", "B scratch").history
    if scratch is not None:
        report["final_loss_scratch"] = scratch[-1]["val_loss"]
        report["flops_scratch_total"] = scratch[-1]["flops"]
        arms["scratch (B)"] = scratch

    if "upscaled" in u.arms:
        # -- arm A, phase 1: the small model --------------------------------------------------
        small = from_scratch(small_cfg, s_at, "a_small", "A small")
        small_flops = s_at * small.flops_per_step
        # -- widen (and deepen) inside the mesh -------------------------------------------------
        schedule = big_phase_schedule(config.optim, u, steps)
        probe = jax.eval_shape(lambda p: upscale.widen_params(p, small_cfg, u.factor, grow=u.grow), small.state.params)
        insert = upscale.depth_insertions(small_cfg.num_layers, u.depth_factor)
        if insert:
            probe = jax.eval_shape(lambda p: upscale.deepen(p, big_cfg, insert)[0], probe)
        lr_scales = (None if u.lr_tensors == "all" or u.lr_multiplier == 1.0
                     else upscale.lr_multipliers(probe, float(u.lr_multiplier), tensors=u.lr_tensors))
        tx_big = training.make_optimizer(config.optim, steps, lr_scales=lr_scales, schedule=schedule,
                                         update_scales=(upscale.update_scales(small.state.params, small_cfg, u.factor,
                                                                              grow=u.grow)
                                                        if u.scale_updates and not insert else None))
        key = jax.random.PRNGKey(int(config.seed) + 1)
        big_state, grown_cfg = grow_state(small.state, small_cfg, u, tx_big, mesh, key)
        # the same 4 validation windows on every process (a jit argument must be equal across processes)
        val = np.asarray(corpus.val[:4 * seq_len], np.int32).reshape(4, seq_len)
        gap, scale = logit_gap(small.state.params, small_cfg, big_state.params, grown_cfg, val)
        tol = u.lossless_atol * max(scale, 1.0)
        if not gap <= tol:
            raise AssertionError(f"widening was not lossless: max |logit diff| {gap:.3e} > {tol:.3e}")
        report.update(max_abs_logit_diff=gap, logit_scale=scale)
        say(f"widened x{u.factor}{f', depth x{u.depth_factor}' if insert else ''}: max |logit diff| {gap:.2e} "
            f"(logit scale {scale:.1f}, tolerance {tol:.1e})")
        # -- arm A, phase 2: the big model, until it reaches B's final loss or the cap ----------------
        f_big = float(flops_lib.training_flops(grown_cfg, seq_len, config.data.batch_size))
        # without arm B (arms=('upscaled',)), A runs to the cap of B's FLOPs counted analytically
        fb_total = scratch[-1]["flops"] if scratch is not None else steps * f_big
        end = s_at + max(1, math.ceil((u.cap * fb_total - small_flops) / f_big))
        stop_when = None
        if scratch is not None:
            def stop_when(hist, fb_total=fb_total, target=scratch[-1]["val_loss"]):
                return hist[-1]["flops"] >= fb_total and hist[-1]["val_loss"] <= target
        copies = jax.jit(lambda p: upscale.copy_similarity(p, small_cfg, u.factor, grow=u.grow))
        big_a = training.run_phase(training.Phase(
            model_cfg=grown_cfg, tx=tx_big, start=s_at, end=end, workdir=os.path.join(workdir, "a_big"),
            state=big_state, flops_offset=small_flops, name="A widened", schedule=schedule,
            stop_when=stop_when, eval_extra=lambda p: {"eval_copy_cosine": copies(p)}), config, corpus, mesh)
        report["loss_before_widen"] = small.history[-1]["val_loss"]
        report["loss_after_widen"] = next((h["val_loss"] for h in big_a.history if h["step"] == s_at), None)
        report["final_loss_upscaled"] = big_a.history[-1]["val_loss"]
        report["flops_upscaled_total"] = big_a.history[-1]["flops"]
        report["big_steps_run"] = big_a.history[-1]["step"] - s_at
        report["cap_hit"] = bool(scratch is not None and big_a.history[-1]["step"] >= end
                                 and not stop_when(big_a.history))
        report["widen_flops"] = small_flops
        report["copy_cosine"] = [{"step": h["step"], "cosine": h["eval_copy_cosine"]}
                                 for h in big_a.history if "eval_copy_cosine" in h]
        report["big_model"] = grown_cfg.to_dict()
        arms["upscaled (A)"] = small.history + big_a.history[1:]

    if len(arms) == 2:
        warm = config.optim.warmup_steps * arms["scratch (B)"][-1]["flops"] / max(arms["scratch (B)"][-1]["step"], 1)
        report.update(compute_saving(arms["upscaled (A)"], arms["scratch (B)"], small_flops=report["widen_flops"],
                                     warmup_flops=warm))
    report["curves"] = {name: [{"step": h["step"], "flops": h["flops"], "val_loss": h["val_loss"]} for h in hist]
                        for name, hist in arms.items()}
    return report


# ------------------------------------------------------------------------------------------------
# The job.

def _mean_std(values: list) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    a = np.asarray(vals, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(vals),
            "missing": len(values) - len(vals)}


def aggregate(per_seed: list[dict]) -> dict:
    """Mean +/- std (sample std, ddof 1) of every scalar figure over seeds; the saving curve per target index."""
    out = {"seeds": [r["seed"] for r in per_seed], "per_seed": per_seed}
    for key in SCALAR_KEYS:
        out[key] = _mean_std([r.get(key) for r in per_seed])
    curves = [r.get("saving_curve") for r in per_seed if r.get("saving_curve")]
    if curves:
        out["saving_curve"] = [{"target": _mean_std([c[i]["target"] for c in curves]),
                                "saving": _mean_std([c[i]["saving"] for c in curves]),
                                "saving_given_small": _mean_std([c[i]["saving_given_small"] for c in curves])}
                               for i in range(min(len(c) for c in curves))]
    out["cap_hit"] = [r.get("cap_hit") for r in per_seed]
    return out


def run(config, workdir: str) -> dict:
    """Run both arms (for each seed) and write the report (see module docstring). Returns the report dict."""
    small_cfg, mesh = validate(config)
    u = config.upscale
    big_cfg = grown_config(small_cfg, u)
    corpus = training.load_corpus(config.data)
    unigram = unigram_entropy(corpus.val)
    seeds = list(u.seeds) or [int(config.seed)]
    say = training.say
    say(f"small: d_model {small_cfg.d_model}, heads {small_cfg.num_heads} x {small_cfg.head_dim}, d_ff "
        f"{small_cfg.d_ff}, {small_cfg.num_layers} layers; big (x{u.factor}, grow={u.grow}, depth x{u.depth_factor}): "
        f"d_model {big_cfg.d_model}, heads {big_cfg.num_heads} x {big_cfg.head_dim}, d_ff {big_cfg.d_ff}, "
        f"{big_cfg.num_layers} layers; widen at "
        f"step {u.widen_at}/{config.train.steps}; objective {config.data.objective}; unigram entropy of the "
        f"validation split {unigram:.3f} nats/token (a model that ignores context); seeds {seeds}")
    os.makedirs(workdir, exist_ok=True)
    per_seed = []
    for s in seeds:
        c = copy.deepcopy(config)
        with c.unlocked():
            c.seed = s
        sub = workdir if len(seeds) == 1 else os.path.join(workdir, f"seed_{s}")
        per_seed.append(run_seed(c, sub, corpus, mesh, small_cfg, multi_seed=len(seeds) > 1))
    settings = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in u.items()}
    settings.update(steps=config.train.steps, lr=config.optim.lr, objective=config.data.objective)
    report = {"settings": settings, "small_model": small_cfg.to_dict(), "unigram_entropy": unigram}
    report.update(per_seed[0] if len(seeds) == 1 else aggregate(per_seed))
    report["seeds"] = seeds
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        if config.train.plot:
            _plot(os.path.join(workdir, "compute.png"), per_seed, unigram)
        print(format_table(report), flush=True)
    return report


def _plot(path: str, per_seed: list[dict], unigram: float) -> bool:
    try:
        import matplotlib  # noqa: PLC0415 (optional)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib is not installed: skipping compute.png")
        return False
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"upscaled (A)": "C0", "scratch (B)": "C1"}
    later = []
    for i, rep in enumerate(per_seed):
        for name, hist in rep["curves"].items():
            pts = [(h["flops"], h["val_loss"]) for h in hist]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=2, color=colors.get(name),
                    alpha=1.0 if i == 0 else 0.35, label=name if i == 0 else None)
            later += [h["val_loss"] for h in hist if h["step"] > 0]
        if rep.get("widen_flops") is not None:
            ax.axvline(rep["widen_flops"], color="gray", ls=":", label="widen" if i == 0 else None)
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
    plt.close(fig)
    return True


def format_table(report: dict) -> str:
    """The end-of-run table (mean +/- std over seeds when several ran)."""
    def fmt(v, missing="not reached"):
        if v is None:
            return missing
        if isinstance(v, dict):
            tail = f" (n={v['n']}, {v['missing']} not reached)" if v.get("missing") else f" (n={v['n']})"
            return f"{fmt(v['mean'])} ± {v['std']:.2g}" + tail
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)
    cap = report.get("cap_hit")
    cap_any = any(cap) if isinstance(cap, list) else bool(cap)
    not_reached = "not reached (cap hit: see the loss gap)" if cap_any else "not reached"
    uni = report.get("unigram_entropy")
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
            ("loss gap A - B at B's final FLOPs", report.get("loss_gap_at_equal_flops")),
            ("arm A hit the FLOPs cap", cap)]
    width = max(len(r[0]) for r in rows)
    lines = ["", "lossless upscaling: results", "-" * (width + 30)]
    lines += [f"{name:<{width}}  {fmt(value, not_reached)}" for name, value in rows]
    curve = report.get("saving_curve")
    if curve:
        lines.append(f"{'saving curve (target: total / given small)':<{width}}  " + "; ".join(
            f"{fmt(c['target'])}: {fmt(c['saving'], '-')} / {fmt(c['saving_given_small'], '-')}"
            if not isinstance(c["target"], dict) else
            f"{c['target']['mean']:.3f}: {fmt(c['saving'], '-')} / {fmt(c['saving_given_small'], '-')}"
            for c in curve))
    return "\n".join(lines)


__all__ = ["run", "run_seed", "validate", "compute_saving", "flops_to_reach", "loss_at_flops", "saving_targets",
           "unigram_entropy", "aggregate", "format_table", "grow_state", "logit_gap", "big_phase_schedule",
           "GROW_MODES", "SCHEDULES"]
