"""The static settings a jitted post-processing function is built for, read from a config.

`PostprocessSettings` is frozen and hashable: the jitted `detect` / `nms` are cached per
distinct settings. Its first fields are the algorithm (each one is a `cfg.postprocess`
key, or `cfg.anchors.variance`); the last ones are speed-only settings that no config
reaches, on purpose (see the class docstring).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from m2det_jax.config import POSTPROCESS_METHODS


@dataclasses.dataclass(frozen=True)
class PostprocessSettings:
    """The static (hashable) post-processing settings a jitted `detect` / `nms` is built for.

    Algorithm (from the config, see `from_config`): `method`, `iou_threshold`, `sigma`,
    `score_threshold`, `min_score`, `keep_per_class`, `max_per_image`,
    `candidates_per_class`, `pixel_offset`, `variance`, and the run-time choices beyond
    the original: `class_agnostic` (one NMS over all classes per image) and `classes`
    (only these class ids 1..C-1 become candidates; empty: all); `postprocess.agnostic`.

    Speed only: `fast` (False runs the plain implementation alone, the specification in
    `postprocess.plain`), and the sizes of the cheaper layouts the fast path compiles
    (`fast_priors`, `fast_classes`, `fast_candidates`, `tier_classes`, `tier_candidates`,
    `sparse_priors`; see `postprocess.layouts`). Every layout is exact, so the rows never
    depend on them (the tests run detect and nms with fast=False and with small layouts
    and compare). The float32 caveat: a sparse layout of `detect` decodes and soft-maxes
    only gathered priors, which XLA may round differently in the last bit from all
    priors (the package docstring says when that can matter; `nms` is bit for bit).

    They are not config keys because they change no result: the defaults are sized by
    `benchmarks/postprocess_kernels.py` for XLA:CPU, and whoever re-tunes them for another
    machine builds the settings directly (`dataclasses.replace(
    PostprocessSettings.from_config(cfg), ...)`) and passes them wherever a config is
    accepted (`make_detect_fn`, `make_nms_fn`, `detect`, `nms`, `layout_index`).
    """

    method: str = "soft_linear"
    iou_threshold: float = 0.3
    sigma: float = 0.5
    score_threshold: float = 0.1
    min_score: float = 0.001
    keep_per_class: int = 50
    max_per_image: int = 0
    candidates_per_class: int = 1000
    pixel_offset: int = 1
    variance: tuple[float, float] = (0.1, 0.2)
    class_agnostic: bool = False
    classes: tuple[int, ...] = ()
    # Speed only (the same rows).
    fast: bool = True
    fast_priors: int = 256
    fast_classes: int = 8
    fast_candidates: int = 64
    tier_classes: int = 16
    tier_candidates: int = 64
    sparse_priors: int = 512

    def __post_init__(self):
        if self.method not in POSTPROCESS_METHODS:
            raise ValueError(
                f"postprocess.method={self.method!r}: expected one of {POSTPROCESS_METHODS}"
            )
        if self.keep_per_class < 1:
            raise ValueError(f"postprocess.keep_per_class={self.keep_per_class}: must be >= 1")
        if self.candidates_per_class < 1:
            raise ValueError(
                f"postprocess.candidates_per_class={self.candidates_per_class}: must be >= 1"
            )
        if self.max_per_image < 0:
            raise ValueError(f"postprocess.max_per_image={self.max_per_image}: must be >= 0")
        if self.pixel_offset not in (0, 1):
            raise ValueError(f"postprocess.pixel_offset={self.pixel_offset}: 0 or 1")
        if self.method == "soft_gaussian" and self.sigma <= 0:
            raise ValueError(f"postprocess.sigma={self.sigma}: must be > 0")
        if any(int(k) < 1 for k in self.classes):
            raise ValueError(f"postprocess.classes={self.classes}: class ids are 1..C-1")
        if len(self.variance) != 2:
            raise ValueError(f"anchors.variance={self.variance}: two values")

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> PostprocessSettings:
        """The algorithm's fields from `cfg.postprocess` and `cfg.anchors.variance`; the
        speed-only fields keep their defaults."""
        p = cfg.postprocess
        return cls(
            method=str(p.method),
            iou_threshold=float(p.iou_threshold),
            sigma=float(p.sigma),
            score_threshold=float(p.score_threshold),
            min_score=float(p.min_score),
            keep_per_class=int(p.keep_per_class),
            max_per_image=int(p.max_per_image),
            candidates_per_class=int(p.candidates_per_class),
            pixel_offset=int(p.pixel_offset),
            variance=tuple(float(v) for v in cfg.anchors.variance),
            class_agnostic=bool(p.get("class_agnostic", False)),
            classes=tuple(sorted({int(k) for k in p.get("classes", ())})),
        )

    @classmethod
    def of(cls, cfg_or_settings) -> PostprocessSettings:
        """Settings as given, or read from a config."""
        if isinstance(cfg_or_settings, cls):
            return cfg_or_settings
        return cls.from_config(cfg_or_settings)


def standard_postprocess(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `cfg` with the standard (non-legacy) post-processing preset.

    Changes only `postprocess.pixel_offset = 0` (IoU of continuous boxes, without the
    original's +1 pixel) and `postprocess.max_per_image = 100` (the usual COCO cap of 100
    detections per image). Everything else (method, thresholds, keep_per_class) is kept,
    so `cfg.postprocess.method` etc. still decide the NMS flavour.
    """
    out = cfg.copy_and_resolve_references()
    out.postprocess.pixel_offset = 0
    out.postprocess.max_per_image = 100
    return out
