"""Training float16 and bfloat16 tables, and split float32 tables: modules that hold them,
optimizer steps that round their results (or, for a split table, store them exactly), and
checkpoints that keep them.

The contract: a step on a 16-bit table is the float32 step (float32 state, float32 gradient)
on the table's exact float32 values, its result rounded to the table's dtype: to nearest (ties
to even), bit for bit ``float32_result.astype(dtype)``; or stochastically, to one of the two
16-bit neighbours of the float32 result with the probabilities that make the expected value
that result, drawn from the optimizer's seed, the table, the step, the row and the column only.
The float32 step itself is checked against the NumPy references and torch elsewhere.
"""

import os

import numpy as np
import pytest
from reference import assert_same_bits

import fastemb
from fastemb.optim import OPTIMIZERS

ml_dtypes = pytest.importorskip("ml_dtypes")

HALF_DTYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
# the hyperparameters each registered optimizer is tested with (decay and maximize included)
SETTINGS = {
    "lazyadam": [dict(lr=0.01), dict(lr=0.02, weight_decay=0.1, maximize=True)],
    "sgd": [dict(lr=0.5), dict(lr=0.1, weight_decay=0.3)],
    "adagrad": [dict(lr=0.1), dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.5)],
    "rowwise-adagrad": [dict(lr=0.1), dict(lr=0.2, weight_decay=0.05)],
}


@pytest.fixture(params=HALF_DTYPES, ids=["float16", "bfloat16"])
def half(request):
    return request.param


def test_every_registered_optimizer_is_covered():
    assert set(SETTINGS) == set(OPTIMIZERS)


def train_steps(module, optimizer, rng, num_steps, grad_dtype=np.float32):
    """Forward, backward with a random upstream gradient and a step, ``num_steps`` times; the
    batches are drawn from ``rng`` (with repeated rows)."""
    for _ in range(num_steps):
        indices = rng.integers(0, module.num_embeddings, 24)
        offsets = np.array([0, 5, 5, 13])
        out = module(indices, offsets)
        module.backward(rng.standard_normal(out.shape).astype(grad_dtype))
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("setting", [0, 1])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_step_rounded_to_nearest_is_the_float32_step_rounded(half, name, setting, mode, rng):
    """Step after step, the 16-bit table equals the float32 step of its widened values rounded
    to nearest, and the float32 state equals the float32 step's state, bit for bit."""
    info, hyperparameters = OPTIMIZERS[name], SETTINGS[name][setting]
    module = fastemb.EmbeddingBag(40, 12, mode=mode, dtype=half, seed=1)
    twin = fastemb.EmbeddingBag(40, 12, mode=mode, dtype=np.float32)
    optimizer = info.cls(module, **hyperparameters)
    twin_optimizer = info.cls(twin, **hyperparameters)
    for step in range(6):
        twin.weight[...] = module.weight.astype(np.float32)  # (exact)
        indices = rng.integers(0, 40, 30)
        offsets = np.array([0, 7, 7, 20])
        grad_output = rng.standard_normal((4, 12)).astype(np.float32)
        out = module(indices, offsets)
        assert_same_bits(out, twin(indices, offsets))
        module.backward(grad_output)
        twin.backward(grad_output)
        optimizer.step()
        twin_optimizer.step()
        optimizer.zero_grad()
        twin_optimizer.zero_grad()
        assert module.weight.dtype == half
        assert_same_bits(module.weight, twin.weight.astype(half))
        for state_name in info.cls.state_arrays:
            state = optimizer.state[module][state_name]
            assert state.dtype == np.float32
            assert_same_bits(state, twin_optimizer.state[twin][state_name])


def test_embedding_module_of_a_16_bit_table_trains(half, rng):
    """An Embedding's output is in the table's dtype; its backward takes a gradient in that
    dtype or in float32 (the same gradient once widened) and gives a float32 SparseGrad."""
    module = fastemb.Embedding(20, 6, dtype=half, seed=3, padding_idx=2)
    assert module.weight.dtype == half and not module.weight[2].any()
    indices = np.array([[1, 2, 5], [5, 19, 0]])
    out = module(indices)
    assert out.dtype == half
    assert_same_bits(out, module.weight[indices])
    grad_output = rng.standard_normal(out.shape).astype(half)
    from_half = module.backward(grad_output)
    module(indices)
    from_float32 = module.backward(grad_output.astype(np.float32))
    assert from_half.values.dtype == np.float32
    assert_same_bits(from_half.values, from_float32.values)
    assert from_half.rows.tolist() == [0, 1, 5, 19]
    before = module.weight.copy()
    fastemb.optim.SGD(module, lr=0.5).step()
    changed = np.flatnonzero((module.weight.view(np.uint16) != before.view(np.uint16)).any(1))
    assert set(changed) <= {0, 1, 5, 19}


def test_new_16_bit_module_holds_float32_draws_rounded(half):
    module = fastemb.EmbeddingBag(50, 8, dtype=half, seed=7)
    expected = np.random.default_rng(7).standard_normal((50, 8), dtype=np.float32).astype(half)
    assert_same_bits(module.weight, expected)
    assert module.weight.ctypes.data % 64 == 0
    assert f"dtype={half.name}" in repr(module)


def neighbours(values, half):
    """The two 16-bit values around each float32 value: (below, above) in magnitude order;
    both are the value itself where it is exact."""
    nearest = values.astype(half)
    magnitude = np.abs(values)
    bits = np.abs(nearest).view(np.uint16).astype(np.int32)
    low_bits = np.where(np.abs(nearest).astype(np.float32) > magnitude, bits - 1, bits)
    low = low_bits.astype(np.uint16).view(half).astype(np.float32)
    high = np.where(low == magnitude, low,
                    (low_bits + 1).astype(np.uint16).view(half).astype(np.float32))
    sign = np.where(np.signbit(values), -1, 1).astype(np.float32)
    return sign * low, sign * high


def one_sgd_step(half, start, update, stochastic=True, seed=0, num_columns=40_000):
    """A 1-row table of ``start`` in every column after one SGD step of ``-update`` per column,
    and the float32 result (the stored start + update)."""
    module = fastemb.Embedding.from_pretrained(np.full((1, num_columns), start, half),
                                               freeze=False)
    optimizer = fastemb.optim.SGD(module, lr=1.0, stochastic_rounding=stochastic, seed=seed)
    out = module(np.array([0]))
    module.backward(np.full(out.shape, -update, np.float32))
    optimizer.step()
    stored_start = np.float32(half.type(start))  # (the table holds start rounded to half)
    return module.weight[0].astype(np.float32), np.float32(stored_start + np.float32(update))


@pytest.mark.parametrize("start, update", [(1.0, 0.3e-2), (1.0, -0.7e-3), (-3.0, 1e-2),
                                           (-0.125, -1e-4), (6e-6, 1e-6), (0.0, -2.5e-8)])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(half, start, update):
    """Each column rounds to one of the two neighbours of the float32 result, and the mean over
    40,000 columns (independent draws) is that result within 5 standard errors."""
    result, exact = one_sgd_step(half, start, update)
    low, high = neighbours(np.array([exact]), half)
    assert np.all((result == low) | (result == high))
    gap = abs(float(high[0]) - float(low[0]))
    if gap == 0:  # (exact in the 16-bit format: no draw)
        assert np.all(result == exact)
        return
    chance = abs(float(exact) - float(low[0])) / gap
    assert 0 < chance < 1
    standard_error = gap * np.sqrt(chance * (1 - chance) / result.size)
    assert abs(result.astype(np.float64).mean() - float(exact)) < 5 * standard_error


def test_stochastic_rounding_never_overflows_to_infinity(half):
    """Past the largest finite 16-bit value (where rounding to nearest gives infinity),
    stochastic rounding stays at that value; infinities and NaN round to nearest."""
    largest = float(np.finfo(half).max)
    result, _ = one_sgd_step(half, largest, largest * 2**-9, num_columns=100)
    assert np.all(result == largest)
    for special in (np.inf, -np.inf, np.nan):
        result, _ = one_sgd_step(half, special, 1.0, num_columns=10)
        assert_same_bits(result.astype(half), np.full(10, special, half))


def sgd_step_of_one_row(half, row, update):
    """A 1-row table holding ``row`` (16-bit) after one SGD step that adds ``update`` (float32)
    to it, rounded to nearest."""
    module = fastemb.Embedding.from_pretrained(row[None, :], freeze=False)
    optimizer = fastemb.optim.SGD(module, lr=1.0)
    module(np.array([0]))
    module.backward(-update[None, :])
    optimizer.step()
    return module.weight[0]


def test_step_widens_and_rounds_every_16_bit_value_as_numpy_does(half):
    """Every 16-bit value (NaN aside) survives a step that adds zero bit for bit (the widening
    and rounding back, vectorised and in the tail, are exact), and float32 results around
    every 16-bit value round to nearest as NumPy/ml_dtypes round (ties to even, overflow to
    infinity, subnormals). An odd length runs both the vector loops and the tail."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(half)
    every = np.append(every[~np.isnan(every)], every[:7])
    assert_same_bits(sgd_step_of_one_row(half, every, np.zeros(every.size, np.float32)), every)
    finite = every[np.isfinite(every)].astype(np.float32)
    spacing = np.abs(finite) * np.float32(2.0 ** -12 if half == np.float16 else 2.0 ** -9)
    results = np.concatenate([finite, finite + spacing, finite - spacing,
                              finite * np.float32(1 + 2 ** -20),
                              np.array([65520.0, 1e-8], np.float32)])
    zeros = np.zeros(results.size, half)
    with np.errstate(over="ignore"):  # (past the largest 16-bit value: infinity)
        expected = (np.float32(0) + results).astype(half)
    assert_same_bits(sgd_step_of_one_row(half, zeros, results), expected)


def test_small_updates_add_up_only_with_stochastic_rounding(half):
    """Updates of a tenth of the 16-bit spacing are all lost to rounding to nearest; with
    stochastic rounding their sum arrives, on average."""
    spacing = float(np.spacing(half.type(1.0)))

    def train(stochastic):
        module = fastemb.Embedding.from_pretrained(np.ones((1, 2000), half), freeze=False)
        optimizer = fastemb.optim.SGD(module, lr=1.0, stochastic_rounding=stochastic, seed=5)
        for _ in range(50):
            out = module(np.array([0]))
            module.backward(np.full(out.shape, -0.1 * spacing, np.float32))
            optimizer.step()
            optimizer.zero_grad()
        return module.weight.astype(np.float64)

    assert np.all(train(stochastic=False) == 1.0)
    moved = train(stochastic=True).mean() - 1.0
    assert abs(moved - 5 * spacing) < 0.5 * spacing


def run_stochastic_training(half, seed, threads=None, steps=4):
    """Bits of a 16-bit table after a few LazyAdam steps with stochastic rounding."""
    module = fastemb.EmbeddingBag(300, 20, mode="sum", dtype=half, seed=0)
    optimizer = fastemb.optim.LazyAdam(module, lr=1e-3, stochastic_rounding=True, seed=seed)
    if threads is not None:
        fastemb.set_num_threads(threads)
    train_steps(module, optimizer, np.random.default_rng(11), steps)
    return module.weight.view(np.uint16).copy()


def test_stochastic_rounding_is_reproducible_at_any_thread_count(half, thread_count):
    one_thread = run_stochastic_training(half, seed=3, threads=1)
    thread_count(2)
    assert np.array_equal(run_stochastic_training(half, seed=3, threads=2), one_thread)
    assert not np.array_equal(run_stochastic_training(half, seed=4, threads=2), one_thread)
    nearest = fastemb.EmbeddingBag(300, 20, mode="sum", dtype=half, seed=0)
    train_steps(nearest, fastemb.optim.LazyAdam(nearest, lr=1e-3), np.random.default_rng(11), 4)
    assert not np.array_equal(nearest.weight.view(np.uint16), one_thread)


def test_two_tables_of_one_optimizer_draw_differently(half):
    """The same row of two identical tables, stepped by one optimizer with the same gradient,
    rounds with different draws (the table's place in the optimizer is part of the key)."""
    first, second = (fastemb.Embedding.from_pretrained(np.ones((2, 4000), half), freeze=False)
                     for _ in range(2))
    optimizer = fastemb.optim.SGD([first, second], lr=1.0, stochastic_rounding=True)
    spacing = float(np.spacing(half.type(1.0)))
    for module in (first, second):
        out = module(np.array([1]))
        module.backward(np.full(out.shape, -0.5 * spacing, np.float32))
    optimizer.step()
    assert not np.array_equal(first.weight[1].view(np.uint16), second.weight[1].view(np.uint16))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_checkpoint_keeps_a_16_bit_table_and_its_state(half, name, tmp_path, rng):
    info = OPTIMIZERS[name]
    module = fastemb.EmbeddingBag(30, 5, mode="sum", dtype=half, seed=2)
    optimizer = info.cls(module, **SETTINGS[name][0], stochastic_rounding=True, seed=9)
    train_steps(module, optimizer, rng, 3)
    path = os.fspath(tmp_path / "model.npz")
    fastemb.save(path, module, optimizer)
    restored = fastemb.EmbeddingBag(30, 5, mode="sum", dtype=half, seed=8)
    restored_optimizer = info.cls(restored, **SETTINGS[name][0])
    fastemb.load(path, restored, restored_optimizer)
    assert_same_bits(restored.weight, module.weight)
    assert restored_optimizer.hyperparameters == optimizer.hyperparameters
    for state_name in info.cls.state_arrays:
        assert_same_bits(restored_optimizer.state[restored][state_name],
                         optimizer.state[module][state_name])
    # the next steps continue exactly (the same draws: seed, table and step count restored)
    train_steps(module, optimizer, np.random.default_rng(1), 2)
    train_steps(restored, restored_optimizer, np.random.default_rng(1), 2)
    assert_same_bits(restored.weight, module.weight)
    float32_module = fastemb.EmbeddingBag(30, 5, mode="sum")
    with pytest.raises(ValueError, match=f"{half.name}"):
        fastemb.load(path, float32_module)


def test_optimizer_rejects_a_bad_seed_and_a_gradient_not_float32(half):
    module = fastemb.Embedding(5, 3, dtype=half)
    for seed in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="seed"):
            fastemb.optim.SGD(module, lr=0.1, seed=seed)
    optimizer = fastemb.optim.SGD(module, lr=0.1)
    module.grad = fastemb.SparseGrad(np.array([1]), np.ones((1, 3), np.float64), 5)
    before = module.weight.copy()
    with pytest.raises(ValueError, match="does not match"):
        optimizer.step()
    assert_same_bits(module.weight, before)


# --------------------------------------------------------------------------------------------
# Split float32 tables (split=True): bfloat16 top halves for the forward, low halves beside
# --------------------------------------------------------------------------------------------

def truncated(weight):
    """The float32 weights with their low 16 bits cleared: what a split table's forward reads."""
    return (weight.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("setting", [0, 1])
def test_split_step_is_the_float32_step_of_the_weights_exactly(name, setting, rng):
    """Given the same gradient, a split table's step gives the float32 step's weights and state
    bit for bit (the two halves hold the float32 result exactly), step after step."""
    info, hyperparameters = OPTIMIZERS[name], SETTINGS[name][setting]
    split = fastemb.EmbeddingBag(60, 10, mode="sum", seed=4, split=True)
    twin = fastemb.EmbeddingBag.from_pretrained(split.weight, freeze=False, mode="sum")
    optimizer, twin_optimizer = (info.cls(split, **hyperparameters),
                                 info.cls(twin, **hyperparameters))
    for _ in range(5):
        out = split(rng.integers(0, 60, 25), np.array([0, 6, 6, 15]))
        twin.grad = split.backward(rng.standard_normal(out.shape).astype(np.float32))
        optimizer.step()
        twin_optimizer.step()
        optimizer.zero_grad()
        twin_optimizer.zero_grad()
        assert_same_bits(split.weight, twin.weight)
        for state_name in info.cls.state_arrays:
            assert_same_bits(optimizer.state[split][state_name],
                             twin_optimizer.state[twin][state_name])


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_split_forward_and_backward_read_the_truncated_weights(mode, rng):
    """The forward is the float32 forward on the weights truncated to bfloat16 (its top
    halves), and so is the backward; ``.weight`` is the float32 table that training updates."""
    module = fastemb.EmbeddingBag(40, 7, mode=mode, seed=2, split=True)
    weight = module.weight
    assert weight.dtype == np.float32 and module.split
    assert not np.array_equal(weight, truncated(weight))  # (the low halves matter)
    plain = fastemb.EmbeddingBag.from_pretrained(truncated(weight), freeze=False, mode=mode)
    indices, offsets = rng.integers(0, 40, 30), np.array([0, 3, 3, 17])
    assert_same_bits(module(indices, offsets), plain(indices, offsets))
    grad_output = rng.standard_normal((4, 7)).astype(np.float32)
    split_grad, plain_grad = module.backward(grad_output), plain.backward(grad_output)
    assert_same_bits(split_grad.rows, plain_grad.rows)
    assert_same_bits(split_grad.values, plain_grad.values)
    table = fastemb.Embedding(30, 5, seed=1, split=True, padding_idx=3)
    assert not table.weight[3].any()
    assert_same_bits(table(np.array([[3, 7]])).astype(np.float32),
                     truncated(table.weight)[[[3, 7]]])


def test_split_weight_reads_and_assigns_both_halves(rng):
    module = fastemb.Embedding(20, 6, seed=0, split=True)
    assert_same_bits(module.weight, np.random.default_rng(0).standard_normal(
        (20, 6), dtype=np.float32))
    values = rng.standard_normal((20, 6)).astype(np.float32)
    module.weight = values
    assert_same_bits(module.weight, values)
    before = module.weight
    for bad in (values.astype(np.float64), values[:5], values.astype(ml_dtypes.bfloat16)):
        with pytest.raises(ValueError, match="split table"):
            module.weight = bad
    assert_same_bits(module.weight, before)
    assert repr(module) == "Embedding(20, 6, split=True)"
    for options in (dict(dtype=np.float64), dict(dtype=ml_dtypes.bfloat16),
                    dict(max_norm=1.0)):
        with pytest.raises(ValueError, match="split"):
            fastemb.EmbeddingBag(5, 2, split=True, **options)


def test_checkpoint_of_a_split_table_restores_the_float32_weights(tmp_path, rng):
    module = fastemb.EmbeddingBag(30, 5, mode="sum", seed=2, split=True)
    optimizer = fastemb.optim.LazyAdam(module, lr=0.01)
    train_steps(module, optimizer, rng, 3)
    path = os.fspath(tmp_path / "split.npz")
    fastemb.save(path, module, optimizer)
    restored = fastemb.EmbeddingBag(30, 5, mode="sum", seed=5, split=True)
    restored_optimizer = fastemb.optim.LazyAdam(restored, lr=0.01)
    fastemb.load(path, restored, restored_optimizer)
    assert_same_bits(restored.weight, module.weight)
    plain = fastemb.EmbeddingBag(30, 5, mode="sum")  # (the same float32 weights)
    fastemb.load(path, plain)
    assert_same_bits(plain.weight, module.weight)
    train_steps(module, optimizer, np.random.default_rng(1), 2)
    train_steps(restored, restored_optimizer, np.random.default_rng(1), 2)
    assert_same_bits(restored.weight, module.weight)
