"""The sweep that chooses the main job's defaults (kexue.fm/archives/8444): what makes growth pay off.

    python benchmarks/upscale_sweep.py --workdir runs/sweep [--workers 2] [--scale default|reduced|tiny]
        [--deadline SECONDS] [--analyze-only]

Every run is an independent ``configs/upscale.py`` job in its own sub-directory (a killed sweep resumes run
by run; the runs execute in parallel, in the order below, so a deadline cuts the least important ones):
  1. arm B alone at three learning rates {1.5e-3, 3e-3, 6e-3} for the main big model at seeds 0, 1, 2;
  2. arm A alone (it runs to ``upscale.cap`` x B's FLOPs, counted analytically), one factor at a time around
     a centre (seed 0): noise strength {none, -40, -20, -10, 0 dB} x method {zero_sum, fan_out}, widen
     point {1/6, 1/3, 2/3 of B's steps}, schedule after widening {continue, restart, rewind}, the big phase's
     learning-rate multiplier {1, 2, 4} on all tensors or on the hidden matrices only, optimizer state
     {mapped, fresh};
  3. seeds 1 and 2 of the settings most likely to be best (``SEEDED``);
  4. factor 4, depth x2 (GPT preset, Pre-LN), the MLM objective: B at three rates and A's centre each;
  5. the size study: d 32->64 and 128->256 (64->128 is the main model), B at three rates and A's centre;
     and arm A with the main job's own defaults (``configs/upscale.py``, no centre overrides) at seeds 0, 1, 2
     (``A/size .../default/sN``), each against B at that size's best rate and the same seed (B's extra seeds
     are added to the plan once its best rate is known).
Then (``--analyze-only`` does only this) every A run is compared with the B run of its model and seed at
B's best learning rate (lowest final validation loss at seed 0: a saving against an untuned baseline is not
a saving), with the job's own ``compute_saving``; the tables go to ``sweep.md`` and the rows to
``sweep.json`` (with every run's curves).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root, for configs/

from kexue_jax.reporting import figure, seed_stats, write_json_atomic  # noqa: E402 (numpy only)

LRS = [1.5e-3, 3e-3, 6e-3]  # arm B's learning rates (``--lrs``)
A_LR = 3e-3  # arm A's small phase without a tuned B (with one: B's rate); its big phase is that x lr_multiplier
CENTRE = {"upscale.noise_db": -10.0, "upscale.symmetry": "zero_sum", "upscale.widen_frac": 1 / 6,
          "upscale.schedule": "continue", "upscale.lr_multiplier": 2.0, "upscale.lr_tensors": "all",
          "upscale.map_optimizer": True}
#: one factor at a time: (factor, label, overrides on top of the centre)
ABLATIONS = [
    ("noise", "none", {"upscale.noise_db": None}),
    ("noise", "-40 dB", {"upscale.noise_db": -40.0}),
    ("noise", "-20 dB", {"upscale.noise_db": -20.0}),
    ("noise", "0 dB", {"upscale.noise_db": 0.0}),
    ("noise", "fan_out -20 dB", {"upscale.symmetry": "fan_out", "upscale.noise_db": -20.0}),
    ("noise", "fan_out -10 dB", {"upscale.symmetry": "fan_out"}),
    ("noise", "fan_out 0 dB", {"upscale.symmetry": "fan_out", "upscale.noise_db": 0.0}),
    ("widen_at", "1/3", {"upscale.widen_frac": 1 / 3}),
    ("widen_at", "2/3", {"upscale.widen_frac": 2 / 3}),
    ("schedule", "restart", {"upscale.schedule": "restart"}),
    ("schedule", "rewind", {"upscale.schedule": "rewind"}),
    ("lr_multiplier", "1", {"upscale.lr_multiplier": 1.0}),
    ("lr_multiplier", "4", {"upscale.lr_multiplier": 4.0}),
    ("lr_multiplier", "hidden x2", {"upscale.lr_tensors": "hidden"}),
    ("lr_multiplier", "hidden x4", {"upscale.lr_tensors": "hidden", "upscale.lr_multiplier": 4.0}),
    ("optimizer", "fresh", {"upscale.map_optimizer": False}),
]
#: settings run at three seeds: the centre, and the two best of the one-factor runs at the reduced size
SEEDED = [("centre", {}), ("noise=fan_out -10 dB", {"upscale.symmetry": "fan_out"}),
          ("schedule=rewind", {"upscale.schedule": "rewind"})]
#: other big models: name -> (configs/upscale.py variant, overrides); arm B is tuned for each
OTHER_MODELS = {"k4": (None, {"upscale.factor": 4}), "depth2_gpt": ("gpt", {"upscale.depth_factor": 2}),
                "mlm": ("mlm", {})}
SIZES = {"32->64": dict(d_model=32, num_heads=2, head_dim=16, d_ff=128),
         "128->256": dict(d_model=128, num_heads=8, head_dim=16, d_ff=512)}
#: arm B's learning rates where a model needs another grid than ``LRS`` (d 64 was best at the top of LRS on the GPU;
#: the 8-layer Pre-LN GPT at d 64 was best at 1.2e-2, the top of its first grid, so it gets 2.4e-2 as well)
MODEL_LRS = {"size 32->64": [3e-3, 6e-3, 1.2e-2], "size 32->64 depth2_gpt": [3e-3, 6e-3, 1.2e-2, 2.4e-2]}
SIZE_SEEDS = (0, 1, 2)
#: the second sweep, one factor at a time around the job's own defaults (configs/upscale.py) at d 32 -> 64 and
#: the main job's length (1,500 steps), seed 0: the grid items the first sweep (``reduced``, 750 steps, around
#: the old "continue" centre) did not cover, and late widening with a schedule of its own. "restart R" gives the
#: big phase a fresh warmup + full decay over R x B's steps; arm A still runs to the target (or the cap), so a
#: schedule too short to reach it shows up as a late reach at the final rate, not as a missing row.
AROUND = [
    ("widen_at", "2/3 restart 1/3", {"upscale.widen_frac": 2 / 3, "upscale.schedule": "restart",
                                     "upscale.big_frac": 1 / 3}),
    ("widen_at", "2/3", {"upscale.widen_frac": 2 / 3}),
    ("noise", "-20 dB", {"upscale.noise_db": -20.0}),
    ("noise", "-40 dB", {"upscale.noise_db": -40.0}),
    ("noise", "fan_out -10 dB", {"upscale.symmetry": "fan_out"}),
    ("widen_at", "2/3 restart 1/2", {"upscale.widen_frac": 2 / 3, "upscale.schedule": "restart",
                                     "upscale.big_frac": 0.5}),
    ("widen_at", "1/3", {"upscale.widen_frac": 1 / 3}),
]
#: factor 4 at the main size: d 32 (4 heads x 8, d_ff 128) -> d 128 (4 x 32, d_ff 512) is exactly the main job's
#: big model, so arm A is compared with the main job's own arm B (``--main-baseline``)
K4_FROM_32 = {"upscale.factor": 4, "model.d_model": 32, "model.head_dim": 8, "model.d_ff": 128}

def lrs_for(model: str) -> list[float]:
    return MODEL_LRS.get(model, LRS)


# ------------------------------------------------------------------------------------------------
# One run (in a worker process).

def _config(spec: dict):
    from configs import upscale as upscale_config  # noqa: PLC0415 (worker-side import)
    c = upscale_config.get_config(spec["variant"])
    c.train.plot = False
    ov = dict(spec["overrides"])
    frac = ov.pop("upscale.widen_frac", None)
    big_frac = ov.pop("upscale.big_frac", None)
    for key, value in ov.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = tuple(value) if isinstance(value, list) else value
    if frac is not None:
        c.upscale.widen_at = max(1, int(round(frac * c.train.steps)))
    if big_frac is not None:
        c.upscale.big_steps = max(1, int(round(big_frac * c.train.steps)))
    return c


def run_one(spec: dict) -> dict:
    """Run one job (``spec``: name, variant, overrides, workdir) and return its row (with its curves)."""
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415

    from kexue_jax.experiments import upscale as experiment  # noqa: PLC0415
    t0 = time.time()
    log = io.StringIO()
    try:
        c = _config(spec)
        with contextlib.redirect_stdout(log):
            rep = experiment.run(c, spec["workdir"])
    except Exception as e:  # noqa: BLE001 (a failed run is a row, not the end of the sweep)
        with open(os.path.join(spec["workdir"], "error.txt"), "w") as f:
            f.write(log.getvalue()[-4000:] + f"\n{type(e).__name__}: {e}")
        return {**spec, "error": f"{type(e).__name__}: {e}"[:300], "seconds": round(time.time() - t0, 1)}
    keep = ("final_loss_upscaled", "final_loss_scratch", "flops_scratch_total", "flops_upscaled_total",
            "max_abs_logit_diff", "loss_before_widen", "loss_after_widen", "widen_flops", "unigram_entropy",
            "copy_cosine", "curves", "big_steps_run", "target_loss", "compute_saving", "compute_saving_given_small",
            "loss_gap_at_equal_flops", "cap_hit", "family_saving", "equivalent_step", "head_start_flops",
            "after_growth_efficiency", "ceiling", "forgetting", "small_phase")
    return {**spec, **{k: rep.get(k) for k in keep}, "seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------------
# The plan.

def base_overrides(scale: str) -> dict:
    """``default``: configs/upscale.py:default, evaluated every 50 steps (a fine grid of FLOPs); ``reduced``:
    half the width and steps (a CPU-sized first pass); ``tiny``: for tests."""
    ov = {"train.eval_every": 50, "train.log_every": 50, "train.checkpoint_every": 100_000,
          "train.keep_checkpoints": 1}
    if scale == "reduced":
        ov.update({"model.d_model": 32, "model.num_heads": 2, "model.d_ff": 128, "train.steps": 750,
                   "optim.warmup_steps": 50})
    elif scale == "tiny":
        ov = {"train.eval_every": 5, "train.log_every": 5, "train.checkpoint_every": 100, "train.eval_batches": 1}
    return ov


def spec(workdir: str, scale: str, name: str, model: str, overrides: dict, variant: str | None = None) -> dict:
    if scale == "tiny":  # the tiny variant is Post-LN: depth growth needs Pre-LN
        variant = "tiny"
        if overrides.get("upscale.depth_factor", 1) > 1:
            overrides = {**overrides, "model.residual": "pre"}
    return {"name": name, "model": model, "variant": variant or "default",
            "overrides": {**base_overrides(scale), **overrides},
            "workdir": os.path.join(workdir, _dirname(name))}


def _dirname(name: str) -> str:
    return name.replace(" ", "_").replace("/", "-").replace(">", "")


def b_name(model: str, lr: float, seed: int) -> str:
    return f"B/{model}/lr{lr:g}/s{seed}"


def plan(workdir: str, scale: str) -> list[dict]:
    """Every run of the sweep, most important first (see the module docstring)."""
    S = lambda *a, **k: spec(workdir, scale, *a, **k)  # noqa: E731
    arm_a = {"upscale.arms": ("upscaled",), "optim.lr": A_LR}
    runs = [S(b_name("main", lr, 0), "main", {"optim.lr": lr, "upscale.arms": ("scratch",)}) for lr in LRS]
    runs += [S("A/centre", "main", {**CENTRE, **arm_a})]
    runs += [S(f"A/{f}={label}", "main", {**CENTRE, **ov, **arm_a}) for f, label, ov in ABLATIONS]
    runs += [S(b_name("main", lr, s), "main", {"optim.lr": lr, "seed": s, "upscale.arms": ("scratch",)})
             for s in (1, 2) for lr in LRS]
    runs += [S(f"A/{name}/s{s}", "main", {**CENTRE, **ov, **arm_a, "seed": s}) for name, ov in SEEDED for s in (1, 2)]
    models = dict(OTHER_MODELS)
    if scale != "tiny":
        models.update({f"size {k}": (None, {f"model.{f}": v for f, v in dims.items()}) for k, dims in SIZES.items()})
    for model, (variant, ov) in models.items():
        runs += [S(b_name(model, lr, 0), model, {**ov, "optim.lr": lr, "upscale.arms": ("scratch",)}, variant=variant)
                 for lr in lrs_for(model)]
        runs += [S(f"A/{model}/centre", model, {**CENTRE, **ov, **arm_a}, variant=variant)]
        if model.startswith("size"):
            runs += [S(f"A/{model}/default/s{s}", model, {**ov, **arm_a, "seed": s}, variant=variant)
                     for s in SIZE_SEEDS]
            if model == "size 32->64":
                runs += [S(f"A/{model}/{f}={label}", model, {**ov, **aov, **arm_a}, variant=variant)
                         for f, label, aov in AROUND]
    if scale != "tiny":
        runs += [S("A/main/factor=4 from d 32", "main", {**K4_FROM_32, **arm_a})]
        model = "size 32->64 depth2_gpt"  # depth x 2 with width x 2 (item 7), its own tuned B
        ov = {**{f"model.{f}": v for f, v in SIZES["32->64"].items()}, "upscale.depth_factor": 2}
        runs += [S(b_name(model, lr, 0), model, {**ov, "optim.lr": lr, "upscale.arms": ("scratch",)}, variant="gpt")
                 for lr in lrs_for(model)]
        runs += [S(f"A/{model}/default", model, {**ov, **arm_a}, variant="gpt")]
    return runs


def execute(runs: list[dict], workdir: str, workers: int, deadline: float, fn=None) -> list[dict]:
    """Run what is not done yet, ``workers`` at a time, each through ``fn(spec) -> row`` (default :func:`run_one`,
    a picklable module-level function); rows are saved as they finish."""
    fn = run_one if fn is None else fn
    path = os.path.join(workdir, "sweep.json")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [r for r in json.load(f)["rows"] if "error" not in r]
    keep = {r["name"] for r in runs}
    others, rows = [r for r in rows if r["name"] not in keep], [r for r in rows if r["name"] in keep]
    done = {r["name"] for r in rows}
    todo = [r for r in runs if r["name"] not in done]
    t0 = time.time()
    for r in todo:
        os.makedirs(r["workdir"], exist_ok=True)
    if todo:
        pool = cf.ProcessPoolExecutor(max_workers=max(1, min(workers, len(todo))), mp_context=mp.get_context("spawn"),
                                      max_tasks_per_child=1)
        futures = {pool.submit(fn, r): r for r in todo}
        try:
            for fut in cf.as_completed(futures, timeout=deadline if deadline > 0 else None):
                row = fut.result()
                print(json.dumps({k: v for k, v in row.items() if k not in ("curves", "copy_cosine", "overrides")}),
                      flush=True)
                if "error" not in row:
                    rows.append(row)
                    write_json_atomic(path, {"rows": others + rows}, indent=None)
        except cf.TimeoutError:
            print(json.dumps({"deadline": deadline, "finished": len(rows), "cancelled": [
                futures[f]["name"] for f in futures if not f.done()]}), flush=True)
            for f in futures:
                f.cancel()
            for proc in list(getattr(pool, "_processes", {}).values()):  # running jobs: stop them now
                proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
    print(json.dumps({"executed_seconds": round(time.time() - t0, 1)}), flush=True)
    return others + rows


# ------------------------------------------------------------------------------------------------
# Analysis.

def analyze(rows: list[dict]) -> dict:
    """Compare each A run with B at B's best rate (same model, same seed); returns the result tables."""
    from kexue_jax.experiments import upscale as experiment  # noqa: PLC0415
    by = {r["name"]: r for r in rows}
    best = {}
    for model in sorted({r["model"] for r in rows}):
        cands = [(by[b_name(model, lr, 0)]["final_loss_scratch"], lr) for lr in lrs_for(model)
                 if b_name(model, lr, 0) in by]
        if cands:
            best[model] = min(cands)[1]
    results = []
    for r in rows:
        if r["name"].startswith("A/") and r["model"] not in best and r.get("target_loss") is not None:
            # measured against an arm B outside the sweep (``--main-baseline``): the job's own figures
            results.append({"name": r["name"], "model": r["model"], "seed": r["overrides"].get("seed", 0),
                            "b_lr": r["overrides"].get("optim.lr"), "final_loss_upscaled": r["final_loss_upscaled"],
                            "copy_cosine_end": r["copy_cosine"][-1]["cosine"] if r.get("copy_cosine") else None,
                            **{k: r[k] for k in ("target_loss", "compute_saving", "compute_saving_given_small",
                                                 "loss_gap_at_equal_flops")}})
            continue
        if not r["name"].startswith("A/") or r["model"] not in best:
            continue
        seed = r["overrides"].get("seed", 0)
        b = by.get(b_name(r["model"], best[r["model"]], seed))
        if b is None:
            continue
        warm = _config(b).optim.warmup_steps
        scratch = b["curves"]["scratch (B)"]
        warm_flops = warm * scratch[-1]["flops"] / scratch[-1]["step"]
        fig = experiment.compute_saving(r["curves"]["upscaled (A)"], scratch, small_flops=r["widen_flops"],
                                        warmup_flops=warm_flops)
        results.append({"name": r["name"], "model": r["model"], "seed": seed, "b_lr": best[r["model"]], **fig,
                        "final_loss_upscaled": r["final_loss_upscaled"], "copy_cosine_end": (
                            r["copy_cosine"][-1]["cosine"] if r.get("copy_cosine") else None)})
    groups: dict[str, list[dict]] = {}
    for res in results:
        key = res["name"].rsplit("/s", 1)[0] if res["name"].rsplit("/s", 1)[-1].isdigit() else res["name"]
        groups.setdefault(key, []).append(res)
    seeded = {}
    for key, rs in groups.items():
        if len(rs) > 1:
            seeded[key] = {k: seed_stats([x[k] for x in rs]) for k in ("compute_saving", "compute_saving_given_small",
                                                                     "loss_gap_at_equal_flops")}
    return {"best_lr": best, "results": results, "seeds": seeded,
            "b_final": {m: {f"{lr:g}": by[b_name(m, lr, 0)]["final_loss_scratch"]
                            for lr in lrs_for(m) if b_name(m, lr, 0) in by} for m in best}}


def _of(stats: dict) -> int:
    """The number of seeds behind ``seed_stats`` (reached or not); an older multi-seed report has ``missing``."""
    return len(stats["values"]) if "values" in stats else stats["n"] + stats.get("missing", 0)


def _f(v, nd=3):
    return "—" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def tables(an: dict) -> str:
    out = ["## Arm B: final validation loss at each learning rate (seed 0)", "",
           "| big model | final loss at each lr | best |", "|---|---|---|"]
    for m, vals in an["b_final"].items():
        out.append(f"| {m} | " + ", ".join(f"{lr}: {_f(v, 4)}" for lr, v in vals.items()) + f" | {an['best_lr'][m]:g} |")
    out += ["", "## Arm A against the tuned arm B (seed 0)", "",
            "| run | compute saving | given small | loss gap at B's FLOPs | A's final loss | target (B) | copy cosine at end |",
            "|---|---|---|---|---|---|---|"]
    for r in an["results"]:
        if r["seed"] == 0:
            out.append(f"| {r['name']} | {_f(r['compute_saving'], 2)} | {_f(r['compute_saving_given_small'], 2)} | "
                       f"{_f(r['loss_gap_at_equal_flops'], 4)} | {_f(r['final_loss_upscaled'], 4)} | "
                       f"{_f(r['target_loss'], 4)} | {_f(r['copy_cosine_end'], 3)} |")
    if an["seeds"]:
        out += ["", "## Three seeds (mean ± sample std; n = seeds that reached the target)", "",
                "| setting | compute saving | given small | loss gap at B's FLOPs |", "|---|---|---|---|"]
        for key, st in an["seeds"].items():
            cell = lambda d: ("not reached" if d["mean"] is None else  # noqa: E731
                              f"{d['mean']:.3f} ± {_f(d['std'], 3)} (n={d['n']}/{_of(d)})")
            out.append(f"| {key} | {cell(st['compute_saving'])} | {cell(st['compute_saving_given_small'])} | "
                       f"{cell(st['loss_gap_at_equal_flops'])} |")
    return "\n".join(out) + "\n"


#: the widths of the size study (model name -> small d_model -> big d_model); "main" is configs/upscale.py's own
SIZE_MODELS = (("size 32->64", 32, 64), ("main", 64, 128), ("size 128->256", 128, 256))


def size_study(an: dict, main_report: dict | None = None) -> list[dict]:
    """One row per width: the job's defaults (``A/<model>/default/sN``) against B at the size's best rate and
    the same seed, mean +/- sample std over seeds; the main model's row may come from the main job's own
    multi-seed ``report.json`` (``--main-report``)."""
    #: row key -> the main report's key (its target is B's final loss)
    from_report = {"compute_saving": "compute_saving", "compute_saving_given_small": "compute_saving_given_small",
                   "loss_gap_at_equal_flops": "loss_gap_at_equal_flops", "target_loss": "final_loss_scratch"}
    out = []
    for model, d_small, d_big in SIZE_MODELS:
        rs = [r for r in an["results"] if r["model"] == model and r["name"].startswith(f"A/{model}/default/s")]
        if rs:
            row = {k: seed_stats([r[k] for r in rs]) for k in from_report}
            row["b_lr"] = an["best_lr"].get(model)
        elif model == "main" and main_report is not None:
            # a multi-seed report holds seed_stats per figure, a one-seed report the figure itself
            row = {k: v if isinstance(v, dict) else seed_stats([v])
                   for k, v in ((k, main_report.get(rk)) for k, rk in from_report.items())}
            row["b_lr"] = main_report.get("settings", {}).get("lr")
        else:
            continue
        out.append({"model": model, "d_small": d_small, "d_big": d_big, **row})
    return out


def size_table(rows: list[dict]) -> str:
    def cell(d, nd=2):
        if d is None or d["mean"] is None:
            return "not reached"
        sd = "" if d["std"] is None else f" ± {d['std']:.{nd}f}"
        return f"{d['mean']:.{nd}f}{sd} ({d['n']}/{_of(d)})"
    out = ["## Size study: the job's defaults at three widths (mean ± sample std; (n/of) = seeds that reached)", "",
           "| widths | B's lr | target (B's final loss) | compute saving | given small | loss gap A − B at B's FLOPs |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| d {r['d_small']} → {r['d_big']} | {r['b_lr']:g} | {cell(r['target_loss'], 4)} | "
                   f"{cell(r['compute_saving'])} | {cell(r['compute_saving_given_small'])} | "
                   f"{cell(r['loss_gap_at_equal_flops'], 4)} |")
    return "\n".join(out) + "\n"


def plot_size_study(rows: list[dict], path: str) -> bool:
    """Saving (both ratios) and loss gap against the big model's width, with seed error bars."""
    fig = figure(figsize=(10, 4))
    if fig is None:
        return False
    a1, a2 = fig.subplots(1, 2)
    x = [r["d_big"] for r in rows]

    def series(ax, key, **kw):  # mean +/- std of one figure against the width (nan where no seed reached)
        y = [r[key]["mean"] if r[key] and r[key]["mean"] is not None else float("nan") for r in rows]
        e = [(r[key]["std"] or 0.0) if r[key] else 0.0 for r in rows]
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, **kw)

    def width_axis(ax, ref, **labels):
        ax.axhline(ref, color="grey", lw=0.8, ls="--")
        ax.set(xscale="log", **labels)
        ax.set_xticks(x, [str(v) for v in x])
        ax.minorticks_off()

    series(a1, "compute_saving", label="compute saving")
    series(a1, "compute_saving_given_small", label="given the small model")
    for r in rows:  # a width whose arm A never reached B's final loss has no saving: say so on the panel
        if r["compute_saving"]["mean"] is None:
            a1.annotate(f"d {r['d_big']}: not reached", (r["d_big"], 1.0), ha="right", va="bottom", color="C3")
    width_axis(a1, 1.0, xlabel="big model d_model (4 layers, 1,500 steps)",
               ylabel="B's FLOPs / A's FLOPs to B's final loss", title="saving vs width")
    a1.legend()
    series(a2, "loss_gap_at_equal_flops", color="C3")
    width_axis(a2, 0.0, xlabel="big model d_model", ylabel="A − B at B's final FLOPs (nats/byte)",
               title="loss gap at equal compute (< 0: growth ahead)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def run_plan(runs: list[dict], workdir: str, workers: int, deadline: float, cap: float,
             main_baseline: str = "") -> list[dict]:
    """Arm B runs first; then every A run is given the B run of its model and seed at B's best rate as
    ``upscale.baseline`` (so it stops once it has reached B's final loss and spent B's FLOPs, or at ``cap``).
    ``main_baseline``: a finished main job (``train.py --config=configs/upscale.py``, one seed or several) whose
    arm B serves the main model's A runs when this sweep has no B of its own for it (at the job's own rate)."""
    t0 = time.time()
    b_runs = [r for r in runs if r["name"].startswith("B/")]
    rows = execute(b_runs, workdir, workers, deadline)
    best = analyze(rows)["best_lr"]
    # arm B at the best rate for every seed an A run needs (seeds > 0 are planned only now that the rate is known)
    have = {r["name"]: {k: r[k] for k in ("name", "model", "variant", "overrides", "workdir")} for r in rows}
    extra = {}
    for r in runs:
        if r["name"].startswith("A/") and r["model"] in best:
            seed = r["overrides"].get("seed", 0)
            name = b_name(r["model"], best[r["model"]], seed)
            seed0 = have.get(b_name(r["model"], best[r["model"]], 0))
            if name not in have and name not in extra and seed0 is not None:
                extra[name] = {**seed0, "name": name, "overrides": {**seed0["overrides"], "seed": seed},
                               "workdir": os.path.join(workdir, _dirname(name))}
    if extra:
        rows = execute(list(extra.values()), workdir, workers, deadline)
    a_runs = []
    for r in runs:
        if r["name"].startswith("A/") and r["model"] in best:
            seed = r["overrides"].get("seed", 0)
            base = os.path.join(workdir, _dirname(b_name(r["model"], best[r["model"]], seed)))
            if os.path.isdir(os.path.join(base, "b_scratch")):
                a_runs.append({**r, "overrides": {**r["overrides"], "upscale.baseline": base, "upscale.cap": cap,
                                                  "optim.lr": best[r["model"]]}})
        elif r["name"].startswith("A/") and r["model"] == "main" and main_baseline:
            seed = r["overrides"].get("seed", 0)
            multi = os.path.join(main_baseline, f"seed_{seed}")
            base = multi if os.path.isdir(multi) else main_baseline
            a_runs.append({**r, "overrides": {**r["overrides"], "upscale.baseline": base, "upscale.cap": cap}})
    left = deadline - (time.time() - t0) if deadline > 0 else 0.0
    return execute(a_runs, workdir, workers, max(left, 1.0) if deadline > 0 else 0.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--scale", default="default", choices=("default", "reduced", "tiny"))
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--deadline", type=float, default=0.0, help="seconds; runs not finished by then are cut")
    ap.add_argument("--analyze-only", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated run-name prefixes to run (default: the whole plan)")
    ap.add_argument("--cap", type=float, default=2.0, help="arm A's FLOPs cap in units of B's (upscale.cap)")
    ap.add_argument("--main-report", default="", help="the main job's multi-seed report.json: the size study's "
                    "d 64 -> 128 row when the sweep did not run it")
    ap.add_argument("--main-baseline", default="", help="a finished main job's workdir: arm B for the main "
                    "model's A runs (e.g. factor 4 from d 32) when the sweep runs no B of its own")
    ap.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS), help="arm B's learning rates")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    LRS[:] = [float(x) for x in args.lrs.split(",")]
    if args.analyze_only:
        with open(os.path.join(args.workdir, "sweep.json")) as f:
            rows = json.load(f)["rows"]
    else:
        runs = plan(args.workdir, args.scale)
        if args.only:  # in the order given
            prefixes = args.only.split(",")
            runs = [r for p in prefixes for r in runs if r["name"].startswith(p)]
            runs = list({r["name"]: r for r in runs}.values())
        rows = run_plan(runs, args.workdir, args.workers, args.deadline, args.cap, args.main_baseline)
    an = analyze(rows)
    main_report = None
    if args.main_report:
        with open(args.main_report) as f:
            main_report = json.load(f)
    an["size_study"] = size_study(an, main_report)
    write_json_atomic(os.path.join(args.workdir, "analysis.json"), an, indent=1)
    md = f"# Upscaling sweep ({args.scale})\n\n" + tables(an)
    if an["size_study"]:
        md += "\n" + size_table(an["size_study"])
        plot_size_study(an["size_study"], os.path.join(args.workdir, "size_study.png"))
    with open(os.path.join(args.workdir, "sweep.md"), "w") as f:
        f.write(md)
    print(md)
    print(json.dumps({"benchmark": "upscale_sweep", "scale": args.scale, "runs": len(rows),
                      "compared": len(an["results"])}))


if __name__ == "__main__":
    main()
