# cython: language_level=3
"""fastemb._lookup: the forward kernels (row gather, bag reductions, max_norm renorm) and the
index checks of the lookups. The rules every kernel follows are in ``fastemb/_core.pyx``."""

from cython.parallel cimport prange
from libc.math cimport INFINITY, NAN, fabs, isinf, pow, sqrt
from libc.stdint cimport int32_t, int64_t, uint16_t, uint64_t
from libc.string cimport memcpy, memset

cimport numpy as cnp
from fastemb._common cimport (BAG_MAX, BAG_MEAN, BAG_SUM, BFLOAT16, FASTEMB_HAVE_OPENMP, FLOAT16,
                              PARALLEL_GRAIN, BagMode, HalfFormat, bag_extent, bfloat16_t,
                              check_enum, clamp, count_bags_out_of_range, count_out_of_range,
                              divide_by_bag_sizes, element_value, float16_t, floating, index_t,
                              is_kept,
                              omp_get_max_threads, prefetch_ahead, prefetch_distance,
                              prefetch_row, prefetch_table_row, rows_on_lines, stored_t,
                              table_t, team_size)

import sys

import numpy as np

include "_bag_call.pxi"

cnp.import_array()

__all__ = ["bag_forward_common", "bag_reduce", "bounds_from_offsets", "collection_bag_reduce",
           "collection_gather", "first_decrease",
           "first_out_of_range", "gather_rows", "get_num_threads", "renorm_rows",
           "set_parallel_grain", "set_requested_threads", "threads_for"]

cdef enum:
    RANGE_CHECK_CHUNK = 4096  # indices checked per chunk by first_out_of_range
    BAGS_PER_CHUNK = 64  # bags reduced per prange iteration by bag_reduce
    OUT_PREFETCH_BAGS = 4  # how many bags ahead a collection's output rows are prefetched
    GATHER_ROWS_PER_CHUNK = 256  # rows copied per prange iteration by collection_gather

# Prefetching starts at a table size, below which the rows a lookup needs are mostly in the
# core's own caches and prefetch instructions are overhead. A bag's running sum waits on its
# rows' loads, so the bag kernels prefetch once the table is past half of a core's L2. A gather
# only copies rows, and the CPU overlaps the loads of its independent copies by itself, so it
# prefetches only tables well past the L3 (the bench's small workload sits between the two).
cdef Py_ssize_t BAG_PREFETCH_MIN_TABLE_BYTES = 256 << 10
cdef Py_ssize_t GATHER_PREFETCH_MIN_TABLE_BYTES = 8 << 20


# --------------------------------------------------------------------------------------------
# Validation helper
# --------------------------------------------------------------------------------------------

def first_out_of_range(const index_t[::1] indices, int64_t num_embeddings, int num_threads=1):
    """Position of the first index outside ``[0, num_embeddings)``, or -1 if there is none.

    Chunk by chunk, in parallel: a count of each chunk's outsiders; then a search of the first
    chunk that has some.
    """
    cdef Py_ssize_t n = indices.shape[0], found = -1, chunk, i, start
    cdef Py_ssize_t num_chunks = (n + RANGE_CHECK_CHUNK - 1) // RANGE_CHECK_CHUNK
    cdef uint64_t limit = <uint64_t>num_embeddings if num_embeddings > 0 else 0
    cdef Py_ssize_t[::1] outside = np.zeros(num_chunks, dtype=np.intp)
    with nogil:
        for chunk in prange(num_chunks, schedule="static", num_threads=team_size(num_threads)):
            outside[chunk] = count_out_of_range(
                &indices[0], chunk * RANGE_CHECK_CHUNK,
                min((chunk + 1) * RANGE_CHECK_CHUNK, n), limit)
        for chunk in range(num_chunks):
            if outside[chunk]:
                start = chunk * RANGE_CHECK_CHUNK
                for i in range(start, min(start + RANGE_CHECK_CHUNK, n)):
                    if <uint64_t>indices[i] >= limit:
                        found = i
                        break
                break
    return found


# NumPy's type number of ml_dtypes' bfloat16 (a user dtype, numbered when ml_dtypes registers
# it), found the first time a table of a user dtype comes while ml_dtypes is imported; -1 before.
cdef int bfloat16_type = -1


cdef bint is_bfloat16(int type_number):
    """True when ``type_number`` is ml_dtypes' bfloat16 (an array of it means ml_dtypes is
    imported: looked up in sys.modules, never imported here)."""
    global bfloat16_type
    if type_number < NPY_USERDEF:
        return False
    if bfloat16_type < 0:
        ml_dtypes = sys.modules.get("ml_dtypes")
        if ml_dtypes is None:
            return False
        bfloat16_type = np.dtype(ml_dtypes.bfloat16).num
    return type_number == bfloat16_type


def bounds_from_offsets(offsets, int64_t num_indices, bint include_last_offset):
    """The bags' bounds (int64, B + 1 entries: bag b is ``input[bounds[b]:bounds[b+1]]``) of
    torch-style ``offsets`` that are a 1-D C-contiguous int32/int64 array and valid; None for
    anything else, which the caller converts or explains. One call, for the lookups' common
    case (a chain of NumPy calls costs more than the loop, with its code out of the caches)."""
    cdef Py_ssize_t num_bags = bag_count(offsets, include_last_offset)
    if num_bags < 0:
        return None
    bounds = np.empty(num_bags + 1, dtype=np.int64)
    if not copy_offsets(offsets, <int64_t *>cnp.PyArray_DATA(bounds), num_bags, num_indices,
                        include_last_offset):
        return None
    return bounds


def first_decrease(const int64_t[::1] values):
    """Position of the first entry smaller than the one before it, or -1 if there is none."""
    cdef Py_ssize_t i
    for i in range(1, values.shape[0]):
        if values[i] < values[i - 1]:
            return i
    return -1


# --------------------------------------------------------------------------------------------
# Row gather (embedding forward)
#   out[i, :] = W[indices[i], :]                                 for i in [0, n)
# --------------------------------------------------------------------------------------------

def gather_rows(const stored_t[:, ::1] weight, const index_t[::1] indices,
                stored_t[:, ::1] out, int num_threads):
    """Copy ``weight[indices[i]]`` into ``out[i]`` for every i (a row of zeros if out of range);
    a 16-bit table is copied as its bits.
    Returns how many indices were out of range: the caller, whose output this is, can skip a
    separate validation pass and raise only when it is not 0.

    ``out`` should come from ``np.empty``: each thread then touches its own output pages first.
    """
    cdef Py_ssize_t n = indices.shape[0], num_rows = weight.shape[0], dim = weight.shape[1]
    cdef Py_ssize_t out_of_range = 0
    cdef Py_ssize_t row_bytes = dim * sizeof(stored_t)
    cdef Py_ssize_t i, distance = prefetch_distance(num_rows, dim, sizeof(stored_t),
                                                    GATHER_PREFETCH_MIN_TABLE_BYTES)
    cdef int64_t row
    cdef bint lines_aligned
    if out.shape[0] != n or out.shape[1] != dim:
        raise ValueError("gather_rows: out must have shape (len(indices), weight.shape[1])")
    if n == 0:
        return 0
    if dim == 0:  # nothing to copy, but the indices are still checked
        return count_out_of_range(&indices[0], 0, n, num_rows)
    lines_aligned = num_rows > 0 and rows_on_lines(&weight[0, 0], row_bytes)
    with nogil:
        for i in prange(n, schedule="static", num_threads=team_size(num_threads)):
            if distance:
                prefetch_ahead(&weight[0, 0], num_rows, row_bytes, &indices[0], n, i, distance,
                               0, row_bytes, lines_aligned)
            row = indices[i]
            if 0 <= row < num_rows:
                memcpy(&out[i, 0], &weight[row, 0], row_bytes)
            else:
                memset(&out[i, 0], 0, row_bytes)
                out_of_range += 1  # (an OpenMP reduction)
    return out_of_range


# --------------------------------------------------------------------------------------------
# Bag reductions (embedding_bag forward). Bag b holds positions [bounds[b], bounds[b+1]); the
# entries that count are those whose row is not padding_idx ("kept" entries below).
#   sum:            out[b] = sum_k W[x_k]            (w_k * W[x_k] with per-sample weights)
#   mean:           out[b] = sum_k W[x_k] / count    (weighted: sum_k w_k W[x_k] / sum_k w_k)
#                   and 0 when the divisor is 0 (empty or all-padding bag, zero weight sum)
#   max:            out[b, d] = max_k W[x_k, d]; winners[b, d] = the row that gave it. A later
#                   entry replaces the running max only if strictly greater (first wins ties,
#                   NaN stays only if it came first), as torch does; empty bags give 0 and -1.
# Sums accumulate left to right in the table dtype, starting from 0, and mean divides the
# rounded sum: bit for bit what torch computes.
# --------------------------------------------------------------------------------------------

cdef extern from "_core.h":
    # Columns are reduced in blocks of this many bytes whose running values the compiler keeps
    # in vector registers for the whole bag (16 of them); the block width is a compile-time
    # constant, so the loops over a block unroll. A row wider than a block is reduced in
    # several passes over the bag, each prefetching its own columns of the rows ahead. What is left
    # after the wide blocks goes in narrow blocks of 512, 256, 128, 64 and 32 bytes (at most one of
    # each, also unrolled), then a last partial one.
    enum: BLOCK_BYTES "FASTEMB_BLOCK_BYTES"
    enum: MAX_BLOCK_ELEMENTS "FASTEMB_MAX_BLOCK_ELEMENTS"
    const double ZERO_BLOCK "fastemb_zero_block"[1]  # BLOCK_BYTES of zero bits: +0 as any dtype
    void zero_floats "fastemb_zero_float"(float *acc, Py_ssize_t width) noexcept nogil
    void zero_doubles "fastemb_zero_double"(double *acc, Py_ssize_t width) noexcept nogil
    void add_floats "fastemb_add_float"(float *acc, const float *source,
                                        Py_ssize_t width) noexcept nogil
    void add_doubles "fastemb_add_double"(double *acc, const double *source,
                                          Py_ssize_t width) noexcept nogil
    void add_scaled_floats "fastemb_add_scaled_float"(float *acc, float weight,
                                                      const float *source,
                                                      Py_ssize_t width) noexcept nogil
    void add_scaled_doubles "fastemb_add_scaled_double"(double *acc, double weight,
                                                        const double *source,
                                                        Py_ssize_t width) noexcept nogil
    void store_floats "fastemb_store_float"(float *out, const float *acc,
                                            Py_ssize_t width) noexcept nogil
    void store_doubles "fastemb_store_double"(double *out, const double *acc,
                                              Py_ssize_t width) noexcept nogil
    void add_bfloat16s "fastemb_add_bfloat16"(float *acc, const bfloat16_t *source,
                                              Py_ssize_t width) noexcept nogil
    void add_float16s "fastemb_add_float16"(float *acc, const float16_t *source,
                                            Py_ssize_t width) noexcept nogil
    void add_scaled_bfloat16s "fastemb_add_scaled_bfloat16"(float *acc, float weight,
                                                            const bfloat16_t *source,
                                                            Py_ssize_t width) noexcept nogil
    void add_scaled_float16s "fastemb_add_scaled_float16"(float *acc, float weight,
                                                          const float16_t *source,
                                                          Py_ssize_t width) noexcept nogil

# The block kernels are specialised on the block's width through a type tag (a NULL pointer of
# one of these types), so each width is a compile-time constant in its own C function whatever
# the compiler's inlining and cloning heuristics decide (left to them, gcc 12 compiled the
# narrow block as the generic one, with its accumulators in memory). Every common row width
# (8, 16, 32, 48, 64 float32 columns) has blocks that keep their sums in registers.
cdef struct WideColumns:
    char bytes[BLOCK_BYTES]

cdef struct Columns512:  # (in the AVX2 build, the wide block already takes 512 bytes)
    char bytes[512]

cdef struct Columns256:
    char bytes[256]

cdef struct Columns128:
    char bytes[128]

cdef struct Columns64:
    char bytes[64]

cdef struct Columns32:
    char bytes[32]

cdef struct AnyColumns:  # the width is given at run time
    char bytes[1]

ctypedef fused columns_t:
    WideColumns
    Columns512
    Columns256
    Columns128
    Columns64
    Columns32
    AnyColumns


cdef inline Py_ssize_t block_width(columns_t *columns, Py_ssize_t any_width,
                                   Py_ssize_t item_size) noexcept nogil:
    """The number of columns a block of this type holds (any_width for AnyColumns)."""
    if columns_t is AnyColumns:
        return any_width
    else:
        return sizeof(columns_t) // item_size


cdef inline void zero_block(floating *acc, Py_ssize_t width, bint unrolled) noexcept nogil:
    """acc[:width] = 0 (unrolled: in the C helpers, for a compile-time width)."""
    cdef Py_ssize_t j
    if unrolled:
        if floating is float:
            zero_floats(acc, width)
        else:
            zero_doubles(acc, width)
    else:
        for j in range(width):
            acc[j] = 0


cdef inline void add_block(floating *acc, floating weight, const table_t *source,
                           Py_ssize_t width, bint weighted, bint unrolled) noexcept nogil:
    """acc[:width] += source[:width] (times weight if weighted), a 16-bit source widened to
    float32. Only the pairs the kernels run are compiled: a float64 table with float64 sums,
    the others with float32 sums."""
    cdef Py_ssize_t j
    if (table_t is double and floating is float) or (table_t is not double and floating is double):
        pass
    elif unrolled and not weighted:
        if table_t is bfloat16_t:
            add_bfloat16s(acc, source, width)
        elif table_t is float16_t:
            add_float16s(acc, source, width)
        elif table_t is float:
            add_floats(acc, source, width)
        else:
            add_doubles(acc, source, width)
    elif unrolled:
        if table_t is bfloat16_t:
            add_scaled_bfloat16s(acc, weight, source, width)
        elif table_t is float16_t:
            add_scaled_float16s(acc, weight, source, width)
        elif table_t is float:
            add_scaled_floats(acc, weight, source, width)
        else:
            add_scaled_doubles(acc, weight, source, width)
    elif not weighted:
        for j in range(width):
            acc[j] += <floating>element_value(source, j)
    else:
        for j in range(width):
            acc[j] += weight * <floating>element_value(source, j)


cdef inline void store_block(floating *out, const floating *acc, Py_ssize_t width,
                             bint unrolled) noexcept nogil:
    """out[:width] = acc[:width]."""
    cdef Py_ssize_t j
    if unrolled:
        if floating is float:
            store_floats(out, acc, width)
        else:
            store_doubles(out, acc, width)
    else:
        for j in range(width):
            out[j] = acc[j]


cdef inline void add_entry(floating *acc, const table_t *table, Py_ssize_t num_rows,
                           Py_ssize_t dim, int64_t row, const floating *sample_weights,
                           Py_ssize_t k, int64_t padding_idx, Py_ssize_t column,
                           Py_ssize_t width, bint weighted, bint unrolled) noexcept nogil:
    """Add bag entry k (row ``row``) to a block's running sums. A skipped entry adds a block of
    +0 (weight 1), which changes no sum: a sum that starts at +0 is never -0. The adds then run
    for every entry, so the compiler keeps acc in registers (a conditional update makes gcc
    track, per register, whether to store it)."""
    cdef const table_t *source = <const table_t *>ZERO_BLOCK
    cdef floating weight = 1
    if is_kept(row, padding_idx, num_rows):
        source = table + row * dim + column
        if weighted:
            weight = sample_weights[k]
    add_block(acc, weight, source, width, weighted, unrolled)


# The bag kernels are also specialised on what they reduce, through a second type tag, so that
# the weighted and the plain sum are separate functions (a runtime test lets the compiler share
# their loads, and spill them).
cdef struct SumReduction:
    char unused

cdef struct WeightedSumReduction:
    char unused

cdef struct MaxReduction:
    char unused

ctypedef fused reduction_t:
    SumReduction
    WeightedSumReduction
    MaxReduction


cdef inline void sum_block(reduction_t *reduction, const table_t *table, Py_ssize_t num_rows,
                           Py_ssize_t dim, const index_t *indices, Py_ssize_t n,
                           const int64_t *bounds, Py_ssize_t first_bag, Py_ssize_t end_bag,
                           const floating *sample_weights, int64_t padding_idx,
                           Py_ssize_t column, columns_t *columns, Py_ssize_t any_width,
                           floating *out, Py_ssize_t out_stride, Py_ssize_t distance,
                           bint lines_aligned) noexcept nogil:
    """out[b, column:column+width] = the sum of bag b's kept rows' columns (times their
    weights, for a WeightedSumReduction), for the bags b in [first_bag, end_bag), where out's
    rows lie ``out_stride`` elements apart. With distance > 0 it prefetches the same columns of
    the row ``distance`` positions ahead."""
    cdef Py_ssize_t width = block_width(columns, any_width, sizeof(floating))
    cdef bint unrolled = not (columns_t is WideColumns or columns_t is AnyColumns)
    cdef bint weighted = reduction_t is WeightedSumReduction
    cdef floating acc[MAX_BLOCK_ELEMENTS]
    cdef Py_ssize_t b, k, start, end, prefetched_end, row_bytes = dim * sizeof(table_t)
    for b in range(first_bag, end_bag):
        bag_extent(bounds, b, n, &start, &end)
        zero_block(acc, width, unrolled)
        # Separate loops rather than tests per entry: the entries whose row `distance` ahead
        # exists (with the two alignments), then the rest, without prefetching.
        prefetched_end = clamp(n - distance, start, end) if distance else start
        if lines_aligned:
            for k in range(start, prefetched_end):
                prefetch_table_row(table, num_rows, row_bytes, indices[k + distance],
                                   column * sizeof(table_t), width * sizeof(table_t), True)
                add_entry(acc, table, num_rows, dim, indices[k], sample_weights, k,
                          padding_idx, column, width, weighted, unrolled)
        else:
            for k in range(start, prefetched_end):
                prefetch_table_row(table, num_rows, row_bytes, indices[k + distance],
                                   column * sizeof(table_t), width * sizeof(table_t), False)
                add_entry(acc, table, num_rows, dim, indices[k], sample_weights, k,
                          padding_idx, column, width, weighted, unrolled)
        for k in range(prefetched_end, end):
            add_entry(acc, table, num_rows, dim, indices[k], sample_weights, k,
                          padding_idx, column, width, weighted, unrolled)
        if out_stride != dim and b + OUT_PREFETCH_BAGS < end_bag:
            # rows of out far apart (a collection's): the CPU does not fetch them ahead
            prefetch_row(out + (b + OUT_PREFETCH_BAGS) * out_stride + column,
                         width * sizeof(floating), True)
        store_block(out + b * out_stride + column, acc, width, unrolled)


cdef inline void max_block(const table_t *table, Py_ssize_t num_rows, Py_ssize_t dim,
                           const index_t *indices, Py_ssize_t n, const int64_t *bounds,
                           Py_ssize_t first_bag, Py_ssize_t end_bag, int64_t padding_idx,
                           Py_ssize_t column, columns_t *columns, Py_ssize_t any_width,
                           floating *out, int64_t *winners, Py_ssize_t out_stride,
                           Py_ssize_t distance, bint lines_aligned) noexcept nogil:
    """out[b, column:column+width] = those columns' max over bag b's kept rows (first wins
    ties), for the bags b in [first_bag, end_bag); winners (unless NULL, rows as far apart as
    out's: ``out_stride``) gets the winning rows. No kept row: zeros and -1."""
    cdef Py_ssize_t width = block_width(columns, any_width, sizeof(floating))
    cdef floating acc[MAX_BLOCK_ELEMENTS]
    cdef int64_t winner[MAX_BLOCK_ELEMENTS]
    cdef const table_t *source
    cdef floating value
    cdef floating *out_row
    cdef int64_t *winner_row
    cdef Py_ssize_t b, k, j, start, end
    cdef int64_t row
    for b in range(first_bag, end_bag):
        bag_extent(bounds, b, n, &start, &end)
        out_row = out + b * out_stride + column
        winner_row = winners + b * out_stride + column if winners != NULL else NULL
        k = start
        while k < end and not is_kept(indices[k], padding_idx, num_rows):
            k += 1
        if k == end:
            for j in range(width):
                out_row[j] = 0
                if winner_row != NULL:
                    winner_row[j] = -1
            continue
        row = indices[k]
        source = table + row * dim + column
        for j in range(width):
            acc[j] = <floating>element_value(source, j)
            winner[j] = row
        for k in range(k + 1, end):
            if distance:
                prefetch_ahead(table, num_rows, dim * sizeof(table_t), indices, n, k, distance,
                               column * sizeof(table_t), width * sizeof(table_t), lines_aligned)
            row = indices[k]
            if not is_kept(row, padding_idx, num_rows):
                continue
            source = table + row * dim + column
            if winner_row == NULL:
                for j in range(width):
                    value = <floating>element_value(source, j)
                    acc[j] = value if value > acc[j] else acc[j]
            else:
                for j in range(width):
                    value = <floating>element_value(source, j)
                    if value > acc[j]:
                        acc[j] = value
                        winner[j] = row
        for j in range(width):
            out_row[j] = acc[j]
            if winner_row != NULL:
                winner_row[j] = winner[j]


cdef inline void reduce_block(reduction_t *reduction, const table_t *table,
                              Py_ssize_t num_rows, Py_ssize_t dim, const index_t *indices,
                              Py_ssize_t n, const int64_t *bounds, Py_ssize_t first_bag,
                              Py_ssize_t end_bag, const floating *sample_weights,
                              int64_t padding_idx, Py_ssize_t column, columns_t *columns,
                              Py_ssize_t any_width, floating *out, int64_t *winners,
                              Py_ssize_t out_stride, Py_ssize_t distance,
                              bint lines_aligned) noexcept nogil:
    """One block of columns of bags [first_bag, end_bag): sum_block or max_block."""
    if reduction_t is MaxReduction:
        max_block(table, num_rows, dim, indices, n, bounds, first_bag, end_bag, padding_idx,
                  column, columns, any_width, out, winners, out_stride, distance,
                  lines_aligned)
    else:
        sum_block(reduction, table, num_rows, dim, indices, n, bounds, first_bag, end_bag,
                  sample_weights, padding_idx, column, columns, any_width, out, out_stride,
                  distance, lines_aligned)


cdef inline Py_ssize_t reduce_block_if_it_fits(
        reduction_t *reduction, const table_t *table, Py_ssize_t num_rows, Py_ssize_t dim,
        const index_t *indices, Py_ssize_t n, const int64_t *bounds, Py_ssize_t first_bag,
        Py_ssize_t end_bag, const floating *sample_weights, int64_t padding_idx,
        Py_ssize_t column, columns_t *columns, floating *out, int64_t *winners,
        Py_ssize_t out_stride, Py_ssize_t distance, bint lines_aligned) noexcept nogil:
    """reduce_block on a block of this (compile-time) width at ``column``, if the row has that
    many columns left; returns the column after the block (``column`` when it did not fit)."""
    cdef Py_ssize_t width = sizeof(columns_t) // sizeof(floating)
    if dim - column < width:
        return column
    reduce_block(reduction, table, num_rows, dim, indices, n, bounds, first_bag, end_bag,
                 sample_weights, padding_idx, column, columns, 0, out, winners, out_stride,
                 distance, lines_aligned)
    return column + width


cdef inline void reduce_columns(reduction_t *reduction, const table_t *table,
                                Py_ssize_t num_rows, Py_ssize_t dim, const index_t *indices,
                                Py_ssize_t n, const int64_t *bounds, Py_ssize_t first_bag,
                                Py_ssize_t end_bag, const floating *sample_weights,
                                int64_t padding_idx, floating *out, int64_t *winners,
                                Py_ssize_t out_stride, Py_ssize_t distance,
                                bint lines_aligned) noexcept nogil:
    """Bags [first_bag, end_bag), block by block over the columns: wide blocks, then at most
    one narrow block of each width, all of compile-time width, then the rest."""
    cdef Py_ssize_t column = 0, wide = BLOCK_BYTES // sizeof(floating)
    while dim - column >= wide:
        column = reduce_block_if_it_fits(reduction, table, num_rows, dim, indices, n, bounds,
                                         first_bag, end_bag, sample_weights, padding_idx,
                                         column, <WideColumns *>NULL, out, winners,
                                         out_stride, distance, lines_aligned)
    column = reduce_block_if_it_fits(reduction, table, num_rows, dim, indices, n, bounds,
                                     first_bag, end_bag, sample_weights, padding_idx, column,
                                     <Columns512 *>NULL, out, winners, out_stride,
                                     distance, lines_aligned)
    column = reduce_block_if_it_fits(reduction, table, num_rows, dim, indices, n, bounds,
                                     first_bag, end_bag, sample_weights, padding_idx, column,
                                     <Columns256 *>NULL, out, winners, out_stride,
                                     distance, lines_aligned)
    column = reduce_block_if_it_fits(reduction, table, num_rows, dim, indices, n, bounds,
                                     first_bag, end_bag, sample_weights, padding_idx, column,
                                     <Columns128 *>NULL, out, winners, out_stride,
                                     distance, lines_aligned)
    column = reduce_block_if_it_fits(reduction, table, num_rows, dim, indices, n, bounds,
                                     first_bag, end_bag, sample_weights, padding_idx, column,
                                     <Columns64 *>NULL, out, winners, out_stride,
                                     distance, lines_aligned)
    column = reduce_block_if_it_fits(reduction, table, num_rows, dim, indices, n, bounds,
                                     first_bag, end_bag, sample_weights, padding_idx, column,
                                     <Columns32 *>NULL, out, winners, out_stride,
                                     distance, lines_aligned)
    if column < dim:
        reduce_block(reduction, table, num_rows, dim, indices, n, bounds, first_bag, end_bag,
                     sample_weights, padding_idx, column, <AnyColumns *>NULL, dim - column, out,
                     winners, out_stride, distance, lines_aligned)


cdef inline bint is_one_block(Py_ssize_t row_bytes) noexcept nogil:
    """True when reduce_columns reduces a row of this many bytes in a single block."""
    return (row_bytes == BLOCK_BYTES or row_bytes == 512 or row_bytes == 256 or row_bytes == 128
            or row_bytes == 64 or row_bytes <= 32)


cdef inline void reduce_bags(reduction_t *reduction, const table_t *table,
                             Py_ssize_t num_rows, Py_ssize_t dim, const index_t *indices,
                             Py_ssize_t n, const int64_t *bounds, Py_ssize_t first_bag,
                             Py_ssize_t end_bag, const floating *sample_weights,
                             int64_t padding_idx, floating *out, int64_t *winners,
                             Py_ssize_t out_stride, Py_ssize_t distance,
                             bint lines_aligned) noexcept nogil:
    """The sums (weighted for a WeightedSumReduction) or maxima of bags [first_bag, end_bag),
    into rows of out (and winners) ``out_stride`` elements apart.
    A row of one block of columns is reduced for all these bags in one call, the bag loop
    inside the block's loop function (a call per bag cost about 5% of a bag sum of 32 rows);
    a row of several blocks bag by bag, so that its blocks read their lines of a row close
    together."""
    cdef Py_ssize_t b
    if is_one_block(dim * sizeof(floating)):
        reduce_columns(reduction, table, num_rows, dim, indices, n, bounds, first_bag, end_bag,
                       sample_weights, padding_idx, out, winners, out_stride, distance,
                       lines_aligned)
    else:
        for b in range(first_bag, end_bag):
            reduce_columns(reduction, table, num_rows, dim, indices, n, bounds, b, b + 1,
                           sample_weights, padding_idx, out, winners, out_stride, distance,
                           lines_aligned)


cdef inline bint sums_in(stored_t *table_type, floating *sum_type) noexcept nogil:
    """Whether a table of this type is reduced in this one: float64 in float64, the others in
    float32 (the NULL arguments only select the types)."""
    if stored_t is double and floating is double:
        return True
    elif stored_t is not double and floating is float:
        return True
    else:
        return False


cdef inline Py_ssize_t reduce_bag_chunk(const table_t *table, Py_ssize_t num_rows,
                                        Py_ssize_t dim, const index_t *indices,
                                        Py_ssize_t num_indices, const int64_t *bounds,
                                        Py_ssize_t first, Py_ssize_t last, BagMode mode,
                                        const floating *sample_weights, int64_t padding_idx,
                                        floating *out, int64_t *winners, Py_ssize_t out_stride,
                                        Py_ssize_t distance,
                                        bint lines_aligned) noexcept nogil:
    """Bags [first, last) of one table (see reduce_chunks), into rows of out (and winners)
    ``out_stride`` elements apart; returns how many of their indices lie outside [0, V),
    counted right after reducing them, while they are still in the core's cache."""
    # With no indices or an empty table every bag is empty (n = 0 clamps every bag to [0, 0]);
    # the kernels then read neither.
    cdef Py_ssize_t n = num_indices if table != NULL else 0
    if mode == BAG_MAX:
        reduce_bags(<MaxReduction *>NULL, table, num_rows, dim, indices, n, bounds, first,
                    last, <const floating *>NULL, padding_idx, out, winners, out_stride,
                    distance, lines_aligned)
    elif sample_weights == NULL:
        reduce_bags(<SumReduction *>NULL, table, num_rows, dim, indices, n, bounds, first,
                    last, sample_weights, padding_idx, out, NULL, out_stride, distance,
                    lines_aligned)
    else:
        reduce_bags(<WeightedSumReduction *>NULL, table, num_rows, dim, indices, n, bounds,
                    first, last, sample_weights, padding_idx, out, NULL, out_stride, distance,
                    lines_aligned)
    if mode == BAG_MEAN:
        divide_by_bag_sizes(num_rows, dim, indices, n, bounds, first, last, sample_weights,
                            padding_idx, out, out_stride)
    return count_bags_out_of_range(indices, num_indices, bounds, first, last, num_rows)


cdef Py_ssize_t reduce_chunks(const table_t *table, Py_ssize_t num_rows, Py_ssize_t dim,
                              const index_t *indices, Py_ssize_t num_indices,
                              const int64_t *bounds, Py_ssize_t num_bags, BagMode mode,
                              const floating *sample_weights, int64_t padding_idx,
                              floating *out, int64_t *winners, int num_threads) noexcept nogil:
    """bag_reduce's work on checked arguments (table NULL when it has no rows, sample_weights
    and winners NULL when absent): the bags in chunks of BAGS_PER_CHUNK, each chunk counting
    its indices outside [0, V) right after reducing them; returns the count."""
    cdef Py_ssize_t num_chunks = (num_bags + BAGS_PER_CHUNK - 1) // BAGS_PER_CHUNK
    cdef Py_ssize_t chunk, first, out_of_range = 0
    cdef Py_ssize_t distance = prefetch_distance(num_rows, dim, sizeof(table_t),
                                                 BAG_PREFETCH_MIN_TABLE_BYTES)
    # (then every block of columns starts a multiple of 64 bytes into its row too)
    cdef bint lines_aligned = rows_on_lines(table, dim * sizeof(table_t))
    # Chunks go to whichever thread is free: on a shared machine one core can run slower than
    # the other for a while, and a static split then waits for it.
    for chunk in prange(num_chunks, schedule="dynamic", num_threads=team_size(num_threads)):
        first = chunk * BAGS_PER_CHUNK
        out_of_range += reduce_bag_chunk(  # (an OpenMP reduction)
            table, num_rows, dim, indices, num_indices, bounds, first,
            min(first + BAGS_PER_CHUNK, num_bags), mode, sample_weights, padding_idx, out,
            winners, dim, distance, lines_aligned)
    if num_indices:  # indices before the first bag or after the last (none, with offsets
        # that start at 0 and a last bag that runs to the end)
        out_of_range += count_out_of_range(indices, 0, clamp(bounds[0], 0, num_indices),
                                           num_rows)
        out_of_range += count_out_of_range(
            indices, clamp(bounds[num_bags], 0, num_indices), num_indices, num_rows)
    return out_of_range


def bag_reduce(const stored_t[:, ::1] weight, const index_t[::1] indices,
               const int64_t[::1] bounds, BagMode mode, sample_weights, int64_t padding_idx,
               floating[:, ::1] out, int64_t[:, ::1] winners, int num_threads,
               HalfFormat half_format=BFLOAT16):
    """Reduce each bag ``indices[bounds[b]:bounds[b+1]]`` of table rows into ``out[b]``.

    ``weight`` is a float32 or float64 table (``out`` and ``sample_weights`` in its dtype), or
    the bits (uint16) of a ``half_format`` table (BFLOAT16 or FLOAT16), reduced in float32 (``out``
    and ``sample_weights`` float32). ``mode`` is a BagMode (sum, mean or max);
    ``sample_weights`` (same length as indices, or None) weights sum and mean; ``padding_idx``
    (-1 for none) marks entries to skip; ``winners`` (shape of out, int64) receives the
    winning rows in max mode and may be None otherwise.

    Returns how many indices of the bags were outside ``[0, V)`` (they were skipped, like
    padding): each chunk of bags counts its indices right after reducing them, while they are
    still in the core's cache, so the caller, whose output this is, needs no validation pass
    before the call and raises only when the count is not 0. Indices in no bag count too.
    """
    check_enum(mode, BAG_MAX, "bag mode")
    check_enum(half_format, FLOAT16, "half format")
    cdef Py_ssize_t n = indices.shape[0], num_rows = weight.shape[0], dim = weight.shape[1]
    cdef Py_ssize_t num_bags = bounds.shape[0] - 1, out_of_range = 0
    cdef const void *table
    cdef const floating[::1] weights_view  # (typed from out: a None argument names no type)
    cdef const floating *weights_data = NULL
    cdef int64_t *winner_data = NULL
    if not sums_in(<stored_t *>NULL, <floating *>NULL):
        raise ValueError("bag_reduce: out must be float64 for a float64 table, float32 otherwise")
    if num_bags < 0 or out.shape[0] != num_bags or out.shape[1] != dim:
        raise ValueError("bag_reduce: out must have shape (len(bounds) - 1, weight.shape[1])")
    if sample_weights is not None:
        weights_view = sample_weights
        if weights_view.shape[0] != n:
            raise ValueError("bag_reduce: sample_weights must have one entry per index")
        if n > 0:
            weights_data = &weights_view[0]
    if winners is not None:
        if mode != BAG_MAX or winners.shape[0] != num_bags or winners.shape[1] != dim:
            raise ValueError("bag_reduce: winners (max mode only) must have the shape of out")
        if num_bags and dim:
            winner_data = &winners[0, 0]
    if num_bags == 0 or dim == 0:  # nothing to reduce, but the indices are still checked
        return count_out_of_range(&indices[0], 0, n, num_rows) if n else 0
    table = &weight[0, 0] if num_rows > 0 else NULL
    with nogil:
        if stored_t is uint16_t and floating is float:
            if half_format == BFLOAT16:
                out_of_range = reduce_chunks(<const bfloat16_t *>table, num_rows, dim,
                                             &indices[0] if n else NULL, n, &bounds[0],
                                             num_bags, mode, weights_data, padding_idx,
                                             &out[0, 0], winner_data, num_threads)
            else:
                out_of_range = reduce_chunks(<const float16_t *>table, num_rows, dim,
                                             &indices[0] if n else NULL, n, &bounds[0],
                                             num_bags, mode, weights_data, padding_idx,
                                             &out[0, 0], winner_data, num_threads)
        elif stored_t is floating:
            out_of_range = reduce_chunks(<const floating *>table, num_rows, dim,
                                         &indices[0] if n else NULL, n, &bounds[0], num_bags,
                                         mode, weights_data, padding_idx, &out[0, 0],
                                         winner_data, num_threads)
    return out_of_range


# --------------------------------------------------------------------------------------------
# embedding_bag's common case in one call: plain arrays, no max_norm. Each Python-level step
# of the general path is cheap, but after a bag reduction has streamed the table through the
# caches every one of them misses, and together they cost a large batch several percent.
# --------------------------------------------------------------------------------------------

cdef int requested_threads = 0  # what fastemb.set_num_threads asked for; 0: OpenMP's default
cdef Py_ssize_t parallel_grain = PARALLEL_GRAIN  # (tests lower it to run small calls threaded)


def set_requested_threads(int num_threads):
    """Record fastemb.set_num_threads's count (0 restores OpenMP's default)."""
    global requested_threads
    requested_threads = num_threads if num_threads > 0 else 0


def set_parallel_grain(Py_ssize_t elements):
    """Make calls with at least ``elements`` of work run threaded (see threads_for); returns
    the previous grain. Tests set 0, so that their small calls run on every thread."""
    global parallel_grain
    previous, parallel_grain = parallel_grain, elements
    return previous


cpdef int get_num_threads() noexcept:
    """The number of threads a kernel call with enough work uses (see fastemb.get_num_threads)."""
    if not FASTEMB_HAVE_OPENMP:
        return 1
    return requested_threads if requested_threads > 0 else omp_get_max_threads()


cpdef int threads_for(Py_ssize_t work) noexcept:
    """Threads for a kernel call that touches about ``work`` table elements: one below the
    parallel grain (PARALLEL_GRAIN), where the fork/join costs more than it saves."""
    return get_num_threads() if work >= parallel_grain else 1


cdef Py_ssize_t reduce_table(const void *table, int table_type, Py_ssize_t num_rows,
                             Py_ssize_t dim, const index_t *indices, Py_ssize_t n,
                             const int64_t *bounds, Py_ssize_t num_bags, BagMode mode,
                             const void *sample_weights, int64_t padding_idx, void *out,
                             int num_threads) noexcept nogil:
    """reduce_chunks on a table of NumPy type ``table_type`` (float32, float64, float16 or
    bfloat16; out and sample_weights float64 for float64, float32 otherwise), without
    winners."""
    if table_type == cnp.NPY_FLOAT64:
        return reduce_chunks(<const double *>table, num_rows, dim, indices, n, bounds, num_bags,
                             mode, <const double *>sample_weights, padding_idx, <double *>out,
                             NULL, num_threads)
    if table_type == cnp.NPY_FLOAT16:
        return reduce_chunks(<const float16_t *>table, num_rows, dim, indices, n, bounds,
                             num_bags, mode, <const float *>sample_weights, padding_idx,
                             <float *>out, NULL, num_threads)
    if table_type == bfloat16_type:
        return reduce_chunks(<const bfloat16_t *>table, num_rows, dim, indices, n, bounds,
                             num_bags, mode, <const float *>sample_weights, padding_idx,
                             <float *>out, NULL, num_threads)
    return reduce_chunks(<const float *>table, num_rows, dim, indices, n, bounds, num_bags, mode,
                         <const float *>sample_weights, padding_idx, <float *>out, NULL,
                         num_threads)


def bag_forward_common(input, weight, offsets, mode, per_sample_weights,
                       bint include_last_offset, padding_idx):
    """``fastemb.embedding_bag`` without max_norm, in one call, for its common case: a plain
    (C-contiguous, aligned, native) float32, float64, float16 or bfloat16 table, and the
    arguments parse_bag_call takes (per-sample weights in the dtype the bags are computed in).
    Returns the bags, bit for bit those of the general path, or None when the call is not
    that case or its arguments are not valid (an index out of range, bad offsets): the caller
    then takes the general path, which converts or explains. It writes nothing but the fresh
    output it returns."""
    cdef int table_type, sum_type, num_threads
    cdef Py_ssize_t num_rows, dim, out_of_range
    cdef const void *table
    cdef void *out_data
    cdef BagCall call
    if not is_plain_array(weight) or cnp.PyArray_NDIM(<cnp.ndarray>weight) != 2:
        return None
    table_type = cnp.PyArray_TYPE(<cnp.ndarray>weight)
    if (table_type != cnp.NPY_FLOAT32 and table_type != cnp.NPY_FLOAT64
            and table_type != cnp.NPY_FLOAT16 and not is_bfloat16(table_type)):
        return None
    sum_type = cnp.NPY_FLOAT64 if table_type == cnp.NPY_FLOAT64 else cnp.NPY_FLOAT32
    num_rows = cnp.PyArray_DIM(<cnp.ndarray>weight, 0)
    dim = cnp.PyArray_DIM(<cnp.ndarray>weight, 1)
    if dim == 0 or not parse_bag_call(input, offsets, mode, per_sample_weights,
                                      include_last_offset, padding_idx, num_rows, sum_type,
                                      &call):
        return None
    try:
        out = new_bag_output(call.num_bags, dim, sum_type)
        table = cnp.PyArray_DATA(<cnp.ndarray>weight) if num_rows else NULL
        out_data = cnp.PyArray_DATA(<cnp.ndarray>out)
        num_threads = threads_for(call.num_indices * dim)
        with nogil:
            if call.index_type == cnp.NPY_INT64:
                out_of_range = reduce_table(table, table_type, num_rows, dim,
                                            <const int64_t *>call.indices, call.num_indices,
                                            call.bounds, call.num_bags, call.mode,
                                            call.weights, call.padding_idx, out_data,
                                            num_threads)
            else:
                out_of_range = reduce_table(table, table_type, num_rows, dim,
                                            <const int32_t *>call.indices, call.num_indices,
                                            call.bounds, call.num_bags, call.mode,
                                            call.weights, call.padding_idx, out_data,
                                            num_threads)
    finally:
        free_bag_call(&call)
    return out if out_of_range == 0 else None


# --------------------------------------------------------------------------------------------
# A collection's bags in one call (fastemb.EmbeddingBagCollection): for every feature f of
# table t and every bag b of the batch,
#   out[b, column_f : column_f + D_t] = reduce(mode_f) of table_t's rows values[k],
#                                       k in [bounds[first_f + b], bounds[first_f + b + 1])
# one chunk of BAGS_PER_CHUNK bags of one feature per prange iteration: each output element
# is written by exactly one iteration, with the same loops as bag_reduce, so each feature's
# columns equal its own bag_reduce call bit for bit.
# --------------------------------------------------------------------------------------------

cdef struct FeatureBags:
    # one feature of a collection call, checked: its table and where its bags lie
    const void *table  # NULL for a table without rows
    int table_type  # NumPy type number (float32, float64, float16 or bfloat16)
    Py_ssize_t num_rows
    Py_ssize_t dim
    Py_ssize_t distance
    bint lines_aligned
    const int64_t *bounds  # the feature's B + 1 bag bounds, into the call's values
    BagMode mode
    int64_t padding_idx
    Py_ssize_t column


cdef Py_ssize_t reduce_feature_chunk(const FeatureBags *feature, const index_t *values,
                                     Py_ssize_t num_values, Py_ssize_t first, Py_ssize_t last,
                                     const floating *sample_weights, floating *out,
                                     int64_t *winners, Py_ssize_t out_stride) noexcept nogil:
    """reduce_bag_chunk for bags [first, last) of one feature, on its table's type (float64
    tables with float64 sums, the others with float32 ones: check_collection_tables made
    sure)."""
    cdef floating *out_block = out + feature.column
    cdef int64_t *winner_block = winners + feature.column if winners != NULL else NULL
    if floating is double:
        return reduce_bag_chunk(<const double *>feature.table, feature.num_rows, feature.dim,
                                values, num_values, feature.bounds, first, last, feature.mode,
                                sample_weights, feature.padding_idx, out_block, winner_block,
                                out_stride, feature.distance, feature.lines_aligned)
    elif feature.table_type == cnp.NPY_FLOAT32:
        return reduce_bag_chunk(<const float *>feature.table, feature.num_rows, feature.dim,
                                values, num_values, feature.bounds, first, last, feature.mode,
                                sample_weights, feature.padding_idx, out_block, winner_block,
                                out_stride, feature.distance, feature.lines_aligned)
    elif feature.table_type == cnp.NPY_FLOAT16:
        return reduce_bag_chunk(<const float16_t *>feature.table, feature.num_rows, feature.dim,
                                values, num_values, feature.bounds, first, last, feature.mode,
                                sample_weights, feature.padding_idx, out_block, winner_block,
                                out_stride, feature.distance, feature.lines_aligned)
    else:
        return reduce_bag_chunk(<const bfloat16_t *>feature.table, feature.num_rows,
                                feature.dim, values, num_values, feature.bounds, first, last,
                                feature.mode, sample_weights, feature.padding_idx, out_block,
                                winner_block, out_stride, feature.distance,
                                feature.lines_aligned)


cdef int describe_feature(FeatureBags *feature, object table, bint float64_sums,
                          Py_ssize_t num_bounds, int64_t first_bag, Py_ssize_t num_bags,
                          int64_t mode, int64_t padding_idx, int64_t column,
                          Py_ssize_t out_columns) except -1:
    """Check one feature of collection_bag_reduce and fill ``feature``; ValueError if it does
    not fit the call."""
    cdef int table_type
    cdef Py_ssize_t item_size
    if not is_plain_array(table) or cnp.PyArray_NDIM(<cnp.ndarray>table) != 2:
        raise ValueError("collection_bag_reduce: every table must be a C-contiguous, aligned "
                         "2-D array")
    table_type = cnp.PyArray_TYPE(<cnp.ndarray>table)
    if float64_sums != (table_type == cnp.NPY_FLOAT64) or not (
            table_type == cnp.NPY_FLOAT64 or table_type == cnp.NPY_FLOAT32
            or table_type == cnp.NPY_FLOAT16 or is_bfloat16(table_type)):
        raise ValueError("collection_bag_reduce: out must be float64 for float64 tables and "
                         "float32 for float32, float16 and bfloat16 ones")
    feature.table_type = table_type
    feature.num_rows = cnp.PyArray_DIM(<cnp.ndarray>table, 0)
    feature.dim = cnp.PyArray_DIM(<cnp.ndarray>table, 1)
    feature.table = cnp.PyArray_DATA(<cnp.ndarray>table) if feature.num_rows else NULL
    # (written so that no sum can overflow, whatever first_bag and column are)
    if first_bag < 0 or first_bag >= num_bounds - num_bags:
        raise ValueError("collection_bag_reduce: a feature's bags lie outside bounds")
    if column < 0 or column > out_columns - feature.dim:
        raise ValueError("collection_bag_reduce: a feature's columns lie outside out")
    check_enum(mode, BAG_MAX, "bag mode")
    item_size = cnp.PyArray_ITEMSIZE(<cnp.ndarray>table)
    feature.distance = prefetch_distance(feature.num_rows, feature.dim, item_size,
                                         BAG_PREFETCH_MIN_TABLE_BYTES)
    feature.lines_aligned = rows_on_lines(feature.table, feature.dim * item_size)
    feature.mode = <BagMode>mode
    feature.padding_idx = padding_idx
    feature.column = column
    return 0


def collection_bag_reduce(list tables, const index_t[::1] values, const int64_t[::1] bounds,
                          const int64_t[::1] feature_tables, const int64_t[::1] first_bags,
                          const int64_t[::1] modes, const int64_t[::1] padding,
                          const int64_t[::1] columns, sample_weights, floating[:, ::1] out,
                          int64_t[:, ::1] winners, int num_threads):
    """Reduce the bags of every feature of a collection into its columns of ``out`` (B, C).

    Feature f reads ``tables[feature_tables[f]]``; its bag b is
    ``values[bounds[first_bags[f] + b]:bounds[first_bags[f] + b + 1]]``, reduced by
    ``modes[f]`` (a BagMode), skipping ``padding[f]`` (-1: none) and weighted by
    ``sample_weights`` (one per value, or None), into ``out[b, columns[f]:columns[f] + D]``;
    ``winners`` (out's shape, or None) gets the max features' winning rows. Tables are
    float64 (out float64) or float32, float16 and bfloat16 (out float32), C-contiguous.
    Features must not share columns (each output element has one owner). Returns how many
    values of the bags lie outside their table's rows (skipped, like padding; the caller, whose
    fresh output this is, raises when it is not 0).
    """
    cdef Py_ssize_t num_features = feature_tables.shape[0], num_bags = out.shape[0]
    cdef Py_ssize_t num_values = values.shape[0], out_stride = out.shape[1]
    cdef Py_ssize_t chunks_per_feature = (num_bags + BAGS_PER_CHUNK - 1) // BAGS_PER_CHUNK
    cdef Py_ssize_t item, f, first, out_of_range = 0
    cdef const floating[::1] weights_view  # (typed from out: a None argument names no type)
    cdef const floating *weights_data = NULL
    cdef int64_t *winner_data = NULL
    cdef FeatureBags *features
    cdef FeatureBags *feature
    if (first_bags.shape[0] != num_features or modes.shape[0] != num_features
            or padding.shape[0] != num_features or columns.shape[0] != num_features):
        raise ValueError("collection_bag_reduce: feature_tables, first_bags, modes, padding "
                         "and columns need one entry per feature")
    if sample_weights is not None:
        weights_view = sample_weights
        if weights_view.shape[0] != num_values:
            raise ValueError("collection_bag_reduce: sample_weights needs one entry per value")
        weights_data = &weights_view[0] if num_values else NULL
    if winners is not None:
        if winners.shape[0] != num_bags or winners.shape[1] != out_stride:
            raise ValueError("collection_bag_reduce: winners must have the shape of out")
        winner_data = &winners[0, 0] if winners.size else NULL
    if num_features == 0 or num_bags == 0:
        return 0
    features = <FeatureBags *>malloc(num_features * sizeof(FeatureBags))
    if features == NULL:
        raise MemoryError()
    try:
        for f in range(num_features):
            if not 0 <= feature_tables[f] < len(tables):
                raise ValueError("collection_bag_reduce: a feature names no table")
            describe_feature(&features[f], tables[feature_tables[f]], floating is double,
                             bounds.shape[0], first_bags[f], num_bags, modes[f], padding[f],
                             columns[f], out_stride)
            features[f].bounds = &bounds[first_bags[f]]
        with nogil:
            for item in prange(num_features * chunks_per_feature, schedule="dynamic",
                               num_threads=team_size(num_threads)):
                # feature by feature: a feature's rows `distance` positions ahead, which its
                # bags prefetch, are those of its next bags
                feature = &features[item // chunks_per_feature]
                first = (item % chunks_per_feature) * BAGS_PER_CHUNK
                out_of_range += reduce_feature_chunk(  # (an OpenMP reduction)
                    feature, &values[0] if num_values else NULL, num_values, first,
                    min(first + BAGS_PER_CHUNK, num_bags), weights_data, &out[0, 0],
                    winner_data, out_stride)
    finally:
        free(features)
    return out_of_range


# A collection's unpooled lookups in one call (fastemb.EmbeddingCollection): feature f of
# table t copies the rows values[k], k in [starts[f], ends[f]), to its own block of out:
#   out[out_offsets[f] + (k - starts[f]) * row_bytes_t : ... + row_bytes_t] = table_t[values[k]]
# (bytes: each block is a (n_f, D_t) array of its table's dtype), one chunk of
# GATHER_ROWS_PER_CHUNK rows of one feature per prange iteration. A value outside its table
# gets a row of zeros and is counted.

cdef struct GatheredFeature:
    # one feature of a collection_gather call, checked
    const char *table
    Py_ssize_t num_rows
    Py_ssize_t row_bytes
    Py_ssize_t start  # its values: [start, end)
    Py_ssize_t end
    Py_ssize_t out_offset  # its block's first byte in out
    Py_ssize_t first_chunk  # its first prange iteration


cdef int describe_gathered_feature(GatheredFeature *feature, object table, int64_t start,
                                   int64_t end, int64_t out_offset, Py_ssize_t num_values,
                                   Py_ssize_t out_bytes) except -1:
    """Check one feature of collection_gather (its table: a C-contiguous, aligned 2-D array of
    float32, float64, float16 or bfloat16) and fill ``feature``."""
    cdef int table_type
    if not is_plain_array(table) or cnp.PyArray_NDIM(<cnp.ndarray>table) != 2:
        raise ValueError("collection_gather: every table must be a C-contiguous, aligned 2-D "
                         "array")
    table_type = cnp.PyArray_TYPE(<cnp.ndarray>table)
    if not (table_type == cnp.NPY_FLOAT64 or table_type == cnp.NPY_FLOAT32
            or table_type == cnp.NPY_FLOAT16 or is_bfloat16(table_type)):
        raise ValueError("collection_gather: tables must be float32, float64, float16 or "
                         "bfloat16")
    feature.table = <const char *>cnp.PyArray_DATA(<cnp.ndarray>table)
    feature.num_rows = cnp.PyArray_DIM(<cnp.ndarray>table, 0)
    feature.row_bytes = (cnp.PyArray_DIM(<cnp.ndarray>table, 1)
                         * cnp.PyArray_ITEMSIZE(<cnp.ndarray>table))
    if not 0 <= start <= end <= num_values:
        raise ValueError("collection_gather: a feature's values must lie within values")
    if out_offset < 0 or out_offset > out_bytes or (  # (a check no product can overflow)
            feature.row_bytes and end - start > (out_bytes - out_offset) // feature.row_bytes):
        raise ValueError("collection_gather: a feature's block lies outside out")
    feature.start = start
    feature.end = end
    feature.out_offset = out_offset
    return 0


def collection_gather(list tables, const index_t[::1] values, const int64_t[::1] feature_tables,
                      const int64_t[::1] starts, const int64_t[::1] ends, char[::1] out,
                      const int64_t[::1] out_offsets, int num_threads):
    """Copy every feature's rows into its block of ``out`` (see above); returns how many values
    lie outside their table (their rows are zeros; the caller, whose fresh output this is,
    raises when it is not 0). Each feature's values [starts[f], ends[f]) must lie within
    values, and its block inside ``out``."""
    cdef Py_ssize_t num_features = feature_tables.shape[0], num_chunks = 0
    cdef Py_ssize_t f, item, k, first, out_of_range = 0
    cdef int64_t row
    cdef GatheredFeature *features
    cdef GatheredFeature *feature
    cdef char *target
    if (starts.shape[0] != num_features or ends.shape[0] != num_features
            or out_offsets.shape[0] != num_features):
        raise ValueError("collection_gather: starts, ends and out_offsets need one entry per "
                         "feature")
    features = <GatheredFeature *>malloc(max(num_features, 1) * sizeof(GatheredFeature))
    if features == NULL:
        raise MemoryError()
    try:
        for f in range(num_features):
            if not 0 <= feature_tables[f] < len(tables):
                raise ValueError("collection_gather: a feature names no table")
            describe_gathered_feature(&features[f], tables[feature_tables[f]], starts[f],
                                      ends[f], out_offsets[f], values.shape[0],
                                      out.shape[0])
            features[f].first_chunk = num_chunks
            num_chunks += (features[f].end - features[f].start + GATHER_ROWS_PER_CHUNK - 1
                           ) // GATHER_ROWS_PER_CHUNK
        with nogil:
            for item in prange(num_chunks, schedule="dynamic", num_threads=team_size(num_threads)):
                f = 0  # (the feature whose chunks hold this one: features are few)
                while f + 1 < num_features and features[f + 1].first_chunk <= item:
                    f = f + 1
                feature = &features[f]
                first = feature.start + (item - feature.first_chunk) * GATHER_ROWS_PER_CHUNK
                for k in range(first, min(first + GATHER_ROWS_PER_CHUNK, feature.end)):
                    row = values[k]
                    target = &out[0] + feature.out_offset + (k - feature.start) * feature.row_bytes
                    if 0 <= row < feature.num_rows:
                        memcpy(target, feature.table + row * feature.row_bytes, feature.row_bytes)
                    else:
                        memset(target, 0, feature.row_bytes)
                        out_of_range += 1
    finally:
        free(features)
    return out_of_range


# --------------------------------------------------------------------------------------------
# max_norm renorm, in place, of the distinct looked-up rows:
#   norm = ||W[r]||_p ; if norm > max_norm: W[r] *= dtype(max_norm / (norm + 1e-7))
# The norm is computed in double. p = inf is max|x|, -inf is min|x|, 0 counts non-zeros.
# --------------------------------------------------------------------------------------------

cdef double row_norm(const floating *row, Py_ssize_t dim, double p) noexcept nogil:
    cdef Py_ssize_t j
    cdef double magnitude, total = 0
    if dim == 0:
        return 0
    if isinf(p):
        total = INFINITY if p < 0 else 0
        for j in range(dim):
            magnitude = fabs(row[j])
            if magnitude != magnitude:
                return NAN
            if (p > 0 and magnitude > total) or (p < 0 and magnitude < total):
                total = magnitude
        return total
    for j in range(dim):
        magnitude = fabs(row[j])
        if p == 2:
            total += magnitude * magnitude
        elif p == 1:
            total += magnitude
        elif p == 0:
            total += magnitude != 0
        else:
            total += pow(magnitude, p)
    if p == 2:
        return sqrt(total)
    if p == 1 or p == 0:
        return total
    return pow(total, 1.0 / p)


def renorm_rows(floating[:, ::1] weight, const int64_t[::1] rows, double max_norm,
                double norm_type, int num_threads):
    """Scale each listed row whose ``norm_type``-norm exceeds ``max_norm`` down to it, in place.

    ``rows`` must be distinct (one iteration per row owns it); rows out of range are skipped.
    """
    cdef Py_ssize_t num_rows = weight.shape[0], dim = weight.shape[1], k, j
    cdef int64_t row
    cdef double norm
    cdef floating scale
    cdef floating *data
    if dim == 0 or num_rows == 0:
        return
    with nogil:
        for k in prange(rows.shape[0], schedule="static", num_threads=team_size(num_threads)):
            row = rows[k]
            if row < 0 or row >= num_rows:
                continue
            data = &weight[row, 0]
            norm = row_norm(data, dim, norm_type)
            if norm > max_norm:
                scale = <floating>(max_norm / (norm + 1e-7))
                for j in range(dim):
                    data[j] = data[j] * scale
