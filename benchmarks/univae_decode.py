"""UniVAE greedy decoding with and without the KV cache (kexue.fm/archives/8475; ``kexue_jax.univae.decode``).

  cached     ``decode(..., cached=True)``: slot 0 (the source [CLS], from z) is prefilled once, then one token per
             step against the cached keys/values of every layer: O(T) work per step;
  uncached   ``decode(..., cached=False)``: every step reruns the Transformer on the whole fixed-shape buffer
             [CLS] + T target slots (the jittable no-cache decoder; causal masks make the unwritten slots
             inert): O(T^2) per step. A no-cache decoder that grows the buffer step by step does about half
             this work (sum_t t = T^2 / 2) but compiles T shapes.

Both run the same model (the ``configs/univae.py:default`` Transformer, random weights: speed does not
depend on them), jitted, decode ``--length`` steps for ``--batch`` rows (``decode`` always runs max_len
steps; a row that emitted [SEP] keeps emitting PAD, so the cost is that of the full length), and produce
the same tokens (checked here). Goal: ratio >= 5x.

    python benchmarks/univae_decode.py [--length 64] [--batch 32] [--reps 3]

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from kexue_jax import univae as U
from kexue_jax.nn import TransformerConfig


def timed(fn, *args, reps: int) -> float:
    """Median wall seconds of fn(*args) over ``reps`` calls after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--d-model", type=int, default=128)
    a = ap.parse_args(argv)
    s = a.length + 1
    model = TransformerConfig.preset("gpt", num_layers=a.layers, d_model=a.d_model, num_heads=4,
                                     head_dim=a.d_model // 4, d_ff=4 * a.d_model, max_len=2 * s, type_vocab_size=2)
    cfg = U.UniVAEConfig(model=model, n_latent=3, z_dim=16, src_len=s)
    params = jax.jit(U.init, static_argnums=1)(jax.random.PRNGKey(0), cfg)
    z = U.sample_prior(jax.random.PRNGKey(1), cfg, a.batch)
    fns = {name: jax.jit(lambda z, c=cached: U.decode(params, cfg, z, method="greedy", max_len=a.length, cached=c))
           for name, cached in (("cached", True), ("uncached", False))}
    out_c, out_u = (np.asarray(fns[n](z)) for n in ("cached", "uncached"))
    if not np.array_equal(out_c, out_u):
        raise AssertionError("cached and uncached greedy decoding disagree")
    secs = {n: timed(f, z, reps=a.reps) for n, f in fns.items()}
    tokens = a.batch * a.length
    res = {"benchmark": "univae_decode", "length": a.length, "batch": a.batch, "layers": a.layers,
           "d_model": a.d_model, "backend": jax.default_backend(),
           "cached_tokens_per_s": tokens / secs["cached"], "uncached_tokens_per_s": tokens / secs["uncached"],
           "cached_s": secs["cached"], "uncached_s": secs["uncached"],
           "ratio": secs["uncached"] / secs["cached"], "same_tokens": True}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
