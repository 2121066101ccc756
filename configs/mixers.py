"""Token mixers side by side (kexue.fm/archives/8431): ``kexue_jax.experiments.mixers``.

``python train.py --config=configs/mixers.py[:VARIANT] --workdir=DIR [--config.study.mixers="('attention','fnet')"]``

Variants:
  tiny     seconds, for tests (every mixer, 1 layer of width 32, a few steps);
  default  the 2-core CPU study (about 35 min on an idle 2-core CPU): 2 layers of width 64, 4 x 16 heads, seq 128,
           batch 16, 300 pre-training steps per arm, 200 fine-tuning steps per genre classifier and 6 x 100
           word-order fine-tuning steps per mixer (3 label fractions, pre-trained and from scratch);
  gpu      the same protocol at a size where the differences are meaningful (4 layers of width 256, 2000 steps).
The reference (``study.reference``, attention) sets the parameter count; each mixer's d_ff is matched to it.
"""
import ml_collections

from kexue_jax.config import base_config, model_section


def get_config(arg: str | None = None):
    variant = arg or "default"
    c = base_config("mixers")
    c.study = ml_collections.ConfigDict(dict(
        mixers=("attention", "synthesizer_random", "synthesizer_dense", "mixer", "resmlp", "gmlp", "amlp", "fnet",
                "external", "conv"),
        objectives=("mlm", "lm"), reference="attention", eval_lengths=(64, 256), time_steps=5, speed_rounds=5,
        ft_steps=200, ft_batch=32, ft_lr=1e-3, ft_seq_len=64, ft_train_lines=4000, ft_test_lines=2000,
        # transfer with few labels: the word-order task (a line as spoken / its words shuffled) fine-tuned with
        # each fraction of the training lines labelled, from the MLM encoder and from scratch (at :default 6 x 100
        # steps per mixer, about 12 of the whole study's ~35 min on an idle 2-core CPU)
        ft_label_fractions=(0.01, 0.1, 1.0), ft_fraction_task="order", ft_fraction_steps=100))
    if variant == "tiny":
        c.model = model_section(
            "gpt", mask="bidirectional", num_layers=1, d_model=32, num_heads=2, head_dim=16, d_ff=64, max_len=32,
            mixer_options=dict(tiny_attention_dim=16, external_slots=16, conv_kernel_size=3))
        c.data.update(seq_len=32, batch_size=8)
        c.optim.update(lr=1e-2, warmup_steps=1)
        c.train.update(steps=4, log_every=2, eval_every=4, eval_batches=2, checkpoint_every=4, plot=False)
        c.study.update(eval_lengths=(16, 64), time_steps=2, speed_rounds=1, ft_steps=3, ft_batch=8, ft_seq_len=32,
                       ft_train_lines=64, ft_test_lines=64, ft_label_fractions=(0.1, 1.0), ft_fraction_steps=2)
    elif variant == "default":
        c.model = model_section(
            "gpt", mask="bidirectional", num_layers=2, d_model=64, num_heads=4, head_dim=16, d_ff=256, max_len=128,
            mixer_options=dict(tiny_attention_dim=32, external_slots=64, conv_kernel_size=7))
        c.data.update(seq_len=128, batch_size=16)
        c.optim.update(lr=3e-3, warmup_steps=30)
        c.train.update(steps=300, log_every=50, eval_every=150, eval_batches=8, checkpoint_every=300, plot=False)
    elif variant == "gpu":
        c.model = model_section(
            "gpt", mask="bidirectional", num_layers=4, d_model=256, num_heads=4, head_dim=64, d_ff=1024, max_len=128,
            mixer_options=dict(tiny_attention_dim=64, external_slots=64, conv_kernel_size=7))
        c.data.update(seq_len=128, batch_size=64)
        c.optim.update(lr=1e-3, warmup_steps=200)
        c.train.update(steps=2000, log_every=100, eval_every=500, eval_batches=16, checkpoint_every=1000, plot=False)
        c.study.update(ft_steps=1000, ft_batch=64, ft_train_lines=20000, ft_test_lines=5000, time_steps=10,
                       ft_fraction_steps=500)
    else:
        raise ValueError(f"configs/mixers.py variant must be one of ('tiny', 'default', 'gpu'), got {variant!r}")
    return c
