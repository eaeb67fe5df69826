"""Backward passes: the sparse weight gradient (``SparseGrad``) of a lookup or a bag reduction.

The work is (1) group the looked-up positions by row with a parallel radix sort
(``_core.group_by_row``), (2) sum each unique row's contributions in a fixed order, one owner
per row (``_core.accumulate_rows``). Step (2) is deferred into a ``GradientPlan`` until the
values are read, so an optimizer can fuse it with its update.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ._kernels import kernels as _core
from ._config import threads_for
from ._dtypes import TABLE_DTYPES
from ._memory import with_reused_memory
from ._validation import (as_count, as_index_array, check_index_range,
                          normalize_padding_idx)
from .functional import (BAG_MODES, NO_PADDING, BagForward, _lookup_table, _padding_in,
                         bag_forward)
from .sparse import GradientPlan, SparseGrad


def check_grad_output(grad_output, shape, dtype, name="grad_output"):
    """``grad_output`` as an array, checked to have ``shape`` and ``dtype`` (not copied)."""
    grad_output = np.asarray(grad_output)
    if grad_output.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {grad_output.dtype}")
    if grad_output.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {grad_output.shape}")
    return grad_output


def _as_grad_output(grad_output, shape, dtype):
    """A private C-contiguous copy of grad_output, checked to have ``shape`` and ``dtype``.

    The copy is what the deferred gradient reads, so the caller may reuse its array.
    """
    return np.array(check_grad_output(grad_output, shape, dtype), order="C", copy=True)


@with_reused_memory
def lookup_grad(flat_indices, output_shape, grad_output, dtype, num_embeddings, padding_idx,
                scale_grad_by_freq):
    """SparseGrad of ``out[p] = W[x_p]``: row r gets the sum of ``grad_output[p]`` over x_p = r."""
    grad = _as_grad_output(grad_output, output_shape, dtype)
    grad_rows = grad.reshape(flat_indices.size, output_shape[-1])
    rows, starts, order = _core.group_by_row(flat_indices, num_embeddings, padding_idx,
                                             threads_for(flat_indices.size))
    plan = GradientPlan(grad_rows, starts, order, scale_by_frequency=scale_grad_by_freq)
    return SparseGrad._planned(rows, num_embeddings, plan)


@with_reused_memory
def bag_grads(forward: BagForward, weight, grad_output, scale_grad_by_freq):
    """(SparseGrad, per-sample-weights gradient or None) of an embedding_bag forward. Of a
    16-bit table they are float32, like its forward's output."""
    num_embeddings, dim = weight.shape
    num_bags = forward.bounds.size - 1
    dtype = TABLE_DTYPES[weight.dtype].compute_dtype
    grad = _as_grad_output(grad_output, (num_bags, dim), dtype)
    indices, sample_weights = forward.indices, forward.sample_weights
    threads = threads_for(indices.size * dim)
    bag_of = np.empty(indices.size, dtype=np.int64)
    _core.bags_of_positions(forward.bounds, bag_of, threads)
    coefficients = totals = None
    per_position = forward.mode == "mean" or sample_weights is not None
    if per_position:
        coefficients = np.empty(indices.size, dtype=dtype)
        totals = np.empty(num_bags, dtype=dtype)
        _core.bag_gradient_factors(coefficients, totals, indices, forward.bounds,
                                   BAG_MODES[forward.mode], sample_weights,
                                   forward.padding_idx, threads)
    # Plain sum and max need only each position's bag (the gradient row it reads), so the sort
    # carries the bags themselves: one indirection less per position in the gradient sum.
    rows, starts, order = _core.group_by_row(indices, num_embeddings, forward.padding_idx,
                                             threads, None if per_position else bag_of)
    plan = GradientPlan(grad, starts, order, source=bag_of if per_position else None,
                        coefficients=coefficients, scale_by_frequency=scale_grad_by_freq,
                        winners=forward.winners)
    weight_grad = SparseGrad._planned(rows, num_embeddings, plan)
    if sample_weights is None:
        return weight_grad, None
    sample_grad = np.empty(indices.size, dtype=dtype)
    mean = forward.mode == "mean"
    # the looked-up rows, in the dtype the gradient is computed in (a copy of just those rows
    # for a 16-bit or non-contiguous table)
    table, table_indices, rows = _lookup_table(weight, indices, dtype)
    _core.sample_weights_grad(table, table_indices, bag_of, grad,
                              forward.output if mean else None, totals if mean else None,
                              _padding_in(rows, forward.padding_idx), sample_grad, threads)
    return weight_grad, sample_grad.reshape(forward.input_shape)


def embedding_backward(grad_output: ArrayLike, input: ArrayLike, num_embeddings: int,
                       padding_idx: int | None = None,
                       scale_grad_by_freq: bool = False) -> SparseGrad:
    """The weight gradient of ``embedding(input, weight)`` given ``grad_output``
    (shape ``input.shape + (D,)``), as a coalesced SparseGrad.

    Padding rows get no gradient; ``scale_grad_by_freq`` divides each row's gradient by how
    often it occurs in ``input``.

    >>> import numpy as np, fastemb
    >>> g = fastemb.embedding_backward(np.ones((3, 2), np.float32), [0, 2, 0], num_embeddings=4)
    >>> g.rows.tolist(), g.values.tolist()
    ([0, 2], [[2.0, 2.0], [1.0, 1.0]])
    """
    num_embeddings = as_count(num_embeddings, "num_embeddings")
    indices = as_index_array(input)
    flat = indices.reshape(-1)
    check_index_range(flat, indices.shape, num_embeddings)
    padding = normalize_padding_idx(padding_idx, num_embeddings)
    grad_output = np.asarray(grad_output)
    if grad_output.dtype not in TABLE_DTYPES or grad_output.ndim != indices.ndim + 1:
        raise ValueError(
            f"grad_output must be float32/float64 (or the float16/bfloat16 output of a 16-bit "
            f"table) with shape input.shape + (D,) = {indices.shape} + (D,), got "
            f"{grad_output.dtype} {grad_output.shape}"
        )
    # (a 16-bit table's gradient is float32, as its bags are)
    grad_output = grad_output.astype(TABLE_DTYPES[grad_output.dtype].compute_dtype, copy=False)
    return lookup_grad(flat, indices.shape + grad_output.shape[-1:], grad_output,
                       grad_output.dtype, num_embeddings,
                       NO_PADDING if padding is None else padding, bool(scale_grad_by_freq))


def embedding_bag_backward(grad_output: ArrayLike, input: ArrayLike, weight: np.ndarray,
                           offsets: ArrayLike | None = None, mode: str = "mean",
                           per_sample_weights: ArrayLike | None = None,
                           include_last_offset: bool = False, padding_idx: int | None = None,
                           scale_grad_by_freq: bool = False):
    """The weight gradient of ``embedding_bag(...)`` given ``grad_output`` of shape ``(B, D)``.

    Takes the same arguments as the forward (it reruns the forward, without max_norm, to know
    the max winners and weighted means). Returns a SparseGrad, or
    ``(SparseGrad, per_sample_weights_grad)`` when ``per_sample_weights`` is given.

    >>> import numpy as np, fastemb
    >>> weight = np.zeros((5, 2), np.float32)
    >>> g = fastemb.embedding_bag_backward(np.ones((2, 2), np.float32), [1, 3, 3, 4], weight,
    ...                                    offsets=[0, 2], mode="mean")
    >>> g.rows.tolist(), g.values[:, 0].tolist()
    ([1, 3, 4], [0.5, 1.0, 0.5])
    """
    scale_grad_by_freq = bool(scale_grad_by_freq)
    if isinstance(mode, str) and mode == "max" and scale_grad_by_freq:
        raise ValueError("mode 'max' does not support scale_grad_by_freq")
    forward = bag_forward(input, weight, offsets, mode, per_sample_weights, include_last_offset,
                          padding_idx)
    weight_grad, sample_grad = bag_grads(forward, np.asarray(weight), grad_output,
                                         scale_grad_by_freq)
    return weight_grad if sample_grad is None else (weight_grad, sample_grad)
