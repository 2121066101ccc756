"""Train one Transformer (any preset) on the default corpus or the user's text: ``configs/lm.py``."""
from __future__ import annotations

from kexue_jax import training


def run(config, workdir: str) -> training.PhaseResult:
    """Train ``config.model`` for ``config.train.steps`` steps under ``workdir`` (resumes if possible)."""
    return training.train(config, workdir)
