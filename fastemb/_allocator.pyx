# cython: language_level=3
"""fastemb._allocator: the block cache, a NumPy allocator that keeps freed blocks for reuse
(installed by ``fastemb/_memory.py`` around the allocations of lookups and backward passes)."""

from libc.string cimport memcpy, memset

import numpy as np

__all__ = ["BLOCK_CACHE_HANDLER", "block_cache_state", "clear_block_cache", "empty_reused",
           "set_allocator"]


# --------------------------------------------------------------------------------------------
# A NumPy allocator that keeps freed blocks for reuse (numpy's PyDataMem_Handler API). A
# training step allocates a handful of 1 MB-sized per-call arrays (the sort buffers, the
# gradient plan); glibc hands such memory back to the OS when they are freed, and faulting it
# in again on the next step costs thousands of page faults per step. The Python layer installs
# this allocator, for the current context only, around the calls that make those arrays; an
# array remembers its allocator, so when it is freed, whenever that is, its block comes back
# here. Freed blocks of BLOCK_CACHE_MIN_BYTES to BLOCK_CACHE_MAX_BYTES are kept, up to
# BLOCK_CACHE_SLOTS blocks and BLOCK_CACHE_MAX_BYTES in all, the oldest going back to libc to
# make room; a request takes the smallest kept block that holds it without wasting more than
# half of it. Every block starts with a BLOCK_HEADER_BYTES header that records its capacity.
# Like NumPy's own allocator, it asks Linux for huge pages on blocks of 4 MB and more: without
# that advice a fresh large output faults in 4 KB pages, one fault per page, where np.empty's
# pages come 2 MB at a time.
# --------------------------------------------------------------------------------------------

cdef extern from "_core.h":
    void advise_huge_pages "fastemb_advise_huge_pages"(void *start, size_t size) noexcept nogil

from cpython.pycapsule cimport PyCapsule_New
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock,
                               PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK)
from libc.stdint cimport uint8_t
from libc.stdlib cimport malloc, calloc, realloc, free

cdef extern from "numpy/arrayobject.h":
    ctypedef struct PyDataMemAllocator:
        void *ctx
        void *(*malloc)(void *ctx, size_t size) noexcept nogil
        void *(*calloc)(void *ctx, size_t nelem, size_t elsize) noexcept nogil
        void *(*realloc)(void *ctx, void *ptr, size_t new_size) noexcept nogil
        void (*free)(void *ctx, void *ptr, size_t size) noexcept nogil
    ctypedef struct PyDataMem_Handler:
        char name[127]
        uint8_t version
        PyDataMemAllocator allocator
    object PyDataMem_SetHandler(object handler)
    int _import_array() except -1

_import_array()

cdef enum:
    BLOCK_CACHE_SLOTS = 16
    BLOCK_HEADER_BYTES = 16  # keeps libc's 16-byte alignment for the data

cdef size_t BLOCK_CACHE_MIN_BYTES = 64 << 10
cdef size_t BLOCK_CACHE_MAX_BYTES = 64 << 20

cdef struct BlockCache:
    void *blocks[BLOCK_CACHE_SLOTS]  # block starts (headers, holding capacities), oldest first
    int count
    size_t bytes
    size_t reuses                      # requests served from the cache, for tests

cdef BlockCache block_cache
cdef PyThread_type_lock block_cache_lock = PyThread_allocate_lock()


cdef inline size_t *block_capacity(void *block) noexcept nogil:
    return <size_t *>block


cdef inline void *block_data(void *block) noexcept nogil:
    return <char *>block + BLOCK_HEADER_BYTES if block != NULL else NULL


cdef inline void *block_of(void *data) noexcept nogil:
    return <char *>data - BLOCK_HEADER_BYTES


cdef void *take_cached(int slot) noexcept nogil:
    """Remove kept block ``slot`` (the lock held), keeping the rest oldest first."""
    cdef void *block = block_cache.blocks[slot]
    cdef int k
    for k in range(slot + 1, block_cache.count):
        block_cache.blocks[k - 1] = block_cache.blocks[k]
    block_cache.count -= 1
    block_cache.bytes -= block_capacity(block)[0]
    return block


cdef void *cached_block(size_t size) noexcept nogil:
    """Remove and return the best kept block for ``size`` bytes, or NULL."""
    cdef int k, best = -1
    cdef size_t capacity, best_capacity = 0
    cdef void *block = NULL
    if size < BLOCK_CACHE_MIN_BYTES:
        return NULL
    PyThread_acquire_lock(block_cache_lock, WAIT_LOCK)
    for k in range(block_cache.count):
        capacity = block_capacity(block_cache.blocks[k])[0]
        if size <= capacity <= 2 * size and (best < 0 or capacity < best_capacity):
            best, best_capacity = k, capacity
    if best >= 0:
        block = take_cached(best)
        block_cache.reuses += 1
    PyThread_release_lock(block_cache_lock)
    return block


cdef void *new_block(size_t size, bint zeroed) noexcept nogil:
    cdef void *block
    if size > <size_t>-1 - BLOCK_HEADER_BYTES:
        return NULL
    block = calloc(1, BLOCK_HEADER_BYTES + size) if zeroed else malloc(BLOCK_HEADER_BYTES + size)
    if block != NULL:
        block_capacity(block)[0] = size
        advise_huge_pages(block_data(block), size)
    return block


cdef void *cache_malloc(void *context, size_t size) noexcept nogil:
    cdef void *block = cached_block(size)
    if block == NULL:
        block = new_block(size, False)
    return block_data(block)


cdef void *cache_calloc(void *context, size_t count, size_t item_size) noexcept nogil:
    cdef size_t size
    cdef void *block
    if item_size and count > <size_t>-1 // item_size:
        return NULL
    size = count * item_size
    block = cached_block(size)
    if block != NULL:
        memset(block_data(block), 0, size)
        return block_data(block)
    return block_data(new_block(size, True))  # libc's calloc: fresh pages are zero already


cdef void *cache_realloc(void *context, void *data, size_t size) noexcept nogil:
    cdef void *block
    if data == NULL:
        return cache_malloc(context, size)
    block = block_of(data)
    if size <= block_capacity(block)[0]:
        return data
    if size > <size_t>-1 - BLOCK_HEADER_BYTES:
        return NULL
    block = realloc(block, BLOCK_HEADER_BYTES + size)
    if block == NULL:
        return NULL
    block_capacity(block)[0] = size
    advise_huge_pages(block_data(block), size)
    return block_data(block)


cdef void cache_free(void *context, void *data, size_t size) noexcept nogil:
    """Keep the block (evicting the oldest kept ones to make room), or free it if too small or
    too large to keep."""
    cdef void *block
    cdef void *evicted[BLOCK_CACHE_SLOTS]
    cdef size_t capacity
    cdef int k, num_evicted = 0
    if data == NULL:
        return
    block = block_of(data)
    capacity = block_capacity(block)[0]
    if capacity < BLOCK_CACHE_MIN_BYTES or capacity > BLOCK_CACHE_MAX_BYTES:
        free(block)
        return
    PyThread_acquire_lock(block_cache_lock, WAIT_LOCK)
    while (block_cache.count == BLOCK_CACHE_SLOTS
           or block_cache.bytes + capacity > BLOCK_CACHE_MAX_BYTES):
        evicted[num_evicted] = take_cached(0)
        num_evicted += 1
    block_cache.blocks[block_cache.count] = block
    block_cache.count += 1
    block_cache.bytes += capacity
    PyThread_release_lock(block_cache_lock)
    for k in range(num_evicted):
        free(evicted[k])


cdef PyDataMem_Handler block_cache_handler
memset(&block_cache_handler, 0, sizeof(block_cache_handler))
memcpy(block_cache_handler.name, b"fastemb_block_cache", 20)  # with its terminating NUL
block_cache_handler.version = 1
block_cache_handler.allocator.ctx = NULL
block_cache_handler.allocator.malloc = cache_malloc
block_cache_handler.allocator.calloc = cache_calloc
block_cache_handler.allocator.realloc = cache_realloc
block_cache_handler.allocator.free = cache_free
BLOCK_CACHE_HANDLER = PyCapsule_New(&block_cache_handler, "mem_handler", NULL)


def set_allocator(handler):
    """Make ``handler`` (a "mem_handler" capsule: BLOCK_CACHE_HANDLER, or what this returned)
    NumPy's allocator in the current context; returns the one it replaces."""
    return PyDataMem_SetHandler(handler)


def empty_reused(shape, dtype):
    """``np.empty(shape, dtype)`` from the block cache: ``reused_memory`` in one call, for the
    lookups, which make a fresh output every call (in the caller's context afterwards, NumPy's
    allocator is the one it had)."""
    previous = PyDataMem_SetHandler(BLOCK_CACHE_HANDLER)
    try:
        return np.empty(shape, dtype)
    finally:
        PyDataMem_SetHandler(previous)


def block_cache_state():
    """``(blocks kept, bytes kept, requests served from kept blocks so far)``."""
    return block_cache.count, block_cache.bytes, block_cache.reuses


def clear_block_cache():
    """Give every kept block back to libc."""
    cdef void *block
    while True:
        PyThread_acquire_lock(block_cache_lock, WAIT_LOCK)
        block = take_cached(0) if block_cache.count else NULL
        PyThread_release_lock(block_cache_lock)
        if block == NULL:
            return
        free(block)
