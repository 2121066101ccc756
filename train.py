"""Entry point: ``python train.py --config=configs/upscale.py[:variant] --workdir=DIR [--config.x.y=...]``.

Flags, config and optional ``jax.distributed`` set-up only; the logic lives in ``kexue_jax.experiments``.
JAX flags work too (e.g. ``--jax_num_cpu_devices=8``, ``--jax_platforms=cpu``).
Multi-host (TPU pods, multi-GPU): ``--multihost`` or ``KEXUE_MULTIHOST=1`` calls
``jax.distributed.initialize()`` (coordinator, process count and id from the flags or the environment).
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

import jax

config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/upscale.py:tiny",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots and reports.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (also: KEXUE_MULTIHOST=1).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multihost; else from the env).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multihost; else from the env).")
flags.DEFINE_integer("process_id", None, "This process's id (multihost; else from the env).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.multihost or os.environ.get("KEXUE_MULTIHOST") == "1":
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    if not FLAGS["verbosity"].present:  # keep orbax's per-save INFO lines out of the progress log
        logging.set_verbosity(logging.WARNING)
    if jax.process_index() != 0:
        logging.set_verbosity(logging.ERROR)
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", os.path.splitext(os.path.basename(
        config_flags.get_config_filename(FLAGS["config"])))[0])
    from kexue_jax import experiments  # noqa: PLC0415 (import after jax.distributed.initialize)

    experiments.run(config, workdir)


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
