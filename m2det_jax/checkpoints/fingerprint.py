"""The config fields a checkpoint must agree on with the config that loads it.

* `model_signature`: the model fields that change the weights' shapes or meaning; a
  mismatch is always an error (`ConfigMismatchError` names every field).
* `config_fingerprint`: input size, anchors, preprocessing (OUTPUT_FIELDS) and the loss
  settings (TRAINING_FIELDS): loading or resuming with other values is refused unless
  `allow_config_mismatch` is set, since the weights would silently mean something else.
"""

from __future__ import annotations

import json
from typing import Any

from m2det_jax.errors import ConfigMismatchError

MODEL_FIELDS_THAT_CHANGE_WEIGHTS = (
    "backbone", "num_classes", "planes", "num_levels", "num_scales", "smooth", "sfam",
    "share_ffmv2", "share_sfam", "sfam_reduction", "resnet_width",
)  # fmt: skip




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


TRAINING_FIELDS = ("loss.overlap_thresh", "loss.neg_pos", "train.ema_decay")


def config_fingerprint(cfg) -> dict[str, Any]:
    """{"section.field": value} of OUTPUT_FIELDS and TRAINING_FIELDS, JSON-normalised."""
    out = {}
    for field in OUTPUT_FIELDS + TRAINING_FIELDS:
        section, name = field.split(".")
        out[field] = json.loads(json.dumps(cfg[section][name]))
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
