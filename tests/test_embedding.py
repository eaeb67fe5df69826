"""fastemb.embedding (row gather) and max_norm against the NumPy reference, bit for bit."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_same_bits, embedding_ref, out_of_range, renorm_ref
from strategies import lookup_cases, random_table, seeds

import fastemb

INT64 = np.iinfo(np.int64)
INT32 = np.iinfo(np.int32)


def table(num_embeddings=5, dim=3, dtype=np.float32, seed=0):
    return random_table(np.random.default_rng(seed), num_embeddings, dim, dtype)


@given(lookup_cases())
def test_matches_reference(case):
    indices, weight, padding_idx = case
    out = fastemb.embedding(indices, weight, padding_idx=padding_idx)
    assert_same_bits(out, embedding_ref(indices, weight), nan_payload=True)
    assert out.flags.c_contiguous and out.flags.writeable
    assert not np.shares_memory(out, weight)


@pytest.mark.parametrize("shape", [(), (0,), (4,), (2, 0), (0, 3), (2, 3, 4), (1, 1, 1, 2)])
def test_output_shape(shape):
    weight = table(dtype=np.float64)
    indices = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) % 5
    out = fastemb.embedding(indices, weight)
    assert out.shape == shape + (3,)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, weight[indices])


@pytest.mark.parametrize(
    "scalar", [3, np.int8(3), np.uint64(3), np.array(3), np.array(3, np.int32)], ids=repr
)
def test_scalar_index_gives_one_row(scalar):
    weight = table()
    assert_same_bits(fastemb.embedding(scalar, weight), weight[3])


def test_array_likes():
    weight = table()
    np.testing.assert_array_equal(fastemb.embedding([[0, 4], [2, 2]], weight),
                                  weight[[[0, 4], [2, 2]]])
    np.testing.assert_array_equal(fastemb.embedding((1, 2), weight), weight[[1, 2]])
    assert fastemb.embedding([], weight).shape == (0, 3)
    assert fastemb.embedding([[], []], weight).shape == (2, 0, 3)
    out = fastemb.embedding([1], weight.tolist())  # a nested list of floats is a float64 table
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, weight[[1]].astype(np.float64))


@pytest.mark.parametrize("index_dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32,
                                         np.uint32, np.int64, np.uint64])
def test_every_integer_dtype(index_dtype):
    weight = table(num_embeddings=7)
    indices = np.array([[6, 0], [3, 3]], dtype=index_dtype)
    assert_same_bits(fastemb.embedding(indices, weight), weight[indices.astype(np.int64)])


def test_padding_row_is_returned_as_stored():
    weight = table()
    assert np.all(weight[1] != 0)
    for padding_idx in (1, -4):
        out = fastemb.embedding([1, 0, 1], weight, padding_idx=padding_idx)
        np.testing.assert_array_equal(out, weight[[1, 0, 1]])


def test_last_row_is_in_range():
    weight = table()
    np.testing.assert_array_equal(fastemb.embedding([4], weight), weight[[4]])
    np.testing.assert_array_equal(fastemb.embedding(np.array([4], np.uint64), weight), weight[[4]])



@pytest.mark.parametrize(
    "indices, position, value",
    [
        ([0, 1, 2, 7, 9], "[3]", 7),
        ([5], "[0]", 5),
        ([0, -1], "[1]", -1),
        ([-5], "[0]", -5),
        ([[0, 1, 2], [3, 4, 7]], "[1, 2]", 7),
        ([[[0], [5]]], "[0, 1, 0]", 5),
        (np.array([0, INT64.max], np.int64), "[1]", INT64.max),
        (np.array([INT64.min], np.int64), "[0]", INT64.min),
        (np.array([1, INT32.max], np.int32), "[1]", INT32.max),
        (np.array([INT32.min], np.int32), "[0]", INT32.min),
        (np.array([3, 200], np.uint8), "[1]", 200),
        (np.array([-128], np.int8), "[0]", -128),
        (np.array([5], np.uint64), "[0]", 5),
        (np.int64(6), "[0]", 6),
    ],
)
def test_index_out_of_range(indices, position, value, untouched):
    weight = table()
    with untouched(weight, indices):
        with pytest.raises(IndexError, match=out_of_range(position, value)):
            fastemb.embedding(indices, weight)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("position", [0, 1, 4095, 4096, 4097, 8191, 9998])
@pytest.mark.parametrize("bad", [-1, 5, INT32.min])
def test_bad_index_found_at_every_chunk_edge(dtype, position, bad):
    # the range check counts outsiders 4096 indices at a time, then searches that chunk
    indices = np.arange(10_000, dtype=dtype) % 5
    indices[position] = bad
    indices[-1] = 7  # a later bad index (in the last chunk) must not be the one named
    with pytest.raises(IndexError, match=out_of_range(f"[{position}]", bad)):
        fastemb.embedding(indices, table())


def test_only_the_first_bad_index_is_named():
    with pytest.raises(IndexError, match=out_of_range("[1]", 9)):
        fastemb.embedding([0, 9, -1, 5], table())


@pytest.mark.parametrize("values", [[2**63], [0, 2**64 - 1]])
def test_uint64_beyond_int64_is_an_index_error(values):
    indices = np.array(values, dtype=np.uint64)
    with pytest.raises(IndexError) as info:
        fastemb.embedding(indices, table())
    position = len(values) - 1
    assert f"input[{position}]" in str(info.value) and str(values[-1]) in str(info.value)


def test_empty_table():
    weight = np.zeros((0, 3), np.float32)
    assert fastemb.embedding(np.zeros((2, 0), np.int64), weight).shape == (2, 0, 3)
    assert fastemb.embedding([], weight).shape == (0, 3)
    with pytest.raises(IndexError, match=out_of_range("[0]", 0, 0)):
        fastemb.embedding([0], weight)
    with pytest.raises(IndexError, match=out_of_range("[0]", 0, 0)):
        fastemb.embedding(0, weight)


def test_zero_width_table():
    weight = np.zeros((4, 0), np.float64)
    out = fastemb.embedding([[0, 3], [1, 2]], weight)
    assert out.shape == (2, 2, 0) and out.dtype == np.float64
    with pytest.raises(IndexError, match=out_of_range("[0, 1]", 4, 4)):
        fastemb.embedding([[0, 4]], weight)


def test_result_is_a_copy():
    weight = table()
    out = fastemb.embedding([1, 1], weight)
    out[0] = 42
    assert np.all(weight != 42)
    np.testing.assert_array_equal(out[1], weight[1])


# --------------------------------------------------------------------------------------------
# max_norm
# --------------------------------------------------------------------------------------------

NORM_TYPES = [2.0, 1.0, 3.0, 0.5, -1.0, 0.0, np.inf, -np.inf]
MAX_NORMS = [1.0, 0.5, 2.5, 0.0, -1.0, np.inf, np.nan, 1e-30]


@given(
    seeds,
    st.sampled_from([np.float32, np.float64]),
    st.sampled_from(NORM_TYPES),
    st.sampled_from(MAX_NORMS),
    st.sampled_from(["normal", "ties", "special"]),
    st.lists(st.integers(0, 7), max_size=12),
)
def test_max_norm_matches_reference(seed, dtype, norm_type, max_norm, kind, indices):
    rng = np.random.default_rng(seed)
    weight = random_table(rng, 8, 5, dtype, kind)
    expected_weight = renorm_ref(weight, indices, max_norm, norm_type)
    out = fastemb.embedding(np.array(indices, np.int64), weight, max_norm=max_norm,
                            norm_type=norm_type)
    assert_same_bits(weight, expected_weight)
    assert_same_bits(out, embedding_ref(np.array(indices, np.int64), expected_weight))


def test_max_norm_scales_rows_in_place():
    weight = np.array([[3, 4], [0.3, 0.4], [1, 1], [6, 8]], np.float32)
    original = weight.copy()
    out = fastemb.embedding([0, 1, 0, 3], weight, max_norm=1.0)
    expected_row = np.array([3, 4], np.float32) * np.float32(0.2)  # scale rounded to float32
    np.testing.assert_array_equal(weight[0], expected_row)
    scale = np.float32(1 / (10 + 1e-7))
    np.testing.assert_array_equal(weight[3], np.array([6, 8], np.float32) * scale)
    np.testing.assert_array_equal(weight[1:3], original[1:3])  # norm 0.5 < 1; row 2 not looked up
    np.testing.assert_array_equal(out, weight[[0, 1, 0, 3]])


def test_max_norm_is_strict():
    weight = np.array([[3, 4], [6, 8]], np.float64)
    fastemb.embedding([0, 1], weight, max_norm=5.0)
    np.testing.assert_array_equal(weight, [[3, 4], [6 * (5 / (10 + 1e-7)), 8 * (5 / (10 + 1e-7))]])


def test_max_norm_applies_to_the_padding_row():
    weight = np.array([[3, 4], [6, 8]], np.float32)
    fastemb.embedding([1], weight, padding_idx=1, max_norm=1.0)
    assert np.linalg.norm(weight[1]) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("bad", [[0, 9], [-1, 0], [[0, 1], [2, 5]]])
def test_indices_are_validated_before_max_norm_writes(bad, untouched):
    weight = np.array([[3, 4], [6, 8], [1, 1], [5, 5], [2, 2]], np.float32)
    with untouched(weight):
        with pytest.raises(IndexError):
            fastemb.embedding(bad, weight, max_norm=1.0)


def test_max_norm_on_empty_or_zero_width_tables():
    empty = np.zeros((0, 3), np.float32)
    assert fastemb.embedding([], empty, max_norm=1.0).shape == (0, 3)
    narrow = np.zeros((3, 0), np.float32)
    assert fastemb.embedding([2, 0], narrow, max_norm=1.0).shape == (2, 0)
