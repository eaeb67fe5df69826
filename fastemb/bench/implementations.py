"""The implementations compared: fastemb, torch (when importable), the fastest plain-NumPy way,
and the speed-of-light reference; each gives a zero-argument callable per operation
(:func:`benchmark_callable`), run under a common thread count (:func:`thread_count`) and checked
against fastemb's result (:func:`assert_agrees`)."""

import contextlib
import functools
import math
import os
import sys

import numpy as np

from .._config import get_num_threads, set_num_threads
from .._memory import aligned_full
from ..functional import embedding, embedding_bag
from ..modules import EmbeddingBag
from .speed_of_light import speed_of_light_callable, speed_of_light_library
from .workloads import (FORWARD_OPERATIONS, IMPLEMENTATIONS, OPERATIONS,
                        REDUCED_PRECISION_OPERATIONS, REDUCED_PRECISION_STEP_OPERATIONS,
                        SPEED_OF_LIGHT, STEP_OPERATIONS, aligned_copy, float32_step,
                        step_optimizer, step_state_arrays, table_format, trained_table)

# Operations that every implementation computes the same way (rows added or compared in bag
# order, the mean divides the rounded sum), so all of them agree bit for bit. The others may
# round differently: torch (FBGEMM) fuses w * x + acc into one rounding in the weighted sum,
# gradients are summed in other orders, and optimizers order their float operations differently.
EXACT_OPERATIONS = frozenset({"gather", "bag_sum", "bag_mean", "bag_max"})
ROUNDING_TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}
# torch returns a 16-bit table's bag sums in its dtype: one bfloat16 rounding of sums of about
# 6 in magnitude (NumPy sums the widened rows pairwise). A quantized table's sums are float32
# everywhere (torch fuses scale * q + bias, NumPy sums pairwise): ROUNDING_TOLERANCE.
REDUCED_PRECISION_TOLERANCE = {"rtol": 2.0 ** -7, "atol": 0.05}
# A reduced-precision training step's forward against the float32 one: a split table's reads
# the weights truncated to bfloat16, each up to 2^-7 of itself nearer zero, errors that add
# up over a bag's 32 rows instead of cancelling
REDUCED_PRECISION_STEP_TOLERANCE = {"rtol": 2.0 ** -7, "atol": 0.25}
STEP_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def fastemb_callable(operation, data):
    """fastemb's callable for ``operation``: the functional API for the forward operations, an
    ``EmbeddingBag`` (and a ``fastemb.optim`` optimizer) for the training ones."""
    if operation in FORWARD_OPERATIONS:
        bag = functools.partial(embedding_bag, data.indices, data.table, data.offsets)
        return {
            "gather": lambda: embedding(data.index_matrix, data.table),
            "bag_sum": lambda: bag(mode="sum"),
            "bag_mean": lambda: bag(mode="mean"),
            "bag_weighted_sum": lambda: bag(mode="sum",
                                            per_sample_weights=data.per_sample_weights),
            "bag_max": lambda: bag(mode="max"),
        }[operation]
    if operation in REDUCED_PRECISION_OPERATIONS:  # (a 16-bit array or a QuantizedTable)
        table = data.table_for(operation)
        return lambda: embedding_bag(data.indices, table, data.offsets, mode="sum")
    if operation == "forward_backward":
        module = EmbeddingBag.from_pretrained(data.table, freeze=False, mode="sum")

        def forward_backward():
            module.zero_grad()
            output = module(data.indices, data.offsets)
            grad = module.backward(data.grad_output)
            return output, grad.rows, grad.values

        return forward_backward
    info, hyperparameters = step_optimizer(operation)
    if operation in REDUCED_PRECISION_STEP_OPERATIONS:
        dtype, split = trained_table(operation)
        module = EmbeddingBag(*data.table.shape, mode="sum", dtype=dtype, split=split)
        # on a cache line, as the float32 step's table (a 16-bit row of 64 columns that starts
        # 16 bytes into a line spans 3 lines, not 2); a split table's: both halves set
        module.weight = aligned_copy(data.table.astype(dtype))
    else:
        module = EmbeddingBag.from_pretrained(aligned_copy(data.table), freeze=False, mode="sum")
    optimizer = info.cls(module, **hyperparameters)

    def step():
        optimizer.zero_grad()
        output = module(data.indices, data.offsets)
        module.backward(data.grad_output)
        optimizer.step()
        if operation in REDUCED_PRECISION_STEP_OPERATIONS:
            return output  # (a split table's weight would be put together: O(table))
        return output, module.weight

    return step


def torch_callable(operation, data):
    """torch's callable for ``operation``: ``torch.nn.functional`` for the forward operations,
    ``nn.EmbeddingBag(sparse=True)`` with the sparse-gradient ``torch.optim`` optimizer for the
    training ones; tensors share memory with the NumPy arrays."""
    import torch

    indices = torch.from_numpy(data.indices)
    offsets = torch.from_numpy(data.offsets)
    if operation in FORWARD_OPERATIONS:
        functional = torch.nn.functional
        table = torch.from_numpy(data.table)
        index_matrix = torch.from_numpy(data.index_matrix)
        weights = torch.from_numpy(data.per_sample_weights)

        def bag(mode, per_sample_weights=None):
            return functional.embedding_bag(
                indices, table, offsets, mode=mode, per_sample_weights=per_sample_weights
            ).numpy()

        return {
            "gather": lambda: functional.embedding(index_matrix, table).numpy(),
            "bag_sum": lambda: bag("sum"),
            "bag_mean": lambda: bag("mean"),
            "bag_weighted_sum": lambda: bag("sum", per_sample_weights=weights),
            "bag_max": lambda: bag("max"),
        }[operation]
    if operation in REDUCED_PRECISION_OPERATIONS:
        return torch_reduced_precision_sum(torch, operation, data, indices, offsets)
    grad_output = torch.from_numpy(data.grad_output)
    training = operation != "forward_backward"
    table = aligned_copy(data.table) if training else data.table
    module = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(table), freeze=False,
                                                   mode="sum", sparse=True)
    if not training:
        def forward_backward():
            module.weight.grad = None
            output = module(indices, offsets)
            output.backward(grad_output)
            grad = module.weight.grad.coalesce()
            return output.detach().numpy(), grad.indices()[0].numpy(), grad.values().numpy()

        return forward_backward
    # Opt out of sparse invariant checks explicitly (they are off by default), which silences
    # the warning torch's Adagrad gives for every step.
    torch.sparse.check_sparse_tensor_invariants.disable()
    info, hyperparameters = step_optimizer(operation)
    optimizer = getattr(torch.optim, info.torch_name)(module.parameters(), **hyperparameters)

    def step():
        optimizer.zero_grad()
        output = module(indices, offsets)
        output.backward(grad_output)
        optimizer.step()
        return output.detach().numpy(), module.weight.detach().numpy()

    return step


def torch_reduced_precision_sum(torch, operation, data, indices, offsets):
    """torch's bag sum of the workload's table in the format of ``operation``: a quantized table's
    prepacked bytes (fastemb's, the same as torch's prepack gives) summed by
    ``torch.ops.quantized.embedding_bag_byte_rowwise_offsets`` (8 bits) or
    ``embedding_bag_4bit_rowwise_offsets`` (4 bits); a 16-bit table by ``embedding_bag``, which
    gives the sums in the table dtype."""
    stored = table_format(operation)
    if stored.quantized:
        quantized_sum = {8: torch.ops.quantized.embedding_bag_byte_rowwise_offsets,
                         4: torch.ops.quantized.embedding_bag_4bit_rowwise_offsets}[stored.bits]
        packed = torch.from_numpy(data.table_for(operation).data)
        return lambda: quantized_sum(packed, indices, offsets, mode=0).numpy()
    table = torch.from_numpy(data.table).to(getattr(torch, stored.name))
    return lambda: torch.nn.functional.embedding_bag(indices, table, offsets,
                                                     mode="sum").float().numpy()


def numpy_dequantized_rows(packed_rows, bits):
    """``scale * q + bias`` in float32 of prepacked rows (uint8, ``(..., row_bytes)``): 8 bits,
    the row's codes then float32 scale and bias; 4 bits, two codes a byte (the even column in
    the low nibble) then float16 scale and bias. NumPy has no fused multiply-add: the product
    and the sum are rounded each, within float32 rounding of fastemb's values."""
    tail = 8 if bits == 8 else 4
    scale_bias = np.ascontiguousarray(packed_rows[..., -tail:]).view(
        np.float32 if bits == 8 else np.float16).astype(np.float32)
    codes = packed_rows[..., :-tail]
    if bits == 4:  # (low, high) nibble pairs, flattened into column order
        codes = np.stack((codes & 15, codes >> 4), axis=-1).reshape(*codes.shape[:-1], -1)
    return codes.astype(np.float32) * scale_bias[..., :1] + scale_bias[..., 1:]


def numpy_reduced_precision_sum(operation, data):
    """NumPy's bag sum of the workload's table in the format of ``operation``: ``np.take`` of
    the bags' rows (16-bit, or a quantized table's bytes), widened (dequantized) to float32,
    summed."""
    table = data.table_for(operation)
    if table_format(operation).quantized:
        return lambda: numpy_dequantized_rows(np.take(table.data, data.index_matrix, axis=0),
                                              table.bits).sum(axis=1)
    return lambda: np.take(table, data.index_matrix, axis=0).astype(np.float32).sum(axis=1)


def numpy_bag_sum_and_grad(data, table):
    """The bag sums of ``table`` and their coalesced weight gradient, the fastest plain-NumPy
    way: ``np.unique`` numbers the looked-up rows, and one ``np.add.at`` over the flattened
    ``(unique row, column)`` positions sums the repeated bag gradients (about twice as fast as
    ``np.add.at`` on whole rows, or ``np.add.reduceat`` of the rows sorted by index)."""
    workload = data.workload
    output = np.take(table, data.index_matrix, axis=0).sum(axis=1)
    rows, inverse = np.unique(data.indices, return_inverse=True)
    positions = (inverse[:, None] * workload.dim + np.arange(workload.dim)).reshape(-1)
    values = np.zeros((rows.size, workload.dim), dtype=table.dtype)
    np.add.at(values.reshape(-1), positions,
              np.repeat(data.grad_output, workload.bag_size, axis=0).reshape(-1))
    return output, rows, values


def numpy_sgd(weight, states, rows, values, step, lr):
    """SGD on the gradient's rows."""
    weight[rows] -= lr * values


def numpy_adagrad(weight, states, rows, values, step, lr, eps):
    """Adagrad (no lr decay) on the gradient's rows, as torch's Adagrad with sparse gradients."""
    (state_sum,) = states
    total = state_sum[rows] + values * values
    state_sum[rows] = total
    weight[rows] -= lr * values / (np.sqrt(total) + eps)


def numpy_lazyadam(weight, states, rows, values, step, lr, betas, eps):
    """torch's SparseAdam on the gradient's rows: both moments move toward the gradient, and
    ``eps`` is added to the uncorrected ``sqrt(v)``."""
    exp_avg, exp_avg_sq = states
    beta1, beta2 = betas
    mean = exp_avg[rows]
    mean += (1 - beta1) * (values - mean)
    exp_avg[rows] = mean
    square = exp_avg_sq[rows]
    square += (1 - beta2) * (values * values - square)
    exp_avg_sq[rows] = square
    step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    weight[rows] -= step_size * (mean / (np.sqrt(square) + eps))


NUMPY_UPDATES = {
    "step_lazyadam": numpy_lazyadam,
    "step_sgd": numpy_sgd,
    "step_adagrad": numpy_adagrad,
}


def numpy_callable(operation, data):
    """The fastest plain-NumPy way to do ``operation``: ``np.take`` of the index matrix (about
    twice as fast as ``table[index_matrix]``) and a reduction over the bag axis; for training,
    :func:`numpy_bag_sum_and_grad` and a lazy update of the unique rows by fancy indexing."""
    if operation in FORWARD_OPERATIONS:
        def rows():
            return np.take(data.table, data.index_matrix, axis=0)

        return {
            "gather": rows,
            "bag_sum": lambda: rows().sum(axis=1),
            "bag_mean": lambda: rows().mean(axis=1),
            "bag_weighted_sum": lambda: np.einsum("bl,bld->bd", data.weight_matrix, rows()),
            "bag_max": lambda: rows().max(axis=1),
        }[operation]
    if operation in REDUCED_PRECISION_OPERATIONS:
        return numpy_reduced_precision_sum(operation, data)
    if operation == "forward_backward":
        return functools.partial(numpy_bag_sum_and_grad, data, data.table)
    update = functools.partial(NUMPY_UPDATES[operation], **step_optimizer(operation)[1])
    weight = aligned_copy(data.table)
    states = [aligned_full(weight.shape, 0, weight.dtype)
              for _ in range(step_state_arrays(operation))]
    steps_taken = 0

    def step():
        nonlocal steps_taken
        output, rows, values = numpy_bag_sum_and_grad(data, weight)
        steps_taken += 1
        update(weight, states, rows, values, steps_taken)
        return output, weight

    return step


CALLABLE_BUILDERS = {
    "fastemb": fastemb_callable,
    "torch": torch_callable,
    "numpy": numpy_callable,
    SPEED_OF_LIGHT: speed_of_light_callable,
}


@functools.cache
def torch_is_available():
    """True when torch can be imported (the first call imports it)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def available_implementations():
    """The names in :data:`IMPLEMENTATIONS` that can run here (torch only when importable)."""
    return tuple(name for name in IMPLEMENTATIONS if name != "torch" or torch_is_available())


def speed_of_light_is_available():
    """True when the speed-of-light reference can be built here (gcc is installed)."""
    return speed_of_light_library() is not None


def benchmark_callable(implementation, operation, data):
    """The zero-argument callable that runs ``operation`` on ``data`` with ``implementation``
    (a name in :data:`IMPLEMENTATIONS`, or :data:`SPEED_OF_LIGHT`) and returns its result.

    Building a training step's callable copies the table (and allocates the optimizer state);
    drop the callable to free them.
    """
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {', '.join(OPERATIONS)}; got {operation!r}")
    if implementation not in CALLABLE_BUILDERS:
        raise ValueError(f"implementation must be one of {', '.join(CALLABLE_BUILDERS)}; "
                         f"got {implementation!r}")
    if operation in REDUCED_PRECISION_STEP_OPERATIONS and implementation not in (
            "fastemb", SPEED_OF_LIGHT):
        # (only fastemb trains such tables: the others run their float32 step, and give its
        # forward output, as fastemb's does; the speed of light moves the table's own bytes)
        step = CALLABLE_BUILDERS[implementation](float32_step(operation), data)
        return lambda: step()[0]
    return CALLABLE_BUILDERS[implementation](operation, data)


@contextlib.contextmanager
def thread_count(num_threads):
    """Run the block with fastemb and torch (if it is imported) on ``num_threads`` threads,
    and restore both thread counts afterwards."""
    torch = sys.modules.get("torch")
    saved_fastemb = get_num_threads()
    saved_torch = torch.get_num_threads() if torch is not None else None
    set_num_threads(num_threads)
    if torch is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        set_num_threads(saved_fastemb)
        if torch is not None:
            torch.set_num_threads(saved_torch)


def default_thread_counts():
    """The thread counts benchmarks run with: 1 and all cores."""
    return sorted({1, os.cpu_count() or 1})


def assert_agrees(operation, actual, expected):
    """Raise ``AssertionError`` unless the result ``actual`` of ``operation`` is ``expected``.

    Results are arrays or tuples of arrays, compared part by part, each with the same shape and
    dtype: bit for bit for integer arrays and the operations in :data:`EXACT_OPERATIONS`, else
    to float rounding (:data:`STEP_TOLERANCE` for training steps, :data:`ROUNDING_TOLERANCE`
    otherwise). Only the elements that differ are compared with the tolerance, which keeps the
    check fast on whole tables.
    """
    if isinstance(expected, tuple):
        if not isinstance(actual, tuple) or len(actual) != len(expected):
            raise AssertionError(f"{operation}: expected a tuple of {len(expected)} arrays, got "
                                 f"{type(actual).__name__}")
        for part, (actual_part, expected_part) in enumerate(zip(actual, expected)):
            assert_array_agrees(operation, actual_part, expected_part, f"part {part}")
    else:
        assert_array_agrees(operation, actual, expected, "result")


def assert_array_agrees(operation, actual, expected, name):
    """:func:`assert_agrees` for one array of a result; ``name`` says which in the message."""
    if not isinstance(actual, np.ndarray) or actual.shape != expected.shape \
            or actual.dtype != expected.dtype:
        found = (f"{actual.dtype} {actual.shape}" if isinstance(actual, np.ndarray)
                 else type(actual).__name__)
        raise AssertionError(f"{operation} {name}: expected {expected.dtype} {expected.shape}, "
                             f"got {found}")
    if operation in EXACT_OPERATIONS or expected.dtype.kind in "iub":
        np.testing.assert_array_equal(actual, expected, err_msg=f"{operation} {name}")
        return
    differs = actual != expected
    tolerance = (STEP_TOLERANCE if operation in STEP_OPERATIONS
                 else REDUCED_PRECISION_STEP_TOLERANCE
                 if operation in REDUCED_PRECISION_STEP_OPERATIONS
                 else REDUCED_PRECISION_TOLERANCE if operation in REDUCED_PRECISION_OPERATIONS
                 and not table_format(operation).quantized
                 else ROUNDING_TOLERANCE)
    np.testing.assert_allclose(
        actual[differs], expected[differs], **tolerance,
        err_msg=f"{operation} {name}: {int(differs.sum())} of {differs.size} elements differ",
    )
