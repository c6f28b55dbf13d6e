"""Keep freed memory inside the process (Linux, glibc), so large CPU tensors are not page-faulted in every step.

PyTorch's CPU allocator asks the C library for every tensor. glibc's malloc serves each block above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and hands it back with ``munmap`` when freed, so every large
activation of every step is a new mapping whose 4 KiB pages the kernel faults in and zero-fills on first touch.
A grouped model holds K branches in one tensor, so its activations cross 32 MiB at K times smaller batches than
one branch's do: a split WRN-16-4 K=4 training step at batch 128 took 2.3x as long as with freed memory kept for
reuse (measured: see ``benchmarks/NOTES.md``). PyTorch recommends jemalloc or tcmalloc through ``LD_PRELOAD`` for the
same reason; :func:`retain_freed_memory` gets the effect from glibc itself, with no extra library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse: no ``mmap`` per large block, no trimming of the heap.

    Process-wide, for the rest of the process: every later allocation (any library's) comes from the heap, and the
    heap keeps its peak size instead of returning freed memory to the system (as a caching allocator would). Call it
    once, early, in a process that trains or runs models on the CPU; ``python -m groupnet.train`` does so on CPU.

    Returns True where it took effect, False where the C library is not glibc (macOS, Windows, musl), where it does
    nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _INT_MAX))
