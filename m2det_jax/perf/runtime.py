"""Process-level settings for XLA:CPU, all opt-in (the library applies none on import).

* `use_cpu_conv_flags()`: turns XLA:CPU's YNNPACK fusions off (`CPU_CONV_FLAGS`), which made
  the VGG forward pass faster on the machines we measured (an AMD EPYC with AVX2 and an
  Intel Xeon with AVX-512; `python benchmarks/forward.py` prints both settings side by side
  with the CPU model; figures in docs/speed.md). It must run before JAX starts its backend,
  changes nothing on GPU/TPU, and is only known to jaxlib 0.10 (an unknown XLA flag aborts
  the process, so it is refused for other versions). The CLI applies it with
  `--xla_cpu_conv_flags` or `M2DET_XLA_CPU_CONV_FLAGS=1`; measure on your machine before
  relying on it.
* `keep_freed_memory()`: glibc keeps freed memory for reuse (see its docstring).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from importlib import metadata

CPU_CONV_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="
# jaxlib (major, minor) versions whose XLA knows CPU_CONV_FLAGS.
_FLAG_VERSIONS = ((0, 10),)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def cpu_conv_flags_supported() -> bool:
    """Whether the installed jaxlib knows `CPU_CONV_FLAGS`."""
    try:
        major, minor = (int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) in _FLAG_VERSIONS


def use_cpu_conv_flags() -> bool:
    """Appends `CPU_CONV_FLAGS` to XLA_FLAGS (before JAX starts); False if not supported.

    Flags the user already set in XLA_FLAGS are kept; the YNNPACK setting is not added twice.
    """
    if not cpu_conv_flags_supported():
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + CPU_CONV_FLAGS).strip()
    return True


def cpu_model() -> str:
    """The CPU's model name (lscpu's "Model name"), for every printed figure."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse; False where not glibc.

    XLA:CPU allocates each execution's temporary buffers afresh and frees them afterwards.
    glibc serves allocations above its mmap threshold (at most 32 MiB) with a fresh `mmap`
    and returns them with `munmap`, so every execution whose buffers exceed that pays a
    page fault (and the kernel's zeroing) for every 4 KiB page it touches, a cost per call
    that grows with the memory touched (timed ad hoc; figure in docs/speed.md).
    Post-processing at 512 px keeps its temporaries just under the threshold for one image
    (`python benchmarks/postprocess_kernels.py --part kernels`, row "detect temporaries at
    512 px"), but a batch of several images (or a larger input) exceeds the threshold again
    (`benchmarks/postprocess_bench.py --malloc kept` against the default).

    With `mallopt(M_MMAP_MAX, 0)` and `mallopt(M_TRIM_THRESHOLD, 2**31 - 1)` the resident
    size stays at its peak instead of shrinking between calls, the usual trade-off of
    tcmalloc / jemalloc. It affects every allocation of the process (numpy's too), so the
    library never calls it on import; the benchmarks use it for both sides of a comparison
    and say so.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # M_TRIM_THRESHOLD takes an int: the largest one (2 GiB) keeps the heap in practice.
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
