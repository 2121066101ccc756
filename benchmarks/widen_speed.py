"""Time and memory of ``upscale.widen`` x2 on a BERT-base-sized parameter tree (about 110M parameters).

Compares, in one run, the jitted widen against a plain on-device copy of the OUTPUT tree (the least any
map producing that tree must do), and reads XLA's memory analysis of the compiled widen: peak = arguments
+ outputs + temporaries, against the bound input + output + the largest tensor. Prints JSON (last line).

    python benchmarks/widen_speed.py [--layers 12] [--repeats 5]
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kexue_jax import upscale
from kexue_jax.nn import Transformer, TransformerConfig


def nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def best_time(fn, arg, repeats):
    jax.block_until_ready(fn(arg))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--factor", type=int, default=2)
    args = ap.parse_args()
    cfg = TransformerConfig.preset("bert", vocab_size=30522, num_layers=args.layers, d_model=768, num_heads=12,
                                   head_dim=64, d_ff=3072, max_len=512)
    params = jax.jit(lambda k: Transformer(cfg).init(k, jnp.zeros((1, 8), jnp.int32))["params"])(
        jax.random.PRNGKey(0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    widen = jax.jit(lambda p: upscale.widen_params(p, cfg, args.factor))
    big = widen(params)
    copy = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x + 0, t))
    # interleave the two measurements so machine noise hits both alike
    t_widen, t_copy = [], []
    for _ in range(args.repeats):
        t_widen.append(best_time(widen, params, 1))
        t_copy.append(best_time(copy, big, 1))
    mem = widen.lower(params).compile().memory_analysis()
    largest = max(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(big))
    in_b, out_b = nbytes(params), nbytes(big)
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    result = {
        "benchmark": "widen_speed", "params": int(n_params), "big_params": int(sum(x.size for x in jax.tree_util.tree_leaves(big))),
        "factor": args.factor, "widen_s": min(t_widen), "copy_output_s": min(t_copy),
        "ratio_widen_over_copy": min(t_widen) / min(t_copy), "goal_ratio": 3.0,
        "input_bytes": in_b, "output_bytes": out_b, "largest_tensor_bytes": int(largest),
        "xla_argument_bytes": int(mem.argument_size_in_bytes), "xla_output_bytes": int(mem.output_size_in_bytes),
        "xla_temp_bytes": int(mem.temp_size_in_bytes), "peak_bytes": int(peak),
        "peak_bound_bytes": in_b + out_b + int(largest), "peak_within_bound": bool(peak <= in_b + out_b + largest),
        "backend": jax.default_backend(), "jax": jax.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
