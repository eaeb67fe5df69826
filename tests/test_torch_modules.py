"""``fastemb.torch``: the torch modules against torch's ``nn.Embedding`` / ``nn.EmbeddingBag``
(forward and sparse backward), torch's sparse optimizers on them, the fused optimizer against
fastemb's NumPy path (bit for bit), shared memory, gradients through dense layers, bad input,
torch staying optional, and the DLRM example. Skipped when torch is not installed.
"""

import doctest
import subprocess
import sys

import numpy as np
import pytest
from reference import assert_same_bits, out_of_range

import fastemb

torch = pytest.importorskip("torch")
import fastemb.torch as ft  # noqa: E402  (after the skip)
from fastemb.torch import _arrays, autograd, collection, dlrm, modules  # noqa: E402

V, D = 20, 5
TORCH_INDEX_DTYPES = {np.int32: torch.int32, np.int64: torch.int64}


def twin_bags(rng, dtype, **options):
    """(ours, torch's nn.EmbeddingBag), trainable, with equal starting weights; torch's with
    sparse gradients, except in max mode, where torch has only dense ones."""
    weight = rng.standard_normal((V, D)).astype(dtype)
    ours = ft.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, **options)
    theirs = torch.nn.EmbeddingBag.from_pretrained(
        torch.from_numpy(weight.copy()), freeze=False, sparse=options.get("mode") != "max",
        **options)
    return ours, theirs


def twin_lookups(rng, dtype, **options):
    """(ours, torch's nn.Embedding), trainable, with equal starting weights; torch's with
    sparse gradients, except with scale_grad_by_freq, which torch refuses for them."""
    weight = rng.standard_normal((V, D)).astype(dtype)
    ours = ft.Embedding.from_pretrained(weight.copy(), freeze=False, **options)
    theirs = torch.nn.Embedding.from_pretrained(
        torch.from_numpy(weight.copy()), freeze=False,
        sparse=not options.get("scale_grad_by_freq"), **options)
    return ours, theirs


def dense_grad(module):
    """The module's weight gradient as a dense tensor (ours is always sparse)."""
    grad = module.weight.grad
    if isinstance(module, (ft.Embedding, ft.EmbeddingBag)):
        assert grad.layout == torch.sparse_coo
    return grad.coalesce().to_dense() if grad.is_sparse else grad


# The bag cases: (module options, how the input is given, per-sample weights?)
BAG_CASES = {
    "sum-offsets": ({"mode": "sum"}, "offsets", False),
    "mean-offsets": ({"mode": "mean"}, "offsets", False),
    "max-offsets": ({"mode": "max"}, "offsets", False),
    "sum-2d": ({"mode": "sum"}, "2d", False),
    "mean-2d": ({"mode": "mean"}, "2d", False),
    "max-2d": ({"mode": "max"}, "2d", False),
    "sum-weighted": ({"mode": "sum"}, "offsets", True),
    "sum-weighted-2d": ({"mode": "sum"}, "2d", True),
    "mean-padding": ({"mode": "mean", "padding_idx": 3}, "offsets", False),
    "sum-padding-weighted": ({"mode": "sum", "padding_idx": 3}, "offsets", True),
    "max-padding": ({"mode": "max", "padding_idx": 3}, "2d", False),
    "sum-last-offset": ({"mode": "sum", "include_last_offset": True}, "last-offset", False),
    "mean-last-offset": ({"mode": "mean", "include_last_offset": True}, "last-offset", False),
}


def bag_inputs(rng, form, index_dtype, weighted, dtype):
    """(input, offsets, per_sample_weights) tensors for a bag case; padding row 3 is common."""
    indices = rng.integers(0, V, size=24)
    indices[::5] = 3
    offsets = None
    if form == "2d":
        indices = indices.reshape(6, 4)
    else:
        offsets = np.array([0, 2, 2, 9, 15] + ([24] if form == "last-offset" else []))
    torch_dtype = TORCH_INDEX_DTYPES[index_dtype]
    samples = None
    if weighted:
        samples = torch.from_numpy(rng.standard_normal(indices.shape).astype(dtype))
        samples.requires_grad_(True)
    return (torch.from_numpy(indices).to(torch_dtype),
            None if offsets is None else torch.from_numpy(offsets).to(torch_dtype), samples)


# --------------------------------------------------------------------------------------------
# Forward and backward equal torch's
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("index_dtype", [np.int32, np.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("case", BAG_CASES)
def test_bags_equal_torchs_forward_and_backward(case, index_dtype, dtype, rng):
    options, form, weighted = BAG_CASES[case]
    ours, theirs = twin_bags(rng, dtype, **options)
    input, offsets, samples = bag_inputs(rng, form, index_dtype, weighted, dtype)
    their_samples = None if samples is None else samples.detach().clone().requires_grad_(True)
    out = ours(input, offsets, samples)
    expected = theirs(input, offsets, their_samples)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected)
    grad_output = torch.from_numpy(rng.standard_normal(tuple(out.shape)).astype(dtype))
    out.backward(grad_output)
    expected.backward(grad_output)
    rows = ours.weight.grad._indices()[0]
    assert (rows.diff() > 0).all() and ours.weight.grad.dtype == ours.weight.dtype  # coalesced
    torch.testing.assert_close(dense_grad(ours), dense_grad(theirs))
    if weighted:
        torch.testing.assert_close(samples.grad, their_samples.grad)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True], ids=["", "scaled"])
@pytest.mark.parametrize("padding_idx", [None, 3, -2])
def test_lookups_equal_torchs_forward_and_backward(padding_idx, scale_grad_by_freq, index_dtype,
                                                   dtype, rng):
    ours, theirs = twin_lookups(rng, dtype, padding_idx=padding_idx,
                                scale_grad_by_freq=scale_grad_by_freq)
    indices = rng.integers(0, V, size=(4, 6))
    indices[0] = 3
    indices[1, :2] = V - 2
    input = torch.from_numpy(indices).to(TORCH_INDEX_DTYPES[index_dtype])
    out, expected = ours(input), theirs(input)
    assert out.shape == (4, 6, D)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad_output = torch.from_numpy(rng.standard_normal((4, 6, D)).astype(dtype))
    out.backward(grad_output)
    expected.backward(grad_output)
    torch.testing.assert_close(dense_grad(ours), dense_grad(theirs))
    if padding_idx is not None:
        assert not dense_grad(ours)[padding_idx].any()


def test_the_weight_gradient_is_coalesced_and_lists_exactly_the_looked_up_rows(rng):
    bags, _ = twin_bags(rng, np.float32, mode="sum", padding_idx=0)
    out = bags(torch.tensor([[7, 0, 2], [2, 2, 0]]))
    # (read with autograd.grad: torch's AccumulateGrad drops the coalesced flag of a sparse
    # gradient it keeps, though its indices stay sorted and unique)
    grad, = torch.autograd.grad(out, bags.weight, torch.ones_like(out))
    assert grad.is_coalesced()
    assert grad.indices().tolist() == [[2, 7]] and grad.values()[:, 0].tolist() == [3.0, 1.0]


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_two_forwards_before_their_backwards(mode, rng):
    ours, theirs = twin_bags(rng, np.float32, mode=mode)
    first, second = torch.tensor([[1, 2, 3], [4, 4, 5]]), torch.tensor([[5, 9], [1, 1]])
    grad_first, grad_second = torch.randn(2, D), torch.randn(2, D)
    for module in (ours, theirs):
        out_first, out_second = module(first), module(second)
        out_second.backward(grad_second)  # (the second forward's backward first)
        out_first.backward(grad_first)
    torch.testing.assert_close(dense_grad(ours), dense_grad(theirs))


def test_no_grad_forward_equals_the_recorded_one(rng):
    bags, _ = twin_bags(rng, np.float32, mode="mean")
    input = torch.from_numpy(rng.integers(0, V, size=(8, 3)))
    with torch.no_grad():
        plain = bags(input)
    recorded = bags(input)
    assert plain.grad_fn is None and recorded.grad_fn is not None
    assert_same_bits(plain.numpy(), recorded.detach().numpy())


@pytest.mark.parametrize("table_dtype", ["float16", "bfloat16"])
def test_sixteen_bit_tables(table_dtype, rng):
    weight = rng.standard_normal((V, D)).astype(np.float32).astype(
        _arrays.numpy_dtype(getattr(torch, table_dtype)))
    bags = ft.EmbeddingBag.from_pretrained(weight, freeze=False, mode="sum")
    lookups = ft.Embedding.from_pretrained(weight, freeze=False)
    assert bags.weight.dtype == getattr(torch, table_dtype)
    input = torch.from_numpy(rng.integers(0, V, size=(6, 3)))
    out = bags(input)
    assert out.dtype == torch.float32  # (a 16-bit table's bags are float32)
    assert_same_bits(out.detach().numpy(), fastemb.embedding_bag(input.numpy(), weight,
                                                                 mode="sum"))
    rows = lookups(input)
    assert rows.dtype == bags.weight.dtype
    assert_same_bits(_arrays.to_numpy(rows, "rows"), weight[input.numpy()])
    out.sum().backward()
    rows.sum().backward()
    for module in (bags, lookups):
        assert module.weight.grad.dtype == module.weight.dtype
        torch.testing.assert_close(
            dense_grad(module).float(),
            torch.from_numpy(np.bincount(input.numpy().ravel(), minlength=V)).float()[:, None]
            .expand(V, D))


# --------------------------------------------------------------------------------------------
# Training: torch's sparse optimizers on our weight; the fused optimizer
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["SparseAdam", "Adagrad", "SGD"])
def test_a_torch_sparse_optimizer_trains_ours_as_it_trains_torchs(optimizer, rng):
    ours, theirs = twin_bags(rng, np.float32, mode="mean")
    optimizers = [getattr(torch.optim, optimizer)(module.parameters(), lr=0.05)
                  for module in (ours, theirs)]
    # (opting out of torch's sparse invariant checks explicitly, as they are by default,
    # silences the warning Adagrad's step gives for them)
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        for step in range(5):
            input = torch.from_numpy(rng.integers(0, V // 2, size=(16, 3)))
            target = torch.from_numpy(rng.standard_normal((16, D)).astype(np.float32))
            for module, opt in zip((ours, theirs), optimizers):
                opt.zero_grad()
                torch.nn.functional.mse_loss(module(input), target).backward()
                opt.step()
    assert not torch.equal(ours.weight, torch.from_numpy(ours.table.weight * 0))  # (trained)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.weight[V // 2:], theirs.weight[V // 2:])  # rows never looked up


@pytest.mark.parametrize("name", sorted(fastemb.optim.OPTIMIZERS))
@pytest.mark.parametrize("kind", ["bag", "lookup"])
def test_fused_optimizer_equals_fastembs_numpy_path_bit_for_bit(name, kind, rng):
    cls = fastemb.optim.OPTIMIZERS[name].cls
    weight = rng.standard_normal((V, D)).astype(np.float32)
    if kind == "bag":
        table = fastemb.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode="mean")
        ours = ft.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode="mean")
    else:
        table = fastemb.Embedding.from_pretrained(weight.copy(), freeze=False)
        ours = ft.Embedding.from_pretrained(weight.copy(), freeze=False)
    numpy_optimizer = cls(table, lr=0.05)
    fused = ours.fuse_optimizer(cls, lr=0.05)
    assert ours.fused_optimizer is fused
    for step in range(4):
        indices = rng.integers(0, V // 2, size=(8, 3))
        grad_output = rng.standard_normal(indices.shape[:1 if kind == "bag" else 2] + (D,))
        grad_output = grad_output.astype(np.float32)
        table(indices)
        table.backward(grad_output)
        numpy_optimizer.step()
        table.zero_grad()
        ours(torch.from_numpy(indices)).backward(torch.from_numpy(grad_output))
        assert ours.weight.grad is None
    assert_same_bits(ours.weight.detach().numpy(), table.weight)
    assert not np.array_equal(table.weight, weight)  # (it trained)
    for state_name in numpy_optimizer.state_arrays:
        assert_same_bits(fused.state[ours.table][state_name],
                         numpy_optimizer.state[table][state_name])


def test_fused_optimizer_leaves_the_tables_own_gradient_alone(rng):
    bags = ft.EmbeddingBag(V, D, mode="sum", seed=0)
    bags.fuse_optimizer(fastemb.optim.SGD, lr=0.1)
    kept = fastemb.SparseGrad([1], np.ones((1, D), np.float32), V)
    bags.table.grad = kept
    bags(torch.tensor([[2]])).sum().backward()
    assert bags.table.grad is kept


def test_unfused_module_trains_again_with_torchs_optimizer(rng):
    bags = ft.EmbeddingBag(V, D, mode="sum", seed=0)
    bags.fuse_optimizer(fastemb.optim.SGD, lr=0.1)
    bags.fused_optimizer = None
    bags(torch.tensor([[2, 4]])).sum().backward()
    assert bags.weight.grad.coalesce().indices().tolist() == [[2, 4]]


# --------------------------------------------------------------------------------------------
# Shared memory
# --------------------------------------------------------------------------------------------

def assert_shared(module):
    """Writing through the parameter is seen by the NumPy table and the other way round."""
    weight, table = module.weight, module.table.weight
    assert weight.data_ptr() == table.ctypes.data
    with torch.no_grad():
        weight[1] = 3
    assert (table[1].astype(np.float32) == 3).all()
    table[2] = 5
    assert (weight[2] == 5).all()


@pytest.mark.parametrize("table_dtype", ["float32", "float64", "float16", "bfloat16"])
def test_weight_shares_memory_with_the_numpy_table(table_dtype):
    numpy_dtype = _arrays.numpy_dtype(getattr(torch, table_dtype))
    built = ft.EmbeddingBag(V, D, dtype=getattr(torch, table_dtype), seed=0)
    assert built.table.weight.dtype == numpy_dtype
    table = fastemb.Embedding(V, D, dtype=numpy_dtype, seed=0)
    wrapped = ft.Embedding.from_numpy(table)
    assert wrapped.table is table
    pretrained = torch.zeros(V, D, dtype=getattr(torch, table_dtype))
    from_tensor = ft.EmbeddingBag.from_pretrained(pretrained)
    assert from_tensor.weight.data_ptr() == pretrained.data_ptr()
    for module in (built, wrapped, from_tensor):
        assert_shared(module)


def test_a_fused_step_is_seen_through_the_parameter():
    bags = ft.EmbeddingBag(V, D, mode="sum", seed=0)
    bags.fuse_optimizer(fastemb.optim.SGD, lr=1.0)
    before = bags.weight.detach().clone()
    bags(torch.tensor([[6]])).sum().backward()
    torch.testing.assert_close(bags.weight[6], before[6] - 1)


def test_the_table_follows_a_replaced_parameter(rng):
    bags = ft.EmbeddingBag(V, D, mode="sum", seed=0)
    expected = bags(torch.tensor([[1, 2]])).double()
    bags.double()
    assert bags.table.weight.dtype == np.float64
    assert_shared(bags)
    bags.load_state_dict({"weight": torch.ones(V, D, dtype=torch.float64)}, assign=True)
    assert bags(torch.tensor([[1, 2]])).tolist() == [[2.0] * D]
    assert expected.dtype == torch.float64


def test_from_pretrained_freezes_like_torch():
    frozen = ft.EmbeddingBag.from_pretrained(torch.ones(V, D), mode="sum")
    assert not frozen.weight.requires_grad
    samples = torch.ones(2, requires_grad=True)
    frozen(torch.tensor([1, 2]), torch.tensor([0]), samples).sum().backward()
    assert frozen.weight.grad is None
    assert samples.grad.tolist() == [D, D]


# --------------------------------------------------------------------------------------------
# Gradients through dense layers before and after
# --------------------------------------------------------------------------------------------

def test_gradients_flow_through_dense_layers_before_and_after(rng):
    ours, theirs = twin_bags(rng, np.float32, mode="sum")
    before, after = torch.nn.Linear(4, 1), torch.nn.Linear(D, 2)
    copies = [torch.nn.Linear(4, 1), torch.nn.Linear(D, 2)]
    for original, copy in zip((before, after), copies):
        copy.load_state_dict(original.state_dict())
    input = torch.from_numpy(rng.integers(0, V, size=12))
    offsets = torch.tensor([0, 5, 5, 8])
    features = torch.from_numpy(rng.standard_normal((12, 4)).astype(np.float32))
    for bags, (first, last) in ((ours, (before, after)), (theirs, copies)):
        samples = first(features)[:, 0]  # per-sample weights from a dense layer
        last(torch.tanh(bags(input, offsets, samples))).square().sum().backward()
    for original, copy in zip((before, after), copies):
        assert original.weight.grad.abs().sum() > 0
        torch.testing.assert_close(original.weight.grad, copy.weight.grad)
        torch.testing.assert_close(original.bias.grad, copy.bias.grad)
    torch.testing.assert_close(dense_grad(ours), dense_grad(theirs))


# --------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing changed
# --------------------------------------------------------------------------------------------

def test_out_of_range_index_raises_and_changes_nothing(untouched):
    bags = ft.EmbeddingBag(5, 3, mode="sum", max_norm=0.5, seed=0)
    with untouched(bags.table.weight):
        with pytest.raises(IndexError, match=out_of_range("[1, 0]", 7)):
            bags(torch.tensor([[0, 1], [7, 2]]))
    lookups = ft.Embedding(5, 3, seed=0)
    with pytest.raises(IndexError, match=out_of_range("[2]", -1)):
        lookups(torch.tensor([0, 1, -1]))


@pytest.mark.parametrize("call, error, message", [
    (lambda m: m(torch.tensor([[0.5, 1.0]])), TypeError, "input must hold integers"),
    (lambda m: m([[0, 1]]), TypeError, "input must be a torch.Tensor, got list"),
    (lambda m: m(torch.tensor([0, 1]), torch.tensor([1])), ValueError, "offsets"),
    (lambda m: m(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(3)), ValueError,
     "per_sample_weights"),
    (lambda m: m(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(2, dtype=torch.float64)),
     (TypeError, ValueError), "per_sample_weights"),
    (lambda m: m(torch.zeros(2, 2, dtype=torch.int64, device="meta")), ValueError,
     "input is on meta; fastemb.torch runs on CPU tensors"),
    (lambda m: m(torch.tensor([[0, 1]]).to_sparse()), ValueError, "dense tensor"),
])
def test_bad_input_raises_a_clear_error(call, error, message):
    bags = ft.EmbeddingBag(5, 3, mode="sum", seed=0)
    with pytest.raises(error, match=message):
        call(bags)


def test_max_with_per_sample_weights_is_refused():
    bags = ft.EmbeddingBag(5, 3, mode="max", seed=0)
    with pytest.raises(ValueError, match="max"):
        bags(torch.tensor([[0, 1]]), per_sample_weights=torch.ones(1, 2))


def test_bad_modules_and_optimizers_are_refused():
    with pytest.raises(ValueError, match="split"):
        ft.EmbeddingBag.from_numpy(fastemb.EmbeddingBag(5, 3, split=True))
    with pytest.raises(TypeError, match="wraps a fastemb.EmbeddingBag, got Embedding"):
        ft.EmbeddingBag.from_numpy(fastemb.Embedding(5, 3))
    with pytest.raises(TypeError, match="dtype must be"):
        ft.Embedding(5, 3, dtype=torch.int32)
    bags = ft.EmbeddingBag(5, 3, seed=0)
    with pytest.raises(TypeError, match="fastemb.optim"):
        bags.fuse_optimizer(torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        bags.fuse_optimizer(fastemb.optim.LazyAdam, lr=-1.0)
    assert bags.fused_optimizer is None


# --------------------------------------------------------------------------------------------
# torch stays optional; the doctests
# --------------------------------------------------------------------------------------------

def test_import_fastemb_does_not_import_torch():
    subprocess.run([sys.executable, "-c",
                    "import fastemb, sys; assert 'torch' not in sys.modules"], check=True)


def test_fastemb_torch_without_torch_says_how_to_get_it():
    blocked = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch'] = None; import fastemb.torch"],
        capture_output=True, text=True)
    assert blocked.returncode != 0
    assert "ImportError: fastemb.torch needs torch: pip install torch==2.13.0" in blocked.stderr


def test_torch_inside_the_subpackage_is_the_real_torch():
    assert modules.torch is torch and autograd.torch is torch and dlrm.torch is torch
    assert fastemb.torch is ft


@pytest.mark.parametrize("module", [ft, modules, autograd, _arrays, collection, dlrm],
                         ids=lambda m: m.__name__)
def test_doctests(module):
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0


# --------------------------------------------------------------------------------------------
# The DLRM example
# --------------------------------------------------------------------------------------------

SMALL_DLRM = {"num_tables": 4, "dim": 8, "max_rows": 300, "bottom": (16,), "top": (16,)}


@pytest.mark.parametrize("optimizer, lr", [("adagrad", 0.1), ("lazyadam", 0.01)])
def test_dlrm_loss_goes_down_alike_with_every_sparse_part(optimizer, lr):
    curves = {}
    for embeddings in dlrm.SPARSE_PARTS:
        model, optimizers, data = dlrm.build(embeddings, optimizer=optimizer, lr=lr,
                                             **SMALL_DLRM)
        curves[embeddings] = np.array(dlrm.train(model, optimizers, data, 60, 256)[0])
    ours = curves["fastemb"]
    # the collection and the per-table modules run the same kernels and the same update
    np.testing.assert_array_equal(ours, curves["fastemb-per-table"])
    np.testing.assert_allclose(ours[:10], curves["torch"][:10], rtol=1e-5)
    assert ours[-10:].mean() < ours[:10].mean() - 0.05, ours


@pytest.mark.parametrize("part", ["fastemb", "fastemb-per-table", "torch"])
def test_dlrm_sparse_part_gives_each_tables_row(part):
    tables = dlrm.initial_tables([4, 9, 2], 3)
    sparse, _ = dlrm.SPARSE_PARTS[part](tables, "sgd", 0.1)
    embeddings = sparse(torch.tensor([[0, 8, 1], [3, 0, 0]]))
    assert embeddings.shape == (2, 3, 3)
    assert np.array_equal(embeddings[0, 1].detach().numpy(), tables[1][8])
    assert np.array_equal(embeddings[1, 0].detach().numpy(), tables[0][3])


def test_dlrm_torch_sparse_part_needs_a_torch_twin():
    with pytest.raises(ValueError, match="torch has no optimizer"):
        dlrm.torch_sparse_part(dlrm.initial_tables([4], 3), "rowwise-adagrad", 0.1)


def test_dlrm_command_line():
    run = subprocess.run(
        [sys.executable, "-m", "fastemb.torch.dlrm", "--steps", "4", "--batch-size", "32",
         "--tables", "3", "--dim", "4", "--max-rows", "50", "--log-every", "2",
         "--warmup-steps", "1",
         "--bottom-mlp", "8", "--top-mlp", "", "--optimizer", "rowwise-adagrad"],
        capture_output=True, text=True, check=True)
    assert run.stdout.count("ms/step") == 2 and "time per step" in run.stdout
