"""Post 8620 trained: residual wiring x depth x warmup, attention scale, parameterization, truncation.

``python train.py --config=configs/init_study.py[:VARIANT] --workdir=DIR`` (kexue_jax/experiments/init_study.py;
rerunning the same command resumes cell by cell).

Variants:
  tiny     every section on one-layer toy models, < 60 s on 2 CPU cores (tests/test_init_study.py);
  default  the 2-core CPU grid (<= 45 min): d_model 64, depths {6, 24, 48}, 400 steps of 8 x 32 bytes;
  full     the issue's whole protocol for an accelerator: d_model 128, 5,000 steps of 32 x 128 bytes, every
           residual x depth x warmup at three learning rates.
The alpha ramp's length T (alpha_t = min(1, t / T), never trained) is ``config.train.alpha_warmup_steps``.
"""
import ml_collections

from kexue_jax.config import base_config, model_section

VARIANTS = ("tiny", "default", "full")
RESIDUALS = ("post", "pre", "alpha", "alpha_post", "rezero", "deepnorm")


def _study(**kw):
    s = dict(
        sections=("residual", "lr", "attention", "param", "truncation", "no_norm"),
        residuals=RESIDUALS, depths=(6, 24, 48), warmups=(0, 100),
        lr=2e-3,                      # the learning rate chosen for Pre-LN (every residual cell uses it)
        lrs=(6e-4, 2e-3, 6e-3),       # each arm's best of three, at sweep_depths x sweep_warmups
        sweep_depths=(48,), sweep_warmups=(0,),
        attn_scales=("sqrt", "none", "t5", "mup"), head_dims=(64, 128), attn_num_heads=1, attn_depth=6,
        attn_residual="pre", attn_warmup=0,
        parameterizations=("standard", "ntk"), param_lrs=(1e-3, 1e-2), param_depth=6, param_warmup=0,
        truncation_residuals=("pre", "alpha"), truncation_depth=48,
        no_norm_residuals=("alpha", "rezero"), no_norm_depth=48,
        grad_steps=(0, 100),
        report_only=False)            # True: write report.json / table.md / PNG from the finished cells only
    s.update(kw)
    return ml_collections.ConfigDict(s)


def get_config(arg: str | None = None):
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"configs/init_study.py variant must be one of {VARIANTS}, got {variant!r}")
    c = base_config("init_study")
    # the post's setting: second-moment (LeCun) init, so Var(q.k) = d at init without a scale
    # optim.lr and optim.warmup_steps are unused: every cell sets its own (study.lr, study.lrs, study.warmups)
    c.optim.update(warmup_steps=0, weight_decay=0.1, clip_norm=1.0, min_lr_ratio=0.1)
    if variant == "tiny":  # 9 compiled one-layer architectures: cells share one wherever the model is the same
        c.model = model_section("gpt", num_layers=1, d_model=32, num_heads=2, head_dim=16, d_ff=128, max_len=16,
                                init_std=None)
        c.data.update(seq_len=16, batch_size=4)
        c.train.update(steps=12, log_every=4, eval_every=6, eval_batches=2, alpha_warmup_steps=6, plot=True)
        c.study = _study(depths=(1,), warmups=(0, 3), lrs=(2e-3, 6e-3), sweep_depths=(1,),
                         attn_scales=("sqrt", "none"), head_dims=(16,), attn_num_heads=2, attn_depth=1,
                         param_depth=1, truncation_residuals=("pre",), truncation_depth=1,
                         no_norm_residuals=("alpha",), no_norm_depth=1, grad_steps=(0, 6))
    elif variant == "default":
        c.model = model_section("gpt", num_layers=6, d_model=64, num_heads=2, head_dim=32, d_ff=256, max_len=32,
                                init_std=None)
        c.data.update(seq_len=32, batch_size=8)
        c.train.update(steps=400, log_every=20, eval_every=50, eval_batches=8, alpha_warmup_steps=100)
        c.study = _study()
    else:
        c.model = model_section("gpt", num_layers=6, d_model=128, num_heads=2, head_dim=64, d_ff=512, max_len=128,
                                init_std=None)
        c.data.update(seq_len=128, batch_size=32)
        c.train.update(steps=5000, log_every=50, eval_every=250, eval_batches=16, alpha_warmup_steps=500)
        c.study = _study(warmups=(0, 300), lr=1e-3, lrs=(3e-4, 1e-3, 3e-3), sweep_depths=(6, 24, 48),
                         sweep_warmups=(0, 300), attn_num_heads=2, truncation_residuals=("pre", "alpha", "post"),
                         no_norm_residuals=("alpha", "rezero"), param_lrs=(1e-3, 3e-3, 1e-2))
    c.train.checkpoint_every = c.train.eval_every  # a cell in progress resumes from its last evaluation
    return c
