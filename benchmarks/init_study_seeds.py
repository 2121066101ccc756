"""Seeds under the init-study verdicts (kexue.fm/archives/8620): rerun, at more seeds, the cells each verdict of
the 2-core grid rests on, and report every cell as mean ± std over seeds, or as "k of n collapsed".

    python benchmarks/init_study_seeds.py --workdir runs/init_seeds [--seeds 1,2]
        [--seed0 benchmarks/results/init_study/report.json] [--out benchmarks/results/init_study/seeds]

The cells (``configs/init_study.py`` at its default size, 400 steps; one ``train.py`` run per group and seed, in
``<workdir>/<group>_s<seed>``, resumed cell by cell when rerun):
  shallow  depth 6, lr warmup 0 and 100: Post-LN, the alpha ramp (``alpha``) and ``alpha_post``; the attention-scale
           cells (sqrt, none, t5, mup at head size 64 and 128);
  deep     depth 48, lr warmup 0 and 100: Pre-LN, ReZero, DeepNorm.
Seed 0 is the grid's own report (``--seed0``). A seed changes the init, the batches and the validation batches.
A cell *collapsed* at a seed when it diverged or ended at the unigram plateau (the record's ``at_unigram``: the
loss of a model that ignores its context). Output: ``seeds.json`` (every cell, every seed) and ``seeds.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kexue_jax.reporting import markdown_table, seed_stats, write_json_atomic  # noqa: E402

#: group -> the study overrides that select its cells
GROUPS = {
    "shallow": {"study.sections": "('residual','attention')", "study.residuals": "('post','alpha','alpha_post')",
                "study.depths": "(6,)", "study.warmups": "(0,100)"},
    "deep": {"study.sections": "('residual',)", "study.residuals": "('pre','rezero','deepnorm')",
             "study.depths": "(48,)", "study.warmups": "(0,100)"},
}


def command(group: str, seed: int, workdir: str) -> list[str]:
    """The ``train.py`` command of one group at one seed."""
    return [sys.executable, "train.py", "--config=configs/init_study.py", f"--workdir={workdir}",
            f"--config.seed={seed}", *(f"--config.{k}={v}" for k, v in GROUPS[group].items())]


def collapsed(record: dict) -> bool:
    """A cell that diverged or ended at the unigram plateau."""
    return bool(record["diverged"] or record.get("at_unigram"))


def cell_summary(records: list[dict]) -> dict:
    """One cell over its seeds: ``seed_stats`` of the final validation loss over the seeds that did not collapse,
    ``collapsed`` = how many did, ``n`` = the seeds, and ``text``: "mean ± std" when none collapsed, else
    "k of n collapsed" (with the others' losses)."""
    alive = [r["final_val_loss"] for r in records if not collapsed(r)]
    stats = seed_stats(alive)
    k, n = sum(collapsed(r) for r in records), len(records)
    if k == 0:
        text = f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f}" if stats["std"] is not None else "")
    else:
        text = f"{k} of {n} collapsed" + (f" (others {', '.join(f'{v:.3f}' for v in alive)})" if alive else "")
    return {"final_val_loss": stats, "collapsed": k, "n": n, "text": text,
            "per_seed": [{"seed": r.get("seed"), "final_val_loss": r["final_val_loss"], "collapsed": collapsed(r)}
                         for r in records]}


def collect(seed0_report: str, workdir: str, seeds: list[int]) -> dict[str, list[dict]]:
    """Cell name -> its records at seed 0 and at ``seeds`` (cells present in every seed's run only)."""
    by_seed = {0: {r["name"]: r for r in json.load(open(seed0_report))["runs"]}}
    for seed in seeds:
        by_seed[seed] = {}
        for group in GROUPS:
            path = os.path.join(workdir, f"{group}_s{seed}", "report.json")
            if os.path.exists(path):
                by_seed[seed].update({r["name"]: r for r in json.load(open(path))["runs"]})
    names = [n for n in by_seed[seeds[0]] if all(n in by_seed[s] for s in by_seed)] if seeds else []
    return {n: [{**by_seed[s][n], "seed": s} for s in sorted(by_seed)] for n in names}


def table(cells: dict[str, dict]) -> str:
    rows = [[name, *(f"{p['final_val_loss']:.3f}" + (" c" if p["collapsed"] else "") for p in c["per_seed"]),
             c["text"]] for name, c in cells.items()]
    seeds = [p["seed"] for p in next(iter(cells.values()))["per_seed"]] if cells else []
    return markdown_table(["cell", *(f"seed {s}" for s in seeds), "over seeds"], rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--seed0", default=str(REPO / "benchmarks/results/init_study/report.json"))
    ap.add_argument("--out", default="")
    ap.add_argument("--analyze-only", action="store_true")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.analyze_only:
        for seed in seeds:
            for group in GROUPS:
                subprocess.run(command(group, seed, os.path.join(args.workdir, f"{group}_s{seed}")), cwd=REPO,
                               check=True)
    cells = {name: cell_summary(recs) for name, recs in collect(args.seed0, args.workdir, seeds).items()}
    out = args.out or args.workdir
    os.makedirs(out, exist_ok=True)
    md = "# Init-study cells over seeds (c: collapsed)\n\n" + table(cells)
    with open(os.path.join(out, "seeds.md"), "w") as f:
        f.write(md)
    write_json_atomic(os.path.join(out, "seeds.json"), {"post": "kexue.fm/archives/8620", "seeds": [0, *seeds],
                                                        "cells": cells}, indent=1)
    print(md)
    print(json.dumps({"benchmark": "init_study_seeds", "cells": len(cells),
                      "collapsed_cells": sum(c["collapsed"] > 0 for c in cells.values())}))


if __name__ == "__main__":
    main()
