"""Orbax checkpoints: model variables (converted weights, inference checkpoints) and
training runs.

Variables: an orbax `CheckpointManager` directory with one step holding two items:
`variables` ({"params", "batch_stats"}, StandardSave) and `meta` (JSON: the model
config, the priors count and where the weights came from). Loading checks the stored
model config against the requested one and names every field that differs.

Training (`TrainCheckpoints`): `<workdir>/checkpoints`, one step per save with three
items: `state` (the train state), `data` (the input iterator's position in the global
batch sequence, the same for every process, and the data counts summed over processes;
JSON) and `meta` (model signature, steps per epoch, config fingerprint, class names).
Saves are asynchronous; a step directory appears under its number only once complete, so
a process killed mid-save leaves an unfinished temporary directory, which resuming
ignores with a warning, as it does a step that no longer restores (a truncated file).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from m2det_jax.models import abstract_variables
from m2det_jax.paths import as_path

MODEL_FIELDS_THAT_CHANGE_WEIGHTS = (
    "backbone", "num_classes", "planes", "num_levels", "num_scales", "smooth", "sfam",
    "share_ffmv2", "share_sfam", "sfam_reduction", "resnet_width",
)  # fmt: skip


class ConfigMismatchError(ValueError):
    """A checkpoint was written for a different model config."""


def model_signature(cfg) -> dict[str, Any]:
    """The config fields that determine the variable tree, for checkpoint checks."""
    m = cfg.model
    sig = {k: m[k] for k in MODEL_FIELDS_THAT_CHANGE_WEIGHTS}
    sig["num_anchors"] = 2 + 2 * len(cfg.anchors.aspect_ratios)
    return sig


def check_signature(stored: dict[str, Any], cfg, where: str) -> None:
    want = model_signature(cfg)
    diff = [
        f"model.{k}: checkpoint {stored.get(k)!r}, config {v!r}"
        for k, v in want.items()
        if stored.get(k) != v
    ]
    if diff:
        raise ConfigMismatchError(
            f"checkpoint {where} was written for another model config:\n  " + "\n  ".join(diff)
        )


# Fields that change what the weights compute without changing their shapes: recorded
# with every checkpoint; loading with other values is a ConfigMismatchError naming each
# field, unless explicitly allowed (`--allow_config_mismatch`,
# `train.allow_config_mismatch`). The loss fields matter only to a resumed run.
OUTPUT_FIELDS = (
    "model.input_size", "anchors.size_pattern", "anchors.steps", "anchors.aspect_ratios",
    "anchors.variance", "anchors.clip", "preprocess.channel_order", "preprocess.pixel_means",
    "preprocess.pixel_scale",
)  # fmt: skip
TRAINING_FIELDS = ("loss.overlap_thresh", "loss.neg_pos")


def config_fingerprint(cfg) -> dict[str, Any]:
    """{"section.field": value} of OUTPUT_FIELDS and TRAINING_FIELDS, JSON-normalised."""
    out = {}
    for field in OUTPUT_FIELDS + TRAINING_FIELDS:
        section, name = field.split(".")
        out[field] = json.loads(json.dumps(cfg[section].get(name)))
    return out


def check_fingerprint(stored: dict[str, Any] | None, cfg, where, fields=OUTPUT_FIELDS,
                      allow: bool = False) -> None:  # fmt: skip
    """ConfigMismatchError naming every field of `fields` whose stored value differs from
    `cfg`'s (fields a checkpoint did not record are not compared)."""
    if not stored or allow:
        return
    want = config_fingerprint(cfg)
    diff = [f"{f}: checkpoint {stored[f]!r}, config {want[f]!r}"
            for f in fields if f in stored and stored[f] != want[f]]  # fmt: skip
    if diff:
        raise ConfigMismatchError(
            f"checkpoint {where} was written with other settings that change its outputs:\n  "
            + "\n  ".join(diff) + "\n(use the checkpoint's values, or load it anyway with "
            "--allow_config_mismatch / train.allow_config_mismatch=true)")


def save_variables(directory: str | os.PathLike, variables, cfg, source: str = "", step=0,
                   labels: dict[str, list] | None = None):  # fmt: skip
    """Writes `variables` and their model config as an orbax checkpoint at `directory`
    (local or a URI such as gs://b/ckpt); returns the directory. `labels` (`dataset_labels`:
    class names and category ids) travel with it, for `m2det detect` and evaluation."""
    directory = as_path(directory)
    variables = jax.tree.map(np.asarray, dict(variables))
    meta = {
        "model": model_signature(cfg),
        "config": cfg.to_json_best_effort(),
        "source": str(source),
        # Top-level modules present: all of them, or only "backbone" for ImageNet weights.
        "modules": sorted(variables["params"]),
        "fingerprint": config_fingerprint(cfg),
    }
    if labels:
        meta["labels"] = labels
    with ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    ) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(
                variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        mngr.wait_until_finished()
    return os.fspath(directory)


def _train_checkpoints(directory):
    """`directory` or `directory/checkpoints` when it is a training run's checkpoints."""
    for d in (directory, directory / "checkpoints"):
        if d.is_dir():
            steps = [p.name for p in d.iterdir() if p.name.isdigit()]
            if steps and (d / max(steps, key=int) / "state").is_dir():
                return d
    return None


def read_labels(directory: str | os.PathLike) -> dict[str, list] | None:
    """{"class_names", "category_ids"} stored with a checkpoint (a `m2det convert` or
    `m2det export` output, or a training workdir); None when it has none."""
    try:
        return read_meta(directory).get("labels")
    except (FileNotFoundError, KeyError):
        return None


def _resolve(directory: str | os.PathLike):
    """`directory`, or its `variables/` checkpoint when it is an `m2det export` folder."""
    directory = as_path(directory)
    inner = directory / "variables"
    if inner.is_dir() and any(p.name.isdigit() for p in inner.iterdir()):
        return inner
    return directory


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    directory = _resolve(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    directory = _train_checkpoints(directory) or directory
    with ocp.CheckpointManager(directory) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def load_variables(directory: str | os.PathLike, cfg, sharding=None,
                   allow_config_mismatch: bool = False) -> dict[str, Any]:  # fmt: skip
    """Restores variables written by `save_variables`, after checking the model config.

    A backbone-only checkpoint (converted ImageNet weights) restores as the subtree it holds.

    Args:
      directory: the checkpoint directory (`m2det convert` output, an `m2det export`
        folder or a training workdir).
      cfg: the config the caller will build the model from.
      allow_config_mismatch: load even if OUTPUT_FIELDS differ from the checkpoint's.
      sharding: optional `jax.sharding.Sharding` for every leaf (default: this process's
        first device, so that every process of a multi-host run restores its own copy).
    """
    directory = _resolve(directory)
    meta = read_meta(directory)
    check_signature(meta["model"], cfg, directory)
    check_fingerprint(meta.get("fingerprint"), cfg, directory, allow=allow_config_mismatch)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    train_dir = _train_checkpoints(directory)
    if train_dir is not None:  # a training run: params/batch_stats of its newest good step
        handlers = {"state": ocp.StandardCheckpointHandler()}
        with ocp.CheckpointManager(train_dir, item_handlers=handlers) as mngr:
            for step in sorted(mngr.all_steps(), reverse=True):
                try:  # onto this process's device, whatever mesh wrote it
                    target = jax.tree.map(
                        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                        mngr.item_metadata(step)["state"])  # fmt: skip
                    state = mngr.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target)))["state"]  # fmt: skip
                except Exception as e:  # noqa: BLE001 - damaged: fall back, as resuming does
                    _warn_unrestorable(as_path(train_dir) / str(step), e)
                    continue
                return {"params": state["params"], "batch_stats": state["batch_stats"]}
        raise FileNotFoundError(f"no checkpoint in {train_dir} restores")
    abstract = abstract_variables(cfg)
    modules = meta.get("modules")
    if modules is not None:  # e.g. a backbone-only checkpoint
        abstract = {c: {m: t[m] for m in modules if m in t} for c, t in abstract.items()}
        abstract = {c: t for c, t in abstract.items() if t}
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), dict(abstract)
    )
    with ocp.CheckpointManager(directory) as mngr:
        step = mngr.latest_step()
        restored = mngr.restore(
            step, args=ocp.args.Composite(variables=ocp.args.StandardRestore(abstract))
        )
    return restored["variables"]


CLASS_HEADS = "conf_"  # params of the class heads (conf_0 ... conf_{S-1}): [.., A x C]


def load_init_variables(directory: str | os.PathLike, cfg) -> tuple[dict[str, Any], list[str]]:
    """`load_variables` for `train.init_checkpoint`, also across a change of classes.

    When the checkpoint was written for another `model.num_classes` (fine-tuning the
    released COCO weights on a VOC-format folder of C' classes) and nothing else differs,
    every tensor loads but the class heads' (`conf_*`), whose output width is
    anchors x classes: those stay at the model's own initialisation (PyTorch's default
    kernel init, zero biases: every class, background included, starts at 1/C', as a new
    head of the original starts; copying the old background row instead would start in
    the "background everywhere" plateau, and a random head scored high gives ~1,000 boxes
    per image). Returns (variables, one line per tensor not loaded, saying why).
    """
    stored = read_meta(directory)["model"]
    want = model_signature(cfg)
    if stored.get("num_classes") == want["num_classes"]:
        return load_variables(directory, cfg, allow_config_mismatch=True), []
    check_signature({**stored, "num_classes": want["num_classes"]}, cfg, directory)
    src = cfg.copy_and_resolve_references()
    src.model.num_classes = int(stored["num_classes"])
    variables = load_variables(directory, src, allow_config_mismatch=True)
    skipped = []
    params = dict(variables["params"])
    for name in sorted(params):
        if name.startswith(CLASS_HEADS):
            for leaf, arr in sorted(dict(params.pop(name)).items()):
                skipped.append(
                    f"params/{name}/{leaf} {list(np.shape(arr))}: written for "
                    f"{stored['num_classes']} classes, config has {want['num_classes']}: "
                    "re-initialised")  # fmt: skip
    return {**variables, "params": params}, skipped


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
                          bool(cfg.train.get("allow_config_mismatch", False)))  # fmt: skip
        restored = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))  # fmt: skip
        return restored["state"], restored["data"]

    def restore_latest(self, target, cfg) -> tuple[int, Any, Any] | None:
        """(step, state, iterator state) of the newest checkpoint that restores, or None.
        Unfinished saves and steps that fail to restore (not a config mismatch) are
        skipped with a warning naming them."""
        for name in sorted(p.name for p in self.directory.iterdir()
                           if ".orbax-checkpoint-tmp" in p.name):  # fmt: skip
            _warn(f"ignoring {self.directory / name}: a save that never finished")
        for step in sorted(self._mngr.all_steps(), reverse=True):
            try:
                return (step, *self.restore(step, target, cfg))
            except ConfigMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any damage: fall back to the previous one
                _warn_unrestorable(self.directory / str(step), e)
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


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _warn_unrestorable(where, error: Exception) -> None:
    _warn(f"checkpoint {where} does not restore ({type(error).__name__}: {str(error)[:200]}); "
          "trying the one before")
