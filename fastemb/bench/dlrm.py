"""The DLRM-shaped training step of many tables (``benchmarks/test_dlrm_step.py``).

26 float32 tables of dim 64 with Criteo's (Kaggle) table sizes, each capped at ``max_rows``,
one Zipf-skewed index per sample and table, a batch of 2,048: one step is every table's sum
bag forward, the backward of a fixed upstream gradient, and a lazy optimizer update. The
implementations, each on its own copy of the tables and optimizer state:

- ``fastemb-collection-fused``: ``fastemb.EmbeddingBagCollection``, its optimizer applied in
  the backward (``collection.backward(grad, optimizer)``);
- ``fastemb-collection``: the collection, ``backward`` then ``optimizer.step()``;
- ``fastemb-per-table``: one ``fastemb.EmbeddingBag`` per table, 26 calls per phase;
- ``torch``: one ``torch.nn.EmbeddingBag(sparse=True)`` per table and torch's sparse optimizer
  (``SparseAdam`` for LazyAdam; torch has no row-wise Adagrad);
- ``numpy``: ``np.take`` and ``np.add.at``;
- ``fbgemm``: FBGEMM's table-batched CPU kernels (``SplitTableBatchedEmbeddingBagsCodegen``,
  what TorchRec runs on the CPU), row-wise Adagrad fused into the backward; only where
  ``fbgemm_gpu`` imports (``pip install torch==2.14.1 fbgemm-gpu-cpu==1.9.0``: it does not
  pair with torch 2.13).

Each callable takes one more step and returns the 26 tables; the first call's result is one
step from the shared initial tables, which :func:`assert_tables_agree` compares.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .. import EmbeddingBag, EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedArray, optim
from .workloads import aligned_copy

# The 26 categorical features' cardinalities in Criteo's Kaggle display-advertising data.
CRITEO_TABLE_SIZES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                      8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15,
                      286181, 105, 142572)
# The cap on a table's rows: 26 capped tables of dim 64 take 240 MB per copy at 100,000 (each
# implementation has its own, plus its optimizer state); FASTEMB_DLRM_MAX_ROWS changes it.
DEFAULT_MAX_ROWS = 100_000
OPTIMIZERS = {
    "lazyadam": (optim.LazyAdam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}),
    "rowwise-adagrad": (optim.RowWiseAdagrad, {"lr": 0.01, "eps": 1e-10}),
}
IMPLEMENTATIONS = ("fastemb-collection-fused", "fastemb-collection", "fastemb-per-table",
                   "torch", "numpy", "fbgemm")


@dataclass
class DlrmData:
    """The tables' initial weights, one batch of indices ``(26, B)`` and the upstream gradient
    ``(B, 26 * dim)``."""

    weights: list
    indices: np.ndarray
    grad_output: np.ndarray

    @property
    def batch_size(self):
        return self.indices.shape[1]


def max_rows_from_environment():
    """The benchmarks' cap on a table's rows: ``FASTEMB_DLRM_MAX_ROWS``, or
    :data:`DEFAULT_MAX_ROWS`."""
    return int(os.environ.get("FASTEMB_DLRM_MAX_ROWS", DEFAULT_MAX_ROWS))


def make_data(max_rows=None, batch_size=2048, dim=64, seed=0):
    """The step's data: Criteo's table sizes capped at ``max_rows`` (default
    :func:`max_rows_from_environment`), Zipf(1.2) indices."""
    if max_rows is None:
        max_rows = max_rows_from_environment()
    rng = np.random.default_rng(seed)
    sizes = [min(size, max_rows) for size in CRITEO_TABLE_SIZES]
    weights = [rng.standard_normal((size, dim), dtype=np.float32) * 0.01 for size in sizes]
    indices = np.stack([(rng.zipf(1.2, batch_size) - 1) % size for size in sizes])
    grad_output = rng.standard_normal((batch_size, len(sizes) * dim), dtype=np.float32)
    return DlrmData(weights, indices.astype(np.int64), grad_output)


def fastemb_step(implementation, optimizer_name, data):
    """A step of one of the fastemb implementations."""
    cls, hyperparameters = OPTIMIZERS[optimizer_name]
    dim = data.weights[0].shape[1]
    if implementation == "fastemb-per-table":
        modules = [EmbeddingBag.from_pretrained(aligned_copy(weight), freeze=False, mode="sum")
                   for weight in data.weights]
        optimizer = cls(modules, **hyperparameters)
        offsets = np.arange(data.batch_size, dtype=np.int64)

        def step():
            for module, indices in zip(modules, data.indices):
                module(indices, offsets)
            for t, module in enumerate(modules):
                module.backward(data.grad_output[:, t * dim:(t + 1) * dim])
            optimizer.step()
            optimizer.zero_grad()
            return [module.weight for module in modules]

        return step
    names = [f"table_{t}" for t in range(len(data.weights))]
    collection = EmbeddingBagCollection([EmbeddingBagConfig(name, weight.shape[0], dim)
                                         for name, weight in zip(names, data.weights)])
    for module, weight in zip(collection.tables, data.weights):
        module.weight[...] = weight
    optimizer = cls(collection, **hyperparameters)
    features = KeyedJaggedArray(names, data.indices.reshape(-1),
                                lengths=np.ones(data.indices.size, dtype=np.int64))
    fused = implementation == "fastemb-collection-fused"

    def step():
        collection(features)
        if fused:
            collection.backward(data.grad_output, optimizer)
        else:
            collection.backward(data.grad_output)
            optimizer.step()
            collection.zero_grad()
        return [module.weight for module in collection.tables]

    return step


def torch_step(optimizer_name, data):
    """torch's step: ``nn.EmbeddingBag(sparse=True)`` per table, ``SparseAdam``."""
    import torch

    if optimizer_name != "lazyadam":
        return None  # (torch has no row-wise Adagrad)
    hyperparameters = OPTIMIZERS[optimizer_name][1]
    modules = [torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(weight.copy()),
                                                     freeze=False, mode="sum", sparse=True)
               for weight in data.weights]
    optimizer = torch.optim.SparseAdam([module.weight for module in modules], **hyperparameters)
    indices = [torch.from_numpy(row.copy()) for row in data.indices]
    offsets = torch.arange(data.batch_size)
    grad_output = torch.from_numpy(data.grad_output)

    def step():
        output = torch.cat([module(rows, offsets) for module, rows in zip(modules, indices)],
                           dim=1)
        output.backward(grad_output)
        optimizer.step()
        optimizer.zero_grad()
        return [module.weight.detach().numpy() for module in modules]

    return step


def fbgemm_is_available():
    """Whether FBGEMM's table-batched embedding ops import (with their torch)."""
    try:
        import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401
    except Exception:  # (absent, or built for another torch: its ops fail to load)
        return False
    return True


def fbgemm_step(optimizer_name, data):
    """FBGEMM's step: one ``SplitTableBatchedEmbeddingBagsCodegen`` over every table, on the
    CPU, its row-wise Adagrad applied in the backward (FBGEMM's CPU training has no Adam)."""
    if optimizer_name != "rowwise-adagrad":
        return None
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (EmbeddingLocation,
                                                                      PoolingMode)
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
    hyperparameters = OPTIMIZERS[optimizer_name][1]
    tables = SplitTableBatchedEmbeddingBagsCodegen(
        [(weight.shape[0], weight.shape[1], EmbeddingLocation.HOST, ComputeDevice.CPU)
         for weight in data.weights],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, pooling_mode=PoolingMode.SUM,
        learning_rate=hyperparameters["lr"], eps=hyperparameters["eps"])
    for table, weight in zip(tables.split_embedding_weights(), data.weights):
        table.copy_(torch.from_numpy(weight))
    for state in tables.split_optimizer_states():
        state[0].zero_()
    indices = torch.from_numpy(data.indices.reshape(-1).copy())
    offsets = torch.arange(data.indices.size + 1)  # (one index per bag, table by table)
    grad_output = torch.from_numpy(data.grad_output)

    def step():
        tables(indices, offsets).backward(grad_output)
        return [table.numpy() for table in tables.split_embedding_weights()]

    return step


def numpy_step(optimizer_name, data):
    """The step in plain NumPy: ``np.take`` for the bags of one index, ``np.unique`` and
    ``np.add.at`` for each table's coalesced gradient, then the lazy update of its rows."""
    hyperparameters = OPTIMIZERS[optimizer_name][1]
    weights = [weight.copy() for weight in data.weights]
    dim = weights[0].shape[1]
    if optimizer_name == "lazyadam":
        states = [(np.zeros_like(weight), np.zeros_like(weight)) for weight in weights]
    else:
        states = [(np.zeros((weight.shape[0], 1), np.float32),) for weight in weights]
    steps = [0]

    def step():
        steps[0] += 1
        for t, (weight, rows) in enumerate(zip(weights, data.indices)):
            np.take(weight, rows, axis=0)  # (the forward: a bag of one index is its row)
            unique, inverse = np.unique(rows, return_inverse=True)
            values = np.zeros((unique.size, dim), np.float32)
            np.add.at(values, inverse, data.grad_output[:, t * dim:(t + 1) * dim])
            if optimizer_name == "lazyadam":
                lazyadam_rows(weight, states[t], unique, values, steps[0], **hyperparameters)
            else:
                rowwise_adagrad_rows(weight, states[t], unique, values, **hyperparameters)
        return weights

    return step


def lazyadam_rows(weight, states, rows, values, step, lr, betas, eps):
    """torch's SparseAdam on the gradient's rows."""
    exp_avg, exp_avg_sq = states
    beta1, beta2 = betas
    mean = exp_avg[rows] + (1 - beta1) * (values - exp_avg[rows])
    square = exp_avg_sq[rows] + (1 - beta2) * (values * values - exp_avg_sq[rows])
    exp_avg[rows], exp_avg_sq[rows] = mean, square
    step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    weight[rows] -= step_size * (mean / (np.sqrt(square) + eps))


def rowwise_adagrad_rows(weight, states, rows, values, lr, eps):
    """Row-wise Adagrad on the gradient's rows."""
    (accumulator,) = states
    accumulator[rows] += np.mean(values.astype(np.float64) ** 2, axis=1,
                                 keepdims=True).astype(np.float32)
    weight[rows] -= lr * values / (np.sqrt(accumulator[rows]) + eps)


def step_callable(implementation, optimizer_name, data):
    """A zero-argument callable taking one step of ``implementation``; None where it has no
    such optimizer (torch and row-wise Adagrad, FBGEMM and LazyAdam)."""
    if implementation == "torch":
        return torch_step(optimizer_name, data)
    if implementation == "numpy":
        return numpy_step(optimizer_name, data)
    if implementation == "fbgemm":
        return fbgemm_step(optimizer_name, data)
    return fastemb_step(implementation, optimizer_name, data)


def assert_tables_agree(actual, expected, implementation):
    """Raise AssertionError unless the tables after one step agree to float rounding."""
    assert len(actual) == len(expected), implementation
    for t, (mine, theirs) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-6,
                                   err_msg=f"{implementation}: table {t} after one step")
