"""Learning-rate transfer under muP vs the standard parameterization (issue: muP; Tensor Programs V).

    python benchmarks/mup_transfer.py --workdir runs/mup_transfer [--worker I/N] [--phase grid|seeds|report]
        [--widths 32,64,128,256] [--lrs 1.5e-3,...] [--steps 500] [--base-width 64] [--out benchmarks/results/mup]

The main job's model (``configs/upscale.py`` default: BERT-style, 4 layers, 4 heads, next-byte prediction) at
each width (head_dim and d_ff scale with d_model, num_heads fixed), under "standard" and "mup" (base width
``--base-width``), over a x2 grid of learning rates, each run through the project's training loop
(``training.train``: resumable, one workdir per run). ``--phase grid`` runs seed 0 of the grid; ``--phase
seeds`` runs seed 1 at each (parameterization, width)'s best rate and its two neighbours (read from the grid's
results); ``--phase report`` writes ``transfer.json`` (every run's final loss and curve), ``transfer.md`` (the
table) and ``transfer.png`` (final loss against lr, one panel per parameterization) into ``--out``. Run several
workers side by side with ``--worker 0/2`` and ``--worker 1/2`` (each takes every N-th run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARAMS = ("standard", "mup")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--phase", choices=("grid", "seeds", "report"), default="grid")
    p.add_argument("--worker", default="0/1", help="I/N: run every N-th run starting at I")
    p.add_argument("--widths", default="32,64,128,256")
    p.add_argument("--lrs", default="1.5e-3,3e-3,6e-3,1.2e-2,2.4e-2")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--base-width", type=int, default=64)
    p.add_argument("--params", default=",".join(PARAMS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mup"))
    a = p.parse_args(argv)
    try:
        a.widths = [int(x) for x in a.widths.split(",")]
        a.lrs = [float(x) for x in a.lrs.split(",")]
        i, n = (int(x) for x in a.worker.split("/"))
    except ValueError:
        p.error("--widths, --lrs must be comma-separated numbers and --worker I/N integers")
    if not 0 <= i < n:
        p.error(f"--worker I/N needs 0 <= I < N, got {a.worker}")
    a.worker = (i, n)
    a.params = a.params.split(",")
    if any(x not in PARAMS for x in a.params):
        p.error(f"--params must be a subset of {PARAMS}")
    return a


def base_config(a):
    from configs.upscale import get_config  # noqa: PLC0415
    c = get_config("default")
    c.data.update(seq_len=a.seq_len, batch_size=a.batch_size)
    c.optim.warmup_steps = a.warmup
    c.train.update(log_every=max(1, a.steps // 5), eval_every=max(1, a.steps // 10), eval_batches=4,
                   checkpoint_every=a.steps, plot=False)
    return c


def run_list(a, runs):
    from kexue_jax.experiments import mup  # noqa: PLC0415
    i, n = a.worker
    base = base_config(a)
    for j, (param, width, lr, seed) in enumerate(runs):
        if j % n != i:
            continue
        cfg = mup.transfer_config(base, parameterization=param, width=width, lr=lr, seed=seed, steps=a.steps,
                                  base_width=a.base_width)
        wd = mup.workdir_for(a.workdir, param, width, lr, seed)
        print(f"== {param} d {width} lr {lr:g} seed {seed} -> {wd}", flush=True)
        try:
            mup.run_transfer(cfg, wd)
        except FloatingPointError as e:  # a diverged run is a result (its final loss is inf)
            print(f"   diverged: {e}", flush=True)


def collect(a) -> list[dict]:
    from kexue_jax import metrics as metrics_lib  # noqa: PLC0415
    from kexue_jax.experiments import mup  # noqa: PLC0415
    out = []
    for name in sorted(os.listdir(a.workdir)) if os.path.isdir(a.workdir) else []:
        parts = name.split("_")
        if len(parts) != 4 or parts[0] not in PARAMS:
            continue
        param, width, lr, seed = parts[0], int(parts[1][1:]), float(parts[2][2:]), int(parts[3][1:])
        recs = metrics_lib.read_metrics(os.path.join(a.workdir, name))
        hist = [{"step": r["step"], "val_loss": r["val_loss"]} for r in recs if "val_loss" in r]
        done = bool(hist) and hist[-1]["step"] >= a.steps
        diverged = any(not math.isfinite(r.get("loss", 0.0)) for r in recs) or (
            bool(hist) and not math.isfinite(hist[-1]["val_loss"]))
        if not done and not diverged:
            continue
        out.append({"parameterization": param, "width": width, "lr": lr, "seed": seed,
                    "final_loss": math.inf if diverged else mup.final_loss(hist), "curve": hist})
    return out


def seed_runs(a) -> list[tuple]:
    from kexue_jax.experiments import mup  # noqa: PLC0415
    best = mup.best_rates([r for r in collect(a) if r["seed"] == 0])
    runs = []
    for param in a.params:
        for width in a.widths:
            b = best.get(param, {}).get(width)
            if b is None:
                continue
            k = a.lrs.index(b["lr"])
            runs += [(param, width, a.lrs[j], 1) for j in (k - 1, k, k + 1) if 0 <= j < len(a.lrs)]
    return runs


def report(a) -> dict:
    from kexue_jax.experiments import mup  # noqa: PLC0415
    runs = collect(a)
    best = mup.best_rates(runs)
    best0 = mup.best_rates([r for r in runs if r["seed"] == 0])
    os.makedirs(a.out, exist_ok=True)
    table = {}
    for r in runs:
        table.setdefault((r["parameterization"], r["width"], r["lr"]), []).append(r["final_loss"])
    lines = ["| parameterization | d_model | " + " | ".join(f"lr {lr:g}" for lr in a.lrs) + " | best lr | best loss |",
             "|---|---|" + "---|" * len(a.lrs) + "---|---|"]
    for param in a.params:
        for width in a.widths:
            cells = []
            for lr in a.lrs:
                vals = table.get((param, width, lr), [])
                if not vals:
                    cells.append("–")
                    continue
                mean = sum(vals) / len(vals)
                txt = "diverged" if not math.isfinite(mean) else f"{mean:.4f}"
                if len(vals) > 1 and math.isfinite(mean):
                    sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
                    txt += f" ± {sd:.4f}"
                b = best.get(param, {}).get(width)
                cells.append(f"**{txt}**" if b and b["lr"] == lr else txt)
            b = best.get(param, {}).get(width, {})
            lines.append(f"| {param} | {width} | " + " | ".join(cells) + f" | {b.get('lr', '–')} | "
                         f"{b.get('loss', float('nan')):.4f} |")
    shift = {p: _grid_steps(a, [best.get(p, {}).get(w, {}).get("lr") for w in a.widths]) for p in a.params}
    result = {"protocol": {"widths": a.widths, "lrs": a.lrs, "steps": a.steps, "warmup": a.warmup,
                           "seq_len": a.seq_len, "batch_size": a.batch_size, "base_width": a.base_width},
              "best": {p: {str(w): v for w, v in d.items()} for p, d in best.items()},
              "best_seed0": {p: {str(w): v for w, v in d.items()} for p, d in best0.items()},
              "best_lr_moves_grid_steps": shift, "runs": runs}
    with open(os.path.join(a.out, "transfer.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    with open(os.path.join(a.out, "transfer.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(a, table, os.path.join(a.out, "transfer.png"))
    print("\n".join(lines))
    print(json.dumps({"best": result["best"], "best_lr_moves_grid_steps": shift}, default=float))
    return result


def _grid_steps(a, lrs) -> int | None:
    """How many x2 grid steps the best rate spans over the widths (0 = the same grid point at every width)."""
    idx = [a.lrs.index(lr) for lr in lrs if lr is not None]
    return (max(idx) - min(idx)) if idx else None


def _plot(a, table, path):
    from kexue_jax import reporting  # noqa: PLC0415

    fig = reporting.figure(figsize=(10, 4))
    if fig is None:
        return
    for i, param in enumerate(a.params):
        ax = fig.add_subplot(1, len(a.params), i + 1)
        for width in a.widths:
            xs, ys = [], []
            for lr in a.lrs:
                vals = table.get((param, width, lr), [])
                if vals and all(math.isfinite(v) for v in vals):
                    xs.append(lr)
                    ys.append(sum(vals) / len(vals))
            ax.plot(xs, ys, marker="o", label=f"d {width}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final validation loss (nats/byte)")
        ax.set_title(param)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    a = parse_args(argv)
    if a.phase == "report":
        report(a)
        return
    if a.phase == "grid":
        runs = [(p, w, lr, 0) for lr in a.lrs for w in a.widths for p in a.params]
    else:
        runs = seed_runs(a)
    run_list(a, runs)


if __name__ == "__main__":
    main()
