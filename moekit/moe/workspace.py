"""A pool of large CPU buffers that the MoE layer's temporaries reuse from step to step.

Why: a training step of an MoE layer makes a dozen [R, F] and [E, D, F] temporaries (64-128
MiB each at 64 experts in float32). glibc serves allocations above its mmap threshold (at
most 32 MiB) with fresh ``mmap`` pages, and the kernel zero-fills each page on first touch:
measured, a fresh 64 MiB buffer costs 3x a warm one in the kernel that writes it, and at 64
experts untuned f32 the page faults alone were ~1 GiB per step. ``moekit.runtime.
tune_cpu_allocator`` fixes it process-wide, which a library user who builds ``MoELayer`` in
their own model never calls; this pool fixes it inside the layer.

How: :meth:`Workspace.empty` returns a view of a pooled flat buffer whose storage nobody
else references (storage use count: the pool's own reference and the probe's), else a new
buffer that joins the pool. A view handed out stays valid for as long as anything holds it
(a saved activation, a gradient that ``AccumulateGrad`` adopted as ``p.grad``): a buffer is
reused only once every tensor on it is gone, so reuse never changes a result. GPU tensors,
small requests (< ``min_bytes``) and code under ``torch.compile`` get plain ``torch.empty``
(the CUDA caching allocator already reuses memory, and a compiled graph plans its own).

The pool keeps at most ``max_bytes`` (default: an eighth of physical memory, at most 4 GiB):
a new buffer that would pass it first frees idle buffers, largest first, and if the buffers
in use leave no room it is served by ``torch.empty`` and not kept. Before a new buffer is
made, idle buffers not handed out for about two steps (twice the longest gap between two
uses of one buffer seen so far, in requests) are freed, so that sizes that stopped coming do
not pile up; row counts that swing widely from step to step (random batch sizes) can still
fill the pool to its cap: lower ``WORKSPACE.max_bytes``, or set ``WORKSPACE.enabled =
False``. Under ``torch.inference_mode`` nothing is pooled. :meth:`Workspace.clear` frees
every idle buffer (e.g. after training, before generation).

Example:
    >>> ws = Workspace(min_bytes=0)
    >>> a = ws.empty((4, 8), torch.float32, torch.device("cpu"))
    >>> ptr = a.data_ptr(); del a
    >>> ws.empty((2, 16), torch.float32, torch.device("cpu")).data_ptr() == ptr
    True
"""

from __future__ import annotations

import math
import os
import sys
import threading

import torch
from torch import Tensor


def _default_max_bytes() -> int:
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return min(4 << 30, physical // 8)


def _references(buf: Tensor) -> tuple[int, int]:
    """(references to buf's storage, Python references to its storage object): the storage
    object is one per storage, so a user holding ``t.untyped_storage()`` shows in the second."""
    storage = buf.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata), sys.getrefcount(storage)


_BASE = _references(torch.empty(1))   # a tensor nothing else holds, probed the same way


def _idle(buf: Tensor) -> bool:
    """No tensor or storage object but the pool's own references buf's memory."""
    uses, refs = _references(buf)
    return uses <= _BASE[0] and refs <= _BASE[1]


class Workspace:
    """Reusable flat CPU buffers, one list per dtype (thread-safe)."""

    def __init__(self, min_bytes: int = 1 << 20, max_bytes: int | None = None, slack: float = 1.25):
        self.min_bytes = min_bytes
        self.max_bytes = _default_max_bytes() if max_bytes is None else max_bytes
        self.slack = slack                  # reuse a buffer at most this many times too large
        self.enabled = True
        self._buffers: dict[torch.dtype, list[Tensor]] = {}
        self._last_use: dict[int, int] = {}   # id(buffer) -> the request count when last handed out
        self._tick = 0
        self._reuse_gap = 0                    # the longest run of requests between two uses of a buffer
        self._lock = threading.RLock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised contiguous tensor of ``shape``, from the pool where it applies."""
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if (not self.enabled or torch.device(device).type != "cpu" or nbytes < self.min_bytes
                or torch.compiler.is_compiling() or torch.is_inference_mode_enabled()):
            # (a buffer made under inference_mode is an inference tensor: unusable outside it)
            return torch.empty(shape, dtype=dtype, device=device)
        with self._lock:
            self._tick += 1
            pool = self._buffers.setdefault(dtype, [])
            fits = [b for b in pool if numel <= b.numel() <= numel * self.slack and _idle(b)]
            if fits:
                buf = min(fits, key=Tensor.numel)
                self._reuse_gap = max(self._reuse_gap, self._tick - self._last_use.get(id(buf), self._tick))
            else:
                self._drop_stale()
                buf = torch.empty(numel, dtype=dtype)
                if not self._make_room(nbytes):
                    return buf[:numel].view(shape)     # past the cap: not pooled, not tracked
                self._buffers[dtype].append(buf)
            self._last_use[id(buf)] = self._tick
            return buf[:numel].view(shape)

    def _drop_stale(self) -> None:
        """Free idle buffers not handed out for twice the longest gap seen between two uses of
        one buffer (about two steps; at least 64 requests), so that shapes that stopped coming
        do not stay pooled."""
        horizon = self._tick - max(64, 2 * self._reuse_gap)
        for dtype, pool in self._buffers.items():
            stale = [b for b in pool if self._last_use.get(id(b), 0) < horizon and _idle(b)]
            for b in stale:
                self._last_use.pop(id(b), None)
            gone = {id(b) for b in stale}
            self._buffers[dtype] = [b for b in pool if id(b) not in gone]

    def _make_room(self, nbytes: int) -> bool:
        """Free idle buffers, largest first, until ``nbytes`` more fit under ``max_bytes``."""
        if nbytes > self.max_bytes:
            return False
        idle = sorted(((b, dtype) for dtype, pool in self._buffers.items() for b in pool if _idle(b)),
                      key=lambda item: -item[0].numel())
        total = self.nbytes
        while total + nbytes > self.max_bytes and idle:
            buf, dtype = idle.pop(0)
            pool = self._buffers[dtype]
            del pool[next(i for i, b in enumerate(pool) if b is buf)]
            self._last_use.pop(id(buf), None)
            total -= buf.numel() * buf.element_size()
        return total + nbytes <= self.max_bytes

    def empty_like(self, t: Tensor) -> Tensor:
        return self.empty(tuple(t.shape), t.dtype, t.device)

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds, idle or in use."""
        with self._lock:
            return sum(b.numel() * b.element_size() for pool in self._buffers.values() for b in pool)

    def clear(self) -> None:
        """Drop every idle buffer (those in use stay valid, and pooled)."""
        with self._lock:
            for dtype, pool in self._buffers.items():
                self._buffers[dtype] = [b for b in pool if not _idle(b)]
            live = {id(b) for pool in self._buffers.values() for b in pool}
            self._last_use = {k: v for k, v in self._last_use.items() if k in live}


WORKSPACE = Workspace()
"""The pool the MoE layer's expert FFN, dispatch and combine draw from."""
