"""Processes and devices, in one place: `jax.distributed` initialisation, the mesh and its
shardings (data parallel by default), per-host numpy -> global arrays, and the small
collectives the loop needs (sums and agreement checks over processes).

One `Mesh` spans every device of every process. Batches are sharded along DATA_AXIS and
parameters are replicated, so `jax.jit` reduces BatchNorm statistics and gradients over
the global batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

try:  # private; only to forget a memoised answer (guard_compilation_cache)
    from jax._src import compilation_cache as _compilation_cache
except ImportError:  # pragma: no cover - a JAX without it
    _compilation_cache = None

DATA_AXIS = "data"

_log = logging.getLogger(__name__)


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


def guard_compilation_cache() -> bool:
    """Turns JAX's persistent compilation cache off for a multi-process run on CPU with
    jax >= 0.11, and says so; True when it did. There the cache key differs per process
    while only process 0 writes entries, so a second run loads cached programs on process 0
    and compiles them on the others, and the first collective between the two kinds hangs
    (measured with jax 0.12.1: a 2-process resume never finished its first step). Single
    processes, accelerators and jax 0.10 keep the cache."""
    if jax.process_count() == 1 or jax.default_backend() != "cpu":
        return False
    if tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 11):
        return False
    if not (jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache):
        return False
    jax.config.update("jax_enable_compilation_cache", False)
    if hasattr(_compilation_cache, "reset_cache"):  # "is the cache used" is memoised at the
        _compilation_cache.reset_cache()  # first compile: forget the answer
    _log.warning("persistent compilation cache off: %d processes on CPU with jax %s load "
                 "cached programs on process 0 only and hang at the first collective",
                 jax.process_count(), jax.__version__)  # fmt: skip
    return True


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
