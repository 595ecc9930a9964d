"""A detector in one call: `m2det_jax.Detector`.

    detector = m2det_jax.Detector.from_checkpoint("/tmp/shapes")   # a training workdir,
    result = detector("photo.jpg")                                  # a converted checkpoint
    print(result.names, result.scores)                              # or an export folder
    result.draw().save("boxes.png")
    json.dumps(result.to_json())

The config comes from the checkpoint (the `config.json` of a workdir or export folder, or
the config stored with a converted checkpoint) unless one is given; the class names from
the labels stored with it. Images are file paths, uint8 RGB arrays [H, W, 3] of any size,
lists of either, or a batch array [B, H, W, 3]; they run through `make_detector` (fixed
batches split over the local devices, one compilation).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from m2det_jax.checkpoints.variables import load_variables, read_labels, read_meta
from m2det_jax.config import (
    apply_overrides,
    config_from_json,
    load_config,
    run_config_file,
    validate,
)
from m2det_jax.inference.detector import make_detector
from m2det_jax.inference.image_files import (
    class_ids,
    detections_to_records,
    draw_detections,
    load_image,
)


@dataclasses.dataclass
class Detections:
    """The detections of one image, highest score first; boxes [N, 4] x1, y1, x2, y2 in
    the image's pixels, scores [N], class_ids [N] (model classes 1..C-1), names [N]."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    names: list[str]
    image: np.ndarray | None = None  # the uint8 RGB input, for `draw`

    def __len__(self) -> int:
        return len(self.scores)

    def to_json(self) -> list[dict[str, Any]]:
        """[{"box": [x1, y1, x2, y2], "score", "class", "label"}] (what `m2det detect`
        writes per image)."""
        return [{"box": [round(float(v), 2) for v in b], "score": round(float(s), 5),
                 "class": int(c), "label": n}
                for b, s, c, n in zip(self.boxes, self.scores, self.class_ids, self.names,
                                      strict=True)]  # fmt: skip

    def draw(self, image: np.ndarray | None = None) -> Image.Image:
        """The image (default: the one detected) with labelled boxes."""
        image = self.image if image is None else image
        if image is None:
            raise ValueError("draw: no image (pass the image the detections belong to)")
        return draw_detections(np.asarray(image, np.uint8), self.to_json())


def with_postprocess(cfg, *, classes=None, max_det: int = 0, agnostic: bool = False):
    """`cfg` with the run-time NMS choices set (a validated, locked copy; `cfg` itself
    when nothing changes): `postprocess.classes` (ids), `postprocess.max_per_image`
    (when max_det > 0), `postprocess.class_agnostic` (when agnostic)."""
    changes = {}
    if classes:
        changes["classes"] = tuple(sorted(int(k) for k in classes))
    if max_det > 0:
        changes["max_per_image"] = int(max_det)
    if agnostic:
        changes["class_agnostic"] = True
    if not changes:
        return cfg
    out = cfg.copy_and_resolve_references()
    out.unlock()
    for k, v in changes.items():
        out.postprocess[k] = v
    validate(out)
    out.lock()
    return out


def _config_of(path: str, overrides: Sequence[str]):
    """The config stored with a checkpoint, overridden, validated and locked."""
    run_file = run_config_file(path)
    if run_file is not None:
        return load_config(run_file, overrides)
    meta = read_meta(path)
    if not meta.get("config"):
        raise ValueError(f"{path}: no config stored with this checkpoint; pass config=")
    cfg = config_from_json(meta["config"])
    apply_overrides(cfg, overrides)
    validate(cfg)
    cfg.lock()
    return cfg


class Detector:
    """Callable detector: `Detector(cfg, variables)(images)`; see the module docstring."""

    def __init__(self, cfg, variables, *, class_names: Sequence[str] | None = None,
                 score_threshold: float = 0.3, batch_size: int = 1,
                 tta_sizes: Sequence[int] | None = None, tta_flip: bool = False,
                 classes: str | Sequence[int | str] | None = None, max_det: int = 0,
                 agnostic: bool = False, exif: bool = False):  # fmt: skip
        """classes: detect only these (ids 1..C-1 or names, or "person,car"; the others
        never enter the NMS); max_det: at most this many detections per image, highest
        scores (0: the config's `postprocess.max_per_image`); agnostic: one NMS over all
        classes (`postprocess.class_agnostic`); exif: turn image files as their EXIF
        orientation says (arrays are taken as they are)."""
        self.exif = bool(exif)
        self.class_names = list(class_names) if class_names else None
        self.classes = class_ids(classes, self.class_names)
        self.max_det = int(max_det)
        self.cfg = cfg = with_postprocess(cfg, classes=self.classes, max_det=self.max_det,
                                          agnostic=agnostic)  # fmt: skip
        self.score_threshold = float(score_threshold)
        self._run = make_detector(cfg, variables, batch_size=batch_size, tta_sizes=tta_sizes,
                                  tta_flip=tta_flip)  # fmt: skip
        self.batch_size = int(batch_size)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, config: str | os.PathLike | None = None,
                        overrides: Sequence[str] = (), **kwargs) -> Detector:  # fmt: skip
        """A detector for the checkpoint at `path` (a training workdir, an `m2det convert`
        output or an `m2det export` folder); `config` (a config file or shipped name)
        replaces the stored config; `overrides` are "a.b=value" strings; `kwargs` go to
        `Detector` (score_threshold, batch_size, tta_sizes, tta_flip, class_names,
        classes, max_det, agnostic, exif)."""
        path = os.fspath(path)
        cfg = load_config(config, overrides) if config is not None else _config_of(path, overrides)
        variables = load_variables(path, cfg)
        if kwargs.get("class_names") is None:
            kwargs["class_names"] = (read_labels(path) or {}).get("class_names")
        return cls(cfg, variables, **kwargs)

    def __call__(self, images) -> Detections | list[Detections]:
        """Detections of one image (a path or an [H, W, 3] array) or, for a list or a
        [B, H, W, 3] batch, a list of them."""
        single = isinstance(images, (str, os.PathLike)) or (
            isinstance(images, np.ndarray) and images.ndim == 3)
        items = [images] if single else list(images)
        arrays = [self._image(x) for x in items]
        out: list[Detections] = []
        for start in range(0, len(arrays), self.batch_size):
            chunk = arrays[start:start + self.batch_size]
            dets = self._run(chunk)
            for i, im in enumerate(chunk):
                recs = detections_to_records(dets, i, im.shape[1], im.shape[0],
                                             self.score_threshold, self.class_names,
                                             self.classes, self.max_det)  # fmt: skip
                out.append(Detections(
                    boxes=np.array([r["box"] for r in recs], np.float32).reshape(-1, 4),
                    scores=np.array([r["score"] for r in recs], np.float32),
                    class_ids=np.array([r["class"] for r in recs], np.int32),
                    names=[r["label"] for r in recs], image=im))  # fmt: skip
        return out[0] if single else out

    def _image(self, x) -> np.ndarray:
        if isinstance(x, (str, os.PathLike)):
            im = load_image(os.fspath(x), self.exif)
            if im is None:
                raise ValueError(f"{os.fspath(x)}: not a readable image")
            return im
        im = np.asarray(x)
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"an image must be [H, W, 3] RGB, got shape {im.shape}")
        return im.astype(np.uint8, copy=False)

