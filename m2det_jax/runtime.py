"""Process-level settings that speed up XLA:CPU (opt-in, for whole programs).

`keep_freed_memory()`: XLA:CPU allocates each execution's temporary buffers afresh and frees
them afterwards. glibc serves allocations above its mmap threshold (at most 32 MiB) with a
fresh `mmap` and returns them with `munmap` when freed, so every execution whose buffers
exceed that pays a page fault (and the kernel's zeroing) for every 4 KiB page it touches,
about 0.35 ms per MiB on the 2-core development machine. Post-processing at 512 px
(32,760 priors x 81 classes) had ~44 MB of temporaries, and about half of its time on a
crowded image went to those faults; it now keeps them at 30.7 MiB for one image, but a
batch of several images (or a larger input) exceeds the threshold again
(`benchmarks/postprocess_bench.py --malloc default|kept`).

Calling it makes glibc keep freed memory in the heap for reuse (`mallopt(M_MMAP_MAX, 0)`,
`mallopt(M_TRIM_THRESHOLD, 2**31 - 1)`): the resident size then stays at its peak instead of
shrinking between calls, the usual trade-off of tcmalloc / jemalloc. It affects every
allocation of the process (numpy's too), so the library never calls it on import; the
benchmarks use it for both sides of a comparison and say so.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse; False where not glibc."""
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
