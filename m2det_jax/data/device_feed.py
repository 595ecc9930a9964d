"""Global batches placed on the devices ahead of the step (`DevicePrefetch`), by a reader
thread, so the host pipeline runs while the device computes. Its state is the state of
the batches handed out, not of those read ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax
from jax.sharding import Mesh

from m2det_jax.distributed import global_batch


class DevicePrefetch(Iterator[dict[str, jax.Array]]):
    """Global batches of a per-host numpy batch iterator, `size` batches ahead.

    A background thread reads the next batches (the host pipeline: decode, augment,
    batch) and places them on the devices with the batch sharding while the current
    step runs; `size` = 0 does both in the caller's thread. Order is preserved.
    `get_state()` is the wrapped iterator's state after the last batch handed out (not
    after the ones read ahead), so a checkpoint resumes exactly; `set_state` works before
    the first batch. Errors of the wrapped iterator are raised by `next`.
    """

    _END = object()

    def __init__(self, iterator, mesh: Mesh, size: int = 2):
        self._it, self._mesh, self._size = iterator, mesh, int(size)
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = None

    def __iter__(self):
        return self

    def _read(self):
        """(global batch, state after it) of the next batch, or _END."""
        try:
            local = next(self._it)
        except StopIteration:
            return self._END
        state = self._it.get_state() if hasattr(self._it, "get_state") else None
        return global_batch(local, self._mesh), state

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._read()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is self._END or isinstance(item, BaseException):
                return

    def __next__(self) -> dict[str, jax.Array]:
        if self._size <= 0:
            item = self._read()
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self._size)
                self._thread = threading.Thread(target=self._produce, daemon=True,
                                                name="m2det-device-prefetch")  # fmt: skip
                self._thread.start()
            item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is self._END:
            raise StopIteration
        batch, self._state = item
        return batch

    def get_state(self) -> Any:
        return self._state if self._state is not None else self._it.get_state()

    def set_state(self, state) -> None:
        if self._thread is not None:
            raise RuntimeError("DevicePrefetch.set_state after the first batch")
        self._it.set_state(state)
        self._state = None

    @property
    def stats(self):
        """The wrapped iterator's `DataStats` (it may have read `size` batches ahead)."""
        return getattr(self._it, "stats", None)

    def close(self) -> None:
        """Stops the reader thread (batches read ahead are dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
