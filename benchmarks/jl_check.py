"""The Johnson-Lindenstrauss check of the dimension formula n > 8.33 ln N (kexue.fm/archives/8711).

For each N, N random unit vectors of R^dim are projected to n dimensions by a Gaussian matrix with N(0, 1/n)
entries (``kexue_jax.dims.jl_distortion``), at n = 8.33 ln N (``dims.min_dim``), twice and four times that,
and at the JL bound 16 ln N / eps^2 for eps = 0.5 (post 8706: "enough"); every pair's inner-product error
|<Ax, Ay> - <x, y>| and squared-distance ratio is measured against the Gaussian prediction.

    python benchmarks/jl_check.py [--sizes 100 1000 10000] [--dim 1024] [--seed 0] [--out FILE]

Prints one JSON object per (N, n) and last a markdown table; ``--out`` also writes all rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import time

from kexue_jax import dims

JL_EPS = 0.5


def dimensions(N: int, dim: int) -> list[tuple[str, int]]:
    """(label, n) pairs for N: the formula's n, 2x and 4x it, and the JL bound 16 ln N / eps^2 (n <= dim)."""
    n0 = dims.min_dim(N)
    rows = [("8.33 ln N", n0), ("2 x 8.33 ln N", 2 * n0), ("4 x 8.33 ln N", 4 * n0),
            (f"16 ln N / {JL_EPS}^2", math.ceil(16 * math.log(N) / JL_EPS ** 2))]
    return [(label, n) for label, n in rows if n <= dim]


def table(rows: list[dict]) -> str:
    head = ("| N | n | which n | max \\|D\\| (pred.) | rms D (pred.) | pairs \\|D\\| <= 0.1 (pred.) | "
            "pairs \\|D\\| <= 0.25 | max \\|ratio - 1\\| | JL eps (24 / 16 ln N / n) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['N']:,} | {r['n']} | {r['label']} | {r['ip_max']:.3f} ({r['ip_max_predicted']:.3f}) | "
            f"{r['ip_rms']:.4f} ({r['ip_rms_predicted']:.4f}) | {r['ip_within']['0.1']:.3f} "
            f"({r['ip_within_predicted']['0.1']:.3f}) | {r['ip_within']['0.25']:.4f} | {r['dist_max']:.3f} | "
            f"{r['eps_jl24']:.2f} / {r['eps_jl16']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if any(N < 2 for N in args.sizes) or args.dim < 2:
        ap.error("--sizes must be integers >= 2 and --dim an integer >= 2")
    rows = []
    for N in args.sizes:
        for label, n in dimensions(N, args.dim):
            t = time.perf_counter()
            r = {"label": label, **dims.jl_distortion(N, n, dim=args.dim, eps=(0.1, 0.25, JL_EPS), seed=args.seed)}
            r["seconds"] = round(time.perf_counter() - t, 2)
            print(json.dumps(r), flush=True)
            rows.append(r)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"benchmark": "jl_check", "post": "kexue.fm/archives/8711", "dim": args.dim,
                       "seed": args.seed, "rows": rows}, f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
