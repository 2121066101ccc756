"""How large must a head be? Fit softmax(Q K^T) to random attention matrices while sweeping the head size d.

Beyond the posts: a check of the attention reading of the dimension formula (kexue.fm/archives/8706, 8711),
which says a row a_ij = e^{<q_i,k_j>} / sum_j e^{<q_i,k_j>} over L keys "fits" in d > 8.33 ln L dimensions
(52 for L = 512).  For each length L and head size d, free parameters Q, K in R^{L x d} are fitted with Adam to a
random row-stochastic target P = softmax(G / temperature), G ~ N(0, 1)^{L x L}, minimising the mean row KL

    KL(P || A) = (1/L) sum_i sum_j P_ij (ln P_ij - ln A_ij),      A = softmax_rows(logits(Q, K)).

Two parameterisations of the logits:
  "sphere": q_i = sqrt(d) Q_i / |Q_i|, k_j likewise, logits = <q_i, k_j>   (post 7695's assumption: |q| = sqrt(d),
            coordinates of size ~1, so logits are bounded by d -- the case the entropy argument is about);
  "free":   logits = Q K^T / sqrt(d), unconstrained (any target is reachable for d >= L - 1).
The fit is reported as the explained fraction R(d) = 1 - KL(d) / KL(P || uniform), and d_90 / d_99, the smallest
head size with R >= 0.90 / 0.99 (log-interpolated on the d grid), are compared with 8.33 ln L.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

from kexue_jax import dims, reporting
from kexue_jax.streams import stream_key

NORMS = ("sphere", "free")


def random_attention_target(key, length: int, temperature: float):
    """A random row-stochastic L x L matrix softmax(G / temperature), G ~ N(0, 1); small temperature = sharp rows."""
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an integer >= 2, got {length!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return jax.nn.softmax(jax.random.normal(key, (length, length), jnp.float32) / temperature, axis=-1)


def attention_logits(q, k, norm: str = "sphere"):
    """Logits of a single head: <q_i, k_j> with |q_i| = |k_j| = sqrt(d) ("sphere"), or Q K^T / sqrt(d) ("free")."""
    d = q.shape[-1]
    if norm == "sphere":
        unit = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True))
        return d * unit(q) @ unit(k).T
    if norm == "free":
        return q @ k.T / math.sqrt(d)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def row_kl(target, logits):
    """Mean over rows of KL(target_i || softmax(logits_i)) (0 ln 0 = 0)."""
    log_a = jax.nn.log_softmax(logits, axis=-1)
    log_p = jnp.log(jnp.where(target > 0, target, 1.0))
    return jnp.mean(jnp.sum(target * (log_p - log_a), axis=-1))


def kl_to_uniform(target):
    """KL(P || uniform) = ln L - H(P_i), averaged over rows: the KL of a model with no head at all (d = 0)."""
    return row_kl(target, jnp.zeros_like(target))


def fit_attention(target, head_dim: int, *, key, steps: int = 1000, learning_rate: float = 0.05,
                  norm: str = "sphere"):
    """Fit softmax(logits(Q, K)) to `target` [L, L] with Q, K in R^{L x head_dim}; returns the final row KL.

    Adam with a cosine-decayed learning rate, the whole loop one `lax.scan` (jitted, deterministic given key).
    """
    length = target.shape[0]
    if target.ndim != 2 or target.shape[1] != length:
        raise ValueError(f"target must be a square [L, L] matrix, got shape {target.shape}")
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    return float(_fit(target, key, head_dim, steps, float(learning_rate), norm))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _fit(target, key, head_dim, steps, learning_rate, norm):
    length = target.shape[0]
    kq, kk = jax.random.split(key)
    params = {"q": jax.random.normal(kq, (length, head_dim)), "k": jax.random.normal(kk, (length, head_dim))}
    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.01))
    loss = lambda p: row_kl(target, attention_logits(p["q"], p["k"], norm))

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        updates, s = opt.update(g, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return loss(params)


def head_dim_grid(length: int, ratio: float = math.sqrt(2.0), coarse_above: int = 64) -> list[int]:
    """Head sizes 1, 2, 3, 4, 6, 8, 11, 16, ... (ratio sqrt 2), doubling above `coarse_above`, up to the length L.

    d >= L - 1 fits any target exactly, so the grid ends at L; the coarser steps above 64 keep the sweep cheap.
    """
    out, x = [], 1.0
    while round(x) <= length:
        if round(x) not in out:
            out.append(int(round(x)))
        x = x * (2.0 if round(x) >= coarse_above else ratio)
    return out if out[-1] == length else out + [length]


def saturation_dim(head_dims, explained, level: float):
    """Smallest d with explained fraction >= level, log-interpolated between grid points (None if never reached)."""
    pts = list(zip(head_dims, explained))
    if pts[0][1] >= level:
        return float(pts[0][0])
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if r1 >= level > r0:
            t = (level - r0) / (r1 - r0)
            return float(math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0))))
    return None


def sweep(lengths=(16, 64, 256, 512), temperatures=(1.0, 0.1), norms=("sphere", "free"), *, steps: int = 800,
          learning_rate: float = 0.05, seed: int = 0, max_head_dim: int | None = None, log=print) -> dict:
    """Run the fits for every (L, temperature, norm, d) and summarise d_90 / d_99 against 8.33 ln L."""
    key = jax.random.PRNGKey(seed)
    curves = []
    for length in lengths:
        for temperature in temperatures:
            target = random_attention_target(jax.random.fold_in(key, length), length, temperature)
            base = float(kl_to_uniform(target))
            for norm in norms:
                t0 = time.perf_counter()
                ds = [d for d in head_dim_grid(length) if max_head_dim is None or d <= max_head_dim]
                kls = [fit_attention(target, d, key=stream_key(key, "fit", d), steps=steps,
                                     learning_rate=learning_rate, norm=norm) for d in ds]
                explained = [1.0 - kl / base for kl in kls]
                curve = {"length": length, "temperature": temperature, "norm": norm, "kl_uniform": base,
                         "head_dims": ds, "kl": kls, "explained": explained,
                         "d_90": saturation_dim(ds, explained, 0.90), "d_99": saturation_dim(ds, explained, 0.99),
                         "formula_8_33_ln_L": dims.dimension_bound(length),
                         "seconds": time.perf_counter() - t0}
                log(json.dumps({k: curve[k] for k in ("length", "temperature", "norm", "kl_uniform", "d_90", "d_99",
                                                        "formula_8_33_ln_L", "seconds")}))
                curves.append(curve)
    return {"experiment": "attention_rank", "posts": ["kexue.fm/archives/8706", "kexue.fm/archives/8711"],
            "steps": steps, "learning_rate": learning_rate, "seed": seed, "curves": curves}


def plot(result: dict, path: str) -> bool:
    """Explained fraction against head size, one panel per (norm, temperature). False without matplotlib."""
    panels = sorted({(c["norm"], c["temperature"]) for c in result["curves"]})
    fig = reporting.figure(figsize=(4.2 * len(panels), 3.8))
    if fig is None:
        return False
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (norm, temp) in zip(axes[0], panels):
        for i, c in enumerate(x for x in result["curves"] if (x["norm"], x["temperature"]) == (norm, temp)):
            line, = ax.semilogx(c["head_dims"], c["explained"], "o-", ms=3, label=f"L={c['length']}")
            ax.axvline(c["formula_8_33_ln_L"], color=line.get_color(), ls=":", lw=1)
        ax.set_ylim(-0.05, 1.02)
        ax.set_xlabel("head size d")
        ax.set_title(f"{norm}, temperature {temp}", fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("explained 1 - KL(d) / KL(uniform)")
    fig.suptitle("fit of softmax(QK^T) to random attention; dotted: 8.33 ln L", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kexue_jax.experiments.attention_rank",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="runs/attention_rank")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 512])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--max-head-dim", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if any(n < 2 for n in args.lengths) or any(t <= 0 for t in args.temperatures) or args.steps < 1:
        parser.error("--lengths must be >= 2, --temperatures > 0, --steps >= 1")
    t0 = time.perf_counter()
    result = sweep(args.lengths, args.temperatures, args.norms, steps=args.steps,
                   learning_rate=args.learning_rate, seed=args.seed, max_head_dim=args.max_head_dim)
    result["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out_dir, exist_ok=True)
    reporting.write_json_atomic(os.path.join(args.out_dir, "attention_rank.json"), result, indent=1)
    plot(result, os.path.join(args.out_dir, "attention_rank.png"))
    summary = {"summary": [{k: c[k] for k in ("length", "temperature", "norm", "d_90", "d_99", "formula_8_33_ln_L")}
                           for c in result["curves"]], "seconds": result["seconds"], "out_dir": args.out_dir}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
