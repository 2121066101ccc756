"""Training-step throughput of the "gpt" preset vs a plain flax.linen GPT of the same shapes.

Both models: Pre-LN GPT, d_model 256, 4 layers, 4 heads x head_dim 64, d_ff 1024, seq 256, batch 16, vocab 260,
fp32, learned positions, exact-erf GELU, biases, tied embeddings, causal mask (kexue.fm/archives/8620 for the
wiring). The reference is built on ``flax.linen.MultiHeadDotProductAttention``. Both train with optax.adamw
in a jitted step with donated state; the timed repetitions of the two alternate in one run (A B B A ...), so
machine load affects both alike. The figure of merit is ``ratio`` = median tokens/s of ours / of the
reference (goal >= 1); ``ratio_median_of_pairs`` (adjacent repetitions) and ``ratio_best`` (best repetition
of each, the least disturbed by other processes) are printed as robustness checks.

MFU = training FLOPs (``kexue_jax.flops.training_flops``: 6 x matmul multiply-adds, full n^2 attention) per
second over this machine's fp32 matmul peak, measured here with a jitted 2048^3 matmul.

    python benchmarks/train_throughput.py [--trainer] [--reps 16] [--steps 1]

``--trainer`` times our model through ``kexue_jax.training.make_train_step`` (the real trainer step: f32
summed cross-entropy / count, alpha schedule, metrics) instead of the local step. The last line printed is
one JSON object.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kexue_jax import flops
from kexue_jax.nn import Transformer, TransformerConfig

SHAPES = dict(vocab_size=260, num_layers=4, d_model=256, num_heads=4, head_dim=64, d_ff=1024, max_len=256)
BATCH, SEQ = 16, 256


class RefBlock(nn.Module):
    """Pre-LN GPT block on nn.MultiHeadDotProductAttention."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.cfg
        init = nn.initializers.normal(0.02)
        h = nn.LayerNorm(epsilon=c.norm_eps)(x)
        h = nn.MultiHeadDotProductAttention(num_heads=c.num_heads, qkv_features=c.num_heads * c.head_dim,
                                            out_features=c.d_model, kernel_init=init, deterministic=True)(h, h,
                                                                                                          mask=mask)
        x = x + h
        h = nn.LayerNorm(epsilon=c.norm_eps)(x)
        h = nn.Dense(c.d_ff, kernel_init=init)(h)
        h = nn.gelu(h, approximate=False)
        return x + nn.Dense(c.d_model, kernel_init=init)(h)


class RefGPT(nn.Module):
    """Token + learned position embeddings, Pre-LN blocks, final LayerNorm, tied output embedding."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.cfg
        embed = nn.Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(0.02))
        pos = self.param("position", nn.initializers.normal(0.02), (c.max_len, c.d_model))
        x = embed(tokens) + pos[None, : tokens.shape[1]]
        mask = nn.make_causal_mask(tokens)
        for i in range(c.num_layers):
            x = RefBlock(c, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(epsilon=c.norm_eps)(x)
        return embed.attend(x)


def cross_entropy(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def local_step(apply_fn, tx):
    """(params, opt_state), batch -> (params, opt_state), loss; jitted with the state donated."""
    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(apply_fn(p, batch["inputs"]), batch["targets"]))(
            params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0)


def build(name, cfg, tx, use_trainer):
    """(step, state) for 'ours' or 'reference'."""
    tokens = jnp.zeros((BATCH, SEQ), jnp.int32)
    if name == "reference":
        model = RefGPT(cfg)
        params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
        step = local_step(lambda p, t: model.apply({"params": p}, t), tx)
        return step, (params, tx.init(params))
    model = Transformer(cfg)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    if use_trainer:
        from kexue_jax import training  # noqa: PLC0415 (optional: the trainer module of another issue)

        state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        return jax.jit(training.make_train_step(model, tx), donate_argnums=0), state
    step = local_step(lambda p, t: model.apply({"params": p}, t), tx)
    return step, (params, tx.init(params))


def measure_peak_flops(n=2048, reps=5):
    """fp32 matmul FLOP/s of this machine: best of ``reps`` jitted n^3 matmuls."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trainer", action="store_true", help="time ours through kexue_jax.training.make_train_step")
    ap.add_argument("--reps", type=int, default=16, help="timed repetitions per model (interleaved)")
    ap.add_argument("--steps", type=int, default=1, help="training steps per repetition")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.steps < 1:
        raise ValueError(f"--reps and --steps must be >= 1, got {args.reps}, {args.steps}")

    cfg = TransformerConfig.preset("gpt", **SHAPES)
    tx = optax.adamw(1e-3, weight_decay=0.01)
    rng = np.random.default_rng(0)
    data = rng.integers(0, cfg.vocab_size, (BATCH, SEQ + 1))
    batch = {"inputs": jnp.asarray(data[:, :-1], jnp.int32), "targets": jnp.asarray(data[:, 1:], jnp.int32)}

    names = ("ours", "reference")
    runs = {n: build(n, cfg, tx, args.trainer) for n in names}
    n_params = {n: int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(
        runs[n][1].params if args.trainer and n == "ours" else runs[n][1][0]))) for n in names}
    state = {}
    for n in names:  # compile + one warm-up step
        step, st = runs[n]
        t = time.perf_counter()
        st, out = step(st, batch)
        jax.block_until_ready(out)
        state[n] = st
        print(json.dumps({"compile_and_first_step_s": round(time.perf_counter() - t, 2), "model": n}), flush=True)

    peak = measure_peak_flops()
    times = {n: [] for n in names}
    for r in range(args.reps):  # A B B A A B ...: each model one "steps"-long block per repetition
        for n in (names if r % 2 == 0 else names[::-1]):
            step = runs[n][0]
            st = state[n]
            t = time.perf_counter()
            for _ in range(args.steps):
                st, out = step(st, batch)
            jax.block_until_ready((st, out))
            times[n].append((time.perf_counter() - t) / args.steps)
            state[n] = st
    rates = {n: [BATCH * SEQ / t for t in times[n]] for n in names}
    for n in names:
        print(json.dumps({"model": n, "tokens_per_s_per_rep": [round(x, 1) for x in rates[n]]}), flush=True)

    train_flops_per_token = flops.training_flops(cfg, SEQ, BATCH) / (BATCH * SEQ)
    ours, ref = statistics.median(rates["ours"]), statistics.median(rates["reference"])
    pair_ratios = [a / b for a, b in zip(rates["ours"], rates["reference"])]
    result = {
        "benchmark": "train_throughput",
        "tokens_per_s": round(ours, 1),
        "reference_tokens_per_s": round(ref, 1),
        "ratio": round(ours / ref, 3),
        "ratio_median_of_pairs": round(statistics.median(pair_ratios), 3),
        "ratio_best": round(max(rates["ours"]) / max(rates["reference"]), 3),
        "best_tokens_per_s": round(max(rates["ours"]), 1),
        "reference_best_tokens_per_s": round(max(rates["reference"]), 1),
        "mfu": round(ours * train_flops_per_token / peak, 4),
        "reference_mfu": round(ref * train_flops_per_token / peak, 4),
        "peak_fp32_matmul_gflops": round(peak / 1e9, 2),
        "train_gflop_per_step": round(train_flops_per_token * BATCH * SEQ / 1e9, 2),
        "params": n_params,
        "ours_step": "kexue_jax.training.make_train_step" if args.trainer else "local jitted step",
        "shapes": dict(SHAPES, batch=BATCH, seq=SEQ, dtype="float32", preset="gpt"),
        "reps": args.reps, "steps_per_rep": args.steps,
        "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
