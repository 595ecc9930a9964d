"""The input pipeline: prepared TFDS builder -> grain -> per-host numpy batches.

    it = make_train_iterator(cfg)            # endless, shuffled, augmented
    batch = next(it)                         # dict of numpy arrays, see `iterator`
    state = it.get_state(); it.set_state(state)   # exact resume (JSON-able dict)
    # batch["image"] is uint8 RGB: `m2det_jax.core.preprocess` runs on the device
    it.stats                                 # DataStats: bad data, truncation, ...

    for batch in make_eval_iterator(cfg):    # one pass; every image exactly once
        ...                                  # padded entries have mask False

A batch holds b = global batch / jax.process_count() examples (this host's share) with
keys image, boxes, labels, valid, image_id, image_sizes, mask (`iterator` lists shapes
and dtypes).

Bad data never stops the pipeline; it is counted in `iterator.stats` (`DataStats`):
undecodable images are skipped (train and eval: an image that cannot be decoded cannot
be evaluated either); non-finite boxes and boxes with no area after clipping to [0, 1]
are dropped, partly-outside boxes clipped; an image left with no box is kept (train:
only resized, all `valid` False); boxes beyond G are truncated. Counters live in the
main process (workers send per-example counts with each example) and are part of the
iterator state, so they survive a resume.

The pipeline never knows anchors or the model; making global jax arrays from these
per-host batches is `distributed.py`'s job.
"""

from __future__ import annotations

import math
import os

import grain.python as grain

# Importing jax does not start its backend; only `_shard`'s jax.process_index() /
# process_count() do, when an iterator is made (after jax.distributed.initialize).
import jax
from absl import flags

from m2det_jax.data import builders, schema
from m2det_jax.data.examples import CanvasExample, EvalExample, ExampleParams, TrainExample
from m2det_jax.data.iterator import DetectionIterator, GlobalOrderIterator, GlobalOrderSampler


def _num_workers(cfg, num_workers: int | None) -> int:
    n = cfg.data.num_workers if num_workers is None else num_workers
    if n < 0:  # auto: leave one core for the training loop; on <= 2 cores a worker's
        # IPC costs more than it saves (benchmarks/input_pipeline.py), so stay in-process.
        cpus = os.cpu_count() or 1
        n = 0 if cpus <= 2 else min(8, cpus - 1)
    if n > 0 and not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; outside an absl app nobody parsed
        # them (defaults are what we want).
        flags.FLAGS.mark_as_parsed()
    return int(n)


def _shard(shard_index: int | None, shard_count: int | None, drop_remainder: bool):
    if shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    return grain.ShardOptions(
        shard_index=int(shard_index or 0),
        shard_count=int(shard_count),
        drop_remainder=drop_remainder,
    )


def _per_host(global_batch: int, shard: grain.ShardOptions, what: str) -> int:
    if global_batch % shard.shard_count:
        raise ValueError(
            f"{what}={global_batch} is not divisible by the {shard.shard_count} processes"
        )
    return global_batch // shard.shard_count


def _loader(source, sampler, transform, workers, batch_size, shard_options=None):
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[transform],
        worker_count=workers,
        shard_options=shard_options,
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * batch_size),
    )


def _iterator(source, sampler, transform, workers, batch_size, num_batches, max_bad=1.0):
    loader = _loader(source, sampler, transform, workers, batch_size)
    return DetectionIterator(
        loader,
        batch_size=batch_size,
        image_shape=transform.image_shape,
        max_boxes=transform.p.max_boxes,
        num_batches=num_batches,
        max_bad_fraction=max_bad,
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
    """Endless, shuffled (new order each epoch), augmented train batches for this host:
    its slice of each global batch, which depends on the seed and the batch index only
    (`iterator.GlobalOrderIterator`: 1, 2 or N hosts train on the same batches, and a
    checkpoint resumes on any number of them).

    Args:
      cfg: config (model.input_size, preprocess.*, data.*, train.batch_size, train.seed).
      builder: a prepared TFDS builder; default `builders.open_builder(cfg)`.
      split: default cfg.data.train_split; cfg.data.extra_train_sets follow it.
      global_batch_size: default cfg.train.batch_size; each host gets 1/process_count.
      seed: shuffle + augmentation seed; default cfg.train.seed.
      num_workers: grain worker processes; default cfg.data.num_workers (-1 = auto).
      shard_index, shard_count: this host's shard; default jax.process_index()/count().
    """
    builder = builder if builder is not None else builders.open_builder(cfg)
    source = builders.train_source(cfg, builder, split)
    shard = _shard(shard_index, shard_count, drop_remainder=True)
    big = int(global_batch_size or cfg.train.batch_size)
    b = _per_host(big, shard, "train batch size")
    p = ExampleParams.from_config(cfg)
    transform = CanvasExample(p) if p.canvas else TrainExample(p)
    workers = _num_workers(cfg, num_workers)

    def make_loader(start: int) -> grain.DataLoader:
        sampler = GlobalOrderSampler(
            len(source), seed=int(cfg.train.seed if seed is None else seed), global_batch=big,
            shard_index=shard.shard_index, shard_count=shard.shard_count, start=start)  # fmt: skip
        return _loader(source, sampler, transform, workers, b, grain.NoSharding())

    return GlobalOrderIterator(
        make_loader, global_batch=big, batch_size=b, image_shape=transform.image_shape,
        max_boxes=p.max_boxes, max_bad_fraction=float(cfg.data.max_bad_fraction),
        canvas=p.canvas)


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
    builder = builder if builder is not None else builders.open_builder(cfg)
    source = schema.data_source(builder, split or cfg.data.eval_split)
    shard = _shard(shard_index, shard_count, drop_remainder=False)
    b = _per_host(global_batch_size or cfg.data.eval_batch_size, shard, "eval batch size")
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=shard,
        shuffle=False,
        num_epochs=1,
        seed=0,
    )
    transform = EvalExample(ExampleParams.from_config(cfg))
    num_batches = max(1, math.ceil(math.ceil(len(source) / shard.shard_count) / b))
    return _iterator(source, sampler, transform, _num_workers(cfg, num_workers), b, num_batches,
                     float(cfg.data.max_bad_fraction))  # fmt: skip
