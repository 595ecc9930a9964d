"""`train.profile_steps=(start, stop)`: a `jax.profiler` trace of steps start..stop-1.

The trace goes to `<workdir>/profile` (every process writes its own host's file under
`plugins/profile/<run>/`); open it with TensorBoard's profile plugin
(`tensorboard --logdir <workdir>/profile`) or drag the `.xplane.pb` / `.trace.json.gz`
into Perfetto (ui.perfetto.dev). Steps are counted from the run's start, after a resume
too; (0, 0) (the default) traces nothing. Tracing starts before step `start` is
dispatched and stops after step `stop - 1` has finished on the device, so the trace holds
exactly those steps, with the input pipeline's host work between them.
"""

from __future__ import annotations

import os

import jax

from m2det_jax.paths import join


class StepProfiler:
    """Starts / stops the trace around the configured steps; call `before(step)` ahead of
    dispatching step `step` (0-based) and `close(state)` when the loop ends."""

    def __init__(self, workdir: str, steps=(0, 0)):
        start, stop = (int(v) for v in tuple(steps))
        if start < 0 or (stop and stop <= start):
            raise ValueError(f"train.profile_steps={tuple(steps)}: (start, stop) with "
                             "0 <= start < stop, or (0, 0) for none")  # fmt: skip
        self.start, self.stop = start, stop
        self.directory = os.fspath(join(workdir, "profile"))
        self.active = False

    def before(self, step: int, state=None) -> None:
        if self.stop and step == self.start and not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True
        elif self.active and step == self.stop:
            self.close(state)

    def close(self, state=None) -> None:
        if self.active:
            if state is not None:
                jax.block_until_ready(state)  # the last traced step, finished
            jax.profiler.stop_trace()
            self.active = False
