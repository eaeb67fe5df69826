"""Memory for tables and for the arrays a training step makes afresh on every call.

``reused_memory`` makes NumPy allocate, in the current context only, from fastemb's cache of
freed blocks (the allocator in ``_allocator.pyx``): lookup outputs and a training step's
sort buffers and gradient plan then reuse the last call's memory instead of faulting in new
pages.

``aligned_full`` gives the tables fastemb allocates (module weights, optimizer state) a first
row on a cache-line boundary.
"""

import functools
import math

import numpy as np

from ._kernels import kernels as _core

CACHE_LINE_BYTES = 64


def aligned_full(shape, fill_value, dtype):
    """``np.full(shape, fill_value, dtype)`` whose data starts on a 64-byte boundary.

    NumPy's own large arrays start 16 bytes past one, so every row of 64 float32 (256 bytes)
    spans 5 cache lines instead of 4: a lookup or an optimizer update moves 25% more memory.
    (torch aligns its tensors to 64 bytes too.) Zeros come from ``np.zeros``, so their pages
    are only touched when a row is.

    >>> import numpy as np
    >>> table = aligned_full((1000, 64), 0.0, np.float32)
    >>> table.ctypes.data % 64, table.shape, table.dtype.name, float(table.sum())
    (0, (1000, 64), 'float32', 0.0)
    """
    dtype = np.dtype(dtype)
    num_bytes = math.prod(shape) * dtype.itemsize
    raw = np.zeros(num_bytes + CACHE_LINE_BYTES, dtype=np.uint8)
    start = -raw.ctypes.data % CACHE_LINE_BYTES
    array = raw[start:start + num_bytes].view(dtype).reshape(shape)
    if fill_value != 0:
        array.fill(fill_value)
    return array


class reused_memory:
    """Within the block, NumPy arrays come from (and, when freed, return to) the block cache.
    (A class rather than a generator: this runs twice per lookup.)"""

    __slots__ = ("previous",)

    def __enter__(self):
        self.previous = _core.set_allocator(_core.BLOCK_CACHE_HANDLER)

    def __exit__(self, *exc_info):
        _core.set_allocator(self.previous)


def with_reused_memory(function):
    """Decorator: run ``function`` inside :func:`reused_memory`."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with reused_memory():
            return function(*args, **kwargs)
    return wrapper


def release_memory():
    """Hand the memory that backward passes keep for reuse (at most 64 MB) back to the system;
    returns how many bytes that was.

    >>> import fastemb
    >>> fastemb.release_memory() >= 0
    True
    """
    kept = _core.block_cache_state()[1]
    _core.clear_block_cache()
    return kept
