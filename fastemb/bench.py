"""Benchmark workloads for fastemb, the baselines they are compared with, and the
``python -m fastemb bench`` report.

This module is the one definition of what is benchmarked; ``python -m fastemb bench``
(:func:`report`) and the pytest-benchmark suite in ``benchmarks/`` both build on it. It needs
only NumPy: torch is used when it is importable and left out otherwise, and the speed-of-light
reference is compiled with gcc when gcc is installed.

A workload is a float32 table and a batch of ``num_bags`` bags of ``bag_size`` indices each,
drawn uniformly or Zipf-skewed (:class:`Workload`, :data:`WORKLOADS`, :func:`make_data`). For
each operation in :data:`OPERATIONS` every implementation in :data:`IMPLEMENTATIONS` gives a
zero-argument callable (:func:`benchmark_callable`) whose result is NumPy arrays:

- ``gather``: the rows of every index, shape ``(num_bags, bag_size, dim)``;
- ``bag_sum``, ``bag_mean``, ``bag_max``: each bag reduced to one row, shape ``(num_bags, dim)``;
- ``bag_weighted_sum``: the sum of each bag's rows times the per-sample weights;
- ``forward_backward``: the bag sums, then the coalesced weight gradient for the upstream
  gradient ``grad_output``: ``(output, rows, values)`` with ``rows`` sorted and unique;
- ``step_lazyadam``, ``step_sgd``, ``step_adagrad``: one training step of the bag sum (forward,
  backward with ``grad_output``, a lazy optimizer update of the looked-up rows, see
  :data:`STEP_OPTIMIZERS`) on the implementation's own copy of the table and optimizer state:
  ``(output, weight)``, where ``weight`` is that copy after the step. Each call takes one more
  step from where the last one left off; the work of a step does not depend on the values, so
  timing repeated calls is fair, and the first call's result is one step from the shared table.

fastemb and torch take the indices flat, with bag-start ``offsets``; NumPy takes them as a
``(num_bags, bag_size)`` matrix, which is the fastest way NumPy has to reduce equal-sized bags.
Run the callables inside :func:`thread_count` so that fastemb, torch and the speed-of-light
reference use the same number of threads (NumPy always runs on one), and check each result
against fastemb's with :func:`assert_agrees` so that a fast but wrong implementation cannot win.

Next to them, :data:`SPEED_OF_LIGHT` names plain C loops that move only the table-sized bytes
an operation cannot avoid (:func:`speed_of_light_callable`); a kernel's time relative to it is
how close the kernel is to what memory allows. It is a plain loop, not a proof: where the rows
come from the caches (a small table, hot Zipf rows) a tighter kernel can beat it.

>>> from fastemb import bench
>>> data = bench.make_data(bench.Workload("tiny", 100, 8, num_bags=4, bag_size=3))
>>> with bench.thread_count(1):
...     expected = bench.benchmark_callable("fastemb", "bag_sum", data)()
...     result = bench.benchmark_callable("numpy", "bag_sum", data)()
>>> bench.assert_agrees("bag_sum", result, expected)
>>> result.shape
(4, 8)
"""

import contextlib
import ctypes
import datetime
import functools
import json
import math
import os
import pathlib
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import optim
from ._config import __version__, get_num_threads, set_num_threads
from ._kernels import kernels as _core
from ._kernels import variant as _kernel_variant
from ._memory import aligned_full
from .functional import embedding, embedding_bag
from .modules import EmbeddingBag

FORWARD_OPERATIONS = ("gather", "bag_sum", "bag_mean", "bag_weighted_sum", "bag_max")
STEP_OPERATIONS = ("step_lazyadam", "step_sgd", "step_adagrad")
OPERATIONS = FORWARD_OPERATIONS + ("forward_backward",) + STEP_OPERATIONS
IMPLEMENTATIONS = ("fastemb", "torch", "numpy")
SPEED_OF_LIGHT = "speed_of_light"
SKEWS = ("uniform", "zipf")

# Zipf skew: rank r (1-based) is drawn with probability proportional to r ** -ZIPF_EXPONENT.
ZIPF_EXPONENT = 1.05

# The optimizer of each training step: its fastemb.optim and torch.optim class names and the
# hyperparameters all implementations use (the NumPy step reads them too).
STEP_OPTIMIZERS = {
    "step_lazyadam": ("LazyAdam", "SparseAdam", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}),
    "step_sgd": ("SGD", "SGD", {"lr": 0.01}),
    "step_adagrad": ("Adagrad", "Adagrad", {"lr": 0.01, "eps": 1e-10}),
}

# Operations that every implementation computes the same way (rows added or compared in bag
# order, the mean divides the rounded sum), so all of them agree bit for bit. The others may
# round differently: torch (FBGEMM) fuses w * x + acc into one rounding in the weighted sum,
# gradients are summed in other orders, and optimizers order their float operations differently.
EXACT_OPERATIONS = frozenset({"gather", "bag_sum", "bag_mean", "bag_max"})
ROUNDING_TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}
STEP_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


@dataclass(frozen=True)
class Workload:
    """One benchmark shape: a ``num_embeddings x dim`` float32 table and ``num_bags`` bags of
    ``bag_size`` indices, drawn with ``skew`` "uniform" or "zipf"."""

    name: str
    num_embeddings: int
    dim: int
    num_bags: int
    bag_size: int
    skew: str = "uniform"

    def __post_init__(self):
        if self.skew not in SKEWS:
            raise ValueError(f"skew must be one of {', '.join(SKEWS)}; got {self.skew!r}")

    @property
    def label(self):
        """A short unique name, e.g. ``"large-zipf"``."""
        return f"{self.name}-{self.skew}"

    @property
    def num_indices(self):
        """How many rows one call looks up."""
        return self.num_bags * self.bag_size

    @property
    def row_bytes(self):
        """How many bytes of table rows one call reads."""
        return self.num_indices * self.dim * np.dtype(np.float32).itemsize

    def describe(self):
        """One line, e.g. ``"1,000,000 x 64 table, 4096 bags of 32 zipf indices"``."""
        return (f"{self.num_embeddings:,} x {self.dim} table, {self.num_bags} bags of "
                f"{self.bag_size} {self.skew} indices")


# "large": the reference workload, a 256 MB table far larger than the caches. "small": the same
# batch on a 2.5 MB table, which fits the shared L3 cache but not a core's own caches.
# "narrow": a 128 MB table of 32 float32 columns (the train command's size), where each row
# is 2 cache lines and the per-row work weighs more. "wide": a 100 MB table of 1 KB rows,
# where each looked-up row is many cache lines.
WORKLOADS = (
    Workload("small", 10_000, 64, num_bags=4096, bag_size=32, skew="uniform"),
    Workload("large", 1_000_000, 64, num_bags=4096, bag_size=32, skew="uniform"),
    Workload("large", 1_000_000, 64, num_bags=4096, bag_size=32, skew="zipf"),
    Workload("narrow", 1_000_000, 32, num_bags=4096, bag_size=32, skew="uniform"),
    Workload("wide", 100_000, 256, num_bags=4096, bag_size=32, skew="uniform"),
)


@dataclass(frozen=True)
class BenchData:
    """The arrays of one workload: the table, the flat indices with their bag-start offsets,
    one float32 weight per index, and the upstream gradient of the bag outputs."""

    workload: Workload
    table: np.ndarray               # (num_embeddings, dim) float32
    indices: np.ndarray             # (num_indices,) int64
    offsets: np.ndarray             # (num_bags,) int64: bag b starts at indices[offsets[b]]
    per_sample_weights: np.ndarray  # (num_indices,) float32
    grad_output: np.ndarray         # (num_bags, dim) float32

    @property
    def index_matrix(self):
        """The indices as a ``(num_bags, bag_size)`` view, one bag per row."""
        return self.indices.reshape(self.workload.num_bags, self.workload.bag_size)

    @property
    def weight_matrix(self):
        """The per-sample weights as a ``(num_bags, bag_size)`` view, one bag per row."""
        return self.per_sample_weights.reshape(self.workload.num_bags, self.workload.bag_size)


def sample_rows(rng, num_embeddings, size, skew):
    """Draw ``size`` int64 row ids in ``[0, num_embeddings)`` from ``rng``.

    "uniform" draws every row with the same probability. "zipf" draws popularity rank r with
    probability proportional to ``r ** -ZIPF_EXPONENT`` and maps ranks to rows through a random
    permutation, so the hot rows are scattered over the table rather than packed at its start.
    """
    if skew == "uniform":
        return rng.integers(0, num_embeddings, size=size, dtype=np.int64)
    if skew == "zipf":
        popularity = np.arange(1, num_embeddings + 1, dtype=np.float64) ** -ZIPF_EXPONENT
        ranks = rng.choice(num_embeddings, size=size, p=popularity / popularity.sum())
        return rng.permutation(num_embeddings)[ranks].astype(np.int64, copy=False)
    raise ValueError(f"skew must be one of {', '.join(SKEWS)}; got {skew!r}")


@functools.lru_cache(maxsize=2)
def make_table(num_embeddings, dim, seed):
    """A standard-normal float32 table, the same for a given (shape, seed); cached, because the
    large table is 256 MB and shared by its uniform and Zipf workloads. Its data starts on a
    64-byte boundary, as the tables torch and fastemb allocate themselves do."""
    table = aligned_full((num_embeddings, dim), 0, np.float32)
    return np.random.default_rng(seed).standard_normal(dtype=np.float32, out=table)


def aligned_copy(array):
    """A copy of ``array`` whose data starts on a 64-byte boundary (see ``make_table``)."""
    copy = aligned_full(array.shape, 0, array.dtype)
    np.copyto(copy, array)
    return copy


@functools.lru_cache(maxsize=4)
def make_data(workload, seed=0):
    """Build the arrays of ``workload`` (a :class:`BenchData`), deterministically from ``seed``.

    The result is cached per (workload, seed), so repeated calls are free. Callers must not
    modify the arrays.
    """
    table = make_table(workload.num_embeddings, workload.dim, seed)
    # An index stream of its own, so the indices do not depend on how the table was drawn.
    rng = np.random.default_rng([seed, 1])
    indices = sample_rows(rng, workload.num_embeddings, workload.num_indices, workload.skew)
    offsets = np.arange(0, workload.num_indices, workload.bag_size, dtype=np.int64)
    per_sample_weights = rng.random(workload.num_indices, dtype=np.float32)
    grad_output = rng.standard_normal((workload.num_bags, workload.dim), dtype=np.float32)
    return BenchData(workload, table, indices, offsets, per_sample_weights, grad_output)


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
    if operation == "forward_backward":
        module = EmbeddingBag.from_pretrained(data.table, freeze=False, mode="sum")

        def forward_backward():
            module.zero_grad()
            output = module(data.indices, data.offsets)
            grad = module.backward(data.grad_output)
            return output, grad.rows, grad.values

        return forward_backward
    optimizer_name, _, hyperparameters = STEP_OPTIMIZERS[operation]
    module = EmbeddingBag.from_pretrained(aligned_copy(data.table), freeze=False, mode="sum")
    optimizer = getattr(optim, optimizer_name)(module, **hyperparameters)

    def step():
        optimizer.zero_grad()
        output = module(data.indices, data.offsets)
        module.backward(data.grad_output)
        optimizer.step()
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
    _, optimizer_name, hyperparameters = STEP_OPTIMIZERS[operation]
    optimizer = getattr(torch.optim, optimizer_name)(module.parameters(), **hyperparameters)

    def step():
        optimizer.zero_grad()
        output = module(indices, offsets)
        output.backward(grad_output)
        optimizer.step()
        return output.detach().numpy(), module.weight.detach().numpy()

    return step


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


def step_state_arrays(operation):
    """How many table-sized state arrays the optimizer of a training step keeps."""
    return len(getattr(optim, STEP_OPTIMIZERS[operation][0]).state_arrays)


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
    if operation == "forward_backward":
        return functools.partial(numpy_bag_sum_and_grad, data, data.table)
    update = functools.partial(NUMPY_UPDATES[operation], **STEP_OPTIMIZERS[operation][2])
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


SPEED_OF_LIGHT_SOURCE = r"""
/* Speed-of-light references (fastemb/bench.py): plain OpenMP loops that move the bytes of
 * looked-up table rows and do as little else as possible. Every cache line of the row
 * `distance` positions ahead is prefetched (a row that does not start on a line boundary spans
 * one line more), with about 8 KB in flight. */
#include <stdint.h>
#include <string.h>

#define CACHE_LINE 64
#define LANES 16  /* 32-bit words ORed at once */

static int64_t prefetch_distance(int64_t row_bytes)
{
    int64_t rows = 8192 / (row_bytes > 0 ? row_bytes : 1);
    return rows < 8 ? 8 : rows > 64 ? 64 : rows;
}

static inline void prefetch_for_read(const void *start, int64_t bytes)
{
    uintptr_t line = (uintptr_t)start & ~(uintptr_t)(CACHE_LINE - 1);
    for (; line < (uintptr_t)start + bytes; line += CACHE_LINE)
        __builtin_prefetch((const void *)line, 0, 3);
}

static inline void prefetch_for_write(const void *start, int64_t bytes)
{
    uintptr_t line = (uintptr_t)start & ~(uintptr_t)(CACHE_LINE - 1);
    for (; line < (uintptr_t)start + bytes; line += CACHE_LINE)
        __builtin_prefetch((const void *)line, 1, 3);
}

/* Read rows[0:n] of a table of 32-bit words, ORing them into LANES + 1 words of sink so that
 * the loads cannot be optimized away. */
void sol_read(const uint32_t *table, int64_t dim, const int64_t *rows, int64_t n,
              uint32_t *sink, int num_threads)
{
    const int64_t distance = prefetch_distance(dim * 4);
    memset(sink, 0, (LANES + 1) * sizeof *sink);
    #pragma omp parallel num_threads(num_threads)
    {
        uint32_t acc[LANES] = {0};
        uint32_t tail = 0;  /* a separate word, so that acc stays in vector registers */
        #pragma omp for schedule(static)
        for (int64_t k = 0; k < n; k++) {
            if (k + distance < n)
                prefetch_for_read(table + rows[k + distance] * dim, dim * 4);
            const uint32_t *row = table + rows[k] * dim;
            int64_t j = 0;
            for (; j + LANES <= dim; j += LANES)
                for (int lane = 0; lane < LANES; lane++)
                    acc[lane] |= row[j + lane];
            for (; j < dim; j++)
                tail |= row[j];
        }
        #pragma omp critical
        {
            for (int lane = 0; lane < LANES; lane++)
                sink[lane] |= acc[lane];
            sink[LANES] |= tail;
        }
    }
}

/* out[k, :] = table[rows[k], :] for k in [0, n). */
void sol_copy(const float *table, int64_t dim, const int64_t *rows, int64_t n, float *out,
              int num_threads)
{
    const int64_t distance = prefetch_distance(dim * 4);
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t k = 0; k < n; k++) {
        if (k + distance < n)
            prefetch_for_read(table + rows[k + distance] * dim, dim * 4);
        memcpy(out + k * dim, table + rows[k] * dim, dim * sizeof(float));
    }
}

/* Add 1 to rows[0:n] (unique) of each of the num_arrays tables: read and write each row once. */
void sol_update(float *const *arrays, int num_arrays, int64_t dim, const int64_t *rows,
                int64_t n, int num_threads)
{
    const int64_t distance = prefetch_distance(dim * 4 * num_arrays);
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t k = 0; k < n; k++) {
        for (int a = 0; a < num_arrays; a++) {
            if (k + distance < n)
                prefetch_for_write(arrays[a] + rows[k + distance] * dim, dim * 4);
            float *row = arrays[a] + rows[k] * dim;
            for (int64_t j = 0; j < dim; j++)
                row[j] += 1.0f;
        }
    }
}
"""
SPEED_OF_LIGHT_SINK_WORDS = 17  # LANES + 1 in the C source


def compile_c_library(source):
    """Compile C ``source`` (text) into a shared library and load it with ctypes; None when
    gcc is not installed.

    It is built with the flags fastemb's kernels were built with (as ``fastemb.show_config()``
    reports them; by default the portable ``-O3 -ffp-contract=off -fopenmp``), so comparisons
    with it are between loops, not compiler settings.
    """
    compiler = shutil.which("gcc")
    if compiler is None:
        return None
    flags = shlex.split(_core.compile_flags()) + ["-shared", "-fPIC"]
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory) / "library.so"
        subprocess.run([compiler, *flags, "-o", str(path), "-x", "c", "-"], input=source,
                       text=True, check=True, capture_output=True)
        return ctypes.CDLL(str(path))  # the loaded library outlives its file


@functools.cache
def speed_of_light_library():
    """The compiled :data:`SPEED_OF_LIGHT_SOURCE` with its argument types set (built once per
    process), or None when gcc is not installed."""
    library = compile_c_library(SPEED_OF_LIGHT_SOURCE)
    if library is None:
        return None
    i64, pointer, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    library.sol_read.argtypes = [pointer, i64, pointer, i64, pointer, c_int]
    library.sol_copy.argtypes = [pointer, i64, pointer, i64, pointer, c_int]
    library.sol_update.argtypes = [pointer, c_int, i64, pointer, i64, c_int]
    for function in (library.sol_read, library.sol_copy, library.sol_update):
        function.restype = None
    return library


def speed_of_light_callable(operation, data):
    """The speed-of-light reference for ``operation``: plain parallel C loops (on fastemb's
    thread count) that move only the table-sized bytes the operation cannot avoid.

    - ``gather``: copy the looked-up rows into a preallocated buffer;
    - the bag reductions: read the looked-up rows;
    - ``forward_backward``: read the looked-up rows, then write one row of ``grad_output`` per
      unique index into a preallocated gradient;
    - the training steps: read the looked-up rows of a private copy of the table, then read and
      write once each unique row of that copy and of the optimizer's state arrays.

    Small reads (offsets, per-sample weights, ``grad_output``) and the work of finding the
    unique rows are not counted. Its result is not checked. Raises RuntimeError without gcc.
    """
    library = speed_of_light_library()
    if library is None:
        raise RuntimeError("the speed-of-light reference needs gcc, which is not installed")
    indices, dim = data.indices, data.workload.dim
    sink = np.zeros(SPEED_OF_LIGHT_SINK_WORDS, dtype=np.uint32)

    def read(table):
        library.sol_read(table.ctypes.data, dim, indices.ctypes.data, indices.size,
                         sink.ctypes.data, get_num_threads())

    if operation == "gather":
        out = np.empty((indices.size, dim), dtype=np.float32)

        def copy_rows():
            library.sol_copy(data.table.ctypes.data, dim, indices.ctypes.data, indices.size,
                             out.ctypes.data, get_num_threads())
            return out

        return copy_rows
    if operation in FORWARD_OPERATIONS:
        return lambda: read(data.table)
    rows, first = np.unique(indices, return_index=True)
    if operation == "forward_backward":
        source_bags = np.searchsorted(data.offsets, first, side="right") - 1
        values = np.empty((rows.size, dim), dtype=np.float32)

        def forward_backward():
            read(data.table)
            library.sol_copy(data.grad_output.ctypes.data, dim, source_bags.ctypes.data,
                             rows.size, values.ctypes.data, get_num_threads())
            return values

        return forward_backward
    arrays = [aligned_copy(data.table)]
    arrays += [aligned_full(data.table.shape, 0, data.table.dtype)
               for _ in range(step_state_arrays(operation))]
    pointers = (ctypes.c_void_p * len(arrays))(*(array.ctypes.data for array in arrays))

    def step():
        read(arrays[0])
        library.sol_update(pointers, len(arrays), dim, rows.ctypes.data, rows.size,
                           get_num_threads())
        return arrays[0]

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
    tolerance = STEP_TOLERANCE if operation in STEP_OPERATIONS else ROUNDING_TOLERANCE
    np.testing.assert_allclose(
        actual[differs], expected[differs], **tolerance,
        err_msg=f"{operation} {name}: {int(differs.sum())} of {differs.size} elements differ",
    )


# --------------------------------------------------------------------------------------------
# The report of ``python -m fastemb bench``
# --------------------------------------------------------------------------------------------

def workload_names():
    """What ``--sizes`` accepts: each workload name (all its skews) and each label."""
    names = dict.fromkeys(workload.name for workload in WORKLOADS)
    names.update(dict.fromkeys(workload.label for workload in WORKLOADS))
    return tuple(names)


def select_workloads(names):
    """The workloads of :data:`WORKLOADS` whose name or label is in ``names``, in that order."""
    unknown = set(names) - set(workload_names())
    if unknown:
        raise ValueError(f"unknown sizes {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(workload_names())}")
    return tuple(workload for workload in WORKLOADS
                 if workload.name in names or workload.label in names)


@dataclass
class Measurement:
    """The times of every implementation on one operation, workload and thread count."""

    operation: str
    workload: Workload
    threads: int
    runs: dict = field(default_factory=dict)  # implementation -> seconds of each timed call

    def seconds(self, implementation):
        """The median time of ``implementation``, or None if it did not run."""
        runs = self.runs.get(implementation)
        return statistics.median(runs) if runs else None

    def ratio(self, numerator, denominator):
        """``seconds(numerator) / seconds(denominator)``, or None if either did not run."""
        top, bottom = self.seconds(numerator), self.seconds(denominator)
        return None if top is None or bottom is None else top / bottom

    def speedup(self, baseline):
        """How many times faster fastemb is than ``baseline``."""
        return self.ratio(baseline, "fastemb")

    def fraction_of_speed_of_light(self, implementation):
        """The speed-of-light time over ``implementation``'s (1.0: as fast as memory allows)."""
        return self.ratio(SPEED_OF_LIGHT, implementation)

    def as_dict(self):
        """The measurement as JSON-ready data."""
        implementations = [name for name in (*IMPLEMENTATIONS, SPEED_OF_LIGHT)
                           if name in self.runs]
        return {
            "operation": self.operation,
            "workload": self.workload.label,
            **asdict(self.workload),
            "threads": self.threads,
            "median_seconds": {name: self.seconds(name) for name in implementations},
            "runs_seconds": {name: self.runs[name] for name in implementations},
            "speedup_over_torch": self.speedup("torch"),
            "speedup_over_numpy": self.speedup("numpy"),
            "fraction_of_speed_of_light": {name: self.fraction_of_speed_of_light(name)
                                           for name in IMPLEMENTATIONS if name in self.runs},
        }


WARMUP_SECONDS = 0.1
SETTLE_SECONDS = 0.02


def call_for(function, seconds):
    """Call ``function`` once, then again until ``seconds`` have passed since the first call."""
    end = time.perf_counter() + seconds
    function()
    while time.perf_counter() < end:
        function()


def time_calls(functions, repeat):
    """The seconds of each of ``repeat`` calls of each function in ``functions`` (a dict), after
    untimed warm-up calls (at least one each, for at least :data:`WARMUP_SECONDS`: the first
    calls that allocate large outputs can be ten times slower while the allocator and page
    tables settle). The functions take turns, a round at a time, so that a slow spell of a
    shared machine slows them all alike and their ratios stay fair. In its turn a function is
    first called untimed, for at least :data:`SETTLE_SECONDS`, so that the timed call runs as in
    a loop of back-to-back calls: with its data in the caches, and past the wake of the function
    before it. (A large NumPy reference slows the next 5 or so millisecond-long calls of any
    implementation, by up to 2x on the first: with a single untimed call, whichever
    implementation came first in a round looked 10-25% slower on the Zipf bag sum.)"""
    for function in functions.values():
        call_for(function, WARMUP_SECONDS)
    times = {name: [] for name in functions}
    for _ in range(repeat):
        for name, function in functions.items():
            call_for(function, SETTLE_SECONDS)
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def measure(operation, data, thread_counts, repeat, expected):
    """Check and time every available implementation, and the speed-of-light reference, on
    ``operation`` and ``data`` at each thread count; one :class:`Measurement` per count.

    Each implementation's first call is checked against ``expected`` (fastemb's result); then
    all of them are timed in turns (see :func:`time_calls`), so a training step has one copy of
    the table and its optimizer state per implementation alive at once (about 3 GB for the
    large workload with LazyAdam).
    """
    implementations = available_implementations()
    if speed_of_light_is_available():
        implementations += (SPEED_OF_LIGHT,)
    measurements = []
    for threads in thread_counts:
        measurement = Measurement(operation, data.workload, threads)
        with thread_count(threads):
            functions = {}
            for implementation in implementations:
                functions[implementation] = benchmark_callable(implementation, operation, data)
                result = functions[implementation]()
                if implementation != SPEED_OF_LIGHT:
                    assert_agrees(operation, result, expected)
                del result
            measurement.runs.update(time_calls(functions, repeat))
        del functions
        measurements.append(measurement)
    return measurements


def format_seconds(seconds):
    """``"480 us"``, ``"12.34 ms"`` or ``"1.20 s"``; ``"-"`` for None."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_ratio(value, percent=False):
    """``"2.50x"`` or ``"85%"``, or ``"-"`` for None."""
    if value is None:
        return "-"
    return f"{value:.0%}" if percent else f"{value:.2f}x"


TABLE_COLUMNS = (
    # (heading, width, cell of a Measurement)
    ("operation", 17, lambda m: m.operation),
    ("fastemb", 10, lambda m: format_seconds(m.seconds("fastemb"))),
    ("torch", 10, lambda m: format_seconds(m.seconds("torch"))),
    ("numpy", 10, lambda m: format_seconds(m.seconds("numpy"))),
    ("light", 10, lambda m: format_seconds(m.seconds(SPEED_OF_LIGHT))),
    ("vs torch", 9, lambda m: format_ratio(m.speedup("torch"))),
    ("vs numpy", 9, lambda m: format_ratio(m.speedup("numpy"))),
    ("fastemb/light", 14, lambda m: format_ratio(m.fraction_of_speed_of_light("fastemb"), True)),
    ("torch/light", 12, lambda m: format_ratio(m.fraction_of_speed_of_light("torch"), True)),
)


def format_table(measurements, repeat):
    """The table of one workload and thread count: a row per operation with the median time of
    each implementation, fastemb's speedups and the fractions of the speed of light."""
    first = measurements[0]
    lines = [
        f"{first.workload.label} ({first.workload.describe()}), {first.threads} "
        f"thread{'s' if first.threads > 1 else ''}, median of {repeat} runs",
        "".join(f"{heading:>{width}}" if i else f"{heading:<{width}}"
                for i, (heading, width, _) in enumerate(TABLE_COLUMNS)),
    ]
    for measurement in measurements:
        lines.append("".join(f"{cell(measurement):>{width}}" if i
                             else f"{cell(measurement):<{width}}"
                             for i, (_, width, cell) in enumerate(TABLE_COLUMNS)))
    return "\n".join(lines)


TABLE_LEGEND = (
    "vs torch / vs numpy: how many times faster fastemb is. light: plain C loops that move only "
    "the table bytes\nthe operation needs; fastemb/light, torch/light: the fraction of that "
    "speed of light reached. NumPy runs on 1 thread."
)


def machine_info():
    """Where the numbers come from: CPU, platform, date and versions."""
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch_version,
        "fastemb": __version__,
        "fastemb_kernels": _kernel_variant,
        "compile_flags": _core.compile_flags(),
    }


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo on Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def plot_speedups(measurements, path, machine):
    """Draw fastemb's speedup over torch as bars (one panel per workload, a bar per operation
    and thread count, log scale, bars from 1x up or down) into the PNG ``path``; returns the
    matplotlib Figure. Needs matplotlib."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    workloads = list(dict.fromkeys(m.workload for m in measurements))
    operations = list(dict.fromkeys(m.operation for m in measurements))
    thread_counts = sorted({m.threads for m in measurements})
    figure = Figure(figsize=(max(6.0, 1.2 * len(operations) + 2), 3.2 * len(workloads)),
                    layout="constrained")
    axes = figure.subplots(len(workloads), 1, squeeze=False)[:, 0]
    width = 0.8 / len(thread_counts)
    for ax, workload in zip(axes, workloads):
        for position, threads in enumerate(thread_counts):
            speedups = {m.operation: m.speedup("torch") for m in measurements
                        if m.workload == workload and m.threads == threads}
            xs = [i + (position - (len(thread_counts) - 1) / 2) * width
                  for i, operation in enumerate(operations) if speedups.get(operation)]
            heights = [speedups[operation] for operation in operations if speedups.get(operation)]
            # each bar starts at 1x: up for a speedup, hanging down for a slowdown
            bars = ax.bar(xs, [height - 1 for height in heights], width, bottom=1,
                          label=f"{threads} thread{'s' if threads > 1 else ''}")
            ax.bar_label(bars, labels=[f"{height:.1f}" for height in heights], fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(operations)), operations, rotation=20, fontsize=8)
        ax.set_ylabel("speedup over torch")
        ax.set_title(f"{workload.label}: {workload.describe()}", fontsize=9)
        ax.legend(fontsize=8)
    figure.suptitle(f"fastemb {machine['fastemb']} vs torch {machine['torch']}: "
                    f"{machine['cpu']}, {machine['cpu_count']} cores, {machine['date']}",
                    fontsize=9)
    figure.savefig(path, dpi=120)
    return figure


def report(workloads, operations, thread_counts, repeat, json_path=None, plot_path=None,
           progress=True):
    """Benchmark ``operations`` on ``workloads`` at each of ``thread_counts``, print a table per
    workload and thread count, and optionally write the numbers with the machine's
    description to ``json_path`` and a bar chart of the speedups over torch to ``plot_path``
    (which needs matplotlib). A progress bar (tqdm, on stderr) counts the operations measured
    unless ``progress`` is false. Returns the :class:`Measurement` list."""
    from tqdm import tqdm

    machine = machine_info()
    print(f"fastemb {machine['fastemb']} ({machine['fastemb_kernels']} kernels), torch "
          f"{machine['torch'] or 'not installed'}, numpy {machine['numpy']}; {machine['cpu']}, "
          f"{machine['cpu_count']} cores")
    if not torch_is_available():
        print("torch is not installed: no torch column (pip install torch==2.13.0)")
    if not speed_of_light_is_available():
        print("gcc is not installed: no speed-of-light column")
    print(TABLE_LEGEND)
    measurements = []
    bar = tqdm(total=len(workloads) * len(operations), unit=" ops", leave=False,
               disable=not progress)
    for workload in workloads:
        bar.set_description(f"{workload.label}: preparing the data")
        data = make_data(workload)
        by_threads = {threads: [] for threads in thread_counts}
        for operation in operations:
            bar.set_description(f"{workload.label}: {operation}")
            with thread_count(1):
                expected = benchmark_callable("fastemb", operation, data)()
            for measurement in measure(operation, data, thread_counts, repeat, expected):
                by_threads[measurement.threads].append(measurement)
            del expected
            bar.update()
        for threads in thread_counts:
            bar.write("\n" + format_table(by_threads[threads], repeat), file=sys.stdout)
            measurements += by_threads[threads]
    bar.close()
    if json_path is not None:
        settings = {"repeat": repeat, "thread_counts": list(thread_counts),
                    "operations": list(operations),
                    "workloads": [workload.label for workload in workloads]}
        document = {"machine": machine, "settings": settings,
                    "results": [measurement.as_dict() for measurement in measurements]}
        pathlib.Path(json_path).write_text(json.dumps(document, indent=1) + "\n")
        print(f"\nwrote {json_path}")
    if plot_path is not None:
        plot_speedups(measurements, plot_path, machine)
        print(f"wrote {plot_path}")
    return measurements
