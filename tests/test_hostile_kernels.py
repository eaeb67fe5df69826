"""Crash isolation: the private kernels called directly with inconsistent arrays, in a child
process, on arrays that sit against inaccessible pages."""

import os
import re

import pytest

import fastemb
import fastemb._kernels


# --------------------------------------------------------------------------------------------
# Crash isolation: the private kernels, called directly with inconsistent arrays, in a child
# process (a segfault fails the test instead of killing the run). Every array a kernel gets
# sits right against an inaccessible page (after its end, or before its start), so reading or
# writing even one element out of bounds is a segfault, not silent garbage. A kernel must raise
# ValueError or return having touched nothing out of bounds.
# --------------------------------------------------------------------------------------------

KERNEL_PRELUDE = r"""
import ctypes, mmap, sys
import numpy as np
sys.path.insert(0, TESTS)
from reference import assert_same_bits, embedding_bag_ref, renorm_ref
import fastemb
from fastemb.sparse import GradientPlan
K = __import__("fastemb." + BUILD, fromlist=["x"])
MODE = {name: K.BagMode["BAG_" + name.upper()] for name in ("sum", "mean", "max")}
METHOD = {name: K.StepMethod["STEP_" + name.upper()]
          for name in ("sgd", "adagrad", "rowwise_adagrad", "adam")}
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
SIDE = "after"
kept = []

def guarded(array, dtype=None):
    # a copy of array whose first byte (SIDE "before") or last byte (SIDE "after") touches an
    # inaccessible page
    array = np.ascontiguousarray(array, dtype=dtype)
    nbytes = array.nbytes
    pages = max(1, -(-nbytes // PAGE))
    base = libc.mmap(None, (pages + 2) * PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert base and base != ctypes.c_void_p(-1).value
    assert libc.mprotect(base, PAGE, 0) == 0
    assert libc.mprotect(base + (pages + 1) * PAGE, PAGE, 0) == 0
    start = base + PAGE if SIDE == "before" else base + (pages + 1) * PAGE - nbytes
    buffer = (ctypes.c_char * max(nbytes, 1)).from_address(start)
    kept.append(buffer)
    out = np.frombuffer(buffer, dtype=array.dtype, count=array.size).reshape(array.shape)
    out[...] = array
    return out

def I(values):
    return guarded(np.array(values, dtype=np.int64).reshape(-1))

def expect(exception, call):
    try:
        call()
    except exception:
        return
    raise AssertionError(f"expected {exception.__name__}")

def case(name):
    print("CASE", name, flush=True)
"""

KERNEL_SAFE_HELPERS = r"""
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
f4, f8 = np.float32, np.float64
rng = np.random.default_rng(0)
BAD_ROWS = [-1, 5, 6, INT64_MIN, INT64_MAX, 2**31, -2**31]

def clamp(v, low, high):
    return min(max(int(v), low), high)

def bags_by_hand(weight, indices, bounds, mode, psw, padding):
    # the kernels' documented treatment of inconsistent input: bounds clamped into [0, n],
    # rows outside [0, V) skipped like padding
    n, (V, D) = len(indices), weight.shape
    flat, offsets, weights = [], [], []
    for b in range(len(bounds) - 1):
        start = clamp(bounds[b], 0, n)
        end = clamp(bounds[b + 1], start, n)
        offsets.append(len(flat))
        for k in range(start, end):
            if 0 <= indices[k] < V and indices[k] != padding:
                flat.append(int(indices[k]))
                weights.append(psw[k] if psw is not None else 0)
    with np.errstate(all="ignore"):
        return embedding_bag_ref(np.array(flat, np.int64), weight, np.array(offsets, np.int64),
                                 mode, None if psw is None else np.array(weights, weight.dtype))

BOUND_SETS = [[0, 3, 100, 2, -5, 8], [0, INT64_MAX], [INT64_MIN, 4, 2, 11], [5, 5, 5], [-1, -1],
              [0, 11], [12, 0, 11, 3], [0]]

def bag_indices():
    # 11 indices for the bag kernels: rows in and out of [0, 5)
    return I([0, 4, -1, 2, 5, 2, INT64_MAX, 1, 3, INT64_MIN, 0])

def bag_calls(dtype):
    # (bounds, mode, padding, per-sample weights or None) of every bag-kernel call: each set
    # of garbage bounds, mode and padding, weighted and not (not with max)
    for bounds_list in BOUND_SETS:
        for mode in ("sum", "mean", "max"):
            for padding in (-1, 2, 99):
                for with_weights in ((False, True) if mode != "max" else (False,)):
                    psw = guarded(rng.choice([-1.0, 0.5, 2.0], 11), dtype) \
                        if with_weights else None
                    yield bounds_list, mode, padding, psw
"""

KERNEL_SAFE_CASES = KERNEL_SAFE_HELPERS + r"""
for side in ("after", "before"):
    SIDE = side
    for dtype in (f4, f8):
        for threads in (1, 2):
            tag = f"{side} {np.dtype(dtype).name} threads={threads}"
            V, D = 5, 3
            table = rng.standard_normal((V, D)).astype(dtype)
            weight = guarded(table)

            case(f"first_out_of_range {tag}")
            for values in ([], [0, 4], [0, 5], [-1], [INT64_MIN, 0], [0, 1, INT64_MAX]):
                for bound in (V, 0, -1, INT64_MIN):
                    got = K.first_out_of_range(I(values), bound, threads)
                    want = next((i for i, v in enumerate(values) if not 0 <= v < bound), -1)
                    assert got == want, (values, bound, got)

            case(f"first_decrease {tag}")
            for values in ([], [7], [0, 0], [1, 0], [INT64_MIN, INT64_MAX, INT64_MIN]):
                got = K.first_decrease(I(values))
                want = next((i for i in range(1, len(values)) if values[i] < values[i - 1]), -1)
                assert got == want, (values, got)

            case(f"gather_rows {tag}")
            for index_dtype, values in ((np.int64, [0, 4] + BAD_ROWS + [2]),
                                        (np.int32, [0, 4, -1, 5, -2**31, 2**31 - 1, 3])):
                indices = guarded(np.array(values, index_dtype))
                out = guarded(np.full((len(values), D), 7, dtype))
                K.gather_rows(weight, indices, out, threads)
                want = np.array([table[v] if 0 <= v < V else np.zeros(D, dtype) for v in values])
                assert_same_bits(out, want)
                expect(ValueError, lambda: K.gather_rows(weight, indices, guarded(
                    np.zeros((len(values) + 1, D), dtype)), threads))
                expect(ValueError, lambda: K.gather_rows(weight, indices, guarded(
                    np.zeros((len(values), D + 1), dtype)), threads))
            empty = guarded(np.zeros((0, D), dtype))
            out = guarded(np.ones((3, D), dtype))
            K.gather_rows(empty, I([0, -1, 1]), out, threads)
            assert not out.any()

            case(f"bag_reduce {tag}")
            indices = bag_indices()
            n = len(indices)
            for bounds_list, mode, padding, psw in bag_calls(dtype):
                B = len(bounds_list) - 1
                out = guarded(np.full((B, D), 9, dtype))
                winners = guarded(np.full((B, D), 9, np.int64)) if mode == "max" else None
                K.bag_reduce(weight, indices, I(bounds_list), MODE[mode], psw, padding, out,
                             winners, threads)
                want, want_winners = bags_by_hand(table, np.asarray(indices), bounds_list, mode,
                                                  None if psw is None else np.asarray(psw),
                                                  padding)
                assert_same_bits(out, want)
                if winners is not None:
                    assert (winners == want_winners).all()
            bounds = I([0, 3, 11])
            for bad in (
                lambda: K.bag_reduce(weight, indices, bounds, MODE["sum"], None, -1,
                                     guarded(np.zeros((3, D), dtype)), None, threads),
                lambda: K.bag_reduce(weight, indices, bounds, MODE["sum"], None, -1,
                                     guarded(np.zeros((2, D + 1), dtype)), None, threads),
                lambda: K.bag_reduce(weight, indices, I([]), MODE["sum"], None, -1,
                                     guarded(np.zeros((0, D), dtype)), None, threads),
                lambda: K.bag_reduce(weight, indices, bounds, MODE["sum"],
                                     guarded(np.ones(3, dtype)), -1,
                                     guarded(np.zeros((2, D), dtype)), None, threads),
                lambda: K.bag_reduce(weight, indices, bounds, MODE["max"], None, -1,
                                     guarded(np.zeros((2, D), dtype)),
                                     guarded(np.zeros((1, D), np.int64)), threads),
                lambda: K.bag_reduce(weight, indices, bounds, MODE["sum"], None, -1,
                                     guarded(np.zeros((2, D), dtype)),
                                     guarded(np.zeros((2, D), np.int64)), threads),
            ):
                expect(ValueError, bad)
            expect(Exception, lambda: K.bag_reduce(weight, indices, bounds, 7, None, -1,
                                                   guarded(np.zeros((2, D), dtype)), None,
                                                   threads))

            case(f"renorm_rows {tag}")
            target = guarded(table * 10)
            K.renorm_rows(target, I([3, -1, 5, INT64_MAX, 0, INT64_MIN]), 1.0, 2.0, threads)
            assert_same_bits(target, renorm_ref(table * 10, [3, 0], 1.0))
            K.renorm_rows(guarded(np.zeros((0, D), dtype)), I([0, 1]), 1.0, 2.0, threads)

            case(f"group_by_row {tag}")
            values = [3, -1, 0, 5, 3, INT64_MAX, 2, INT64_MIN, 0, 3, 4]
            for num_rows in (5, 1, 0, -3, 2**62):
                for padding in (-1, 3, 2**40):
                    rows, starts, order = K.group_by_row(I(values), num_rows, padding, threads)
                    kept = [(v, p) for p, v in enumerate(values)
                            if 0 <= v < num_rows and v != padding]
                    want_rows = sorted({v for v, _ in kept})
                    assert rows.tolist() == want_rows, (num_rows, padding, rows)
                    groups = [[p for v, p in kept if v == r] for r in want_rows]
                    assert starts.tolist() == list(np.cumsum([0] + [len(g) for g in groups]))
                    assert order.tolist() == [p for g in groups for p in g]
                    # small payloads are packed with the row into one int64 for the sort;
                    # negative or huge ones (and rows near 2**62) take the two-array sort
                    for carry in (lambda p: 100 + 7 * p, lambda p: p - 5,
                                  lambda p: INT64_MAX - p, lambda p: INT64_MIN + p):
                        payload = I([carry(p) for p in range(len(values))])
                        rows, starts, carried = K.group_by_row(I(values), num_rows, padding,
                                                               threads, payload)
                        assert carried.tolist() == [carry(p) for g in groups for p in g]
            for wrong in (I(range(len(values) - 1)), I(range(len(values) + 1))):
                expect(ValueError, lambda: K.group_by_row(I(values), 5, -1, threads, wrong))

            case(f"bags_of_positions {tag}")
            for bounds_list in BOUND_SETS:
                bag_of = guarded(np.full(n, -7, np.int64))
                K.bags_of_positions(I(bounds_list), bag_of, threads)
                if threads == 1:
                    want = [-7] * n
                    for b in range(len(bounds_list) - 1):
                        for k in range(clamp(bounds_list[b], 0, n),
                                       clamp(bounds_list[b + 1], 0, n)):
                            want[k] = b
                    assert bag_of.tolist() == want, (bounds_list, bag_of)

            case(f"bag_gradient_factors {tag}")
            for bounds_list in BOUND_SETS:
                B = len(bounds_list) - 1
                for mode, psw in (("mean", None), ("mean", guarded(np.ones(n), dtype)),
                                  ("sum", guarded(np.full(n, 0.5), dtype))):
                    coefficients = guarded(np.full(n, 5, dtype))
                    totals = guarded(np.full(max(B, 0), 5, dtype))
                    with np.errstate(all="ignore"):
                        K.bag_gradient_factors(coefficients, totals, indices, I(bounds_list),
                                               MODE[mode], psw, 2, threads)
            expect(ValueError, lambda: K.bag_gradient_factors(
                guarded(np.zeros(n - 1, dtype)), guarded(np.zeros(2, dtype)), indices,
                I([0, 3, 11]), MODE["mean"], None, -1, threads))
            expect(ValueError, lambda: K.bag_gradient_factors(
                guarded(np.zeros(n, dtype)), guarded(np.zeros(3, dtype)), indices,
                I([0, 3, 11]), MODE["mean"], None, -1, threads))
            expect(ValueError, lambda: K.bag_gradient_factors(
                guarded(np.zeros(n, dtype)), guarded(np.zeros(2, dtype)), indices,
                I([0, 3, 11]), MODE["sum"], guarded(np.ones(n - 2), dtype), -1, threads))
            expect(ValueError, lambda: K.bag_gradient_factors(
                guarded(np.zeros(n, dtype)), guarded(np.zeros(2, dtype)), indices,
                I([0, 3, 11]), MODE["sum"], None, -1, threads))

            case(f"sample_weights_grad {tag}")
            grad = guarded(rng.standard_normal((3, D)), dtype)
            out = guarded(np.full(n, 5, dtype))
            bag_of = I([0, 1, 2, -1, 3, 99, INT64_MIN, 0, 1, 2, INT64_MAX])
            K.sample_weights_grad(weight, indices, bag_of, grad, None, None, -1, out, threads)
            for p in range(n):
                row, b = int(indices[p]), int(bag_of[p])
                if not (0 <= row < V and 0 <= b < 3):
                    assert out[p] == 0, p
            K.sample_weights_grad(weight, indices, bag_of, grad, guarded(np.zeros((3, D)), dtype),
                                  guarded(np.zeros(3), dtype), -1, out, threads)
            for bad in (
                lambda: K.sample_weights_grad(weight, indices, I([0] * (n - 1)), grad, None,
                                              None, -1, out, threads),
                lambda: K.sample_weights_grad(weight, indices, bag_of, grad, None, None, -1,
                                              guarded(np.zeros(n + 1, dtype)), threads),
                lambda: K.sample_weights_grad(weight, indices, bag_of,
                                              guarded(np.zeros((3, D + 1), dtype)), None, None,
                                              -1, out, threads),
                lambda: K.sample_weights_grad(weight, indices, bag_of, grad,
                                              guarded(np.zeros((2, D)), dtype), guarded(
                                                  np.zeros(2), dtype), -1, out, threads),
                lambda: K.sample_weights_grad(weight, indices, bag_of, grad,
                                              guarded(np.zeros((3, D)), dtype), None, -1, out,
                                              threads),
            ):
                expect(ValueError, bad)

            case(f"accumulate_rows {tag}")
            grad = guarded(rng.standard_normal((4, D)), dtype)
            values = guarded(np.full((3, D), 5, dtype))
            # order and source entries that name no position or grad row are skipped
            K.accumulate_rows(grad, I([0, 1]), I([0, 3, 5]), I([0, -1, 2, 4, 1]), None, None,
                              False, None, values[:2], threads)
            assert_same_bits(values[0], grad[0] + grad[2])
            assert_same_bits(values[1], np.asarray(grad[1]))
            K.accumulate_rows(grad, I([0]), I([0, 3]), I([0, 1, 2]), I([3, -5, 2**40]), None,
                              False, None, values[:1], threads)
            assert_same_bits(values[0], np.asarray(grad[3]))
            for bad in (
                # decreasing starts, even inside the order array
                lambda: K.accumulate_rows(grad, I([0, 1, 2]), I([0, 3, 1, 4]), I([0, 1, 2, 3]),
                                          None, None, False, None, values, threads),
                # fewer coefficients than positions
                lambda: K.accumulate_rows(grad, I([0]), I([0, 1]), I([0]), None,
                                          guarded(np.ones(3, dtype)), False, None,
                                          guarded(np.zeros((1, D), dtype)), threads),
                lambda: K.accumulate_rows(grad, I([0]), I([-1, 1]), I([0]), None, None, False,
                                          None, guarded(np.zeros((1, D), dtype)), threads),
                lambda: K.accumulate_rows(grad, I([0]), I([0, 2]), I([0]), None, None, False,
                                          None, guarded(np.zeros((1, D), dtype)), threads),
                lambda: K.accumulate_rows(grad, I([0]), I([0, 1, 1]), I([0]), None, None, False,
                                          None, guarded(np.zeros((1, D), dtype)), threads),
                lambda: K.accumulate_rows(grad, I([0]), I([0, 1]), I([0]), None, None, False,
                                          None, guarded(np.zeros((2, D), dtype)), threads),
                lambda: K.accumulate_rows(grad, I([0]), I([0, 1]), I([0]), None, None, False,
                                          guarded(np.zeros((3, D), np.int64)),
                                          guarded(np.zeros((1, D), dtype)), threads),
            ):
                expect(ValueError, bad)

            case(f"sparse_step {tag}")
            for method, states in (("sgd", (None, None)),
                                   ("adagrad", (np.zeros((V, D)), None)),
                                   ("rowwise_adagrad", (np.zeros((V, 1)), None)),
                                   ("adam", (np.zeros((V, D)), np.zeros((V, D))))):
                target = guarded(table)
                state_a, state_b = (None if x is None else guarded(x, dtype) for x in states)
                g = guarded(np.ones((3, D)), dtype)
                plan = GradientPlan(g, I([0, 1, 2, 3]), I([0, 1, 2]))
                K.sparse_step(METHOD[method], target, state_a, state_b, I([-1, 2, INT64_MAX]),
                              plan, -0.5, 0.1, 0.01, 1e-8, False, 0.0, threads)
                changed = np.flatnonzero((np.asarray(target) != table).any(axis=1)).tolist()
                assert changed == [2], (method, changed)
                wrong = {"sgd": [], "adagrad": [(np.zeros((V, 1)), None), (np.zeros((V - 1, D)),
                                                                            None), (None, None)],
                         "rowwise_adagrad": [(np.zeros((V, D)), None), (np.zeros((V + 1, 1)),
                                                                         None), (None, None)],
                         "adam": [(np.zeros((V, D)), np.zeros((V, 1))),
                                  (np.zeros((V, D)), None), (None, np.zeros((V, D))),
                                  (np.zeros((V, D)), np.zeros((V + 1, D)))]}[method]
                for a, b in wrong:
                    before = np.array(target)
                    expect(ValueError, lambda: K.sparse_step(
                        METHOD[method], target, None if a is None else guarded(a, dtype),
                        None if b is None else guarded(b, dtype), I([0]), plan, -0.5, 0.1, 0.01,
                        1e-8, False, 0.0, threads))
                    assert_same_bits(target, before)
                expect(ValueError, lambda: K.sparse_step(
                    METHOD[method], target, state_a, state_b, I([0, 1]), plan, -0.5, 0.1, 0.01,
                    1e-8, False, 0.0, threads))
                expect(ValueError, lambda: K.sparse_step(
                    METHOD[method], target, state_a, state_b, I([0]), GradientPlan(
                        guarded(np.ones((3, D + 1)), dtype), I([0, 3]), I([0, 1, 2])),
                    -0.5, 0.1, 0.01, 1e-8, False, 0.0, threads))
            expect(ValueError, lambda: K.sparse_step(7, guarded(table), None, None,
                                                     I([0]), plan, -0.5, 0, 0, 0, False, 0.0, 1))
print("ALL OK", flush=True)
"""

# The quantized-table kernels (_quantized.pyx), as KERNEL_SAFE_CASES does the others.
QUANTIZED_SAFE_CASES = KERNEL_SAFE_HELPERS + r"""
for side in ("after", "before"):
    SIDE = side
    for bits in (8, 4):
        for threads in (1, 2):
            tag = f"{side} bits={bits} threads={threads}"
            V, D = 5, 4
            table = rng.standard_normal((V, D)).astype(f4)
            quantized = fastemb.quantize(table, bits)
            data = guarded(quantized.data)
            values = quantized.dequantize()

            case(f"quantize_rows {tag}")
            out = guarded(np.full(quantized.data.shape, 7, np.uint8))
            K.quantize_rows(guarded(table), bits, out, threads)
            assert (out == quantized.data).all()
            for wrong in (np.zeros((V + 1, out.shape[1]), np.uint8),
                          np.zeros((V, out.shape[1] + 1), np.uint8)):
                expect(ValueError, lambda: K.quantize_rows(guarded(table), bits, guarded(wrong),
                                                           threads))
            expect(ValueError, lambda: K.quantize_rows(guarded(table[:, :3]), 4, guarded(
                np.zeros((V, 5), np.uint8)), threads))
            expect(ValueError, lambda: K.quantize_rows(guarded(table), 3, out, threads))

            case(f"gather_quantized {tag}")
            for index_dtype, rows in ((np.int64, [0, 4] + BAD_ROWS + [2]),
                                      (np.int32, [0, 4, -1, 5, -2**31, 2**31 - 1, 3])):
                indices = guarded(np.array(rows, index_dtype))
                out = guarded(np.full((len(rows), D), 7, f4))
                bad = K.gather_quantized(data, bits, indices, out, threads)
                want = np.array([values[r] if 0 <= r < V else np.zeros(D, f4) for r in rows])
                assert_same_bits(out, want)
                assert bad == sum(not 0 <= r < V for r in rows)
                expect(ValueError, lambda: K.gather_quantized(data, bits, indices, guarded(
                    np.zeros((len(rows) + 1, D), f4)), threads))
                expect(ValueError, lambda: K.gather_quantized(data, bits, indices, guarded(
                    np.zeros((len(rows), D + 1), f4)), threads))
            for row_bytes, bad_bits in ((7, 8), (3, 4), (12, 2)):
                expect(ValueError, lambda: K.gather_quantized(guarded(np.zeros(
                    (V, row_bytes), np.uint8)), bad_bits, I([0]), guarded(np.zeros((1, D), f4)),
                    threads))
            out = guarded(np.ones((3, D), f4))
            K.gather_quantized(guarded(np.zeros((0, data.shape[1]), np.uint8)), bits,
                               I([0, -1, 1]), out, threads)
            assert not out.any()

            case(f"quantized_bag_reduce {tag}")
            indices = bag_indices()
            for bounds_list, mode, padding, psw in bag_calls(f4):
                out = guarded(np.full((len(bounds_list) - 1, D), 9, f4))
                K.quantized_bag_reduce(data, bits, indices, I(bounds_list), MODE[mode], psw,
                                       padding, out, threads)
                want, _ = bags_by_hand(values, np.asarray(indices), bounds_list, mode,
                                       None if psw is None else np.asarray(psw), padding)
                assert_same_bits(out, want)
            bounds = I([0, 3, 11])
            for bad in (
                lambda: K.quantized_bag_reduce(data, bits, indices, bounds, MODE["sum"], None,
                                               -1, guarded(np.zeros((3, D), f4)), threads),
                lambda: K.quantized_bag_reduce(data, bits, indices, bounds, MODE["sum"], None,
                                               -1, guarded(np.zeros((2, D + 1), f4)), threads),
                lambda: K.quantized_bag_reduce(data, bits, indices, I([]), MODE["sum"], None,
                                               -1, guarded(np.zeros((0, D), f4)), threads),
                lambda: K.quantized_bag_reduce(data, bits, indices, bounds, MODE["sum"],
                                               guarded(np.ones(3, f4)), -1,
                                               guarded(np.zeros((2, D), f4)), threads),
                lambda: K.quantized_bag_reduce(guarded(np.zeros((V, 2), np.uint8)), bits,
                                               indices, bounds, MODE["sum"], None, -1,
                                               guarded(np.zeros((2, D), f4)), threads),
                lambda: K.quantized_bag_reduce(data, bits, indices, bounds, 7, None, -1,
                                               guarded(np.zeros((2, D), f4)), threads),
            ):
                expect(ValueError, bad)

            case(f"quantized_bag_forward_common {tag}")
            # rows outside [0, V) or offsets that are not valid: declined (None), after reading
            # only in bounds; valid ones: the bags by hand
            assert K.quantized_bag_forward_common(indices, data, bits, I([0, 3]), "sum", None,
                                                  False, None) is None
            good = guarded(np.array([0, 4, 2, 1, 3], np.int64))
            for offsets in (I([0, 6]), I([1, 5]), I([0, 3, 2, 5]), I([0, 2, 4]), I([])):
                assert K.quantized_bag_forward_common(good, data, bits, offsets, "sum", None,
                                                      True, None) is None
            for mode in ("sum", "mean", "max"):
                got = K.quantized_bag_forward_common(good, data, bits, I([0, 3, 3]), mode, None,
                                                     False, -1)
                want, _ = bags_by_hand(values, np.asarray(good), [0, 3, 3, 5], mode, None, 4)
                assert_same_bits(got, want)
print("ALL OK", flush=True)
"""

# Inconsistent GradientPlans: each once read out of bounds (the kernels trusted the plan).
KERNEL_CRASH_CASES = {
    "accumulate_rows: starts past the order array in the middle": (
        "K.accumulate_rows(guarded(np.ones((1, 3), np.float32)), I([0, 1]), I([0, 2**40, 1]),"
        " I([0]), None, None, False, None, np.empty((2, 3), np.float32), 1)"),
    "accumulate_rows: an order entry past grad": (
        "K.accumulate_rows(guarded(np.ones((1, 3), np.float32)), I([0]), I([0, 1]), I([1]),"
        " None, None, False, None, np.empty((1, 3), np.float32), 1)"),
    "accumulate_rows: a source entry past grad": (
        "K.accumulate_rows(guarded(np.ones((1, 3), np.float32)), I([0]), I([0, 1]), I([0]),"
        " I([2**40]), None, False, None, np.empty((1, 3), np.float32), 1)"),
    "accumulate_rows: fewer coefficients than positions": (
        "K.accumulate_rows(guarded(np.ones((3, 3), np.float32)), I([0]), I([0, 1]), I([2]),"
        " None, guarded(np.ones(1, np.float32)), False, None, np.empty((1, 3), np.float32), 1)"),
    "sparse_step: winners narrower than grad": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((1, 3), np.float32)), I([0, 1]), I([0]),"
        " winners=I([0]).reshape(1, 1)), -0.1, 0, 0, 0, False, 0.0, 1)"),
    "sparse_step: starts past the order array": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((1, 3), np.float32)), I([0, 2**40]), I([0])),"
        " -0.1, 0, 0, 0, False, 0.0, 1)"),
    "sparse_step: negative starts": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((1, 3), np.float32)), I([-2**40, 1]), I([0])),"
        " -0.1, 0, 0, 0, False, 0.0, 1)"),
    "sparse_step: an order entry past grad": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((1, 3), np.float32)), I([0, 1]), I([1])),"
        " -0.1, 0, 0, 0, False, 0.0, 1)"),
    "sparse_step: a source entry past grad": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((1, 3), np.float32)), I([0, 1]), I([0]),"
        " source=I([2**40])), -0.1, 0, 0, 0, False, 0.0, 1)"),
    "sparse_step: fewer coefficients than positions": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((3, 3), np.float32)), I([0, 1]), I([2]),"
        " coefficients=guarded(np.ones(1, np.float32))), -0.1, 0, 0, 0, False, 0.0, 1)"),
    "sparse_step: a group but an empty order array": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((1, 3), np.float32)), I([0, 1]), I([])),"
        " -0.1, 0, 0, 0, False, 0.0, 1)"),
}
# Thread counts below 1: each once crashed (0 ran OpenMP's default team over sparse_step's
# single gradient buffer; a negative count made libgomp abort the process).
THREAD_CRASH_CASES = {
    "sparse_step: num_threads=0": (
        "V, D = 4096, 16; rows = np.arange(V, dtype=np.int64); w = np.zeros((V, D), np.float32)\n"
        "K.sparse_step(METHOD['sgd'], w, None, None, rows,"
        " GradientPlan(np.ones((V, D), np.float32), np.arange(V + 1, dtype=np.int64),"
        " rows.copy()), -1.0, 0, 0, 0, False, 0.0, 0)\n"
        "assert (w == -1).all()"),
    "gather_rows: num_threads=-1": (
        "out = np.empty((5000, 3), np.float32)\n"
        "K.gather_rows(np.ones((4, 3), np.float32), np.zeros(5000, np.int64), out, -1)"),
    "bag_reduce: num_threads=-1": (
        "out = np.empty((2, 3), np.float32)\n"
        "K.bag_reduce(np.ones((4, 3), np.float32), np.zeros(4, np.int64),"
        " np.array([0, 2, 4]), MODE['sum'], None, -1, out, None, -1)"),
}


def _kernel_builds():
    return [module.__name__.split(".")[-1]
            for module in fastemb._kernels.available_builds().values()]


def run_kernel_script(build, body, threads=2):
    """Run ``body`` after KERNEL_PRELUDE in a fresh interpreter; returns CompletedProcess."""
    import subprocess
    import sys

    prelude = KERNEL_PRELUDE.replace("TESTS", repr(os.path.dirname(os.path.abspath(__file__))))
    prelude = prelude.replace("BUILD", repr(build))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [
                   os.path.dirname(os.path.dirname(os.path.abspath(fastemb.__file__))),
                   os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", prelude + body], capture_output=True,
                          text=True, timeout=300, env=env)


def describe(result):
    last = [line for line in result.stdout.splitlines() if line.startswith("CASE")][-1:]
    return (f"exit status {result.returncode} (a negative status is the signal that killed it)"
            f", last case started: {last}\nstdout tail: {result.stdout[-500:]}\n"
            f"stderr tail: {result.stderr[-2000:]}")


def test_the_guard_pages_catch_an_out_of_bounds_read():
    """The harness itself: reading one element past a guarded array kills the child."""
    body = ("a = guarded(np.arange(10.0))\n"
            "p = a.ctypes.data_as(ctypes.POINTER(ctypes.c_double))\n"
            "assert p[9] == 9.0\nprint('IN BOUNDS OK', flush=True)\np[10]\nprint('ALL OK')")
    result = run_kernel_script("_core", body)
    assert "IN BOUNDS OK" in result.stdout and result.returncode != 0
    assert "ALL OK" not in result.stdout


@pytest.mark.parametrize("build", _kernel_builds())
def test_kernels_given_inconsistent_arrays_raise_or_stay_in_bounds(build):
    """Every kernel with out-of-range rows, garbage bag bounds, wrong shapes and wrong state
    shapes: ValueError, or a result that only used the in-bounds part (checked against the
    documented clamping), on guarded arrays, serial and parallel."""
    result = run_kernel_script(build, KERNEL_SAFE_CASES)
    assert result.returncode == 0 and "ALL OK" in result.stdout, describe(result)


@pytest.mark.parametrize("build", _kernel_builds())
def test_quantized_kernels_given_inconsistent_arrays_raise_or_stay_in_bounds(build):
    """The quantized-table kernels, likewise: bad rows, garbage bounds, wrong shapes, rows too
    short for their scale and bias, on guarded arrays."""
    result = run_kernel_script(build, QUANTIZED_SAFE_CASES)
    assert result.returncode == 0 and "ALL OK" in result.stdout, describe(result)


def _kernel_outcome(build, statement):
    """Run one kernel call in a child: it must raise ValueError or return, and the child must
    exit cleanly (a heap overrun may only show when the interpreter frees memory at exit)."""
    body = ("try:\n" + "\n".join("    " + line for line in statement.splitlines())
            + "\nexcept ValueError as error:\n    print('RAISED', error)\nprint('ALL OK')\n")
    result = run_kernel_script(build, body, threads=4)
    if re.search(r"^(NameError|SyntaxError|AttributeError|ImportError|TypeError)",
                 result.stderr, re.M):  # the harness, not the kernel (the xfail must not hide it)
        raise RuntimeError(f"the kernel script itself is broken:\n{result.stderr[-2000:]}")
    assert result.returncode == 0 and "ALL OK" in result.stdout, describe(result)


@pytest.mark.parametrize("name", sorted(KERNEL_CRASH_CASES))
def test_gradient_kernels_check_their_plan(name):
    _kernel_outcome("_core", KERNEL_CRASH_CASES[name])


@pytest.mark.parametrize("name", sorted(THREAD_CRASH_CASES))
def test_kernels_check_their_thread_count(name):
    _kernel_outcome("_core", THREAD_CRASH_CASES[name])
