"""``fastemb.distributed``'s sharded tables and collections on the in-process engine: forward,
gradient and every optimizer's update equal a single ``fastemb.EmbeddingBag``'s (or
``Embedding``'s, or collection's) bit for bit, for any number of shards; bad input is refused
before any shard changes."""

import doctest

import numpy as np
import pytest
from reference import assert_same_bits

import fastemb
import fastemb.distributed
from fastemb.distributed import LocalEngine, ShardedEmbedding, ShardedEmbeddingBag
import fastemb.distributed.checkpoint
import fastemb.distributed.collection
import fastemb.distributed.engine
import fastemb.distributed.shard
import fastemb.distributed.table
from fastemb.distributed.shard import owned_rows

V, D = 23, 5


def twins(rng, dtype, num_shards, optimizer, strategy="pull", **options):
    """(sharded table, single-machine module, its optimizer), on equal starting weights."""
    weight = rng.standard_normal((V, D)).astype(dtype)
    sharded = ShardedEmbeddingBag.from_pretrained(weight, num_shards, optimizer=optimizer,
                                                  strategy=strategy, lr=0.05, **options)
    single = fastemb.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, **options)
    return sharded, single, fastemb.optim.OPTIMIZERS[optimizer].cls(single, lr=0.05)


def random_bags(rng, index_dtype, padding=None):
    """(input, offsets): 1-D indices in bags of 0 to 5 (empty bags included)."""
    lengths = rng.integers(0, 6, size=9)
    lengths[2] = 0
    indices = rng.integers(0, V, size=int(lengths.sum())).astype(index_dtype)
    if padding is not None and indices.size > 3:
        indices[::4] = padding
    return indices, np.concatenate([[0], np.cumsum(lengths)[:-1]])


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 30])
@pytest.mark.parametrize("mode, padding_idx, weighted", [
    ("sum", None, False), ("mean", None, False), ("max", None, False),
    ("sum", 4, True), ("mean", 4, True), ("max", 7, False)])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64], ids=["int32", "int64"])
def test_steps_equal_the_single_machine_module_bit_for_bit(num_shards, mode, padding_idx,
                                                            weighted, index_dtype, dtype, rng):
    sharded, single, optimizer = twins(rng, dtype, num_shards, "lazyadam", mode=mode,
                                       padding_idx=padding_idx)
    for step in range(4):
        indices, offsets = random_bags(rng, index_dtype, padding_idx)
        weights = rng.random(indices.size).astype(dtype) if weighted else None
        out = sharded(indices, offsets, weights)
        assert_same_bits(out, single(indices, offsets, weights))
        grad_output = rng.standard_normal(out.shape).astype(dtype)
        assert sharded.backward(grad_output) is None
        single.backward(grad_output)
        if weighted:
            assert_same_bits(sharded.per_sample_weights_grad, single.per_sample_weights_grad)
        optimizer.step()
        single.zero_grad()
        assert_same_bits(sharded.weight, single.weight)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 30])
@pytest.mark.parametrize("mode, padding_idx, weighted", [
    ("sum", None, False), ("mean", None, False), ("sum", 4, True), ("mean", 4, True),
    ("mean", None, True)])
def test_partial_sums_equal_the_single_machine_module(num_shards, mode, padding_idx, weighted,
                                                      rng):
    """Bit for bit with one shard for sums; with more, the bags are added in another order."""
    sharded, single, optimizer = twins(rng, np.float64, num_shards, "sgd", strategy="partial",
                                       mode=mode, padding_idx=padding_idx)
    exact = num_shards == 1 and mode == "sum"
    check = assert_same_bits if exact else (
        lambda ours, theirs: np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12))
    for step in range(3):
        indices, offsets = random_bags(rng, np.int64, padding_idx)
        weights = rng.random(indices.size) if weighted else None
        out = sharded(indices, offsets, weights)
        check(out, single(indices, offsets, weights))
        grad_output = rng.standard_normal(out.shape)
        sharded.backward(grad_output)
        single.backward(grad_output)
        if weighted:
            check(sharded.per_sample_weights_grad, single.per_sample_weights_grad)
        optimizer.step()
        single.zero_grad()
        check(sharded.weight, single.weight)


def test_auto_takes_the_way_that_moves_fewer_rows(rng):
    table = ShardedEmbeddingBag(1000, D, mode="sum", num_shards=2, seed=0)
    table(rng.integers(0, 1000, size=(4, 50)))  # 4 bags x 2 shards < ~180 distinct rows
    assert type(table._saved).__name__ == "_PartialForward"
    table(np.array([[1, 2], [3, 4], [5, 6]]))  # 6 distinct rows < 3 bags x 2 shards
    assert type(table._saved).__name__ != "_PartialForward"
    table.strategy = "pull"
    table(rng.integers(0, 1000, size=(4, 50)))
    assert type(table._saved).__name__ != "_PartialForward"


@pytest.mark.parametrize("name", sorted(fastemb.optim.OPTIMIZERS))
def test_every_optimizer_updates_as_on_one_machine(name, rng):
    sharded, single, optimizer = twins(rng, np.float32, 3, name, mode="mean")
    for step in range(3):
        indices = rng.integers(0, V // 2, size=(6, 3))  # (rows V/2.. are never looked up)
        grad_output = rng.standard_normal((6, D)).astype(np.float32)
        sharded(indices)
        sharded.backward(grad_output)
        single(indices)
        single.backward(grad_output)
        optimizer.step()
        single.zero_grad()
    assert_same_bits(sharded.weight, single.weight)
    shard_states = [shard.optimizer.state[shard.module] for shard in sharded.engine.shards]
    assert {state["step"] for state in shard_states} == {3}  # (every shard stepped each time)


def test_rows_live_on_their_shards():
    weight = np.arange(V * D, dtype=np.float32).reshape(V, D)
    table = ShardedEmbeddingBag.from_pretrained(weight, num_shards=4, mode="sum")
    for shard, state in enumerate(table.engine.shards):
        assert state.weight.shape == (owned_rows(shard, 4, V), D)
        assert_same_bits(state.weight, weight[shard::4])
    assert [owned_rows(s, 4, 3) for s in range(4)] == [1, 1, 1, 0]


def test_a_fresh_table_zeroes_its_padding_row_and_is_reproducible():
    first = ShardedEmbeddingBag(V, D, padding_idx=6, num_shards=4, seed=1)
    second = ShardedEmbeddingBag(V, D, padding_idx=6, num_shards=4, seed=1)
    assert not first.weight[6].any() and first.weight[5].any()
    assert_same_bits(first.weight, second.weight)


@pytest.mark.parametrize("strategy", ["pull", "partial"])
def test_empty_input_and_zero_bags(strategy, rng):
    sharded, single, _ = twins(rng, np.float32, 2, "sgd", strategy, mode="mean")
    before = sharded.weight
    out = sharded(np.array([], np.int64), np.array([0, 0]))
    assert_same_bits(out, single(np.array([], np.int64), np.array([0, 0])))
    sharded.backward(np.ones_like(out))
    assert_same_bits(sharded.weight, before)
    assert sharded(np.zeros((0, 3), np.int64)).shape == (0, D)


@pytest.mark.parametrize("call, error, message", [
    (lambda t: t(np.array([[1, V]])), IndexError, f"input\\[0, 1\\] = {V} is out of range"),
    (lambda t: t(np.array([1, 2]), np.array([1])), ValueError, "offsets"),
    (lambda t: t(np.array([[1.5]])), TypeError, "float"),
    (lambda t: t(np.array([[1]]), per_sample_weights=np.ones((1, 1))), ValueError, "max"),
])
def test_bad_input_is_refused_before_any_shard_changes(call, error, message, rng):
    table, _, _ = twins(rng, np.float32, 3, "sgd", mode="max")
    before = table.weight
    with pytest.raises(error, match=message):
        call(table)
    assert_same_bits(table.weight, before)


@pytest.mark.parametrize("strategy", ["pull", "partial"])
def test_a_bad_gradient_is_refused_before_any_shard_changes(strategy, rng):
    table, _, _ = twins(rng, np.float32, 3, "lazyadam", strategy, mode="sum")
    before = table.weight
    table(np.array([[1, 2]]))
    with pytest.raises(ValueError, match="grad_output"):
        table.backward(np.ones((2, D), np.float32))
    with pytest.raises(RuntimeError, match="forward first"):
        ShardedEmbeddingBag(V, D).backward(np.ones((1, D), np.float32))
    assert_same_bits(table.weight, before)
    assert all(shard.optimizer.state[shard.module]["step"] == 0
               for shard in table.engine.shards)


@pytest.mark.parametrize("arguments, error, message", [
    ({"num_shards": 0}, ValueError, "num_shards"),
    ({"optimizer": "adam"}, ValueError, "optimizer must be one of"),
    ({"lr": -1.0}, ValueError, "learning rate"),
    ({"dtype": np.int32}, TypeError, "float32 or float64"),
    ({"strategy": "push"}, ValueError, "strategy must be one of"),
])
def test_bad_tables_are_refused(arguments, error, message):
    with pytest.raises(error, match=message):
        ShardedEmbeddingBag(V, D, **arguments)


def test_an_engine_holds_one_table():
    engine = LocalEngine()
    ShardedEmbeddingBag(V, D, engine=engine)
    with pytest.raises(RuntimeError, match="already holds"):
        ShardedEmbeddingBag(V, D, engine=engine)


@pytest.mark.parametrize("num_shards", [1, 2, 5])
@pytest.mark.parametrize("strategy", ["pull", "partial"])
def test_a_step_moves_the_bytes_of_the_readme_model(num_shards, strategy, rng):
    """The README's table of what a step moves (S shards, B bags, n int64 indices, U distinct
    rows, D float32 columns), as the engine counts it."""
    num_bags, bag_size, dim = 40, 6, 8
    table = ShardedEmbeddingBag(1000, dim, mode="sum", num_shards=num_shards,
                                strategy=strategy, optimizer="sgd", lr=0.1, seed=0)
    indices = rng.integers(0, 1000, size=(num_bags, bag_size))
    n, distinct = indices.size, np.unique(indices).size
    sent, received = table.engine.bytes_sent, table.engine.bytes_received
    out = table(indices)
    forward = table.engine.bytes_sent - sent, table.engine.bytes_received - received
    sent, received = table.engine.bytes_sent, table.engine.bytes_received
    table.backward(np.ones_like(out))
    backward = table.engine.bytes_sent - sent, table.engine.bytes_received - received
    if strategy == "pull":
        assert forward == (8 * distinct, 4 * dim * distinct)
        assert backward == ((4 * dim + 8) * distinct, 0)
    else:
        assert forward == (8 * n + 8 * num_shards * (num_bags + 1),
                           4 * dim * num_shards * num_bags)
        assert backward == (4 * dim * num_shards * num_bags, 0)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64], ids=["int32", "int64"])
def test_the_distinct_rows_are_those_of_np_unique(index_dtype, rng):
    table = ShardedEmbeddingBag(100_000, 2, num_shards=3, seed=0)
    for indices in [rng.integers(0, 100_000, size=5000), rng.integers(0, 7, size=300),
                    np.array([99_999, 0, 99_999]), np.array([], np.int64)]:
        rows, inverse, _, _ = table._pulled(indices.astype(index_dtype))
        expected_rows, expected_inverse = np.unique(indices, return_inverse=True)
        assert rows.dtype == inverse.dtype == np.int64
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_array_equal(inverse, expected_inverse)


# --------------------------------------------------------------------------------------------
# Sharded unpooled tables
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_shards", [1, 2, 3, 30])
@pytest.mark.parametrize("padding_idx", [None, 4])
@pytest.mark.parametrize("optimizer_name", ["lazyadam", "rowwise-adagrad"])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64], ids=["int32", "int64"])
def test_a_sharded_embedding_steps_as_the_single_machine_module_bit_for_bit(
        num_shards, padding_idx, optimizer_name, index_dtype, dtype, rng):
    weight = rng.standard_normal((V, D)).astype(dtype)
    sharded = ShardedEmbedding.from_pretrained(weight, num_shards, padding_idx=padding_idx,
                                               optimizer=optimizer_name, lr=0.05)
    single = fastemb.Embedding.from_pretrained(weight.copy(), freeze=False,
                                               padding_idx=padding_idx)
    optimizer = fastemb.optim.OPTIMIZERS[optimizer_name].cls(single, lr=0.05)
    for shape in [(4, 3), (7,), (2, 0), (2, 2, 3)]:  # (repeated rows, padding, no rows at all)
        indices = rng.integers(0, V, size=shape).astype(index_dtype)
        if padding_idx is not None and indices.size:
            indices.reshape(-1)[::3] = padding_idx
        rows = sharded(indices)
        assert_same_bits(rows, single(indices))
        grad_output = rng.standard_normal(rows.shape).astype(dtype)
        assert sharded.backward(grad_output) is None
        single.backward(grad_output)
        optimizer.step()
        single.zero_grad()
        assert_same_bits(sharded.weight, single.weight)


@pytest.mark.parametrize("call, error, message", [
    (lambda t: t(np.array([[1, V]])), IndexError, f"input\\[0, 1\\] = {V} is out of range"),
    (lambda t: t(np.array([-1])), IndexError, "out of range"),
    (lambda t: t(np.array([[1.5]])), TypeError, "float"),
])
def test_a_sharded_embedding_refuses_bad_input_before_any_shard_changes(call, error, message):
    table = ShardedEmbedding(V, D, num_shards=3, seed=0)
    before = table.weight
    with pytest.raises(error, match=message):
        call(table)
    rows = table(np.array([1, 2, 2]))
    with pytest.raises(ValueError, match="grad_output"):
        table.backward(np.ones((2, D), np.float32))
    table.backward(np.zeros_like(rows))  # (refused gradients leave the forward to backward)
    with pytest.raises(RuntimeError, match="forward first"):
        table.backward(np.zeros_like(rows))
    assert_same_bits(table.weight[3:], before[3:])
    assert all(shard.optimizer.state[shard.module]["step"] == 1
               for shard in table.engine.shards)


def embedding_configs():
    return [fastemb.EmbeddingConfig("words", 30, 4, feature_names=["title", "body"]),
            fastemb.EmbeddingConfig("tags", 12, 2, padding_idx=0)]


def random_features(rng, keys, batch_size):
    """A KeyedJaggedArray of ``keys`` and one more that no collection reads: 0 to 3 values in
    [0, 12) per sample."""
    keys = list(keys) + ["unused"]
    lengths = rng.integers(0, 4, size=len(keys) * batch_size)
    values = rng.integers(0, 12, size=int(lengths.sum()))
    return fastemb.KeyedJaggedArray(keys, values, lengths=lengths)


def embedding_features(rng):
    return random_features(rng, ["title", "body", "tags"], 5)


def twin_optimizer(sharded, collection, modules):
    """Give the single-machine ``collection`` (whose tables are ``modules``) the sharded one's
    rows; its LazyAdam optimizer, as the shards'."""
    for config in collection.configs:
        modules[config.name].weight[...] = sharded.tables[config.name].weight
    return fastemb.optim.LazyAdam(collection, lr=0.05)


def assert_same_tables(sharded, modules):
    for name, table in sharded.tables.items():
        assert_same_bits(table.weight, modules[name].weight)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_a_sharded_embedding_collection_equals_the_collection_bit_for_bit(num_shards, rng):
    sharded = fastemb.distributed.ShardedEmbeddingCollection(
        embedding_configs(), num_shards=num_shards, lr=0.05, seed=0)
    collection = fastemb.EmbeddingCollection(embedding_configs())
    optimizer = twin_optimizer(sharded, collection, collection.embeddings)
    for step in range(3):
        features = embedding_features(rng)
        out, expected = sharded(features), collection(features)
        assert list(out) == list(expected)
        grad_output = {}
        for name, rows in out.items():
            assert_same_bits(rows.values, expected[name].values)
            np.testing.assert_array_equal(rows.offsets, expected[name].offsets)
            grad_output[name] = rng.standard_normal(rows.values.shape).astype(np.float32)
        assert sharded.backward(grad_output) is None
        collection.backward(grad_output, optimizer)
    assert_same_tables(sharded, collection.embeddings)


def test_a_sharded_embedding_collection_refuses_bad_input_before_any_shard_changes(rng):
    sharded = fastemb.distributed.ShardedEmbeddingCollection(embedding_configs(), seed=1)
    before = {name: table.weight for name, table in sharded.tables.items()}
    with pytest.raises(ValueError, match="no key 'tags'"):
        sharded(fastemb.KeyedJaggedArray(["title", "body"], [1, 2], lengths=[1, 1]))
    with pytest.raises(RuntimeError, match="forward first"):
        sharded.backward({})
    out = sharded(embedding_features(rng))
    grads = {name: np.ones(rows.values.shape, np.float32) for name, rows in out.items()}
    with pytest.raises(ValueError, match="keys"):
        sharded.backward({"title": grads["title"]})
    with pytest.raises(ValueError, match="grad_output\\['tags'\\]"):
        sharded.backward(grads | {"tags": np.ones((99, 2), np.float32)})
    for name, table in sharded.tables.items():  # (nothing stepped: the body was checked first)
        assert_same_bits(table.weight, before[name])
    sharded.backward(grads)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def train_steps(table, rng, steps):
    for step in range(steps):
        out = table(rng.integers(0, V, size=(6, 2)))
        table.backward(rng.standard_normal(out.shape).astype(np.float32))


def shard_states(table):
    return table.engine.call("state", [()] * table.num_shards)


def assert_same_states(first, second):
    for ours, theirs in zip(first, second, strict=True):
        assert_same_bits(ours["weight"], theirs["weight"])
        for mine, other in zip(ours["optimizer"]["state"], theirs["optimizer"]["state"]):
            assert mine.keys() == other.keys()
            for key in mine:
                assert_same_bits(np.asarray(mine[key]), np.asarray(other[key]))


def test_a_checkpoint_restores_every_shard_and_training_goes_on_alike(tmp_path, rng):
    table = ShardedEmbeddingBag(V, D, mode="sum", num_shards=3, seed=0)
    twin = ShardedEmbeddingBag(V, D, mode="sum", num_shards=3, seed=0)
    train_steps(table, np.random.default_rng(1), 3)
    train_steps(twin, np.random.default_rng(1), 3)
    path = tmp_path / "sharded.npz"
    table.save(path, metadata={"epoch": 2})
    assert fastemb.checkpoint.read_metadata(path) == {"epoch": 2}
    saved = shard_states(table)
    train_steps(table, rng, 2)  # (steps the checkpoint does not hold)
    table.load(path)
    assert_same_states(shard_states(table), saved)
    train_steps(table, np.random.default_rng(2), 2)
    train_steps(twin, np.random.default_rng(2), 2)
    assert_same_states(shard_states(table), shard_states(twin))


@pytest.mark.parametrize("other", [
    {"num_shards": 2}, {"num_embeddings": V + 1}, {"optimizer": "sgd", "lr": 0.1}])
def test_a_checkpoint_of_another_table_is_refused_and_changes_nothing(other, tmp_path):
    options = {"num_embeddings": V, "num_shards": 3} | other
    ShardedEmbeddingBag(options.pop("num_embeddings"), D, seed=3, **options).save(
        tmp_path / "other.npz")
    table = ShardedEmbeddingBag(V, D, num_shards=3, seed=4)
    before = shard_states(table)
    with pytest.raises(ValueError):
        table.load(tmp_path / "other.npz")
    assert_same_states(shard_states(table), before)


def test_a_damaged_shard_state_is_found_before_any_shard_changes(tmp_path, rng):
    table = ShardedEmbeddingBag(V, D, num_shards=3, seed=5)
    train_steps(table, rng, 1)
    path = tmp_path / "table.npz"
    table.save(path)
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["optimizer_2_exp_avg"] = arrays["optimizer_2_exp_avg"][:-1]  # (the last shard's)
    np.savez(path, **arrays)
    fresh = ShardedEmbeddingBag(V, D, num_shards=3, seed=6)
    before = shard_states(fresh)
    with pytest.raises(ValueError):
        fresh.load(path)
    assert_same_states(shard_states(fresh), before)


# --------------------------------------------------------------------------------------------
# Sharded collections
# --------------------------------------------------------------------------------------------

def collection_configs():
    return [fastemb.EmbeddingBagConfig("users", 30, 4),
            fastemb.EmbeddingBagConfig("items", 40, 3, feature_names=["clicked", "bought"],
                                       pooling="mean", padding_idx=0),
            fastemb.EmbeddingBagConfig("genres", 12, 2, pooling="max")]


def bag_features(rng):
    return random_features(rng, ["users", "clicked", "bought", "genres"], 6)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_a_sharded_collection_equals_the_collection_bit_for_bit(num_shards, rng):
    sharded = fastemb.distributed.ShardedEmbeddingBagCollection(
        collection_configs(), num_shards=num_shards, strategy="pull", lr=0.05, seed=0)
    collection = fastemb.EmbeddingBagCollection(collection_configs())
    optimizer = twin_optimizer(sharded, collection, collection.embedding_bags)
    for step in range(3):
        features = bag_features(rng)
        out, expected = sharded(features), collection(features)
        assert out.keys == expected.keys and out.offset_per_key == expected.offset_per_key
        assert_same_bits(out.values, expected.values)
        grad_output = rng.standard_normal(out.values.shape).astype(np.float32)
        sharded.backward(grad_output)
        collection.backward(grad_output, optimizer)
    assert_same_tables(sharded, collection.embedding_bags)


def test_a_sharded_collection_refuses_bad_input(rng):
    sharded = fastemb.distributed.ShardedEmbeddingBagCollection(collection_configs(), seed=0)
    with pytest.raises(TypeError, match="KeyedJaggedArray"):
        sharded(np.array([1, 2]))
    with pytest.raises(ValueError, match="no key 'genres'"):
        sharded(fastemb.KeyedJaggedArray(["users", "clicked", "bought"], [1, 2, 3],
                                         lengths=[1, 1, 1]))
    with pytest.raises(RuntimeError, match="forward first"):
        sharded.backward(np.zeros((1, 12), np.float32))
    sharded(bag_features(rng))
    with pytest.raises(ValueError, match="grad_output"):
        sharded.backward(np.zeros((2, 12), np.float32))


def test_a_collection_checkpoint_holds_every_table_and_restores_them(tmp_path, rng):
    sharded = fastemb.distributed.ShardedEmbeddingBagCollection(
        collection_configs(), num_shards=2, strategy="pull", seed=1)
    features = bag_features(rng)
    sharded.backward(rng.standard_normal(sharded(features).values.shape).astype(np.float32))
    path = tmp_path / "collection.npz"
    fastemb.distributed.save(path, sharded, metadata={"step": 1})
    saved = {name: shard_states(table) for name, table in sharded.tables.items()}
    sharded.backward(rng.standard_normal(sharded(features).values.shape).astype(np.float32))
    fastemb.distributed.load(path, sharded)
    for name, table in sharded.tables.items():
        assert_same_states(shard_states(table), saved[name])
    other = fastemb.distributed.ShardedEmbeddingBagCollection(
        collection_configs()[:2], num_shards=2, seed=1)
    with pytest.raises(ValueError, match="these tables are"):
        fastemb.distributed.load(path, other)
    mixed = [ShardedEmbeddingBag(V, D, optimizer="sgd", lr=0.1), ShardedEmbeddingBag(V, D)]
    with pytest.raises(ValueError, match="one optimizer"):
        fastemb.distributed.save(tmp_path / "mixed.npz", mixed)


def test_an_embedding_collection_checkpoint_restores_every_table(tmp_path, rng):
    sharded = fastemb.distributed.ShardedEmbeddingCollection(embedding_configs(), seed=2)

    def train_step():
        out = sharded(embedding_features(rng))
        sharded.backward({name: rng.standard_normal(rows.values.shape).astype(np.float32)
                          for name, rows in out.items()})

    train_step()
    path = tmp_path / "unpooled.npz"
    fastemb.distributed.save(path, sharded)
    saved = {name: shard_states(table) for name, table in sharded.tables.items()}
    train_step()
    fastemb.distributed.load(path, sharded)
    for name, table in sharded.tables.items():
        assert_same_states(shard_states(table), saved[name])


class FlakyEngine(LocalEngine):
    """A LocalEngine whose next call of ``failing`` reports shard 1 lost (without running)."""

    failing = None

    def call(self, method, per_shard_arguments):
        if method == self.failing:
            self.failing = None
            raise fastemb.distributed.ShardLost([1])
        return super().call(method, per_shard_arguments)


@pytest.mark.parametrize("failing_table", [0, 1, 2])
@pytest.mark.parametrize("failing_call", ["apply_gradient", "rows"])
def test_a_lost_shard_restores_every_table_saved_with_it(failing_table, failing_call, tmp_path,
                                                         rng):
    """Whichever table loses a shard, in the lookup or in the update: every table is back at
    the checkpoint, the lookups read the restored rows (those before the loss looked up
    again), and no table takes the update of the step it was lost in."""
    engines = []

    def make_engine():
        engines.append(FlakyEngine())
        return engines[-1]

    def collection():
        return fastemb.distributed.ShardedEmbeddingBagCollection(
            collection_configs(), num_shards=2, make_engine=make_engine, strategy="pull",
            seed=2)

    sharded, twin = collection(), collection()
    features = bag_features(rng)
    first_grad = rng.standard_normal((6, 12)).astype(np.float32)
    for model in (sharded, twin):
        model(features)
        model.backward(first_grad)
    fastemb.distributed.save(tmp_path / "model.npz", sharded)
    saved = {name: shard_states(table) for name, table in sharded.tables.items()}
    sharded.backward(rng.standard_normal(sharded(features).values.shape).astype(np.float32))
    engines[failing_table].failing = failing_call
    message = (r"with the 2 other table\(s\) saved with it .*the 1 step\(s\) since are lost "
               r"and " + ("this lookup reads" if failing_call == "rows" else "this step's update"))
    with pytest.warns(RuntimeWarning, match=message):
        out = sharded(features)
        sharded.backward(np.ones((6, 12), np.float32))
    if failing_call == "apply_gradient":  # (no table stepped)
        for name, table in sharded.tables.items():
            assert_same_states(shard_states(table), saved[name])
    else:  # (the lookup read the checkpoint's rows, and the step went on from them)
        assert_same_bits(out.values, twin(features).values)
        twin.backward(np.ones((6, 12), np.float32))
        for name, table in sharded.tables.items():
            assert_same_states(shard_states(table), shard_states(twin.tables[name]))


@pytest.mark.parametrize("module", [
    fastemb.distributed.table, fastemb.distributed.collection, fastemb.distributed.checkpoint,
    fastemb.distributed.engine, fastemb.distributed.shard], ids=lambda module: module.__name__)
def test_doctests(module):
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0
