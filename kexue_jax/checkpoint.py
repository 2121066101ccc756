"""Checkpoints: a thin wrapper over orbax-checkpoint's ``CheckpointManager``.

Implements the design card's decision (`/work/shared/DESIGN.md`): "Checkpoints: orbax-checkpoint
``CheckpointManager``, wrapped in one module"; "every process takes part in checkpointing". All
processes call :meth:`Checkpointer.save` and :meth:`Checkpointer.restore` with their (global, possibly
sharded) ``jax.Array``s; orbax coordinates the hosts, writes each shard once and commits a step
atomically (it writes ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so a save that
died half-way never shows up as a step).

Guarantees added on top of orbax:

* **No clobbering.** Saving a step that already exists returns ``False`` and leaves it untouched.
* **Fallback on restore.** ``restore(target)`` tries the newest step first; if it cannot be read (a
  missing or truncated data file, a partial step directory, ...) it logs a warning naming the step and
  tries the next older one. Steps that failed are remembered, so that the resumed run may save steps
  older than the unreadable ones (orbax alone would skip every step <= the newest on disk).
* **Bitwise round trip** into the structure, dtypes and shardings of ``target_state``.

Not handled here: a state holding NaN/Inf is saved like any other; checking finiteness before
:meth:`Checkpointer.save` is the caller's job (otherwise the bad state becomes the newest checkpoint
and ``max_to_keep`` ages out the good ones).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def abstract_like(tree: Any) -> Any:
    """``tree`` with every ``jax.Array`` replaced by ``jax.ShapeDtypeStruct(shape, dtype, sharding)``,
    the restore target orbax needs to place each shard on its device; other leaves are kept."""
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(leaf, tree)


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
        self._unreadable: set[int] = set()
        self._manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=1,
                                                 create=True),
        )

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
        ``force``), or when ``step`` is not newer than the newest readable step and ``force`` is False.
        """
        step = _check_step(step)
        steps = self.all_steps()
        if step in steps:
            log.warning("checkpoint step %d already exists in %s: not overwritten", step, self.directory)
            return False
        readable = [s for s in steps if s not in self._unreadable]
        if not force and readable and step < readable[-1]:
            log.warning("checkpoint step %d is older than the newest step %d in %s: skipped "
                        "(force=True writes it)", step, readable[-1], self.directory)
            return False
        # Our policy decided; force=True stops orbax re-deciding (it skips steps <= its newest step).
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def wait(self) -> None:
        """Block until pending saves are committed (and old steps beyond ``max_to_keep`` deleted)."""
        self._manager.wait_until_finished()

    def _restore_step(self, target: Any, step: int) -> Any:
        return self._manager.restore(step, args=ocp.args.StandardRestore(target))

    def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, int] | tuple[None, None]:
        """``(state, step)`` restored into the structure/dtypes/shardings of ``target_state`` (concrete
        arrays or ``jax.ShapeDtypeStruct``s with ``sharding``); ``(None, None)`` if there is no step.

        ``step=None``: newest step first, falling back (warning) to older ones when a step cannot be
        read; ValueError if none can. An explicit ``step`` is restored or raises.
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
            try:
                state = self._restore_step(target, candidate)
            except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types on bad data
                errors.append((candidate, e))
                self._unreadable.add(candidate)
                log.warning("checkpoint step %d in %s could not be restored (corrupt, partial, or not "
                            "matching target_state): %s: %s; trying the previous step", candidate,
                            self.directory, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
                continue
            return state, candidate
        raise ValueError(
            f"no checkpoint in {self.directory} could be restored into target_state (tried steps "
            f"{[s for s, _ in errors]}); newest error: {type(errors[0][1]).__name__}: {errors[0][1]}"
        ) from errors[0][1]

    def close(self) -> None:
        """Wait for pending saves and release orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
