"""Model variables on disk: converted weights, inference checkpoints, and the variables of a
training run's latest step.

An orbax `CheckpointManager` directory with one step holding two items: `variables`
({"params", "batch_stats"}, StandardSave) and `meta` (JSON: the model config, the priors
count, the config fingerprint, class names and where the weights came from). Loading
checks the stored model config against the requested one and names every field that
differs. `load_init_variables` reads a full model or a backbone for `train.init_checkpoint`
(class heads of another class count are skipped and listed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from m2det_jax.checkpoints.fingerprint import (
    check_fingerprint,
    check_signature,
    config_fingerprint,
    model_signature,
)
from m2det_jax.errors import CheckpointMismatchError
from m2det_jax.models import abstract_variables
from m2det_jax.paths import as_path

_log = logging.getLogger(__name__)


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
        folder or a training workdir: its newest good step, the EMA weights when the run
        keeps them, `train.ema_decay`).
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
                    warn_unrestorable(as_path(train_dir) / str(step), e)
                    continue
                if state.get("ema"):  # train.ema_decay > 0: the averaged weights
                    return {"params": state["ema"]["params"],
                            "batch_stats": state["ema"]["batch_stats"]}
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


def warn(message: str) -> None:
    if jax.process_index() == 0:
        _log.warning(message)


def warn_unrestorable(where, error: Exception) -> None:
    warn(f"checkpoint {where} does not restore ({type(error).__name__}: {str(error)[:200]}); "
          "trying the one before")


def merge_variables(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Returns `base` with every leaf present in `update` replaced (e.g. a pretrained
    backbone into freshly initialised variables). Shapes must agree."""
    def merge(b, u, path):
        if not isinstance(u, Mapping):
            if tuple(np.shape(b)) != tuple(np.shape(u)):
                raise CheckpointMismatchError(
                    f"{'/'.join(path)}: shape {np.shape(u)} does not fit {np.shape(b)}")
            return jax.numpy.asarray(u, dtype=getattr(b, "dtype", np.float32))
        if not isinstance(b, Mapping):
            raise CheckpointMismatchError(f"{'/'.join(path)}: not a subtree of the model")
        out = dict(b)
        for k, v in u.items():
            if k not in b:
                raise CheckpointMismatchError(f"{'/'.join((*path, k))}: not in the model")
            out[k] = merge(b[k], v, (*path, k))
        return out

    return merge(base, update, ())
