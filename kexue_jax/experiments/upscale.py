"""The main job: train small, widen losslessly, keep training big; compare with training big from scratch.

``python train.py --config=configs/upscale.py`` (kexue.fm/archives/8444).

Arm A trains the small model for ``upscale.widen_at`` steps, widens it k-fold (params and Adam state,
``kexue_jax.upscale``), checks ``assert_lossless`` on a validation batch, and continues with the big
model to ``train.steps``. Arm B trains the big model from scratch for ``train.steps``. Both arms see the
same batch at every step (batches depend only on (seed, step)) and the same learning-rate schedule.

Compute is counted as training FLOPs (``kexue_jax.flops.training_flops``: 6 x multiplications). The
compute saving is

    compute_saving = FLOPs arm B needs to reach its final validation loss
                     / FLOPs arm A needs to reach that loss (small-model training included),

with the crossing found by linear interpolation between evaluations (None if arm A never reaches it).
Outputs in the workdir: a table on stdout, ``report.json`` and ``compute.png`` (validation loss against
training FLOPs for both arms); each phase has its own sub-directory with metrics and checkpoints, so a
killed job resumes where it stopped.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import optax

from kexue_jax import training, upscale
from kexue_jax.nn import Transformer

GROW_MODES = upscale.GROW_MODES


def validate(config):
    """Everything about the run, checked before any data is read or anything compiles.
    Returns (small TransformerConfig, mesh)."""
    small, mesh = training.prepare(config)
    u = config.upscale
    upscale.widen_config(small, u.factor, grow=u.grow)  # factor/grow errors
    if not isinstance(u.widen_at, int) or not 0 < u.widen_at < config.train.steps:
        raise ValueError(f"config.upscale.widen_at must be an integer in (0, train.steps={config.train.steps}), "
                         f"got {u.widen_at!r}")
    if u.noise < 0:
        raise ValueError(f"config.upscale.noise must be >= 0, got {u.noise!r}")
    if u.schedule not in ("continue", "restart"):
        raise ValueError(f"config.upscale.schedule must be one of ('continue', 'restart'), got {u.schedule!r}")
    if u.big_steps is not None and (not isinstance(u.big_steps, int) or u.big_steps < 1):
        raise ValueError(f"config.upscale.big_steps must be None (train.steps - widen_at) or a positive integer, "
                         f"got {u.big_steps!r}")
    for arm in u.arms:
        if arm not in ("upscaled", "scratch"):
            raise ValueError(f"config.upscale.arms must be a subset of ('upscaled', 'scratch'), got {tuple(u.arms)}")
    return small, mesh


def _reset_schedule_count(opt_state, step: int):
    """A fresh optimizer state whose learning-rate schedule continues at ``step``."""
    def visit(node):
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=jnp.asarray(step, node.count.dtype))
        return node
    return jax.tree_util.tree_map(visit, opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByScheduleState))


def flops_to_reach(history: list[dict], target: float) -> float | None:
    """First training-FLOPs value where the validation loss reaches ``target`` (linear interpolation
    between evaluations); None if it never does."""
    pts = [(h["flops"], h["val_loss"]) for h in history if "val_loss" in h]
    for (f0, l0), (f1, l1) in zip(pts, pts[1:]):
        if l1 <= target:
            if l0 <= target:
                return f0
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    if pts and pts[0][1] <= target:
        return pts[0][0]
    return None


def compute_saving(upscaled: list[dict], scratch: list[dict]) -> dict:
    """The report's compute figures from the two arms' (flops, val_loss) histories."""
    target = scratch[-1]["val_loss"]
    fb, fa = flops_to_reach(scratch, target), flops_to_reach(upscaled, target)
    return {"target_loss": target, "flops_to_target_scratch": fb, "flops_to_target_upscaled": fa,
            "compute_saving": (fb / fa) if fa else None}


def _plot(path: str, arms: dict[str, list[dict]], widen_flops: float | None) -> bool:
    try:
        import matplotlib  # noqa: PLC0415 (optional)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib is not installed: skipping compute.png")
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, hist in arms.items():
        pts = [(h["flops"], h["val_loss"]) for h in hist if "val_loss" in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    if widen_flops is not None:
        ax.axvline(widen_flops, color="gray", ls=":", label="widen")
    later = [h["val_loss"] for hist in arms.values() for h in hist if h.get("step", 0) > 0 and "val_loss" in h]
    if later:  # the loss at initialization (ln V) would flatten everything else
        lo, hi = min(later), max(later)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("lossless upscaling (kexue.fm/archives/8444)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(config, workdir: str) -> dict:
    """Run both arms and write the report (see module docstring). Returns the report dict."""
    small_cfg, mesh = validate(config)
    u = config.upscale
    big_cfg = upscale.widen_config(small_cfg, u.factor, grow=u.grow)
    corpus = training.load_corpus(config.data)
    steps, s_at = config.train.steps, u.widen_at
    say = training._say
    say(f"small: d_model {small_cfg.d_model}, heads {small_cfg.num_heads} x {small_cfg.head_dim}, "
        f"d_ff {small_cfg.d_ff}; big (x{u.factor}, grow={u.grow}): d_model {big_cfg.d_model}, heads "
        f"{big_cfg.num_heads} x {big_cfg.head_dim}, d_ff {big_cfg.d_ff}; widen at step {s_at}/{steps}")
    os.makedirs(workdir, exist_ok=True)
    seq_len = config.data.seq_len
    schedule = training.make_schedule(config.optim, steps)
    report: dict = {"factor": u.factor, "grow": u.grow, "noise": u.noise, "map_optimizer": u.map_optimizer,
                    "scale_updates": u.scale_updates, "schedule": u.schedule, "widen_at": s_at,
                    "steps": steps, "small_model": small_cfg.to_dict(), "big_model": big_cfg.to_dict()}
    arms: dict[str, list[dict]] = {}

    def from_scratch(model_cfg, end: int, sub: str, name: str) -> training.PhaseResult:
        tx, model = training.make_optimizer(config.optim, steps), Transformer(model_cfg)
        return training.run_phase(training.Phase(
            model_cfg=model_cfg, tx=tx, start=0, end=end, workdir=os.path.join(workdir, sub),
            init=lambda key: training.init_state(model, tx, key, seq_len), name=name, schedule=schedule),
            config, corpus, mesh)

    if "upscaled" in u.arms:
        # -- arm A, phase 1: the small model --------------------------------------------------
        small = from_scratch(small_cfg, s_at, "a_small", "A small")
        state = jax.device_get(small.state)
        # -- widen ------------------------------------------------------------------------------
        key = jax.random.PRNGKey(config.seed + 1)
        big_params, _ = upscale.widen(state.params, small_cfg, u.factor, grow=u.grow, noise=u.noise, key=key)
        scales = (upscale.update_scales(state.params, small_cfg, u.factor, grow=u.grow)
                  if u.scale_updates else None)
        big_steps = u.big_steps or steps - s_at
        restart = u.schedule == "restart"
        big_schedule = training.make_schedule(config.optim, big_steps if restart else steps,
                                              start=s_at if restart else 0)
        tx_big = training.make_optimizer(config.optim, big_steps if restart else steps, update_scales=scales,
                                         start=s_at if restart else 0)
        if u.map_optimizer:
            big_opt = upscale.widen_optimizer_state(state.opt_state, state.params, small_cfg, u.factor, grow=u.grow)
        else:
            big_opt = _reset_schedule_count(tx_big.init(big_params), s_at)
        val = training.eval_host_batches(corpus, config.data, 1, config.seed)[0]["inputs"][:4]
        lossless = upscale.assert_lossless(state.params, small_cfg, big_params, big_cfg, {"inputs": val},
                                           atol=u.lossless_atol, rtol=0.0)
        report["max_abs_logit_diff"] = lossless["logits"]
        report["logit_scale"] = float(jnp.max(jnp.abs(Transformer(small_cfg).apply({"params": state.params}, val))))
        report["lossless_check"] = lossless
        say(f"widened x{u.factor}: assert_lossless passed, max |logit diff| = {report['max_abs_logit_diff']:.2e} "
            f"(logit scale {report['logit_scale']:.1f})")
        big_state = training.TrainState(step=jnp.asarray(s_at, jnp.int32), params=big_params, opt_state=big_opt)
        # -- arm A, phase 2: the widened model ---------------------------------------------------
        small_flops = s_at * small.flops_per_step
        big_a = training.run_phase(training.Phase(
            model_cfg=big_cfg, tx=tx_big, start=s_at, end=s_at + big_steps, workdir=os.path.join(workdir, "a_big"),
            state=big_state, flops_offset=small_flops, name="A widened", schedule=big_schedule),
            config, corpus, mesh)
        report["loss_before_widen"] = small.history[-1]["val_loss"]
        report["loss_after_widen"] = next((h["val_loss"] for h in big_a.history if h["step"] == s_at), None)
        report["final_loss_upscaled"] = big_a.history[-1]["val_loss"]
        report["flops_upscaled_total"] = small_flops + big_steps * big_a.flops_per_step
        arms["upscaled (A)"] = small.history + big_a.history[1:]
        report["widen_flops"] = small_flops

    if "scratch" in u.arms:
        scratch = from_scratch(big_cfg, steps, "b_scratch", "B scratch")
        report["final_loss_scratch"] = scratch.history[-1]["val_loss"]
        report["flops_scratch_total"] = steps * scratch.flops_per_step
        arms["scratch (B)"] = scratch.history

    if len(arms) == 2:
        report.update(compute_saving(arms["upscaled (A)"], arms["scratch (B)"]))
    report["curves"] = {name: [{"step": h["step"], "flops": h["flops"], "val_loss": h["val_loss"]} for h in hist]
                        for name, hist in arms.items()}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        if config.train.plot:
            _plot(os.path.join(workdir, "compute.png"), arms, report.get("widen_flops"))
        print(format_table(report), flush=True)
    return report


def format_table(report: dict) -> str:
    """The end-of-run table."""
    def fmt(v):
        if v is None:
            return "not reached"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)
    rows = [("max |logit diff| after widening", report.get("max_abs_logit_diff")),
            ("val loss before widening (small)", report.get("loss_before_widen")),
            ("val loss after widening (big)", report.get("loss_after_widen")),
            ("final val loss, upscaled (A)", report.get("final_loss_upscaled")),
            ("final val loss, scratch (B)", report.get("final_loss_scratch")),
            ("FLOPs to B's final loss, A", report.get("flops_to_target_upscaled")),
            ("FLOPs to B's final loss, B", report.get("flops_to_target_scratch")),
            ("compute saving (B / A)", report.get("compute_saving"))]
    width = max(len(r[0]) for r in rows)
    lines = ["", "lossless upscaling: results", "-" * (width + 16)]
    lines += [f"{name:<{width}}  {fmt(value)}" for name, value in rows]
    return "\n".join(lines)


__all__ = ["run", "validate", "compute_saving", "flops_to_reach", "format_table", "GROW_MODES"]
