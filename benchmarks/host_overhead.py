"""Host overhead of the real data pipeline: train-step time with per-step host batches (random crops of
the corpus, ``data.lm_batch`` + ``data.to_global``) against the same jitted step fed one fixed on-device
batch. Interleaved blocks in one run; prints JSON (last line) with the overhead (goal <= 5%).

    python benchmarks/host_overhead.py [--config-variant default] [--steps 20] [--blocks 3]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for configs/
from configs import lm as lm_config  # noqa: E402
from kexue_jax import data as data_lib  # noqa: E402
from kexue_jax import parallel, training  # noqa: E402
from kexue_jax.nn import Transformer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-variant", default="default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--blocks", type=int, default=3)
    args = ap.parse_args()
    c = lm_config.get_config(args.config_variant)
    model_cfg, mesh = training.prepare(c)
    corpus = training.load_corpus(c.data)
    model = Transformer(model_cfg)
    tx = training.make_optimizer(c.optim, c.train.steps)
    state = parallel.init_sharded(lambda k: training.init_state(model, tx, k, c.data.seq_len), mesh,
                                  jax.random.PRNGKey(0))
    step = jax.jit(training.make_train_step(model, tx), donate_argnums=0)
    bsh = parallel.batch_sharding(mesh)
    fixed = data_lib.to_global(training.host_batch(corpus, c.data, 0, 0), bsh)

    def run(state, real, start):
        t0 = time.perf_counter()
        for t in range(start, start + args.steps):
            batch = data_lib.to_global(training.host_batch(corpus, c.data, t, 0), bsh) if real else fixed
            state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
        return state, (time.perf_counter() - t0) / args.steps

    state, _ = run(state, True, 0)  # compile + warm up
    real_t, fixed_t = [], []
    for b in range(args.blocks):
        state, t = run(state, True, (2 * b + 1) * args.steps)
        real_t.append(t)
        state, t = run(state, False, 0)
        fixed_t.append(t)
    overhead = min(real_t) / min(fixed_t) - 1.0
    print(json.dumps({"benchmark": "host_overhead", "variant": args.config_variant,
                      "step_s_real_pipeline": min(real_t), "step_s_fixed_batch": min(fixed_t),
                      "overhead": overhead, "goal": 0.05, "batch": c.data.batch_size, "seq_len": c.data.seq_len,
                      "devices": jax.device_count(), "backend": jax.default_backend(), "jax": jax.__version__}))


if __name__ == "__main__":
    main()
