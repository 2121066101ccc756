"""What ``train.py`` runs: each experiment composes the library and is callable from tests.

``run(config, workdir)`` dispatches ``config.experiment`` to ``kexue_jax.experiments.<name>.run``.
Modules are imported lazily, so importing this package does no work.
"""
from __future__ import annotations

import importlib

EXPERIMENTS = ("lm", "upscale", "similarity", "init_study", "univae", "mixers")


def run(config, workdir: str):
    """Run the experiment named by ``config.experiment`` (one of EXPERIMENTS)."""
    if config.experiment not in EXPERIMENTS:
        raise ValueError(f"config.experiment must be one of {EXPERIMENTS}, got {config.experiment!r}")
    return importlib.import_module(f"kexue_jax.experiments.{config.experiment}").run(config, workdir)
