"""SIGTERM during training: the flag the loop checks, agreed on by every process (JAX's
preemption sync point where the distributed runtime offers one), so all of them stop and
save at the same step.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax._src import distributed
from jax.experimental import multihost_utils


class Preemption:
    """SIGTERM -> the step at which every process stops, saves once and exits cleanly.

    One process: a SIGTERM handler sets a flag, `reached(step)` is True from the next
    step on. Several (`jax.distributed`): JAX's preemption service catches SIGTERM on any
    process, agrees in the background on a step every process has not passed yet, and
    `reached(step)` is True on all of them at that same step, however many got the
    signal, with no per-step communication.
    """

    def __init__(self):
        self.requested = False
        self._old = None
        self._agreed = False

    def __enter__(self):
        manager = getattr(getattr(distributed, "global_state", None), "preemption_sync_manager",
                          None)  # fmt: skip
        self._agreed = jax.process_count() > 1 and manager is not None
        if not self._agreed and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        del signum, frame
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to stop before running `step` (call at every step, same on all)."""
        if self._agreed:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
