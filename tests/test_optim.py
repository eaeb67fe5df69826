"""Lazy optimizers (fastemb.optim): SGD, Adagrad, RowWiseAdagrad, LazyAdam.

Each is checked step by step against a NumPy reference (bit for bit, with the gradient that
``embedding_grad_ref`` / ``bag_grad_ref`` produce) and, where torch has the same optimizer,
against torch 2.13 (nn.Embedding with sparse=True, whose gradient fastemb reproduces exactly).
Also: state_dict round trips, validation, thread-count invariance, memory, doctests.
"""

import doctest
import re
import tracemalloc

import numpy as np
import pytest

import fastemb
import fastemb.backward
import fastemb.checkpoint
import fastemb.optim
import fastemb.sparse

from reference_training import (
    adagrad_step_ref,
    assert_bitwise,
    bag_grad_ref,
    embedding_grad_ref,
    lazy_adam_step_ref,
    rowwise_adagrad_step_ref,
    sgd_step_ref,
)

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
# torch warns that it skips sparse invariant checks when it builds the sparse gradient
quiet_torch_sparse = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

OPTIMIZERS = {
    "sgd": lambda m: fastemb.optim.SGD(m, lr=0.3),
    "adagrad": lambda m: fastemb.optim.Adagrad(m, lr=0.2, lr_decay=0.05,
                                               initial_accumulator_value=0.1),
    "rowwise": lambda m: fastemb.optim.RowWiseAdagrad(m, lr=0.2),
    "adam": lambda m: fastemb.optim.LazyAdam(m, lr=0.05),
    "adam_max": lambda m: fastemb.optim.LazyAdam(m, lr=0.05, betas=(0.8, 0.99), eps=1e-6,
                                                 maximize=True),
    # L2 weight decay (lazy: the looked-up rows only)
    "sgd_decay": lambda m: fastemb.optim.SGD(m, lr=0.3, weight_decay=0.7),
    "adagrad_decay": lambda m: fastemb.optim.Adagrad(m, lr=0.2, lr_decay=0.05,
                                                     initial_accumulator_value=0.1,
                                                     weight_decay=0.3),
    "rowwise_decay": lambda m: fastemb.optim.RowWiseAdagrad(m, lr=0.2, weight_decay=0.3),
    "adam_max_decay": lambda m: fastemb.optim.LazyAdam(m, lr=0.05, betas=(0.8, 0.99), eps=1e-6,
                                                       maximize=True, weight_decay=0.3),
}
WEIGHT_DECAY = {"sgd_decay": 0.7, "adagrad_decay": 0.3, "rowwise_decay": 0.3,
                "adam_max_decay": 0.3}


def test_every_registered_optimizer_is_tested_here_with_and_without_decay():
    made = [make(fastemb.Embedding(3, 2)) for make in OPTIMIZERS.values()]
    for info in fastemb.optim.OPTIMIZERS.values():
        decays = {opt.hyperparameters["weight_decay"] > 0 for opt in made
                  if type(opt) is info.cls}
        assert decays == {False, True}, f"{info.name} lacks a configuration in OPTIMIZERS"


def snapshot(optimizer):
    """Deep copy of weights, steps and state arrays of every module of an optimizer."""
    return [(m.weight.copy(), {k: (v.copy() if isinstance(v, np.ndarray) else v)
                               for k, v in optimizer.state[m].items()})
            for m in optimizer.modules]


def assert_same_snapshot(a, b):
    assert len(a) == len(b)
    for (wa, sa), (wb, sb) in zip(a, b):
        assert_bitwise(wa, wb, "weight")
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], np.ndarray):
                assert_bitwise(sa[key], sb[key], key)
            else:
                assert sa[key] == sb[key], key


# --------------------------------------------------------------------------------------------
# Validation (torch-semantics §3.1, §5 row 62)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=0.0), "Invalid learning rate: 0.0"),
    (dict(lr=-1e-3), "Invalid learning rate: -0.001"),
    (dict(eps=0.0), "Invalid epsilon value: 0.0"),
    (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(-0.1, 0.999)), "Invalid beta parameter at index 0: -0.1"),
    (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
])
def test_lazy_adam_validation(kwargs, message):
    m = fastemb.Embedding(3, 2, seed=0)
    with pytest.raises(ValueError, match=re.escape(message)):
        fastemb.optim.LazyAdam(m, **kwargs)


def test_lazy_adam_accepts_beta_zero():
    m = fastemb.Embedding(3, 2, seed=0)
    fastemb.optim.LazyAdam(m, betas=(0.0, 0.0))


@pytest.mark.parametrize("make", [
    lambda m: fastemb.optim.SGD(m, lr=-0.1),
    lambda m: fastemb.optim.Adagrad(m, lr=-0.1),
    lambda m: fastemb.optim.Adagrad(m, lr_decay=-0.1),
    lambda m: fastemb.optim.Adagrad(m, eps=-1.0),
    lambda m: fastemb.optim.Adagrad(m, initial_accumulator_value=-1.0),
    lambda m: fastemb.optim.RowWiseAdagrad(m, lr=-0.1),
    lambda m: fastemb.optim.RowWiseAdagrad(m, eps=-1.0),
])
def test_other_optimizers_validate(make):
    with pytest.raises(ValueError, match="Invalid"):
        make(fastemb.Embedding(3, 2, seed=0))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_arrays_are_cache_line_aligned_before_and_after_a_reload(name, dtype):
    # a 64-float row then spans 4 cache lines, not 5 (NumPy's own arrays start 16 bytes in)
    module = fastemb.EmbeddingBag(50, 16, mode="sum", dtype=dtype, seed=0)
    optimizer = OPTIMIZERS[name](module)
    module(np.array([[1, 2, 2]])); module.backward(np.ones((1, 16), dtype)); optimizer.step()
    saved = optimizer.state_dict()
    optimizer.load_state_dict(saved)
    for array_name in optimizer.state_arrays:
        array = optimizer.state[module][array_name]
        assert array.ctypes.data % 64 == 0 and array.flags.c_contiguous and array.flags.writeable
        assert_bitwise(array, saved["state"][0][array_name])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_rejects_read_only_or_non_contiguous_weight(name):
    weight = np.ones((4, 3), np.float32)
    weight.flags.writeable = False
    with pytest.raises(ValueError):
        OPTIMIZERS[name](fastemb.Embedding.from_pretrained(weight, freeze=False))
    fortran = np.asfortranarray(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError):
        OPTIMIZERS[name](fastemb.Embedding.from_pretrained(fortran, freeze=False))
    strided = np.ones((8, 3), np.float32)[::2]
    with pytest.raises(ValueError):
        OPTIMIZERS[name](fastemb.EmbeddingBag.from_pretrained(strided, freeze=False))


# --------------------------------------------------------------------------------------------
# Worked examples (§5 rows 64, 65; §3.2 Adagrad example)
# --------------------------------------------------------------------------------------------


def _module_with_grad(weight, indices, grad_rows):
    m = fastemb.Embedding.from_pretrained(weight, freeze=False)
    m(np.asarray(indices))
    m.backward(np.asarray(grad_rows, dtype=weight.dtype))
    return m


def test_row65_sparse_adam_example():
    m = _module_with_grad(np.ones((4, 2), np.float32), [0, 2, 0],
                          [[1, 1], [2, 2], [3, 3]])
    opt = fastemb.optim.LazyAdam(m, lr=0.1)
    opt.step()
    state = opt.state[m]
    assert state["step"] == 1
    np.testing.assert_array_equal(m.weight[[0, 2]], np.float32(0.9000000358))
    np.testing.assert_array_equal(m.weight[[1, 3]], 1)
    np.testing.assert_allclose(state["exp_avg"][0], 0.4, rtol=1e-6)
    np.testing.assert_allclose(state["exp_avg_sq"][0], 0.016, rtol=1e-6)
    np.testing.assert_allclose(state["exp_avg"][2], 0.2, rtol=1e-6)
    assert not state["exp_avg"][[1, 3]].any() and not state["exp_avg_sq"][[1, 3]].any()
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}


def test_adagrad_sums_duplicates_before_squaring():
    m = _module_with_grad(np.ones((4, 1), np.float64), [0, 2, 0], [[1], [2], [3]])
    opt = fastemb.optim.Adagrad(m, lr=0.1)
    opt.step()
    assert opt.state[m]["sum"][:, 0].tolist() == [16, 0, 4, 0]
    assert set(opt.state[m]) == {"step", "sum"}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_row64_empty_gradient_advances_step_only(name):
    m = fastemb.Embedding(6, 3, padding_idx=2, seed=0)
    opt = OPTIMIZERS[name](m)
    m([2, 2])  # only padding: nnz = 0
    m.backward(np.ones((2, 3), np.float32))
    assert m.grad.nnz == 0
    before = snapshot(opt)
    opt.step()
    after = snapshot(opt)
    assert after[0][1]["step"] == before[0][1]["step"] + 1
    after[0][1]["step"] -= 1
    assert_same_snapshot(before, after)


def test_module_without_grad_is_skipped_entirely():
    a, b = fastemb.Embedding(5, 2, seed=0), fastemb.Embedding(5, 2, seed=1)
    opt = fastemb.optim.LazyAdam([a, b], lr=0.1)
    a([1])
    a.backward(np.ones((1, 2), np.float32))
    b_before = b.weight.copy()
    opt.step()
    assert opt.state[a]["step"] == 1 and opt.state[b]["step"] == 0
    assert_bitwise(b.weight, b_before)
    assert not opt.state[b]["exp_avg"].any()


def test_step_keeps_grad_and_zero_grad_drops_it():
    a, b = fastemb.Embedding(5, 2, seed=0), fastemb.EmbeddingBag(5, 2, seed=1)
    opt = fastemb.optim.SGD([a, b], lr=0.1)
    a([1, 3])
    ga = a.backward(np.ones((2, 2), np.float32))
    b([[0, 4]])
    b.backward(np.ones((1, 2), np.float32))
    opt.step()
    assert a.grad is ga and a.grad.rows.tolist() == [1, 3]
    assert b.grad is not None
    w = a.weight.copy()
    opt.step()  # same gradient applied again
    np.testing.assert_allclose(a.weight[[1, 3]], w[[1, 3]] - np.float32(0.1), rtol=1e-6)
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    w = a.weight.copy()
    opt.step()
    assert_bitwise(a.weight, w)


def test_step_rejects_gradient_of_another_table():
    m = fastemb.Embedding(5, 2, seed=0)
    opt = fastemb.optim.SGD(m, lr=0.1)
    m.grad = fastemb.SparseGrad([0], np.ones((1, 3), np.float32), 5)
    w = m.weight.copy()
    with pytest.raises(ValueError):
        opt.step()
    assert_bitwise(m.weight, w)


# --------------------------------------------------------------------------------------------
# Step by step against the NumPy reference (bitwise)
# --------------------------------------------------------------------------------------------


def reference_step(name, weight, state, rows, g, step):
    decay = WEIGHT_DECAY.get(name, 0.0)
    name = name.removesuffix("_decay")
    if name == "sgd":
        sgd_step_ref(weight, rows, g, lr=0.3, weight_decay=decay)
    elif name == "adagrad":
        adagrad_step_ref(weight, state["sum"], rows, g, step, lr=0.2, lr_decay=0.05,
                         weight_decay=decay)
    elif name == "rowwise":
        rowwise_adagrad_step_ref(weight, state["sum"], rows, g, lr=0.2, weight_decay=decay)
    elif name == "adam":
        lazy_adam_step_ref(weight, state["exp_avg"], state["exp_avg_sq"], rows, g, step,
                           lr=0.05, weight_decay=decay)
    else:
        lazy_adam_step_ref(weight, state["exp_avg"], state["exp_avg_sq"], rows, g, step,
                           lr=0.05, betas=(0.8, 0.99), eps=1e-6, maximize=True,
                           weight_decay=decay)


def initial_reference_state(name, shape, dtype):
    name = name.removesuffix("_decay")
    if name == "adagrad":
        return {"sum": np.full(shape, 0.1, dtype)}
    if name == "rowwise":
        return {"sum": np.zeros((shape[0], 1), dtype)}
    if name.startswith("adam"):
        return {"exp_avg": np.zeros(shape, dtype), "exp_avg_sq": np.zeros(shape, dtype)}
    return {}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_embedding_steps_match_reference(name, dtype, rng):
    V, D = 30, 5
    m = fastemb.Embedding(V, D, padding_idx=4, dtype=dtype, seed=7)
    opt = OPTIMIZERS[name](m)
    weight = m.weight.copy()
    state = initial_reference_state(name, weight.shape, dtype)
    untouched = set(range(V))
    for step in range(1, 6):
        idx = rng.integers(0, 12, (4, 6))  # rows >= 12 are never touched
        G = rng.standard_normal((4, 6, D)).astype(dtype)
        m(idx)
        m.backward(G)
        opt.step()
        opt.zero_grad()
        rows, g = embedding_grad_ref(idx, G, V, padding_idx=4)
        reference_step(name, weight, state, rows, g, step)
        untouched -= set(rows.tolist())
        assert_bitwise(m.weight, weight, f"{name} weight at step {step}")
        for key, array in state.items():
            assert_bitwise(opt.state[m][key], array, f"{name} {key} at step {step}")
        assert opt.state[m]["step"] == step
    assert 4 in untouched and 20 in untouched
    assert not m.weight[4].any()  # the padding row never moves


@pytest.mark.parametrize("name", ["adagrad", "rowwise", "adam_max", "adam_max_decay"])
@pytest.mark.parametrize("mode, weighted, sgbf", [("mean", True, False), ("max", False, False),
                                                  ("sum", False, True), ("mean", False, True)])
def test_bag_steps_match_reference(name, dtype, mode, weighted, sgbf, rng):
    V, D, n = 25, 4, 40
    m = fastemb.EmbeddingBag(V, D, mode=mode, scale_grad_by_freq=sgbf, dtype=dtype, seed=3)
    opt = OPTIMIZERS[name](m)
    weight = m.weight.copy()
    state = initial_reference_state(name, weight.shape, dtype)
    for step in range(1, 4):
        idx = rng.integers(0, V, n)
        offsets = np.concatenate([[0], np.sort(rng.integers(0, n + 1, 7))])
        psw = rng.uniform(0.1, 2, n).astype(dtype) if weighted else None
        G = rng.standard_normal((8, D)).astype(dtype)
        rows, g = bag_grad_ref(weight, idx, G, offsets, mode, psw, scale_grad_by_freq=sgbf)
        m(idx, offsets=offsets, per_sample_weights=psw)
        m.backward(G)
        opt.step()
        opt.zero_grad()
        reference_step(name, weight, state, rows, g, step)
        assert_bitwise(m.weight, weight, f"{name} weight at step {step}")
        for key, array in state.items():
            assert_bitwise(opt.state[m][key], array, f"{name} {key} at step {step}")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_rows_absent_from_gradient_are_bit_identical(name, rng):
    m = fastemb.Embedding(50, 3, seed=0)
    opt = OPTIMIZERS[name](m)
    for _ in range(3):
        m(rng.integers(0, 50, 10))
        m.backward(rng.standard_normal((10, 3)).astype(np.float32))
        opt.step()
        opt.zero_grad()
    before = snapshot(opt)
    idx = np.array([3, 9, 3])
    m(idx)
    m.backward(rng.standard_normal((3, 3)).astype(np.float32))
    opt.step()
    after = snapshot(opt)
    others = np.setdiff1d(np.arange(50), idx)
    assert_bitwise(after[0][0][others], before[0][0][others], "weights of other rows")
    for key, value in before[0][1].items():
        if isinstance(value, np.ndarray):
            assert_bitwise(after[0][1][key][others], value[others], key)
    assert (after[0][0][[3, 9]] != before[0][0][[3, 9]]).any()


def _grad_kinds(rng, V=40, D=6, n=60):
    """{kind: (make a module, run one forward + backward on it)}."""
    idx = rng.integers(0, V, n)
    offsets = np.concatenate([[0], np.sort(rng.integers(0, n + 1, 9))])
    psw = rng.uniform(0.1, 2, n).astype(np.float32)
    G_bag = rng.standard_normal((10, D)).astype(np.float32)
    G_emb = rng.standard_normal((n, D)).astype(np.float32)

    def lookup(m):
        m(idx)
        m.backward(G_emb)

    def bags(m):
        m(idx, offsets, psw if m.mode == "mean" else None)
        m.backward(G_bag)

    return {
        "embedding_sgbf": (lambda: fastemb.Embedding(V, D, scale_grad_by_freq=True, seed=1),
                           lookup),
        "bag_mean_psw": (lambda: fastemb.EmbeddingBag(V, D, mode="mean", seed=1), bags),
        "bag_sum_sgbf": (lambda: fastemb.EmbeddingBag(V, D, mode="sum", padding_idx=0,
                                                      scale_grad_by_freq=True, seed=1), bags),
        "bag_max": (lambda: fastemb.EmbeddingBag(V, D, mode="max", seed=1), bags),
    }


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_step_equals_step_on_materialised_values(name, rng):
    """The optimizer may fuse the gradient's accumulation into its update; the result must be
    what it gets from the materialised ``values``, and from a merged (a + b) gradient."""
    for kind, (make, run) in _grad_kinds(rng).items():
        lazy, eager = make(), make()
        opt_lazy, opt_eager = OPTIMIZERS[name](lazy), OPTIMIZERS[name](eager)
        for _ in range(2):
            run(lazy)
            run(eager)
            eager.grad.values  # materialise before the step
            opt_lazy.step()
            opt_eager.step()
            opt_lazy.zero_grad()
            opt_eager.zero_grad()
            assert_same_snapshot(snapshot(opt_lazy), snapshot(opt_eager))


def test_step_after_two_backwards_uses_the_summed_gradient(rng):
    a, b = fastemb.Embedding(20, 3, seed=0), fastemb.Embedding(20, 3, seed=0)
    opt_a, opt_b = fastemb.optim.LazyAdam(a, lr=0.1), fastemb.optim.LazyAdam(b, lr=0.1)
    x1, x2 = rng.integers(0, 20, 5), rng.integers(0, 20, 5)
    G1, G2 = (rng.standard_normal((5, 3)).astype(np.float32) for _ in range(2))
    a(x1)
    a.backward(G1)
    a(x2)
    a.backward(G2)
    total = fastemb.embedding_backward(G1, x1, 20) + fastemb.embedding_backward(G2, x2, 20)
    b.grad = total
    opt_a.step()
    opt_b.step()
    assert_same_snapshot(snapshot(opt_a), snapshot(opt_b))


# --------------------------------------------------------------------------------------------
# Against torch, step by step, with duplicate indices (nn.Embedding: identical gradients)
# --------------------------------------------------------------------------------------------


def _torch_run(dtype, make_torch_opt, make_fast_opt, steps, rng, V=40, D=6, coalesced=True,
               weight_decay=0.0):
    """Train a torch nn.Embedding and a fastemb Embedding side by side.

    With ``coalesced`` torch's optimizer gets the sparse gradient built from torch's *dense*
    embedding gradient restricted to the looked-up rows (bitwise what fastemb computes), so
    only the optimizer arithmetic is compared; torch's own ``coalesce()`` of a sparse=True
    gradient sums duplicates in an unspecified order. Without it, torch gets the raw
    uncoalesced sparse=True gradient. ``weight_decay`` is added to torch's gradient as the
    maths of lazy L2 decay says, ``g + wd * w`` on the looked-up rows (torch's sparse
    optimizers have no weight_decay of their own).
    """
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    initial = rng.standard_normal((V, D)).astype(dtype)
    temb = torch.nn.Embedding(V, D, sparse=not coalesced,
                              _weight=torch.from_numpy(initial.copy()), dtype=tdtype)
    topt = make_torch_opt([temb.weight])
    m = fastemb.Embedding.from_pretrained(initial.copy(), freeze=False)
    opt = make_fast_opt(m)
    budget = np.zeros((V, D))  # sum over steps of |w| + |update|: scales weight tolerances
    for step in range(steps):
        idx = rng.integers(0, 15, (6, 5))  # many duplicates
        G = rng.standard_normal((6, 5, D)).astype(dtype)
        temb(torch.from_numpy(idx)).backward(torch.from_numpy(G))
        if coalesced:
            rows = torch.from_numpy(np.unique(idx))
            values = temb.weight.grad[rows]
            if weight_decay:
                values = values + weight_decay * temb.weight.detach()[rows]
            temb.weight.grad = torch.sparse_coo_tensor(rows[None], values, (V, D)).coalesce()
        topt.step()
        topt.zero_grad()
        step_tracking_changes(m, opt, idx, G, budget)
    return m, opt, temb, topt, budget


def step_tracking_changes(module, optimizer, indices, grad_output, budget):
    """One fastemb training step; adds ``|w| + |update|`` to ``budget``, the scale of the
    weight tolerances against torch."""
    before = module.weight.astype(np.float64)
    module(indices)
    module.backward(grad_output)
    optimizer.step()
    optimizer.zero_grad()
    budget += np.abs(before) + np.abs(module.weight - before)


def assert_weights_close(ours, theirs, budget, ulps_per_step):
    """torch's ``add_(x, alpha)`` is a fused multiply-add and its sqrt is not correctly
    rounded; fastemb rounds ``alpha * x`` first and uses IEEE sqrt. Each step may thus differ
    by a few ulps of the magnitudes involved (|w| + |update|), and steps compound."""
    eps = np.finfo(ours.dtype).eps
    excess = np.abs(ours.astype(np.float64) - theirs) - ulps_per_step * eps * budget
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, (f"at {worst}: {ours[worst]!r} vs {theirs[worst]!r}, "
                               f"budget {ulps_per_step * eps * budget[worst]:.3g}")


@needs_torch
@quiet_torch_sparse
@pytest.mark.parametrize("dtype, max_ulp", [(np.float32, 2), (np.float64, 2)])
@pytest.mark.parametrize("maximize", [False, True])
def test_lazy_adam_matches_torch_sparse_adam(dtype, max_ulp, maximize, rng):
    m, opt, temb, topt, budget = _torch_run(
        dtype,
        lambda p: torch.optim.SparseAdam(p, lr=0.05, betas=(0.85, 0.995), eps=1e-7,
                                         maximize=maximize),
        lambda mod: fastemb.optim.LazyAdam(mod, lr=0.05, betas=(0.85, 0.995), eps=1e-7,
                                           maximize=maximize),
        6, rng)
    tstate = topt.state[temb.weight]
    assert opt.state[m]["step"] == int(tstate["step"]) == 6
    # the moments involve no sqrt and no fused add: bitwise equal
    assert_bitwise(opt.state[m]["exp_avg"], tstate["exp_avg"].numpy(), "exp_avg")
    assert_bitwise(opt.state[m]["exp_avg_sq"], tstate["exp_avg_sq"].numpy(), "exp_avg_sq")
    assert_weights_close(m.weight, temb.weight.detach().numpy(), budget, max_ulp)
    # rows 15.. were never in a gradient: untouched in both
    assert not opt.state[m]["exp_avg"][15:].any()


@needs_torch
@quiet_torch_sparse
def test_lazy_adam_weight_decay_matches_sparse_adam_on_decayed_gradients(dtype, rng):
    m, opt, temb, topt, budget = _torch_run(
        dtype, lambda p: torch.optim.SparseAdam(p, lr=0.05),
        lambda mod: fastemb.optim.LazyAdam(mod, lr=0.05, weight_decay=0.2), 6, rng,
        weight_decay=0.2)
    tstate = topt.state[temb.weight]
    assert_weights_close(opt.state[m]["exp_avg"], tstate["exp_avg"].numpy(), budget, 4)
    assert_weights_close(m.weight, temb.weight.detach().numpy(), budget, 4)
    assert not opt.state[m]["exp_avg"][15:].any()


@needs_torch
@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_weight_decay_matches_torch_when_every_row_is_looked_up(name, dtype, rng):
    """Lazy decay equals torch's dense ``weight_decay`` when each step touches every row."""
    V, D = 12, 5
    initial = rng.standard_normal((V, D)).astype(dtype)
    weight = torch.from_numpy(initial.copy()).requires_grad_()
    make = {"sgd": (torch.optim.SGD, fastemb.optim.SGD, {"lr": 0.3}),
            "adagrad": (torch.optim.Adagrad, fastemb.optim.Adagrad, {"lr": 0.2})}[name]
    topt = make[0]([weight], weight_decay=0.25, **make[2])
    m = fastemb.Embedding.from_pretrained(initial.copy(), freeze=False)
    opt = make[1](m, weight_decay=0.25, **make[2])
    budget = np.zeros((V, D))
    for _ in range(5):
        idx = np.concatenate([np.arange(V), rng.integers(0, V, 7)])
        G = rng.standard_normal((idx.size, D)).astype(dtype)
        torch.nn.functional.embedding(torch.from_numpy(idx), weight).backward(
            torch.from_numpy(G))
        topt.step()
        topt.zero_grad()
        step_tracking_changes(m, opt, idx, G, budget)
    assert_weights_close(m.weight, weight.detach().numpy(), budget, 4)


def test_weight_decay_shrinks_only_the_looked_up_rows():
    m = fastemb.Embedding(6, 3, seed=0)
    before = m.weight.copy()
    opt = fastemb.optim.SGD(m, lr=0.5, weight_decay=0.2)
    m([1, 4])
    m.backward(np.zeros((2, 3), np.float32))
    opt.step()
    np.testing.assert_array_equal(m.weight[[0, 2, 3, 5]], before[[0, 2, 3, 5]])
    expected = before[[1, 4]] + np.float32(-0.5) * (np.float32(0.2) * before[[1, 4]])
    np.testing.assert_array_equal(m.weight[[1, 4]], expected)


@pytest.mark.parametrize("make", [fastemb.optim.SGD, fastemb.optim.Adagrad,
                                  fastemb.optim.RowWiseAdagrad, fastemb.optim.LazyAdam])
def test_weight_decay_is_validated(make):
    with pytest.raises(ValueError, match="weight_decay"):
        make(fastemb.Embedding(3, 2), lr=0.1, weight_decay=-1.0)
    assert make(fastemb.Embedding(3, 2), lr=0.1).hyperparameters["weight_decay"] == 0.0


@needs_torch
@quiet_torch_sparse
def test_adagrad_matches_torch(dtype, rng):
    m, opt, temb, topt, budget = _torch_run(
        dtype,
        lambda p: torch.optim.Adagrad(p, lr=0.2, lr_decay=0.1, initial_accumulator_value=0.3,
                                      eps=1e-9),
        lambda mod: fastemb.optim.Adagrad(mod, lr=0.2, lr_decay=0.1,
                                          initial_accumulator_value=0.3, eps=1e-9),
        5, rng)
    tstate = topt.state[temb.weight]
    assert opt.state[m]["step"] == int(tstate["step"]) == 5
    assert_bitwise(opt.state[m]["sum"], tstate["sum"].numpy(), "sum")
    assert_weights_close(m.weight, temb.weight.detach().numpy(), budget, 2)


@needs_torch
@quiet_torch_sparse
def test_sgd_matches_torch(dtype, rng):
    m, opt, temb, topt, budget = _torch_run(dtype, lambda p: torch.optim.SGD(p, lr=0.3),
                                            lambda mod: fastemb.optim.SGD(mod, lr=0.3), 5, rng)
    assert_weights_close(m.weight, temb.weight.detach().numpy(), budget, 1)


@needs_torch
@quiet_torch_sparse
def test_sgd_close_to_torch_with_uncoalesced_gradient(dtype, rng):
    m, opt, temb, topt, budget = _torch_run(dtype, lambda p: torch.optim.SGD(p, lr=0.3),
                                            lambda mod: fastemb.optim.SGD(mod, lr=0.3), 5,
                                            rng, coalesced=False)
    # torch adds duplicate entries one by one, fastemb adds the coalesced sum: a few ulps of
    # the gradient's magnitude apart at most
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(m.weight, temb.weight.detach().numpy(), rtol=0, atol=200 * eps)
    assert_bitwise(m.weight[15:], temb.weight.detach().numpy()[15:], "untouched rows")


# --------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# --------------------------------------------------------------------------------------------


def _train(modules, opt, rng, steps):
    for _ in range(steps):
        for m in modules:
            if isinstance(m, fastemb.EmbeddingBag):
                m(rng.integers(0, m.num_embeddings, (4, 3)))
                m.backward(rng.standard_normal((4, m.embedding_dim)).astype(m.weight.dtype))
            else:
                m(rng.integers(0, m.num_embeddings, 7))
                m.backward(rng.standard_normal((7, m.embedding_dim)).astype(m.weight.dtype))
        opt.step()
        opt.zero_grad()


def _pair(name):
    modules = [fastemb.Embedding(30, 4, seed=1), fastemb.EmbeddingBag(20, 3, mode="sum",
                                                                      dtype=np.float64, seed=2)]
    return modules, OPTIMIZERS[name](modules)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_continues_identically(name):
    modules, opt = _pair(name)
    _train(modules, opt, np.random.default_rng(0), 3)
    saved = opt.state_dict()
    weights = [m.weight.copy() for m in modules]
    _train(modules, opt, np.random.default_rng(1), 3)

    fresh, fresh_opt = _pair(name)
    for m, w in zip(fresh, weights):
        m.weight[...] = w
    fresh_opt.load_state_dict(saved)
    _train(fresh, fresh_opt, np.random.default_rng(1), 3)
    assert_same_snapshot(snapshot(fresh_opt), snapshot(opt))
    assert fresh_opt.state_dict()["hyperparameters"] == opt.state_dict()["hyperparameters"]


def test_state_dict_is_a_copy():
    modules, opt = _pair("adam")
    _train(modules, opt, np.random.default_rng(0), 2)
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"][...] = 123
    saved["state"][0]["step"] = 99
    assert opt.state[modules[0]]["step"] == 2
    assert not (opt.state[modules[0]]["exp_avg"] == 123).any()
    # and loading copies too
    opt.load_state_dict(saved)
    saved["state"][0]["exp_avg"][...] = -1
    assert (opt.state[modules[0]]["exp_avg"] == 123).all()


def _bad_state_dicts(saved):
    import copy

    def edit(fn):
        d = copy.deepcopy(saved)
        fn(d)
        return d

    return {
        "wrong shape": edit(lambda d: d["state"][0].__setitem__(
            "exp_avg", np.zeros((31, 4), np.float32))),
        "wrong dtype": edit(lambda d: d["state"][1].__setitem__(
            "exp_avg_sq", d["state"][1]["exp_avg_sq"].astype(np.float32))),
        "missing key": edit(lambda d: d["state"][1].pop("exp_avg")),
        "extra key": edit(lambda d: d["state"][0].__setitem__("sum", np.zeros((30, 4),
                                                                               np.float32))),
        "too few modules": edit(lambda d: d["state"].pop()),
        "too many modules": edit(lambda d: d["state"].append(d["state"][0])),
        "negative step": edit(lambda d: d["state"][0].__setitem__("step", -1)),
        "float step": edit(lambda d: d["state"][0].__setitem__("step", 1.5)),
        "no hyperparameters": edit(lambda d: d.pop("hyperparameters")),
        "no state": edit(lambda d: d.pop("state")),
    }


@pytest.mark.parametrize("case", ["wrong shape", "wrong dtype", "missing key", "extra key",
                                  "too few modules", "too many modules", "negative step",
                                  "float step", "no hyperparameters", "no state"])
def test_load_state_dict_rejects_and_changes_nothing(case):
    modules, opt = _pair("adam")
    _train(modules, opt, np.random.default_rng(0), 2)
    other_modules, other = _pair("adam")
    _train(other_modules, other, np.random.default_rng(5), 3)
    bad = _bad_state_dicts(other.state_dict())[case]
    before = snapshot(opt)
    hyper = opt.state_dict()["hyperparameters"]
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    assert_same_snapshot(before, snapshot(opt))
    assert opt.state_dict()["hyperparameters"] == hyper


def test_load_state_dict_with_invalid_hyperparameters_changes_nothing():
    modules, opt = _pair("adam")
    _train(modules, opt, np.random.default_rng(0), 2)
    bad = opt.state_dict()
    bad["hyperparameters"]["lr"] = 0.0
    for state in bad["state"]:
        state["step"] = 50
    before = snapshot(opt)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.load_state_dict(bad)
    assert_same_snapshot(before, snapshot(opt))


# --------------------------------------------------------------------------------------------
# Threads, memory, doctests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_steps_bitwise_identical_for_any_thread_count(name, thread_count):
    def run(threads):
        thread_count(threads)
        rng = np.random.default_rng(42)
        bag = fastemb.EmbeddingBag(5000, 16, mode="mean", seed=0)
        emb = fastemb.Embedding(5000, 16, scale_grad_by_freq=True, seed=1)
        opt = OPTIMIZERS[name]([bag, emb])
        for _ in range(2):
            idx = rng.zipf(1.3, 12000) % 5000
            offsets = np.concatenate([[0], np.sort(rng.integers(0, 12001, 2999))])
            psw = rng.uniform(0.1, 1, 12000).astype(np.float32)
            bag(idx, offsets, psw)
            bag.backward(rng.standard_normal((3000, 16)).astype(np.float32))
            emb(idx)
            emb.backward(rng.standard_normal((12000, 16)).astype(np.float32))
            opt.step()
            opt.zero_grad()
        return snapshot(opt)

    assert_same_snapshot(run(1), run(2))


def test_lazy_adam_step_memory_is_proportional_to_lookups():
    V, D = 2_000_000, 8
    table_bytes = V * D * 4
    m = fastemb.EmbeddingBag.from_pretrained(np.zeros((V, D), np.float32), freeze=False,
                                             mode="sum")
    opt = fastemb.optim.LazyAdam(m, lr=0.1)  # its own zeros state, allocated here
    x = np.random.default_rng(0).integers(0, V, 100)
    tracemalloc.start()
    try:
        m(x, offsets=np.arange(0, 100, 5))
        m.backward(np.ones((20, D), np.float32))
        opt.step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < table_bytes / 100, f"peak {peak} bytes for a {table_bytes}-byte table"
    assert np.count_nonzero(m.weight.any(axis=1)) == np.unique(x).size


@pytest.mark.parametrize("module", [fastemb.backward, fastemb.sparse, fastemb.optim,
                                    fastemb.checkpoint], ids=lambda m: m.__name__)
def test_doctests(module):
    result = doctest.testmod(module, verbose=False, report=True)
    assert result.attempted > 0
    assert result.failed == 0
