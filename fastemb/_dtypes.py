"""The table dtypes fastemb accepts, in one registry: float32 and float64, computed in their own
dtype, and the 16-bit ``float16`` and ``bfloat16`` (NumPy's dtype from ``ml_dtypes``, when it is
installed), which lookups read as float32: bag results, gradients and per-sample weights of a
16-bit table are float32, and ``embedding`` returns its rows in the table's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._kernels import kernels as _core

try:
    import ml_dtypes
except ImportError:  # bfloat16 tables need ml_dtypes (pip install "fastemb[bfloat16]")
    ml_dtypes = None


@dataclass(frozen=True)
class TableDtype:
    """One table dtype: its NumPy dtype, and for a 16-bit float the format the kernels read its
    bits as (a ``HalfFormat``; None for float32 and float64)."""

    dtype: np.dtype
    half_format: int | None = None

    @property
    def compute_dtype(self) -> np.dtype:
        """The dtype lookups compute and return bag results, gradients in: the table's own for
        float32/float64, float32 for a 16-bit table."""
        return self.dtype if self.half_format is None else np.dtype(np.float32)

    @property
    def kernel_format(self) -> int:
        """The ``half_format`` argument of the kernels (ignored for float32 and float64)."""
        return _core.HalfFormat.BFLOAT16 if self.half_format is None else self.half_format

    def kernel_view(self, array: np.ndarray) -> np.ndarray:
        """``array`` (of this dtype) as the kernels take it: itself, or its 16-bit float's bits
        as uint16 (a view, no copy)."""
        return array if self.half_format is None else array.view(np.uint16)


TABLE_DTYPES = {
    table.dtype: table for table in (
        TableDtype(np.dtype(np.float32)),
        TableDtype(np.dtype(np.float64)),
        TableDtype(np.dtype(np.float16), _core.HalfFormat.FLOAT16),
        *([TableDtype(np.dtype(ml_dtypes.bfloat16), _core.HalfFormat.BFLOAT16)]
          if ml_dtypes is not None else []),
    )
}
TABLE_DTYPE_NAMES = "float32, float64, float16 or bfloat16"


def bfloat16_dtype() -> np.dtype:
    """NumPy's bfloat16 dtype (from ml_dtypes); ImportError, saying how to get it, without."""
    if ml_dtypes is None:
        raise ImportError("bfloat16 tables need ml_dtypes: pip install 'fastemb[bfloat16]' "
                          "(or pip install ml_dtypes)")
    return np.dtype(ml_dtypes.bfloat16)


# The tables a model can train, by name (the train command's --dtype, the bench's training
# steps): each table dtype, and "split", a split float32 table (bfloat16 top halves for the
# forward, low halves beside: fastemb.modules), which needs bfloat16. Each gives the module
# options (dtype, split).
TRAINABLE_TABLES = {dtype.name: (dtype, False) for dtype in TABLE_DTYPES} | (
    {"split": (np.dtype(np.float32), True)} if ml_dtypes is not None else {})
