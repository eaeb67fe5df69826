"""``fastemb.torch.EmbeddingBagCollection``: forward and sparse backward equal torch's
``nn.EmbeddingBag`` per feature, and fastemb's NumPy collection bit for bit; the fused
optimizer equals the NumPy collection's optimizer in backward; torch's sparse optimizers train
it; gradients reach the dense layers; shared memory, TorchRec-like input, bad input. Skipped
when torch is not installed.
"""

import numpy as np
import pytest
from reference import assert_same_bits

import fastemb

torch = pytest.importorskip("torch")
import fastemb.torch as ft  # noqa: E402  (after the skip)
from fastemb.torch.collection import as_keyed_jagged  # noqa: E402

B = 5


def configs(dtype=np.float32, pooling=("sum", "mean", "max"), padding_idx=None):
    """Three tables; "items" is read by two features (a shared table)."""
    return [
        fastemb.EmbeddingBagConfig("users", 30, 4, pooling=pooling[0], dtype=dtype),
        fastemb.EmbeddingBagConfig("items", 40, 3, feature_names=["clicked", "bought"],
                                   pooling=pooling[1], padding_idx=padding_idx, dtype=dtype),
        fastemb.EmbeddingBagConfig("genres", 12, 2, pooling=pooling[2], dtype=dtype),
    ]


def random_features(rng, keys=("users", "clicked", "bought", "genres"), weighted=False,
                    dtype=np.float32, index_dtype=np.int64):
    """A KeyedJaggedArray over ``keys`` (empty bags included) with values inside every table
    (the smallest has 12 rows)."""
    lengths = rng.integers(0, 4, size=len(keys) * B)
    lengths[1] = 0
    values = rng.integers(0, 12, size=int(lengths.sum())).astype(index_dtype)
    weights = rng.random(values.size).astype(dtype) if weighted else None
    return fastemb.KeyedJaggedArray(list(keys), values, lengths=lengths, weights=weights)


def torch_twins(module):
    """Per feature: torch's nn.EmbeddingBag on a copy of its table (sparse gradients but for
    max, which torch has only dense), the feature's table name."""
    twins = {}
    for config in module.collection.configs:
        weight = torch.from_numpy(module.embedding_bags[config.name].table.weight.copy())
        table = torch.nn.EmbeddingBag.from_pretrained(
            weight, freeze=False, mode=config.pooling, padding_idx=config.padding_idx,
            sparse=config.pooling != "max")
        for feature in config.feature_names:
            twins[feature] = (table, config.name)
    return twins


def dense(grad):
    return grad.coalesce().to_dense() if grad.is_sparse else grad


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_forward_and_backward_equal_torchs_embedding_bags_per_feature(padding_idx, index_dtype,
                                                                      dtype, rng):
    module = ft.EmbeddingBagCollection(configs(dtype, padding_idx=padding_idx), seed=1)
    features = random_features(rng, index_dtype=index_dtype)
    out = module(features)
    assert out.values.dtype == module.embedding_bags["users"].weight.dtype
    assert out.values.shape == (B, 4 + 3 + 3 + 2)
    grad_output = torch.from_numpy(rng.standard_normal(tuple(out.values.shape)).astype(dtype))
    out.values.backward(grad_output)
    twins = torch_twins(module)
    expected_grads = {}
    for k, name in enumerate(module.feature_names):
        table, table_name = twins[name]
        values, offsets, _ = features[name]
        expected = table(torch.from_numpy(values).long(), torch.from_numpy(offsets[:-1]))
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-6)
        expected.backward(grad_output[:, out.offset_per_key[k]:out.offset_per_key[k + 1]])
        expected_grads[table_name] = table.weight
    for table_name, weight in expected_grads.items():
        ours = module.embedding_bags[table_name].weight.grad
        assert ours.layout == torch.sparse_coo and ours.dtype == weight.dtype
        torch.testing.assert_close(dense(ours), dense(weight.grad))


@pytest.mark.parametrize("weighted", [False, True], ids=["", "weighted"])
def test_forward_and_gradients_equal_the_numpy_collection_bit_for_bit(weighted, dtype, rng):
    pooling = ("sum", "mean", "sum") if weighted else ("sum", "mean", "max")
    module = ft.EmbeddingBagCollection(configs(dtype, pooling), seed=2)
    numpy_twin = fastemb.EmbeddingBagCollection(configs(dtype, pooling), seed=2)
    features = random_features(rng, weighted=weighted, dtype=dtype)
    out, expected = module(features), numpy_twin(features)
    assert_same_bits(out.values.detach().numpy(), expected.values)
    grad_output = rng.standard_normal(expected.values.shape).astype(dtype)
    out.values.backward(torch.from_numpy(grad_output))
    for name, grad in numpy_twin.backward(grad_output).items():
        ours = module.embedding_bags[name].weight.grad.coalesce()
        assert_same_bits(ours.indices()[0].numpy(), grad.rows)
        assert_same_bits(ours.values().numpy(), grad.values)


@pytest.mark.parametrize("name", sorted(fastemb.optim.OPTIMIZERS))
def test_fused_optimizer_equals_the_numpy_optimizer_in_backward_bit_for_bit(name, rng):
    cls = fastemb.optim.OPTIMIZERS[name].cls
    module = ft.EmbeddingBagCollection(configs(), seed=3)
    numpy_twin = fastemb.EmbeddingBagCollection(configs(), seed=3)
    fused = module.fuse_optimizer(cls, lr=0.05)
    numpy_optimizer = cls(numpy_twin, lr=0.05)
    for step in range(4):
        features = random_features(rng)
        grad_output = rng.standard_normal((B, 12)).astype(np.float32)
        numpy_twin(features)
        numpy_twin.backward(grad_output, optimizer=numpy_optimizer)
        module(features).values.backward(torch.from_numpy(grad_output))
    for config in numpy_twin.configs:
        ours = module.embedding_bags[config.name]
        assert ours.weight.grad is None
        assert_same_bits(ours.weight.detach().numpy(), numpy_twin.embedding_bags[config.name].weight)
        for state_name in numpy_optimizer.state_arrays:
            assert_same_bits(fused.state[ours.table][state_name],
                             numpy_optimizer.state[numpy_twin.embedding_bags[config.name]][
                                 state_name])
    assert fused.state  # (it stepped)


def test_two_forwards_before_their_backwards(rng):
    module = ft.EmbeddingBagCollection(configs(), seed=4)
    reference = ft.EmbeddingBagCollection(configs(), seed=4)
    first, second = random_features(rng), random_features(rng)
    grad_first, grad_second = torch.randn(B, 12), torch.randn(B, 12)
    out_first, out_second = module(first), module(second)
    out_second.values.backward(grad_second)  # (the second forward's backward first)
    out_first.values.backward(grad_first)
    reference(first).values.backward(grad_first)
    reference(second).values.backward(grad_second)
    for name, bags in module.embedding_bags.items():
        torch.testing.assert_close(dense(bags.weight.grad),
                                   dense(reference.embedding_bags[name].weight.grad))


def test_no_grad_forward_equals_the_recorded_one(rng):
    module = ft.EmbeddingBagCollection(configs(), seed=5)
    features = random_features(rng)
    with torch.no_grad():
        quiet = module(features).values
    assert not quiet.requires_grad
    assert torch.equal(quiet, module(features).values.detach())


@pytest.mark.parametrize("optimizer", ["SparseAdam", "Adagrad", "SGD"])
def test_a_torch_sparse_optimizer_trains_it_as_it_trains_torchs_bags(optimizer, rng):
    module = ft.EmbeddingBagCollection(configs(pooling=("sum", "mean", "mean")), seed=6)
    twins = torch_twins(module)
    tables = {id(table): table for table, _ in twins.values()}
    ours_opt = getattr(torch.optim, optimizer)(module.parameters(), lr=0.05)
    their_opt = getattr(torch.optim, optimizer)(
        [table.weight for table in tables.values()], lr=0.05)
    for step in range(5):
        features = random_features(rng)
        target = torch.from_numpy(rng.standard_normal((B, 12)).astype(np.float32))
        ours_opt.zero_grad()
        their_opt.zero_grad()
        torch.nn.functional.mse_loss(module(features).values, target).backward()
        theirs = torch.cat([twins[name][0](torch.from_numpy(features[name][0]),
                                           torch.from_numpy(features[name][1][:-1]))
                            for name in module.feature_names], dim=1)
        torch.nn.functional.mse_loss(theirs, target).backward()
        ours_opt.step()
        their_opt.step()
    for name, bags in module.embedding_bags.items():
        table = next(table for table, table_name in twins.values() if table_name == name)
        torch.testing.assert_close(bags.weight, table.weight, rtol=1e-5, atol=1e-6)


def test_gradients_flow_into_the_dense_layers(rng):
    module = ft.EmbeddingBagCollection(configs(), seed=7)
    top = torch.nn.Linear(12, 1)
    features = random_features(rng)
    top(module(features).values).sum().backward()
    assert top.weight.grad is not None and top.weight.grad.abs().sum() > 0
    assert module.embedding_bags["users"].weight.grad is not None


def test_weights_share_memory_with_the_numpy_tables_and_keep_torchrecs_names():
    module = ft.EmbeddingBagCollection(configs(), seed=8)
    assert sorted(module.state_dict()) == [f"embedding_bags.{name}.weight"
                                           for name in ("genres", "items", "users")]
    module.embedding_bags["items"].weight.data[2] = 5.0
    assert (module.collection.embedding_bags["items"].weight[2] == 5.0).all()
    numpy_collection = fastemb.EmbeddingBagCollection(configs(), seed=8)
    wrapped = ft.EmbeddingBagCollection.from_numpy(numpy_collection)
    numpy_collection.embedding_bags["users"].weight[0] = 7.0
    assert (wrapped.embedding_bags["users"].weight[0] == 7.0).all()


class TorchRecLikeFeatures:
    """The methods of TorchRec's KeyedJaggedTensor that the module reads."""

    def __init__(self, features):
        self.features = features

    def keys(self):
        return list(self.features.keys)

    def values(self):
        return torch.from_numpy(self.features.values)

    def offsets(self):
        return torch.from_numpy(self.features.offsets)

    def weights_or_none(self):
        return None


def test_a_torchrec_keyed_jagged_tensor_is_read_as_it_is(rng):
    module = ft.EmbeddingBagCollection(configs(), seed=9)
    features = random_features(rng)
    assert torch.equal(module(TorchRecLikeFeatures(features)).values, module(features).values)
    assert as_keyed_jagged(features) is features


def test_out_of_range_values_raise_and_change_nothing(rng):
    module = ft.EmbeddingBagCollection(configs(), seed=10)
    module.fuse_optimizer(fastemb.optim.SGD, lr=0.1)
    before = {name: bags.weight.detach().clone() for name, bags in module.embedding_bags.items()}
    features = fastemb.KeyedJaggedArray(["users", "clicked", "bought", "genres"],
                                        [1, 2, 3, 12], lengths=[1, 0, 0, 0, 0, 1, 0, 0, 0, 0,
                                                                0, 1, 0, 0, 0, 1, 0, 0, 0, 0])
    with pytest.raises(IndexError, match="genres"):
        module(features)
    for name, bags in module.embedding_bags.items():
        assert torch.equal(bags.weight, before[name])


@pytest.mark.parametrize("call, error, message", [
    (lambda m: m(torch.tensor([1, 2])), TypeError, "KeyedJaggedArray"),
    (lambda m: m(fastemb.KeyedJaggedArray(["users"], [1], lengths=[1])), ValueError,
     "no key 'clicked'"),
    (lambda m: m.fuse_optimizer(torch.optim.SGD, lr=0.1), TypeError, "fastemb.optim"),
    (lambda m: ft.EmbeddingBagCollection.from_numpy(fastemb.EmbeddingBag(3, 2)), TypeError,
     "EmbeddingBagCollection"),
    (lambda m: ft.EmbeddingBagCollection([fastemb.EmbeddingBagConfig("a.b", 3, 2)]),
     ValueError, "must not contain '.'"),
])
def test_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call(ft.EmbeddingBagCollection(configs(), seed=11))


# --------------------------------------------------------------------------------------------
# EmbeddingCollection (unpooled)
# --------------------------------------------------------------------------------------------

def lookup_configs(dtype=np.float32, padding_idx=None):
    """Two tables; "items" is read by two features."""
    return [fastemb.EmbeddingConfig("users", 30, 4, dtype=dtype),
            fastemb.EmbeddingConfig("items", 40, 3, feature_names=["clicked", "bought"],
                                    padding_idx=padding_idx, dtype=dtype)]


LOOKUP_KEYS = ("users", "clicked", "bought")


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_lookups_equal_torchs_embeddings_per_feature(padding_idx, dtype, rng):
    module = ft.EmbeddingCollection(lookup_configs(dtype, padding_idx), seed=12)
    twins = {config.name: torch.nn.Embedding.from_pretrained(
        torch.from_numpy(module.embeddings[config.name].table.weight.copy()), freeze=False,
        padding_idx=config.padding_idx, sparse=True) for config in module.collection.configs}
    table_of = {"users": "users", "clicked": "items", "bought": "items"}
    features = random_features(rng, LOOKUP_KEYS)
    rows = module(features)
    loss, expected_loss = 0, 0
    for name in LOOKUP_KEYS:
        values, offsets, _ = features[name]
        assert np.array_equal(rows[name].offsets, offsets)
        expected = twins[table_of[name]](torch.from_numpy(values))
        assert torch.equal(rows[name].values, expected)
        grad = torch.from_numpy(rng.standard_normal(tuple(expected.shape)).astype(dtype))
        loss = loss + (rows[name].values * grad).sum()
        expected_loss = expected_loss + (expected * grad).sum()
    loss.backward()
    expected_loss.backward()
    for name, twin in twins.items():
        torch.testing.assert_close(dense(module.embeddings[name].weight.grad),
                                   dense(twin.weight.grad))


def test_an_output_the_loss_does_not_use_gets_no_gradient(rng):
    module = ft.EmbeddingCollection(lookup_configs(), seed=13)
    features = random_features(rng, LOOKUP_KEYS)
    rows = module(features)
    rows["users"].values.sum().backward()
    assert module.embeddings["users"].weight.grad is not None
    assert not dense(module.embeddings["items"].weight.grad).any()


@pytest.mark.parametrize("name", sorted(fastemb.optim.OPTIMIZERS))
def test_fused_lookups_equal_the_numpy_optimizer_in_backward_bit_for_bit(name, rng):
    cls = fastemb.optim.OPTIMIZERS[name].cls
    module = ft.EmbeddingCollection(lookup_configs(), seed=14)
    numpy_twin = fastemb.EmbeddingCollection(lookup_configs(), seed=14)
    fused = module.fuse_optimizer(cls, lr=0.05)
    numpy_optimizer = cls(numpy_twin, lr=0.05)
    for step in range(3):
        features = random_features(rng, LOOKUP_KEYS)
        rows = numpy_twin(features)
        grads = {key: rng.standard_normal(rows[key].values.shape).astype(np.float32)
                 for key in LOOKUP_KEYS}
        assert numpy_twin.backward(grads, numpy_optimizer) is None
        ours = module(features)
        torch.autograd.backward([ours[key].values for key in LOOKUP_KEYS],
                                [torch.from_numpy(grads[key]) for key in LOOKUP_KEYS])
    for config in numpy_twin.configs:
        table = numpy_twin.embeddings[config.name]
        assert table.grad is None
        assert_same_bits(module.embeddings[config.name].weight.detach().numpy(), table.weight)
        for state_name in numpy_optimizer.state_arrays:
            assert_same_bits(fused.state[module.embeddings[config.name].table][state_name],
                             numpy_optimizer.state[table][state_name])


def test_numpy_lookups_optimizer_in_backward_equals_backward_then_step(rng):
    collections = [fastemb.EmbeddingCollection(lookup_configs(), seed=15) for _ in range(2)]
    optimizers = [fastemb.optim.LazyAdam(collection, lr=0.05) for collection in collections]
    for step in range(3):
        features = random_features(rng, LOOKUP_KEYS)
        grads = None
        for k, (collection, optimizer) in enumerate(zip(collections, optimizers)):
            rows = collection(features)
            if grads is None:
                grads = {key: rng.standard_normal(rows[key].values.shape).astype(np.float32)
                         for key in LOOKUP_KEYS}
            if k == 0:
                collection.backward(grads)
                optimizer.step()
                collection.zero_grad()
            else:
                collection.backward(grads, optimizer)
    for name in ("users", "items"):
        assert_same_bits(collections[1].embeddings[name].weight,
                         collections[0].embeddings[name].weight)


def test_no_grad_lookups_equal_the_recorded_ones(rng):
    module = ft.EmbeddingCollection(lookup_configs(), seed=16)
    features = random_features(rng, LOOKUP_KEYS)
    with torch.no_grad():
        quiet = module(features)
    recorded = module(features)
    for name in LOOKUP_KEYS:
        assert not quiet[name].values.requires_grad
        assert torch.equal(quiet[name].values, recorded[name].values.detach())
    assert sorted(module.state_dict()) == ["embeddings.items.weight", "embeddings.users.weight"]
