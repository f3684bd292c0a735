"""Process-level settings that make CPU training faster.

``tune_cpu_allocator``: glibc serves allocations above a threshold (at most 32 MiB by
default) with a fresh ``mmap`` and returns them on free, so every large activation of
every step is page-faulted in again, a sizeable share of a CPU step (docs/benchmarks.md
has the measurements). Raising the mmap and trim thresholds keeps freed memory in the
heap for reuse (the effect people get from jemalloc or tcmalloc).
Memory already returned stays returned; peak resident memory does not go down afterwards.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TUNED = False


def tune_cpu_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Keep large freed blocks in the heap (glibc only). Returns True when applied.

    Example:
        >>> tune_cpu_allocator() in (True, False)
        True
    """
    global _TUNED
    if _TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # musl and other libcs have no mallopt
        return False
    _TUNED = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    _TUNED = _TUNED and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _TUNED


def readable_like_umask(path) -> None:
    """Give ``path`` the mode a plain ``open`` would (0666 less the umask): safetensors writes
    its files 0600, so other users of a shared model directory could not read the weights."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_text_atomic(path, text: str) -> None:
    """``path`` holds ``text`` whole or is as it was: a temporary file beside it, then a rename
    (a full disk mid-write leaves neither a truncated file nor the temporary one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None:        # a failed write() names no file: say which one
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
