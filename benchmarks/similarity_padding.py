"""Padded tokens per epoch of the STS-B fine-tune, batches grouped by length or not
(``kexue_jax.experiments.similarity.epoch_rows``, ``data.group_by_length``; kexue.fm/archives/8541).

A training step encodes 2B sentences padded to ``hf.bucket_length`` of the batch's longest (16, 32 or 64
tokens), so its cost is proportional to 2B x width, not to the real tokens. Plain shuffling puts one long
sentence in almost every batch (the longest of 64 random STS-B sentences averages ~39 tokens -> width 64);
grouping sorts chunks of ``group`` batches by length first. This counts, for one epoch of each mode, the
padded tokens the encoder runs on and the real ones; the ratio is the expected speed-up of the training
steps (the encoder's FLOPs are linear in the padded tokens at these widths). No timing: the count is exact
and independent of how busy the machine is. ``--time N`` also times N training steps of each mode,
interleaved (one compilation per width first), and prints the measured ratio.

    python benchmarks/similarity_padding.py [--batch 32] [--max-len 64] [--time 0]

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for configs/


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--time", type=int, default=0, help="also time this many steps of each mode")
    a = ap.parse_args()

    from configs import similarity as sim_configs
    from kexue_jax import hf
    from kexue_jax.experiments import similarity as S

    config = sim_configs.get_config("default")
    config.data.update(batch_size=a.batch, max_len=a.max_len)
    tok = hf.load_tokenizer(hf.minilm_path())
    train = S.load_sts("train")
    data = S.encode_train(tok, train, config.sim, a.max_len)
    lengths = S.pair_lengths(data)
    real = sum(len(x) + len(y) for x, y in zip(data.ids_a, data.ids_b))
    steps = len(train) // a.batch
    out = {"batch": a.batch, "max_len": a.max_len, "steps_per_epoch": steps,
           "real_tokens": int(real * steps * a.batch / len(train))}
    modes = {"plain": None, "grouped": lengths}
    for name, lens in modes.items():
        widths = [hf.bucket_length(int(lengths[S.epoch_rows(len(train), a.batch, t, 0, lens, a.group)].max()),
                                   a.max_len) for t in range(steps)]
        out[f"{name}_padded_tokens"] = int(2 * a.batch * sum(widths))
        out[f"{name}_widths"] = {str(w): widths.count(w) for w in sorted(set(widths))}
    out["padded_ratio_plain_over_grouped"] = round(out["plain_padded_tokens"] / out["grouped_padded_tokens"], 3)

    if a.time:
        import jax
        import jax.numpy as jnp

        from kexue_jax import training

        cfg, params, _ = S.load_encoder(config)
        sim = config.sim
        tx, loss_fn = S.optimizer_and_loss(cfg, ("cosent", tuple(sim.parts), float(sim.cosent_scale),
                                                 float(sim.mnrl_scale)),
                                           tuple(sorted(config.optim.items())), steps, False, float(sim.head_lr_mult))
        step = jax.jit(training.make_step(loss_fn, tx), donate_argnums=0)  # the training loop's step
        params = {"encoder": jax.tree_util.tree_map(jnp.asarray, params)}
        state = training.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
        key = jax.random.PRNGKey(0)
        batches = {name: [S.pair_batch(data, S.epoch_rows(len(train), a.batch, t, 0, lens, a.group), a.max_len, True)
                          for t in range(a.time)] for name, lens in modes.items()}
        for w in {b["ids"].shape[1] for bs in batches.values() for b in bs}:  # compile every width once
            b = next(b for bs in batches.values() for b in bs if b["ids"].shape[1] == w)
            state, metrics = step(state, b, key)
        jax.block_until_ready(metrics)
        seconds = {name: 0.0 for name in modes}
        for t in range(a.time):
            for name in modes:
                t0 = time.perf_counter()
                state, metrics = step(state, batches[name][t], key)
                jax.block_until_ready(metrics)
                seconds[name] += time.perf_counter() - t0
        out.update({f"{k}_seconds_per_step": round(v / a.time, 3) for k, v in seconds.items()})
        out["time_ratio_plain_over_grouped"] = round(seconds["plain"] / seconds["grouped"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
