"""Every input the contract rejects: the exception type, what its message names, and that no
array was modified. Calls pass max_norm wherever the rejected argument is not the table itself,
so an implementation that renormed before validating would be caught."""

import re

import numpy as np
import pytest

import fastemb


def table(dtype=np.float32):
    """A table whose every row has norm > 1 (so max_norm=1 would change each one)."""
    return np.array([[3, 4], [6, 8], [1, 1], [5, 5], [2, -2]], dtype=dtype)


def rejects(untouched, exception, match, call, weight, *arrays):
    """Assert ``call()`` raises ``exception`` matching ``match`` and leaves the arrays intact."""
    with untouched(weight, *arrays):
        with pytest.raises(exception, match=match):
            call()


# --------------------------------------------------------------------------------------------
# Index dtypes
# --------------------------------------------------------------------------------------------

BAD_INDEX_ARRAYS = [
    np.array([0.0, 1.0], np.float32),
    np.array([0.0, 1.0], np.float64),
    np.array([0.0, 1.0], np.float16),
    np.array([True, False]),
    np.array([0, 1], np.complex128),
    np.array([0, 1], dtype=object),
    np.array(["0", "1"]),
]


@pytest.mark.parametrize("indices", BAD_INDEX_ARRAYS, ids=lambda a: str(a.dtype))
def test_non_integer_indices(indices, untouched):
    weight = table()
    name = re.escape(str(indices.dtype))
    rejects(untouched, TypeError, name,
            lambda: fastemb.embedding(indices, weight, max_norm=1.0), weight, indices)
    rejects(untouched, TypeError, name,
            lambda: fastemb.embedding_bag(indices, weight, offsets=[0], max_norm=1.0),
            weight, indices)
    rejects(untouched, TypeError, name,
            lambda: fastemb.embedding_bag(indices.reshape(1, 2), weight, max_norm=1.0),
            weight, indices)


@pytest.mark.parametrize("value", [[0.5], [1.0, 2.0], [True]])
def test_non_integer_index_lists(value, untouched):
    weight = table()
    rejects(untouched, TypeError, "dtype", lambda: fastemb.embedding(value, weight, max_norm=1.0),
            weight)


@pytest.mark.parametrize("offsets", [np.array([0.0, 1.0]), np.array([0, 1], np.float32),
                                     np.array([False, True])], ids=lambda a: str(a.dtype))
def test_non_integer_offsets(offsets, untouched):
    weight = table()
    rejects(untouched, TypeError, re.escape(str(offsets.dtype)),
            lambda: fastemb.embedding_bag([0, 1, 2], weight, offsets=offsets, max_norm=1.0),
            weight, offsets)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight", [
    np.array([[1, 2], [3, 4]], np.int64),
    np.array([[1, 2], [3, 4]], np.int32),
    np.array([[1, 2], [3, 4]], np.complex64),
    np.array([[1, 2], [3, 4]], np.complex128),
    np.array([[True], [False]]),
    np.array([[1, 2], [3, 4]], object),
], ids=lambda a: str(a.dtype))
def test_table_dtype(weight, untouched):
    name = re.escape(str(weight.dtype))
    rejects(untouched, TypeError, name, lambda: fastemb.embedding([0, 1], weight), weight)
    for mode in ("sum", "mean", "max"):
        rejects(untouched, TypeError, name,
                lambda: fastemb.embedding_bag([0, 1], weight, offsets=[0], mode=mode), weight)


@pytest.mark.parametrize("weight", [
    np.ones(5, np.float32),
    np.ones((2, 2, 2), np.float64),
    np.float32(1.0),
    np.ones((1, 1, 1, 1), np.float32),
], ids=lambda a: str(np.shape(a)))
def test_table_ndim(weight, untouched):
    shape = re.escape(str(np.shape(weight)))
    rejects(untouched, ValueError, shape, lambda: fastemb.embedding([0], weight), weight)
    rejects(untouched, ValueError, shape,
            lambda: fastemb.embedding_bag([0], weight, offsets=[0], mode="sum"), weight)


# --------------------------------------------------------------------------------------------
# embedding_bag arguments
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["avg", "Sum", "", None, "min"])
def test_bad_mode(mode, untouched):
    weight = table()
    rejects(untouched, ValueError, "mode",
            lambda: fastemb.embedding_bag([0, 1], weight, offsets=[0], mode=mode, max_norm=1.0),
            weight)


def test_two_d_input_with_offsets(untouched):
    weight = table()
    indices = np.array([[0, 1], [2, 3]])
    offsets = np.array([0, 1])
    rejects(untouched, ValueError, "offsets",
            lambda: fastemb.embedding_bag(indices, weight, offsets=offsets, max_norm=1.0),
            weight, indices, offsets)


def test_one_d_input_without_offsets(untouched):
    weight = table()
    rejects(untouched, ValueError, "offsets",
            lambda: fastemb.embedding_bag([0, 1], weight, max_norm=1.0), weight)


@pytest.mark.parametrize("indices", [np.array(1), np.zeros((1, 2, 2), np.int64),
                                     np.zeros((0, 0, 0), np.int64)], ids=lambda a: str(a.shape))
def test_bag_input_rank(indices, untouched):
    weight = table()
    rejects(untouched, ValueError, "input",
            lambda: fastemb.embedding_bag(indices, weight, max_norm=1.0), weight, indices)
    rejects(untouched, ValueError, "input",
            lambda: fastemb.embedding_bag(indices, weight, offsets=[0], max_norm=1.0),
            weight, indices)


@pytest.mark.parametrize("offsets", [np.zeros((1, 1), np.int64), np.zeros((2, 1), np.int64)])
def test_two_d_offsets(offsets, untouched):
    weight = table()
    rejects(untouched, ValueError, "offsets",
            lambda: fastemb.embedding_bag([0, 1], weight, offsets=offsets, max_norm=1.0),
            weight, offsets)


@pytest.mark.parametrize("offsets, include_last_offset, numbers", [
    ([1, 3], False, "1"),              # first offset not 0
    ([0, 4, 2], False, "2"),           # decreasing
    ([0, -1, 3], False, "-1"),         # negative middle
    ([0, 7], False, "7"),              # past the end (len 6)
    ([0, 2, 7, 9], False, "7|9"),      # past the end in the middle
    ([0, 1, 2], True, "2"),            # include_last_offset: last must equal len(input)
    ([0, 7], True, "7"),
    ([0], True, "0"),                  # zero bags with include_last_offset need an empty input
    ([], True, None),                  # include_last_offset needs one offset at least
    ([-1, 0], False, "-1"),
])
@pytest.mark.parametrize("offsets_dtype", [np.int64, np.int32, np.uint8])  # (uint8: no -1)
def test_bad_offsets(offsets, include_last_offset, numbers, offsets_dtype, untouched):
    """The message names offsets and an offending value (``numbers``: alternatives)."""
    weight = table()
    indices = np.array([0, 1, 2, 3, 4, 1])
    if offsets_dtype == np.uint8 and min(offsets, default=0) < 0:
        pytest.skip("uint8 holds no negative offset")
    offsets = np.array(offsets, offsets_dtype)
    for mode in ("sum", "mean", "max"):
        with untouched(weight, indices, offsets):
            with pytest.raises(ValueError) as info:
                fastemb.embedding_bag(indices, weight, offsets=offsets, mode=mode,
                                      include_last_offset=include_last_offset, max_norm=1.0)
        message = str(info.value)
        assert "offsets" in message
        if numbers is not None:
            assert re.search(rf"(?<![\d-])({numbers})(?!\d)", message), message


def test_per_sample_weights_with_max(untouched):
    weight = table()
    psw = np.ones(3, np.float32)
    rejects(untouched, ValueError, "max",
            lambda: fastemb.embedding_bag([0, 1, 2], weight, offsets=[0], mode="max",
                                          per_sample_weights=psw, max_norm=1.0), weight, psw)


@pytest.mark.parametrize("indices, psw", [
    (np.array([0, 1, 2]), np.ones(2, np.float32)),
    (np.array([0, 1, 2]), np.ones((1, 3), np.float32)),
    (np.array([[0, 1], [2, 3]]), np.ones(4, np.float32)),
    (np.array([[0, 1], [2, 3]]), np.ones((2, 1), np.float32)),
    (np.array([0, 1, 2]), np.float32(1.0)),
])
def test_per_sample_weights_shape(indices, psw, untouched):
    weight = table()
    offsets = [0] if indices.ndim == 1 else None
    for mode in ("sum", "mean"):
        rejects(untouched, ValueError, "per_sample_weights",
                lambda: fastemb.embedding_bag(indices, weight, offsets=offsets, mode=mode,
                                              per_sample_weights=psw, max_norm=1.0),
                weight, indices, psw)


@pytest.mark.parametrize("table_dtype, psw_dtype", [
    (np.float32, np.float64), (np.float64, np.float32), (np.float32, np.float16),
    (np.float32, np.int64),
])
def test_per_sample_weights_dtype(table_dtype, psw_dtype, untouched):
    weight = table(table_dtype)
    psw = np.ones(3, psw_dtype)
    for mode in ("sum", "mean"):
        rejects(untouched, TypeError, re.escape(str(np.dtype(psw_dtype))),
                lambda: fastemb.embedding_bag([0, 1, 2], weight, offsets=[0], mode=mode,
                                              per_sample_weights=psw, max_norm=1.0),
                weight, psw)


# --------------------------------------------------------------------------------------------
# padding_idx, max_norm
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_idx", [5, 6, -6, 100, -100])
def test_padding_idx_range(padding_idx, untouched):
    weight = table()  # V = 5: valid padding_idx is -5 ... 4
    match = re.escape(str(padding_idx))
    rejects(untouched, ValueError, match,
            lambda: fastemb.embedding([0], weight, padding_idx=padding_idx, max_norm=1.0), weight)
    rejects(untouched, ValueError, match,
            lambda: fastemb.embedding_bag([0], weight, offsets=[0], padding_idx=padding_idx,
                                          max_norm=1.0), weight)


def test_padding_idx_limits_are_accepted():
    weight = table()
    for padding_idx in (-5, 4):
        fastemb.embedding([0], weight, padding_idx=padding_idx)
        fastemb.embedding_bag([0], weight, offsets=[0], padding_idx=padding_idx)
    with pytest.raises(ValueError):
        fastemb.embedding([], np.zeros((0, 2), np.float32), padding_idx=0)
    with pytest.raises(ValueError):
        fastemb.embedding([], np.zeros((0, 2), np.float32), padding_idx=-1)


def non_contiguous_tables():
    base = table()
    return {
        "fortran": np.asfortranarray(table()),
        "rows[::2]": np.concatenate([base, base])[::2],
        "columns": np.concatenate([base, base], axis=1)[:, 1:3],
    }


@pytest.mark.parametrize("layout", ["fortran", "rows[::2]", "columns"])
def test_max_norm_needs_a_c_contiguous_table(layout, untouched):
    weight = non_contiguous_tables()[layout]
    assert not weight.flags.c_contiguous
    rejects(untouched, ValueError, "contiguous",
            lambda: fastemb.embedding([0, 1], weight, max_norm=1.0), weight)
    rejects(untouched, ValueError, "contiguous",
            lambda: fastemb.embedding_bag([0, 1], weight, offsets=[0], max_norm=1.0), weight)


def test_max_norm_needs_a_writable_table(untouched):
    weight = table()
    weight.flags.writeable = False
    rejects(untouched, ValueError, "read-only|writ",
            lambda: fastemb.embedding([0, 1], weight, max_norm=1.0), weight)
    rejects(untouched, ValueError, "read-only|writ",
            lambda: fastemb.embedding_bag([0, 1], weight, offsets=[0], max_norm=1.0), weight)


@pytest.mark.parametrize("arguments", [
    dict(max_norm="1"), dict(max_norm=[1.0]), dict(max_norm=np.ones(2)), dict(max_norm=True),
    dict(max_norm=1.0, norm_type="2"), dict(max_norm=1.0, norm_type=None),
    dict(max_norm=1j),
], ids=repr)
def test_max_norm_must_be_a_number(arguments, untouched):
    weight = table()
    rejects(untouched, TypeError, "max_norm|norm_type",
            lambda: fastemb.embedding([0, 1], weight, **arguments), weight)
    rejects(untouched, TypeError, "max_norm|norm_type",
            lambda: fastemb.embedding_bag([0, 1], weight, offsets=[0], **arguments), weight)


def test_numpy_scalars_are_numbers():
    weight = table()
    fastemb.embedding([0], weight, max_norm=np.float32(100.0), norm_type=np.int64(2))
    fastemb.embedding_bag([0], weight, offsets=[0], max_norm=np.float64(100.0))
    np.testing.assert_array_equal(weight, table())


def test_bad_index_after_good_ones_leaves_table_intact(untouched):
    weight = table()
    indices = np.array([[0, 1, 2], [3, 4, 5]])
    rejects(untouched, IndexError, re.escape("input[1, 2] = 5"),
            lambda: fastemb.embedding(indices, weight, max_norm=1.0), weight, indices)
    rejects(untouched, IndexError, re.escape("input[1, 2] = 5"),
            lambda: fastemb.embedding_bag(indices, weight, mode="max", max_norm=1.0),
            weight, indices)
