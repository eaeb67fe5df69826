"""Plain NumPy reference implementations of fastemb's forward operations, and comparison helpers.

These are written for clarity, not speed: Python loops over bags and entries, with every
arithmetic step done in the table's dtype in the order the contract fixes, so that the float32
and float64 results are *bit for bit* what fastemb's kernels (and torch's CPU kernels) compute:

- sums accumulate left to right, starting from 0, one whole row at a time: ``acc = acc + row``
  (with per-sample weights ``acc = acc + w * row``: multiply, round, add, round);
- mean divides the rounded sum by the number of non-padding entries (a true division in the
  dtype); the weighted mean divides by the sequentially accumulated sum of the weights; either
  gives 0 when the divisor is 0;
- max works per column: the first non-padding entry initialises, a later entry replaces only if
  strictly greater (``>``: first wins ties, NaN survives only if it came first);
- padding entries are skipped; empty and all-padding bags give zeros (max winners -1).
"""

import math
import re

import numpy as np

# --------------------------------------------------------------------------------------------
# Bag bounds
# --------------------------------------------------------------------------------------------


def normalize_padding(padding_idx, num_embeddings):
    """padding_idx in [0, V), or None (a negative value means V + padding_idx)."""
    if padding_idx is None:
        return None
    assert -num_embeddings <= padding_idx < num_embeddings, "reference: bad padding_idx"
    return padding_idx % num_embeddings


def bag_bounds_ref(num_indices, offsets=None, include_last_offset=False, shape_2d=None):
    """The list of (start, end) positions of every bag, for well-formed input only.

    ``shape_2d=(B, L)`` describes a 2-D input (one bag per row); otherwise bag b of a 1-D input
    is ``[offsets[b], offsets[b+1])`` and the last bag runs to the end (or, with
    ``include_last_offset``, offsets has one more entry and it closes the last bag).
    """
    if shape_2d is not None:
        num_bags, length = shape_2d
        return [(b * length, (b + 1) * length) for b in range(num_bags)]
    offsets = [int(o) for o in np.asarray(offsets).reshape(-1)]
    if include_last_offset:
        assert offsets and offsets[-1] == num_indices, "reference: bad include_last_offset"
        ends = offsets
    else:
        ends = offsets + [num_indices]
    bounds = [(ends[b], ends[b + 1]) for b in range(len(ends) - 1)]
    for start, end in bounds:
        assert 0 <= start <= end <= num_indices, "reference: ill-formed offsets"
    return bounds


# --------------------------------------------------------------------------------------------
# Forward operations
# --------------------------------------------------------------------------------------------


def embedding_ref(indices, weight):
    """``out[pos] = weight[indices[pos]]`` for every position of an integer array of any shape."""
    indices = np.asarray(indices)
    weight = np.asarray(weight)
    num_embeddings, dim = weight.shape
    out = np.zeros(indices.shape + (dim,), dtype=weight.dtype)
    for position in np.ndindex(*indices.shape):
        row = int(indices[position])
        assert 0 <= row < num_embeddings, "reference: index out of range"
        out[position] = weight[row]
    return out


@np.errstate(all="ignore")  # NaN and inf in the table are fine: IEEE arithmetic is the point
def embedding_bag_ref(indices, weight, offsets=None, mode="mean", per_sample_weights=None,
                      include_last_offset=False, padding_idx=None):
    """Reduce bags of rows of ``weight``; returns ``(output, winners)``.

    ``indices`` is 1-D with ``offsets`` or 2-D (one bag per row). ``output`` is (B, D) in the
    weight's dtype. ``winners`` is None except in max mode, where ``winners[b, d]`` is the row
    whose value won column d of bag b (-1 for an empty or all-padding bag).
    """
    indices = np.asarray(indices)
    weight = np.asarray(weight)
    dtype = weight.dtype
    num_embeddings, dim = weight.shape
    if indices.ndim == 2:
        assert offsets is None
        bounds = bag_bounds_ref(indices.size, shape_2d=indices.shape)
    else:
        assert indices.ndim == 1
        bounds = bag_bounds_ref(indices.size, offsets, include_last_offset)
    flat = [int(i) for i in indices.reshape(-1)]
    if per_sample_weights is not None:
        sample_weights = np.asarray(per_sample_weights, dtype=dtype).reshape(-1)
        assert sample_weights.size == len(flat)
    padding = normalize_padding(padding_idx, num_embeddings)

    out = np.zeros((len(bounds), dim), dtype=dtype)
    winners = np.full((len(bounds), dim), -1, dtype=np.int64) if mode == "max" else None
    for bag, (start, end) in enumerate(bounds):
        kept = [k for k in range(start, end) if flat[k] != padding]
        for k in kept:
            assert 0 <= flat[k] < num_embeddings, "reference: index out of range"
        if mode == "max":
            for n, k in enumerate(kept):
                row = weight[flat[k]]
                if n == 0:
                    out[bag] = row
                    winners[bag] = flat[k]
                else:
                    better = row > out[bag]  # strictly greater: first wins ties, NaN loses
                    out[bag][better] = row[better]
                    winners[bag][better] = flat[k]
            continue
        acc = np.zeros(dim, dtype=dtype)
        weight_total = dtype.type(0)
        for k in kept:
            row = weight[flat[k]]
            if per_sample_weights is None:
                acc = acc + row
            else:
                w = sample_weights[k]  # a scalar of the table dtype
                acc = acc + w * row
                weight_total = dtype.type(weight_total + w)
        if mode == "mean":
            divisor = dtype.type(len(kept)) if per_sample_weights is None else weight_total
            acc = np.zeros(dim, dtype=dtype) if divisor == 0 else acc / divisor
        else:
            assert mode == "sum", f"reference: unknown mode {mode!r}"
        assert acc.dtype == dtype
        out[bag] = acc
    return out, winners


def row_norm_ref(row, norm_type):
    """The ``norm_type``-norm of one row, computed in float64, entry by entry.

    p = inf is max|x|, -inf is min|x|, 0 counts the non-zeros, otherwise (sum |x|^p)^(1/p).
    A NaN entry gives NaN, except for p = 0, where it is one more non-zero (as in torch).
    """
    values = [abs(float(x)) for x in row]
    if not values:
        return 0.0
    p = float(norm_type)
    if p == 0:
        return float(sum(1 for v in values if v != 0))  # NaN != 0: it counts
    if any(math.isnan(v) for v in values):
        return math.nan
    if math.isinf(p):
        return max(values) if p > 0 else min(values)
    total = 0.0
    for v in values:
        total += v * v if p == 2 else (v if p == 1 else c_pow(v, p))
    if p == 2:
        return math.sqrt(total)
    if p == 1:
        return total
    return c_pow(total, 1.0 / p)


def c_pow(x, y):
    """C's pow(x, y) for x >= 0: math.pow (libm's pow; NumPy's power rounds differently), but
    inf where math.pow raises (pow(0, -1), overflow) instead of an exception."""
    try:
        return math.pow(x, y)
    except (ValueError, OverflowError):
        return math.inf


@np.errstate(all="ignore")  # a row with inf: inf * 0 = NaN, as in torch
def renorm_ref(weight, indices, max_norm, norm_type=2.0):
    """A renormed copy of ``weight``: every distinct row in ``indices`` whose norm is strictly
    greater than ``max_norm`` is multiplied by ``dtype(max_norm / (norm + 1e-7))``."""
    weight = np.array(weight, copy=True, order="C")
    dtype = weight.dtype
    for row in sorted(set(int(i) for i in np.asarray(indices).reshape(-1))):
        norm = row_norm_ref(weight[row], norm_type)
        if norm > max_norm:
            scale = dtype.type(float(max_norm) / (norm + 1e-7))
            weight[row] = weight[row] * scale
    return weight


# --------------------------------------------------------------------------------------------
# Comparison helpers
# --------------------------------------------------------------------------------------------

_UINT_OF_WIDTH = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def assert_same_bits(actual, expected, nan_payload=False):
    """Assert equal dtype, shape and bits (so -0.0 differs from 0.0).

    NaNs must sit at the same positions; their payload and sign bit are compared only with
    ``nan_payload=True`` (a pure copy); arithmetic may produce NaNs of either sign.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    uint = _UINT_OF_WIDTH[actual.dtype.itemsize]
    actual_bits = np.ascontiguousarray(actual).view(uint)
    expected_bits = np.ascontiguousarray(expected).view(uint)
    if not nan_payload:
        nan = np.isnan(actual)
        np.testing.assert_array_equal(nan, np.isnan(expected), err_msg="NaN positions differ")
        actual_bits = np.where(nan, 0, actual_bits)
        expected_bits = np.where(nan, 0, expected_bits)
    mismatch = np.flatnonzero(actual_bits.reshape(-1) != expected_bits.reshape(-1))
    if mismatch.size:
        at = np.unravel_index(mismatch[0], actual.shape)
        raise AssertionError(
            f"{mismatch.size} of {actual.size} elements differ in their bits; first at {at}: "
            f"got {actual[at]!r}, expected {expected[at]!r}"
        )


def assert_within_ulp(actual, expected, max_ulp=1):
    """Assert equal dtype and shape, NaN at the same places, others within ``max_ulp`` ulp."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    nan = np.isnan(actual)
    np.testing.assert_array_equal(nan, np.isnan(expected), err_msg="NaN positions differ")
    np.testing.assert_array_max_ulp(actual[~nan], expected[~nan], maxulp=max_ulp)


def out_of_range(position, value, num_embeddings=5):
    """A ``pytest.raises(match=...)`` pattern for the contract's IndexError message, e.g.
    ``input[3] = 7 is out of range for num_embeddings=5`` (position ``"[3]"`` or ``"[1, 2]"``)."""
    return "^" + re.escape(
        f"input{position} = {value} is out of range for num_embeddings={num_embeddings}"
    )
