# cython: language_level=3
"""fastemb._training: the backward kernels (per-position facts of a bag backward, the sparse
weight gradient, the per-sample-weights gradient) and the optimizer steps fused with the
gradient's accumulation. The rules every kernel follows are in ``fastemb/_core.pyx``."""

from cython.parallel cimport prange, threadid
from libc.math cimport sqrt, sqrtf
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import numpy as np

from fastemb._common cimport (BAG_MEAN, BFLOAT16, CACHE_LINE_BYTES, FASTEMB_PREFETCH, FLOAT16,
                              STEP_ADAGRAD, STEP_ADAM, STEP_ROWWISE_ADAGRAD, STEP_SGD, BagMode,
                              HalfFormat, StepMethod, bfloat16_nearest, bfloat16_stochastic,
                              bfloat16_t, check_enum, clamp, element_value, float16_stochastic,
                              float16_t, floating, index_t, joined, mix64, prefetch_row,
                              float_bits, round_float16_row, table_t, team_size,
                              widen_float16_row)

__all__ = ["accumulate_rows", "bag_gradient_factors", "bags_of_positions",
           "sample_weights_grad", "sparse_step", "sparse_step_half", "sparse_step_tables",
           "split_columns"]

# Optimizer steps walk the sorted unique rows and prefetch this many rows ahead.
cdef Py_ssize_t UPDATE_PREFETCH_ROWS = 32
# Optimizer steps hand out unique rows to threads this many at a time.
cdef enum:
    STEP_ROWS_PER_CHUNK = 256
# Gradient sums follow a chain of loads per unique row (order -> source -> grad row) that the
# CPU cannot run ahead on: they prefetch the source entry 2x and the grad row 1x this many
# unique rows ahead, so that each link of the chain is in cache when the sum reaches it.
cdef Py_ssize_t GRADIENT_PREFETCH_GROUPS = 16
# Within one unique row's positions (a frequent row has thousands), the grad row this many
# positions ahead is prefetched.
cdef Py_ssize_t GRADIENT_PREFETCH_POSITIONS = 8


# --------------------------------------------------------------------------------------------
# Per-position facts an embedding_bag backward needs. For each position p of bag b:
#   bag_of[p] = b
#   sum with weights:    coefficient[p] = w_p
#   mean:                coefficient[p] = dtype(1.0 / count_b)  (count_b = kept entries of bag b)
#   weighted mean:       coefficient[p] = w_p / total_b         (0 when total_b = sum w = 0)
# totals[b] is count_b (mean) or the sequential sum of the kept weights of bag b.
# --------------------------------------------------------------------------------------------

def bags_of_positions(const int64_t[::1] bounds, int64_t[::1] bag_of, int num_threads):
    """Fill ``bag_of[p]`` with the bag that position p belongs to."""
    cdef Py_ssize_t n = bag_of.shape[0], num_bags = bounds.shape[0] - 1, b, k
    with nogil:
        for b in prange(num_bags, schedule="static", num_threads=team_size(num_threads)):
            for k in range(clamp(bounds[b], 0, n), clamp(bounds[b + 1], 0, n)):
                bag_of[k] = b


cdef int check_grad_rows(str kernel, const floating[:, :] grad) except -1:
    """ValueError unless each row of ``grad`` is contiguous and rows lie a whole number of
    elements apart (a field of a structured array may be neither)."""
    if grad.shape[1] > 1 and grad.strides[1] != sizeof(floating) or (
            grad.shape[0] > 1 and grad.strides[0] % <Py_ssize_t>sizeof(floating)):
        raise ValueError(f"{kernel}: grad's rows must be contiguous, a whole number of "
                         f"elements apart")
    return 0


def split_columns(const floating[:, :] grad, const int64_t[::1] columns, floating[::1] out,
                  int num_threads):
    """Copy the column blocks of ``grad`` (B, C) one after the other into ``out`` (B * C):
    block f, ``grad[:, columns[f]:columns[f + 1]]``, becomes the C-contiguous
    ``out[B * columns[f]:B * columns[f + 1]]`` (a collection's gradient rows, table by table,
    in one pass over grad)."""
    cdef Py_ssize_t num_rows = grad.shape[0], num_blocks = columns.shape[0] - 1, b, f
    cdef Py_ssize_t width, row_stride
    if num_blocks < 0 or columns[0] != 0 or columns[num_blocks] != grad.shape[1] or (
            out.shape[0] != num_rows * grad.shape[1]):
        raise ValueError("split_columns: columns must run from 0 to C, and out have B * C "
                         "elements")
    for f in range(num_blocks):
        if columns[f + 1] < columns[f]:
            raise ValueError("split_columns: columns must be non-decreasing")
    if num_rows == 0 or grad.shape[1] == 0:
        return
    check_grad_rows("split_columns", grad)
    row_stride = grad.strides[0] // <Py_ssize_t>sizeof(floating)
    with nogil:
        for b in prange(num_rows, schedule="static", num_threads=team_size(num_threads)):
            for f in range(num_blocks):
                width = columns[f + 1] - columns[f]
                memcpy(&out[0] + num_rows * columns[f] + b * width,
                       &grad[0, 0] + b * row_stride + columns[f], width * sizeof(floating))


def bag_gradient_factors(floating[::1] coefficients, floating[::1] totals,
                         const index_t[::1] indices, const int64_t[::1] bounds, BagMode mode,
                         const floating[::1] sample_weights, int64_t padding_idx,
                         int num_threads):
    """Fill ``coefficients`` (each position's gradient factor) and ``totals`` (each bag's
    divisor) for mode "mean" or for per-sample weights (see the formulas above)."""
    cdef bint mean = mode == BAG_MEAN, weighted = sample_weights is not None
    cdef Py_ssize_t n = indices.shape[0], num_bags = bounds.shape[0] - 1
    cdef Py_ssize_t b, k, start, end
    cdef floating total
    if not (mean or weighted):
        raise ValueError("bag_gradient_factors: only mean or weighted bags have factors")
    if coefficients.shape[0] != n or totals.shape[0] != num_bags or (
            weighted and sample_weights.shape[0] != n):
        raise ValueError("bag_gradient_factors: coefficients and sample_weights need one entry "
                         "per index, totals one per bag")
    with nogil:
        for b in prange(num_bags, schedule="static", num_threads=team_size(num_threads)):
            start = clamp(bounds[b], 0, n)
            end = clamp(bounds[b + 1], start, n)
            total = 0
            for k in range(start, end):
                if indices[k] != padding_idx:
                    total = total + (sample_weights[k] if weighted else 1)
            totals[b] = total
            for k in range(start, end):
                if not mean:
                    coefficients[k] = sample_weights[k]
                elif weighted:
                    coefficients[k] = sample_weights[k] / total if total != 0 else 0
                else:
                    coefficients[k] = <floating>(1.0 / total)


# --------------------------------------------------------------------------------------------
# Sparse weight gradient, one row per unique looked-up row (owner computes, no atomics):
#   values[u] = sum over positions p of rows[u], in ascending p, of  c_p * G[source[p]]
# where source[p] is the grad_output row position p feeds (p itself for Embedding, its bag for
# EmbeddingBag) and c_p = coefficient[p] (1 if none), divided by the row's frequency
# (starts[u+1] - starts[u]) with scale_grad_by_freq. In max mode each bag gives each row at
# most once, and only the columns the row won: values[u, d] += G[b, d] if winners[b, d] == rows[u].
# The sum starts from its first term (max mode: from 0), as torch's coalesce() does, so a row
# looked up once gets exactly c_p * G[source[p]] (a -0 stays -0).
# check_plan rejects starts that leave order or go backwards and arrays of the wrong size; an
# order or source entry that names no position or grad row is skipped, so no plan, however
# inconsistent, reads out of bounds (the Python layer only builds consistent ones).
# --------------------------------------------------------------------------------------------

cdef struct PlanView:
    # a GradientPlan's arrays as pointers (NULL: absent or empty), once check_plan passed them
    const int64_t *starts
    const int64_t *order
    const int64_t *source
    const void *coefficients  # const floating *, in the gradient's dtype
    const int64_t *winners
    Py_ssize_t num_positions  # entries of source, or grad rows when there is no source
    Py_ssize_t grad_rows
    Py_ssize_t grad_stride  # elements from one grad row to the next (D, or more for a view)
    bint scale_by_frequency


cdef int check_plan(str kernel, const floating[:, :] grad, Py_ssize_t num_groups,
                    const int64_t[::1] starts, const int64_t[::1] order,
                    const int64_t[::1] source, const floating[::1] coefficients,
                    const int64_t[:, ::1] winners, bint scale_by_frequency,
                    PlanView *view) except -1:
    """Raise ValueError unless the plan's arrays fit together: starts (U + 1 entries,
    non-decreasing, within order), coefficients (one per position) and winners (grad's shape).
    Then fill ``view``. Order and source entries are not checked here: the kernel skips any
    that name no position or grad row."""
    cdef Py_ssize_t u, num_positions
    cdef bint ordered = True
    if grad is None or starts is None or order is None:
        raise ValueError(f"{kernel}: the plan needs grad, starts and order")
    num_positions = grad.shape[0] if source is None else source.shape[0]
    if starts.shape[0] != num_groups + 1:
        raise ValueError(f"{kernel}: starts must have one entry per unique row, plus one")
    with nogil:
        for u in range(num_groups):
            if starts[u + 1] < starts[u]:
                ordered = False
                break
    if not ordered or starts[0] < 0 or starts[num_groups] > order.shape[0]:
        raise ValueError(f"{kernel}: starts must be non-decreasing and within order")
    if coefficients is not None and coefficients.shape[0] != num_positions:
        raise ValueError(f"{kernel}: coefficients must have one entry per position")
    if winners is not None and (winners.shape[0] != grad.shape[0]
                                or winners.shape[1] != grad.shape[1]):
        raise ValueError(f"{kernel}: winners must have grad's shape")
    check_grad_rows(kernel, grad)
    if grad.strides[0] < 0:
        raise ValueError(f"{kernel}: grad's rows must be contiguous, at a positive stride")
    view.starts = &starts[0]
    view.order = &order[0] if order.shape[0] else NULL
    view.source = &source[0] if source is not None and num_positions else NULL
    view.coefficients = &coefficients[0] if coefficients is not None and num_positions else NULL
    view.winners = &winners[0, 0] if winners is not None and winners.size else NULL
    view.num_positions = num_positions
    view.grad_rows = grad.shape[0]
    view.grad_stride = grad.strides[0] // sizeof(floating) if grad.shape[0] > 1 else grad.shape[1]
    view.scale_by_frequency = scale_by_frequency
    return 0


cdef inline void prefetch_source_entry(const PlanView *plan, Py_ssize_t k) noexcept nogil:
    """Prefetch the source entry that order[k] names (nothing without a source)."""
    cdef int64_t position = plan.order[k]
    if plan.source != NULL and <uint64_t>position < <uint64_t>plan.num_positions:
        FASTEMB_PREFETCH(plan.source + position)


cdef inline int64_t grad_row_of(const PlanView *plan, int64_t position) noexcept nogil:
    """The grad row a position reads (through its source entry, if any), or -1 when the
    position or its source entry names none."""
    cdef int64_t grad_row
    if <uint64_t>position >= <uint64_t>plan.num_positions:
        return -1
    grad_row = plan.source[position] if plan.source != NULL else position
    return grad_row if <uint64_t>grad_row < <uint64_t>plan.grad_rows else -1


cdef inline void prefetch_grad_row(const floating *grad, Py_ssize_t dim, const PlanView *plan,
                                   Py_ssize_t k) noexcept nogil:
    """Prefetch the grad row that order[k] reads."""
    cdef int64_t grad_row = grad_row_of(plan, plan.order[k])
    if grad_row >= 0:
        prefetch_row(grad + grad_row * plan.grad_stride, dim * sizeof(floating))


cdef inline void prefetch_group_gradient(const floating *grad, Py_ssize_t dim,
                                         const PlanView *plan, Py_ssize_t group,
                                         Py_ssize_t num_groups) noexcept nogil:
    """Prefetch for the gradient sum of unique row ``group``: the source entry of the group
    2 * GRADIENT_PREFETCH_GROUPS further on, and the grad row of the group
    GRADIENT_PREFETCH_GROUPS further on (each group's first position)."""
    cdef Py_ssize_t far = group + 2 * GRADIENT_PREFETCH_GROUPS
    cdef Py_ssize_t near = group + GRADIENT_PREFETCH_GROUPS
    if far < num_groups and plan.starts[far] < plan.starts[far + 1]:
        prefetch_source_entry(plan, plan.starts[far])
    if near < num_groups and plan.starts[near] < plan.starts[near + 1]:
        prefetch_grad_row(grad, dim, plan, plan.starts[near])


cdef void accumulate_one_row(const floating *grad, Py_ssize_t dim, int64_t row,
                             const PlanView *plan, Py_ssize_t group,
                             floating *out_row) noexcept nogil:
    """out_row = the gradient of one unique row, the plan's group ``group``."""
    cdef Py_ssize_t start = plan.starts[group], end = plan.starts[group + 1], k, j
    cdef const int64_t *source = plan.source
    cdef const int64_t *winners = plan.winners
    cdef const floating *coefficients = <const floating *>plan.coefficients
    cdef bint scale_by_frequency = plan.scale_by_frequency
    cdef int64_t position, grad_row, previous = -1
    cdef const floating *grad_source
    cdef double frequency = end - start
    cdef floating factor
    cdef bint plain = coefficients == NULL and not scale_by_frequency
    cdef bint started = winners != NULL  # max mode adds into zeros, column by column
    if started:
        memset(out_row, 0, dim * sizeof(floating))
    for k in range(start, end):
        if k + GRADIENT_PREFETCH_POSITIONS < end:
            if source != NULL:  # its grad row is one load further: start with the entry
                prefetch_source_entry(plan, k + GRADIENT_PREFETCH_POSITIONS)
            else:
                prefetch_grad_row(grad, dim, plan, k + GRADIENT_PREFETCH_POSITIONS)
        position = plan.order[k]
        grad_row = grad_row_of(plan, position)
        if grad_row < 0:
            continue
        grad_source = grad + grad_row * plan.grad_stride
        if winners != NULL:
            if grad_row == previous:
                continue
            previous = grad_row
            for j in range(dim):
                if winners[grad_row * dim + j] == row:
                    out_row[j] += grad_source[j]
        elif plain:
            if started:
                for j in range(dim):
                    out_row[j] += grad_source[j]
            else:
                memcpy(out_row, grad_source, dim * sizeof(floating))
        else:
            if coefficients == NULL:
                factor = <floating>(1.0 / frequency)
            elif scale_by_frequency:
                factor = <floating>(coefficients[position] / frequency)
            else:
                factor = coefficients[position]
            if started:
                for j in range(dim):
                    out_row[j] += factor * grad_source[j]
            else:
                for j in range(dim):
                    out_row[j] = factor * grad_source[j]
        started = True
    if not started:  # no contribution: a zero gradient
        memset(out_row, 0, dim * sizeof(floating))


cdef inline const floating *single_gradient_row(const floating *grad, Py_ssize_t dim,
                                                const PlanView *plan,
                                                Py_ssize_t group) noexcept nogil:
    """The grad row that is group ``group``'s whole gradient when the group has one position
    (a plain plan: no coefficients, frequency scaling or winners); NULL otherwise."""
    cdef Py_ssize_t start = plan.starts[group]
    cdef int64_t grad_row
    if plan.starts[group + 1] - start != 1:
        return NULL
    grad_row = grad_row_of(plan, plan.order[start])
    return grad + grad_row * plan.grad_stride if grad_row >= 0 else NULL


def accumulate_rows(const floating[:, :] grad, const int64_t[::1] rows not None,
                    const int64_t[::1] starts, const int64_t[::1] order,
                    const int64_t[::1] source, const floating[::1] coefficients,
                    bint scale_by_frequency, const int64_t[:, ::1] winners,
                    floating[:, ::1] values not None, int num_threads):
    """Sum each unique row's gradient contributions into ``values[u]`` (see the formula above).

    ``source``, ``coefficients`` and ``winners`` may be None (identity, all ones, not max mode).
    """
    cdef Py_ssize_t num_groups = rows.shape[0], u
    cdef PlanView plan
    check_plan("accumulate_rows", grad, num_groups, starts, order, source, coefficients,
               winners, scale_by_frequency, &plan)
    cdef Py_ssize_t dim = grad.shape[1]
    if values.shape[0] != num_groups or values.shape[1] != dim:
        raise ValueError("accumulate_rows: values must be (U, D)")
    if num_groups == 0 or dim == 0 or plan.grad_rows == 0:
        return
    with nogil:
        # dynamic: a frequent row's sum has thousands of positions, a static split would
        # leave the other threads waiting
        for u in prange(num_groups, schedule="dynamic", chunksize=256,
                        num_threads=team_size(num_threads)):
            prefetch_group_gradient(&grad[0, 0], dim, &plan, u, num_groups)
            accumulate_one_row(&grad[0, 0], dim, rows[u], &plan, u, &values[u, 0])


# --------------------------------------------------------------------------------------------
# Gradient of the per-sample weights, one iteration per position p of bag b (row r = x_p):
#   sum:            dL/dw_p = <G[b], W[r]>
#   weighted mean:  dL/dw_p = <G[b], W[r] - out[b]> / total_b     (0 when total_b = 0)
# and 0 at padding positions. The dot product accumulates in double.
# --------------------------------------------------------------------------------------------

def sample_weights_grad(const floating[:, ::1] weight, const index_t[::1] indices,
                        const int64_t[::1] bag_of, const floating[:, ::1] grad,
                        const floating[:, ::1] output, const floating[::1] totals,
                        int64_t padding_idx, floating[::1] out, int num_threads):
    """Fill ``out[p]`` with the gradient of the loss with respect to per-sample weight p.

    ``output`` and ``totals`` (the forward output and each bag's weight sum) are given for the
    weighted mean and are None for sum.
    """
    cdef Py_ssize_t n = indices.shape[0], dim = weight.shape[1], num_rows = weight.shape[0]
    cdef Py_ssize_t num_bags = grad.shape[0], p, j
    cdef int64_t row, b
    cdef double dot
    cdef bint mean = output is not None
    if bag_of.shape[0] != n or out.shape[0] != n or grad.shape[1] != dim:
        raise ValueError("sample_weights_grad: bag_of and out need one entry per index")
    if mean and (totals is None or output.shape[0] != num_bags or output.shape[1] != dim
                 or totals.shape[0] != num_bags):
        raise ValueError("sample_weights_grad: output and totals must match grad")
    with nogil:
        for p in prange(n, schedule="static", num_threads=team_size(num_threads)):
            row = indices[p]
            b = bag_of[p]
            dot = 0
            if row != padding_idx and 0 <= row < num_rows and 0 <= b < num_bags:
                for j in range(dim):
                    if mean:
                        dot = dot + <double>grad[b, j] * (weight[row, j] - output[b, j])
                    else:
                        dot = dot + <double>grad[b, j] * weight[row, j]
                if mean:
                    dot = dot / totals[b] if totals[b] != 0 else 0
            out[p] = <floating>dot


# --------------------------------------------------------------------------------------------
# Sparse optimizer steps, fused with the gradient accumulation: one prange iteration per
# unique row u sums that row's gradient g (accumulate_one_row, into a per-thread buffer) and
# updates the row's weight w and state in the same pass, reading and writing each once.
# With maximize, g is negated first; then L2 weight decay (lazy: on the updated rows only, as
# torch's weight_decay in SGD, Adagrad and Adam) replaces g by g + weight_decay * w, where w is
# the row's weight before the step. Scalars arrive in the table dtype (torch's rounding):
#   SGD:              w = w + (-lr) * g
#   Adagrad:          s = s + g*g;  w = w + (-clr) * (g / (sqrt(s) + eps))
#   row-wise Adagrad: a = a + dtype(mean(g*g));  w = w - lr * (g / (sqrt(a) + eps))   (a: 1 per row)
#                     mean(g*g) in double: column j adds into partial sum j % 8, and the 8
#                     sums add pairwise, ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)):
#                     8 chains of additions instead of one D long (the same order on any build)
#   lazy Adam:        m = m + (g - m) * (1 - b1);  v = v + (g*g - v) * (1 - b2)
#                     w = w + (-step_size) * (m / (sqrt(v) + eps))
#                     step_size = lr * sqrt(1 - b2^t) / (1 - b1^t), folded in Python
# --------------------------------------------------------------------------------------------

cdef inline floating square_root(floating x) noexcept nogil:
    """sqrt in the value's own precision (sqrtf for float: vectorisable, correctly rounded)."""
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


# Each optimizer's update of one weight, w its value and g its gradient (already negated and
# decayed as the step asks), in the state's precision; the state kept per weight is passed by
# pointer and updated. lr is the factor fastemb.optim passes for the step (negative to descend,
# with Adagrad's decay and Adam's bias corrections in it).
#   SGD:      w + lr g
#   Adagrad:  s += g^2;  w + lr g / (sqrt(s) + eps)
#   Adam:     m += (g - m)(1 - beta1);  v += (g^2 - v)(1 - beta2);  w + lr m / (sqrt(v) + eps)
#   row-wise Adagrad: s += mean(g^2) over the row, once;  w - lr g / (sqrt(s) + eps)
cdef inline floating sgd_weight(floating w, floating g, floating lr) noexcept nogil:
    return w + lr * g


cdef inline floating adagrad_weight(floating w, floating *sum_of_squares, floating g,
                                    floating lr, floating eps) noexcept nogil:
    sum_of_squares[0] = sum_of_squares[0] + g * g
    return w + lr * (g / (square_root(sum_of_squares[0]) + eps))


cdef inline floating adam_weight(floating w, floating *mean, floating *mean_square, floating g,
                                 floating lr, floating one_minus_beta1, floating one_minus_beta2,
                                 floating eps) noexcept nogil:
    cdef floating m = mean[0] + (g - mean[0]) * one_minus_beta1
    cdef floating v = mean_square[0] + (g * g - mean_square[0]) * one_minus_beta2
    mean[0] = m
    mean_square[0] = v
    return w + lr * (m / (square_root(v) + eps))


cdef inline floating rowwise_adagrad_denominator(floating *row_state, const floating *g,
                                                 Py_ssize_t dim, floating eps) noexcept nogil:
    """Row-wise Adagrad's row: adds the mean of g^2 (summed in float64, in 8 lanes) to its
    state and returns sqrt(state) + eps."""
    cdef Py_ssize_t j, lane
    cdef double mean_square
    cdef double partial[8]
    for lane in range(8):
        partial[lane] = 0
    for j in range(0, dim - dim % 8, 8):
        for lane in range(8):
            partial[lane] = partial[lane] + <double>g[j + lane] * g[j + lane]
    for j in range(dim - dim % 8, dim):
        partial[j % 8] = partial[j % 8] + <double>g[j] * g[j]
    mean_square = (((partial[0] + partial[1]) + (partial[2] + partial[3]))
                   + ((partial[4] + partial[5]) + (partial[6] + partial[7])))
    row_state[0] = row_state[0] + <floating>(mean_square / dim)
    return square_root(row_state[0]) + eps


cdef inline floating rowwise_adagrad_weight(floating w, floating g, floating lr,
                                            floating denominator) noexcept nogil:
    return w - lr * (g / denominator)


cdef void update_row(StepMethod method, floating *w, floating *state_a, floating *state_b,
                     const floating *g, Py_ssize_t dim, floating lr, floating one_minus_beta1,
                     floating one_minus_beta2, floating eps) noexcept nogil:
    """One row's update in place: w[:dim], its state (state_a: Adagrad's sums, Adam's means, a
    row-wise Adagrad row's one value; state_b: Adam's mean squares) and gradient g[:dim]."""
    cdef Py_ssize_t j
    cdef floating denominator
    if method == STEP_SGD:
        for j in range(dim):
            w[j] = sgd_weight(w[j], g[j], lr)
    elif method == STEP_ADAGRAD:
        for j in range(dim):
            w[j] = adagrad_weight(w[j], &state_a[j], g[j], lr, eps)
    elif method == STEP_ROWWISE_ADAGRAD:
        denominator = rowwise_adagrad_denominator(state_a, g, dim, eps)
        for j in range(dim):
            w[j] = rowwise_adagrad_weight(w[j], g[j], lr, denominator)
    else:
        for j in range(dim):
            w[j] = adam_weight(w[j], &state_a[j], &state_b[j], g[j], lr, one_minus_beta1,
                               one_minus_beta2, eps)


cdef inline void store_split(uint16_t *high, uint16_t *low, Py_ssize_t j,
                             float value) noexcept nogil:
    """high[j], low[j] = the top and low 16 bits of value (a split table's element j)."""
    cdef uint32_t bits = float_bits(value)
    high[j] = <uint16_t>(bits >> 16)
    low[j] = <uint16_t>(bits & 0xffff)


# Pointers that the compiler may take as the only way to their memory (C's restrict, spelled
# for each compiler by Cython's CYTHON_RESTRICT): the rows of a split update never overlap, and
# without it gcc checks at run time, row by row, that the five do not.
cdef extern from *:
    ctypedef uint16_t *restricted_halves "uint16_t *CYTHON_RESTRICT"
    ctypedef float *restricted_floats "float *CYTHON_RESTRICT"
    ctypedef const float *restricted_const_floats "const float *CYTHON_RESTRICT"


cdef void update_split_row(StepMethod method, restricted_halves high, restricted_halves low,
                           restricted_floats state_a, restricted_floats state_b,
                           restricted_const_floats g, Py_ssize_t dim, float lr,
                           float one_minus_beta1, float one_minus_beta2,
                           float eps) noexcept nogil:
    """update_row on a split table's row, its float32 weights joined from high[:dim] and
    low[:dim] and split back element by element, in registers (through a row buffer, the
    join, update and split took a LazyAdam step 2-3 ms longer)."""
    cdef Py_ssize_t j
    cdef float denominator
    if method == STEP_SGD:
        for j in range(dim):
            store_split(high, low, j, sgd_weight(joined(high[j], low[j]), g[j], lr))
    elif method == STEP_ADAGRAD:
        for j in range(dim):
            store_split(high, low, j,
                        adagrad_weight(joined(high[j], low[j]), &state_a[j], g[j], lr, eps))
    elif method == STEP_ROWWISE_ADAGRAD:
        denominator = rowwise_adagrad_denominator(state_a, g, dim, eps)
        for j in range(dim):
            store_split(high, low, j,
                        rowwise_adagrad_weight(joined(high[j], low[j]), g[j], lr, denominator))
    else:
        for j in range(dim):
            store_split(high, low, j,
                        adam_weight(joined(high[j], low[j]), &state_a[j], &state_b[j], g[j], lr,
                                    one_minus_beta1, one_minus_beta2, eps))


cdef inline void widen_row(const table_t *row, float *wide, Py_ssize_t dim) noexcept nogil:
    """wide[:dim] = a 16-bit row's values in float32 (exact)."""
    cdef Py_ssize_t j
    if table_t is float16_t:
        widen_float16_row(row, wide, dim)
    else:
        for j in range(dim):
            wide[j] = <float>element_value(row, j)


cdef inline void round_row(const float *wide, table_t *row, Py_ssize_t dim,
                           bint stochastic, uint64_t row_key) noexcept nogil:
    """row[:dim] = wide[:dim] rounded to the 16-bit format, to nearest or stochastically (the
    draw of column j is mix64(row_key + j): the same on any thread)."""
    cdef Py_ssize_t j
    if stochastic:
        for j in range(dim):
            if table_t is bfloat16_t:
                row[j] = bfloat16_stochastic(wide[j], mix64(row_key + <uint64_t>j))
            elif table_t is float16_t:
                row[j] = float16_stochastic(wide[j], mix64(row_key + <uint64_t>j))
    elif table_t is float16_t:
        round_float16_row(wide, row, dim)
    else:  # (a loop of its own, which the compiler vectorises)
        for j in range(dim):
            if table_t is bfloat16_t:
                row[j] = bfloat16_nearest(wide[j])


cdef struct TableStep:
    # one table's optimizer step on checked arguments (see sparse_step): the table (a table_t
    # array) and its state (floating arrays, the gradient's type), the gradient plan, and the
    # step's scalars
    StepMethod method
    void *weight
    Py_ssize_t num_rows
    Py_ssize_t dim
    void *state_a
    Py_ssize_t state_a_width
    void *state_b
    const int64_t *rows
    Py_ssize_t num_groups
    const void *grad
    PlanView view
    double lr
    double one_minus_beta1
    double one_minus_beta2
    double eps
    double decay
    bint maximize
    bint stochastic
    uint64_t rounding_key
    uint16_t *low_halves


cdef inline void step_row(const TableStep *step, Py_ssize_t u, table_t *table_type,
                          floating *buffer, Py_ssize_t buffer_stride) noexcept nogil:
    """Update unique row u of a step: a float32 or float64 table (of the state's dtype) in
    place; a 16-bit one (float32 state) through a float32 copy of the row, rounded back (see
    round_row); a split one (its bfloat16 high halves and the low halves beside) element by
    element (update_split_row). ``buffer`` is the thread's two rows: the summed gradient, then
    the widened weight. (table_type is NULL: it only selects the table's type.)"""
    cdef table_t *weight = <table_t *>step.weight
    cdef floating *state_a = <floating *>step.state_a
    cdef floating *state_b = <floating *>step.state_b
    cdef const floating *grad = <const floating *>step.grad
    cdef const PlanView *view = &step.view
    cdef Py_ssize_t dim = step.dim, j
    cdef floating *w
    cdef const floating *g
    cdef int64_t row, ahead
    cdef bint half = table_t is bfloat16_t or table_t is float16_t
    cdef bint split = table_t is bfloat16_t and step.low_halves != NULL  # (a split float32 table)
    cdef uint16_t *high = NULL
    cdef uint16_t *low = NULL
    if u + UPDATE_PREFETCH_ROWS < step.num_groups:
        ahead = step.rows[u + UPDATE_PREFETCH_ROWS]
        if 0 <= ahead < step.num_rows:
            prefetch_row(weight + ahead * dim, dim * sizeof(table_t), True)
            if step.low_halves != NULL:
                prefetch_row(step.low_halves + ahead * dim, dim * sizeof(uint16_t), True)
            if step.state_a_width:
                prefetch_row(state_a + ahead * step.state_a_width,
                             step.state_a_width * sizeof(floating), True)
            if step.method == STEP_ADAM:
                prefetch_row(state_b + ahead * dim, dim * sizeof(floating), True)
    prefetch_group_gradient(grad, dim, view, u, step.num_groups)
    row = step.rows[u]
    if row < 0 or row >= step.num_rows:
        return
    if split:
        high = <uint16_t *>(weight + row * dim)
        low = step.low_halves + row * dim
    elif half:
        w = buffer + buffer_stride
        widen_row(weight + row * dim, <float *>w, dim)
    else:
        w = <floating *>(weight + row * dim)
    # a row looked up once (most rows of a uniform batch) reads its grad row in place
    g = NULL
    if (not step.maximize and step.decay == 0 and view.coefficients == NULL
            and not view.scale_by_frequency and view.winners == NULL):
        g = single_gradient_row(grad, dim, view, u)
    if g == NULL:
        accumulate_one_row(grad, dim, row, view, u, buffer)
        if step.maximize:
            for j in range(dim):
                buffer[j] = -buffer[j]
        if step.decay != 0:
            for j in range(dim):
                buffer[j] = buffer[j] + <floating>step.decay * (
                    <floating>joined(high[j], low[j]) if split else w[j])
        g = buffer
    if split:
        update_split_row(step.method, high, low,
                         <float *>state_a + row * step.state_a_width if step.state_a_width
                         else NULL,
                         <float *>state_b + row * dim if step.method == STEP_ADAM else NULL,
                         <const float *>g, dim, <float>step.lr, <float>step.one_minus_beta1,
                         <float>step.one_minus_beta2, <float>step.eps)
        return
    update_row(step.method, w, state_a + row * step.state_a_width if step.state_a_width else NULL,
               state_b + row * dim if step.method == STEP_ADAM else NULL, g, dim,
               <floating>step.lr, <floating>step.one_minus_beta1,
               <floating>step.one_minus_beta2, <floating>step.eps)
    if half:
        round_row(<float *>w, weight + row * dim, dim, step.stochastic,
                  mix64(step.rounding_key ^ <uint64_t>row) * <uint64_t>dim)


cdef void step_rows(const TableStep *step, table_t *table_type, floating *buffers,
                    Py_ssize_t buffer_stride, int num_threads) noexcept nogil:
    """sparse_step's loop over the unique rows: step_row for each, each thread owning two rows
    of ``buffers``."""
    cdef Py_ssize_t u
    if table_t is double:
        if floating is float:
            return  # (a pair the callers never make: a float64 table has float64 state)
    elif floating is double:
        return  # (float32, bfloat16 and float16 tables have float32 state)
    # dynamic: a frequent row's sum has thousands of positions, a static split would leave the
    # other threads waiting
    for u in prange(step.num_groups, schedule="dynamic", chunksize=STEP_ROWS_PER_CHUNK,
                    num_threads=team_size(num_threads)):
        step_row(step, u, table_type, buffers + threadid() * 2 * buffer_stride, buffer_stride)


cdef object plan_grad(str kernel, object plan):
    """``plan.grad``; TypeError when ``plan`` is not a GradientPlan (or None)."""
    try:
        return plan.grad
    except AttributeError:
        raise TypeError(f"{kernel}: plan must be a GradientPlan, got {type(plan).__name__}")


cdef Py_ssize_t check_step(str kernel, StepMethod method, Py_ssize_t num_rows, Py_ssize_t dim,
                           floating[:, ::1] state_a, floating[:, ::1] state_b,
                           const floating[:, :] grad, Py_ssize_t num_groups, plan,
                           PlanView *view) except -1:
    """Raise ValueError unless the state, the gradient and the plan fit a (num_rows, dim)
    table and the method; then fill ``view``. Returns the state_a row width (0: none)."""
    cdef Py_ssize_t state_a_width = 0 if state_a is None else state_a.shape[1]
    cdef const floating[::1] coefficients = plan.coefficients
    cdef const int64_t[::1] starts = plan.starts, order = plan.order, source = plan.source
    cdef const int64_t[:, ::1] winners = plan.winners
    cdef bint scale_by_frequency = plan.scale_by_frequency
    check_enum(method, STEP_ADAM, "optimizer step method")
    check_plan(kernel, grad, num_groups, starts, order, source, coefficients, winners,
               scale_by_frequency, view)
    if grad.shape[1] != dim:
        raise ValueError(f"{kernel}: the gradient does not match the table")
    if (state_a is not None and state_a.shape[0] != num_rows) or (
            state_b is not None and state_b.shape[0] != num_rows):
        raise ValueError(f"{kernel}: optimizer state does not match the table")
    if (method == STEP_ADAGRAD or method == STEP_ADAM) and (
            state_a is None or state_a_width != dim):
        raise ValueError(f"{kernel}: this method needs (V, D) state")
    if method == STEP_ADAM and (state_b is None or state_b.shape[1] != dim):
        raise ValueError(f"{kernel}: Adam needs two (V, D) states")
    if method == STEP_ROWWISE_ADAGRAD and (state_a is None or state_a_width != 1):
        raise ValueError(f"{kernel}: row-wise Adagrad needs (V, 1) state")
    return state_a_width


cdef floating *state_data(floating[:, ::1] state) noexcept:
    """The first element of a state array; NULL for None or an empty one."""
    return &state[0, 0] if state is not None and state.shape[0] and state.shape[1] else NULL


cdef int describe_step(TableStep *step, str kernel, StepMethod method, table_t *weight,
                       Py_ssize_t num_rows, Py_ssize_t dim, floating[:, ::1] state_a,
                       floating[:, ::1] state_b, const int64_t[::1] rows, plan,
                       const floating[:, :] grad, double lr, double one_minus_beta1,
                       double one_minus_beta2, double eps, bint maximize, double weight_decay,
                       bint stochastic_rounding, uint64_t rounding_key,
                       uint16_t *low_halves) except -1:
    """Check a step's arguments (check_step) and fill ``step``. ``weight`` is the table's
    first element (NULL when it has none); ``low_halves`` those of a split table (NULL for any
    other). A step with nothing to do gets no rows."""
    step.state_a_width = check_step(kernel, method, num_rows, dim, state_a, state_b, grad,
                                    rows.shape[0], plan, &step.view)
    step.method = method
    step.weight = weight
    step.num_rows = num_rows
    step.dim = dim
    step.state_a = state_data(state_a)
    step.state_b = state_data(state_b)
    step.rows = &rows[0] if rows.shape[0] else NULL
    step.num_groups = rows.shape[0]
    if dim == 0 or grad.shape[0] == 0 or weight == NULL:
        step.num_groups = 0
    step.grad = &grad[0, 0] if step.num_groups else NULL
    step.lr = lr
    step.one_minus_beta1 = one_minus_beta1
    step.one_minus_beta2 = one_minus_beta2
    step.eps = eps
    step.decay = weight_decay
    step.maximize = maximize
    step.stochastic = stochastic_rounding
    step.rounding_key = rounding_key
    step.low_halves = low_halves
    return 0


cdef object step_buffers(Py_ssize_t dim, int num_threads, object dtype):
    """Per thread, two rows of ``dim`` (see step_row), each followed by a cache line that
    nobody writes, so no two threads ever write the same line (the false sharing made the
    2-thread SGD step as slow as the 1-thread one)."""
    return np.empty((2 * team_size(num_threads), dim + CACHE_LINE_BYTES // np.dtype(dtype).itemsize),
                    dtype=dtype)


cdef int run_step(str kernel, StepMethod method, table_t *weight, Py_ssize_t num_rows,
                  Py_ssize_t dim, floating[:, ::1] state_a, floating[:, ::1] state_b,
                  const int64_t[::1] rows, plan, const floating[:, :] grad, double lr,
                  double one_minus_beta1, double one_minus_beta2, double eps, bint maximize,
                  double weight_decay, int num_threads, bint stochastic_rounding,
                  uint64_t rounding_key, uint16_t *low_halves) except -1:
    """describe_step, then run step_rows without the GIL."""
    cdef TableStep step
    describe_step(&step, kernel, method, weight, num_rows, dim, state_a, state_b, rows, plan,
                  grad, lr, one_minus_beta1, one_minus_beta2, eps, maximize, weight_decay,
                  stochastic_rounding, rounding_key, low_halves)
    cdef floating[:, ::1] buffers = step_buffers(dim, num_threads, np.asarray(grad).dtype)
    if step.num_groups == 0:
        return 0
    with nogil:
        step_rows(&step, weight, &buffers[0, 0], buffers.shape[1], num_threads)
    return 0


def sparse_step(StepMethod method, floating[:, ::1] weight not None, floating[:, ::1] state_a,
                floating[:, ::1] state_b, const int64_t[::1] rows not None, plan, double lr,
                double one_minus_beta1, double one_minus_beta2, double eps, bint maximize,
                double weight_decay, int num_threads):
    """Apply one optimizer step to the rows of a gradient given by ``plan`` (a GradientPlan).

    ``method`` is a StepMethod; ``lr`` is the signed factor of the formula above (-lr, -clr, lr
    or -step_size); state_a / state_b are the per-row state (None where the method has none;
    row-wise Adagrad's accumulator is (V, 1)); ``weight_decay`` is the L2 factor (0: none).
    """
    cdef const floating[:, :] grad = plan_grad("sparse_step", plan)
    run_step("sparse_step", method, &weight[0, 0] if weight.shape[0] and weight.shape[1]
             else NULL, weight.shape[0], weight.shape[1], state_a, state_b, rows, plan, grad,
             lr, one_minus_beta1, one_minus_beta2, eps, maximize, weight_decay, num_threads,
             False, 0, NULL)


cdef int run_step_tables(floating *type_tag, StepMethod method, list tables, list states_a,
                         list states_b, list rows, list plans, const double[::1] lrs,
                         const double[::1] one_minus_beta1s, const double[::1] one_minus_beta2s,
                         const double[::1] epss, bint maximize, double weight_decay,
                         int num_threads) except -1:
    """sparse_step_tables on tables of ``floating`` (type_tag is NULL: it only selects it)."""
    cdef Py_ssize_t num_tables = len(tables), t, chunk, first, u, max_dim = 0
    cdef Py_ssize_t num_chunks = 0
    cdef TableStep *steps = <TableStep *>malloc(num_tables * sizeof(TableStep))
    cdef Py_ssize_t *chunks = NULL  # per chunk: its table, its first unique row
    cdef floating[:, ::1] weight, state_a, state_b, buffers
    cdef const floating[:, :] grad
    cdef const int64_t[::1] table_rows
    if steps == NULL:
        raise MemoryError()
    try:
        for t in range(num_tables):
            weight, state_a, state_b = tables[t], states_a[t], states_b[t]
            table_rows, grad = rows[t], plan_grad("sparse_step_tables", plans[t])
            if weight is None or table_rows is None:
                raise ValueError("sparse_step_tables: a table or its rows is None")
            describe_step(&steps[t], "sparse_step_tables", method,
                          &weight[0, 0] if weight.shape[0] and weight.shape[1] else NULL,
                          weight.shape[0], weight.shape[1], state_a, state_b, table_rows,
                          plans[t], grad, lrs[t], one_minus_beta1s[t], one_minus_beta2s[t],
                          epss[t], maximize, weight_decay, False, 0, NULL)
            max_dim = max(max_dim, weight.shape[1])
            num_chunks += (steps[t].num_groups + STEP_ROWS_PER_CHUNK - 1) // STEP_ROWS_PER_CHUNK
        chunks = <Py_ssize_t *>malloc(2 * max(num_chunks, 1) * sizeof(Py_ssize_t))
        if chunks == NULL:
            raise MemoryError()
        chunk = 0
        for t in range(num_tables):
            for first in range(0, steps[t].num_groups, STEP_ROWS_PER_CHUNK):
                chunks[2 * chunk] = t
                chunks[2 * chunk + 1] = first
                chunk += 1
        buffers = step_buffers(max_dim, num_threads, np.asarray(weight).dtype)
        with nogil:
            for chunk in prange(num_chunks, schedule="dynamic",
                                num_threads=team_size(num_threads)):
                t = chunks[2 * chunk]
                first = chunks[2 * chunk + 1]
                for u in range(first, min(first + STEP_ROWS_PER_CHUNK, steps[t].num_groups)):
                    step_row(&steps[t], u, <floating *>NULL,
                             &buffers[threadid() * 2, 0], buffers.shape[1])
    finally:
        free(steps)
        free(chunks)
    return 0


def sparse_step_tables(StepMethod method, list tables not None, list states_a not None,
                       list states_b not None, list rows not None, list plans not None,
                       const double[::1] lrs not None,
                       const double[::1] one_minus_beta1s not None,
                       const double[::1] one_minus_beta2s not None,
                       const double[::1] epss not None, bint maximize, double weight_decay,
                       int num_threads):
    """sparse_step on several float32 tables, or several float64 ones, in one call: table t
    has ``states_a[t]``, ``states_b[t]``, ``rows[t]``, ``plans[t]`` and the scalars
    ``lrs[t]``, ... Every table is checked before any changes; then the unique rows of all the
    tables go out in chunks of STEP_ROWS_PER_CHUNK rows of one table, to whichever thread is
    free (each row, and so each element of the tables and states, has one owner)."""
    cdef Py_ssize_t num_tables = len(tables)
    if not (len(states_a) == len(states_b) == len(rows) == len(plans) == lrs.shape[0]
            == one_minus_beta1s.shape[0] == one_minus_beta2s.shape[0] == epss.shape[0]
            == num_tables):
        raise ValueError("sparse_step_tables: every list needs one entry per table")
    if num_tables == 0:
        return
    dtype = getattr(tables[0], "dtype", None)
    if dtype not in (np.float32, np.float64) or any(
            getattr(table, "dtype", None) != dtype for table in tables):
        raise ValueError("sparse_step_tables: the tables must all be float32 or all float64")
    if dtype == np.float64:
        run_step_tables(<double *>NULL, method, tables, states_a, states_b, rows, plans, lrs,
                        one_minus_beta1s, one_minus_beta2s, epss, maximize, weight_decay,
                        num_threads)
    else:
        run_step_tables(<float *>NULL, method, tables, states_a, states_b, rows, plans, lrs,
                        one_minus_beta1s, one_minus_beta2s, epss, maximize, weight_decay,
                        num_threads)


def sparse_step_half(StepMethod method, uint16_t[:, ::1] weight not None,
                     float[:, ::1] state_a, float[:, ::1] state_b,
                     const int64_t[::1] rows not None, plan, double lr, double one_minus_beta1,
                     double one_minus_beta2, double eps, bint maximize, double weight_decay,
                     int num_threads, HalfFormat half_format, bint stochastic_rounding,
                     uint64_t rounding_key, uint16_t[:, ::1] low_halves=None):
    """sparse_step on a 16-bit table (the bits of a ``half_format`` table: BFLOAT16 or FLOAT16)
    with float32 state and gradient: each updated row is computed in float32, then rounded to
    the table's format, to nearest (ties to even) or, with ``stochastic_rounding``, up or down
    with the probabilities that make the expected result the float32 one, drawn from
    ``rounding_key``, the row and the column (the same for any thread count).

    With ``low_halves`` (a BFLOAT16 table's shape) the two are a split float32 table: each
    weight is the float32 whose top 16 bits are in ``weight`` and low 16 bits in
    ``low_halves``; the update is the float32 update of that weight, stored back exactly into
    the two halves (no rounding)."""
    check_enum(half_format, FLOAT16, "half format")
    cdef const float[:, :] grad = plan_grad("sparse_step_half", plan)
    cdef uint16_t *table = (&weight[0, 0] if weight.shape[0] and weight.shape[1] else NULL)
    cdef uint16_t *low = NULL
    if low_halves is not None:
        if (half_format != BFLOAT16 or low_halves.shape[0] != weight.shape[0]
                or low_halves.shape[1] != weight.shape[1]):
            raise ValueError("sparse_step_half: low_halves must have the shape of a bfloat16 "
                             "table")
        low = &low_halves[0, 0] if table != NULL else NULL
    if half_format == BFLOAT16:
        run_step("sparse_step_half", method, <bfloat16_t *>table, weight.shape[0],
                 weight.shape[1], state_a, state_b, rows, plan, grad, lr, one_minus_beta1,
                 one_minus_beta2, eps, maximize, weight_decay, num_threads, stochastic_rounding,
                 rounding_key, low)
    else:
        run_step("sparse_step_half", method, <float16_t *>table, weight.shape[0],
                 weight.shape[1], state_a, state_b, rows, plan, grad, lr, one_minus_beta1,
                 one_minus_beta2, eps, maximize, weight_decay, num_threads, stochastic_rounding,
                 rounding_key, NULL)
