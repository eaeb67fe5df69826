"""Huge tables and memory use.

- 64-bit offsets: a table of more than 2**31 elements (33.5 million rows x 64 float32, 8.6 GB)
  as an ``np.memmap`` over a sparse file costs neither RAM nor disk; lookups, bags, max_norm, a
  backward and an SGD step on its last rows (whose element offsets are past 2**31) give exactly
  the rows written there, and nothing copies the table.
- Memory: a backward and an optimizer step allocate in proportion to the lookups, never to the
  table (tracemalloc sees NumPy's allocations); thousands of forward/backward/step calls neither
  grow what Python and NumPy hold nor the process's resident memory.
"""

import os
import tracemalloc

import numpy as np
import pytest
from reference import assert_same_bits, embedding_bag_ref, renorm_ref
from reference_training import bag_grad_ref, embedding_grad_ref

import fastemb

# --------------------------------------------------------------------------------------------
# A table of more than 2**31 elements
# --------------------------------------------------------------------------------------------

DIM = 64
ROWS = 2**31 // DIM + 1000  # 33,555,432 rows, 2,147,547,648 elements, 8.6 GB of float32
PAST_2_31 = 2**31 // DIM  # the first row whose elements start at offset 2**31
KNOWN = [ROWS - 1, ROWS - 2, ROWS - 777, PAST_2_31, PAST_2_31 - 1, 5]


def known_row(row):
    """The values written to a known row: distinct per row and column, exact in float32."""
    return ((np.arange(DIM) - 20) * 0.5 + (row % 1009)).astype(np.float32)


@pytest.fixture(scope="module")
def huge_table(tmp_path_factory):
    """A writable memmap over a sparse 8.6 GB file; only the KNOWN rows hold data (the rest
    reads as zeros). Skipped where the filesystem cannot make the file sparse."""
    path = tmp_path_factory.mktemp("huge") / "table.f32"
    nbytes = ROWS * DIM * 4
    try:
        with open(path, "wb") as file:
            file.truncate(nbytes)
    except OSError as error:
        pytest.skip(f"cannot create an {nbytes / 1e9:.1f} GB sparse file here: {error}")
    if os.stat(path).st_blocks * 512 > 1 << 20:
        path.unlink()
        pytest.skip("the filesystem does not make sparse files")
    table = np.memmap(path, dtype=np.float32, mode="r+", shape=(ROWS, DIM))
    for row in KNOWN:
        table[row] = known_row(row)
    table.flush()
    assert table.size > 2**31 and table.flags.c_contiguous
    yield table
    del table
    path.unlink()


def expected_rows(rows):
    return np.stack([known_row(r) if r in KNOWN else np.zeros(DIM, np.float32) for r in rows])


@pytest.fixture
def no_table_sized_allocation():
    """Fails the test if NumPy allocated anything near 1 GB (a copy of the table) in it."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    yield
    peak = tracemalloc.get_traced_memory()[1] - start
    tracemalloc.stop()
    assert peak < 256 << 20, f"{peak / 1e6:.0f} MB allocated: the table was copied"


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64, np.uint32])
@pytest.mark.parametrize("thread_count", [1, 2])
def test_huge_table_lookups(huge_table, index_dtype, thread_count, threads,
                            no_table_sized_allocation):
    rows = [ROWS - 1, PAST_2_31, ROWS - 777, 3, PAST_2_31 - 1, ROWS - 2, ROWS - 1]
    indices = np.array(rows, dtype=index_dtype)
    with threads(thread_count):
        assert_same_bits(fastemb.embedding(indices, huge_table), expected_rows(rows))
        assert_same_bits(fastemb.embedding(indices.reshape(7, 1), huge_table),
                         expected_rows(rows).reshape(7, 1, DIM))
        for bad in (ROWS, 2**31, -1):
            with pytest.raises(IndexError, match="out of range"):
                fastemb.embedding(np.array([ROWS - 1, bad], np.int64), huge_table)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("thread_count", [1, 2])
def test_huge_table_bags(huge_table, mode, thread_count, threads, no_table_sized_allocation):
    indices = np.array([ROWS - 1, PAST_2_31, ROWS - 777, ROWS - 2, 5, PAST_2_31 - 1, ROWS - 1,
                        PAST_2_31], dtype=np.int64)
    offsets = np.array([0, 3, 3, 6])
    # the reference on a small table holding just these rows, renumbered
    distinct = sorted(set(indices.tolist()))
    small = expected_rows(distinct)
    local = np.searchsorted(distinct, indices)
    weights = np.linspace(-1, 2, indices.size).astype(np.float32)
    with threads(thread_count):
        for psw in ((None,) if mode == "max" else (None, weights)):
            got = fastemb.embedding_bag(indices, huge_table, offsets, mode=mode,
                                        per_sample_weights=psw, padding_idx=ROWS - 2)
            expected, _ = embedding_bag_ref(local, small, offsets, mode, psw,
                                            padding_idx=distinct.index(ROWS - 2))
            assert_same_bits(got, expected)
        got = fastemb.embedding_bag(indices.reshape(2, 4).astype(np.int32), huge_table,
                                    mode=mode)
        expected, _ = embedding_bag_ref(local.reshape(2, 4), small, mode=mode)
        assert_same_bits(got, expected)


def test_huge_table_backward_and_sgd_step_on_its_last_rows(huge_table, threads,
                                                           no_table_sized_allocation):
    """EmbeddingBag over the memmap (shared, not copied): forward, backward and an SGD step
    touch exactly the last rows, through 64-bit offsets; every other row stays as it was."""
    indices = np.array([[ROWS - 1, ROWS - 2, PAST_2_31], [ROWS - 1, PAST_2_31 - 1, ROWS - 1]])
    distinct = sorted(set(indices.ravel().tolist()))
    local = np.searchsorted(distinct, indices)
    before = {row: np.array(huge_table[row]) for row in distinct + [ROWS - 777, 5]}
    module = fastemb.EmbeddingBag.from_pretrained(huge_table, freeze=False, mode="max")
    assert module.weight is huge_table
    optimizer = fastemb.optim.SGD(module, lr=0.5)
    grad_output = np.arange(2 * DIM, dtype=np.float32).reshape(2, DIM) / 8
    with threads(2):
        out = module(indices)
        grad = module.backward(grad_output)
        rows, values = bag_grad_ref(expected_rows(distinct), local, grad_output, mode="max")
        np.testing.assert_array_equal(grad.rows, np.array(distinct)[rows])
        optimizer.step()
    assert_same_bits(out, embedding_bag_ref(local, expected_rows(distinct), mode="max")[0])
    for row, value in zip(grad.rows.tolist(), values):
        assert_same_bits(huge_table[row], before[row] + np.float32(-0.5) * value)
    for row in (ROWS - 777, 5):
        assert_same_bits(huge_table[row], before[row])
    huge_table[distinct] = np.stack([before[r] for r in distinct])  # restore


def test_huge_table_embedding_backward_and_max_norm(huge_table, no_table_sized_allocation):
    rows = np.array([ROWS - 1, PAST_2_31, ROWS - 1, ROWS - 2])
    grad_output = np.ones((4, DIM), np.float32)
    grad = fastemb.embedding_backward(grad_output, rows, ROWS, padding_idx=-2)
    expected_rows_, values = embedding_grad_ref(rows, grad_output, ROWS, padding_idx=-2)
    np.testing.assert_array_equal(grad.rows, expected_rows_)
    assert_same_bits(grad.values, values)
    assert grad.shape == (ROWS, DIM)
    # max_norm rescales the last rows in place, through the memmap
    saved = np.array(huge_table[[ROWS - 1, PAST_2_31]])
    out = fastemb.embedding(rows[:2], huge_table, max_norm=3.0)
    expected = renorm_ref(saved, [0, 1], 3.0)
    assert_same_bits(np.asarray(huge_table[[ROWS - 1, PAST_2_31]]), expected)
    assert_same_bits(out, expected)
    huge_table[[ROWS - 1, PAST_2_31]] = saved


# --------------------------------------------------------------------------------------------
# Memory in proportion to the lookups
# --------------------------------------------------------------------------------------------

BIG_ROWS, BIG_DIM, BATCH = 5_000_000, 32, 1000
TABLE_BYTES = BIG_ROWS * BIG_DIM * 4  # 640 MB


@pytest.fixture(scope="module")
def big_table():
    """5,000,000 x 32 float32 from np.zeros: the pages are only touched when a row is."""
    return np.zeros((BIG_ROWS, BIG_DIM), np.float32)


def peak_of(call):
    """(result, peak bytes NumPy and Python allocated during ``call``, beyond what was held)."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = call()
        return result, tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_tracemalloc_sees_numpy_allocations(big_table):
    """Control: a dense gradient (what a careless backward would build) shows as table-sized,
    so the bounds below can fail."""
    grad = fastemb.SparseGrad([0, BIG_ROWS - 1], np.ones((2, BIG_DIM), np.float32), BIG_ROWS)
    _, peak = peak_of(grad.to_dense)
    assert peak >= TABLE_BYTES


CASES = {
    "Embedding + SGD": (lambda w: fastemb.Embedding.from_pretrained(w, freeze=False),
                        lambda m: fastemb.optim.SGD(m, lr=0.1), False),
    "EmbeddingBag mean, weighted + LazyAdam": (
        lambda w: fastemb.EmbeddingBag.from_pretrained(w, freeze=False, mode="mean"),
        lambda m: fastemb.optim.LazyAdam(m, lr=0.01), True),
    "EmbeddingBag max + RowWiseAdagrad": (
        lambda w: fastemb.EmbeddingBag.from_pretrained(w, freeze=False, mode="max",
                                                       padding_idx=0),
        lambda m: fastemb.optim.RowWiseAdagrad(m, lr=0.1), False),
    "EmbeddingBag sum, scaled + SGD": (
        lambda w: fastemb.EmbeddingBag.from_pretrained(w, freeze=False, mode="sum",
                                                       scale_grad_by_freq=True),
        lambda m: fastemb.optim.SGD(m, lr=0.1), False),
}
PEAK_FIGURES = {}


def spread_indices(rng, size):
    """Lookups over the whole table (its first and last rows included), drawn from 8 runs of
    8192 rows: NumPy asks for transparent huge pages on big arrays, so each touched run costs
    a 2 MB page of the table and of each optimizer state, whatever the table size."""
    starts = np.linspace(0, BIG_ROWS - 8192, 8).astype(np.int64)
    return rng.choice(starts, size) + rng.integers(0, 8192, size)


def make_training(case, table, rng):
    make_module, make_optimizer, weighted = CASES[case]
    module = make_module(table)
    optimizer = make_optimizer(module)  # (its state arrays: np.zeros, untouched pages)
    batches = []
    for _ in range(8):
        indices = spread_indices(rng, BATCH)
        bag = isinstance(module, fastemb.EmbeddingBag)
        offsets = np.sort(rng.integers(0, BATCH, BATCH // 10)) if bag else None
        if bag:
            offsets[0] = 0
        psw = rng.random(BATCH).astype(np.float32) if weighted else None
        batches.append((indices, offsets, psw))

    def forward_backward(batch):
        indices, offsets, psw = batch
        out = module(indices, offsets, psw) if offsets is not None else module(indices)
        module.backward(np.ones_like(out))

    def iteration(batch):
        forward_backward(batch)
        optimizer.step()
        optimizer.zero_grad()

    return module, optimizer, batches, forward_backward, iteration


@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_and_step_allocate_per_lookup_not_per_table(big_table, case):
    rng = np.random.default_rng(0)
    module, optimizer, batches, forward_backward, iteration = make_training(case, big_table,
                                                                            rng)
    for batch in batches:  # warm up (first-call allocations, lazy imports)
        iteration(batch)
    lookup_bytes = BATCH * BIG_DIM * 4  # one batch of looked-up rows: 128 KB
    _, peak_forward_backward = peak_of(lambda: forward_backward(batches[0]))
    _, peak_step = peak_of(optimizer.step)
    optimizer.zero_grad()
    PEAK_FIGURES[case] = (peak_forward_backward, peak_step)
    print(f"{case}: forward+backward peak {peak_forward_backward / 1024:.0f} KiB, step peak "
          f"{peak_step / 1024:.0f} KiB, table {TABLE_BYTES / 2**20:.0f} MiB")
    assert peak_forward_backward < 8 * lookup_bytes, peak_forward_backward
    assert peak_step < 2 * lookup_bytes, peak_step
    assert max(peak_forward_backward, peak_step) < TABLE_BYTES / 500


@pytest.mark.parametrize("case", sorted(CASES))
def test_thousands_of_iterations_do_not_grow_memory(big_table, case):
    """3,000 forward/backward/step/zero_grad iterations: what Python and NumPy hold is the
    same before and after (a leak of one small array per call would show 100s of KB)."""
    rng = np.random.default_rng(1)
    module, optimizer, batches, _, iteration = make_training(case, big_table, rng)
    for batch in batches:
        iteration(batch)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(3000):
            iteration(batches[number % len(batches)])
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth < 64 << 10, f"{growth} bytes more held after 3,000 iterations"


def resident_bytes():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_resident_memory_does_not_grow_with_iterations():
    """Leaks that tracemalloc cannot see (C allocations in the kernels or the OpenMP runtime):
    the process's resident memory after 4,000 more iterations on a small table (whose pages
    are all touched in the warm-up) grows by less than 8 MB."""
    rng = np.random.default_rng(2)
    table = rng.standard_normal((20_000, 32)).astype(np.float32)
    modules = [fastemb.Embedding.from_pretrained(table.copy(), freeze=False),
               fastemb.EmbeddingBag.from_pretrained(table.copy(), freeze=False, mode="max")]
    optimizer = fastemb.optim.LazyAdam(modules, lr=1e-3)
    indices = [rng.integers(0, 20_000, BATCH) for _ in range(4)]

    def iteration(number):
        ids = indices[number % 4]
        for module in modules:
            out = module(ids.reshape(-1, 10))
            module.backward(np.ones_like(out))
        optimizer.step()
        optimizer.zero_grad()

    for number in range(500):
        iteration(number)
    before = resident_bytes()
    for number in range(4000):
        iteration(number)
    growth = resident_bytes() - before
    assert growth < 8 << 20, f"resident memory grew by {growth / 2**20:.1f} MiB"
