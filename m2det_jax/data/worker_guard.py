"""Input worker processes end with the process they feed.

grain's worker processes (`data.num_workers` > 0) are started with multiprocessing's
"spawn" and are not told when their parent dies without cleaning up (kill -9, the OOM
killer, a preempted VM's last seconds): they would live on, holding memory and the
parent's inherited output pipes, beside the restarted run's new workers. The per-example
transforms are `ExitWithParent`: pickling one records the sending process, and unpickling
it in a multiprocessing child of that process starts a daemon thread there that ends the
child once that process is gone (the child was re-parented), even when it died while the
child was still starting.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

_watched_pid: int | None = None  # the process whose watch thread runs (a fork inherits it)


def _in_multiprocessing_child() -> bool:
    # parent_process() is set once a child runs its target; while a spawned child unpickles
    # that target and its arguments, current_process() is marked as inheriting.
    return (multiprocessing.parent_process() is not None
            or bool(getattr(multiprocessing.current_process(), "_inheriting", False)))  # fmt: skip


def exit_with_parent(parent: int, poll_s: float = 0.5) -> bool:
    """Starts (once per process) a daemon thread that exits this process as soon as its
    parent is no longer `parent`; True when it started one now. Does nothing in `parent`
    itself or outside a multiprocessing child."""
    global _watched_pid
    pid = os.getpid()
    if pid == parent or _watched_pid == pid or not _in_multiprocessing_child():
        return False
    _watched_pid = pid

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="m2det-exit-with-parent", daemon=True).start()
    return True


class ExitWithParent:
    """Mixin of a picklable object sent to worker processes: unpickled in a child of the
    process that pickled it, it starts `exit_with_parent` there."""

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_sent_by": os.getpid()}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        sender = state.pop("_sent_by", None)
        self.__dict__.update(state)
        if sender is not None:
            exit_with_parent(sender)
