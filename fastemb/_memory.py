"""Reused memory for the arrays a training step makes afresh on every call.

``reused_memory`` makes NumPy allocate, in the current context only, from fastemb's cache of
freed blocks (the allocator at the end of ``_core.pyx``): a training step's sort buffers and
gradient plan then reuse the last step's memory instead of faulting in new pages.
"""

import functools
from contextlib import contextmanager

from ._kernels import kernels as _core


@contextmanager
def reused_memory():
    """Within the block, NumPy arrays come from (and, when freed, return to) the block cache."""
    previous = _core.set_allocator(_core.BLOCK_CACHE_HANDLER)
    try:
        yield
    finally:
        _core.set_allocator(previous)


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
