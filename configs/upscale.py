"""The main job: train a small model, widen it losslessly (kexue.fm/archives/8444), keep training the big
one, and compare with the big model trained from scratch on the same data in the same order.

Variants (``--config=configs/upscale.py:VARIANT``):
  default  the post's own case, a BERT-style model (embedding LayerNorm, segment embeddings, Post-LN, GELU FFN
           with biases, the MLM head: dense + GELU + LayerNorm + tied embedding + vocab bias, 1/sqrt(d)), so
           every rule and erratum of the post is exercised; 4 layers, d_model 64 -> 128 (x2, grow=head_dim),
           widened at step 1000 of 1500; < 15 min on 2 CPU cores. It is trained on next-byte prediction
           (mask causal): on a 2-core CPU budget the byte-level MLM objective does not get past the unigram
           entropy (~3.0 nats/byte) in 1500 steps (measured), so it could not show an effect;
  mlm      the same model on the MLM objective (bidirectional, 15% masking) for GPU-sized budgets;
  tiny     < 60 s, for tests (BERT-style, MLM);
  gpt      the GPT preset (Pre-LN, tied LM head) on next-byte prediction, same sizes as the default;
  pod      GPU/TPU size: 12-layer GPT 384 -> 768, seq 1024, global batch 256, bf16 (see WORKSPACE.md).
Ablations are overrides: ``--config.upscale.noise=1e-3``, ``--config.upscale.map_optimizer=False``,
``--config.upscale.grow=num_heads``, ``--config.upscale.factor=3``,
``--config.upscale.schedule=restart`` (re-warm the learning rate after widening: a fresh warmup + decay over
the big phase) and ``--config.upscale.big_steps=N`` (arm A's big phase length; default train.steps - widen_at).
"""
import ml_collections

from kexue_jax.config import base_config, model_section


def get_config(arg: str | None = None):
    variant = arg or "default"
    c = base_config("upscale")
    c.upscale = ml_collections.ConfigDict(dict(
        factor=2, grow="head_dim", widen_at=600, noise=0.0, map_optimizer=True, scale_updates=False,
        schedule="continue", big_steps=ml_collections.config_dict.placeholder(int), lossless_atol=1e-5,
        arms=("upscaled", "scratch")))
    if variant in ("default", "mlm", "gpt"):
        preset = "gpt" if variant == "gpt" else "bert"
        objective = "mlm" if variant == "mlm" else "lm"
        c.model = model_section(preset, num_layers=4, d_model=64, num_heads=4, head_dim=16, d_ff=256, max_len=128)
        if variant == "default":
            c.model.mask = "causal"
        c.data.update(seq_len=128, batch_size=16, objective=objective)
        c.optim.update(lr=3e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1)
        c.train.update(steps=1500, log_every=100, eval_every=100, eval_batches=8, checkpoint_every=500)
        c.upscale.widen_at = 1000
    elif variant == "tiny":
        c.model = model_section("bert", num_layers=2, d_model=32, num_heads=2, head_dim=16, d_ff=128, max_len=64)
        c.data.update(seq_len=64, batch_size=16, objective="mlm")
        c.optim.update(lr=3e-3, warmup_steps=5)
        c.train.update(steps=40, log_every=10, eval_every=10, eval_batches=2, checkpoint_every=20)
        c.upscale.widen_at = 25
    elif variant == "pod":
        c.model = model_section("gpt", num_layers=12, d_model=384, num_heads=6, head_dim=64, d_ff=1536,
                                max_len=1024, dtype="bfloat16")
        c.data.update(seq_len=1024, batch_size=256, objective="lm")
        c.optim.update(lr=1e-3, warmup_steps=1000)
        c.train.update(steps=50_000, log_every=100, eval_every=1000, eval_batches=32, checkpoint_every=2000)
        c.upscale.update(widen_at=35_000, grow="num_heads", lossless_atol=2e-2)
        c.parallel.update(fsdp=4)
    else:
        raise ValueError(f"configs/upscale.py variant must be one of ('default', 'mlm', 'tiny', 'gpt', 'pod'), "
                         f"got {variant!r}")
    return c
