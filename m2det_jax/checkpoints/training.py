"""Training checkpoints (`TrainCheckpoints`): `<workdir>/checkpoints`, one step per save with
three items: `state` (the train state), `data` (the input iterator's position in the global
batch sequence, the same for every process, and the data counts summed over processes;
JSON) and `meta` (model signature, steps per epoch, config fingerprint, class names).

Saves are asynchronous; a step directory appears under its number only once complete, so
a process killed mid-save leaves an unfinished temporary directory, which resuming
ignores with a warning, as it does a step that no longer restores (a truncated file).
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from m2det_jax.checkpoints.fingerprint import (
    OUTPUT_FIELDS,
    TRAINING_FIELDS,
    check_fingerprint,
    check_signature,
)
from m2det_jax.checkpoints.variables import warn, warn_unrestorable
from m2det_jax.errors import ConfigMismatchError
from m2det_jax.paths import as_path


class TrainCheckpoints:
    """The checkpoints of a training run (async saves; see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, keep: int):
        self.directory = as_path(directory)
        self._mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True))  # fmt: skip

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, step: int, target, cfg) -> tuple[Any, Any]:
        """(state restored into `target`'s shapes, dtypes and shardings, iterator state) of
        `step`, after checking the model config and every field that changes the run's
        outputs or losses (`train.allow_config_mismatch` skips the latter)."""
        meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        check_signature(meta["meta"]["model"], cfg, self.directory)
        check_fingerprint(meta["meta"].get("fingerprint"), cfg, self.directory,
                          OUTPUT_FIELDS + TRAINING_FIELDS,
                          bool(cfg.train.allow_config_mismatch))  # fmt: skip
        restored = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))  # fmt: skip
        return restored["state"], restored["data"]

    def restore_latest(self, target, cfg) -> tuple[int, Any, Any] | None:
        """(step, state, iterator state) of the newest checkpoint that restores, or None.
        Unfinished saves and steps that fail to restore (not a config mismatch) are
        skipped with a warning naming them."""
        for name in sorted(p.name for p in self.directory.iterdir()
                           if ".orbax-checkpoint-tmp" in p.name):  # fmt: skip
            warn(f"ignoring {self.directory / name}: a save that never finished")
        for step in sorted(self._mngr.all_steps(), reverse=True):
            try:
                return (step, *self.restore(step, target, cfg))
            except ConfigMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any damage: fall back to the previous one
                warn_unrestorable(self.directory / str(step), e)
        return None

    def save(self, step: int, state, data_state, meta: dict[str, Any]) -> None:
        """Starts an async save of `state` and the iterator state `data_state` (JSON; the
        same on every process). A collective: every process calls it at the same step."""
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)  # fmt: skip

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
