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

It is a process setting, not a per-program one, and it must come before other threads allocate:
a thread keeps the malloc arena it first allocated from, and XLA:CPU's threads start with the
backend. **It is the default** (:func:`apply_default`, run when ``jpeft`` is imported): on a
CPU-only setup (``JAX_PLATFORMS=cpu``, or no accelerator plugin installed), with glibc, while no
thread but the main one has allocated (one malloc arena, read from glibc's ``malloc_info``: so
``import jpeft`` before the first JAX computation). ``JPEFT_HOST_MEMORY=release`` in the
environment keeps glibc's defaults (returned memory, page faults per step);
``JPEFT_HOST_MEMORY=retain`` asks for it on accelerator setups too. When the default could not
apply (JAX computed before ``jpeft`` was imported), :func:`status` says why and the train step
compiles for returned memory (:mod:`jpeft.core.xla_options`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from typing import NoReturn

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
_STATUS = ["not applied: jpeft.core.host_memory.apply_default() has not run"]

#: The environment variable that chooses the default: ``retain`` or ``release``.
ENV = "JPEFT_HOST_MEMORY"


def retained() -> bool:
    """Whether :func:`retain_host_memory` has taken effect in this process (the train step's
    default compile options depend on it: :mod:`jpeft.core.xla_options`)."""
    return _RETAINED[0]


def status() -> str:
    """What this process does with freed host memory, and why (a line for logs)."""
    return _STATUS[0]


def _arenas(libc) -> int:
    """The number of malloc arenas (glibc's ``malloc_info``): more than one once another thread
    has allocated (XLA's threads, after a JAX backend started)."""
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
    libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.fclose.argtypes = (ctypes.c_void_p,)
    libc.free.argtypes = (ctypes.c_void_p,)
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not stream:
        raise RuntimeError("open_memstream failed: cannot read glibc's malloc_info")
    try:
        libc.malloc_info(0, stream)
    finally:
        libc.fclose(stream)
    try:
        return ctypes.string_at(buf, size.value).count(b"<heap nr=")
    finally:
        libc.free(buf)


def threads_hold_arenas() -> bool:
    """Whether threads other than the main one already allocate from arenas of their own (after
    which :func:`retain_host_memory` refuses: the setting would not reach them). ``False`` where
    the C library is not glibc."""
    libc = _glibc()
    return libc is not None and _arenas(libc) > 1


def retain_host_memory() -> bool:
    """Make glibc keep freed host memory for reuse (module docstring): ``True`` when set (or
    already set), ``False`` where the C library is not glibc (nothing to do: other allocators have
    their own policies).

    Raises:
      RuntimeError: other threads already allocate from their own arenas (a JAX backend has
        started, and its threads keep the arenas they hold, so the setting would not reach the
        buffers it is for), or glibc refused a setting.
    """
    if _RETAINED[0]:
        return True
    libc = _glibc()
    if libc is None:
        _STATUS[0] = "released: the C library is not glibc"
        return False
    if _arenas(libc) > 1:
        raise RuntimeError(
            "retain_host_memory() must run before the first JAX computation: other threads "
            "(a JAX backend's) already allocate from malloc arenas of their own, which the "
            "setting would not reach. Import jpeft (it applies it by default on CPU) or call "
            "this at the top of the program, before JAX computes anything.")
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    for param, value in SETTINGS:
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"glibc mallopt({param}, {value}) failed")
    _RETAINED[0] = True
    _STATUS[0] = "retained: freed host memory is kept for reuse (JPEFT_HOST_MEMORY=release: off)"
    return True


def rerun_released(argv: list[str]) -> NoReturn:
    """Replace this process with ``python *argv`` under ``JPEFT_HOST_MEMORY=release``: how an
    entry point's ``--release-host-memory`` flag undoes the default once ``import jpeft`` has
    applied it (a process setting that only a fresh process can drop)."""
    os.execve(sys.executable, [sys.executable, *argv], {**os.environ, ENV: "release"})


def apply_default() -> str:
    """The process default, run by ``import jpeft``: :func:`retain_host_memory` where it applies
    (module docstring), per :data:`ENV`; returns :func:`status`.

    Raises:
      ValueError: :data:`ENV` set to something other than ``retain`` or ``release``.
    """
    choice = os.environ.get(ENV, "").strip().lower()
    if choice not in ("", "retain", "release"):
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: use 'retain' (keep freed host memory for "
                         f"reuse) or 'release' (glibc's default)")
    if choice == "release":
        _STATUS[0] = f"released: {ENV}=release"
    elif choice == "" and compat.accelerators_configured():
        _STATUS[0] = (f"released: an accelerator is configured ({ENV}=retain keeps freed host "
                      f"memory anyway)")
    elif _RETAINED[0]:
        pass
    elif threads_hold_arenas():
        _STATUS[0] = ("released: JAX computed before jpeft was imported (other threads hold "
                      "malloc arenas); import jpeft first to keep freed host memory for reuse")
    else:
        retain_host_memory()
    return _STATUS[0]
