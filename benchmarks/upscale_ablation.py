"""What each part of the upscaling job buys: compute_saving of arm A under variants of the widening,
against one shared from-scratch arm B (same data, same schedule). Prints one JSON line per variant and a
final JSON summary (last line).

    python benchmarks/upscale_ablation.py --workdir runs/ablation [--reuse runs/upscale/report.json]
        [--variant default] [--only noise,no_opt_map]

--reuse takes arm B's curve (and arm A's "as configured" result) from a finished main-job report instead
of training them again, and copies its finished small-model phase (a_small/) into each variant, so the
variants train only arm A's big phase (the small phase is identical in all of them).
"""
import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for configs/
from configs import upscale as upscale_config  # noqa: E402
from kexue_jax.experiments import upscale as experiment  # noqa: E402

VARIANTS = {
    "restart": {"schedule": "restart"},
    "restart_1000": {"schedule": "restart", "big_steps": 1000},
    "noise": {"noise": 1e-3},
    "no_opt_map": {"map_optimizer": False},
    "scale_updates": {"scale_updates": True},
    "num_heads": {"grow": "num_heads"},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--variant", default="default", help="configs/upscale.py variant")
    ap.add_argument("--reuse", default=None, help="report.json of a finished main job (arm B and arm A)")
    ap.add_argument("--only", default=",".join(VARIANTS))
    args = ap.parse_args()
    base = upscale_config.get_config(args.variant)
    base.train.plot = False
    if args.reuse:
        with open(args.reuse) as f:
            ref = json.load(f)
    else:
        c = copy.deepcopy(base)
        c.upscale.arms = ("upscaled", "scratch")
        ref = experiment.run(c, os.path.join(args.workdir, "reference"))
    scratch = ref["curves"]["scratch (B)"]
    rows = [{"variant": "as configured", **{k: ref.get(k) for k in (
        "compute_saving", "final_loss_upscaled", "final_loss_scratch", "max_abs_logit_diff")}}]
    print(json.dumps(rows[0]), flush=True)
    for name in [v for v in args.only.split(",") if v]:
        c = copy.deepcopy(base)
        c.upscale.update(arms=("upscaled",), **VARIANTS[name])
        out = os.path.join(args.workdir, name)
        small_dir = os.path.join(os.path.dirname(args.reuse), "a_small") if args.reuse else None
        if small_dir and os.path.isdir(small_dir) and not os.path.exists(os.path.join(out, "a_small")):
            shutil.copytree(small_dir, os.path.join(out, "a_small"))
        rep = experiment.run(c, out)
        saving = experiment.compute_saving(rep["curves"]["upscaled (A)"], scratch)
        row = {"variant": name, **VARIANTS[name], "compute_saving": saving["compute_saving"],
               "flops_to_target_upscaled": saving["flops_to_target_upscaled"],
               "flops_upscaled_total": rep["flops_upscaled_total"],
               "final_loss_upscaled": rep["final_loss_upscaled"], "final_loss_scratch": scratch[-1]["val_loss"],
               "max_abs_logit_diff": rep["max_abs_logit_diff"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"benchmark": "upscale_ablation", "config": f"configs/upscale.py:{args.variant}",
                      "rows": rows}))


if __name__ == "__main__":
    main()
