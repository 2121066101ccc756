"""muP coordinate check (microsoft/mup's ``get_coord_data``), plotted: mean |x| of every layer output after each of a
few Adam steps, against width, under muP and the standard parameterization.

    python benchmarks/mup_coord_check.py [--widths 32,64,128,256,512] [--steps 4] [--lr 1e-2] [--layers 2]
        [--out benchmarks/results/mup]

Writes ``coord_check.json`` (every value, the log-log slope and max/min band of each output) and
``coord_check.png`` (one panel per parameterization; a line per layer output at the last step, dashed at t = 1)
and prints the JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", default="32,64,128,256,512")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mup"))
    a = p.parse_args(argv)
    from kexue_jax.experiments import mup  # noqa: PLC0415
    from kexue_jax.nn import TransformerConfig  # noqa: PLC0415
    widths = [int(w) for w in a.widths.split(",")]
    data, summary = {}, {}
    for param in ("mup", "standard"):
        kw = dict(parameterization="mup", mup_base_d_model=widths[0]) if param == "mup" else {}
        base = TransformerConfig.preset("gpt", vocab_size=64, num_layers=a.layers, d_model=widths[0], num_heads=4,
                                        head_dim=widths[0] // 4, d_ff=4 * widths[0], max_len=16, **kw)
        data[param] = mup.coord_data(base, widths, lr=a.lr, steps=a.steps, batch_size=4, seq_len=16)
        summary[param] = {n: {"slope": mup.growth_exponent(data[param], n), "band": mup.coord_band(data[param], n)}
                          for n in data[param][widths[0]]}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "coord_check.json"), "w") as f:
        json.dump({"protocol": vars(a), "summary": summary,
                   "data": {p_: {str(w): v for w, v in d.items()} for p_, d in data.items()}}, f, indent=1)
    from kexue_jax import reporting  # noqa: PLC0415

    fig = reporting.figure(figsize=(11, 4.2))
    if fig is not None:
        for i, param in enumerate(("mup", "standard")):
            ax = fig.add_subplot(1, 2, i + 1)
            for j, name in enumerate(data[param][widths[0]]):
                color = f"C{j}"
                ax.plot(widths, [data[param][w][name][-1] for w in widths], marker="o", color=color,
                        label=f"{name} (slope {summary[param][name]['slope']:+.2f})")
                ax.plot(widths, [data[param][w][name][1] for w in widths], ls="--", color=color, alpha=0.5)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("d_model")
            ax.set_ylabel(f"mean |x| after step {a.steps} (dashed: step 1)")
            ax.set_title(f"{param}: Adam lr {a.lr:g}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "coord_check.png"), dpi=110)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
