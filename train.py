"""Entry point: ``python train.py --config=configs/upscale.py[:variant] --workdir=DIR [--config.x.y=...]``.

Flags, config and optional ``jax.distributed`` set-up only; the logic lives in ``kexue_jax.experiments``.
The default workdir is ``runs/<config file stem>[_<variant>]``; a workdir keeps the config that started it
and refuses to resume with another (``kexue_jax.config.RESUMABLE_FIELDS`` may change). ``None`` is accepted
for fields that allow it (``--config.model.init_std=None``). Config errors (a misspelled field or variant, a
bad value, a workdir that is a file or cannot be written) print one line, exit status 2, before anything is
written. Interrupts: SIGTERM or Ctrl-C (SIGINT) during training saves the current step and ends with one line
and status 128 + the signal number (143 for SIGTERM, 130 for SIGINT: the run stopped early; rerun the same
command to resume); a second Ctrl-C, or one outside a training phase, stops at once (one line, status 130).
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
        config_lib.check_workdir(workdir)
        training.check_resume(config, workdir)
        experiments.run(config, workdir)
    except ValueError as e:  # a config error (ConfigError, CheckpointMismatch, "config.x ..."): one line, status 2
        if not (isinstance(e, (config_lib.ConfigError, checkpoint.CheckpointMismatch)) or str(e).startswith("config.")):
            raise
        _exit(f"error: {e}", 2)
    except training.Preempted as e:  # SIGTERM / Ctrl-C in a training phase: the current step is saved
        _exit(str(e), 128 + e.signum)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training phase's loop
        _exit("interrupted (Ctrl-C): stopped without saving; rerun the same command to resume from the last "
              "checkpoint", 130)


def _exit(message: str, status: int):
    print(" ".join(message.split()), file=sys.stderr, flush=True)
    sys.exit(status)


def parse_flags(argv):
    """absl's flag parsing, but a command line that gives no usable config (a misspelled field or variant,
    a bad value, an unknown flag) ends in one line (``config.command_line_error``) and status 2."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.keys()  # a config file that does not load (it is loaded lazily) fails here, not in main
        return remaining
    except (flags.Error, KeyError, AttributeError, OSError, ValueError) as e:
        _exit(f"error: {config_lib.command_line_error(e, argv)}", 2)


if __name__ == "__main__":
    jax.config.config_with_absl()
    config_lib.accept_none_on_command_line()  # --config.model.init_std=None etc.
    app.run(main, flags_parser=parse_flags)
