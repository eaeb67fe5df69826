"""Backward passes: SparseGrad, embedding_backward, embedding_bag_backward, module.backward,
per-sample-weight gradients, thread-count invariance and memory use.

References live in ``reference_training.py`` (NumPy, bit for bit in the contract's order);
torch 2.13 cross-checks are skipped when torch is not installed.
"""

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastemb

from reference_training import (
    assert_bitwise,
    assert_ulp,
    bag_grad_ref,
    dense,
    embedding_grad_ref,
    psw_grad_ref,
)

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is an optional peer
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

DTYPES = [np.float32, np.float64]
W5 = np.array([[1, -2], [3, 4], [-5, 6], [7, -8], [0.5, 0.5]], dtype=np.float32)
I6 = np.array([0, 1, 2, 3, 4, 1])


def check_layout(g, rows, num_embeddings, dim, dtype):
    """A coalesced SparseGrad with exactly ``rows`` (sorted unique int64) and (nnz, D) values."""
    assert isinstance(g, fastemb.SparseGrad)
    assert g.rows.dtype == np.int64
    assert g.rows.tolist() == list(rows)
    assert g.nnz == len(rows)
    assert g.num_embeddings == num_embeddings
    assert g.values.shape == (len(rows), dim)
    assert g.values.dtype == np.dtype(dtype)


# --------------------------------------------------------------------------------------------
# SparseGrad itself
# --------------------------------------------------------------------------------------------


def test_sparse_grad_basics():
    g = fastemb.SparseGrad([1, 3], np.array([[1, 2], [3, 4]], np.float32), num_embeddings=5)
    assert g.nnz == 2 and g.rows.dtype == np.int64 and g.values.dtype == np.float32
    d = g.to_dense()
    assert d.shape == (5, 2) and d.dtype == np.float32
    assert d.tolist() == [[0, 0], [1, 2], [0, 0], [3, 4], [0, 0]]


def test_sparse_grad_add_merges_and_stays_coalesced():
    a = fastemb.SparseGrad([0, 3], np.array([[1, 1], [2, 2]], np.float64), 6)
    b = fastemb.SparseGrad([3, 5], np.array([[10, 10], [20, 20]], np.float64), 6)
    c = a + b
    assert c.rows.tolist() == [0, 3, 5]
    assert c.values.tolist() == [[1, 1], [12, 12], [20, 20]]
    assert c.values.dtype == np.float64
    np.testing.assert_array_equal(c.to_dense(), a.to_dense() + b.to_dense())
    # operands unchanged
    assert a.values.tolist() == [[1, 1], [2, 2]] and b.rows.tolist() == [3, 5]


def test_sparse_grad_add_of_lazy_gradients_equals_dense_sum(rng):
    w = rng.standard_normal((20, 3)).astype(np.float32)
    g1 = fastemb.embedding_bag_backward(rng.standard_normal((3, 3)).astype(np.float32),
                                        rng.integers(0, 20, 9), w, offsets=[0, 4, 4],
                                        mode="mean")
    g2 = fastemb.embedding_backward(rng.standard_normal((5, 3)).astype(np.float32),
                                    rng.integers(0, 20, 5), 20)
    s = g1 + g2
    assert s.rows.tolist() == sorted(set(g1.rows.tolist()) | set(g2.rows.tolist()))
    assert_bitwise(s.to_dense(), g1.to_dense() + g2.to_dense(), "a + b")


def test_sparse_grad_add_rejects_other_tables():
    a = fastemb.SparseGrad([0], np.ones((1, 2), np.float32), 4)
    with pytest.raises(ValueError):
        a + fastemb.SparseGrad([0], np.ones((1, 2), np.float32), 5)
    with pytest.raises(ValueError):
        a + fastemb.SparseGrad([0], np.ones((1, 2), np.float64), 4)
    with pytest.raises(ValueError):
        a + fastemb.SparseGrad([0], np.ones((1, 3), np.float32), 4)


def test_sparse_grad_values_are_computed_once():
    g = fastemb.embedding_backward(np.ones((3, 2), np.float32), [0, 2, 0], num_embeddings=4)
    first = g.values
    assert g.values is first
    assert first.tolist() == [[2, 2], [1, 1]]


# --------------------------------------------------------------------------------------------
# Embedding backward: torch-semantics §1.5 and §5 rows 23-30
# --------------------------------------------------------------------------------------------

IDX23 = np.array([[0, 1, 1], [3, 1, 0]])
GO23 = np.arange(12, dtype=np.float32).reshape(2, 3, 2)


def test_row23_embedding_grad():
    g = fastemb.embedding_backward(GO23, IDX23, num_embeddings=4)
    check_layout(g, [0, 1, 3], 4, 2, np.float32)  # row 2 was not looked up
    assert g.to_dense().tolist() == [[10, 12], [14, 17], [0, 0], [6, 7]]


@pytest.mark.parametrize("padding_idx, row", [(1, 1), (-1, 3)])
def test_row24_embedding_grad_padding(padding_idx, row):
    g = fastemb.embedding_backward(GO23, IDX23, 4, padding_idx=padding_idx)
    expected = np.array([[10, 12], [14, 17], [0, 0], [6, 7]], np.float32)
    expected[row] = 0
    assert row not in g.rows.tolist()
    assert g.rows.tolist() == [r for r in (0, 1, 3) if r != row]
    assert_bitwise(g.to_dense(), expected)


def test_row25_embedding_grad_scale_by_freq():
    g = fastemb.embedding_backward(GO23, IDX23, 4, scale_grad_by_freq=True)
    check_layout(g, [0, 1, 3], 4, 2, np.float32)
    np.testing.assert_allclose(g.to_dense(), [[5, 6], [4.6666667, 5.6666667], [0, 0], [6, 7]],
                               rtol=1e-6)
    rows, values = embedding_grad_ref(IDX23, GO23, 4, scale_grad_by_freq=True)
    assert_bitwise(g.values, values, "sgbf")


def test_row27_28_padding_everywhere():
    g = fastemb.embedding_backward(np.ones((3, 4), np.float64), [1, 1, 1], 5, padding_idx=1)
    check_layout(g, [], 5, 4, np.float64)
    assert g.to_dense().shape == (5, 4) and not g.to_dense().any()
    e = fastemb.embedding_backward(np.ones((2, 0, 4), np.float32), np.empty((2, 0), np.int64), 5)
    check_layout(e, [], 5, 4, np.float32)


def test_zero_d_input():
    g = fastemb.embedding_backward(np.array([1.5, -2], np.float32), np.array(3), 5)
    check_layout(g, [3], 5, 2, np.float32)
    assert g.values.tolist() == [[1.5, -2]]


def test_rows_present_even_when_gradient_is_zero():
    g = fastemb.embedding_backward(np.zeros((3, 2), np.float32), [4, 0, 4], 6)
    check_layout(g, [0, 4], 6, 2, np.float32)
    assert not g.values.any()


def test_row30_module_accumulates_two_backwards():
    m = fastemb.Embedding(4, 2, seed=0)
    m([2, 0])
    m.backward(np.array([[1, 2], [3, 4]], np.float32))
    m([0, 1])
    m.backward(np.array([[10, 20], [30, 40]], np.float32))
    check_layout(m.grad, [0, 1, 2], 4, 2, np.float32)
    assert m.grad.values.tolist() == [[13, 24], [30, 40], [1, 2]]


@pytest.mark.parametrize("padding_idx", [None, 3, -2])
@pytest.mark.parametrize("sgbf", [False, True])
@pytest.mark.parametrize("int_dtype", [np.int32, np.int64, np.uint8])
def test_embedding_grad_matches_reference(dtype, padding_idx, sgbf, int_dtype, rng):
    V, D = 12, 5
    idx = rng.integers(0, V, (7, 9)).astype(int_dtype)
    G = rng.standard_normal((7, 9, D)).astype(dtype)
    g = fastemb.embedding_backward(G, idx, V, padding_idx=padding_idx, scale_grad_by_freq=sgbf)
    rows, values = embedding_grad_ref(idx, G, V, padding_idx, sgbf)
    check_layout(g, rows, V, D, dtype)
    assert_bitwise(g.values, values, "embedding grad")


def test_embedding_grad_sums_in_position_order():
    """Values that round differently in another order: 1e8 + 1 - 1e8 ... in float32."""
    G = np.array([[1e8], [1.0], [-1e8], [1.0], [1.0]], np.float32)
    g = fastemb.embedding_backward(G, [2, 2, 2, 2, 2], 3)
    # sequential: ((((1e8 + 1) - 1e8) + 1) + 1) = 2 in float32
    assert g.values.tolist() == [[2.0]]
    G2 = np.array([[1.0], [1e8], [1.0], [-1e8]], np.float32)
    assert fastemb.embedding_backward(G2, [0, 0, 0, 0], 1).values.tolist() == [[0.0]]


@needs_torch
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_grad_bitwise_equal_to_torch(dtype, padding_idx, rng):
    V, D = 40, 7
    idx = rng.integers(0, V, (60, 11))
    G = rng.standard_normal((60, 11, D)).astype(dtype)
    w = torch.zeros(V, D, dtype=torch.float64 if dtype == np.float64 else torch.float32,
                    requires_grad=True)
    F.embedding(torch.from_numpy(idx), w, padding_idx=padding_idx).backward(torch.from_numpy(G))
    g = fastemb.embedding_backward(G, idx, V, padding_idx=padding_idx)
    assert_bitwise(g.to_dense(), w.grad.numpy(), "embedding grad vs torch")


def test_gradient_sum_starts_from_its_first_term():
    """As torch's coalesce(): a row looked up once keeps its grad row's bits (-0 stays -0);
    to_dense() adds the values to zeros, as torch's does."""
    G = np.array([[-0.0, 1.0], [2.0, -0.0], [-0.0, -0.0]], np.float32)
    g = fastemb.embedding_backward(G, [2, 0, 1], 3)
    assert np.signbit(g.values).tolist() == [[False, True], [True, True], [True, False]]
    assert not np.signbit(g.to_dense()).any()
    if torch is not None:
        w = torch.zeros(3, 2, requires_grad=True)
        F.embedding(torch.tensor([2, 0, 1]), w, sparse=True).backward(torch.from_numpy(G))
        coalesced = w.grad.coalesce()
        assert_bitwise(g.values, coalesced.values().numpy(), "values vs torch coalesce()")
        assert_bitwise(g.to_dense(), coalesced.to_dense().numpy(), "to_dense vs torch")


@needs_torch
def test_embedding_grad_scale_by_freq_close_to_torch(dtype, rng):
    V, D = 30, 6
    idx = rng.integers(0, V, (50, 8))
    G = rng.uniform(0.5, 1.5, (50, 8, D)).astype(dtype)  # positive: no cancellation
    w = torch.zeros(V, D, dtype=torch.from_numpy(G).dtype, requires_grad=True)
    F.embedding(torch.from_numpy(idx), w, scale_grad_by_freq=True).backward(torch.from_numpy(G))
    g = fastemb.embedding_backward(G, idx, V, scale_grad_by_freq=True)
    assert_ulp(g.to_dense(), w.grad.numpy(), 4, "sgbf vs torch")


def test_embedding_backward_validation():
    with pytest.raises(IndexError):
        fastemb.embedding_backward(np.ones((2, 2), np.float32), [0, 5], 5)
    with pytest.raises(IndexError):
        fastemb.embedding_backward(np.ones((2, 2), np.float32), [0, -1], 5)
    with pytest.raises(ValueError):
        fastemb.embedding_backward(np.ones((3, 2), np.float32), [0, 1], 5)  # shape
    with pytest.raises(ValueError):
        fastemb.embedding_backward(np.ones((2, 2), np.int64), [0, 1], 5)  # dtype
    with pytest.raises(TypeError):
        fastemb.embedding_backward(np.ones((2, 2), np.float32), [0.0, 1.0], 5)


def test_embedding_backward_copies_grad_output():
    G = np.ones((3, 2), np.float32)
    g = fastemb.embedding_backward(G, [0, 2, 0], 4)
    G[:] = 100
    assert g.values.tolist() == [[2, 2], [1, 1]]


# --------------------------------------------------------------------------------------------
# EmbeddingBag backward: torch-semantics §2.7 and §5 rows 54-58
# --------------------------------------------------------------------------------------------

G27 = np.array([[1, 10], [100, 1000], [0.5, 0.25]], np.float32)


def test_bag_grad_sum_example():
    g = fastemb.embedding_bag_backward(G27, I6, W5, offsets=[0, 2, 2], mode="sum")
    check_layout(g, [0, 1, 2, 3, 4], 5, 2, np.float32)
    assert g.to_dense().tolist() == [[1, 10], [1.5, 10.25], [0.5, 0.25], [0.5, 0.25],
                                     [0.5, 0.25]]


def test_bag_grad_mean_example():
    g = fastemb.embedding_bag_backward(G27, I6, W5, offsets=[0, 2, 2], mode="mean")
    np.testing.assert_allclose(g.to_dense(), [[0.5, 5], [0.625, 5.0625], [0.125, 0.0625],
                                              [0.125, 0.0625], [0.125, 0.0625]])
    gp = fastemb.embedding_bag_backward(G27, I6, W5, offsets=[0, 2, 2], mode="mean",
                                        padding_idx=1)
    # bag 0 divides by 1, bag 2 by 3; row 1 (padding) gets nothing
    check_layout(gp, [0, 2, 3, 4], 5, 2, np.float32)
    np.testing.assert_allclose(gp.to_dense(), [[1, 10], [0, 0], [0.5 / 3, 0.25 / 3],
                                               [0.5 / 3, 0.25 / 3], [0.5 / 3, 0.25 / 3]],
                               rtol=1e-6)


def test_bag_grad_max_example():
    g = fastemb.embedding_bag_backward(G27, I6, W5, offsets=[0, 2, 2], mode="max")
    # row 0 and row 4 never win a column but were looked up: present with zero values
    check_layout(g, [0, 1, 2, 3, 4], 5, 2, np.float32)
    assert g.to_dense().tolist() == [[0, 0], [1, 10], [0, 0.25], [0.5, 0], [0, 0]]


def test_row52_max_tie_goes_to_first():
    w = np.array([[1, 5], [1, 5], [2, 0]], np.float32)
    g = fastemb.embedding_bag_backward(np.array([[3, 7]], np.float32), [1, 0, 2], w,
                                       offsets=[0], mode="max")
    assert g.rows.tolist() == [0, 1, 2]
    assert g.to_dense().tolist() == [[0, 0], [0, 7], [3, 0]]


def test_row54_max_repeated_row_gets_gradient_once():
    g = fastemb.embedding_bag_backward(np.ones((1, 2), np.float32), [2, 2], W5, offsets=[0],
                                       mode="max")
    assert g.rows.tolist() == [2] and g.values.tolist() == [[1, 1]]


def test_row55_mean_empty_bag_contributes_nothing():
    G = np.array([[100, 100], [1, 2], [3, 6]], np.float32)
    g = fastemb.embedding_bag_backward(G, [0, 1, 2], W5, offsets=[0, 0, 3], mode="mean")
    check_layout(g, [0, 1, 2], 5, 2, np.float32)
    np.testing.assert_allclose(g.values, [[1 / 3, 2 / 3]] * 3, rtol=1e-6)


SGBF_I = np.array([3, 1, 1, 0, 1, 4])
SGBF_G = np.array([[1, 1], [10, 10]], np.float32)


def test_row56_bag_scale_by_freq_correct_counts():
    """The correct answer (torch 2.13 gets rows 3 and 4 wrong, issue #190063)."""
    g = fastemb.embedding_bag_backward(SGBF_G, SGBF_I, W5, offsets=[0, 3], mode="sum",
                                       scale_grad_by_freq=True)
    check_layout(g, [0, 1, 3, 4], 5, 2, np.float32)
    np.testing.assert_allclose(g.values, [[10, 10], [4, 4], [1, 1], [10, 10]], rtol=1e-6)


@needs_torch
@pytest.mark.xfail(strict=True, reason="torch 2.13 EmbeddingBag CPU scale_grad_by_freq divides "
                                       "by the wrong count (pytorch#190063); fastemb is correct")
def test_row56_torch_disagrees_on_bag_scale_by_freq():
    w = torch.from_numpy(W5.copy()).requires_grad_()
    F.embedding_bag(torch.from_numpy(SGBF_I), w, torch.tensor([0, 3]), mode="sum",
                    scale_grad_by_freq=True).backward(torch.from_numpy(SGBF_G))
    g = fastemb.embedding_bag_backward(SGBF_G, SGBF_I, W5, offsets=[0, 3], mode="sum",
                                       scale_grad_by_freq=True)
    np.testing.assert_allclose(g.to_dense(), w.grad.numpy(), rtol=1e-6)


def test_row57_bag_sum_grad_layout_and_padding():
    g = fastemb.embedding_bag_backward(G27, I6, W5, offsets=[0, 2, 2], mode="sum",
                                       padding_idx=1)
    check_layout(g, [0, 2, 3, 4], 5, 2, np.float32)
    assert g.to_dense().tolist() == [[1, 10], [0, 0], [0.5, 0.25], [0.5, 0.25], [0.5, 0.25]]


def test_row58_per_sample_weights_grad():
    psw = np.arange(1, 7, dtype=np.float32)
    g, pg = fastemb.embedding_bag_backward(G27, I6, W5, offsets=[0, 2, 2], mode="sum",
                                           per_sample_weights=psw)
    assert pg.shape == (6,) and pg.dtype == np.float32
    assert pg.tolist() == [-19, 43, -1, 1.5, 0.375, 2.5]
    # the weight gradient is scaled by psw
    assert g.to_dense().tolist() == [[1, 10], [2 + 6 * 0.5, 20 + 6 * 0.25], [1.5, 0.75],
                                     [2, 1], [2.5, 1.25]]
    _, pg_pad = fastemb.embedding_bag_backward(G27, I6, W5, offsets=[0, 2, 2], mode="sum",
                                               per_sample_weights=psw, padding_idx=1)
    assert pg_pad.tolist() == [-19, 0, -1, 1.5, 0.375, 0]


def test_bag_grad_all_padding_and_empty_bags():
    for mode in ("sum", "mean", "max"):
        g = fastemb.embedding_bag_backward(np.ones((3, 2), np.float32), [1, 1, 2], W5,
                                           offsets=[0, 0, 2], mode=mode, padding_idx=1)
        # bag 0 empty, bag 1 all padding, bag 2 = [2]
        check_layout(g, [2], 5, 2, np.float32)
        assert g.values.tolist() == [[1, 1]], mode
    g = fastemb.embedding_bag_backward(np.ones((1, 2), np.float32), np.empty(0, np.int64), W5,
                                       offsets=[0], mode="mean")
    check_layout(g, [], 5, 2, np.float32)


def test_weighted_mean_zero_total_gives_zero():
    psw = np.array([1, -1, 2, 0], np.float32)
    G = np.ones((2, 2), np.float32)
    g, pg = fastemb.embedding_bag_backward(G, [0, 2, 3, 3], W5, offsets=[0, 2], mode="mean",
                                           per_sample_weights=psw)
    # bag 0: total 0 -> nothing; bag 1: total 2 -> row 3 gets (2/2 + 0/2) * G
    check_layout(g, [0, 2, 3], 5, 2, np.float32)
    assert g.to_dense().tolist() == [[0, 0], [0, 0], [0, 0], [1, 1], [0, 0]]
    assert pg[:2].tolist() == [0, 0]
    assert np.all(np.isfinite(g.values)) and np.all(np.isfinite(pg))


def random_bag_case(rng, dtype, V=15, D=4, n=40, num_bags=9):
    idx = rng.integers(0, V, n)
    cuts = np.sort(rng.integers(0, n + 1, num_bags - 1))
    offsets = np.concatenate([[0], cuts])  # may contain empty bags
    w = rng.standard_normal((V, D)).astype(dtype)
    # a few exact ties in max mode
    w[3] = w[4]
    G = rng.standard_normal((num_bags, D)).astype(dtype)
    psw = rng.uniform(-1, 2, n).astype(dtype)
    return idx, offsets, w, G, psw


CASES = [
    ("sum", False, False), ("sum", True, False), ("sum", False, True), ("sum", True, True),
    ("mean", False, False), ("mean", True, False), ("mean", False, True), ("mean", True, True),
    ("max", False, False),
]


@pytest.mark.parametrize("mode, weighted, sgbf", CASES)
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_bag_grad_matches_reference(dtype, mode, weighted, sgbf, padding_idx, rng):
    for _ in range(3):
        idx, offsets, w, G, psw = random_bag_case(rng, dtype)
        result = fastemb.embedding_bag_backward(
            G, idx, w, offsets=offsets, mode=mode,
            per_sample_weights=psw if weighted else None, padding_idx=padding_idx,
            scale_grad_by_freq=sgbf)
        g = result[0] if weighted else result
        rows, values = bag_grad_ref(w, idx, G, offsets, mode, psw if weighted else None,
                                    padding_idx=padding_idx, scale_grad_by_freq=sgbf)
        check_layout(g, rows, w.shape[0], w.shape[1], dtype)
        assert_bitwise(g.values, values, f"{mode} weighted={weighted} sgbf={sgbf}")
        if weighted:
            pg = psw_grad_ref(w, idx, G, psw, offsets, mode, padding_idx=padding_idx)
            assert_ulp(result[1], pg, 1, "psw grad")


@settings(max_examples=40, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(DTYPES),
       case=st.sampled_from(CASES), two_d=st.booleans(), last=st.booleans(),
       padding=st.sampled_from([None, 0, -1]))
def test_bag_grad_matches_reference_hypothesis(data, dtype, case, two_d, last, padding):
    mode, weighted, sgbf = case
    V = data.draw(st.integers(1, 8), label="V")
    D = data.draw(st.integers(1, 5), label="D")
    if two_d:
        B = data.draw(st.integers(0, 5), label="B")
        L = data.draw(st.integers(1, 5), label="L")
        idx = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=B * L,
                                          max_size=B * L)), dtype=np.int64).reshape(B, L)
        offsets, last = None, False
        num_bags = B
    else:
        n = data.draw(st.integers(0, 20), label="n")
        idx = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n)),
                       dtype=np.int64)
        cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=6), label="cuts"))
        offsets = np.array([0] + cuts, np.int64)
        num_bags = offsets.size
        if last:
            offsets = np.append(offsets, n)
    values = st.floats(-4, 4, width=32).map(lambda x: round(x * 4) / 4)  # ties and exact zeros
    w = np.array(data.draw(st.lists(values, min_size=V * D, max_size=V * D)),
                 dtype=dtype).reshape(V, D)
    G = np.array(data.draw(st.lists(st.floats(-100, 100, width=32), min_size=num_bags * D,
                                     max_size=num_bags * D)), dtype=dtype).reshape(num_bags, D)
    psw = np.array(data.draw(st.lists(values, min_size=idx.size, max_size=idx.size)),
                   dtype=dtype).reshape(idx.shape) if weighted else None
    padding_idx = None if padding is None else padding % V if padding >= 0 else padding
    result = fastemb.embedding_bag_backward(G, idx, w, offsets=offsets, mode=mode,
                                            per_sample_weights=psw, include_last_offset=last,
                                            padding_idx=padding_idx, scale_grad_by_freq=sgbf)
    g = result[0] if weighted else result
    rows, ref = bag_grad_ref(w, idx, G, offsets, mode, psw, last, padding_idx, sgbf)
    check_layout(g, rows, V, D, dtype)
    assert_bitwise(g.values, ref, "bag grad")
    if weighted:
        assert result[1].shape == idx.shape and result[1].dtype == dtype
        assert_ulp(result[1], psw_grad_ref(w, idx, G, psw, offsets, mode, last, padding_idx), 1,
                   "psw grad")


def test_include_last_offset_equals_dropping_the_last_offset(rng):
    idx, offsets, w, G, psw = random_bag_case(rng, np.float32)
    for mode in ("sum", "mean", "max"):
        a = fastemb.embedding_bag_backward(G, idx, w, offsets=offsets, mode=mode)
        b = fastemb.embedding_bag_backward(G, idx, w, offsets=np.append(offsets, idx.size),
                                           mode=mode, include_last_offset=True)
        assert a.rows.tolist() == b.rows.tolist()
        assert_bitwise(a.values, b.values, mode)


def torch_bag_grads(w, idx, G, offsets, mode, psw=None, padding_idx=None, sgbf=False):
    wt = torch.from_numpy(w.copy()).requires_grad_()
    pt = None if psw is None else torch.from_numpy(psw.copy()).requires_grad_()
    out = F.embedding_bag(torch.from_numpy(idx), wt,
                          None if offsets is None else torch.from_numpy(offsets), mode=mode,
                          per_sample_weights=pt, padding_idx=padding_idx,
                          scale_grad_by_freq=sgbf)
    out.backward(torch.from_numpy(G))
    return wt.grad.numpy(), None if pt is None else pt.grad.numpy()


def magnitude_bound(w, idx, G, offsets, mode, psw, padding_idx, sgbf=False):
    """sum_p |c_p| |G[b]| per row (float64): scales the tolerance of a reordered sum."""
    rows, values = bag_grad_ref(w.astype(np.float64), idx, np.abs(G).astype(np.float64),
                                offsets, mode,
                                None if psw is None else np.abs(psw).astype(np.float64),
                                padding_idx=padding_idx, scale_grad_by_freq=sgbf)
    return dense(rows, values, w.shape[0])


@needs_torch
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False),
                                            ("max", False)])
@pytest.mark.parametrize("padding_idx", [None, 5])
def test_bag_grad_close_to_torch(dtype, mode, weighted, padding_idx, rng):
    V, D, n, B = 25, 9, 300, 40
    idx = rng.integers(0, V, n)
    offsets = np.concatenate([[0], np.sort(rng.integers(0, n + 1, B - 1))])
    w = rng.standard_normal((V, D)).astype(dtype)
    G = rng.standard_normal((B, D)).astype(dtype)
    psw = rng.uniform(-1, 1, n).astype(dtype) if weighted else None
    result = fastemb.embedding_bag_backward(G, idx, w, offsets=offsets, mode=mode,
                                            per_sample_weights=psw, padding_idx=padding_idx)
    g = result[0] if weighted else result
    expected, expected_psw = torch_bag_grads(w, idx, G, offsets, mode, psw, padding_idx)
    eps = np.finfo(dtype).eps
    bound = magnitude_bound(w, idx, G, offsets, mode, psw, padding_idx)
    ours = g.to_dense()
    assert ours.dtype == dtype
    excess = np.abs(ours.astype(np.float64) - expected) - 4 * n * eps * bound
    assert excess.max() <= 0, f"max excess {excess.max()}"
    # the looked-up rows are exactly those torch's gradient can touch
    used = sorted(set(idx.tolist()) - {padding_idx})
    assert g.rows.tolist() == used
    if weighted:
        scale = np.abs(G[np.searchsorted(offsets, np.arange(n), "right") - 1]).sum(1) * \
            np.abs(w[idx]).sum(1)
        np.testing.assert_array_less(np.abs(result[1] - expected_psw), 8 * eps * scale + 1e-30)


@needs_torch
def test_bag_scale_by_freq_close_to_torch_where_torch_is_right(dtype, rng):
    """Every index occurs once: torch's wrong-count bug (#190063) cannot show."""
    V, D = 50, 4
    idx = rng.permutation(V)[:30]
    offsets = np.array([0, 10, 10, 22])
    w = rng.standard_normal((V, D)).astype(dtype)
    G = rng.standard_normal((4, D)).astype(dtype)
    for mode in ("sum", "mean"):
        g = fastemb.embedding_bag_backward(G, idx, w, offsets=offsets, mode=mode,
                                           scale_grad_by_freq=True)
        expected, _ = torch_bag_grads(w, idx, G, offsets, mode, sgbf=True)
        assert_ulp(g.to_dense(), expected, 2, mode)


def test_per_sample_weights_grad_weighted_mean_finite_difference(rng):
    V, D, n = 10, 5, 14
    idx = rng.integers(0, V, n)
    offsets = np.array([0, 4, 4, 9])
    w = rng.standard_normal((V, D))
    G = rng.standard_normal((4, D))
    psw = rng.uniform(0.2, 2.0, n)
    _, pg = fastemb.embedding_bag_backward(G, idx, w, offsets=offsets, mode="mean",
                                           per_sample_weights=psw, padding_idx=3)

    def loss(p):
        return float(np.sum(fastemb.embedding_bag(idx, w, offsets=offsets, mode="mean",
                                                  per_sample_weights=p, padding_idx=3) * G))

    h = 1e-6
    numeric = np.empty(n)
    for k in range(n):
        up, down = psw.copy(), psw.copy()
        up[k] += h
        down[k] -= h
        numeric[k] = (loss(up) - loss(down)) / (2 * h)
    np.testing.assert_allclose(pg, numeric, rtol=1e-6, atol=1e-7)
    assert np.all(pg[idx == 3] == 0)


def test_weight_gradient_weighted_mean_finite_difference(rng):
    V, D, n = 6, 3, 10
    idx = rng.integers(0, V, n)
    offsets = np.array([0, 3, 7])
    w = rng.standard_normal((V, D))
    G = rng.standard_normal((3, D))
    psw = rng.uniform(0.2, 2.0, n)
    g = fastemb.embedding_bag_backward(G, idx, w, offsets=offsets, mode="mean",
                                       per_sample_weights=psw)[0].to_dense()
    h = 1e-6
    for r in range(V):
        for d in range(D):
            up, down = w.copy(), w.copy()
            up[r, d] += h
            down[r, d] -= h
            numeric = (np.sum(fastemb.embedding_bag(idx, up, offsets=offsets, mode="mean",
                                                    per_sample_weights=psw) * G)
                       - np.sum(fastemb.embedding_bag(idx, down, offsets=offsets, mode="mean",
                                                      per_sample_weights=psw) * G)) / (2 * h)
            assert abs(g[r, d] - numeric) < 1e-6, (r, d)


def test_bag_backward_copies_grad_output():
    G = G27.copy()
    g = fastemb.embedding_bag_backward(G, I6, W5, offsets=[0, 2, 2], mode="sum")
    G[:] = -1
    assert g.to_dense().tolist()[0] == [1, 10]


def test_bag_backward_validation():
    with pytest.raises(ValueError):
        fastemb.embedding_bag_backward(np.ones((2, 2), np.float32), I6, W5, offsets=[0, 2, 2])
    with pytest.raises(ValueError):
        fastemb.embedding_bag_backward(np.ones((3, 2), np.float64), I6, W5, offsets=[0, 2, 2])
    with pytest.raises(ValueError):
        fastemb.embedding_bag_backward(np.ones((2, 2), np.float32), I6, W5, offsets=[0, 3],
                                       mode="max", scale_grad_by_freq=True)
    with pytest.raises(IndexError):
        fastemb.embedding_bag_backward(np.ones((1, 2), np.float32), [0, 5], W5, offsets=[0])


# --------------------------------------------------------------------------------------------
# Module API
# --------------------------------------------------------------------------------------------


def test_module_backward_returns_and_accumulates(rng):
    m = fastemb.EmbeddingBag(20, 3, mode="mean", seed=1)
    x1, x2 = rng.integers(0, 20, 8), rng.integers(0, 20, 6)
    G1, G2 = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal(
        (3, 3)).astype(np.float32)
    m(x1, offsets=[0, 5])
    first = m.backward(G1)
    m(x2, offsets=[0, 2, 2])
    second = m.backward(G2)
    ref1 = fastemb.embedding_bag_backward(G1, x1, m.weight, offsets=[0, 5], mode="mean")
    ref2 = fastemb.embedding_bag_backward(G2, x2, m.weight, offsets=[0, 2, 2], mode="mean")
    assert_bitwise(first.to_dense(), ref1.to_dense())
    assert_bitwise(second.to_dense(), ref2.to_dense())
    assert m.grad.rows.tolist() == sorted(set(x1.tolist()) | set(x2.tolist()))
    assert_bitwise(m.grad.to_dense(), ref1.to_dense() + ref2.to_dense())
    m.zero_grad()
    assert m.grad is None


def test_module_backward_matches_functional_embedding(rng):
    m = fastemb.Embedding(10, 4, padding_idx=0, scale_grad_by_freq=True, dtype=np.float64,
                          seed=3)
    x = rng.integers(0, 10, (3, 5))
    out = m(x)
    G = rng.standard_normal(out.shape)
    g = m.backward(G)
    ref = fastemb.embedding_backward(G, x, 10, padding_idx=0, scale_grad_by_freq=True)
    assert g.rows.tolist() == ref.rows.tolist() and 0 not in g.rows.tolist()
    assert_bitwise(g.values, ref.values)
    assert m.grad is not None and m.grad.rows.tolist() == g.rows.tolist()


def test_module_psw_grad_attribute(rng):
    m = fastemb.EmbeddingBag(10, 3, mode="sum", seed=0)
    x = rng.integers(0, 10, 7)
    psw = rng.standard_normal(7).astype(np.float32)
    m(x, offsets=[0, 3], per_sample_weights=psw)
    G = rng.standard_normal((2, 3)).astype(np.float32)
    m.backward(G)
    _, ref = fastemb.embedding_bag_backward(G, x, m.weight, offsets=[0, 3], mode="sum",
                                            per_sample_weights=psw)
    assert m.per_sample_weights_grad.shape == (7,)
    assert_bitwise(m.per_sample_weights_grad, ref)
    # 2-D input: the psw gradient has the input's shape
    m(x[:6].reshape(2, 3), per_sample_weights=psw[:6].reshape(2, 3))
    m.backward(G)
    assert m.per_sample_weights_grad.shape == (2, 3)


@pytest.mark.parametrize("make", [lambda: fastemb.Embedding(5, 2, seed=0),
                                  lambda: fastemb.EmbeddingBag(5, 2, mode="sum", seed=0)])
def test_module_backward_errors(make):
    m = make()
    bag = isinstance(m, fastemb.EmbeddingBag)
    call = (lambda: m([[1, 2], [3, 3]])) if bag else (lambda: m([1, 2]))
    with pytest.raises(RuntimeError):
        m.backward(np.ones((2, 2), np.float32))  # no forward
    out = call()
    m.backward(np.ones_like(out))
    with pytest.raises(RuntimeError):
        m.backward(np.ones_like(out))  # twice for one forward
    for bad in (np.ones((3, 2), np.float32), np.ones((2, 2), np.float64),
                np.ones((2, 2, 1), np.float32), np.ones((2, 2), np.int64)):
        call()  # a fresh forward each time (see the test below for retrying after an error)
        with pytest.raises(ValueError):
            m.backward(bad)
    # only the one successful backward is in module.grad
    assert m.grad.values.tolist() == ([[1, 1], [1, 1], [2, 2]] if bag else [[1, 1], [1, 1]])


@pytest.mark.parametrize("make", [lambda: fastemb.Embedding(5, 2, seed=0),
                                  lambda: fastemb.EmbeddingBag(5, 2, mode="sum", seed=0)])
def test_rejected_grad_output_leaves_the_forward_usable(make):
    """A ValueError for a bad grad_output changes nothing: module.grad stays as it was and the
    forward can still be backpropagated with a correct grad_output."""
    m = make()
    bag = isinstance(m, fastemb.EmbeddingBag)
    out = m([[1, 2], [3, 3]]) if bag else m([1, 2])
    with pytest.raises(ValueError):
        m.backward(np.ones((3, 2), np.float32))
    assert m.grad is None
    g = m.backward(np.ones_like(out))
    assert g.nnz > 0


def test_frozen_module_backward_raises():
    vectors = np.ones((4, 2), np.float32)
    m = fastemb.Embedding.from_pretrained(vectors)
    assert m.frozen
    out = m([1, 2])
    with pytest.raises(RuntimeError):
        m.backward(np.ones_like(out))
    assert m.grad is None
    b = fastemb.EmbeddingBag.from_pretrained(vectors, mode="sum")
    out = b([[1, 2]])
    with pytest.raises(RuntimeError):
        b.backward(np.ones_like(out))
    trainable = fastemb.Embedding.from_pretrained(vectors, freeze=False)
    assert not trainable.frozen
    out = trainable([1, 1])
    assert trainable.backward(np.ones_like(out)).values.tolist() == [[2, 2]]


def test_module_grad_output_mutation_after_backward(rng):
    m = fastemb.EmbeddingBag(10, 3, mode="mean", seed=0)
    m(rng.integers(0, 10, 6), offsets=[0, 2])
    G = np.ones((2, 3), np.float32)
    g = m.backward(G)
    G[:] = 1000  # after backward, before the (lazy) values are read
    assert np.all(np.abs(g.values) <= 1)
    assert np.all(np.abs(m.grad.values) <= 1)


def test_module_backward_uses_the_renormed_rows_for_max_mode():
    w = np.array([[3, 4], [0.3, 0.1], [0, 0]], np.float32)
    m = fastemb.EmbeddingBag.from_pretrained(w, freeze=False, mode="max", max_norm=1.0)
    m([[0, 1]])
    # after renorm row 0 = [0.6, 0.8]: column 0 won by row 0, column 1 by row 0
    g = m.backward(np.array([[1, 2]], np.float32))
    assert g.to_dense().tolist() == [[1, 2], [0, 0], [0, 0]]


def _bag_module_case():
    m = fastemb.EmbeddingBag(10, 3, mode="mean", seed=0)
    x = np.array([1, 2, 3, 4, 5, 6])
    offsets = np.array([0, 3])
    psw = np.array([1, 2, 3, 4, 5, 6], np.float32)
    return m, x, offsets, psw


@pytest.mark.parametrize("mutate", ["input", "offsets", "per_sample_weights", "output"])
def test_mutating_forward_arrays_before_backward_does_not_change_the_gradient(mutate):
    """The forward keeps what its backward needs: a caller reusing its input, offsets or
    per-sample-weight buffers, or updating the returned output in place (``out += bias``),
    between forward and backward must not change the gradient (torch raises instead of
    silently using the new values)."""
    m, x, offsets, psw = _bag_module_case()
    m(x, offsets, psw)
    G = np.ones((2, 3), np.float32)
    expected = m.backward(G)
    expected_psw = m.per_sample_weights_grad.copy()

    m, x, offsets, psw = _bag_module_case()
    out = m(x, offsets, psw)
    if mutate == "input":
        x[:] = 0
    elif mutate == "offsets":
        offsets[1] = 5
    elif mutate == "per_sample_weights":
        psw[:] = 100
    else:
        out += 100
    g = m.backward(G)
    assert g.rows.tolist() == expected.rows.tolist()
    assert_bitwise(g.values, expected.values, "weight grad")
    assert_bitwise(m.per_sample_weights_grad, expected_psw, "psw grad")


def test_mutating_embedding_input_before_backward_does_not_change_the_gradient():
    m = fastemb.Embedding(10, 2, seed=0)
    x = np.array([1, 2, 3])
    m(x)
    x[:] = 9
    g = m.backward(np.ones((3, 2), np.float32))
    assert g.rows.tolist() == [1, 2, 3]


@pytest.mark.parametrize("layout", ["fortran", "strided", "read-only", "memmap"])
def test_bag_backward_any_weight_layout(layout, rng, tmp_path):
    W = rng.standard_normal((50, 4)).astype(np.float32)
    if layout == "fortran":
        other = np.asfortranarray(W)
    elif layout == "strided":
        other = np.repeat(W, 2, axis=0)[::2]
    elif layout == "read-only":
        other = W.copy()
        other.flags.writeable = False
    else:
        other = np.lib.format.open_memmap(tmp_path / "w.npy", mode="w+", dtype=np.float32,
                                          shape=W.shape)
        other[...] = W
        other.flush()
        other = np.load(tmp_path / "w.npy", mmap_mode="r")
    x = rng.integers(0, 50, 30)
    offsets = [0, 5, 5, 20]
    psw = rng.uniform(0, 1, 30).astype(np.float32)
    G = rng.standard_normal((4, 4)).astype(np.float32)
    for mode in ("sum", "mean", "max"):
        p = None if mode == "max" else psw
        a = fastemb.embedding_bag_backward(G, x, W, offsets, mode, p, padding_idx=3)
        b = fastemb.embedding_bag_backward(G, x, other, offsets, mode, p, padding_idx=3)
        if p is None:
            a, b = (a, None), (b, None)
        assert a[0].rows.tolist() == b[0].rows.tolist()
        assert_bitwise(b[0].values, a[0].values, mode)
        if p is not None:
            assert_bitwise(b[1], a[1], mode + " psw")
    m = fastemb.EmbeddingBag.from_pretrained(other, freeze=False, mode="sum")
    m(x, offsets, psw)
    assert m.backward(G).rows.tolist() == sorted(set(x.tolist()))


def test_grad_output_in_any_layout(rng):
    idx = rng.integers(0, 9, (6, 4))
    G = rng.standard_normal((6, 4, 3)).astype(np.float32)
    a = fastemb.embedding_backward(G, idx, 9)
    b = fastemb.embedding_backward(np.asfortranarray(G), idx, 9)
    c = fastemb.embedding_backward(np.repeat(G, 2, axis=2)[:, :, ::2], idx, 9)
    assert_bitwise(b.values, a.values)
    assert_bitwise(c.values, a.values)


def test_huge_num_embeddings_groups_rows_correctly(rng):
    """Row ids of 40 bits need four radix passes; the grouping must stay stable."""
    V = 10**12
    idx = rng.integers(0, V, 3000)
    idx[::7] = idx[0]
    idx[5::11] = idx[3]
    idx[1::13] = V - 1
    G = rng.standard_normal((3000, 3)).astype(np.float32)
    g = fastemb.embedding_backward(G, idx, V)
    rows, values = embedding_grad_ref(idx, G, V)
    assert g.rows.tolist() == rows.tolist()
    assert_bitwise(g.values, values)


@pytest.mark.parametrize("num_embeddings", [1, 2, 10_000, (1 << 14) + 1, 1 << 22])
def test_many_lookups_group_rows_correctly(rng, threads, num_embeddings):
    """From 65,536 entries the radix sort takes digits of up to 14 bits (a 10,000-row table in
    one pass, 2^14 + 1 rows in two of 8 bits, 2^22 in two of 11): rows, their stable grouping
    and the payload it carries match a stable argsort, with padding, on 1 and 2 threads."""
    from fastemb._kernels import kernels
    idx = rng.integers(0, num_embeddings, 70_000)
    idx[::5] = num_embeddings - 1
    payload = rng.integers(0, 1 << 20, idx.size)
    padding = num_embeddings // 2 if num_embeddings > 1 else -1
    kept = np.flatnonzero(idx != padding)
    by_row = kept[np.argsort(idx[kept], kind="stable")]
    expected_rows, expected_starts = np.unique(idx[by_row], return_index=True)
    for count in (1, 2):
        with threads(count):
            rows, starts, order = kernels.group_by_row(idx, num_embeddings, padding, count)
            carried = kernels.group_by_row(idx, num_embeddings, padding, count, payload)[2]
        assert rows.tolist() == expected_rows.tolist()
        assert starts.tolist() == expected_starts.tolist() + [by_row.size]
        assert order.tolist() == by_row.tolist()
        assert carried.tolist() == payload[by_row].tolist()


def test_sparse_grad_constructor_validation():
    with pytest.raises(ValueError):
        fastemb.SparseGrad([3, 1], np.ones((2, 2), np.float32), 5)  # unsorted
    with pytest.raises(ValueError):
        fastemb.SparseGrad([1, 1], np.ones((2, 2), np.float32), 5)  # duplicate
    with pytest.raises(ValueError):
        fastemb.SparseGrad([1, 5], np.ones((2, 2), np.float32), 5)  # out of range
    with pytest.raises(ValueError):
        fastemb.SparseGrad([1], np.ones((2, 2), np.float32), 5)  # count mismatch
    with pytest.raises(TypeError):
        fastemb.SparseGrad([1], np.ones((1, 2), np.int32), 5)
    empty = fastemb.SparseGrad([], np.zeros((0, 2), np.float32), 5)
    assert empty.nnz == 0 and empty.rows.dtype == np.int64
    merged = empty + fastemb.SparseGrad([2], np.ones((1, 2), np.float32), 5)
    assert merged.rows.tolist() == [2] and merged.values.tolist() == [[1, 1]]


# --------------------------------------------------------------------------------------------
# Thread-count invariance and memory
# --------------------------------------------------------------------------------------------


def _all_backwards(idx, offsets, w, G, psw, G_emb):
    results = []
    for mode, weighted, sgbf in CASES:
        r = fastemb.embedding_bag_backward(G, idx, w, offsets=offsets, mode=mode,
                                           per_sample_weights=psw if weighted else None,
                                           padding_idx=7, scale_grad_by_freq=sgbf)
        if weighted:
            results += [r[0].rows, r[0].values, r[1]]
        else:
            results += [r.rows, r.values]
    e = fastemb.embedding_backward(G_emb, idx, w.shape[0], padding_idx=7)
    s = fastemb.embedding_backward(G_emb, idx, w.shape[0], scale_grad_by_freq=True)
    return results + [e.rows, e.values, s.rows, s.values]


def test_backward_bitwise_identical_for_any_thread_count(rng, thread_count):
    V, D, n, B = 3000, 16, 24000, 4000
    idx = rng.zipf(1.3, n) % V  # skewed: some rows are very frequent
    offsets = np.concatenate([[0], np.sort(rng.integers(0, n + 1, B - 1))])
    w = rng.standard_normal((V, D)).astype(np.float32)
    G = rng.standard_normal((B, D)).astype(np.float32)
    psw = rng.uniform(-1, 1, n).astype(np.float32)
    G_emb = rng.standard_normal((n, D)).astype(np.float32)
    thread_count(1)
    one = _all_backwards(idx, offsets, w, G, psw, G_emb)
    for threads in (2, 3):
        thread_count(threads)
        other = _all_backwards(idx, offsets, w, G, psw, G_emb)
        for k, (a, b) in enumerate(zip(one, other)):
            assert a.dtype == b.dtype and a.shape == b.shape, k
            assert a.tobytes() == b.tobytes(), f"result {k} differs: 1 vs {threads} threads"


def test_backward_memory_is_proportional_to_lookups():
    V, D = 2_000_000, 8
    table_bytes = V * D * 4
    m = fastemb.EmbeddingBag.from_pretrained(np.zeros((V, D), np.float32), freeze=False,
                                             mode="mean")
    e = fastemb.Embedding.from_pretrained(np.zeros((V, D), np.float32), freeze=False)
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, 100)
    tracemalloc.start()
    try:
        m(x, offsets=np.arange(0, 100, 10))
        g = m.backward(np.ones((10, D), np.float32))
        g.values
        e(x.reshape(10, 10))
        e.backward(np.ones((10, 10, D), np.float32)).values
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < table_bytes / 100, f"backward peak {peak} bytes for a {table_bytes}-byte table"
