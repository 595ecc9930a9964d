"""The input pipeline as the training loop sees it: the train iterator factory, the data
counts it reports, and its state on the way into and out of a checkpoint.

A checkpoint holds one iterator state for the whole run: its position in the global batch
sequence (checked to be the same on every process) and the data counts summed over
processes; on restore the counts go back to process 0 only, so they are counted once on
any topology.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax

from m2det_jax import data
from m2det_jax import distributed as shd


def tfds_train_data(cfg, builder=None) -> tuple[Callable[..., Iterator], int]:
    """The grain pipeline of `m2det_jax.data` as (iterator factory, dataset size);
    `builder` default `data.open_builder(cfg)`."""
    builder = builder if builder is not None else data.open_builder(cfg)
    n = len(data.train_source(cfg, builder))  # with "+" splits, "trainval" and extra sets

    def make(cfg, process_index, process_count):
        return data.make_train_iterator(
            cfg, builder=builder, global_batch_size=cfg.train.batch_size,
            shard_index=process_index, shard_count=process_count)  # fmt: skip

    return make, n


def data_counts(data_iter) -> dict[str, float]:
    """The input pipeline's `DataStats` of the whole run, summed over processes, as
    `data_<key>` columns of metrics.jsonl / TensorBoard; empty for iterators without stats.
    A collective: every process calls it at the same step."""
    stats = getattr(data_iter, "stats", None)
    counts = shd.sum_over_processes(stats.as_dict()) if hasattr(stats, "as_dict") else {}
    return {f"data_{k}": float(v) for k, v in counts.items()}


def global_data_state(state):
    """The train iterator's state as a checkpoint holds it: checked to be the same on every
    process (its position in the global batch sequence), `stats` summed over them. A
    collective."""
    if isinstance(state, bytes):
        state = state.decode()
    if not (isinstance(state, dict) and "stats" in state):
        shd.check_same_on_processes(state, "the input iterator's state")
        return state
    position = {k: v for k, v in state.items() if k != "stats"}
    shd.check_same_on_processes(position, "the input iterator's position")
    return {**position, "stats": shd.sum_over_processes(state["stats"])}


def local_data_state(state):
    """A checkpoint's iterator state for this process: the run's data counts go to
    process 0 only, so that summing over processes counts them once, on any topology."""
    if isinstance(state, dict) and "stats" in state and jax.process_index() != 0:
        return {**state, "stats": {}}
    return state


def missing_eval_split(cfg, builder=None) -> str | None:
    """Why cfg.data.eval_split cannot be evaluated (None when it can): checked before
    training, so a run without a validation split trains and says so instead of failing
    at its final evaluation."""
    builder = builder if builder is not None else data.open_builder(cfg)
    try:
        data.data_source(builder, cfg.data.eval_split)
    except FileNotFoundError:
        hint = (" (a coco_folder gets one from data.eval_annotation_file)"
                if cfg.data.dataset == "coco_folder" else "")  # fmt: skip
        return (f"dataset {cfg.data.dataset!r} has no split {cfg.data.eval_split!r} "
                f"(splits: {sorted(builder.info.splits)}); set data.eval_split{hint}")
    return None


def checkpoint_data_state(batches, data_iter):
    """What a checkpoint stores of the input: the state after the last batch the step used
    (`batches`, the device feed, reads ahead), made global (`global_data_state`); None for
    an iterator without state. A collective."""
    state = batches.get_state() if hasattr(data_iter, "get_state") else None
    return global_data_state(state)


def restore_data_state(data_iter, state) -> None:
    """Puts a checkpoint's input state back into this process's iterator
    (`local_data_state`), before the first batch is read."""
    if state is not None and hasattr(data_iter, "set_state"):
        data_iter.set_state(local_data_state(state))
