"""Table and index layouts: Fortran order, strided views, read-only and memory-mapped tables all
work for lookups and give exactly what the C-contiguous copy gives; non-contiguous index,
offset and weight arrays work; max_norm writes through a writable memmap."""

import numpy as np
import pytest
from reference import assert_same_bits, embedding_bag_ref, embedding_ref, renorm_ref

import fastemb
from fastemb.functional import bag_forward

V, D = 30, 6


def base_table(dtype):
    rng = np.random.default_rng(7)
    return rng.integers(-4, 5, size=(2 * V, 2 * D)).astype(dtype)  # small ints: ties for max


def fortran(dtype, tmp_path):
    return np.asfortranarray(base_table(dtype)[:V, :D])


def every_other_row(dtype, tmp_path):
    return base_table(dtype)[::2, :D]


def column_slice(dtype, tmp_path):
    return base_table(dtype)[:V, 1:1 + D]


def both_strided(dtype, tmp_path):
    return base_table(dtype)[1::2, ::2]


def reversed_rows(dtype, tmp_path):
    return base_table(dtype)[:V, :D][::-1]


def read_only(dtype, tmp_path):
    weight = base_table(dtype)[:V, :D].copy()
    weight.flags.writeable = False
    return weight


def memmap_read_only(dtype, tmp_path):
    path = tmp_path / "table.bin"
    base_table(dtype)[:V, :D].copy().tofile(path)
    return np.memmap(path, dtype=dtype, mode="r", shape=(V, D))


def read_only_fortran(dtype, tmp_path):
    weight = fortran(dtype, tmp_path)
    weight.flags.writeable = False
    return weight


LAYOUTS = [fortran, every_other_row, column_slice, both_strided, reversed_rows, read_only,
           memmap_read_only, read_only_fortran]


@pytest.fixture(params=LAYOUTS, ids=lambda f: f.__name__)
def layout(request):
    return request.param


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    return request.param


def indices_and_offsets():
    rng = np.random.default_rng(3)
    indices = rng.integers(0, V, size=80)
    indices[::7] = 5  # padding_idx 5 occurs, in several bags
    offsets = np.array([0, 0, 3, 10, 10, 30, 50, 79])
    return indices, offsets


def test_layout_is_what_it_claims(layout, dtype, tmp_path):
    weight = layout(dtype, tmp_path)
    assert weight.shape == (V, D) and weight.dtype == dtype
    assert not (weight.flags.c_contiguous and weight.flags.writeable)


def test_embedding(layout, dtype, tmp_path):
    weight = layout(dtype, tmp_path)
    contiguous = np.ascontiguousarray(weight)
    indices = np.random.default_rng(0).integers(0, V, size=(4, 9))
    out = fastemb.embedding(indices, weight, padding_idx=5)
    assert_same_bits(out, fastemb.embedding(indices, contiguous, padding_idx=5))
    assert_same_bits(out, embedding_ref(indices, contiguous))
    assert fastemb.embedding(np.zeros((0, 2), np.int64), weight).shape == (0, 2, D)


@pytest.mark.parametrize("padding_idx", [None, 5, -1, 2])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag(layout, dtype, mode, padding_idx, tmp_path):
    """padding_idx 5 occurs in the input; -1 (row 29) and 2 may not (the kernels may look up a
    compacted copy of the rows: padding must follow, or vanish, correctly)."""
    weight = layout(dtype, tmp_path)
    contiguous = np.ascontiguousarray(weight)
    indices, offsets = indices_and_offsets()
    indices = indices[indices != 2]
    offsets = offsets[offsets <= indices.size]
    psw = np.linspace(-1, 2, indices.size).astype(dtype) if mode != "max" else None
    for weights in (None, psw):
        case = dict(input=indices, offsets=offsets, mode=mode, per_sample_weights=weights,
                    padding_idx=padding_idx)
        forward = bag_forward(weight=weight, **case)
        expected, winners = embedding_bag_ref(
            indices, contiguous, offsets, mode, weights, padding_idx=padding_idx)
        assert_same_bits(forward.output, expected)
        assert_same_bits(fastemb.embedding_bag(weight=contiguous, **case), expected)
        if mode == "max":
            np.testing.assert_array_equal(forward.winners, winners)


def test_two_d_bags(layout, dtype, tmp_path):
    weight = layout(dtype, tmp_path)
    contiguous = np.ascontiguousarray(weight)
    indices = np.random.default_rng(1).integers(0, V, size=(7, 4))
    for mode in ("sum", "mean", "max"):
        out = fastemb.embedding_bag(indices, weight, mode=mode, padding_idx=3)
        assert_same_bits(out, embedding_bag_ref(indices, contiguous, mode=mode, padding_idx=3)[0])


def test_table_of_another_layout_is_not_modified(layout, dtype, tmp_path):
    weight = layout(dtype, tmp_path)
    before = np.array(weight, copy=True)
    indices, offsets = indices_and_offsets()
    fastemb.embedding(indices, weight)
    fastemb.embedding_bag(indices, weight, offsets, mode="max", padding_idx=5)
    assert_same_bits(np.asarray(weight), before, nan_payload=True)


# --------------------------------------------------------------------------------------------
# Non-contiguous index, offset and weight arrays
# --------------------------------------------------------------------------------------------

def test_non_contiguous_indices():
    weight = base_table(np.float32)[:V, :D].copy()
    big = np.random.default_rng(2).integers(0, V, size=(12, 10))
    for indices in (big[::2, ::3], big.T, big[:, 4], big[::-1], big.astype(np.int32)[1::2]):
        assert not indices.flags.c_contiguous
        assert_same_bits(fastemb.embedding(indices, weight), embedding_ref(indices, weight))
    two_d = big[::2, 1::2]
    for mode in ("sum", "mean", "max"):
        assert_same_bits(fastemb.embedding_bag(two_d, weight, mode=mode),
                         embedding_bag_ref(two_d, weight, mode=mode)[0])
        flat = big[:, 3]
        offsets = np.array([0, 99, 2, 99, 5, 99])[::2]
        assert_same_bits(fastemb.embedding_bag(flat, weight, offsets, mode=mode),
                         embedding_bag_ref(flat, weight, offsets, mode=mode)[0])


def test_non_contiguous_per_sample_weights():
    weight = base_table(np.float64)[:V, :D].copy()
    indices = np.random.default_rng(4).integers(0, V, size=(5, 6))
    psw = np.linspace(-2, 2, 60).reshape(6, 10).T[::2, :6]
    assert psw.shape == (5, 6) and not psw.flags.c_contiguous
    for mode in ("sum", "mean"):
        assert_same_bits(
            fastemb.embedding_bag(indices, weight, mode=mode, per_sample_weights=psw),
            embedding_bag_ref(indices, weight, mode=mode, per_sample_weights=psw)[0],
        )


# --------------------------------------------------------------------------------------------
# max_norm on memory-mapped tables
# --------------------------------------------------------------------------------------------

def test_max_norm_writes_through_a_writable_memmap(tmp_path):
    weight = base_table(np.float32)[:V, :D].copy()
    path = tmp_path / "table.bin"
    weight.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r+", shape=(V, D))
    indices = np.array([0, 4, 4, 9])
    out = fastemb.embedding(indices, mapped, max_norm=2.0)
    expected = renorm_ref(weight, indices, 2.0)
    assert_same_bits(np.asarray(mapped), expected)
    assert_same_bits(out, expected[indices])
    mapped.flush()
    assert_same_bits(np.fromfile(path, np.float32).reshape(V, D), expected)


def test_max_norm_refuses_a_read_only_memmap(tmp_path, untouched):
    weight = memmap_read_only(np.float32, tmp_path)
    with untouched(weight):
        with pytest.raises(ValueError):
            fastemb.embedding([0, 1], weight, max_norm=1.0)


# --------------------------------------------------------------------------------------------
# No copies of a C-contiguous table
# --------------------------------------------------------------------------------------------

def test_a_c_contiguous_table_is_never_copied():
    """A lookup on a 16 MiB table allocates O(lookups), not O(table)."""
    import tracemalloc

    weight = np.random.default_rng(0).standard_normal((16384, 256)).astype(np.float32)
    indices = np.array([5, 16383, 5, 0])
    fastemb.embedding(indices, weight)  # warm up (imports, caches)
    tracemalloc.start()
    try:
        fastemb.embedding(indices, weight)
        fastemb.embedding_bag(indices, weight, offsets=[0, 2], mode="max", padding_idx=0)
        fastemb.embedding_bag(indices.reshape(2, 2), weight, mode="mean",
                              per_sample_weights=np.ones((2, 2), np.float32))
        fastemb.embedding(indices, weight, max_norm=1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < weight.nbytes // 16, f"peak allocation {peak} bytes"
