"""Time one BERT-base layer with softmax vs linear attention as the length grows (kexue.fm/archives/8610).

Post 8610 counts multiplications: a layer costs 12 n (hd)^2 + 2 n^2 hd, so self-attention outweighs the FFN only
for n > 2hd = 1536 and the n^2 term dominates only for n > 6hd = 4608; linear attention with a 4x head breaks
even with softmax attention (mixing only) at n > 16 d = 1024, and over the whole layer (its projections are 4x
wider too) at n > 2 (r-1) D + r^2 d = 5632 [derived].  This script measures where the crossovers happen in time.

Layers (jnp, jitted, forward, batch 1, fp32, Post-LN BERT wiring, h = 12, d = 64, D = 768, F = 3072):
  softmax   : explicit softmax(Q K^T / sqrt(d)) V (the h x n x n score matrix is materialised)
  linear_r1 : kexue_jax.nn.linear_attention (elu+1 features, non-causal), head size d
  linear_r4 : the same with head size 4d (q, k, v, o projections 4x wider)
  ffn, sa    : the FFN and the softmax self-attention sub-layers alone (for the SA vs FFN crossover)

Prints one JSON line per n, then a summary JSON (last line); writes results JSON and a PNG to --out-dir.

    python benchmarks/linear_attention_crossover.py [--ns 128 256 ... 16384] [--budget-s 12] [--max-score-gib 6]
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

from kexue_jax import flops, reporting
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


def time_round_robin(fns, budget_s, max_rounds=7):
    """Compile + warm up every fn, then time them in rounds (one call each per round) until budget_s is spent.

    Interleaving keeps the comparison fair on a shared CPU: a slow spell hits all variants of a round alike.
    Records wall time and this process's CPU time (all threads; robust to other processes competing for the
    cores).  Returns {name: {"min_ms", "median_ms", "cpu_min_ms", "reps"}} (>= 1 timed call each).
    """
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    spent, rounds = 0.0, 0
    while rounds < max_rounds and (rounds == 0 or spent < budget_s):
        for name, (fn, args) in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
            spent += wall[name][-1]
        rounds += 1
    return {name: {"min_ms": 1e3 * min(wall[name]), "median_ms": 1e3 * statistics.median(wall[name]),
                   "cpu_min_ms": 1e3 * min(cpu[name]), "reps": len(wall[name])} for name in fns}


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
    sa = jax.jit(lambda p, x: attention_sublayer(p, x, "attention"))
    rows = []
    for n in ns:
        x = jax.random.normal(jax.random.fold_in(key, n), (1, n, D_MODEL), jnp.float32)
        row = {"n": n}
        score_gib = H * n * n * 4 / 2**30
        fns = {}
        for name, (mixer, r) in VARIANTS.items():
            row[f"{name}_mults"] = flops.layer_mults(n, d_model=D_MODEL, num_heads=H, head_dim=D_HEAD, d_ff=D_FF,
                                                     token_mixer=mixer, linear_head_multiplier=r)["total"]
            if mixer == "attention" and score_gib > max_score_gib:
                row[f"{name}_skipped"] = f"score matrix {score_gib:.1f} GiB > {max_score_gib} GiB"
                continue
            fns[name] = (layers[name], (params[name], x))
        fns["ffn"] = (ffn, (params["softmax"], x))
        row["ffn_mults"] = flops.ffn_mults(n, D_MODEL, D_FF)
        if "softmax" in fns:
            fns["sa"] = (sa, (params["softmax"], x))
            row["sa_mults"] = row["softmax_mults"] - row["ffn_mults"]
        timed = time_round_robin(fns, budget_s)
        for name in list(VARIANTS) + ["ffn", "sa"]:
            t = timed.get(name)
            row[f"{name}_ms"] = None if t is None else t["min_ms"]
            row[f"{name}_cpu_ms"] = None if t is None else t["cpu_min_ms"]
            if t is not None:
                row[f"{name}_median_ms"], row[f"{name}_reps"] = t["median_ms"], t["reps"]
                row[f"{name}_gflops_per_s"] = 2 * row[f"{name}_mults"] / (t["min_ms"] * 1e6)
        if row["softmax_ms"] is not None:
            for r in ("r1", "r4"):
                row[f"linear_{r}_over_softmax"] = row[f"linear_{r}_ms"] / row["softmax_ms"]
                row[f"linear_{r}_over_softmax_cpu"] = row[f"linear_{r}_cpu_ms"] / row["softmax_cpu_ms"]
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
    measured = {}
    for clock, suffix in (("wall", "_ms"), ("cpu", "_cpu_ms")):
        measured[clock] = {
            "sa_exceeds_ffn": crossover(ns, col("sa" + suffix), col("ffn" + suffix)),  # FFN cheaper than SA
            "linear_r1_layer_crossover": crossover(ns, col("softmax" + suffix), col("linear_r1" + suffix)),
            "linear_r4_layer_crossover": crossover(ns, col("softmax" + suffix), col("linear_r4" + suffix)),
        }
    summary = {
        "benchmark": "linear_attention_crossover", "post": "kexue.fm/archives/8610",
        "width": {"num_heads": H, "head_dim": D_HEAD, "d_model": D_MODEL, "d_ff": D_FF, "batch": 1,
                  "dtype": "float32"},
        "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "jax": jax.__version__, "budget_s": budget_s, "max_score_gib": max_score_gib,
        "skipped": {r["n"]: r["softmax_skipped"] for r in rows if "softmax_skipped" in r},
        "predicted": predicted, "measured": measured,
        "note": ("times are minima over interleaved rounds; 'cpu' = this process's CPU time (robust to other "
                 "processes on a shared machine); None = no crossover inside the grid; crossover n log-log "
                 "interpolated between grid points"),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "linear_attention_crossover.json"), "w") as f:
        json.dump({"rows": rows, "summary": summary}, f, indent=1)
    plot(rows, predicted, os.path.join(out_dir, "linear_attention_crossover.png"))
    print(json.dumps(summary), flush=True)
    return rows, summary


def plot(rows, predicted, path):
    fig = reporting.figure(figsize=(12, 4.5))
    if fig is None:
        return
    ns = [r["n"] for r in rows]
    ax, ax2 = fig.subplots(1, 2)
    for key, label in [("softmax_cpu_ms", "softmax layer"), ("linear_r1_cpu_ms", "linear layer, head d"),
                       ("linear_r4_cpu_ms", "linear layer, head 4d"), ("sa_cpu_ms", "softmax SA sub-layer alone"),
                       ("ffn_cpu_ms", "FFN sub-layer alone")]:
        pts = [(n, r[key]) for n, r in zip(ns, rows) if r.get(key) is not None]
        ax.loglog(*zip(*pts), "o-", label=label)
    for key, style in [("sa_exceeds_ffn", ":"), ("quadratic_dominates", "--"), ("linear_r4_layer_crossover", "-.")]:
        ax.axvline(predicted[key], color="gray", ls=style, lw=1, label=f"predicted {key} = {predicted[key]:.0f}")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("forward CPU time of this process (ms, min)")
    ax.set_title("BERT-base layer on CPU (h=12, d=64, batch 1)")
    ax.legend(fontsize=7)
    for key, label in [("softmax_mults", "softmax"), ("linear_r1_mults", "linear, head d"),
                       ("linear_r4_mults", "linear, head 4d")]:
        ms = key.replace("_mults", "_cpu_ms")
        pts = [(n, r[ms] / r[key] * 1e9) for n, r in zip(ns, rows) if r.get(ms) is not None]
        ax2.semilogx(*zip(*pts), "o-", label=label)
    ax2.set_xlabel("sequence length n")
    ax2.set_ylabel("CPU ms per 1e9 multiplications")
    ax2.set_title("time / analytic multiplication count")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--budget-s", type=float, default=12.0, help="timing budget per n (s) after warm-up")
    parser.add_argument("--max-score-gib", type=float, default=6.0, help="skip softmax when h n^2 fp32 exceeds this")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if any(n < 1 for n in args.ns) or args.budget_s <= 0 or args.max_score_gib <= 0:
        parser.error("--ns must be positive integers; --budget-s and --max-score-gib must be > 0")
    run(sorted(args.ns), args.budget_s, args.max_score_gib, args.out_dir)


if __name__ == "__main__":
    main()
