"""`runtime.keep_freed_memory`: glibc keeps a freed 64 MB buffer (resident) for reuse
instead of unmapping it; without it the same buffer is returned to the OS."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import sys
import numpy as np
from m2det_jax.perf.runtime import keep_freed_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "kept":
    assert keep_freed_memory()
before = rss_mb()
a = np.ones(64 * 2**20 // 8)  # 64 MB, touched
del a
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc / procfs")
def test_keep_freed_memory_keeps_a_freed_buffer_resident():
    def grown(mode):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True,
                             text=True, check=True)  # fmt: skip
        return float(out.stdout.strip().splitlines()[-1])

    assert grown("default") < 16  # unmapped on free
    assert grown("kept") > 48  # kept in the heap


@pytest.mark.parametrize("jaxlib_version, known", [("0.10.2", True), ("0.12.1", False)])
def test_cpu_conv_flags_are_opt_in_and_added_once(monkeypatch, tmp_path, jaxlib_version,
                                                  known):  # fmt: skip
    """Both branches on any installed jaxlib: the version the flag check reads is set."""
    from m2det_jax import cli
    from m2det_jax.perf import runtime

    monkeypatch.setattr(runtime.metadata, "version", lambda name: jaxlib_version)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.delenv("M2DET_XLA_CPU_CONV_FLAGS", raising=False)
    with pytest.raises(SystemExit, match="config file not found"):  # stops before any work
        cli.main(["summary", "--config", str(tmp_path / "missing.py")])
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"  # untouched
    assert runtime.cpu_conv_flags_supported() == known
    with pytest.raises(SystemExit, match="config file not found"):
        cli.main(["summary", "--xla_cpu_conv_flags", "--config", str(tmp_path / "missing.py")])
    if not known:  # refused: XLA would abort on a flag it does not know
        assert not runtime.use_cpu_conv_flags()
        assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
        return
    assert runtime.use_cpu_conv_flags()  # a second time adds nothing
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                       + runtime.CPU_CONV_FLAGS)  # fmt: skip
