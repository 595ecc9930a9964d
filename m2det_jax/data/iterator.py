"""Batching: per-example dicts from a grain DataLoader -> uint8 per-host batches.

A batch (b examples, G = max boxes, S = input size):
    image        uint8   [b, S, S, 3]  RGB pixels (zeros on padding); the channel order,
                                       means and scale are applied on the device
                                       (`m2det_jax.core.preprocess`, inside the jitted program)
    boxes        float32 [b, G, 4]     normalized [x1, y1, x2, y2], zero padded
    labels       int32   [b, G]        1..C-1 (0 on padding)
    valid        bool    [b, G]
    image_id     int64   [b]           (-1 on padding)
    image_sizes  int32   [b, 2]        (height, width) of the stored image (0 on padding)
    mask         bool    [b]           False only on eval padding
and, for training with `data.augment_on_device`, image is the uint8 canvas [b, C, C, 3]
and `canvas_sizes` int32 [b, 2] the (height, width) the image covers on it.

The iterator is checkpointable (`get_state` / `set_state`, JSON-able) and keeps the
running `DataStats` of everything it consumed, as part of that state.

Training uses `GlobalOrderIterator`: global batch k is examples k*B .. k*B+B-1 of one
seeded, endlessly reshuffled stream, and each of H hosts reads its B/H slice of it, so the
batches depend on (seed, k) only, never on how many hosts read them. Its state is the
stream position (examples consumed), the same on every host; an undecodable image keeps
its slot as an empty, masked example (no boxes, no loss) instead of pulling the next
example forward, which would shift the other hosts' slices.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grain.python as grain
import numpy as np

from m2det_jax.data import records
from m2det_jax.errors import BadDataError

# Per-example keys stacked into a batch (`mask` is added by the iterator).
BATCH_KEYS = ("image", "boxes", "labels", "valid", "image_id", "image_sizes")
CANVAS_KEYS = ("canvas_sizes",)  # stacked too for canvas examples (augment_on_device)


@dataclasses.dataclass
class DataStats:
    """Running counts of what the pipeline read, skipped, dropped or changed.

    Keys are `records.STAT_KEYS` (examples, bad_images, bad_boxes, clipped_boxes,
    crowd_boxes, empty_images, truncated_boxes, augment_fallbacks).
    """

    counts: dict[str, int] = dataclasses.field(default_factory=records.new_stats)

    def add(self, other: dict[str, int]) -> None:
        for k, v in other.items():
            self.counts[k] = self.counts.get(k, 0) + int(v)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def __repr__(self) -> str:
        return "DataStats(" + ", ".join(f"{k}={v}" for k, v in self.counts.items()) + ")"


_BAD = object()  # an undecodable example, where its slot is kept (fill_bad)
CHECK_AFTER = 64  # examples read before the bad-image fraction is judged




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
        image_shape: tuple[int, int, int],
        max_boxes: int,
        num_batches: int | None,
        max_bad_fraction: float = 1.0,
        fill_bad: bool = False,
        canvas: bool = False,
    ):
        self._loader = loader
        self._max_bad = float(max_bad_fraction)
        self._fill_bad = fill_bad
        self._keys = BATCH_KEYS + (CANVAS_KEYS if canvas else ())
        self._it = None  # iter(loader) on first use: worker processes start then
        self.batch_size = batch_size
        self._image_shape = tuple(image_shape)
        self._max_boxes = max_boxes
        self.num_batches = num_batches
        self._emitted = 0
        self._exhausted = False
        self.stats = DataStats()

    def __iter__(self):
        return self

    def _iterator(self):
        if self._it is None:
            self._it = iter(self._loader)
        return self._it

    def _next_example(self) -> dict | None:
        """Next good example (with fill_bad, `_BAD` for an undecodable one), or None when
        the (finite) stream ends."""
        while not self._exhausted:
            try:
                ex = next(self._iterator())
            except StopIteration:
                self._exhausted = True
                return None
            self.stats.add(dict(zip(records.STAT_KEYS, ex["stats"].tolist(), strict=True)))
            if bool(ex["ok"]):
                return ex
            self._check_bad()
            if self._fill_bad:
                return _BAD
        return None

    def _check_bad(self) -> None:
        """BadDataError once more than max_bad_fraction of >= CHECK_AFTER examples read
        could not be decoded (an all-corrupt training set would otherwise spin forever)."""
        n, bad = self.stats.counts["examples"], self.stats.counts["bad_images"]
        if n >= CHECK_AFTER and bad > self._max_bad * n:
            raise BadDataError(
                f"data: {bad} of the {n} examples read do not decode (bad_images), more than "
                f"data.max_bad_fraction={self._max_bad}: check the dataset's image files")

    def _padding(self) -> dict:
        g = self._max_boxes
        pad = {
            "image": np.zeros(self._image_shape, np.uint8),
            "boxes": np.zeros((g, 4), np.float32),
            "labels": np.zeros((g,), np.int32),
            "valid": np.zeros((g,), bool),
            "image_id": np.int64(-1),
            "image_sizes": np.zeros((2,), np.int32),
            "canvas_sizes": np.asarray(self._image_shape[:2], np.int32),  # a whole canvas
        }
        return {k: pad[k] for k in self._keys}

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self._emitted >= self.num_batches:
            raise StopIteration
        examples, mask = [], []
        for _ in range(self.batch_size):
            ex = self._next_example()
            if ex is _BAD:
                mask.append(False)
                examples.append(self._padding())
            elif ex is None:
                if self.num_batches is None:  # a finite stream without a batch count
                    if not examples:
                        raise StopIteration
                mask.append(False)
                examples.append(self._padding())
            else:
                mask.append(True)
                examples.append(ex)
        self._emitted += 1
        batch = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in self._keys}
        batch["image_id"] = batch["image_id"].astype(np.int64)
        batch["image_sizes"] = batch["image_sizes"].astype(np.int32)
        batch["mask"] = np.asarray(mask, bool)
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable state; `set_state` on a fresh iterator resumes exactly."""
        return {
            "grain": self._iterator().get_state().decode(),
            "emitted": self._emitted,
            "exhausted": self._exhausted,
            "stats": self.stats.as_dict(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator().set_state(state["grain"].encode())
        self._emitted = int(state["emitted"])
        self._exhausted = bool(state["exhausted"])
        self.stats = DataStats(dict(state["stats"]))


class GlobalOrderSampler:
    """A grain sampler: host `shard_index` of `shard_count`'s slice of the global batch
    sequence, from stream position `start` on.

    Local index j of the host is stream position start + (j // b) * B + h * b + j % b
    (B the global batch, b = B / H); position p is record `perm_e(p mod n)` of epoch
    e = p // n under grain's seeded shuffle, with the per-example random generator of
    (seed + p). So example p, its record and its augmentation are the same whatever H is.
    """

    def __init__(self, num_records: int, *, seed: int, global_batch: int, shard_index: int,
                 shard_count: int, start: int = 0):  # fmt: skip
        self._base = grain.IndexSampler(num_records=num_records, shuffle=True,
                                        num_epochs=None, seed=seed)  # fmt: skip
        self._big, self._small = global_batch, global_batch // shard_count
        self._offset = start + shard_index * self._small

    def __len__(self) -> int:
        return sys.maxsize  # endless

    def position(self, index: int) -> int:
        return self._offset + (index // self._small) * self._big + index % self._small

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        return self._base[self.position(index)]


class GlobalOrderIterator(DetectionIterator):
    """Endless training batches in the global order of `GlobalOrderSampler`.

    `make_loader(start)` returns the grain DataLoader reading this host's slice from
    stream position `start`. State: {"position": examples of the global stream consumed,
    "global_batch", "stats": this host's DataStats}; everything but the stats is the same
    on every host, and `set_state` accepts it from a run with any number of hosts.
    """

    def __init__(self, make_loader: Callable[[int], grain.DataLoader], *, global_batch: int,
                 **kwargs):  # fmt: skip
        self._make_loader = make_loader
        self.global_batch = int(global_batch)
        self._start = 0
        super().__init__(make_loader(0), num_batches=None, fill_bad=True, **kwargs)

    @property
    def position(self) -> int:
        """Examples of the global stream consumed (by all hosts together)."""
        return self._start + self._emitted * self.global_batch

    def get_state(self) -> dict[str, Any]:
        return {"position": self.position, "global_batch": self.global_batch,
                "stats": self.stats.as_dict()}  # fmt: skip

    def set_state(self, state: dict[str, Any]) -> None:
        if "position" not in state:
            raise ValueError(f"not a training-iterator state (no 'position'): {sorted(state)}")
        self._start = int(state["position"])
        self._loader, self._it = self._make_loader(self._start), None
        self._emitted, self._exhausted = 0, False
        self.stats = DataStats()  # every key, also where the state carries none (process > 0)
        self.stats.add(state.get("stats", {}))


def state_to_json(state: dict[str, Any]) -> str:
    """`DetectionIterator.get_state()` as a JSON string (for a checkpoint's side file)."""
    return json.dumps(state)
