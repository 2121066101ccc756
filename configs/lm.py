"""Train one Transformer on the embedded Shakespeare corpus (byte level).

Variants (``--config=configs/lm.py:VARIANT``):
  tiny     a few seconds of CPU, for tests (validation loss still falls clearly);
  default  a meaningful 2-core CPU run (< 15 min): GPT preset, 4 x 128, 1500 steps of 16 x 128 bytes;
  bert     the same budget with the BERT preset and the MLM objective;
  pod      GPU/TPU size: 12 x 768 GPT, seq 1024, global batch 512, bf16 compute, FSDP over 4 (see WORKSPACE.md).
Any field can be overridden: ``--config.model.d_model=512 --config.train.steps=300``.
"""
from kexue_jax.config import base_config, model_section


def get_config(arg: str | None = None):
    variant = arg or "default"
    c = base_config("lm")
    if variant == "tiny":
        c.model = model_section("gpt", num_layers=2, d_model=64, num_heads=4, head_dim=16, d_ff=256, max_len=64)
        c.data.update(seq_len=64, batch_size=16)
        c.optim.update(lr=1e-2, warmup_steps=10)
        c.train.update(steps=60, log_every=10, eval_every=30, eval_batches=4, checkpoint_every=30)
    elif variant == "default":
        c.model = model_section("gpt", num_layers=4, d_model=128, num_heads=4, head_dim=32, d_ff=512, max_len=128)
        c.data.update(seq_len=128, batch_size=16)
        c.optim.update(lr=3e-3, warmup_steps=100)
        c.train.update(steps=1500, log_every=50, eval_every=250, eval_batches=16, checkpoint_every=500)
    elif variant == "bert":
        c.model = model_section("bert", num_layers=4, d_model=128, num_heads=4, head_dim=32, d_ff=512, max_len=128)
        c.data.update(seq_len=128, batch_size=16, objective="mlm")
        c.optim.update(lr=1e-3, warmup_steps=100)
        c.train.update(steps=1500, log_every=50, eval_every=250, eval_batches=16, checkpoint_every=500)
    elif variant == "pod":
        c.model = model_section("gpt", num_layers=12, d_model=768, num_heads=12, head_dim=64, d_ff=3072,
                                max_len=1024, dtype="bfloat16")
        c.data.update(seq_len=1024, batch_size=512)
        c.optim.update(lr=6e-4, warmup_steps=2000)
        c.train.update(steps=100_000, log_every=100, eval_every=2000, eval_batches=32, checkpoint_every=2000)
        c.parallel.update(fsdp=4)
    else:
        raise ValueError(f"configs/lm.py variant must be one of ('tiny', 'default', 'bert', 'pod'), got {variant!r}")
    return c
