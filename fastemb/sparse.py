"""``SparseGrad``: the gradient of a table, holding only the rows a forward looked up."""

from dataclasses import dataclass

import numpy as np

from ._kernels import kernels as _core
from ._config import threads_for
from ._memory import with_reused_memory
from ._validation import FLOAT_DTYPES, as_count


@dataclass
class GradientPlan:
    """How to compute a gradient's values, kept until someone needs them.

    ``values[u] = sum over k in [starts[u], starts[u+1]) of c_p * grad[source[p]]`` with
    ``p = order[k]`` (see ``accumulate_rows`` in ``_training.pyx``). An optimizer can run this sum
    fused with its update, so the (nnz, D) values are never written out.
    """

    grad: np.ndarray                 # (R, D) rows, each contiguous: the grad_output rows
    starts: np.ndarray               # (U + 1,) int64
    order: np.ndarray                # positions grouped by row
    source: np.ndarray = None        # position -> grad row (None: the position itself)
    coefficients: np.ndarray = None  # per-position factor (None: 1)
    scale_by_frequency: bool = False
    winners: np.ndarray = None       # max mode: (R, D) winning rows

    @with_reused_memory
    def accumulate(self, rows):
        values = np.empty((rows.size, self.grad.shape[1]), dtype=self.grad.dtype)
        _core.accumulate_rows(self.grad, rows, self.starts, self.order, self.source,
                              self.coefficients, self.scale_by_frequency, self.winners, values,
                              threads_for(self.order.size * self.grad.shape[1]))
        return values


class SparseGrad:
    """A coalesced row-sparse gradient of a ``(num_embeddings, D)`` table.

    ``rows`` (int64, sorted, unique) are the rows that were looked up, ``values[k]`` is the
    gradient of row ``rows[k]``; every other row's gradient is zero.

    >>> import numpy as np, fastemb
    >>> g = fastemb.SparseGrad([1, 3], np.ones((2, 2), np.float32), num_embeddings=4)
    >>> (g + g).to_dense()[:, 0].tolist()
    [0.0, 2.0, 0.0, 2.0]
    """

    __slots__ = ("rows", "num_embeddings", "_values", "_plan", "_dim", "_dtype")

    def __init__(self, rows, values, num_embeddings):
        num_embeddings = as_count(num_embeddings, "num_embeddings")
        rows = np.asarray(rows)
        if rows.size == 0:  # (an empty list is float64; any empty array will do)
            rows = np.zeros(rows.shape, dtype=np.int64)
        values = np.asarray(values)
        if rows.dtype.kind not in "iu" or rows.ndim != 1:
            raise TypeError(f"rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
        if values.dtype not in FLOAT_DTYPES or values.ndim != 2:
            raise TypeError(f"values must be 2-D float32/float64, got {values.dtype} {values.shape}")
        if values.shape[0] != rows.size:
            raise ValueError(f"values has {values.shape[0]} rows but rows has {rows.size}")
        rows = rows.astype(np.int64)
        if rows.size and (rows[0] < 0 or rows[-1] >= num_embeddings or np.any(np.diff(rows) <= 0)):
            raise ValueError(f"rows must be sorted, unique and in [0, {num_embeddings})")
        self._set(rows, num_embeddings, values.shape[1], values.dtype, values, None)

    @classmethod
    def _planned(cls, rows, num_embeddings, plan):
        """A gradient whose values are computed from ``plan`` on first use."""
        grad = cls.__new__(cls)
        if plan.grad.shape[0] == 0 or plan.grad.shape[1] == 0:
            # no grad_output rows (an EmbeddingBag forward with zero bags) or no columns: the
            # looked-up rows' gradients are all zero (or empty); there is nothing to accumulate
            values = np.zeros((rows.size, plan.grad.shape[1]), dtype=plan.grad.dtype)
            grad._set(rows, num_embeddings, plan.grad.shape[1], plan.grad.dtype, values, None)
            return grad
        grad._set(rows, num_embeddings, plan.grad.shape[1], plan.grad.dtype, None, plan)
        return grad

    def _set(self, rows, num_embeddings, dim, dtype, values, plan):
        self.rows = rows
        self.num_embeddings = num_embeddings
        self._dim = dim
        self._dtype = np.dtype(dtype)
        self._values = values
        self._plan = plan

    @property
    def values(self):
        """``(nnz, D)`` gradient rows, in the table's dtype."""
        if self._values is None:
            self._values = self._plan.accumulate(self.rows)
            self._plan = None
        return self._values

    def plan(self):
        """The GradientPlan an optimizer step consumes: the deferred one, or, once the values
        exist, a trivial plan that reads each row of ``values`` once."""
        if self._plan is not None:
            return self._plan
        positions = np.arange(self.nnz + 1, dtype=np.int64)
        return GradientPlan(np.ascontiguousarray(self.values), positions, positions[:-1])

    @property
    def nnz(self):
        """How many rows the gradient holds."""
        return self.rows.size

    @property
    def shape(self):
        return (self.num_embeddings, self._dim)

    @property
    def dtype(self):
        return self._dtype

    def to_dense(self):
        """The full ``(num_embeddings, D)`` gradient, zeros outside ``rows``."""
        dense = np.zeros(self.shape, dtype=self._dtype)
        dense[self.rows] += self.values  # added to zeros, as torch's to_dense(): -0 gives +0
        return dense

    def __add__(self, other):
        if not isinstance(other, SparseGrad):
            return NotImplemented
        if self.shape != other.shape or self.dtype != other.dtype:
            raise ValueError(
                f"cannot add gradients of different tables: {self.shape} {self.dtype} and "
                f"{other.shape} {other.dtype}"
            )
        rows = np.union1d(self.rows, other.rows)
        values = np.zeros((rows.size, self._dim), dtype=self._dtype)
        values[np.searchsorted(rows, self.rows)] = self.values
        values[np.searchsorted(rows, other.rows)] += other.values
        return SparseGrad(rows, values, self.num_embeddings)

    def __repr__(self):
        return f"SparseGrad(nnz={self.nnz}, shape={self.shape}, dtype={self.dtype})"
