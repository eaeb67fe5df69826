"""The functional API: stateless lookups on NumPy arrays (``fastemb.embedding``,
``fastemb.embedding_bag``).

Each function validates and coerces every argument first (``_validation``), then applies
``max_norm`` if asked, then runs one kernel of ``fastemb._core``. ``embedding_bag`` first offers
its arguments to ``_core.bag_forward_common``, which does all of that in one compiled call for
plain arrays without max_norm, and declines anything else to this path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike

from ._kernels import kernels as _core
from ._config import threads_for
from ._dtypes import TABLE_DTYPES
from ._memory import with_reused_memory
from ._validation import (
    BAG_MODES,
    NO_PADDING,
    as_index_array,
    as_real,
    as_weight,
    bag_arguments,
    check_index_range,
    check_writable_table,
    normalize_padding_idx,
)
from .quantized import QuantizedTable, quantized_embedding, quantized_embedding_bag


def _max_norm_arguments(weight, max_norm, norm_type):
    """Validate max_norm/norm_type; returns (max_norm, norm_type) as floats, or None."""
    if max_norm is None:
        return None
    max_norm = as_real(max_norm, "max_norm")
    norm_type = as_real(norm_type, "norm_type")
    check_writable_table(weight, purpose="max_norm")
    return max_norm, norm_type


def _renorm(weight, flat_indices, max_norm_arguments):
    """Apply max_norm in place to the distinct rows in flat_indices (already validated). A
    16-bit table's rows are renormed in float32 and rounded back (only the rescaled ones)."""
    if max_norm_arguments is not None and flat_indices.size:
        max_norm, norm_type = max_norm_arguments
        threads = threads_for(flat_indices.size * weight.shape[1])
        rows = _core.group_by_row(flat_indices, weight.shape[0], NO_PADDING, threads)[0]
        if weight.dtype == TABLE_DTYPES[weight.dtype].compute_dtype:
            _core.renorm_rows(weight, rows, max_norm, norm_type, threads)
            return
        before = weight[rows].astype(np.float32)
        renormed = before.copy()
        _core.renorm_rows(renormed, np.arange(rows.size), max_norm, norm_type, threads)
        rescaled = (renormed.view(np.uint32) != before.view(np.uint32)).any(axis=1)
        weight[rows[rescaled]] = renormed[rescaled].astype(weight.dtype)


def _lookup_table(weight, flat_indices, dtype=None):
    """The table the kernels read (in ``dtype``, default the weight's), and the indices into it.

    A C-contiguous weight of that dtype is used as it is. Any other layout (Fortran order, a
    strided view) or dtype gives a C-contiguous copy of just the looked-up rows, with the
    indices renumbered into it: it costs O(lookups), never O(table). Returns (table, indices,
    rows) where ``rows`` maps table rows back to weight rows (None when no copy was made).
    """
    if weight.flags.c_contiguous and (dtype is None or dtype == weight.dtype):
        return weight, flat_indices, None
    rows, local_indices = np.unique(flat_indices, return_inverse=True)
    table = np.ascontiguousarray(weight[rows], dtype=dtype)
    return table, local_indices.astype(np.int64), rows


def _padding_in(rows, padding):
    """The padding row's number in a copy of ``rows`` (see _lookup_table); NO_PADDING if the
    copy has none."""
    if rows is None or padding == NO_PADDING:
        return padding
    at = np.searchsorted(rows, padding)
    return int(at) if at < rows.size and rows[at] == padding else NO_PADDING


def _check_indices_first(weight, flat_indices, shape, renorm):
    """Check the indices before the kernel where something must not see a bad one: max_norm
    (it writes the caller's table) and a table that is not C-contiguous (its copy of the
    looked-up rows indexes with them). Otherwise the kernel, which fills a fresh output,
    counts the bad indices as it reads them, and the caller raises afterwards: the same
    IndexError, without a separate pass over the indices. Returns True if it checked."""
    if renorm is None and weight.flags.c_contiguous:
        return False
    check_index_range(flat_indices, shape, weight.shape[0])
    return True


def lookup_forward(input, weight, padding_idx=None, max_norm=None, norm_type=2.0):
    """Validate, renorm, gather; returns (output, flat validated indices)."""
    weight = as_weight(weight, reduced_precision=True)
    indices = as_index_array(input)
    num_embeddings, dim = weight.shape
    normalize_padding_idx(padding_idx, num_embeddings)  # validated; the forward ignores it
    renorm = _max_norm_arguments(weight, max_norm, norm_type)
    flat = indices.reshape(-1)
    checked_first = _check_indices_first(weight, flat, indices.shape, renorm)
    _renorm(weight, flat, renorm)
    table, table_indices, _ = _lookup_table(weight, flat)
    # from the block cache: a loop's next output reuses this one's pages once it is freed
    out = _core.empty_reused((flat.size, dim), weight.dtype)
    table_dtype = TABLE_DTYPES[weight.dtype]
    out_of_range = _core.gather_rows(table_dtype.kernel_view(table), table_indices,
                                     table_dtype.kernel_view(out), threads_for(out.size))
    if out_of_range and not checked_first:
        check_index_range(flat, indices.shape, num_embeddings)
    return out.reshape(indices.shape + (dim,)), flat


def embedding(input: ArrayLike, weight: np.ndarray, padding_idx: int | None = None,
              max_norm: float | None = None, norm_type: float = 2.0) -> np.ndarray:
    """Look up rows of ``weight``: ``out[...] = weight[input[...]]`` (torch's F.embedding).

    ``input`` holds integer indices of any shape; the result has shape ``input.shape + (D,)``
    and the weight's dtype. ``padding_idx`` does not change the forward (the stored row is
    returned). With ``max_norm``, every distinct looked-up row whose ``norm_type``-norm exceeds
    it is first rescaled in place to that norm (after all indices were validated).

    >>> import numpy as np, fastemb
    >>> weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> fastemb.embedding([[0, 2], [3, 3]], weight)[1]
    array([[ 9., 10., 11.],
           [ 9., 10., 11.]], dtype=float32)

    ``weight`` may also be a :class:`fastemb.QuantizedTable` (``fastemb.quantize``): the rows
    come back dequantized, in float32.
    """
    if isinstance(weight, QuantizedTable):
        return quantized_embedding(input, weight, padding_idx, max_norm)
    return lookup_forward(input, weight, padding_idx, max_norm, norm_type)[0]


@dataclass
class BagForward:
    """What an embedding_bag forward computed, and what its backward needs."""

    output: np.ndarray           # (B, D); None once a backward no longer needs it
    indices: np.ndarray          # flat int32/int64 indices, validated
    input_shape: tuple
    bounds: np.ndarray           # int64 (B + 1,): bag b is indices[bounds[b]:bounds[b+1]]
    mode: str
    sample_weights: np.ndarray   # flat, or None
    padding_idx: int             # in [0, V), or NO_PADDING
    winners: np.ndarray          # max mode: (B, D) int64 winning rows (-1 for empty bags)

    @with_reused_memory  # a training loop's next copy reuses this one's pages
    def private_copy(self):
        """A copy that shares no array a caller holds (indices and weights may be the caller's,
        the output is returned to it), keeping only what a backward reads."""
        weighted_mean = self.mode == "mean" and self.sample_weights is not None
        return replace(
            self,
            indices=self.indices.copy(),
            sample_weights=None if self.sample_weights is None else self.sample_weights.copy(),
            output=self.output.copy() if weighted_mean else None,
        )


def bag_forward(input, weight, offsets=None, mode="mean", per_sample_weights=None,
                include_last_offset=False, padding_idx=None, max_norm=None, norm_type=2.0,
                record_winners=True):
    """Validate, renorm, and reduce; returns a BagForward (see ``embedding_bag``). In max mode
    the winning rows, which only a backward needs, are recorded if ``record_winners``."""
    weight = as_weight(weight, reduced_precision=True)
    table_dtype = TABLE_DTYPES[weight.dtype]
    num_embeddings, dim = weight.shape
    mode, indices, bounds, sample_weights, padding = bag_arguments(
        input, offsets, mode, per_sample_weights, include_last_offset, padding_idx,
        num_embeddings, table_dtype.compute_dtype, weight.dtype)
    renorm = _max_norm_arguments(weight, max_norm, norm_type)
    flat = indices.reshape(-1)
    checked_first = _check_indices_first(weight, flat, indices.shape, renorm)
    _renorm(weight, flat, renorm)

    padding = NO_PADDING if padding is None else padding
    table, table_indices, rows = _lookup_table(weight, flat)
    num_bags = bounds.size - 1
    out = _core.empty_reused((num_bags, dim), table_dtype.compute_dtype)
    winners = None
    if mode == "max" and record_winners:
        winners = np.empty((num_bags, dim), dtype=np.int64)
    out_of_range = _core.bag_reduce(table_dtype.kernel_view(table), table_indices, bounds,
                                    BAG_MODES[mode], sample_weights, _padding_in(rows, padding),
                                    out, winners, threads_for(flat.size * dim),
                                    table_dtype.kernel_format)
    if out_of_range and not checked_first:
        check_index_range(flat, indices.shape, num_embeddings)
    if rows is not None and winners is not None and rows.size:  # (no rows: every winner is -1)
        winners = np.where(winners >= 0, rows[np.maximum(winners, 0)], -1).astype(np.int64)
    return BagForward(out, flat, indices.shape, bounds, mode, sample_weights, padding, winners)


def embedding_bag(input: ArrayLike, weight: np.ndarray, offsets: ArrayLike | None = None,
                  mode: str = "mean", per_sample_weights: ArrayLike | None = None,
                  include_last_offset: bool = False, padding_idx: int | None = None,
                  max_norm: float | None = None, norm_type: float = 2.0) -> np.ndarray:
    """Sum, average or take the max of bags of rows of ``weight`` (torch's F.embedding_bag).

    Bags come from a 1-D ``input`` split at ``offsets`` (bag b is
    ``input[offsets[b]:offsets[b+1]]``, the last bag runs to the end; with
    ``include_last_offset=True`` offsets has B+1 entries ending at ``len(input)``), or from a
    2-D ``input`` whose rows are the bags. ``mode`` is "sum", "mean" or "max". Entries equal to
    ``padding_idx`` are skipped (and not counted by mean). ``per_sample_weights`` (shape of
    input, weight dtype) weights sum, and gives the weighted mean with "mean". Empty bags give
    zeros. Returns ``(B, D)`` in the weight's dtype.

    >>> import numpy as np, fastemb
    >>> weight = np.array([[1, -2], [3, 4], [-5, 6]], dtype=np.float32)
    >>> fastemb.embedding_bag([0, 1, 2, 1], weight, offsets=[0, 2, 2], mode="sum")
    array([[ 4.,  2.],
           [ 0.,  0.],
           [-2., 10.]], dtype=float32)

    ``weight`` may also be a :class:`fastemb.QuantizedTable` (``fastemb.quantize``): bags of
    its dequantized rows, in float32 (per-sample weights float32; no max_norm). Only this
    forward takes one (a quantized table serves inference: it has no gradient).
    """
    if max_norm is None:
        out = _core.bag_forward_common(input, weight, offsets, mode, per_sample_weights,
                                       include_last_offset, padding_idx)
        if out is not None:
            return out  # (else the call is not the common case, or not valid: see below)
    if isinstance(weight, QuantizedTable):
        return quantized_embedding_bag(input, weight, offsets, mode, per_sample_weights,
                                       include_last_offset, padding_idx, max_norm)
    return bag_forward(input, weight, offsets, mode, per_sample_weights, include_last_offset,
                       padding_idx, max_norm, norm_type, record_winners=False).output
