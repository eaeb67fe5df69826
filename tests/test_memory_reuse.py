"""The block cache: the NumPy allocator (``_allocator.pyx``) that training steps allocate
their per-call arrays from, so that a step reuses the last step's memory."""

import os
import resource
import sys
import threading

import numpy as np
import pytest
from numpy._core.multiarray import get_handler_name

import fastemb
from fastemb import optim
from fastemb._kernels import kernels as K
from fastemb._memory import reused_memory

MIN_BYTES = 64 << 10  # BLOCK_CACHE_MIN_BYTES
MAX_BYTES = 64 << 20  # BLOCK_CACHE_MAX_BYTES
SLOTS = 16            # BLOCK_CACHE_SLOTS


@pytest.fixture(autouse=True)
def _empty_cache():
    """Each test starts with an empty cache (other tests leave blocks of their sizes in it)."""
    K.clear_block_cache()
    assert K.block_cache_state()[:2] == (0, 0)


def reuses():
    return K.block_cache_state()[2]


def test_only_arrays_made_inside_the_context_use_the_cache():
    outside = np.empty(MIN_BYTES)
    with reused_memory():
        inside = np.empty(MIN_BYTES)
    after = np.empty(MIN_BYTES)
    assert get_handler_name(inside) == "fastemb_block_cache"
    assert get_handler_name(outside) == get_handler_name(after) == "default_allocator"


def test_the_previous_allocator_comes_back_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with reused_memory():
            1 / 0
    assert get_handler_name(np.empty(MIN_BYTES)) == "default_allocator"


def test_a_freed_block_is_reused_and_zeros_are_zeros():
    with reused_memory():
        dirty = np.full(MIN_BYTES // 8, 7.0)
        address = dirty.ctypes.data
        del dirty
        before = reuses()
        zeros = np.zeros(MIN_BYTES // 8)
    assert reuses() == before + 1
    assert zeros.ctypes.data == address  # the same block, cleared
    assert not zeros.any()
    assert zeros.ctypes.data % 16 == 0


def test_small_arrays_and_much_smaller_requests_do_not_take_cached_blocks():
    with reused_memory():
        big = np.empty(4 * MIN_BYTES, np.uint8)
        del big
        before = reuses()
        small = np.empty(MIN_BYTES - 1, np.uint8)   # below the cache's minimum
        half = np.empty(2 * MIN_BYTES - 1, np.uint8)  # would waste over half of the block
        assert reuses() == before
        small[:] = 1
        half[:] = 2
        assert small.sum() == small.size and half.sum() == 2 * half.size


def test_resizing_in_place_keeps_the_contents():
    with reused_memory():
        array = np.arange(MIN_BYTES // 8, dtype=np.int64)
        array.resize(4 * array.size, refcheck=False)  # numpy's realloc
        assert get_handler_name(array) == "fastemb_block_cache"
        np.testing.assert_array_equal(array[: MIN_BYTES // 8], np.arange(MIN_BYTES // 8))
        array.resize(10, refcheck=False)
        np.testing.assert_array_equal(array, np.arange(10))


def advised_huge_pages(array):
    """Whether Linux has MADV_HUGEPAGE on the mapping that holds the array's first page
    boundary (its "hg" flag in /proc/self/smaps)."""
    first_page = -(-array.ctypes.data // 4096) * 4096
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: start-end perms ...
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                inside = start <= first_page < end
            elif inside and fields[0] == "VmFlags:":
                return "hg" in fields[1:]
    raise AssertionError("the array's page is in no mapping")


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
                    reason="needs Linux with transparent huge pages")
def test_blocks_of_4_mb_and_more_are_advised_to_use_huge_pages():
    """A fresh large output must not fault in 4 KB at a time (a 128 MB lookup output took 3x
    the lookup's time that way): like NumPy, blocks of 4 MB and more get MADV_HUGEPAGE,
    fresh, zeroed or grown."""
    size = 80 << 20  # past glibc's largest mmap threshold: a mapping of its own
    with reused_memory():
        fresh = np.empty(size, np.uint8)
        zeroed = np.zeros(size, np.uint8)
        grown = np.ones(MIN_BYTES, np.uint8)
        grown.resize(size, refcheck=False)
    assert advised_huge_pages(fresh) and advised_huge_pages(zeroed) and advised_huge_pages(grown)
    assert not zeroed.any() and grown[:MIN_BYTES].all()


def test_the_cache_keeps_at_most_its_slots_and_bytes():
    with reused_memory():
        arrays = [np.ones(MIN_BYTES * (k + 1), np.uint8) for k in range(40)]
    del arrays
    count, kept_bytes, _ = K.block_cache_state()
    assert count <= SLOTS and kept_bytes <= MAX_BYTES


def test_blocks_of_a_size_no_longer_asked_for_give_way_to_new_ones():
    with reused_memory():
        old = [np.empty(MIN_BYTES, np.uint8) for _ in range(SLOTS)]
        del old  # the cache is now full of 64 KiB blocks
        new = np.empty(MIN_BYTES * 8, np.uint8)
        address = new.ctypes.data
        del new  # kept, evicting the oldest 64 KiB block
        again = np.empty(MIN_BYTES * 8, np.uint8)
    assert again.ctypes.data == address


def test_threads_allocating_and_freeing_at_once_each_get_their_own_memory():
    failures = []

    def work(value):
        with reused_memory():
            for size in range(1, 200):
                array = np.full(MIN_BYTES // 8 * (size % 7 + 1), value, dtype=np.int64)
                if not (array == value).all():
                    failures.append(value)
                del array

    threads = [threading.Thread(target=work, args=(value,)) for value in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux page faults")
def test_a_training_step_reuses_the_last_steps_memory(rng):
    """Without the cache, each step faulted in its ~5 MB of per-call arrays afresh (about
    2,000 page faults on the large workload, a quarter of the step's time)."""
    num_indices = 65536
    bags = fastemb.EmbeddingBag(200_000, 32, mode="sum", seed=0)
    optimizer = optim.SGD(bags, lr=0.1)
    indices = rng.integers(0, 200_000, num_indices)
    offsets = np.arange(0, num_indices, 32)
    grad_output = np.ones((offsets.size, 32), np.float32)

    def step():
        optimizer.zero_grad()
        bags(indices, offsets)
        bags.backward(grad_output)
        optimizer.step()

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
    # the step's int64 arrays alone span num_indices * 8 * 6 bytes = 768 pages
    assert faults_per_step < 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux page faults")
@pytest.mark.parametrize("lookup", ["embedding", "embedding_bag"])
def test_a_loop_of_lookups_reuses_the_last_output(rng, lookup):
    """A forward output comes from the cache too: once the caller drops it, the next call of
    the same shape writes into those pages instead of faulting in fresh ones (for a gather of
    the large workload, 32 MB and 8,000 faults, that was over a third of its time)."""
    weight = rng.standard_normal((10_000, 64)).astype(np.float32)
    indices = rng.integers(0, 10_000, 40_000)
    offsets = np.arange(0, indices.size, 4)

    def call():
        if lookup == "embedding":
            return fastemb.embedding(indices, weight)
        return fastemb.embedding_bag(indices, weight, offsets, mode="sum")

    first = call()
    owner = first if first.base is None else first.base  # (embedding returns a reshaped view)
    assert get_handler_name(owner) == "fastemb_block_cache"
    del owner
    expected = first.copy()
    del first
    for _ in range(3):
        call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        out = call()
        assert np.array_equal(out, expected)
        del out
    faults_per_call = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
    # the output alone spans 40,000 * 64 * 4 bytes = 2,500 pages (embedding)
    assert faults_per_call < 50


def test_release_memory_hands_back_what_backward_kept(rng):
    bags = fastemb.EmbeddingBag(1000, 64, mode="sum", seed=0)
    indices = rng.integers(0, 1000, 50_000)
    for _ in range(2):  # the second backward frees the first one's plan into the cache
        bags.zero_grad()
        bags(indices, np.arange(0, indices.size, 10))
        bags.backward(np.ones((indices.size // 10, 64), np.float32))
    bags.zero_grad()
    count, kept_bytes, _ = K.block_cache_state()
    assert count > 0 and kept_bytes >= indices.size * 8
    assert fastemb.release_memory() == kept_bytes
    assert K.block_cache_state()[:2] == (0, 0)
    assert fastemb.release_memory() == 0
