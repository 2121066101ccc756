"""Cost of building a UniLM mask vs one attention forward (masks of kexue.fm/archives/6933, 8475).

The mask algebra of ``kexue_jax.nn.masks`` is broadcast comparisons of per-position vectors (c = cumsum(s),
allowed(i, j) = c_j <= c_i), i.e. O(B L^2) boolean work, against the O(B H L^2 d) flops of attention.
Measured, jitted, interleaved in one run:

  mask_ms         ``masks.unilm(segment_ids)``: a materialised bool [B, 1, L, L] mask
  attention_ms    ``dot_product_attention(q, k, v, mask=...)`` with the mask given as an input
  fused_ms        mask building + attention in one jitted function (XLA fuses the comparison into the
                  select, so the mask is never materialised): fused_ms - attention_ms is the in-model cost

Default size: batch 16, length 2048, 4 heads x head_dim 64, fp32 (goal: mask_ms <= 5% of attention_ms).

    python benchmarks/mask_cost.py [--batch 16] [--length 2048] [--heads 4] [--head-dim 64] [--reps 5]

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kexue_jax.nn import attention, masks


def timed(fn, *args, reps):
    """Median wall time of ``fn(*args)`` in ms over ``reps`` calls, after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    for name in ("batch", "length", "heads", "head_dim", "reps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    b, n, h, d = args.batch, args.length, args.heads, args.head_dim

    rng = np.random.default_rng(0)
    split = rng.integers(n // 4, 3 * n // 4, size=(b, 1))  # source | target boundary per row
    seg = jnp.asarray(np.arange(n)[None, :] >= split, jnp.int32)
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d), np.float32)) for _ in range(3))
    scale = 1.0 / np.sqrt(d)

    build = jax.jit(masks.unilm)
    attend = jax.jit(lambda q, k, v, m: attention.dot_product_attention(q, k, v, mask=m, scale=scale)[0])
    fused = jax.jit(lambda q, k, v, s: attention.dot_product_attention(q, k, v, mask=masks.unilm(s),
                                                                       scale=scale)[0])
    mask = build(seg)
    assert mask.shape == (b, 1, n, n) and mask.dtype == jnp.bool_

    t_mask, t_attn, t_fused = [], [], []
    for _ in range(args.reps):  # interleaved, so load changes hit all three alike
        t_mask += timed(build, seg, reps=1)
        t_attn += timed(attend, q, k, v, mask, reps=1)
        t_fused += timed(fused, q, k, v, seg, reps=1)
    mask_ms, attn_ms, fused_ms = (statistics.median(t) for t in (t_mask, t_attn, t_fused))
    result = {
        "benchmark": "mask_cost",
        "mask_ms": round(mask_ms, 2),
        "attention_ms": round(attn_ms, 2),
        "ratio": round(mask_ms / attn_ms, 4),
        "goal_ratio_max": 0.05,
        "fused_ms": round(fused_ms, 2),
        "fused_overhead_ratio": round((fused_ms - attn_ms) / attn_ms, 4),
        "mask": "unilm", "batch": b, "length": n, "heads": h, "head_dim": d, "dtype": "float32",
        "attention_path": "einsum" if jax.default_backend() != "gpu" else "jax.nn.dot_product_attention",
        "reps": args.reps, "jax": jax.__version__, "backend": jax.default_backend(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
