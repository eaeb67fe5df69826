"""Quantized tables (``fastemb.quantize``, ``fastemb.QuantizedTable``): the bytes against
torch's prepack ops, the lookups against NumPy references (bit for bit in float32 and within
rounding of a float64 one) and against torch's quantized bag ops on the same bytes, the
boundaries, threads and builds, and the validation shared with the float path."""

import doctest
import re

import numpy as np
import pytest
from hypothesis import given
from common_path import check_runs_unchanged, declined_bag_calls, plain_bag_calls
from hypothesis import strategies as st
from reference import assert_same_bits, embedding_bag_ref, embedding_ref, out_of_range
from strategies import bag_cases

import fastemb
import fastemb._kernels
import fastemb.quantized

BITS = (8, 4)
DIMS = (1, 2, 7, 64, 300)


def dims_for(bits):
    """The embedding dims tested at ``bits``: 4 bits packs two codes a byte (even dims)."""
    return [dim for dim in DIMS if bits == 8 or dim % 2 == 0]


def bits_and_dims():
    return [(bits, dim) for bits in BITS for dim in dims_for(bits)]


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def fma_float32(a, b, c):
    """``a * b + c`` of float32 arrays rounded once to float32, as C's fmaf: the product is exact
    in float64 (24 + 24 bits), the sum's rounding error is found exactly (Knuth's two-sum) and
    the float64 sum rounded to odd (an inexact sum with an even last bit moves one step towards
    the error), which float64's 53 bits, 2 more than float32's 24 + 1 need, then round to
    nearest float32 correctly (Boldo and Melquiond, 2008). Non-finite inputs take float64's
    arithmetic, which fmaf's agrees with."""
    product = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    addend = np.broadcast_to(np.asarray(c, np.float64), product.shape)
    total = product + addend
    with np.errstate(invalid="ignore"):  # (inf - inf: NaN errors, where total is not finite)
        moved = total - product
        error = (product - (total - moved)) + (addend - moved)
    to_odd = np.isfinite(total) & (error != 0) & (total.view(np.int64) & 1 == 0)
    total = np.where(to_odd, np.nextafter(total, np.where(error > 0, np.inf, -np.inf)), total)
    return total.astype(np.float32)


def test_fma_float32_is_correctly_rounded(rng):
    """The reference against exact rational arithmetic, on random floats and on products and
    addends whose float64 sum lands halfway between two float32s (where rounding twice goes
    wrong), with addends far smaller than the product."""
    from fractions import Fraction

    a = rng.standard_normal(400).astype(np.float32)
    b = rng.integers(0, 256, 400).astype(np.float32)
    c = rng.standard_normal(400).astype(np.float32)
    half_step = np.spacing(a * b) / 2  # an addend that puts a * b + c on a float32 midpoint
    c[:100] = (half_step[:100] + half_step[:100] * 2.0**-30).astype(np.float32)
    c[100:200] = (half_step[100:200] * 2.0**-40).astype(np.float32)
    got = fma_float32(a, b, c)
    for x, y, z, result in zip(a, b, c, got):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        guess = np.float32(float(exact))  # (rounded twice: the answer or a neighbour of it)
        candidates = [np.nextafter(guess, np.float32(-np.inf)), guess,
                      np.nextafter(guess, np.float32(np.inf))]
        nearest = min(candidates, key=lambda value: (abs(Fraction(float(value)) - exact),
                                                     int(value.view(np.uint32)) % 2))
        assert result == nearest, (x, y, z, result, nearest)
    assert (got != (a * b + c)).any()  # rounding twice gives other bits somewhere


def dequantize_ref(data, bits):
    """Each row's ``scale * q + bias`` in float32, rounded once (``fma_float32``), read from
    the prepacked bytes as the layout says: 8 bits, D codes then float32 scale and
    bias; 4 bits, D / 2 bytes (element 2i in the low nibble of byte i, 2i + 1 in the high one)
    then float16 scale and bias."""
    data = np.asarray(data, dtype=np.uint8)
    if bits == 8:
        codes = data[:, :-8].astype(np.float32)
        scale_bias = data[:, -8:].copy().view(np.float32)
    else:
        pairs = data[:, :-4]
        codes = np.empty((data.shape[0], 2 * pairs.shape[1]), np.float32)
        codes[:, 0::2] = pairs & 15
        codes[:, 1::2] = pairs >> 4
        scale_bias = data[:, -4:].copy().view(np.float16).astype(np.float32)
    return fma_float32(scale_bias[:, :1], codes, scale_bias[:, 1:])


def bag_ref_float64(values, indices, bounds, mode, weights=None, padding=None):
    """The bags of a dequantized table in float64 (bounds: B + 1 entries)."""
    values = values.astype(np.float64)
    out = np.zeros((len(bounds) - 1, values.shape[1]))
    for b in range(len(bounds) - 1):
        kept = [k for k in range(bounds[b], bounds[b + 1]) if indices[k] != padding]
        if not kept:
            continue
        rows = values[[indices[k] for k in kept]]
        if mode == "max":
            out[b] = rows.max(axis=0)
            continue
        w = np.ones(len(kept)) if weights is None else weights[kept].astype(np.float64)
        out[b] = (w[:, None] * rows).sum(axis=0)
        if mode == "mean":
            divisor = w.sum()
            out[b] = out[b] / divisor if divisor != 0 else 0
    return out


def random_table(rng, num_embeddings, dim, kind="normal"):
    table = rng.standard_normal((num_embeddings, dim)).astype(np.float32)
    if kind == "constant_rows":
        table[::2] = table[::2, :1]
    elif kind == "signed_zeros":
        table[rng.random(table.shape) < 0.5] = 0.0
        table[rng.random(table.shape) < 0.5] = -0.0
    elif kind == "large":
        table *= np.float32(1e30)
    elif kind == "tiny":
        table *= np.float32(1e-30)
    elif kind == "integers":
        table = rng.integers(-100, 100, size=table.shape).astype(np.float32)
    return table


TABLE_KINDS = ("normal", "constant_rows", "signed_zeros", "large", "tiny", "integers")


# --------------------------------------------------------------------------------------------
# Quantization: torch's bytes
# --------------------------------------------------------------------------------------------


def torch_prepack(weight, bits):
    torch = pytest.importorskip("torch")
    op = (torch.ops.quantized.embedding_bag_byte_prepack if bits == 8
          else torch.ops.quantized.embedding_bag_4bit_prepack)
    return op(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))).numpy()


@pytest.mark.parametrize("kind", TABLE_KINDS)
@pytest.mark.parametrize(("bits", "dim"), bits_and_dims())
def test_quantize_gives_torch_prepack_bytes(bits, dim, kind, rng):
    weight = random_table(rng, 97, dim, kind)
    table = fastemb.quantize(weight, bits)
    expected = torch_prepack(weight, bits)
    assert table.data.dtype == np.uint8 and table.data.shape == expected.shape
    np.testing.assert_array_equal(table.data, expected)


@pytest.mark.parametrize("bits", BITS)
def test_quantize_corner_rows_give_torch_bytes(bits):
    """Constant rows, rows of signed zeros (the first of +0 / -0 is the min), magnitudes past
    float16 (4 bits: scale or bias overflow to inf), tiny ranges (4 bits: an fp16 scale of 0
    becomes 1), and rows of no element (D = 0: FLT_MAX and -FLT_MAX as min and max)."""
    big = np.finfo(np.float32).max
    rows = np.array([
        [3.5, 3.5, 3.5, 3.5], [0.0, -0.0, 0.0, -0.0], [-0.0, 0.0, -0.0, 0.0],
        [big, -big, 1.0, 2.0], [1e6, -1e6, 0.0, 1.0], [1e5, 1e5 + 8, 0.0, 0.0],
        [1e-8, 2e-8, 0.0, 1e-9], [np.inf, 1.0, 2.0, 3.0], [1.0, 2.0, -np.inf, 0.0],
        [-7e4, 7e4, 1.0, 0.0], [65504.0, 65520.0, 65536.0, 1.0],
    ], np.float32)
    np.testing.assert_array_equal(fastemb.quantize(rows, bits).data, torch_prepack(rows, bits))
    empty_rows = np.zeros((3, 0), np.float32)
    np.testing.assert_array_equal(fastemb.quantize(empty_rows, bits).data,
                                  torch_prepack(empty_rows, bits))


@pytest.mark.parametrize("bits", BITS)
def test_quantize_nan_is_skipped_by_min_and_max(bits):
    """NaN never becomes the min or the max, as in FBGEMM's scalar loop. Where torch differs:
    its AVX2 min/max loop takes 8 elements at a time, and there a NaN can win depending on its
    position (torch 2.13 here: rows of 4 and 8 elements always agree; with 16 elements a NaN in
    1 of the 16 positions, with 64 in 7 to 10 of the 64, changes torch's scale and bias), so
    only a short row is compared with torch. The NaN's own code is whatever lrint makes of
    NaN; the rest of the row is quantized as without it."""
    rows = np.array([[1.0, np.nan, 2.0, 3.0], [np.nan, 1.0, 2.0, 3.0]], np.float32)
    data = fastemb.quantize(rows, bits).data
    without_nan = fastemb.quantize(np.array([[1.0, 2.0, 3.0, 1.0]], np.float32), bits).data
    np.testing.assert_array_equal(data[:, -(8 if bits == 8 else 4):],
                                  np.repeat(without_nan[:, -(8 if bits == 8 else 4):], 2, 0))
    np.testing.assert_array_equal(data[0], torch_prepack(rows[:1], bits)[0])


def test_quantize_8bit_maths_by_hand():
    """scale = (max - min) / 255, bias = min, q = round-half-even((x - min) * 255 / range)."""
    table = fastemb.quantize(np.array([[-1.0, 0.0, 1.0, 0.5]], np.float32), 8)
    scale, bias = table.data[0, 4:].copy().view(np.float32)
    assert scale == np.float32(2.0) / np.float32(255) and bias == -1.0
    # (0 + 1) * 127.5 = 127.5 rounds to 128 (even); (0.5 + 1) * 127.5 = 191.25 -> 191
    assert table.data[0, :4].tolist() == [0, 128, 255, 191]


def test_quantize_4bit_layout_by_hand():
    """Element 2i in the low nibble of byte i, 2i + 1 in the high nibble; fp16 scale, bias."""
    table = fastemb.quantize(np.array([[0.0, 15.0, 3.0, 7.0]], np.float32), 4)
    assert table.data[0, :2].tolist() == [0 | 15 << 4, 3 | 7 << 4]
    assert table.data[0, 2:].copy().view(np.float16).tolist() == [1.0, 0.0]


def test_float64_weight_is_rounded_to_float32_first(rng):
    weight = rng.standard_normal((20, 8))
    for bits in BITS:
        np.testing.assert_array_equal(fastemb.quantize(weight, bits).data,
                                      fastemb.quantize(weight.astype(np.float32), bits).data)


def test_every_half_converts_as_numpy_does():
    """The kernels' float16 -> float32 conversion, on all 65536 halves (as scales, with q = 1
    and bias 0, so each value is exactly scale * 1 + 0)."""
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    data = np.zeros((halves.size, 1 + 4), np.uint8)
    data[:, 0] = 1
    data[:, 1:3] = halves.view(np.uint8).reshape(-1, 2)
    got = fastemb.QuantizedTable.from_prepacked(data, 4).dequantize()[:, 0]
    with np.errstate(invalid="ignore"):  # (NaN halves)
        expected = halves.view(np.float16).astype(np.float32) * np.float32(1) + np.float32(0)
    assert_same_bits(got, expected)


# --------------------------------------------------------------------------------------------
# The table object
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "dim"), bits_and_dims())
def test_table_attributes_and_dequantize(bits, dim, rng):
    weight = random_table(rng, 30, dim)
    table = fastemb.quantize(weight, bits)
    assert (table.bits, table.embedding_dim, table.num_embeddings) == (bits, dim, 30)
    assert table.shape == (30, dim)
    assert table.data.shape == (30, dim + 8 if bits == 8 else dim // 2 + 4)
    dequantized = table.dequantize()
    assert_same_bits(dequantized, dequantize_ref(table.data, bits))
    # the error of each element is at most half a step of its row (plus rounding)
    step = (weight.max(1, keepdims=True) - weight.min(1, keepdims=True)) / (2**bits - 1)
    assert (np.abs(dequantized - weight) <= 0.5 * step * (1 + 1e-3) + 1e-6).all()


@pytest.mark.parametrize("bits", BITS)
def test_from_prepacked_wraps_torch_bytes_without_copy(bits, rng):
    weight = random_table(rng, 10, 6)
    packed = torch_prepack(weight, bits)
    table = fastemb.QuantizedTable.from_prepacked(packed, bits)
    assert np.shares_memory(table.data, packed) and table.shape == (10, 6)
    assert_same_bits(table.dequantize(), fastemb.quantize(weight, bits).dequantize())


@pytest.mark.parametrize(("data", "bits", "error", "message"), [
    (np.zeros((3, 12), np.int8), 8, TypeError, "must be uint8"),
    (np.zeros((3, 12), np.float32), 8, TypeError, "must be uint8"),
    (np.zeros(12, np.uint8), 8, ValueError, "must be 2-D"),
    (np.zeros((3, 7), np.uint8), 8, ValueError, "at least its scale and bias"),
    (np.zeros((3, 3), np.uint8), 4, ValueError, "at least its scale and bias"),
    (np.zeros((3, 12), np.uint8), 2, ValueError, "bits must be 8 or 4"),
    (np.zeros((3, 12), np.uint8), True, TypeError, "bits must be an int"),
    (np.zeros((3, 12), np.uint8), 8.0, TypeError, "bits must be an int"),
])
def test_from_prepacked_rejects_what_is_not_a_table(data, bits, error, message):
    with pytest.raises(error, match=message):
        fastemb.QuantizedTable.from_prepacked(data, bits)


def test_from_prepacked_accepts_a_strided_array_by_copying_it():
    data = np.zeros((4, 24), np.uint8)[:, ::2]
    table = fastemb.QuantizedTable.from_prepacked(data, 8)
    assert table.data.flags.c_contiguous and table.shape == (4, 4)


@pytest.mark.parametrize(("weight", "bits", "error", "message"), [
    (np.zeros((3, 7), np.float32), 4, ValueError, "even embedding_dim"),
    (np.zeros((3, 4), np.float32), 16, ValueError, "bits must be 8 or 4"),
    (np.zeros((3, 4), np.float32), "8", TypeError, "bits must be an int"),
    (np.zeros((3, 4), np.int64), 8, TypeError, "float32 or float64"),
    (np.zeros(4, np.float32), 8, ValueError, "must be 2-D"),
])
def test_quantize_rejects_bad_arguments(weight, bits, error, message):
    with pytest.raises(error, match=message):
        fastemb.quantize(weight, bits)


# --------------------------------------------------------------------------------------------
# Lookups against the references
# --------------------------------------------------------------------------------------------


@st.composite
def quantized_bag_cases(draw):
    """A random well-formed embedding_bag call on a float32 table (``strategies.bag_cases``),
    with the table replaced by its quantized form (4 bits when its dim is even and drawn)."""
    case = draw(bag_cases(table_dtypes=(np.float32,), table_kinds=("normal", "ties")))
    dim = case["weight"].shape[1]
    bits = draw(st.sampled_from(BITS)) if dim % 2 == 0 else 8
    case["weight"] = fastemb.quantize(case["weight"], bits)
    return case


def reference_case(case):
    """The same call for ``embedding_bag_ref``, on the dequantized float32 table."""
    reference = dict(case, indices=case["input"], weight=case["weight"].dequantize())
    del reference["input"]
    return reference


@given(quantized_bag_cases())
def test_bags_match_the_float32_reference_bit_for_bit(case):
    """A bag of a quantized table is, bit for bit, the float path's bag of the dequantized
    table: the same values, added (times the weights) left to right from +0 in float32."""
    expected, _ = embedding_bag_ref(**reference_case(case))
    assert_same_bits(fastemb.embedding_bag(**case), expected)


def common_path(case):
    """What the one-call path gives for a quantized bag ``case`` (None: declined)."""
    from fastemb._kernels import kernels

    table = case["weight"]
    return kernels.quantized_bag_forward_common(
        case["input"], table.data, table.bits, case.get("offsets"), case["mode"],
        case.get("per_sample_weights"), case.get("include_last_offset", False),
        case.get("padding_idx"))


@given(quantized_bag_cases())
def test_common_path_gives_the_reference_bits_or_declines(case):
    """The one-call path (embedding_bag's common case on a quantized table) gives the float32
    reference's bits wherever it runs."""
    out = common_path(case)
    if out is not None:
        expected, _ = embedding_bag_ref(**reference_case(case))
        assert_same_bits(out, expected)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_common_path_runs_on_plain_arrays_and_declines_the_rest(bits, index_dtype, rng):
    """Plain arguments take the one-call path; anything else, and anything invalid, is
    declined (None) for the general path to convert or explain; nothing the caller holds
    changes either way."""
    table = fastemb.quantize(random_table(rng, 9, 6), bits)
    indices = rng.integers(0, 9, 12).astype(index_dtype)
    offsets = np.array([0, 3, 3, 7], index_dtype)
    sample_weights = rng.random(12).astype(np.float32)
    check_runs_unchanged(plain_bag_calls(table, indices, offsets, sample_weights), common_path,
                         lambda call: embedding_bag_ref(**reference_case(call))[0],
                         assert_same_bits)
    for case in declined_bag_calls(table, indices, offsets, sample_weights) + [
            dict(input=indices, weight=table, offsets=offsets, mode="sum",
                 per_sample_weights=sample_weights.astype(np.float64))]:
        assert common_path(case) is None, case
    from fastemb._kernels import kernels
    for data in (table.data.astype(np.int8), table.data[:, ::-1], table.data.tolist()):
        assert kernels.quantized_bag_forward_common(indices, data, bits, offsets, "sum", None,
                                                    False, None) is None


@pytest.mark.parametrize(("mode", "weighted"), [("sum", False), ("mean", False), ("max", False),
                                               ("sum", True), ("mean", True)])
@pytest.mark.parametrize(("bits", "dim"), bits_and_dims())
def test_bags_match_the_float64_reference(bits, dim, mode, weighted, rng):
    table = fastemb.quantize(random_table(rng, 50, dim), bits)
    indices = rng.integers(0, 50, 200)
    offsets = np.sort(rng.integers(0, 201, 30))
    offsets[0] = 0
    weights = rng.standard_normal(200).astype(np.float32) if weighted else None
    got = fastemb.embedding_bag(indices, table, offsets, mode=mode, per_sample_weights=weights,
                                padding_idx=7)
    bounds = np.append(offsets, 200)
    expected = bag_ref_float64(dequantize_ref(table.data, bits), indices, bounds, mode,
                               weights, padding=7)
    assert got.dtype == np.float32 and got.shape == (30, dim)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(("bits", "dim"), bits_and_dims())
def test_embedding_gives_the_dequantized_rows(bits, dim, rng):
    table = fastemb.quantize(random_table(rng, 40, dim), bits)
    for index_dtype in (np.int32, np.int64):
        indices = rng.integers(0, 40, (3, 5)).astype(index_dtype)
        got = fastemb.embedding(indices, table, padding_idx=2)
        assert_same_bits(got, embedding_ref(indices, dequantize_ref(table.data, bits)))


@pytest.mark.parametrize("bits", BITS)
def test_bags_of_int32_and_int64_indices_and_2d_input_agree(bits, rng):
    table = fastemb.quantize(random_table(rng, 100, 16), bits)
    indices = rng.integers(0, 100, (12, 5))
    for mode in ("sum", "mean", "max"):
        expected = fastemb.embedding_bag(indices.reshape(-1), table, np.arange(0, 60, 5),
                                         mode=mode)
        for index_dtype in (np.int32, np.int64):
            assert_same_bits(fastemb.embedding_bag(indices.astype(index_dtype), table,
                                                   mode=mode), expected)


# --------------------------------------------------------------------------------------------
# torch's quantized bag ops on the same bytes
# --------------------------------------------------------------------------------------------

def random_bags(rng, num_embeddings, num_indices, num_bags, include_last_offset):
    indices = rng.integers(0, num_embeddings, num_indices)
    offsets = np.sort(rng.integers(0, num_indices + 1, num_bags))
    offsets[0] = 0
    if include_last_offset:
        offsets = np.append(offsets, num_indices)
    return indices, offsets


def assert_close_to_float32_rounding(got, expected):
    scale = max(float(np.abs(expected).max()), 1.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("bits", "dim"), bits_and_dims())
def test_bag_sums_match_torch_quantized_ops(bits, dim, weighted, include_last_offset, rng):
    """Against ``torch.ops.quantized.embedding_bag_{byte,4bit}_rowwise_offsets`` on the same
    bytes. Those compute the sum whatever their ``mode`` says (torch 2.13: mode=1 and 2 give
    the sum too), so only sums are compared with them; torch (FBGEMM) fuses multiply-adds and
    folds the weight into scale and bias, so they agree to float32 rounding."""
    torch = pytest.importorskip("torch")
    table = fastemb.quantize(random_table(rng, 200, dim), bits)
    indices, offsets = random_bags(rng, 200, 300, 40, include_last_offset)
    weights = rng.standard_normal(300).astype(np.float32) if weighted else None
    op = (torch.ops.quantized.embedding_bag_byte_rowwise_offsets if bits == 8
          else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)
    expected = op(torch.from_numpy(table.data), torch.from_numpy(indices),
                  torch.from_numpy(offsets), mode=0,
                  per_sample_weights=None if weights is None else torch.from_numpy(weights),
                  include_last_offset=include_last_offset).numpy()
    got = fastemb.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights,
                                include_last_offset=include_last_offset)
    assert_close_to_float32_rounding(got, expected)


@pytest.mark.parametrize("mode", ["mean", "max"])
@pytest.mark.parametrize(("bits", "dim"), bits_and_dims())
def test_bag_means_and_maxima_match_torch_on_its_unpacked_table(bits, dim, mode, rng):
    """Mean and max against torch's float ``F.embedding_bag`` on the table torch's own
    ``embedding_bag_{byte,4bit}_unpack`` makes of the same bytes (its quantized bag ops only
    sum)."""
    torch = pytest.importorskip("torch")
    table = fastemb.quantize(random_table(rng, 200, dim), bits)
    indices, offsets = random_bags(rng, 200, 300, 40, False)
    unpack = (torch.ops.quantized.embedding_bag_byte_unpack if bits == 8
              else torch.ops.quantized.embedding_bag_4bit_unpack)
    unpacked = unpack(torch.from_numpy(table.data))
    expected = torch.nn.functional.embedding_bag(torch.from_numpy(indices), unpacked,
                                                 torch.from_numpy(offsets), mode=mode).numpy()
    got = fastemb.embedding_bag(indices, table, offsets, mode=mode)
    assert_close_to_float32_rounding(got, expected)


# --------------------------------------------------------------------------------------------
# Boundaries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_empty_all_padding_and_zero_bags(bits, rng):
    table = fastemb.quantize(random_table(rng, 6, 4) + 5, bits)  # no row is all zeros
    indices = np.array([1, 3, 3, 2, 3])
    for mode in ("sum", "mean", "max"):
        out = fastemb.embedding_bag(indices, table, [0, 0, 2, 3, 3], mode=mode, padding_idx=3)
        # bags: [], [1, 3], [3] (all padding), [] , [2, 3]
        assert (out[[0, 2, 3]] == 0).all() and not np.signbit(out[[0, 2, 3]]).any()
        assert (out[[1, 4]] != 0).all()
        zero_bags = fastemb.embedding_bag(indices, table, np.array([], np.int64), mode=mode)
        assert zero_bags.shape == (0, 4) and zero_bags.dtype == np.float32
    out = fastemb.embedding_bag(indices[3:], table, [0], mode="mean",  # weights summing to 0
                                per_sample_weights=np.array([1, -1], np.float32))
    assert (out == 0).all()


@pytest.mark.parametrize("bits", BITS)
def test_a_table_of_no_rows(bits):
    table = fastemb.quantize(np.zeros((0, 6), np.float32), bits)
    assert table.shape == (0, 6) and table.dequantize().shape == (0, 6)
    assert fastemb.embedding_bag(np.array([], np.int64), table, [0, 0], mode="sum").tolist() \
        == [[0.0] * 6] * 2
    with pytest.raises(IndexError, match=out_of_range("[0]", 0, 0)):
        fastemb.embedding_bag([0], table, [0], mode="sum")
    with pytest.raises(IndexError, match=out_of_range("[0]", 0, 0)):
        fastemb.embedding([0], table)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("bad", [5, -1, 2**40])
def test_bad_index_raises_the_float_paths_error(bits, bad, rng, untouched):
    weight = random_table(rng, 5, 4)
    table = fastemb.quantize(weight, bits)
    indices = np.array([0, 4, bad, 1])
    with untouched(table.data, indices):
        for lookup in (lambda w: fastemb.embedding_bag(indices, w, [0, 2], mode="sum"),
                       lambda w: fastemb.embedding(indices, w)):
            with pytest.raises(IndexError, match=out_of_range("[2]", bad)):
                lookup(table)
            with pytest.raises(IndexError, match=out_of_range("[2]", bad)):
                lookup(weight)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("call", "error"), [
    (dict(offsets=[1, 2]), ValueError),
    (dict(offsets=[0, 3, 2]), ValueError),
    (dict(offsets=[0, 9]), ValueError),
    (dict(offsets=[0, 2], include_last_offset=True), ValueError),
    (dict(offsets=None), ValueError),
    (dict(offsets=[0], mode="median"), ValueError),
    (dict(offsets=[0], mode="max", per_sample_weights=np.ones(4, np.float32)), ValueError),
    (dict(offsets=[0], per_sample_weights=np.ones(4, np.float64)), TypeError),
    (dict(offsets=[0], per_sample_weights=np.ones(3, np.float32)), ValueError),
    (dict(offsets=[0], padding_idx=5), ValueError),
    (dict(offsets=[0], padding_idx=1.0), TypeError),
])
def test_bad_bag_arguments_raise_the_float_paths_errors(bits, call, error, rng):
    """Each message too: the same as the float path's for the same call."""
    weight = random_table(rng, 5, 4)
    table = fastemb.quantize(weight, bits)
    indices = np.array([0, 4, 2, 1])
    with pytest.raises(error) as float_error:
        fastemb.embedding_bag(indices, weight, **call)
    with pytest.raises(error, match="^" + re.escape(str(float_error.value)) + "$"):
        fastemb.embedding_bag(indices, table, **call)


@pytest.mark.parametrize("bits", BITS)
def test_max_norm_is_refused(bits, rng):
    table = fastemb.quantize(random_table(rng, 5, 4), bits)
    for lookup in (lambda: fastemb.embedding([0], table, max_norm=1.0),
                   lambda: fastemb.embedding_bag([0], table, [0], max_norm=1.0)):
        with pytest.raises(ValueError, match="max_norm is not supported on a quantized table"):
            lookup()


# --------------------------------------------------------------------------------------------
# Threads and builds
# --------------------------------------------------------------------------------------------


def large_case(rng, bits, dim):
    table = fastemb.quantize(random_table(rng, 5000, dim), bits)
    indices = rng.integers(0, 5000, 64 * 300)
    offsets = np.arange(0, indices.size, 64) - rng.integers(0, 3, 300) * (np.arange(300) > 0)
    weights = rng.standard_normal(indices.size).astype(np.float32)
    return table, indices, np.maximum.accumulate(offsets), weights


def all_lookups(table, indices, offsets, weights):
    """Every lookup on the table, by name."""
    results = {"embedding": fastemb.embedding(indices[:3000], table)}
    for mode in ("sum", "mean", "max"):
        results[mode] = fastemb.embedding_bag(indices, table, offsets, mode=mode, padding_idx=3)
    for mode in ("sum", "mean"):
        results[f"weighted {mode}"] = fastemb.embedding_bag(
            indices, table, offsets, mode=mode, per_sample_weights=weights)
    return results


def assert_same_results(results, expected, bits):
    """The lookups' results bit for bit, and the bytes of the dequantized table quantized
    again (the quantization kernel, on rows that all sit on their steps)."""
    for name, result in results.items():
        if name == "quantized":
            np.testing.assert_array_equal(result, expected[name])
        else:
            assert_same_bits(result, expected[name])


@pytest.mark.parametrize(("bits", "dim"), [(8, 64), (8, 300), (4, 64), (4, 300), (8, 7)])
def test_lookups_do_not_depend_on_where_the_table_starts(bits, dim, rng):
    """The bag kernels prefetch the cache lines of each row, as many as a row can touch given
    the table's address and row size: with the table at any byte of a line (and large enough
    that bags prefetch: over 256 KB), every lookup gives the same bits."""
    table = fastemb.quantize(random_table(rng, 20_000, dim), bits)
    indices = rng.integers(0, 20_000, 64 * 300)
    offsets = np.arange(0, indices.size, 64)
    weights = rng.standard_normal(indices.size).astype(np.float32)
    assert table.data.nbytes > 256 << 10
    expected = all_lookups(table, indices, offsets, weights)
    for start in (1, 4, 8, 16, 36, 63):
        buffer = np.zeros(table.data.nbytes + 128, np.uint8)
        first = start - buffer.ctypes.data % 64 + 64  # (at `start` bytes into a line)
        data = buffer[first:first + table.data.nbytes].reshape(table.data.shape)
        data[...] = table.data
        moved = fastemb.QuantizedTable.from_prepacked(data, bits)
        assert np.shares_memory(moved.data, buffer) and moved.data.ctypes.data % 64 == start
        assert_same_results(all_lookups(moved, indices, offsets, weights), expected, bits)


@pytest.mark.parametrize(("bits", "dim"), [(8, 64), (8, 300), (4, 64), (4, 300), (8, 7)])
def test_one_and_two_threads_give_the_same_bits(bits, dim, rng, threads):
    table, indices, offsets, weights = large_case(rng, bits, dim)
    results = []
    for count in (1, 2):
        with threads(count):
            results.append(dict(all_lookups(table, indices, offsets, weights),
                                quantized=fastemb.quantize(table.dequantize(), bits).data))
    assert_same_results(results[1], results[0], bits)


@pytest.mark.parametrize(("bits", "dim"), [(8, 64), (8, 300), (4, 64), (4, 300), (8, 7)])
def test_every_kernel_build_gives_the_same_bits(bits, dim, rng, monkeypatch):
    table, indices, offsets, weights = large_case(rng, bits, dim)
    results = {}
    for name, build in fastemb._kernels.available_builds().items():
        monkeypatch.setattr(fastemb.quantized, "_core", build)
        results[name] = dict(all_lookups(table, indices, offsets, weights),
                             quantized=fastemb.quantize(table.dequantize(), bits).data)
    portable = results.pop("portable")
    for got in results.values():
        assert_same_results(got, portable, bits)


def test_every_kernel_build_rounds_a_value_once(rng, monkeypatch):
    """Rows whose scale * q + bias lies on or next to the midpoint of two float32s, where a
    product and a sum rounded each (or a float64 sum rounded again) give other bits than the
    fused multiply-add: every build's values (the vector loops, and the scalar ones of dim 7)
    equal fma_float32's, the portable build's made without FMA instructions."""
    for dim in (64, 7):
        codes = rng.integers(1, 256, (300, dim)).astype(np.uint8)
        scale = rng.standard_normal((300, 1)).astype(np.float32)
        half_step = np.spacing(scale * codes[:, :1].astype(np.float32)) / 2
        bias = np.concatenate([half_step[:100] * (1 + 2.0**-30), half_step[100:200] * 2.0**-40,
                               rng.standard_normal((100, 1))]).astype(np.float32)
        data = np.concatenate([codes, scale.view(np.uint8), bias.view(np.uint8)], axis=1)
        table = fastemb.QuantizedTable.from_prepacked(data, bits=8)
        expected = fma_float32(scale, codes.astype(np.float32), bias)
        assert (expected != scale * codes + bias).any()
        for name, build in fastemb._kernels.available_builds().items():
            monkeypatch.setattr(fastemb.quantized, "_core", build)
            assert_same_bits(table.dequantize(), expected)
            assert_same_bits(fastemb.embedding_bag(np.arange(300)[:, None], table, mode="sum"),
                             expected + np.float32(0))  # (a bag of one: +0 + value)


def test_doctests():
    result = doctest.testmod(fastemb.quantized, verbose=False)
    assert result.attempted > 0 and result.failed == 0
