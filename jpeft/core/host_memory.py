"""Host memory for XLA:CPU programs: keep freed buffers instead of handing them back to the OS.

XLA:CPU allocates an executable's temporaries (one buffer of ``memory_analysis()
.temp_size_in_bytes``: 340-670 MiB for the MiniLM train steps of ``benchmarks/step_cost.py``)
with ``malloc`` on every execution and frees them when it ends. glibc serves a request that large
with a fresh ``mmap`` (always above 32 MiB; in a thread's own arena, above the 64 MiB heap size)
and gives it back with ``munmap``, so every step writes to pages the kernel has to fault in and
zero again: one minor page fault per 4 KiB page, ``temp_bytes / 4096`` per step (17,000 for one
BERT layer's forward and backward at 2,048 tokens, 66 MiB; about 90,000 for a 350 MiB step).

:func:`retain_host_memory` tells glibc to keep freed memory for reuse: one arena for every thread
(``M_ARENA_MAX = 1``; XLA's worker threads would otherwise each get an arena whose large requests
still go to ``mmap``), no ``mmap`` for large requests (``M_MMAP_MAX = 0``: they grow the main heap
instead) and no trimming of the heap's free top (``M_TRIM_THRESHOLD`` at its maximum, 2 GiB). A
step then reuses the pages of the steps before: a call faults only when the heap has to grow.
The costs: the process's resident memory stays at its peak (freed memory is reused, not
returned); the heap settles at a few times the temporaries, not one (a call's buffers can be
freed after the next call's are allocated, and small buffers split the free space: a program
with 64 MiB of temporaries grew the heap to 110-240 MiB and faulted in 3-6 of its first 12
calls, 2-4 of 30 in ``tests/core/test_host_memory.py``; with 8 host devices the heap reached
370-490 MiB after 60 calls; the MiniLM LoRA q,v train step's peak resident memory went from
1.0 to 2.2 GiB, full fine-tuning's from 1.5 to 2.1 GiB); and every thread allocates
from one arena (XLA allocates a few large buffers per step; a process doing heavy multi-threaded
small allocations could see contention).
Measured in ``benchmarks/README.md``.

It is a process setting, not a per-program one: call it once, first thing, before the first JAX
computation (a thread keeps the arena it first allocated from, and XLA:CPU starts its threads
when the backend starts). ``python -m jpeft.cli`` and the benchmarks call it unless told not to.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

from jpeft.core import compat

#: glibc ``mallopt`` parameters (``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

#: ``(parameter, value)`` pairs :func:`retain_host_memory` sets, in order.
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return lib if hasattr(lib, "mallopt") else None


_RETAINED = [False]


def retained() -> bool:
    """Whether :func:`retain_host_memory` has taken effect in this process (the train step's
    default compile options depend on it: :mod:`jpeft.core.xla_options`)."""
    return _RETAINED[0]


def backend_started() -> bool:
    """Whether a JAX backend has started (after which :func:`retain_host_memory` refuses)."""
    return compat.backend_started()


def retain_host_memory() -> bool:
    """Make glibc keep freed host memory for reuse (module docstring): ``True`` when set,
    ``False`` where the C library is not glibc (nothing to do: other allocators have their own
    policies).

    Raises:
      RuntimeError: a JAX backend has already started (its threads already hold their arenas,
        so the setting would not reach the buffers it is for), or glibc refused a setting.
    """
    if backend_started():
        raise RuntimeError(
            "retain_host_memory() must run before the first JAX computation: a JAX backend has "
            "already started and its threads keep the malloc arenas they hold. Call it at the "
            "top of the program, after the imports.")
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    for param, value in SETTINGS:
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"glibc mallopt({param}, {value}) failed")
    _RETAINED[0] = True
    return True
