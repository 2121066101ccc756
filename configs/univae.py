"""UniVAE (kexue.fm/archives/8475): one Transformer, multi-scale vMF latents, on Shakespeare's spoken lines.

Variants (``--config=configs/univae.py:VARIANT``):
  tiny     < 60 s on 2 CPU cores, for tests: 3 layers (1 independent + 2 latent), d 64, 150 steps;
  default  byte level, lines of 8..30 bytes (src_len 32, the post's maxlen), 5 layers (2 independent +
           3 latent), d 128, z_dim 32 x 3, kappa 512: KL(vMF || uniform) = 44.3 nats per layer, 133 in all,
           the most the code can carry (the post's z 16 at kappa 32 carries 7.6 per layer; a held-out line of
           21 bytes holds ~46 nats under the judge byte LM, so 16 x 3 at kappa 64 = 36 nats could not carry
           it), 1200 steps of 64 lines; sized for <= 15 min on an idle 2-core CPU (training ~11 min by FLOP
           count + evaluation + a 600-step byte LM of configs/lm.py for the bits/byte measure);
           ``--config.univae.word_dropout=0.3`` corrupts the decoder's inputs (Bowman et al. 2016; measured
           slower here, WORKSPACE.md);
  minilm   initialised from all-MiniLM-L6-v2 (6 layers, d 384, post-LN BERT) with its WordPiece tokenizer,
           like the post's pre-trained encoder (the post: RoFormer-char base, 4 latent layers of 12);
  pod      accelerator size: 12 x 768 (the post's base size), 4 latent layers, src_len 64, batch 256.
``--config.data.long_lines=split`` also trains on the pieces of the longer lines (cut at spaces into at most
src_len - 2 bytes; the held-out lines stay whole lines). Model fields are any TransformerConfig field
(``--config.model.d_model=256``); the latent path is ``config.univae`` (n_latent, z_dim, kappa, src_len,
word_dropout, quantize); ``config.eval`` sizes the measurements (it may change when a finished run is rerun: only
the measurements are redone).
VQ variant (the post's "sentence -> fixed-length discrete code"): ``--config.univae.quantize=True`` replaces
the vMF noise by the nearest of ``univae.codebook_size`` unit codes per latent layer (straight-through) and
adds the VQ-VAE loss with commitment weight ``univae.commitment``; kappa is then unused.
"""
import ml_collections

from kexue_jax.config import base_config, model_section

VARIANTS = ("tiny", "default", "minilm", "pod")


def get_config(arg: str | None = None):
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"configs/univae.py variant must be one of {VARIANTS}, got {variant!r}")
    c = base_config("univae")
    c.univae = ml_collections.ConfigDict(dict(n_latent=3, z_dim=16, kappa=32.0, src_len=32, init_from="",
                                              quantize=False, codebook_size=256, commitment=0.25,
                                              word_dropout=0.0))
    c.data.update(min_bytes=8, batch_size=64, long_lines="drop")
    c.eval = ml_collections.ConfigDict(dict(method="greedy", beam_size=4, n_heldout=500, n_resample=200,
                                            n_prior=200, lm_variant="default", lm_steps=600))
    c.optim.update(weight_decay=0.01)
    if variant == "tiny":
        c.model = model_section("gpt", num_layers=3, d_model=64, num_heads=4, head_dim=16, d_ff=256, max_len=32,
                                type_vocab_size=2)
        c.univae.update(n_latent=2, src_len=16)
        c.data.update(batch_size=32, min_bytes=4)
        c.optim.update(lr=3e-3, warmup_steps=20)
        c.train.update(steps=150, log_every=25, eval_every=75, eval_batches=2, checkpoint_every=75, plot=False)
        c.eval.update(n_heldout=32, n_resample=16, n_prior=16, lm_variant="tiny", lm_steps=40)
    elif variant == "default":
        c.model = model_section("gpt", num_layers=5, d_model=128, num_heads=4, head_dim=32, d_ff=512, max_len=64,
                                type_vocab_size=2)
        c.univae.update(n_latent=3, z_dim=32, kappa=512.0)
        c.optim.update(lr=2e-3, warmup_steps=100)
        c.train.update(steps=1200, log_every=50, eval_every=300, eval_batches=8, checkpoint_every=300)
    elif variant == "minilm":
        c.model = model_section("bert", num_layers=6, d_model=384, num_heads=12, head_dim=32, d_ff=1536,
                                max_len=512, vocab_size=30522, head="mlm")
        c.univae.update(n_latent=3, src_len=32, init_from="minilm")
        c.data.update(batch_size=32)
        c.optim.update(lr=1e-4, warmup_steps=100)
        c.train.update(steps=3000, log_every=50, eval_every=500, eval_batches=8, checkpoint_every=500)
    elif variant == "pod":
        c.model = model_section("gpt", num_layers=12, d_model=768, num_heads=12, head_dim=64, d_ff=3072,
                                max_len=128, type_vocab_size=2, dtype="bfloat16")
        c.univae.update(n_latent=4, src_len=64)
        c.data.update(batch_size=256)
        c.optim.update(lr=3e-4, warmup_steps=2000)
        c.train.update(steps=100_000, log_every=100, eval_every=2000, eval_batches=16, checkpoint_every=2000)
        c.eval.update(lm_variant="pod", lm_steps=0, n_heldout=2000, n_resample=1000)
    return c
