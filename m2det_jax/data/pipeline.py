"""The input pipeline: TFDS array_record -> grain -> per-host numpy batches.

    it = make_train_iterator(cfg)            # endless, shuffled, augmented
    batch = next(it)                         # dict of numpy arrays, see below
    state = it.get_state(); it.set_state(state)   # exact resume (JSON-able dict)
    it.stats                                 # DataStats: bad data, truncation, ...

    for batch in make_eval_iterator(cfg):    # one pass; every image exactly once
        ...                                  # padded entries have mask False

A batch (per host; b = global batch / jax.process_count(), G = cfg.data.max_boxes):
    image      float32 [b, S, S, 3]  (pixels in cfg.preprocess.channel_order - means) / scale
    boxes      float32 [b, G, 4]     normalized [x1, y1, x2, y2], zero padded
    labels     int32   [b, G]        1..C-1 (0 on padding)
    valid      bool    [b, G]
    image_id   int64   [b]           (-1 on padding)
    orig_size  int32   [b, 2]        (height, width) of the stored image
    mask       bool    [b]           False only on eval padding

Bad data never stops the pipeline; it is counted in `iterator.stats` (`DataStats`):
undecodable images are skipped (train and eval: an image that cannot be decoded cannot
be evaluated either); non-finite boxes and boxes with no area after clipping to [0, 1]
are dropped, partly-outside boxes clipped; an image left with no box is kept (train:
only resized, all `valid` False); boxes beyond G are truncated. Counters live in the
main process (workers send per-example counts with each example) and are part of the
iterator state, so they survive a resume.

The pipeline never knows anchors or the model; making global jax arrays from these
per-host batches is `sharding.py`'s job.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import grain.python as grain
import numpy as np

from m2det_jax.data import augment, sources

# --------------------------------------------------------------------------- stats


@dataclasses.dataclass
class DataStats:
    """Running counts of what the pipeline read, skipped, dropped or changed.

    Keys are `sources.STAT_KEYS` (examples, bad_images, bad_boxes, clipped_boxes,
    crowd_boxes, empty_images, truncated_boxes, augment_fallbacks).
    """

    counts: dict[str, int] = dataclasses.field(default_factory=sources.new_stats)

    def add(self, other: dict[str, int]) -> None:
        for k, v in other.items():
            self.counts[k] = self.counts.get(k, 0) + int(v)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def __repr__(self) -> str:
        return "DataStats(" + ", ".join(f"{k}={v}" for k, v in self.counts.items()) + ")"


# ---------------------------------------------------------------- per-example ops


def _pad(boxes: np.ndarray, labels: np.ndarray, max_boxes: int, stats: dict) -> dict:
    n = len(boxes)
    if n > max_boxes:
        stats["truncated_boxes"] += n - max_boxes
        n = max_boxes
    out_b = np.zeros((max_boxes, 4), np.float32)
    out_l = np.zeros((max_boxes,), np.int32)
    out_b[:n] = boxes[:n]
    out_l[:n] = labels[:n]
    if n == 0:
        stats["empty_images"] += 1
    return {"boxes": out_b, "labels": out_l, "valid": np.arange(max_boxes) < n}


def _stats_array(stats: dict) -> np.ndarray:
    return np.array([stats[k] for k in sources.STAT_KEYS], np.int64)


@dataclasses.dataclass(frozen=True)
class _Params:
    size: int
    max_boxes: int
    include_crowd: bool
    expand_prob: float
    fill_rgb: tuple[int, int, int]


class _TrainExample(grain.RandomMapTransform):
    """Record -> augmented uint8 example (or a skip marker), with its counts."""

    def __init__(self, p: _Params):
        self.p = p

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        ex, stats = sources.decode_record(record, self.p.include_crowd)
        if ex is None:
            return {"ok": np.bool_(False), "stats": _stats_array(stats)}
        img, boxes, labels, fell_back = augment.train_augment(
            ex["image"],
            ex["boxes"],
            ex["labels"],
            rng,
            size=self.p.size,
            fill_rgb=self.p.fill_rgb,
            expand_prob=self.p.expand_prob,
        )
        stats["augment_fallbacks"] += int(fell_back)
        out = {
            "ok": np.bool_(True),
            "image": img,
            "image_id": ex["image_id"],
            "orig_size": ex["orig_size"],
        }
        out.update(_pad(boxes, labels, self.p.max_boxes, stats))
        out["stats"] = _stats_array(stats)
        return out


class _EvalExample(grain.MapTransform):
    """Record -> resized (cv2-style bilinear) uint8 example, boxes unchanged."""

    def __init__(self, p: _Params):
        self.p = p

    def map(self, record: dict) -> dict:
        ex, stats = sources.decode_record(record, self.p.include_crowd)
        if ex is None:
            return {"ok": np.bool_(False), "stats": _stats_array(stats)}
        out = {
            "ok": np.bool_(True),
            "image": augment.resize_bilinear(ex["image"], self.p.size),
            "image_id": ex["image_id"],
            "orig_size": ex["orig_size"],
        }
        out.update(_pad(ex["boxes"], ex["labels"], self.p.max_boxes, stats))
        out["stats"] = _stats_array(stats)
        return out


# ---------------------------------------------------------------------- iterator


class DetectionIterator(Iterator[dict[str, np.ndarray]]):
    """Batches examples from a grain DataLoader; checkpointable; counts bad data.

    Batching happens here, in the main process, so skipped examples never leave a hole:
    the grain state after a batch is exactly "after the last example it used".

    Attributes:
      stats: `DataStats` of everything consumed so far.
      num_batches: batches per pass (eval: the same on every host), None if endless.
    """

    def __init__(
        self,
        loader: grain.DataLoader,
        *,
        batch_size: int,
        size: int,
        max_boxes: int,
        channel_order: str,
        pixel_means,
        pixel_scale: float,
        num_batches: int | None,
    ):
        self._loader = loader
        self._it = iter(loader)
        self.batch_size = batch_size
        self._size = size
        self._max_boxes = max_boxes
        self._norm = (channel_order, tuple(pixel_means), float(pixel_scale))
        self.num_batches = num_batches
        self._emitted = 0
        self._exhausted = False
        self.stats = DataStats()

    def __iter__(self):
        return self

    def _next_example(self) -> dict | None:
        """Next good example, or None when the (finite) stream ends."""
        while not self._exhausted:
            try:
                ex = next(self._it)
            except StopIteration:
                self._exhausted = True
                return None
            self.stats.add(dict(zip(sources.STAT_KEYS, ex["stats"].tolist(), strict=True)))
            if bool(ex["ok"]):
                return ex
        return None

    def _padding(self) -> dict:
        g, s = self._max_boxes, self._size
        return {
            "image": np.zeros((s, s, 3), np.uint8),
            "boxes": np.zeros((g, 4), np.float32),
            "labels": np.zeros((g,), np.int32),
            "valid": np.zeros((g,), bool),
            "image_id": np.int64(-1),
            "orig_size": np.zeros((2,), np.int32),
        }

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self._emitted >= self.num_batches:
            raise StopIteration
        examples, mask = [], []
        for _ in range(self.batch_size):
            ex = self._next_example()
            if ex is None:
                if self.num_batches is None:  # a finite stream without a batch count
                    if not examples:
                        raise StopIteration
                mask.append(False)
                examples.append(self._padding())
            else:
                mask.append(True)
                examples.append(ex)
        self._emitted += 1
        batch = {
            k: np.stack([np.asarray(e[k]) for e in examples])
            for k in ("image", "boxes", "labels", "valid", "image_id", "orig_size")
        }
        batch["image"] = augment.normalize(batch["image"], *self._norm)
        batch["image"][~np.asarray(mask)] = 0.0
        batch["image_id"] = batch["image_id"].astype(np.int64)
        batch["orig_size"] = batch["orig_size"].astype(np.int32)
        batch["mask"] = np.asarray(mask, bool)
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable state; `set_state` on a fresh iterator resumes exactly."""
        return {
            "grain": self._it.get_state().decode(),
            "emitted": self._emitted,
            "exhausted": self._exhausted,
            "stats": self.stats.as_dict(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(state["grain"].encode())
        self._emitted = int(state["emitted"])
        self._exhausted = bool(state["exhausted"])
        self.stats = DataStats(dict(state["stats"]))


# ------------------------------------------------------------------------ makers


def _num_workers(cfg, num_workers: int | None) -> int:
    n = cfg.data.num_workers if num_workers is None else num_workers
    if n < 0:  # auto: leave one core for the training loop; on <= 2 cores a worker's
        # IPC costs more than it saves (benchmarks/input_pipeline.py), so stay in-process.
        cpus = os.cpu_count() or 1
        n = 0 if cpus <= 2 else min(8, cpus - 1)
    if n > 0:
        # grain's worker processes read absl flags; outside an absl app nobody parsed
        # them (defaults are what we want).
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    return int(n)


def _shard(shard_index: int | None, shard_count: int | None, drop_remainder: bool):
    if shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    return grain.ShardOptions(
        shard_index=int(shard_index or 0),
        shard_count=int(shard_count),
        drop_remainder=drop_remainder,
    )


def _params(cfg) -> _Params:
    pp = cfg.preprocess
    return _Params(
        size=int(cfg.model.input_size),
        max_boxes=int(cfg.data.max_boxes),
        include_crowd=bool(cfg.data.include_crowd),
        expand_prob=float(cfg.data.expand_prob),
        fill_rgb=augment.fill_rgb_from(pp.channel_order, pp.pixel_means),
    )


def _per_host(global_batch: int, shard: grain.ShardOptions, what: str) -> int:
    if global_batch % shard.shard_count:
        raise ValueError(
            f"{what}={global_batch} is not divisible by the {shard.shard_count} processes"
        )
    return global_batch // shard.shard_count


def _iterator(cfg, loader, batch_size, num_batches) -> DetectionIterator:
    pp = cfg.preprocess
    return DetectionIterator(
        loader,
        batch_size=batch_size,
        size=int(cfg.model.input_size),
        max_boxes=int(cfg.data.max_boxes),
        channel_order=pp.channel_order,
        pixel_means=pp.pixel_means,
        pixel_scale=pp.pixel_scale,
        num_batches=num_batches,
    )


def make_train_iterator(
    cfg,
    *,
    builder=None,
    split: str | None = None,
    global_batch_size: int | None = None,
    seed: int | None = None,
    num_workers: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> DetectionIterator:
    """Endless, shuffled (new order each epoch), augmented train batches for this host.

    Args:
      cfg: config (model.input_size, preprocess.*, data.*, train.batch_size, train.seed).
      builder: a prepared TFDS builder; default `sources.open_builder(cfg)`.
      split: default cfg.data.train_split.
      global_batch_size: default cfg.train.batch_size; each host gets 1/process_count.
      seed: shuffle + augmentation seed; default cfg.train.seed.
      num_workers: grain worker processes; default cfg.data.num_workers (-1 = auto).
      shard_index, shard_count: this host's shard; default jax.process_index()/count().
    """
    builder = builder if builder is not None else sources.open_builder(cfg)
    source = sources.data_source(builder, split or cfg.data.train_split)
    shard = _shard(shard_index, shard_count, drop_remainder=True)
    b = _per_host(global_batch_size or cfg.train.batch_size, shard, "train batch size")
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=shard,
        shuffle=True,
        num_epochs=None,
        seed=int(cfg.train.seed if seed is None else seed),
    )
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[_TrainExample(_params(cfg))],
        worker_count=_num_workers(cfg, num_workers),
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * b),
    )
    return _iterator(cfg, loader, b, None)


def make_eval_iterator(
    cfg,
    *,
    builder=None,
    split: str | None = None,
    global_batch_size: int | None = None,
    num_workers: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> DetectionIterator:
    """One in-order pass over this host's shard of `split`, resize + means only.

    Every host yields the same number of batches (`iterator.num_batches`), ceil of the
    largest shard over the per-host batch; the tail is padded with mask False, so each
    image of the split is seen exactly once across hosts (undecodable ones: never).
    Same arguments as `make_train_iterator`; global_batch_size defaults to
    cfg.data.eval_batch_size, split to cfg.data.eval_split.
    """
    builder = builder if builder is not None else sources.open_builder(cfg)
    source = sources.data_source(builder, split or cfg.data.eval_split)
    shard = _shard(shard_index, shard_count, drop_remainder=False)
    b = _per_host(global_batch_size or cfg.data.eval_batch_size, shard, "eval batch size")
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=shard,
        shuffle=False,
        num_epochs=1,
        seed=0,
    )
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[_EvalExample(_params(cfg))],
        worker_count=_num_workers(cfg, num_workers),
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * b),
    )
    largest_shard = math.ceil(len(source) / shard.shard_count)
    return _iterator(cfg, loader, b, max(1, math.ceil(largest_shard / b)))


def state_to_json(state: dict[str, Any]) -> str:
    """`DetectionIterator.get_state()` as a JSON string (for a checkpoint's side file)."""
    return json.dumps(state)
