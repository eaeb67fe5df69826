"""float16 and bfloat16 tables: lookups, bag reductions and their backward.

The contract: a 16-bit table is read as float32 (each element widened exactly), so every bag
result, gradient and per-sample-weight gradient is the float32 computation on
``weight.astype(np.float32)``, bit for bit; ``embedding`` returns the table's own rows. The
float32 path itself is checked against the NumPy reference and torch elsewhere; here the 16-bit
path is checked against that reference on the widened table, against a float64 computation, and
against torch's float16/bfloat16 ``F.embedding_bag``.
"""

import numpy as np
import pytest
from reference import assert_same_bits, embedding_bag_ref

import fastemb
import fastemb._kernels
from fastemb._dtypes import TABLE_DTYPES

ml_dtypes = pytest.importorskip("ml_dtypes")

HALF_DTYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]


@pytest.fixture(params=HALF_DTYPES, ids=["float16", "bfloat16"])
def half(request):
    return request.param


def half_table(rng, num_rows, dim, half):
    """A table of 16-bit values with both signs, zeros and values of several magnitudes."""
    values = rng.standard_normal((num_rows, dim)) * rng.choice([1e-3, 1, 30], (num_rows, 1))
    values[rng.random((num_rows, dim)) < 0.05] = 0
    return values.astype(half)


def random_bags(rng, num_rows, num_indices, num_bags):
    indices = rng.integers(0, num_rows, num_indices)
    offsets = np.sort(rng.integers(0, num_indices + 1, num_bags))
    offsets[0] = 0
    return indices, offsets


# rows of one narrow block, several blocks, and partial tails in every kernel build
DIMS = [1, 7, 8, 16, 24, 64, 100, 256, 300]


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False),
                                            ("mean", True), ("max", False)])
def test_bags_are_the_float32_bags_of_the_widened_table(half, dim, mode, weighted, rng):
    weight = half_table(rng, 40, dim, half)
    indices, offsets = random_bags(rng, 40, 300, 37)
    psw = rng.random(indices.size).astype(np.float32) if weighted else None
    out = fastemb.embedding_bag(indices, weight, offsets, mode=mode, per_sample_weights=psw,
                                padding_idx=5)
    widened = weight.astype(np.float32)
    assert out.dtype == np.float32
    assert_same_bits(out, embedding_bag_ref(indices, widened, offsets, mode, psw,
                                            padding_idx=5)[0])
    exact = embedding_bag_ref(indices, weight.astype(np.float64), offsets, mode,
                              None if psw is None else psw.astype(np.float64), padding_idx=5)[0]
    scale = np.abs(exact).max() + 1
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_boundaries(half, index_dtype):
    weight = np.arange(12, dtype=np.float32).reshape(4, 3).astype(half)
    indices = np.array([3, 1, 2, 2, 0], index_dtype)
    # an empty bag, a bag of padding only, and a normal one
    out = fastemb.embedding_bag(indices, weight, [0, 0, 2, 4], mode="mean", padding_idx=2)
    np.testing.assert_array_equal(out, [[0, 0, 0], [6, 7, 8], [0, 0, 0], [0, 1, 2]])
    out = fastemb.embedding_bag(indices[:0], weight, [0], mode="max")  # one empty bag
    np.testing.assert_array_equal(out, np.zeros((1, 3), np.float32))
    zero_bags = fastemb.embedding_bag(indices, weight, np.zeros(0, np.int64), mode="sum")
    assert zero_bags.shape == (0, 3) and zero_bags.dtype == np.float32
    two_d = fastemb.embedding_bag(indices[:4].reshape(2, 2), weight, mode="sum")
    np.testing.assert_array_equal(two_d, [[12, 14, 16], [12, 14, 16]])
    with pytest.raises(IndexError, match="4"):
        fastemb.embedding_bag(np.array([0, 4], index_dtype), weight, [0], mode="sum")
    with pytest.raises(IndexError, match="4"):
        fastemb.embedding(np.array([4], index_dtype), weight)


def test_embedding_returns_the_rows_in_the_table_dtype(half, rng):
    weight = half_table(rng, 30, 9, half)
    indices = rng.integers(0, 30, (4, 5))
    out = fastemb.embedding(indices, weight)
    assert out.dtype == half and out.shape == (4, 5, 9)
    assert out.tobytes() == weight[indices].tobytes()
    strided = np.asfortranarray(weight)  # a layout the kernels copy the looked-up rows from
    assert fastemb.embedding(indices, strided).tobytes() == out.tobytes()


def test_per_sample_weights_in_the_table_dtype_or_float32(half, rng):
    weight = half_table(rng, 10, 4, half)
    indices, offsets = random_bags(rng, 10, 20, 4)
    psw = rng.random(20).astype(half)
    out = fastemb.embedding_bag(indices, weight, offsets, mode="sum", per_sample_weights=psw)
    assert_same_bits(out, fastemb.embedding_bag(indices, weight, offsets, mode="sum",
                                                per_sample_weights=psw.astype(np.float32)))
    with pytest.raises(TypeError, match="per_sample_weights"):
        fastemb.embedding_bag(indices, weight, offsets, mode="sum",
                              per_sample_weights=psw.astype(np.float64))


def test_threads_and_kernel_builds_give_the_same_bits(half, rng):
    weight = half_table(rng, 2000, 72, half)
    indices, offsets = random_bags(rng, 2000, 20000, 500)
    psw = rng.random(indices.size).astype(np.float32)
    results = []
    for build in fastemb._kernels.available_builds().values():
        table_dtype = TABLE_DTYPES[weight.dtype]
        bounds = np.append(offsets, indices.size).astype(np.int64)
        for threads in (1, 2):
            for mode, weights in [(build.BagMode.BAG_SUM, psw), (build.BagMode.BAG_MEAN, None),
                                  (build.BagMode.BAG_MAX, None)]:
                out = np.empty((offsets.size, 72), np.float32)
                build.bag_reduce(table_dtype.kernel_view(weight), indices, bounds, mode,
                                 weights, 3, out, None, threads, table_dtype.kernel_format)
                results.append((mode, out))
    for mode, out in results:
        assert_same_bits(out, next(first for m, first in results if m == mode))


def test_max_norm_renorms_in_float32_and_rounds_back(half, rng):
    weight = half_table(rng, 20, 6, half)
    indices = np.array([1, 3, 3, 7])
    expected = weight.copy()
    widened = weight[[1, 3, 7]].astype(np.float32)
    norms = np.sqrt((widened.astype(np.float64) ** 2).sum(axis=1))
    scale = (1.0 / (norms + 1e-7)).astype(np.float32)
    expected[[1, 3, 7]] = np.where((norms > 1)[:, None], widened * scale[:, None],
                                   widened).astype(half)
    out = fastemb.embedding(indices, weight, max_norm=1.0)
    assert weight.tobytes() == expected.tobytes()
    assert out.tobytes() == weight[indices].tobytes()


@pytest.mark.parametrize("mode, weighted", [("sum", True), ("mean", True), ("mean", False),
                                            ("max", False)])
def test_backward_is_the_float32_backward_of_the_widened_table(half, mode, weighted, rng):
    weight = half_table(rng, 50, 12, half)
    indices, offsets = random_bags(rng, 50, 200, 20)
    psw = rng.random(indices.size).astype(np.float32) if weighted else None
    grad_output = rng.standard_normal((offsets.size, 12)).astype(np.float32)
    got = fastemb.embedding_bag_backward(grad_output, indices, weight, offsets, mode=mode,
                                         per_sample_weights=psw, padding_idx=4)
    want = fastemb.embedding_bag_backward(grad_output, indices, weight.astype(np.float32),
                                          offsets, mode=mode, per_sample_weights=psw,
                                          padding_idx=4)
    got, want = (got, want) if weighted else ((got,), (want,))
    assert_same_bits(got[0].rows, want[0].rows)
    assert got[0].values.dtype == np.float32
    assert_same_bits(got[0].values, want[0].values)
    if weighted:
        assert_same_bits(got[1], want[1])


def test_embedding_backward_takes_a_16_bit_grad_output(half, rng):
    indices = rng.integers(0, 8, 10)
    grad_output = rng.standard_normal((10, 3)).astype(half)
    grad = fastemb.embedding_backward(grad_output, indices, num_embeddings=8)
    want = fastemb.embedding_backward(grad_output.astype(np.float32), indices, num_embeddings=8)
    assert grad.values.dtype == np.float32
    assert_same_bits(grad.values, want.values)


@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False),
                                            ("max", False)])
def test_torch_agrees_on_the_same_16_bit_table(half, mode, weighted, rng):
    """torch's float16/bfloat16 F.embedding_bag returns its table's dtype: fastemb's float32
    result rounded to it is within one rounding of torch's (torch accumulates in float32 too);
    torch on the widened float32 table gives the same bits for sum and max."""
    torch = pytest.importorskip("torch")
    weight = half_table(rng, 60, 33, half)
    indices, offsets = random_bags(rng, 60, 400, 40)
    psw = rng.random(indices.size).astype(np.float32) if weighted else None
    ours = fastemb.embedding_bag(indices, weight, offsets, mode=mode, per_sample_weights=psw)
    torch_dtype = torch.float16 if half == np.float16 else torch.bfloat16
    torch_table = torch.from_numpy(weight.astype(np.float32)).to(torch_dtype)
    theirs = torch.nn.functional.embedding_bag(
        torch.from_numpy(indices), torch_table, torch.from_numpy(offsets), mode=mode,
        per_sample_weights=None if psw is None else torch.from_numpy(psw).to(torch_dtype))
    theirs = theirs.float().numpy()
    eps = float(np.finfo(np.float16).eps) if half == np.float16 else 2.0 ** -7
    # (weighted: torch rounds the weights to the table dtype first)
    tolerance = eps * (3 if weighted else 1)
    np.testing.assert_allclose(ours, theirs, rtol=tolerance,
                               atol=tolerance * (np.abs(ours).max() + 1))
    if not weighted and mode != "mean":
        widened = torch.nn.functional.embedding_bag(
            torch.from_numpy(indices), torch.from_numpy(weight.astype(np.float32)),
            torch.from_numpy(offsets), mode=mode)
        assert_same_bits(ours, widened.numpy())


def test_other_dtypes_are_rejected_with_their_name():
    with pytest.raises(TypeError, match="int8"):
        fastemb.embedding_bag([0], np.zeros((2, 2), np.int8), [0])
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        fastemb.embedding([0], np.zeros((2, 2), np.complex64))


CONVERSIONS_PROGRAM = r"""
#include <stddef.h>
typedef ptrdiff_t Py_ssize_t;
#include "_core.h"
void widen_every_float16(float *out) {
    for (uint32_t bits = 0; bits < 65536; bits++)
        out[bits] = fastemb_float16_value((fastemb_float16){(uint16_t)bits});
}
void nearest_float16s(const float *values, uint16_t *out, size_t count) {
    for (size_t i = 0; i < count; i++) out[i] = fastemb_float16_nearest(values[i]).bits;
}
void nearest_bfloat16s(const float *values, uint16_t *out, size_t count) {
    for (size_t i = 0; i < count; i++) out[i] = fastemb_bfloat16_nearest(values[i]).bits;
}
"""


@pytest.mark.parametrize("compiler_float16", [True, False], ids=["_Float16", "by hand"])
def test_16_bit_conversions_match_numpy_and_ml_dtypes(compiler_float16, tmp_path, rng):
    """fastemb's float16 conversions (_core.h), with the compiler's _Float16 and with the
    by-hand code of compilers that lack it: every float16 widens to NumPy's float32 bits, and
    float32s (ties, subnormals, overflow, random) round to NumPy's nearest float16; and the
    bfloat16 rounding gives ml_dtypes' bits."""
    import ctypes
    import pathlib
    import shutil
    import subprocess

    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    source = tmp_path / "conversions.c"
    source.write_text(CONVERSIONS_PROGRAM)
    library = tmp_path / "conversions.so"
    include = pathlib.Path(fastemb.__file__).parent
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-ffp-contract=off", f"-I{include}",
                    *([] if compiler_float16 else ["-U__FLT16_MAX__"]), "-o", str(library),
                    str(source)], check=True, capture_output=True)
    conversions = ctypes.CDLL(str(library))
    every_half = np.arange(65536, dtype=np.uint16).view(np.float16)
    widened = np.empty(65536, np.float32)
    conversions.widen_every_float16(widened.ctypes.data_as(ctypes.c_void_p))
    # (NaNs stay NaN; the compiler's conversion may quiet a signaling one)
    assert_same_bits(widened, every_half.astype(np.float32))

    finite = every_half[np.isfinite(every_half)].astype(np.float32)
    ordered = np.sort(finite[finite >= 0])
    ties = ((ordered[:-1].astype(np.float64) + ordered[1:]) / 2).astype(np.float32)
    values = np.concatenate([
        finite, ties, -ties, rng.standard_normal(20000).astype(np.float32) * 1e3,
        rng.standard_normal(5000).astype(np.float32) * 1e-6, np.float32([
            65504, 65519.99, 65520, 65536, 1e30, np.inf, -np.inf, np.nan, 1e-45, 2.0 ** -25,
            2.0 ** -24 * 1.5, 2.0 ** -14 - 2.0 ** -25, 0.0, -0.0])])
    rounded = np.empty(values.size, np.uint16)
    conversions.nearest_float16s(values.ctypes.data_as(ctypes.c_void_p),
                                 rounded.ctypes.data_as(ctypes.c_void_p),
                                 ctypes.c_size_t(values.size))
    with np.errstate(over="ignore"):  # (values past the largest float16 round to infinity)
        expected = values.astype(np.float16)
    nan = np.isnan(values)
    assert np.isnan(rounded[nan].view(np.float16)).all()
    assert rounded[~nan].tolist() == expected[~nan].view(np.uint16).tolist()

    # bfloat16 (the optimizers' rounding of a bfloat16 table): ml_dtypes' nearest, ties to
    # even, for every bfloat16 and the ties between neighbours, both signs
    every_bfloat16 = np.arange(65536, dtype=np.uint16).view(ml_dtypes.bfloat16)
    finite = every_bfloat16[np.isfinite(every_bfloat16)].astype(np.float32)
    ordered = np.sort(finite[finite >= 0])
    ties = ((ordered[:-1].astype(np.float64) + ordered[1:]) / 2).astype(np.float32)
    values = np.concatenate([finite, ties, -ties, rng.standard_normal(20000).astype(np.float32),
                             np.float32([3.4e38, np.inf, -np.inf, np.nan, 1e-45, 0.0, -0.0])])
    rounded = np.empty(values.size, np.uint16)
    conversions.nearest_bfloat16s(values.ctypes.data_as(ctypes.c_void_p),
                                  rounded.ctypes.data_as(ctypes.c_void_p),
                                  ctypes.c_size_t(values.size))
    expected = values.astype(ml_dtypes.bfloat16)
    nan = np.isnan(values)
    assert np.isnan(rounded[nan].view(ml_dtypes.bfloat16).astype(np.float32)).all()
    assert rounded[~nan].tolist() == expected[~nan].view(np.uint16).tolist()
