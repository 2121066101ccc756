"""Time one BERT-base layer with softmax vs linear attention as the length grows (kexue.fm/archives/8610).

Post 8610 counts multiplications: a layer costs 12 n (hd)^2 + 2 n^2 hd, so self-attention outweighs the FFN only
for n > 2hd = 1536 and the n^2 term dominates only for n > 6hd = 4608; linear attention with a 4x head breaks
even with softmax attention (mixing only) at n > 16 d = 1024, and over the whole layer (its projections are 4x
wider too) at n > 2 (r-1) D + r^2 d = 5632 [derived].  This script measures where the crossovers happen in time.

Layers (jnp, jitted, forward, batch 1, fp32, Post-LN BERT wiring, h = 12, d = 64, D = 768, F = 3072):
  softmax   : explicit softmax(Q K^T / sqrt(d)) V (the h x n x n score matrix is materialised)
  linear_r1 : kexue_jax.nn.linear_attention (elu+1 features, non-causal), head size d
  linear_r4 : the same with head size 4d (q, k, v, o projections 4x wider)
  ffn       : the FFN sub-layer alone (for the self-attention vs FFN crossover)

Prints one JSON line per n, then a summary JSON (last line); writes results JSON and a PNG to --out-dir.

    python benchmarks/linear_attention_crossover.py [--ns 128 256 ... 16384] [--budget-s 3] [--max-score-gib 6]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kexue_jax import flops
from kexue_jax.nn.linear_attention import linear_attention

H, D_HEAD, D_MODEL, D_FF = 12, 64, 768, 3072
VARIANTS = {"softmax": ("attention", 1), "linear_r1": ("linear", 1), "linear_r4": ("linear", 4)}


def layer_norm(x, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps)


def init_params(key, head_dim):
    ks = jax.random.split(key, 6)
    w = lambda k, shape: 0.02 * jax.random.normal(k, shape, jnp.float32)
    return {"q": w(ks[0], (D_MODEL, H, head_dim)), "k": w(ks[1], (D_MODEL, H, head_dim)),
            "v": w(ks[2], (D_MODEL, H, head_dim)), "o": w(ks[3], (H, head_dim, D_MODEL)),
            "wi": w(ks[4], (D_MODEL, D_FF)), "wo": w(ks[5], (D_FF, D_MODEL))}


def softmax_mix(q, k, v):
    s = jnp.einsum("blhe,bmhe->bhlm", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhlm,bmhe->blhe", jax.nn.softmax(s, axis=-1), v)


def attention_sublayer(p, x, mixer):
    q, k, v = (jnp.einsum("bld,dhe->blhe", x, p[n]) for n in "qkv")
    o = softmax_mix(q, k, v) if mixer == "attention" else linear_attention(q, k, v)
    return layer_norm(x + jnp.einsum("blhe,hed->bld", o, p["o"]))


def ffn_sublayer(p, x):
    return layer_norm(x + jax.nn.gelu(x @ p["wi"]) @ p["wo"])


def make_layer(mixer):
    return jax.jit(lambda p, x: ffn_sublayer(p, attention_sublayer(p, x, mixer)))


def time_fn(fn, args, budget_s, max_reps=5):
    """Compile + warm-up call, then repeat until budget_s is spent (>= 1, <= max_reps timed calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    while len(times) < max_reps and (not times or sum(times) < budget_s):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"min_ms": 1e3 * min(times), "median_ms": 1e3 * statistics.median(times), "reps": len(times),
            "first_call_s": first}


def crossover(ns, slow, fast):
    """First n where fast < slow, log-log interpolated between grid points; None if it never happens on the grid."""
    pts = [(n, a, b) for n, a, b in zip(ns, slow, fast) if a is not None and b is not None]
    if not pts:
        return None
    if pts[0][2] < pts[0][1]:
        return {"n": pts[0][0], "at_grid_start": True}
    for (n0, a0, b0), (n1, a1, b1) in zip(pts, pts[1:]):
        if b1 < a1:  # b0 >= a0 here: the log time ratio crosses 0 between n0 and n1
            r0, r1 = math.log(b0 / a0), math.log(b1 / a1)
            t = r0 / (r0 - r1)
            return {"n": float(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))), "bracket": [n0, n1]}
    return None


def run(ns, budget_s, max_score_gib, out_dir, seed=0):
    key = jax.random.PRNGKey(seed)
    params = {name: init_params(key, D_HEAD * r) for name, (_, r) in VARIANTS.items()}
    layers = {name: make_layer(mixer) for name, (mixer, _) in VARIANTS.items()}
    ffn = jax.jit(ffn_sublayer)
    rows = []
    for n in ns:
        x = jax.random.normal(jax.random.fold_in(key, n), (1, n, D_MODEL), jnp.float32)
        row = {"n": n}
        score_gib = H * n * n * 4 / 2**30
        for name, (mixer, r) in VARIANTS.items():
            mults = flops.layer_mults(n, d_model=D_MODEL, num_heads=H, head_dim=D_HEAD, d_ff=D_FF,
                                      token_mixer=mixer, linear_head_multiplier=r)["total"]
            row[f"{name}_mults"] = mults
            if mixer == "attention" and score_gib > max_score_gib:
                row[f"{name}_ms"] = None
                row[f"{name}_skipped"] = f"score matrix {score_gib:.1f} GiB > {max_score_gib} GiB"
                continue
            t = time_fn(layers[name], (params[name], x), budget_s)
            row[f"{name}_ms"] = t["min_ms"]
            row[f"{name}_median_ms"] = t["median_ms"]
            row[f"{name}_reps"] = t["reps"]
            row[f"{name}_gflops_per_s"] = 2 * mults / (t["min_ms"] * 1e6)
        t = time_fn(ffn, (params["softmax"], x), budget_s)
        row["ffn_ms"] = t["min_ms"]
        row["ffn_mults"] = flops.ffn_mults(n, D_MODEL, D_FF)
        if row["softmax_ms"] is not None:
            row["sa_ms"] = row["softmax_ms"] - row["ffn_ms"]  # self-attention sub-layer = layer - FFN
            row["linear_r4_over_softmax"] = row["linear_r4_ms"] / row["softmax_ms"]
            row["linear_r1_over_softmax"] = row["linear_r1_ms"] / row["softmax_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)

    col = lambda k: [r.get(k) for r in rows]
    predicted = {
        "sa_exceeds_ffn": flops.sa_exceeds_ffn_length(H, D_HEAD),
        "quadratic_dominates": flops.quadratic_dominates_length(H, D_HEAD),
        "linear_r4_mixing_breakeven": flops.linear_breakeven_length(D_HEAD, 4),
        "linear_r1_layer_crossover": flops.linear_layer_crossover_length(H, D_HEAD, 1),
        "linear_r4_layer_crossover": flops.linear_layer_crossover_length(H, D_HEAD, 4),
    }
    measured = {
        "sa_exceeds_ffn": crossover(ns, col("sa_ms"), col("ffn_ms")),  # FFN cheaper than SA
        "linear_r1_layer_crossover": crossover(ns, col("softmax_ms"), col("linear_r1_ms")),
        "linear_r4_layer_crossover": crossover(ns, col("softmax_ms"), col("linear_r4_ms")),
    }
    summary = {
        "benchmark": "linear_attention_crossover", "post": "kexue.fm/archives/8610",
        "width": {"num_heads": H, "head_dim": D_HEAD, "d_model": D_MODEL, "d_ff": D_FF, "batch": 1,
                  "dtype": "float32"},
        "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "jax": jax.__version__, "budget_s": budget_s, "max_score_gib": max_score_gib,
        "skipped": {r["n"]: r["softmax_skipped"] for r in rows if "softmax_skipped" in r},
        "predicted": predicted, "measured": measured,
        "note": "None = no crossover inside the measured grid; crossover n log-log interpolated between grid points",
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "linear_attention_crossover.json"), "w") as f:
        json.dump({"rows": rows, "summary": summary}, f, indent=1)
    plot(rows, predicted, os.path.join(out_dir, "linear_attention_crossover.png"))
    print(json.dumps(summary), flush=True)
    return rows, summary


def plot(rows, predicted, path):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ns = [r["n"] for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in [("softmax_ms", "softmax layer"), ("linear_r1_ms", "linear layer, head d"),
                       ("linear_r4_ms", "linear layer, head 4d"), ("ffn_ms", "FFN sub-layer alone")]:
        pts = [(n, r[key]) for n, r in zip(ns, rows) if r.get(key) is not None]
        ax.loglog(*zip(*pts), "o-", label=label)
    for key, style in [("sa_exceeds_ffn", ":"), ("quadratic_dominates", "--"), ("linear_r4_layer_crossover", "-.")]:
        ax.axvline(predicted[key], color="gray", ls=style, lw=1, label=f"predicted {key} = {predicted[key]:.0f}")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("forward time per layer (ms, min)")
    ax.set_title("BERT-base layer on CPU (h=12, d=64, batch 1)")
    ax.legend(fontsize=7)
    for key, label in [("softmax_mults", "softmax"), ("linear_r1_mults", "linear, head d"),
                       ("linear_r4_mults", "linear, head 4d")]:
        ms = key.replace("_mults", "_ms")
        pts = [(n, r[ms] / r[key] * 1e9) for n, r in zip(ns, rows) if r.get(ms) is not None]
        ax2.semilogx(*zip(*pts), "o-", label=label)
    ax2.set_xlabel("sequence length n")
    ax2.set_ylabel("ms per 1e9 multiplications")
    ax2.set_title("time / analytic multiplication count")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--budget-s", type=float, default=3.0, help="timing budget per point (s) after warm-up")
    parser.add_argument("--max-score-gib", type=float, default=6.0, help="skip softmax when h n^2 fp32 exceeds this")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if any(n < 1 for n in args.ns) or args.budget_s <= 0 or args.max_score_gib <= 0:
        parser.error("--ns must be positive integers; --budget-s and --max-score-gib must be > 0")
    run(sorted(args.ns), args.budget_s, args.max_score_gib, args.out_dir)


if __name__ == "__main__":
    main()
