"""Input worker processes end when the process they feed is killed (kill -9 leaves them
no other word): `data.worker_guard`."""

import os
import signal
import subprocess
import sys
import time

from tests.helpers import ROOT

PARENT = """
import multiprocessing, sys
from m2det_jax.config import default_config
from m2det_jax.data.examples import EvalExample, ExampleParams
from tests.helpers import hold

if __name__ == "__main__":
    transform = EvalExample(ExampleParams.from_config(default_config()))
    child = multiprocessing.get_context("spawn").Process(target=hold, args=(transform, 120))
    child.start()
    print(child.pid, flush=True)
    child.join()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/status") as f:  # a zombie has exited
        return "zombie" not in f.read()


def test_a_worker_exits_when_its_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    p = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip
    child = int(p.stdout.readline())
    time.sleep(3.0)  # the child unpickles the transform (the watch starts) while starting
    assert _alive(child)
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 30
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the worker outlived its killed parent"
