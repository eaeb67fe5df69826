"""What is benchmarked: the operations, and the workloads (a table shape, a batch of bags and
an index skew) with their data, built once per process."""

import functools
from dataclasses import dataclass

import numpy as np

from .. import optim
from .._dtypes import TABLE_DTYPES, TRAINABLE_TABLES
from .._memory import aligned_full
from ..quantized import QUANTIZED_BITS, quantize

FORWARD_OPERATIONS = ("gather", "bag_sum", "bag_mean", "bag_weighted_sum", "bag_max")


@dataclass(frozen=True)
class TableFormat:
    """How a reduced-precision bag sum stores the workload's float32 table: rounded to a 16-bit
    ``dtype``, or row-wise quantized to ``bits`` bits (``fastemb.quantize``: torch's prepacked
    bytes, which torch's quantized embedding_bag ops read)."""

    name: str
    dtype: np.dtype = None  # a 16-bit table dtype, or None
    bits: int = 0  # 8 or 4 for a quantized table, else 0

    @property
    def quantized(self):
        return self.bits != 0


# The reduced-precision operations: the bag sum of the workload's table stored in each 16-bit
# dtype this installation has (bfloat16 needs ml_dtypes), "bag_sum_float16" and
# "bag_sum_bfloat16", and quantized row-wise, "bag_sum_int8" and "bag_sum_int4"; each
# implementation sums its own table of that format, and the report sets fastemb's time beside
# torch's float32 bag sum.
TABLE_FORMATS = {
    **{f"bag_sum_{dtype.name}": TableFormat(dtype.name, dtype=dtype) for dtype in TABLE_DTYPES
       if TABLE_DTYPES[dtype].half_format is not None},
    **{f"bag_sum_int{bits}": TableFormat(f"int{bits}", bits=bits) for bits in QUANTIZED_BITS},
}
REDUCED_PRECISION_OPERATIONS = tuple(TABLE_FORMATS)
IMPLEMENTATIONS = ("fastemb", "torch", "numpy")
SPEED_OF_LIGHT = "speed_of_light"
SKEWS = ("uniform", "zipf")

# Zipf skew: rank r (1-based) is drawn with probability proportional to r ** -ZIPF_EXPONENT.
ZIPF_EXPONENT = 1.05


# The hyperparameters of each training step's optimizer, by its name in the registry
# fastemb.optim.OPTIMIZERS (which gives its fastemb and torch classes); every implementation
# uses them, the NumPy step too.
STEP_HYPERPARAMETERS = {
    "lazyadam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8},
    "sgd": {"lr": 0.01},
    "adagrad": {"lr": 0.01, "eps": 1e-10},
}
STEP_OPERATIONS = tuple(f"step_{name}" for name in STEP_HYPERPARAMETERS)
# LazyAdam steps on the workload's table trained in reduced precision: stored in each 16-bit
# dtype, or split ("step_lazyadam_bfloat16", "step_lazyadam_float16", "step_lazyadam_split").
# Only fastemb trains such tables: the other implementations run their float32 step, and the
# report sets fastemb's time beside its own float32 step. Results compared: the step's forward
# output.
REDUCED_PRECISION_STEP_OPERATIONS = tuple(
    f"step_lazyadam_{name}" for name, (dtype, split) in TRAINABLE_TABLES.items()
    if split or TABLE_DTYPES[dtype].half_format is not None)
OPERATIONS = (FORWARD_OPERATIONS + REDUCED_PRECISION_OPERATIONS + ("forward_backward",)
              + STEP_OPERATIONS + REDUCED_PRECISION_STEP_OPERATIONS)


def table_format(operation):
    """The :class:`TableFormat` of a reduced-precision operation ("bag_sum_int8": 8 bits)."""
    return TABLE_FORMATS[operation]


def float32_step(operation):
    """The float32 training step of a reduced-precision one ("step_lazyadam_split":
    "step_lazyadam"); a float32 step itself."""
    return next(step for step in STEP_OPERATIONS
                if operation == step or operation.startswith(step + "_"))


def trained_table(operation):
    """The module options (dtype, split) of a reduced-precision training step's table."""
    return TRAINABLE_TABLES[operation.removeprefix(float32_step(operation) + "_")]


def step_optimizer(operation):
    """(the registry's OptimizerInfo, the hyperparameters) of a training-step operation."""
    name = float32_step(operation).removeprefix("step_")
    return optim.OPTIMIZERS[name], STEP_HYPERPARAMETERS[name]


def step_state_arrays(operation):
    """How many table-sized state arrays the optimizer of a training step keeps."""
    return len(step_optimizer(operation)[0].cls.state_arrays)


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

    def table_in(self, dtype):
        """The table rounded to ``dtype`` (cached; on a 64-byte boundary, like the table)."""
        return make_table_in(self.workload, np.dtype(dtype))

    def table_for(self, operation):
        """The table a reduced-precision operation sums (cached): a 16-bit array (see
        :meth:`table_in`) or a ``fastemb.QuantizedTable``."""
        table_format = TABLE_FORMATS[operation]
        if table_format.quantized:
            return make_quantized_table(self.workload, table_format.bits)
        return self.table_in(table_format.dtype)


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


@functools.lru_cache(maxsize=2)
def make_table_in(workload, dtype):
    """The table of ``workload`` (:func:`make_data`'s) rounded to ``dtype``, cached."""
    return aligned_copy(make_data(workload).table.astype(dtype))


@functools.lru_cache(maxsize=2)
def make_quantized_table(workload, bits):
    """The table of ``workload`` quantized to ``bits`` bits (a ``fastemb.QuantizedTable``),
    cached."""
    return quantize(make_data(workload).table, bits)


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
