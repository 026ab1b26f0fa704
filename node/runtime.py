"""Allocator settings, trimming and resident-page hygiene for long-running processes (glibc and
Linux; no-ops elsewhere).

Torch-free on purpose: the node's receiver process uses it without loading torch.
"""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 * 1024
MADV_PAGEOUT = 21  # linux/mman.h, Linux >= 5.4


@functools.cache
def libc_function(name: str, argtypes: tuple[Any, ...] | None = None
                  ) -> Callable[..., int] | None:
    """A libc function of the running process returning an int, or None where libc has none
    (musl, macOS). `argtypes` where an argument does not fit a C int (a pointer, a size)."""
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):
        return None
    if argtypes is not None:
        fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return cast(Callable[..., int], fn)


def tune_malloc(arenas: int = 2, mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Keep the node's resident size from creeping up under load (glibc only).

    Caps the per-thread malloc arenas (default 8 per core: each association, worker and
    exporter thread would keep its own arena of freed memory), and fixes the mmap threshold:
    glibc otherwise raises it after each freed 1 MiB buffer (received datasets, decoded
    frames), so those land in the arenas and fragment them. Call before the threads start;
    False where unsupported.
    """
    mallopt = libc_function("mallopt")
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, arenas)) and \
        bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))


def trim_memory(collect: bool = True) -> bool:
    """Hand freed heap pages back to the OS (glibc `malloc_trim(0)`), after a `gc.collect()`.

    glibc keeps freed small allocations (a model load, each study's decoded images) in the
    thread's arena. The trim is cheap; a full collect is not once highdicom's tables are
    loaded, so pass collect=False per study. False where libc has no malloc_trim.
    """
    if collect:
        gc.collect()
    trim = libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def release_library_pages(maps: str = "/proc/self/maps") -> int:
    """Hand the resident pages of read-only shared-library mappings back to the kernel
    (madvise MADV_PAGEOUT); returns the bytes of mappings advised, 0 where unsupported.

    Why: importing torch runs its operator registration, touching library code that is never
    run again; those clean, file-backed pages stay resident and count in RSS. Paged out, what
    inference does use faults back in from the page cache. Nothing writable or anonymous is
    touched: heap, weights and buffers stay as they are, so this changes what is resident, not
    what is correct.
    """
    madvise = libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
    if madvise is None:
        return 0
    try:
        lines = Path(maps).read_text(encoding="ascii", errors="replace").splitlines()
    except OSError:
        return 0
    advised = 0
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or "w" in fields[1] or not _is_shared_object(fields[5]):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if madvise(start, end - start, MADV_PAGEOUT) != 0:  # EINVAL: kernel before 5.4
            return advised
        advised += end - start
    return advised


def _is_shared_object(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return path.startswith("/") and (name.endswith(".so") or ".so." in name)
