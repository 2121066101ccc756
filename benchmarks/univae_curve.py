"""UniVAE (kexue.fm/archives/8475) along training: does a sentence come back out of its vector?

    python benchmarks/univae_curve.py --workdir runs/univae_long [--n 500] [--out benchmarks/results/univae/long]
        [--method greedy|beam] [--beam-size 4] [--steps 5000,5500] [--name curve]

For every checkpoint of a trained run (``train.keep_checkpoints`` large enough to keep them; ``--steps`` picks
some), reconstruction from mu (greedy, or ``--method beam``: the most likely of ``--beam-size`` hypotheses) of
``--n`` held-out lines (plays never trained on; the same lines ``report.json`` uses) and ``--n`` training lines:
exact match of the whole line and byte accuracy. Training lines separate "the code carries a line" from "it
generalises to unseen lines". With the run's validation NLL (``metrics.jsonl``), written to
``<out>/<name>.json`` and plotted against steps in ``<out>/<name>.png``; one JSON line on stdout.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def heldout_and_train_lines(c, n: int) -> tuple[list[str], list[str]]:
    """(the first ``n`` held-out lines in ``evaluate_run``'s order, ``n`` training lines drawn with another seed)."""
    import numpy as np  # noqa: PLC0415
    from kexue_jax.experiments import univae  # noqa: PLC0415
    from kexue_jax.streams import stream_seed  # noqa: PLC0415
    tr, va = univae.load_lines(c)
    order = np.random.default_rng(stream_seed(int(c.seed), "evaluation_lines")).permutation(len(va))
    pick = np.random.default_rng(stream_seed(int(c.seed), "curve_training_lines")).permutation(len(tr))[:n]
    return [va[i] for i in order[:n]], [tr[i] for i in pick]


def curve(workdir: str, n: int, *, method: str = "greedy", beam_size: int = 4, steps=None) -> dict:
    """Reconstruction metrics at every kept checkpoint (or those in ``steps``), decoded by ``method``, with the
    validation NLL of ``metrics.jsonl``."""
    import jax  # noqa: PLC0415
    import ml_collections  # noqa: PLC0415

    from kexue_jax import checkpoint as ckpt_lib  # noqa: PLC0415
    from kexue_jax import metrics as metrics_lib  # noqa: PLC0415
    from kexue_jax import training  # noqa: PLC0415
    from kexue_jax import univae as U  # noqa: PLC0415
    from kexue_jax.experiments import univae  # noqa: PLC0415
    with open(os.path.join(workdir, metrics_lib.CONFIG_FILE), encoding="utf-8") as f:
        c = ml_collections.ConfigDict(json.load(f))
    vocab = univae.vocab_for(c)
    cfg = univae.univae_config(c, vocab)
    held, train = heldout_and_train_lines(c, n)
    src = {"heldout": univae.to_tokens(held, cfg.src_len, vocab), "train": univae.to_tokens(train, cfg.src_len, vocab)}
    init_fn = univae.state_init(cfg, training.make_optimizer(c.optim, c.train.steps))
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    kw = {"beam_size": beam_size} if method == "beam" else {}
    rec = jax.jit(lambda p, x: U.reconstruct(p, cfg, x, method=method, **kw))
    val = {r["step"]: r["val_loss"] for r in metrics_lib.read_metrics(workdir) if "val_loss" in r}
    points = []
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None) as ckpt:
        for step in ckpt.all_steps():
            if steps is not None and step not in steps:
                continue
            state, _ = ckpt.restore(abstract, step=step)
            point = {"step": int(step), "val_nll": val.get(step)}
            for name, toks in src.items():
                out = univae._batched(functools.partial(rec, state.params), toks, 64)
                point[name] = univae.reconstruction_metrics(toks, out, cfg.pad_id)
            print(json.dumps(point), flush=True)
            points.append(point)
    return {"workdir": workdir, "n": n, "steps": int(c.train.steps), "method": method,
            "beam_size": beam_size if method == "beam" else None, "points": points,
            "val_nll": [{"step": s, "val_nll": v} for s, v in sorted(val.items())]}


def plot(result: dict, path: str) -> bool:
    """Held-out NLL, exact match (held-out and training lines) and byte accuracy against steps."""
    from kexue_jax.reporting import figure  # noqa: PLC0415
    fig = figure(figsize=(11, 3.4))
    if fig is None:
        return False
    pts = result["points"]
    steps = [p["step"] for p in pts]
    ax = fig.add_subplot(1, 3, 1)
    ax.plot([v["step"] for v in result["val_nll"]], [v["val_nll"] for v in result["val_nll"]], "k.-")
    ax.set(xlabel="step", ylabel="held-out NLL from mu (nats/byte)", yscale="log", title="reconstruction NLL")
    for i, (key, title) in enumerate((("exact_match", "exact match"), ("byte_accuracy", "byte accuracy")), start=2):
        ax = fig.add_subplot(1, 3, i)
        for name, style in (("heldout", "o-"), ("train", "s--")):
            ax.plot(steps, [100 * p[name][key] for p in pts], style, label=f"{name} lines")
        ax.set(xlabel="step", ylabel="%", title=title)
        ax.legend(fontsize=8)
    for a in fig.axes:
        a.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True,
                    help="a trained UniVAE run (python train.py --config=configs/univae.py)")
    ap.add_argument("--n", type=int, default=500, help="lines of each kind (held-out, training)")
    ap.add_argument("--out", default="", help="where curve.json and curve.png go (default: the workdir)")
    ap.add_argument("--method", default="greedy", choices=("greedy", "beam"), help="decoding")
    ap.add_argument("--beam-size", type=int, default=4, help="hypotheses kept with --method beam")
    ap.add_argument("--steps", default="", help="comma-separated checkpoint steps (default: every one kept)")
    ap.add_argument("--name", default="curve", help="file stem of the outputs (<name>.json, <name>.png)")
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        ap.error(f"--workdir {args.workdir!r} has no checkpoints/: train a UniVAE there first")
    if args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")
    if args.beam_size < 1:
        ap.error(f"--beam-size must be >= 1, got {args.beam_size}")
    try:
        steps = {int(x) for x in args.steps.split(",")} if args.steps else None
    except ValueError:
        ap.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    out = args.out or args.workdir
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    result = curve(args.workdir, args.n, method=args.method, beam_size=args.beam_size, steps=steps)
    from kexue_jax.reporting import write_json_atomic  # noqa: PLC0415
    write_json_atomic(os.path.join(out, f"{args.name}.json"), result, indent=1)
    plot(result, os.path.join(out, f"{args.name}.png"))
    last = result["points"][-1] if result["points"] else {}
    print(json.dumps({"benchmark": "univae_curve", "checkpoints": len(result["points"]), "last": last,
                      "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
