"""Device mesh and shardings, in one place (data parallel by default).

One `Mesh` spans every device of every process. Batches are sharded along DATA_AXIS and
parameters are replicated, so `jax.jit` reduces BatchNorm statistics and gradients over
the global batch. Per-host numpy batches become global arrays in `global_batch`;
`DevicePrefetch` does that a few batches ahead, in a background thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices).reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of the global batch; errors name the offending value."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if global_batch_size % n_dev:
        raise ValueError(
            f"train.batch_size={global_batch_size} is not divisible by the {n_dev} devices"
        )
    return global_batch_size // n_proc


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global arrays sharded along the batch axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


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


def replicate(tree, mesh: Mesh):
    """Places a host pytree on every device of the mesh (same value on every process)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(
        np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), tree)  # fmt: skip


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           timeout_s: int = 300) -> None:  # fmt: skip
    """`jax.distributed.initialize` with explicit flags, or auto-detection on TPU pods and
    SLURM; a single process without flags needs nothing. Call before any other JAX use."""
    if coordinator_address is not None:
        jax.distributed.initialize(
            coordinator_address, num_processes, process_id, initialization_timeout=timeout_s
        )
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ \
            or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:  # fmt: skip
        jax.distributed.initialize(initialization_timeout=timeout_s)


def sum_over_processes(counts: dict[str, int]) -> dict[str, int]:
    """{key: sum over processes} of every process's integer counts with the same keys (a
    collective: every process calls it; int32 sums)."""
    if jax.process_count() == 1:
        return dict(counts)
    keys = sorted(counts)
    local = np.asarray([int(counts[k]) for k in keys], np.int32)
    total = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(keys)).sum(0)
    return {k: int(v) for k, v in zip(keys, total, strict=True)}


def check_same_on_processes(value, what: str) -> None:
    """Raises RuntimeError unless the JSON of `value` is the same on every process (a
    collective: a digest of it is all-gathered)."""
    if jax.process_count() == 1:
        return
    text = json.dumps(value, sort_keys=True)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1, digest.size)
    if not (gathered == gathered[:1]).all():
        raise RuntimeError(f"{what} differs between processes (process "
                           f"{jax.process_index()}: {text[:200]})")  # fmt: skip
