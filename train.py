"""Entry point: ``python train.py --config=configs/upscale.py[:variant] --workdir=DIR [--config.x.y=...]``.

Flags, config and optional ``jax.distributed`` set-up only; the logic lives in ``kexue_jax.experiments``.
The default workdir is ``runs/<config file stem>[_<variant>]``; a workdir keeps the config that started it
and refuses to resume with another (``kexue_jax.config.RESUMABLE_FIELDS`` may change). ``None`` is accepted
for fields that allow it (``--config.model.init_std=None``). Config errors print one line, exit status 2.
JAX flags work too (e.g. ``--jax_num_cpu_devices=8``, ``--jax_platforms=cpu``).
Multi-host (TPU pods, multi-GPU): ``--multihost`` or ``KEXUE_MULTIHOST=1`` calls
``jax.distributed.initialize()`` (coordinator, process count and id from the flags or the environment).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import jax

from kexue_jax import config as config_lib

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
    workdir = FLAGS.workdir or config_lib.default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    from kexue_jax import checkpoint, experiments, training  # noqa: PLC0415 (after jax.distributed.initialize)

    try:
        training.check_resume(config, workdir)
        experiments.run(config, workdir)
    except ValueError as e:  # a config error (ConfigError, CheckpointMismatch, "config.x ..."): one line, status 2
        if not (isinstance(e, (config_lib.ConfigError, checkpoint.CheckpointMismatch)) or str(e).startswith("config.")):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    jax.config.config_with_absl()
    config_lib.accept_none_on_command_line()  # --config.model.init_std=None etc.
    app.run(main)
