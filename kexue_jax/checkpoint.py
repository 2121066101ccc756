"""Checkpoints: a thin wrapper over orbax-checkpoint's ``CheckpointManager``.

All processes call :meth:`Checkpointer.save` and :meth:`Checkpointer.restore` with their (global, possibly
sharded) ``jax.Array``s; orbax coordinates the hosts, writes each shard once and commits a step
atomically (it writes ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so a save that
died half-way never shows up as a step).

Guarantees added on top of orbax:

* **No clobbering.** Saving a step that already exists returns ``False`` and leaves it untouched.
* **Fallback on restore, with quarantine.** ``restore(target)`` tries the newest step first; if it cannot
  be read (a missing or truncated data file, unreadable metadata, ...) it logs a warning naming the step,
  moves the step to ``<directory>/corrupt/<step>`` (kept for inspection, never deleted) and tries the next
  older one. The resumed run can then write that step again (a corrupt final step is healed by the
  rerun instead of blocking it forever).
* **A checkpoint that does not fit is not corrupt.** When the step's stored array shapes/dtypes differ
  from ``target_state`` (another model size), :class:`CheckpointMismatch` is raised and nothing is moved.
* **All processes agree.** With several processes, a step counts as readable only if it was restored on
  every process (an all-gather of each process's result), so all restore the same step, and only
  process 0 moves unreadable steps (then all wait for it).
* **Bitwise round trip** into the structure, dtypes and shardings of ``target_state``.

Not handled here: a state holding NaN/Inf is saved like any other; checking finiteness before
:meth:`Checkpointer.save` is the caller's job (otherwise the bad state becomes the newest checkpoint
and ``max_to_keep`` ages out the good ones).
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def abstract_like(tree: Any) -> Any:
    """``tree`` with every ``jax.Array`` replaced by ``jax.ShapeDtypeStruct(shape, dtype, sharding)``,
    the restore target orbax needs to place each shard on its device; other leaves are kept."""
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(leaf, tree)


class CheckpointMismatch(ValueError):
    """A checkpoint whose arrays have other shapes or dtypes than the restore target (not corruption)."""


def _all_processes(ok: bool) -> bool:
    """True if ``ok`` on every process (an all-gather; just ``ok`` with one process)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _shape_counts(tree: Any) -> collections.Counter:
    return collections.Counter((tuple(x.shape), np.dtype(x.dtype).name) for x in jax.tree.leaves(tree)
                               if hasattr(x, "shape") and hasattr(x, "dtype"))


def _check_step(step) -> int:
    if isinstance(step, bool) or not hasattr(step, "__index__") or int(step) < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return int(step)


class Checkpointer:
    """Saves and restores a pytree of ``jax.Array``s under ``directory/<step>/``.

    ``max_to_keep``: number of newest steps kept (older ones are deleted after a later save
    completes); ``None`` keeps all. Saves are asynchronous: :meth:`save` returns once the arrays are
    copied off the devices; :meth:`wait` blocks until the step is committed on disk.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                        or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
        directory = os.fspath(directory)
        if "://" not in directory:  # orbax wants absolute local paths; keep gs:// etc. as given
            directory = os.path.abspath(directory)
        self.directory = directory
        self._manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=1,
                                                 create=True),
            item_handlers=ocp.StandardCheckpointHandler(),  # so item_metadata works before any save
        )
        self._reader = ocp.StandardCheckpointHandler()

    def all_steps(self) -> list[int]:
        """Committed steps on disk, increasing (temporary, half-written step directories excluded)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step on disk, or ``None``; not validated (see :meth:`restore`)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Start saving ``state`` as ``step``; True if a save was started.

        Returns False, writing nothing, when ``step`` already exists (never overwritten, whatever
        ``force``), or when ``step`` is older than the newest step and ``force`` is False.
        """
        step = _check_step(step)
        steps = self.all_steps()
        if step in steps:
            log.warning("checkpoint step %d already exists in %s: not overwritten", step, self.directory)
            return False
        if not force and steps and step < steps[-1]:
            log.warning("checkpoint step %d is older than the newest step %d in %s: skipped "
                        "(force=True writes it)", step, steps[-1], self.directory)
            return False
        # Our policy decided; force=True stops orbax re-deciding (it skips steps <= its newest step).
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def wait(self) -> None:
        """Block until pending saves are committed (and old steps beyond ``max_to_keep`` deleted)."""
        self._manager.wait_until_finished()

    def _restore_step(self, target: Any, step: int) -> Any:
        # The handler alone: the manager's restore ends in a barrier of all processes, which a process
        # whose read failed would never reach (the others would hang instead of falling back with it).
        path = epath.Path(self.directory) / str(step) / "default"
        return self._reader.restore(path, args=ocp.args.StandardRestore(target))

    def check_fits(self, target_state: Any, step: int) -> None:
        """Raise :class:`CheckpointMismatch` if ``step``'s stored arrays (shape, dtype) differ from
        ``target_state``'s; other errors (unreadable metadata) propagate."""
        metadata = self._manager.item_metadata(step)
        if metadata is None:
            raise FileNotFoundError(f"checkpoint step {step} in {self.directory} has no readable metadata")
        stored = _shape_counts(metadata.tree)
        wanted = _shape_counts(target_state)
        if stored != wanted:
            only_stored = sorted((stored - wanted).elements())[:4]
            only_wanted = sorted((wanted - stored).elements())[:4]
            raise CheckpointMismatch(
                f"checkpoint step {step} in {self.directory} does not fit the configured model: it holds "
                f"arrays {only_stored} where the config needs {only_wanted} (shape, dtype); resume with the "
                f"config that wrote it, or use another workdir")

    def quarantine(self, step: int) -> str | None:
        """Move ``step`` to ``<directory>/corrupt/<step>[.n]`` (process 0 moves, every process waits);
        returns the new path. The step is kept for inspection and can be written again."""
        src = epath.Path(self.directory) / str(step)
        dst = epath.Path(self.directory) / "corrupt" / str(step)
        n = 1
        while dst.exists():
            dst, n = epath.Path(self.directory) / "corrupt" / f"{step}.{n}", n + 1
        if jax.process_index() == 0 and src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"kexue_jax quarantine {self.directory} {step}")
        self._manager.reload()
        return str(dst)

    def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, int] | tuple[None, None]:
        """``(state, step)`` restored into the structure/dtypes/shardings of ``target_state`` (concrete
        arrays or ``jax.ShapeDtypeStruct``s with ``sharding``); ``(None, None)`` if there is no step.

        ``step=None``: newest step first; a step that cannot be read on some process is quarantined
        (:meth:`quarantine`, warning) and the next older one tried; ValueError if none can be read.
        :class:`CheckpointMismatch` (nothing moved) if the newest step does not fit ``target_state``.
        An explicit ``step`` is restored or raises.
        """
        self.wait()
        self._manager.reload()
        steps = self.all_steps()
        target = abstract_like(target_state)
        if step is not None:
            step = _check_step(step)
            if step not in steps:
                raise ValueError(f"step {step} is not in {self.directory}; available steps: {steps}")
            return self._restore_step(target, step), step
        if not steps:
            return None, None
        errors = []
        for candidate in reversed(steps):
            state, error = None, None
            try:
                self.check_fits(target, candidate)
                state = self._restore_step(target, candidate)
            except (CheckpointMismatch, AttributeError, TypeError, NameError):
                raise  # does not fit, or a bug: never a reason to move a checkpoint
            except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types on bad data
                error = e
            if _all_processes(error is None):
                return state, candidate
            reason = (f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
                      if error is not None else "unreadable on another process")
            errors.append((candidate, reason))
            moved = self.quarantine(candidate)
            log.warning("checkpoint step %d in %s could not be restored (%s); moved to %s, trying the "
                        "previous step", candidate, self.directory, reason, moved)
        raise ValueError(
            f"no checkpoint in {self.directory} could be restored into target_state (tried steps "
            f"{[s for s, _ in errors]}, now under corrupt/); newest error: {errors[0][1]}")

    def close(self) -> None:
        """Wait for pending saves and release orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()
        self._reader.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
