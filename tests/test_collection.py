"""EmbeddingBagCollection / EmbeddingCollection: every feature equals its own per-table call
bit for bit (forward, backward, optimizer steps), against the NumPy reference too, at any
thread count; KeyedJaggedArray validation; bad input changes nothing; checkpoints."""

import numpy as np
import pytest

import fastemb
from reference import embedding_bag_ref
from reference_training import assert_bitwise



def random_features(rng, keys, sizes, batch, max_length=4, dtype=np.int64, weights=False,
                    padding=None):
    """A KeyedJaggedArray over ``keys`` with values in [0, sizes[key]) (a few padding values
    where ``padding[key]`` is set), empty samples included."""
    lengths = rng.integers(0, max_length + 1, size=len(keys) * batch)
    values = []
    for k, key in enumerate(keys):
        count = int(lengths[k * batch:(k + 1) * batch].sum())
        key_values = rng.integers(0, sizes[key], size=count)
        if padding and padding.get(key) is not None and count:
            key_values[rng.random(count) < 0.3] = padding[key]
        values.append(key_values)
    values = np.concatenate(values).astype(dtype) if values else np.zeros(0, dtype)
    sample_weights = rng.standard_normal(values.size).astype(np.float32) if weights else None
    return fastemb.KeyedJaggedArray(keys, values, lengths=lengths, weights=sample_weights)


def tables_of(collection):
    return {config.name: collection.embedding_bags[config.name] for config in collection.configs}


def assert_equals_per_table_calls(collection, features, out, grad_output):
    """The collection's output ``out`` and its backward of ``grad_output`` (returned) equal
    per-table calls bit for bit."""
    expected, expected_grads = per_table_reference(collection, features, grad_output)
    for feature in collection.feature_names:
        assert_bitwise(out[feature], expected[feature], feature)
    grads = collection.backward(grad_output)
    for name, grad in expected_grads.items():
        np.testing.assert_array_equal(grads[name].rows, grad.rows)
        assert_bitwise(grads[name].values, grad.values, name)
    return grads


def per_table_reference(collection, features, grad_output=None):
    """What per-table calls give: for each table, one EmbeddingBag call over the concatenated
    bags of its features (a copy of the table, same options), its forward split back per
    feature, and its backward given those features' columns of grad_output."""
    outputs, grads = {}, {}
    out_columns = dict(zip(collection.feature_names, np.split(
        np.arange(sum(collection._dims)), np.cumsum(collection._dims)[:-1])))
    for config in collection.configs:
        module = collection.embedding_bags[config.name]
        twin = fastemb.EmbeddingBag.from_pretrained(module.weight.copy(), freeze=False,
                                                    mode=config.pooling,
                                                    padding_idx=config.padding_idx)
        values, offsets, weights = [], [], []
        base = 0
        for feature in config.feature_names:
            feature_values, feature_offsets, feature_weights = features[feature]
            values.append(feature_values)
            offsets.append(feature_offsets[:-1] + base)
            base += feature_values.size
            if feature_weights is not None:
                weights.append(feature_weights)
        out = twin(np.concatenate(values), offsets=np.concatenate(offsets),
                   per_sample_weights=np.concatenate(weights) if weights else None)
        for i, feature in enumerate(config.feature_names):
            outputs[feature] = out[i * features.batch_size:(i + 1) * features.batch_size]
        if grad_output is not None:
            grads[config.name] = twin.backward(np.concatenate(
                [grad_output[:, out_columns[feature]] for feature in config.feature_names]))
    return outputs, grads


def recommender(dtype=np.float32, seed=0, pooling=("sum", "mean", "max")):
    """Four tables: one shared by two features, one with padding, all three poolings."""
    return fastemb.EmbeddingBagCollection([
        fastemb.EmbeddingBagConfig("users", 50, 8, pooling=pooling[0], dtype=dtype),
        fastemb.EmbeddingBagConfig("items", 80, 16, feature_names=["watched", "liked"],
                                   pooling=pooling[1], dtype=dtype),
        fastemb.EmbeddingBagConfig("genres", 12, 3, padding_idx=0, pooling=pooling[2],
                                   dtype=dtype),
        fastemb.EmbeddingBagConfig("tags", 300, 5, pooling=pooling[0], dtype=dtype),
    ], seed=seed)


SIZES = {"users": 50, "watched": 80, "liked": 80, "genres": 12, "tags": 300}
# the KJT lists its keys in another order than the collection, plus one it does not read
KEYS = ["liked", "tags", "unused", "users", "genres", "watched"]


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("batch", [0, 1, 5, 130])
def test_forward_and_backward_equal_per_table_calls_bit_for_bit(rng, dtype, index_dtype, batch):
    collection = recommender(dtype)
    features = random_features(rng, KEYS, SIZES | {"unused": 7}, batch, dtype=index_dtype,
                               padding={"genres": 0})
    out = collection(features)
    assert out.keys == collection.feature_names
    assert out.values.shape == (batch, 8 + 16 + 16 + 3 + 5) and out.values.dtype == dtype
    grad_output = rng.standard_normal(out.values.shape).astype(dtype)
    grads = assert_equals_per_table_calls(collection, features, out, grad_output)
    for name, grad in grads.items():
        assert collection.embedding_bags[name].grad is grad


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_weighted_features_equal_per_table_calls(rng, pooling):
    collection = recommender(pooling=(pooling, pooling, pooling))
    features = random_features(rng, KEYS, SIZES | {"unused": 7}, 40, weights=True,
                               padding={"genres": 0})
    out = collection(features)
    grad_output = rng.standard_normal(out.values.shape).astype(np.float32)
    assert_equals_per_table_calls(collection, features, out, grad_output)


def test_forward_matches_the_numpy_reference(rng):
    collection = recommender(np.float64)
    features = random_features(rng, KEYS, SIZES | {"unused": 7}, 25, padding={"genres": 0})
    out = collection(features)
    for config in collection.configs:
        weight = collection.embedding_bags[config.name].weight
        for feature in config.feature_names:
            values, offsets, _ = features[feature]
            expected, _ = embedding_bag_ref(values, weight, offsets[:-1], mode=config.pooling,
                                            padding_idx=config.padding_idx)
            np.testing.assert_allclose(out[feature], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_16_bit_tables_equal_per_table_calls(rng, dtype_name):
    if dtype_name == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    else:
        dtype = np.float16
    collection = recommender(dtype)
    features = random_features(rng, KEYS, SIZES | {"unused": 7}, 30, padding={"genres": 0})
    out = collection(features)
    assert out.values.dtype == np.float32
    grad_output = rng.standard_normal(out.values.shape).astype(np.float32)
    assert_equals_per_table_calls(collection, features, out, grad_output)


def test_one_and_two_threads_give_the_same_bits(rng, threads):
    features = random_features(rng, KEYS, SIZES | {"unused": 7}, 300, padding={"genres": 0})
    results = []
    for count in (1, 2):
        collection = recommender()
        optimizer = fastemb.optim.LazyAdam(collection, lr=0.01)
        with threads(count):
            out = collection(features).values.copy()
            collection.backward(np.sin(out))
            optimizer.step()
        results.append((out, [module.weight.copy() for module in collection.tables]))
    assert_bitwise(results[0][0], results[1][0])
    for one, two in zip(results[0][1], results[1][1]):
        assert_bitwise(one, two)


@pytest.mark.parametrize("name", sorted(fastemb.optim.OPTIMIZERS))
def test_optimizers_step_a_collection_as_its_tables(rng, name):
    info = fastemb.optim.OPTIMIZERS[name]
    features = random_features(rng, KEYS, SIZES | {"unused": 7}, 64, padding={"genres": 0})
    collection, twin = recommender(), recommender()
    modules = [fastemb.EmbeddingBag.from_pretrained(m.weight, freeze=False, mode=c.pooling,
                                                    padding_idx=c.padding_idx)
               for m, c in zip(twin.tables, twin.configs)]
    optimizer = info.cls(collection, lr=0.05)
    twin_optimizer = info.cls(modules, lr=0.05)
    for step in range(3):
        out = collection(features)
        grad_output = np.cos(out.values + step)
        _, expected_grads = per_table_reference(twin, features, grad_output)
        collection.backward(grad_output)
        for module, config in zip(modules, twin.configs):
            module.grad = expected_grads[config.name]
        optimizer.step()
        twin_optimizer.step()
        collection.zero_grad()
    for mine, theirs in zip(collection.tables, modules):
        assert_bitwise(mine.weight, theirs.weight)


def test_frozen_tables_get_no_gradient(rng):
    collection = recommender()
    collection.embedding_bags["tags"].frozen = True
    features = random_features(rng, KEYS, SIZES | {"unused": 7}, 10)
    out = collection(features)
    grads = collection.backward(np.ones_like(out.values))
    assert "tags" not in grads and collection.embedding_bags["tags"].grad is None
    assert set(grads) == {"users", "items", "genres"}


def test_zero_features_and_zero_batch():
    collection = fastemb.EmbeddingBagCollection([fastemb.EmbeddingBagConfig("a", 4, 3)])
    out = collection(fastemb.KeyedJaggedArray(["a"], np.zeros(0, np.int64), lengths=[]))
    assert out.values.shape == (0, 3)
    grads = collection.backward(np.zeros((0, 3), np.float32))
    assert grads["a"].nnz == 0
    out = collection(fastemb.KeyedJaggedArray(["a"], [], lengths=[0, 0]))
    np.testing.assert_array_equal(out.values, np.zeros((2, 3), np.float32))


def test_embedding_collection_equals_per_table_lookups(rng, dtype):
    collection = fastemb.EmbeddingCollection([
        fastemb.EmbeddingConfig("words", 100, 6, feature_names=["title", "body"], dtype=dtype),
        fastemb.EmbeddingConfig("chars", 30, 4, padding_idx=2, dtype=dtype),
    ], seed=3)
    features = random_features(rng, ["body", "chars", "title"],
                               {"body": 100, "chars": 30, "title": 100}, 17,
                               padding={"chars": 2})
    rows = collection(features)
    grad_output = {name: rng.standard_normal(rows[name].values.shape).astype(dtype)
                   for name in rows}
    grads = collection.backward(grad_output)
    for config in collection.configs:
        module = collection.embeddings[config.name]
        twin = fastemb.Embedding.from_pretrained(module.weight, freeze=False,
                                                 padding_idx=config.padding_idx)
        values = [features[feature][0] for feature in config.feature_names]
        for feature, feature_values in zip(config.feature_names, values):
            assert_bitwise(rows[feature].values, fastemb.embedding(feature_values, module.weight))
            np.testing.assert_array_equal(rows[feature].offsets, features[feature][1])
        twin(np.concatenate(values))
        expected = twin.backward(np.concatenate(
            [grad_output[feature] for feature in config.feature_names]))
        np.testing.assert_array_equal(grads[config.name].rows, expected.rows)
        assert_bitwise(grads[config.name].values, expected.values)


def test_checkpoints_round_trip_a_collection(tmp_path, rng):
    collection = recommender()
    optimizer = fastemb.optim.LazyAdam(collection, lr=0.01)
    features = random_features(rng, KEYS, SIZES | {"unused": 7}, 20)
    collection.backward(np.ones_like(collection(features).values))
    optimizer.step()
    fastemb.save(tmp_path / "model.npz", collection, optimizer)
    restored = recommender(seed=9)
    restored_optimizer = fastemb.optim.LazyAdam(restored, lr=0.01)
    fastemb.load(tmp_path / "model.npz", restored, restored_optimizer)
    for mine, theirs in zip(collection.tables, restored.tables):
        assert_bitwise(mine.weight, theirs.weight)
    assert restored_optimizer.state_dict()["state"][1]["step"] == 1


# ---- bad input: a clear error, and nothing changes ----

def test_a_value_out_of_range_names_its_feature_and_changes_nothing(rng):
    collection = recommender()
    before = [module.weight.copy() for module in collection.tables]
    # (12 is fine for "unused", which the collection does not read, and out of range for genres)
    features = fastemb.KeyedJaggedArray(KEYS, np.array([1, 2, 3, 4, 5, 12, 7, 12], np.int64),
                                        lengths=[1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0])
    with pytest.raises(IndexError, match=r"features\['genres'\].* = 12 is out of range for table "
                                         r"'genres' \(num_embeddings=12\)"):
        collection(features)
    with pytest.raises(RuntimeError, match="forward first"):
        collection.backward(np.zeros((2, 48), np.float32))
    for module, weight in zip(collection.tables, before):
        assert_bitwise(module.weight, weight)


@pytest.mark.parametrize("arguments, error, message", [
    (dict(keys=["a"], values=[1, 2], lengths=[1]), ValueError, "add up to 1"),
    (dict(keys=["a"], values=[1], lengths=[2, -1]), ValueError, r"lengths\[1\] = -1"),
    (dict(keys=["a", "b"], values=[1], lengths=[1, 0, 0]), ValueError, "do not split"),
    (dict(keys=["a", "a"], values=[], lengths=[0, 0]), ValueError, "distinct"),
    (dict(keys="ab", values=[], lengths=[]), TypeError, "list of str"),
    (dict(keys=["a"], values=[1.5], lengths=[1]), TypeError, "integers"),
    (dict(keys=["a"], values=[1], offsets=[0, 2]), ValueError, "must equal len"),
    (dict(keys=["a"], values=[1], offsets=[1, 1]), ValueError, "must be 0"),
    (dict(keys=["a"], values=[1]), ValueError, "exactly one"),
    (dict(keys=["a"], values=[1], lengths=[1], weights=[1.0, 2.0]), ValueError, "shape"),
])
def test_keyed_jagged_array_rejects_bad_input(arguments, error, message):
    with pytest.raises(error, match=message):
        fastemb.KeyedJaggedArray(**arguments)


def test_collection_rejects_bad_configs_and_calls(rng):
    config = fastemb.EmbeddingBagConfig
    with pytest.raises(ValueError, match="'x' appears twice"):
        fastemb.EmbeddingBagCollection([config("a", 3, 2, feature_names=["x"]),
                                        config("b", 3, 2, feature_names=["x"])])
    with pytest.raises(ValueError, match="float64"):
        fastemb.EmbeddingBagCollection([config("a", 3, 2, dtype=np.float64), config("b", 3, 2)])
    with pytest.raises(ValueError, match="mode must be one of"):
        config("a", 3, 2, pooling="median")
    with pytest.raises(TypeError, match="EmbeddingBagConfig"):
        fastemb.EmbeddingBagCollection([fastemb.EmbeddingConfig("a", 3, 2)])
    collection = recommender()
    with pytest.raises(ValueError, match="no key 'users'"):
        collection(fastemb.KeyedJaggedArray(["liked"], [1], lengths=[1]))
    with pytest.raises(TypeError, match="KeyedJaggedArray"):
        collection({"users": [1]})
    weighted = random_features(rng, KEYS, SIZES | {"unused": 7}, 3, weights=True)
    with pytest.raises(ValueError, match="not 'max'"):
        collection(weighted)
    out = collection(random_features(rng, KEYS, SIZES | {"unused": 7}, 3))
    with pytest.raises(ValueError, match="shape"):
        collection.backward(np.zeros((3, 47), np.float32))
    collection.backward(np.zeros_like(out.values))  # (the rejected call left the forward)


@pytest.mark.parametrize("pooling", ["sum", "mean", "max"])
def test_collection_matches_torch_embedding_bag(rng, pooling):
    torch = pytest.importorskip("torch")
    collection = recommender(pooling=(pooling, pooling, pooling))
    features = random_features(rng, KEYS, SIZES | {"unused": 7}, 33, padding={"genres": 0})
    out = collection(features)
    grad_output = rng.standard_normal(out.values.shape).astype(np.float32)
    grads = collection.backward(grad_output)
    columns = dict(zip(collection.feature_names, np.split(
        np.arange(out.values.shape[1]), np.cumsum(collection._dims)[:-1])))
    for config in collection.configs:
        module = torch.nn.EmbeddingBag.from_pretrained(
            torch.from_numpy(collection.embedding_bags[config.name].weight.copy()),
            freeze=False, mode=pooling, padding_idx=config.padding_idx, sparse=pooling != "max")
        for feature in config.feature_names:
            values, offsets, _ = features[feature]
            result = module(torch.from_numpy(values.astype(np.int64)),
                            torch.from_numpy(offsets[:-1].astype(np.int64)))
            np.testing.assert_allclose(out[feature], result.detach().numpy(), rtol=1e-6,
                                       atol=1e-6)
            result.backward(torch.from_numpy(np.ascontiguousarray(
                grad_output[:, columns[feature]])))
        expected = module.weight.grad
        expected = (expected.coalesce().to_dense() if expected.is_sparse else expected).numpy()
        np.testing.assert_allclose(grads[config.name].to_dense(), expected, rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("name", sorted(fastemb.optim.OPTIMIZERS))
@pytest.mark.parametrize("pooling", [("sum", "sum", "sum"), ("sum", "mean", "max")])
def test_optimizer_in_backward_equals_backward_then_step(rng, name, pooling):
    info = fastemb.optim.OPTIMIZERS[name]
    features = random_features(rng, KEYS, SIZES | {"unused": 7}, 50, padding={"genres": 0})
    fused, plain = recommender(pooling=pooling), recommender(pooling=pooling)
    fused_optimizer, plain_optimizer = info.cls(fused, lr=0.05), info.cls(plain, lr=0.05)
    for step in range(3):
        grad_output = np.sin(fused(features).values + step)
        plain(features)
        assert fused.backward(grad_output, fused_optimizer) is None
        grad_output[:] = np.nan  # (read before backward returned: the caller may reuse it)
        plain.backward(np.sin(plain(features).values + step))
        plain_optimizer.step()
        plain.zero_grad()
    for mine, theirs in zip(fused.tables, plain.tables):
        assert mine.grad is None
        assert_bitwise(mine.weight, theirs.weight)
    assert fused_optimizer.state_dict()["state"][0]["step"] == 3


def test_optimizer_in_backward_rejects_a_foreign_optimizer(rng):
    collection, other = recommender(), recommender()
    features = random_features(rng, KEYS, SIZES | {"unused": 7}, 5)
    before = [module.weight.copy() for module in collection.tables]
    out = collection(features)
    with pytest.raises(ValueError, match="not one of this optimizer's modules"):
        collection.backward(np.ones_like(out.values), fastemb.optim.SGD(other, lr=1.0))
    with pytest.raises(TypeError, match="fastemb.optim optimizer"):
        collection.backward(np.ones_like(out.values), "sgd")
    for module, weight in zip(collection.tables, before):
        assert_bitwise(module.weight, weight)
