"""Benchmark workloads for fastemb's forward kernels, and the baselines they are compared with.

This module is the one definition of what is benchmarked; ``python -m fastemb bench`` and the
pytest-benchmark suite in ``benchmarks/`` both build on it. It needs only NumPy: torch is used
when it is importable and left out otherwise.

A workload is a float32 table and a batch of ``num_bags`` bags of ``bag_size`` indices each,
drawn uniformly or Zipf-skewed (:class:`Workload`, :data:`WORKLOADS`, :func:`make_data`). For
each operation in :data:`OPERATIONS` every implementation in :data:`IMPLEMENTATIONS` gives a
zero-argument callable that returns a NumPy array (:func:`benchmark_callable`):

- ``gather``: the rows of every index, shape ``(num_bags, bag_size, dim)``;
- ``bag_sum``, ``bag_mean``, ``bag_max``: each bag reduced to one row, shape ``(num_bags, dim)``;
- ``bag_weighted_sum``: the sum of each bag's rows times the per-sample weights.

fastemb and torch take the indices flat, with bag-start ``offsets``; NumPy takes them as a
``(num_bags, bag_size)`` matrix, which is the fastest way NumPy has to reduce equal-sized bags.
Run the callables inside :func:`thread_count` so that fastemb and torch use the same number of
threads (NumPy's gather and reductions always run on one), and check each result against
fastemb's with :func:`assert_agrees` so that a fast but wrong implementation cannot win.

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
import functools
import sys
from dataclasses import dataclass

import numpy as np

from ._config import get_num_threads, set_num_threads
from .functional import embedding, embedding_bag

OPERATIONS = ("gather", "bag_sum", "bag_mean", "bag_weighted_sum", "bag_max")
SKEWS = ("uniform", "zipf")

# Zipf skew: rank r (1-based) is drawn with probability proportional to r ** -ZIPF_EXPONENT.
ZIPF_EXPONENT = 1.05

# Operations that every implementation computes the same way (rows added or compared in bag
# order, the mean divides the rounded sum), so all of them agree bit for bit. The weighted sum
# may round differently: torch (FBGEMM) fuses w * x + acc into one rounding.
EXACT_OPERATIONS = frozenset({"gather", "bag_sum", "bag_mean", "bag_max"})
ROUNDING_TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}


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
        """A short unique name, e.g. ``"mission-zipf"``."""
        return f"{self.name}-{self.skew}"

    @property
    def num_indices(self):
        """How many rows one call looks up."""
        return self.num_bags * self.bag_size

    @property
    def row_bytes(self):
        """How many bytes of table rows one call reads."""
        return self.num_indices * self.dim * np.dtype(np.float32).itemsize


# "mission": the target shape, a 256 MB table far larger than the caches. "small": the same
# batch on a 2.5 MB table that stays cache-resident, which isolates the compute.
WORKLOADS = (
    Workload("mission", 1_000_000, 64, num_bags=4096, bag_size=32, skew="uniform"),
    Workload("mission", 1_000_000, 64, num_bags=4096, bag_size=32, skew="zipf"),
    Workload("small", 10_000, 64, num_bags=4096, bag_size=32, skew="uniform"),
)


@dataclass(frozen=True)
class BenchData:
    """The arrays of one workload: the table, the flat indices with their bag-start offsets,
    and one float32 weight per index."""

    workload: Workload
    table: np.ndarray               # (num_embeddings, dim) float32
    indices: np.ndarray             # (num_indices,) int64
    offsets: np.ndarray             # (num_bags,) int64: bag b starts at indices[offsets[b]]
    per_sample_weights: np.ndarray  # (num_indices,) float32

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
    mission table is 256 MB and shared by its uniform and Zipf workloads."""
    return np.random.default_rng(seed).standard_normal((num_embeddings, dim), dtype=np.float32)


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
    return BenchData(workload, table, indices, offsets, per_sample_weights)


def fastemb_callables(data):
    """fastemb's callable for each operation, on the flat indices with offsets."""
    bag = functools.partial(embedding_bag, data.indices, data.table, data.offsets)
    return {
        "gather": lambda: embedding(data.index_matrix, data.table),
        "bag_sum": lambda: bag(mode="sum"),
        "bag_mean": lambda: bag(mode="mean"),
        "bag_weighted_sum": lambda: bag(mode="sum", per_sample_weights=data.per_sample_weights),
        "bag_max": lambda: bag(mode="max"),
    }


def torch_callables(data):
    """torch's callable for each operation (``torch.nn.functional``), on zero-copy tensors."""
    import torch

    functional = torch.nn.functional
    table = torch.from_numpy(data.table)
    indices = torch.from_numpy(data.indices)
    index_matrix = torch.from_numpy(data.index_matrix)
    offsets = torch.from_numpy(data.offsets)
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
    }


def numpy_callables(data):
    """The fastest plain-NumPy way to do each operation: ``np.take`` of the index matrix (about
    twice as fast as ``table[index_matrix]``), then a reduction over the bag axis."""

    def rows():
        return np.take(data.table, data.index_matrix, axis=0)

    return {
        "gather": rows,
        "bag_sum": lambda: rows().sum(axis=1),
        "bag_mean": lambda: rows().mean(axis=1),
        "bag_weighted_sum": lambda: np.einsum("bl,bld->bd", data.weight_matrix, rows()),
        "bag_max": lambda: rows().max(axis=1),
    }


CALLABLE_BUILDERS = {
    "fastemb": fastemb_callables,
    "torch": torch_callables,
    "numpy": numpy_callables,
}
IMPLEMENTATIONS = tuple(CALLABLE_BUILDERS)


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


def benchmark_callable(implementation, operation, data):
    """The zero-argument callable that runs ``operation`` on ``data`` with ``implementation``
    and returns the result as a NumPy array."""
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {', '.join(OPERATIONS)}; got {operation!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}"
        )
    return CALLABLE_BUILDERS[implementation](data)[operation]


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


def assert_agrees(operation, actual, expected):
    """Raise ``AssertionError`` unless ``actual`` is ``expected`` (same shape and dtype): bit
    for bit for the operations in :data:`EXACT_OPERATIONS`, else to float rounding."""
    if operation in EXACT_OPERATIONS:
        np.testing.assert_array_equal(actual, expected, strict=True)
    else:
        np.testing.assert_allclose(actual, expected, strict=True, **ROUNDING_TOLERANCE)
