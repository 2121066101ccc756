"""Fine-tuning seeds of the mixer study's transfer with few labels (kexue.fm/archives/8431): is each mixer's gain
from MLM pre-training larger than the fine-tuning noise?

    python benchmarks/mixer_transfer_seeds.py --workdir runs/mixers_order [--seeds 1,2] [--variant default]

``--workdir`` is a finished ``python train.py --config=configs/mixers.py[:VARIANT]`` study. For every mixer its
MLM encoder (``<workdir>/<mixer>_mlm``, the final step) is fine-tuned again on the study's fraction task
(``study.ft_fraction_task``, each of ``study.ft_label_fractions``), pre-trained and from scratch, with
``config.seed`` = each of ``--seeds``: a seed changes the task's split, the labelled lines, the classifier's init
and the batches, not the encoder. The runs go to ``<workdir>/<mixer>_mlm/ft_seed<seed>/`` (rerunning reuses the
finished ones). Seed 0 is the study's own row (its ``report.json``). Output: ``<workdir>/transfer_seeds.json``
(every seed's accuracies, ``seed_stats`` of each figure) and ``transfer_seeds.md``; one JSON line on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kexue_jax.reporting import markdown_table, seed_stats, write_json_atomic  # noqa: E402

FIGURES = ("pretrained", "scratch", "gain")


def summarize(rows: list[dict]) -> list[dict]:
    """Rows ``{mixer, fraction, seed, pretrained, scratch, gain}`` -> one entry per (mixer, fraction), in first-seen
    order, with ``seed_stats`` of each figure over its seeds and ``seeds`` (the seeds, in the order given)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mixer"], r["fraction"]), []).append(r)
    return [{"mixer": m, "fraction": f, "seeds": [r["seed"] for r in rs],
             **{k: seed_stats([r[k] for r in rs]) for k in FIGURES}} for (m, f), rs in groups.items()]


def _ms(st: dict) -> str:
    return f"{st['mean']:.3f}" + ("" if st["std"] is None else f" ± {st['std']:.3f}")


def table(summary: list[dict]) -> str:
    return markdown_table(["mixer", "labels", "seeds", "from MLM pre-training", "from scratch", "gain"],
                          [[s["mixer"], f"{s['fraction'] * 100:g}%", len(s["seeds"]), _ms(s["pretrained"]),
                            _ms(s["scratch"]), f"**{_ms(s['gain'])}**"] for s in summary])


def fine_tune_seeds(workdir: str, variant: str, seeds: list[int]) -> list[dict]:
    """Every mixer's MLM encoder of the study in ``workdir``, fine-tuned on the fraction task at ``seeds``."""
    import jax  # noqa: PLC0415 (the analysis of stored rows needs no jax)

    from configs import mixers as mixers_config  # noqa: PLC0415
    from kexue_jax import training  # noqa: PLC0415
    from kexue_jax.experiments import mixers as study_lib  # noqa: PLC0415
    from kexue_jax.nn import Transformer  # noqa: PLC0415

    config = mixers_config.get_config(variant)
    base = study_lib.validate(config)
    study = config.study
    target = study_lib.param_count(study_lib.mixer_config(base, study.reference, "mlm", None))
    arm_cfg = study_lib._arm_config(config, "mlm")
    tx = training.make_optimizer(arm_cfg.optim, arm_cfg.train.steps)
    mesh = training.build_mesh(config)
    rows = []
    for mixer in study.mixers:
        cfg = study_lib.mixer_config(base, mixer, "mlm", target)
        like = training.init_state(Transformer(cfg), tx, jax.random.PRNGKey(0), arm_cfg.data.seq_len)
        params = training.restore_step(os.path.join(workdir, f"{mixer}_mlm"), like, arm_cfg.train.steps).params
        for seed in seeds:
            c = config.copy_and_resolve_references()
            c.seed = seed
            data = study_lib.FRACTION_TASKS[study.ft_fraction_task](c.study, seed)
            subsets = {float(f): study_lib.label_subset(len(data["train"][2]), float(f), seed)
                       for f in study.ft_label_fractions}
            arm = os.path.join(workdir, f"{mixer}_mlm", f"ft_seed{seed}")
            rows += [{**r, "seed": seed} for r in study_lib.transfer_by_fraction(cfg, params, data, subsets, c, arm,
                                                                                  mesh)]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--variant", default="default")
    args = ap.parse_args(argv)
    with open(os.path.join(args.workdir, "report.json")) as f:
        report = json.load(f)
    if not report.get("transfer_fractions"):
        raise SystemExit(f"{args.workdir}/report.json has no transfer_fractions: run the study with "
                         f"study.ft_label_fractions first")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    seed0 = int(report.get("config", {}).get("seed", 0))
    rows = [{**r, "seed": seed0} for r in report["transfer_fractions"]] + fine_tune_seeds(args.workdir, args.variant,
                                                                                          seeds)
    summary = summarize(rows)
    md = ("# Transfer with few labels, over fine-tuning seeds (test accuracy, mean ± sample std)\n\n"
          + table(summary))
    with open(os.path.join(args.workdir, "transfer_seeds.md"), "w") as f:
        f.write(md)
    write_json_atomic(os.path.join(args.workdir, "transfer_seeds.json"),
                      {"post": "kexue.fm/archives/8431", "task": report.get("fraction_task"), "rows": rows,
                       "summary": summary}, indent=1)
    print(md)
    print(json.dumps({"benchmark": "mixer_transfer_seeds", "rows": len(rows), "groups": len(summary)}))


if __name__ == "__main__":
    main()
