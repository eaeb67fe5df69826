"""fastemb.embedding_bag against the NumPy reference, bit for bit, plus its fixed cases."""

import re

import numpy as np
import pytest
from hypothesis import given
from common_path import check_runs_unchanged, declined_bag_calls, plain_bag_calls
from hypothesis import strategies as st
from reference import (assert_same_bits, bag_bounds_ref, embedding_bag_ref, out_of_range,
                       renorm_ref)
from strategies import MODES, bag_cases, random_table, reference_kwargs, seeds

import fastemb
from fastemb._memory import aligned_full
from fastemb.functional import bag_forward

W5 = np.array([[1, -2], [3, 4], [-5, 6], [7, -8], [0.5, 0.5]], np.float32)
I6 = np.array([0, 1, 2, 3, 4, 1])


def check_against_reference(case):
    """Run one case through fastemb and the reference; outputs (and max winners) bitwise."""
    expected, expected_winners = embedding_bag_ref(**reference_kwargs(case))
    forward = bag_forward(**case)
    assert_same_bits(forward.output, expected)
    assert_same_bits(fastemb.embedding_bag(**case), expected)
    if case["mode"] == "max":
        np.testing.assert_array_equal(forward.winners, expected_winners)
    return forward.output


@given(bag_cases())
def test_matches_reference(case):
    check_against_reference(case)


@given(bag_cases(modes=("sum", "mean"), weights=True))
def test_weighted_matches_reference(case):
    check_against_reference(case)


@given(bag_cases(modes=("max",), table_kinds=("ties", "special")))
def test_max_ties_and_nan_match_reference(case):
    check_against_reference(case)


# Row widths at and around the kernels' column blocks (32, 64 and 128 elements, by dtype and
# build), and any width up to 300.
BLOCK_EDGES = [31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257]


@given(seeds, st.sampled_from(MODES), st.sampled_from([np.float32, np.float64]),
       st.integers(1, 40), st.sampled_from(BLOCK_EDGES) | st.integers(1, 300))
def test_long_bags_and_wide_rows(seed, mode, dtype, bag_length, dim):
    """Wider rows and longer bags than the general strategy, to cover vectorised loops and
    rows reduced in several column blocks."""
    rng = np.random.default_rng(seed)
    weight = random_table(rng, 50, dim, dtype)
    indices = rng.integers(0, 50, size=3 * bag_length)
    offsets = np.array([0, bag_length, 2 * bag_length])
    psw = rng.standard_normal(indices.size).astype(dtype) if mode != "max" else None
    for weights in (None, psw):
        check_against_reference(dict(input=indices, weight=weight, offsets=offsets, mode=mode,
                                     per_sample_weights=weights, padding_idx=7))


@pytest.mark.parametrize("dtype, dim", [(np.float32, 64), (np.float64, 32), (np.float32, 200),
                                        (np.float32, 16), (np.float32, 120)])
def test_prefetching_loops_on_a_table_past_the_caches(dtype, dim, threads):
    """Tables past the caches (here 9 MB; the bag kernels prefetch from 256 KB on) take the
    kernels' other loops, which prefetch the rows some positions ahead (across bag ends, up to the last index), on tables whose rows start on cache lines
    and on tables whose rows do not: the same bits as the reference, with padding, empty bags
    and weights, on 1 and 2 threads. (64 float32 and 32 float64 columns are one block of 256
    bytes, 16 float32 one of 64; 200 float32 are a wide block, one of 256 and one of 32; 120
    float32 one narrow block of each width.)"""
    rng = np.random.default_rng(dim)
    num_rows = (9 << 20) // (dim * np.dtype(dtype).itemsize)
    storage = aligned_full((num_rows * dim + 1,), 0, dtype)
    storage[:] = rng.standard_normal(storage.size)
    assert storage.ctypes.data % 64 == 0  # so rows of 256 bytes start on lines, one element on do not
    for weight in (storage[:-1].reshape(num_rows, dim), storage[1:].reshape(num_rows, dim)):
        check_bag_modes_against_reference(rng, weight, threads)


# The kernel reduces bags in chunks of 64 per parallel iteration: 150 bags end in a partial one.
# Rows of one block: 64 float32 (256 bytes), 128 (512: the AVX2 wide block), 16 float64 (128),
# 16 float32 (64), 8 float32 (32), 3 float32 (a partial block only). Rows of several: 100
# float32 (256 + 128 + 16), 7 float64 (32 + 24), 48 float32 (128 + 64), 120 float32 (256 + 128
# + 64 + 32).
@pytest.mark.parametrize("dtype, dim", [(np.float32, 64), (np.float32, 128), (np.float64, 16),
                                        (np.float32, 16), (np.float32, 8), (np.float32, 3),
                                        (np.float32, 100), (np.float64, 7), (np.float32, 48),
                                        (np.float32, 120)])
def test_many_bags_across_the_kernels_chunks_of_bags(dtype, dim, threads):
    """Every bag of several chunks, on rows of one column block (where a block's loop runs
    over a chunk's bags) and of several (bag by bag): the same bits as the reference."""
    rng = np.random.default_rng(dim)
    check_bag_modes_against_reference(rng, random_table(rng, 500, dim, dtype), threads,
                                      num_bags=150)


def check_bag_modes_against_reference(rng, weight, threads, num_bags=20):
    """Every mode, with and without weights, padding and an empty bag, on 1 and 2 threads."""
    num_rows, dtype = weight.shape[0], weight.dtype
    indices = rng.integers(0, num_rows, size=15 * num_bags)
    indices[::7] = 3
    offsets = np.sort(rng.integers(0, indices.size, size=num_bags))
    offsets[0] = 0
    offsets[5] = offsets[4]  # an empty bag
    psw = rng.standard_normal(indices.size).astype(dtype)
    for count in (1, 2):
        with threads(count):
            for mode in MODES:
                for weights in (None,) if mode == "max" else (None, psw):
                    check_against_reference(dict(input=indices, weight=weight, offsets=offsets,
                                                 mode=mode, per_sample_weights=weights,
                                                 padding_idx=3))


# --------------------------------------------------------------------------------------------
# Fixed cases
# --------------------------------------------------------------------------------------------

EXAMPLE = {  # W5, I6, offsets [0, 2, 2, 5]: torch-semantics section 2.4
    "sum": [[4, 2], [0, 0], [2.5, -1.5], [3, 4]],
    "mean": [[2, 1], [0, 0], [2.5 / 3, -0.5], [3, 4]],
    "max": [[3, 4], [0, 0], [7, 6], [3, 4]],
}


@pytest.mark.parametrize("mode", MODES)
def test_worked_example(mode, dtype):
    weight = W5.astype(dtype)
    expected = np.array(EXAMPLE[mode], dtype=dtype)
    out = fastemb.embedding_bag(I6, weight, offsets=[0, 2, 2, 5], mode=mode)
    assert_same_bits(out, expected)
    last = fastemb.embedding_bag(I6, weight, offsets=[0, 2, 2, 5, 6], mode=mode,
                                 include_last_offset=True)
    assert_same_bits(last, expected)


def test_default_mode_is_mean():
    assert_same_bits(fastemb.embedding_bag(I6, W5, offsets=[0, 2, 2, 5]),
                     np.array(EXAMPLE["mean"], np.float32))


def test_max_winners():
    forward = bag_forward(I6, W5, offsets=[0, 2, 2, 5], mode="max")
    np.testing.assert_array_equal(forward.winners, [[1, 1], [-1, -1], [3, 2], [1, 1]])


def test_max_first_wins_ties():
    weight = np.array([[1, 5], [1, 5], [2, 0]], np.float32)
    forward = bag_forward([1, 0, 2], weight, offsets=[0], mode="max")
    np.testing.assert_array_equal(forward.output, [[2, 5]])
    np.testing.assert_array_equal(forward.winners, [[2, 1]])


def test_max_nan_survives_only_first():
    weight = np.array([[0, 0], [0, 0], [2, 0], [np.nan, 1]], np.float64)
    first = bag_forward([3, 2], weight, offsets=[0], mode="max")
    np.testing.assert_array_equal(first.output, [[np.nan, 1]])
    np.testing.assert_array_equal(first.winners, [[3, 3]])
    later = bag_forward([2, 3], weight, offsets=[0], mode="max")
    np.testing.assert_array_equal(later.output, [[2, 1]])
    np.testing.assert_array_equal(later.winners, [[2, 3]])


def test_max_of_negative_rows_and_signed_zero():
    weight = np.array([[-3, -0.0], [-2, 0.0], [-7, -1]], np.float32)
    out = fastemb.embedding_bag([[0, 1, 2]], weight, mode="max")
    assert_same_bits(out, np.array([[-2, -0.0]], np.float32))  # -0.0 came first: it stays


@pytest.mark.parametrize("padding_idx", [1, -4])
def test_padding_is_skipped_and_not_counted(padding_idx):
    sums = fastemb.embedding_bag(I6, W5, offsets=[0, 2, 2, 5], mode="sum", padding_idx=padding_idx)
    np.testing.assert_array_equal(sums, [[1, -2], [0, 0], [2.5, -1.5], [0, 0]])
    means = fastemb.embedding_bag(I6, W5, offsets=[0, 2, 2, 5], mode="mean",
                                  padding_idx=padding_idx)
    assert_same_bits(means, np.array([[1, -2], [0, 0], [np.float32(2.5) / np.float32(3), -0.5],
                                      [0, 0]], np.float32))
    forward = bag_forward(I6, W5, offsets=[0, 2, 2, 5], mode="max", padding_idx=padding_idx)
    np.testing.assert_array_equal(forward.output, [[1, -2], [0, 0], [7, 6], [0, 0]])
    np.testing.assert_array_equal(forward.winners, [[0, 0], [-1, -1], [3, 2], [-1, -1]])


@pytest.mark.parametrize("mode", MODES)
def test_all_padding_bags_are_zero(mode):
    weight = W5 + 10  # no zero rows
    out = fastemb.embedding_bag([[1, 1], [4, 1]], weight, mode=mode, padding_idx=1)
    assert_same_bits(out, np.array([[0, 0], weight[4]], np.float32))
    out = fastemb.embedding_bag([4, 4], weight, offsets=[0], mode=mode, padding_idx=-1)
    assert_same_bits(out, np.zeros((1, 2), np.float32))


@pytest.mark.parametrize("mode", MODES)
def test_zero_bags(mode, dtype):
    weight = W5.astype(dtype)
    for indices in ([], I6, np.array([], np.int32)):
        out = fastemb.embedding_bag(indices, weight, offsets=np.array([], np.int64), mode=mode)
        assert out.shape == (0, 2) and out.dtype == dtype
    out = fastemb.embedding_bag([], weight, offsets=[0], mode=mode, include_last_offset=True)
    assert out.shape == (0, 2) and out.dtype == dtype
    out = fastemb.embedding_bag(np.zeros((0, 3), np.int64), weight, mode=mode, padding_idx=0)
    assert out.shape == (0, 2) and out.dtype == dtype


@pytest.mark.parametrize("mode", MODES)
def test_empty_input_with_one_offset_is_one_zero_bag(mode):
    out = fastemb.embedding_bag([], W5 + 1, offsets=[0], mode=mode)
    assert_same_bits(out, np.zeros((1, 2), np.float32))
    out = fastemb.embedding_bag([], W5 + 1, offsets=[0, 0, 0], mode=mode, padding_idx=2)
    assert_same_bits(out, np.zeros((3, 2), np.float32))


@pytest.mark.parametrize("mode", MODES)
def test_two_d_input_with_empty_rows(mode):
    """(B, 0) input gives B zero bags (torch raises "step must be nonzero")."""
    out = fastemb.embedding_bag(np.zeros((3, 0), np.int64), W5 + 1, mode=mode)
    assert_same_bits(out, np.zeros((3, 2), np.float32))


@pytest.mark.parametrize("include_last_offset", [False, True])
def test_two_d_input(include_last_offset):
    out = fastemb.embedding_bag(I6.reshape(3, 2), W5, mode="sum",
                                include_last_offset=include_last_offset)
    np.testing.assert_array_equal(out, [[4, 2], [2, -2], [3.5, 4.5]])


@pytest.mark.parametrize("offsets_dtype", [np.int8, np.uint8, np.int16, np.int32, np.uint32,
                                           np.int64, np.uint64])
def test_offsets_of_any_integer_dtype(offsets_dtype):
    out = fastemb.embedding_bag(I6, W5, offsets=np.array([0, 2, 2, 5], offsets_dtype),
                                mode="sum")
    np.testing.assert_array_equal(out, EXAMPLE["sum"])


@pytest.mark.parametrize("include_last_offset", [False, True])
def test_offsets_fast_path_gives_the_reference_bounds_or_declines(include_last_offset, rng):
    """bounds_from_offsets (the lookups' one-call path) gives bag_bounds_ref's bounds for valid
    int32/int64 offsets, read-only ones too, and None (the Python checks then run) for every
    other layout or an invalid value."""
    from fastemb._kernels import kernels

    num_indices = 50
    cuts = np.sort(rng.integers(0, num_indices + 1, 20))
    cuts[0] = 0
    if include_last_offset:
        cuts = np.append(cuts, num_indices)
    expected = [start for start, _ in bag_bounds_ref(num_indices, cuts, include_last_offset)]
    expected.append(num_indices)
    for dtype in (np.int32, np.int64):
        offsets = cuts.astype(dtype)
        offsets.flags.writeable = False
        bounds = kernels.bounds_from_offsets(offsets, num_indices, include_last_offset)
        assert bounds.dtype == np.int64 and bounds.tolist() == expected
    declined = [cuts.tolist(), cuts.astype(np.int16), cuts.astype(np.uint32),
                cuts.astype(">i8"), np.repeat(cuts, 2)[::2], cuts.reshape(1, -1),
                np.append(cuts, num_indices + 1), np.append(cuts[::-1], 0), cuts + 1]
    for offsets in declined:
        assert kernels.bounds_from_offsets(offsets, num_indices, include_last_offset) is None


def common_path(case):
    """What the one-call path of fastemb.embedding_bag gives for ``case`` (None: declined)."""
    from fastemb._kernels import kernels

    return kernels.bag_forward_common(
        case["input"], case["weight"], case.get("offsets"), case["mode"],
        case.get("per_sample_weights"), case.get("include_last_offset", False),
        case.get("padding_idx"))


@given(bag_cases(modes=("sum", "mean", "max"), weights=True))
def test_common_path_gives_the_general_paths_bits_or_declines(case):
    """The one-call path equals the general path (bag_forward) bit for bit wherever it runs
    (embedding_bag takes it only without max_norm)."""
    if case.get("max_norm") is None:
        out = common_path(case)
        if out is not None:
            assert_same_bits(out, bag_forward(**case).output)


try:
    import ml_dtypes
    SIXTEEN_BIT_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
except ImportError:  # (bfloat16 tables need ml_dtypes)
    SIXTEEN_BIT_DTYPES = (np.dtype(np.float16),)


@given(bag_cases(weights=True, table_dtypes=SIXTEEN_BIT_DTYPES))
def test_common_path_on_16_bit_tables_gives_the_general_paths_bits(case):
    """float16 and bfloat16 tables take the one-call path too (float32 per-sample weights),
    with the general path's bits."""
    if case["per_sample_weights"] is not None:
        case["per_sample_weights"] = case["per_sample_weights"].astype(np.float32)
    out = common_path(case)
    if out is not None:
        assert out.dtype == np.float32
        assert_same_bits(out, bag_forward(**case).output)


@pytest.mark.parametrize("table_dtype", [np.float32, np.float64, *SIXTEEN_BIT_DTYPES])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_common_path_runs_on_plain_arrays_and_declines_the_rest(table_dtype, index_dtype, rng):
    """Plain arrays take the one-call path (with the general path's bits); every other kind of
    argument, and any invalid one, is declined (None), so that the general path converts or
    explains it; nothing the caller holds changes either way."""
    weight = random_table(rng, 9, 5, table_dtype)
    sum_dtype = np.float64 if table_dtype == np.float64 else np.float32
    indices = rng.integers(0, 9, 12).astype(index_dtype)
    offsets = np.array([0, 3, 3, 7], index_dtype)
    sample_weights = rng.random(12).astype(sum_dtype)
    check_runs_unchanged(plain_bag_calls(weight, indices, offsets, sample_weights), common_path,
                         lambda call: bag_forward(**call).output, assert_same_bits)
    plain = dict(input=indices, weight=weight, offsets=offsets, mode="sum")
    declined = declined_bag_calls(weight, indices, offsets, sample_weights) + [
        {**plain, "weight": np.asfortranarray(weight)}, {**plain, "weight": weight.tolist()},
        {**plain, "weight": weight.astype(np.dtype(table_dtype).newbyteorder())},
        {**plain, "weight": weight[:, :0]}]
    for case in declined:
        assert common_path(case) is None, case


@pytest.mark.parametrize("index_dtype", [np.int8, np.uint16, np.int32, np.uint64])
def test_converted_index_dtypes(index_dtype):
    expected = fastemb.embedding_bag(I6, W5, offsets=[0, 2, 2, 5], mode="max", padding_idx=4)
    out = fastemb.embedding_bag(I6.astype(index_dtype), W5, offsets=[0, 2, 2, 5], mode="max",
                                padding_idx=4)
    assert_same_bits(out, expected)


# --------------------------------------------------------------------------------------------
# Per-sample weights
# --------------------------------------------------------------------------------------------

PSW = np.arange(1, 7, dtype=np.float32)


def test_weighted_sum():
    out = fastemb.embedding_bag(I6, W5, offsets=[0, 3], mode="sum", per_sample_weights=PSW)
    np.testing.assert_array_equal(out, [[-8, 24], [48.5, -5.5]])
    out = fastemb.embedding_bag(I6, W5, offsets=[0, 3], mode="sum", per_sample_weights=PSW,
                                padding_idx=1)
    np.testing.assert_array_equal(out, [[-14, 16], [30.5, -29.5]])


def test_weighted_mean():
    """The weighted mean: sum(w * row) / sum(w) over non-padding entries (torch refuses it)."""
    out = fastemb.embedding_bag(I6, W5, offsets=[0, 3], mode="mean", per_sample_weights=PSW)
    f = np.float32
    assert_same_bits(out, np.array([[f(-8) / f(6), f(24) / f(6)],
                                    [f(48.5) / f(15), f(-5.5) / f(15)]]))
    out = fastemb.embedding_bag(I6, W5, offsets=[0, 3], mode="mean", per_sample_weights=PSW,
                                padding_idx=1)
    assert_same_bits(out, np.array([[f(-14) / f(4), f(16) / f(4)],
                                    [f(30.5) / f(9), f(-29.5) / f(9)]]))


def test_weighted_mean_with_zero_weight_sum_is_zero():
    psw = np.array([1, -1, 2, 0, 0, 5], np.float64)
    out = fastemb.embedding_bag(I6, W5.astype(np.float64), offsets=[0, 2, 3, 5], mode="mean",
                                per_sample_weights=psw, padding_idx=1)
    # bag 0: 1*W[0] / 1 (padding entry 1 skipped); bag 1: 2*W[2] / 2; bag 2: weights sum to 0;
    # bag 3: only padding
    np.testing.assert_array_equal(out, [[1, -2], [-5, 6], [0, 0], [0, 0]])
    out = fastemb.embedding_bag(I6, W5.astype(np.float64), offsets=[0, 2], mode="mean",
                                per_sample_weights=np.array([1, -1, 0, 0, 0, 0.0]))
    np.testing.assert_array_equal(out, [[0, 0], [0, 0]])


def test_weights_for_two_d_input_and_list_weights():
    out = fastemb.embedding_bag(I6.reshape(2, 3), W5, mode="sum",
                                per_sample_weights=PSW.reshape(2, 3).tolist())
    np.testing.assert_array_equal(out, [[-8, 24], [48.5, -5.5]])


# --------------------------------------------------------------------------------------------
# Bounds, tables of size 0
# --------------------------------------------------------------------------------------------



@pytest.mark.parametrize("mode", MODES)
def test_index_bounds(mode, untouched):
    np.testing.assert_array_equal(
        fastemb.embedding_bag([4, 4], W5, offsets=[0, 1], mode=mode), W5[[4, 4]]
    )
    bad = [0, 1, 2, 7, 3]
    with untouched(W5):
        with pytest.raises(IndexError, match=out_of_range("[3]", 7)):
            fastemb.embedding_bag(bad, W5, offsets=[0, 2], mode=mode)
        with pytest.raises(IndexError, match=out_of_range("[1]", -1)):
            fastemb.embedding_bag([0, -1], W5, offsets=[0], mode=mode)
        with pytest.raises(IndexError, match=out_of_range("[1, 2]", 5)):
            fastemb.embedding_bag([[0, 1, 2], [3, 4, 5]], W5, mode=mode)
        with pytest.raises(IndexError, match=out_of_range("[0]", np.iinfo(np.int64).min)):
            fastemb.embedding_bag(np.array([np.iinfo(np.int64).min]), W5, offsets=[0], mode=mode)
        with pytest.raises(IndexError):
            fastemb.embedding_bag(np.array([2**63], np.uint64), W5, offsets=[0], mode=mode)


def test_out_of_range_index_in_no_bag_or_as_padding_value_is_still_an_error():
    """Every index is validated, even one in zero bags, and a padding_idx never makes an
    out-of-range value valid."""
    with pytest.raises(IndexError, match=out_of_range("[1]", 5)):
        fastemb.embedding_bag([0, 5], W5, offsets=[], mode="sum")
    with pytest.raises(IndexError, match=out_of_range("[0]", -1)):
        fastemb.embedding_bag([-1], W5, offsets=[0], mode="sum", padding_idx=-1)


@pytest.mark.parametrize("mode", MODES)
def test_empty_table(mode):
    weight = np.zeros((0, 3), np.float64)
    out = fastemb.embedding_bag([], weight, offsets=[0, 0], mode=mode)
    assert_same_bits(out, np.zeros((2, 3)))
    assert_same_bits(fastemb.embedding_bag(np.zeros((2, 0), np.int64), weight, mode=mode),
                     np.zeros((2, 3)))
    with pytest.raises(IndexError, match=out_of_range("[0]", 0, 0)):
        fastemb.embedding_bag([0], weight, offsets=[0], mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_zero_width_table(mode):
    weight = np.zeros((4, 0), np.float32)
    out = fastemb.embedding_bag([0, 3, 1], weight, offsets=[0, 1, 1], mode=mode)
    assert out.shape == (3, 0) and out.dtype == np.float32


# --------------------------------------------------------------------------------------------
# max_norm
# --------------------------------------------------------------------------------------------


@given(bag_cases(table_kinds=("normal",), table_dtypes=(np.float32, np.float64)),
       st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([2.0, 1.0, np.inf]))
def test_max_norm_matches_reference(case, max_norm, norm_type):
    weight = case["weight"]
    renormed = renorm_ref(weight, case["input"], max_norm, norm_type)
    expected, _ = embedding_bag_ref(**dict(reference_kwargs(case), weight=renormed))
    out = fastemb.embedding_bag(**case, max_norm=max_norm, norm_type=norm_type)
    assert_same_bits(weight, renormed)  # every looked-up row, padding ones included
    assert_same_bits(out, expected)


@pytest.mark.parametrize("bad_call", [
    dict(input=[0, 9], offsets=[0]),
    dict(input=[0, 1], offsets=[0, 3]),
    dict(input=[0, 1], offsets=[0], per_sample_weights=[1.0]),
    dict(input=[0, 1], offsets=[0], per_sample_weights=[1.0, 2.0], mode="max"),
    dict(input=[0, 1], offsets=[0], padding_idx=4),
])
def test_bad_input_is_rejected_before_max_norm_writes(bad_call, untouched):
    weight = np.array([[3, 4], [6, 8], [1, 1], [5, 5]], np.float32)
    with untouched(weight):
        with pytest.raises((IndexError, ValueError)):
            fastemb.embedding_bag(weight=weight, max_norm=1.0, **bad_call)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_kernels_count_the_out_of_range_indices_they_read(threads, index_dtype):
    """gather_rows and bag_reduce count the bad indices while they read (the lookups' only
    index check on a C-contiguous table without max_norm), including indices in no bag and
    calls with nothing to reduce."""
    from fastemb._kernels import kernels

    rng = np.random.default_rng(5)
    weight = rng.standard_normal((50, 8)).astype(np.float32)
    indices = rng.integers(0, 50, 5000).astype(index_dtype)
    bad_positions = [0, 17, 2500, 4999]
    indices[bad_positions] = np.array([50, -1, 10**6, -(2**31)], dtype=index_dtype)
    out = np.empty((5000, 8), np.float32)
    assert kernels.gather_rows(weight, indices, out, threads) == 4
    assert not out[bad_positions].any()
    for mode in ("sum", "mean", "max"):
        for bounds in (np.arange(0, 5001, 50), np.array([100, 200, 4000]), np.array([0])):
            bounds = bounds.astype(np.int64)
            bag_out = np.empty((bounds.size - 1, 8), np.float32)
            winners = np.empty(bag_out.shape, np.int64) if mode == "max" else None
            code = fastemb.functional.BAG_MODES[mode]
            assert kernels.bag_reduce(weight, indices, bounds, code, None, -1, bag_out, winners,
                                      threads) == 4, (mode, bounds)
    assert kernels.bag_reduce(weight[:, :0], indices, np.array([0, 9], np.int64),
                              kernels.BagMode.BAG_SUM, None, -1, np.empty((1, 0), np.float32),
                              None, threads) == 4
    assert kernels.gather_rows(weight[:0], indices[:3], np.empty((3, 8), np.float32),
                               threads) == 3


@pytest.mark.parametrize("contiguous, max_norm", [(True, None), (False, None), (True, 1.0)])
def test_a_bad_index_deep_in_a_large_call_raises_and_changes_nothing(contiguous, max_norm):
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((1000, 16)).astype(np.float32)
    if not contiguous:
        weight = np.asfortranarray(weight)
    indices = rng.integers(0, 1000, 100_000)
    indices[77_777] = 1000
    before = weight.copy()
    with pytest.raises(IndexError, match=re.escape("input[77777] = 1000 is out of range")):
        fastemb.embedding(indices, weight, max_norm=max_norm)
    with pytest.raises(IndexError, match=re.escape("input[2430, 17] = 1000 is out of range")):
        fastemb.embedding_bag(indices.reshape(-1, 32), weight, mode="mean", max_norm=max_norm)
    np.testing.assert_array_equal(weight, before)
