"""The main job: train a small model, widen it losslessly (kexue.fm/archives/8444), keep training the big
one, and compare with the big model trained from scratch on the same data in the same order.

Variants (``--config=configs/upscale.py:VARIANT``):
  default  the post's own case, a BERT-style model (embedding LayerNorm, segment embeddings, Post-LN, GELU FFN
           with biases, the MLM head: dense + GELU + LayerNorm + tied embedding + vocab bias, 1/sqrt(d)), so
           every rule and erratum of the post is exercised; 4 layers, d_model 64 -> 128 (x2, grow=head_dim),
           arm B 1500 steps; arm A widened at step 250 (1/6) with -10 dB of exact zero-sum noise, then B's own
           learning-rate schedule from its step 0 ("rewind", MSG) at twice the rate, until it reaches B's final
           loss (cap 2 x B's FLOPs).
           Trained on next-byte prediction (mask causal): byte-level MLM does learn (2.99 nats/byte after
           1500 steps against the 3.30 unigram entropy, measured) but ten times more slowly than next-byte
           prediction (1.63), so its curve has too little signal for a run-to-target comparison on a CPU
           budget (WORKSPACE.md has the MLM learning-rate sweep). The settings come from
           ``benchmarks/upscale_sweep.py`` (WORKSPACE.md);
  mlm      the same model on the MLM objective (bidirectional, 15% masking), learning rate 1.5e-3 (the best
           of {1.5e-3, 3e-3, 6e-3} for arm B on MLM; 6e-3 stays at the unigram entropy under Post-LN);
  released the case that pays: a small model trained to the end of its own run exists (as a released checkpoint),
           as HyperCloning / LiGO / bert2BERT start: the default's d 64 model trained 1500 steps at its own best
           rate (6e-3, of 3e-3 / 6e-3 / 1.2e-2), widened x2 (-10 dB zero-sum), then the big model restarted
           over 750 steps at B's best rate (3e-3) with no warmup and a cosine decay (the best of
           benchmarks/released_sweep.py's grid at reduced size, WORKSPACE.md), until it reaches B's final loss;
           headline: compute_saving_given_small (the small model's FLOPs are not counted; compute_saving and
           family_saving count them);
  tiny     < 60 s, for tests (BERT-style, MLM);
  gpt      the GPT preset (Pre-LN, tied LM head) on next-byte prediction, same sizes as the default (the
           preset that can also grow depth: ``--config.upscale.depth_factor=2``);
  pod      GPU/TPU size: 12-layer GPT 384 -> 768, seq 1024, global batch 256, bf16, under muP (base width 64,
           lr 6e-3: muP's best rate at every width of the transfer study; after widening the big model's own muP
           rates, no multiplier; see WORKSPACE.md "muP");
  gpu      one GPU in minutes: 8-layer GPT 256 -> 512 (grow=num_heads, 64-wide heads), seq 256, batch 64, bf16,
           2400 steps, widened at 400 (1/6), muP (base 64, lr 6e-3, as pod); sized (by FLOPs, not yet measured) so that arm B at three
           learning rates and arm A at the defaults fit about 5 minutes of one H100
           (``benchmarks/device_suite.py``'s growth stage runs exactly that).
The ``upscale`` fields (every one is a ``--config.upscale.FIELD=`` override):
  factor, grow           width factor k and what grows in attention ("head_dim" as the post, or "num_heads");
  widen_at               arm A's small-phase length in steps;
  depth_factor           also grow depth by this integer (identity layers; Pre-LN / alpha residuals only);
  noise_db, symmetry     exact symmetry breaking: std(noise) = 10^(noise_db/20) x RMS(W), None = no noise;
                         "zero_sum" (additive +N/-N across copies) or "fan_out" (LEMON's unequal split);
  map_optimizer          map Adam's moments to the big model (False: a fresh Adam state);
  scale_updates          multiply the big model's updates so its first step is the widened small step;
  schedule, big_steps    the learning rate after widening: "continue" (B's schedule), "restart" (a fresh
                         warmup + decay over big_steps, default train.steps - widen_at) or "rewind" (B's own
                         schedule from its step 0, as MSG);
  lr_multiplier, lr_tensors  the big phase's learning rate x lr_multiplier on "all" tensors, the
                         "matrices" or the "hidden" width x width kernels; None = the parameterization's rule:
                         2 under the standard / NTK parameterizations (the sweep's rule; it diverges at d 128 ->
                         256), 1 under muP (``--config.model.parameterization=mup``), whose per-tensor rates
                         already follow the width (hidden matrices at lr / (k m) after widening);
  cap                    arm A stops at cap x B's FLOPs if it has not reached B's final loss (its big phase alone
                         in the released scenario);
  seeds                  e.g. (0, 1, 2): every seed in workdir/seed_N, the report gives mean +/- std;
  baseline               the workdir of a finished job whose arm B (same config) to reuse instead of training it;
  arms                   ("upscaled", "scratch") or one of them;
  big_lr                 the big phase's peak learning rate on every tensor, None = optim.lr x lr_multiplier (set:
                         lr_multiplier is not used);
  big_warmup, big_schedule  the big phase's warmup steps (None = optim.warmup_steps; 0 = none) and decay shape
                         (None = optim.schedule; e.g. "wsd"), for a schedule that starts afresh ("restart", "rewind");
  scenario               "grow_during" (the default: the small phase is the first widen_at steps of B's schedule)
                         or "released" (a small model trained to the end first, as a released checkpoint):
    small_lr, small_steps  the released small model's own run: peak rate (None = optim.lr) and length (None =
                         train.steps), with its own warmup and decay (optim.schedule); it is widened at its end;
                         the big phase then runs upscale.schedule "restart" over big_steps (None = train.steps)
                         or "rewind" (B's schedule) at big_lr;
    small_cache          where the released small phase is kept: <small_cache>/<key>, key a hash of the small
                         phase's own config (small model, data, optimizer at small_lr over small_steps, seed),
                         None = workdir/small_cache; jobs that differ only in big-phase fields share it;
  protocol               "to_target" (the default: A runs until it reaches B's final loss) or "wsd" (both arms
                         train at a stable rate and are cooled down at several budgets; needs optim.schedule="wsd"):
    wsd_budgets          the budgets, each a fraction of train.steps (float) or a step count (int); None =
                         (0.25, 0.5, 0.75, 1.0). Budget T cools down over its last optim.decay_fraction x T steps
                         from the stable run; widen_at must come before the first budget's decay.
"""
import ml_collections

from kexue_jax.config import base_config, model_section


def get_config(arg: str | None = None):
    variant = arg or "default"
    c = base_config("upscale")
    ph = ml_collections.config_dict.placeholder
    c.upscale = ml_collections.ConfigDict(dict(
        factor=2, grow="head_dim", widen_at=250, depth_factor=1,
        noise_db=ph(float), symmetry="zero_sum",
        map_optimizer=True, scale_updates=False,
        schedule="rewind", big_steps=ph(int), lr_multiplier=ph(float), lr_tensors="all",
        cap=2.0, seeds=(), baseline=ph(str), lossless_atol=1e-5,
        arms=("upscaled", "scratch"),
        scenario="grow_during", small_lr=ph(float), small_steps=ph(int), small_cache=ph(str), big_lr=ph(float),
        big_warmup=ph(int), big_schedule=ph(str),
        protocol="to_target", wsd_budgets=ph(tuple)))
    if variant in ("default", "mlm", "gpt", "released"):
        preset = "gpt" if variant == "gpt" else "bert"
        objective = "mlm" if variant == "mlm" else "lm"
        c.model = model_section(preset, num_layers=4, d_model=64, num_heads=4, head_dim=16, d_ff=256, max_len=128)
        if variant in ("default", "released"):
            c.model.mask = "causal"
        c.data.update(seq_len=128, batch_size=16, objective=objective)
        c.optim.update(lr=3e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1)
        c.train.update(steps=1500, log_every=100, eval_every=50, eval_batches=8, checkpoint_every=500)
        c.upscale.update(widen_at=250, noise_db=-10.0)
        if variant == "mlm":
            c.optim.lr = 1.5e-3
        if variant == "released":
            c.upscale.update(scenario="released", small_lr=6e-3, schedule="restart", big_steps=750, big_lr=3e-3,
                             big_warmup=0)
    elif variant == "tiny":
        c.model = model_section("bert", num_layers=2, d_model=32, num_heads=2, head_dim=16, d_ff=128, max_len=64)
        c.data.update(seq_len=64, batch_size=16, objective="mlm")
        c.optim.update(lr=3e-3, warmup_steps=5)
        c.train.update(steps=40, log_every=10, eval_every=10, eval_batches=2, checkpoint_every=20)
        c.upscale.widen_at = 25
    elif variant == "pod":
        # muP with base width 64: lr 6e-3 is muP's best rate at every width of the transfer study (d 32 ... 256,
        # benchmarks/results/mup/transfer.md), so the hidden matrices train at 6e-3 / 6 = 1e-3 at d 384 and at
        # 6e-3 / 12 = 5e-4 after widening to 768 (no multiplier). Depth, batch and horizon differ from the study's:
        # muP transfers across width only; tune lr in {3e-3, 6e-3, 1.2e-2} on the small model first.
        c.model = model_section("gpt", num_layers=12, d_model=384, num_heads=6, head_dim=64, d_ff=1536,
                                max_len=1024, dtype="bfloat16", parameterization="mup", mup_base_d_model=64)
        c.data.update(seq_len=1024, batch_size=256, objective="lm")
        c.optim.update(lr=6e-3, warmup_steps=1000)
        c.train.update(steps=50_000, log_every=100, eval_every=1000, eval_batches=32, checkpoint_every=2000)
        c.upscale.update(widen_at=8_000, grow="num_heads", noise_db=-10.0, lossless_atol=2e-2)
        c.parallel.update(fsdp=4)
    elif variant == "gpu":
        c.model = model_section("gpt", num_layers=8, d_model=256, num_heads=4, head_dim=64, d_ff=1024,
                                max_len=256, dtype="bfloat16", parameterization="mup", mup_base_d_model=64)
        c.data.update(seq_len=256, batch_size=64, objective="lm")
        c.optim.update(lr=6e-3, warmup_steps=200)  # muP, base 64: the transfer study's rate, as :pod
        c.train.update(steps=2400, log_every=200, eval_every=100, eval_batches=8, checkpoint_every=1200)
        c.upscale.update(widen_at=400, grow="num_heads", noise_db=-10.0, lossless_atol=2e-2)
    else:
        raise ValueError(f"configs/upscale.py variant must be one of ('default', 'released', 'mlm', 'tiny', 'gpt', "
                         f"'pod', 'gpu'), got {variant!r}")
    return c
