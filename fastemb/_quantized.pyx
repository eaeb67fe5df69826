# cython: language_level=3
"""fastemb._quantized: the kernels of row-wise quantized tables (``fastemb.QuantizedTable``):
quantization in torch's prepacked byte layout, and the lookups that dequantize the rows they
read. The rules every kernel follows are in ``fastemb/_core.pyx``.

A quantized table is uint8, one row of ``row_bytes`` bytes per table row (torch's
``embedding_bag_byte_prepack`` / ``embedding_bag_4bit_prepack`` layout, FBGEMM's "fused
row-wise" format); element j of a row is ``value[j] = fma(scale, q[j], bias)``, scale * q[j] +
bias rounded once (as FBGEMM computes it):

- 8 bits: ``D`` bytes q, then float32 scale, float32 bias (row_bytes = D + 8);
- 4 bits: ``D / 2`` bytes, q[j] the low nibble of byte j // 2 for an even j and the high
  nibble for an odd j, then float16 scale, float16 bias (row_bytes = D / 2 + 4; D is even).

Scales and biases are read from unaligned positions with memcpy (a row of 8 bits is D + 8
bytes long, so most rows start off any alignment).
"""

from cython.parallel cimport prange
from libc.float cimport FLT_MAX
from libc.math cimport isinf, lrintf
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t
from libc.string cimport memcpy, memset

cimport numpy as cnp
from fastemb._common cimport (BAG_MAX, BAG_MEAN, BAG_SUM, BagMode, bag_extent, check_enum,
                              clamp, count_out_of_range, divide_by_bag_sizes, float16_nearest,
                              float16_t, float16_value, index_t, is_kept, prefetch_distance,
                              team_size)

import importlib

include "_bag_call.pxi"

cnp.import_array()

__all__ = ["gather_quantized", "quantize_rows", "quantized_bag_forward_common",
           "quantized_bag_reduce", "quantized_row_bytes"]

cdef extern from "_quantized.h":
    # (bits, take_max, acc, row, code_bytes, dim): acc[j] = value[j], or with take_max
    # acc[j] = max(acc[j], value[j]) (the new value only if greater)
    void dequantize_row "fastemb_dequantize_row"(int, bint, float *, const uint8_t *,
                                                 Py_ssize_t, Py_ssize_t) noexcept nogil
    # (table, num_rows, row_bytes, row): prefetch every cache line of a row (row 0 for a row
    # outside [0, num_rows)), without branches on the data
    void prefetch_lines_of_row "fastemb_prefetch_quantized_row"(const uint8_t *, Py_ssize_t,
                                                                Py_ssize_t, int64_t) noexcept nogil
    # (bits, out, table, num_rows, row_bytes, code_bytes, dim, indices, start, end, n, weights,
    # padding_idx, distance): out[:dim] = the sum over the kept entries k of [start, end) of
    # (weights[k] *) value[j] of row indices[k], left to right from +0 (weights NULL:
    # unweighted), prefetching the row `distance` positions ahead (0: none)
    void bag_sum_int32 "fastemb_quantized_bag_sum_int32_t"(
        int, float *, const uint8_t *, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
        const int32_t *, Py_ssize_t, Py_ssize_t, Py_ssize_t, const float *, int64_t,
        Py_ssize_t) noexcept nogil
    void bag_sum_int64 "fastemb_quantized_bag_sum_int64_t"(
        int, float *, const uint8_t *, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
        const int64_t *, Py_ssize_t, Py_ssize_t, Py_ssize_t, const float *, int64_t,
        Py_ssize_t) noexcept nogil

# The threads of a call touching about `work` elements, from the _lookup module of this build,
# which holds the thread settings.
threads_for = importlib.import_module(__name__.replace("._quantized", "._lookup")).threads_for

cdef enum:
    MIN_BAGS_PER_CHUNK = 64  # the fewest bags reduced per prange iteration
    CHUNKS_PER_THREAD = 8  # prange iterations of bags per thread, when there are bags enough
    ROWS_PER_CHUNK = 256  # rows quantized per prange iteration

# As in _lookup: bags prefetch once the table is past half of a core's L2, a gather only past
# the L3.
cdef Py_ssize_t BAG_PREFETCH_MIN_TABLE_BYTES = 256 << 10
cdef Py_ssize_t GATHER_PREFETCH_MIN_TABLE_BYTES = 8 << 20


def quantized_row_bytes(Py_ssize_t dim, int bits):
    """The bytes of one quantized row of ``dim`` elements: D + 8 (8 bits), D / 2 + 4 (4 bits)."""
    if bits == 8:
        return dim + 8
    if bits == 4:
        return dim // 2 + 4
    raise ValueError(f"bits must be 8 or 4, got {bits}")


cdef struct QuantizedRows:
    const uint8_t *data  # NULL for a table without rows
    Py_ssize_t num_rows
    Py_ssize_t dim
    Py_ssize_t row_bytes
    Py_ssize_t code_bytes  # the q bytes at the start of each row
    int bits


cdef QuantizedRows describe_rows(const uint8_t[:, ::1] data, int bits) except *:
    """The layout of a quantized table; ValueError if its rows cannot hold a scale and a bias."""
    cdef QuantizedRows rows
    rows.bits = bits
    rows.num_rows = data.shape[0]
    rows.row_bytes = data.shape[1]
    if bits == 8:
        rows.code_bytes = rows.row_bytes - 8
        rows.dim = rows.code_bytes
    elif bits == 4:
        rows.code_bytes = rows.row_bytes - 4
        rows.dim = 2 * rows.code_bytes
    else:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if rows.code_bytes < 0:
        raise ValueError(f"a {bits}-bit quantized row needs at least "
                         f"{rows.row_bytes - rows.code_bytes} bytes, got {rows.row_bytes}")
    rows.data = &data[0, 0] if rows.num_rows > 0 and rows.row_bytes > 0 else NULL
    return rows


cdef inline void prefetch_quantized_row(const QuantizedRows *rows, int64_t row) noexcept nogil:
    """Prefetch every line of table row ``row`` (row 0 for an index that names no row)."""
    prefetch_lines_of_row(rows.data, rows.num_rows, rows.row_bytes, row)


# --------------------------------------------------------------------------------------------
# Quantization, row by row (FBGEMM's reference quantization, which torch's prepack ops run):
#   8 bits: min, max of the row; range = max - min; scale = range / 255; bias = min;
#           q[j] = lrint((x[j] - min) * (255 / (range + 1e-8)))   (a constant row: q = 0)
#   4 bits: bias = fp16(min), and min = that bias; range = max - min;
#           scale = fp16(range / 15) (1 for a constant row; 1 where the fp16 scale is 0 or its
#           reciprocal overflows); q[j] = clamp(lrint((x[j] - min) * (1 / scale)), 0, 15)
# All in float32, rounding to nearest even.
# --------------------------------------------------------------------------------------------

cdef inline void row_min_max(const float *values, Py_ssize_t dim, float *low,
                             float *high) noexcept nogil:
    """The smallest and largest of values[:dim] as FBGEMM takes them: running from FLT_MAX and
    -FLT_MAX, a value replaces the running one only if strictly beyond it (NaN never does; of
    +0 and -0 the first stays)."""
    cdef Py_ssize_t j
    low[0] = FLT_MAX
    high[0] = -FLT_MAX
    for j in range(dim):
        low[0] = values[j] if values[j] < low[0] else low[0]
        high[0] = values[j] if values[j] > high[0] else high[0]


cdef inline void quantize_row_8bit(const float *table, Py_ssize_t r, Py_ssize_t dim,
                                   uint8_t *out) noexcept nogil:
    """Row r of table (V, dim), quantized to 8 bits into out (dim + 8 bytes)."""
    cdef const float *values = table + r * dim if dim else NULL
    cdef float low, high, value_range, inverse_scale, scale
    cdef Py_ssize_t j
    row_min_max(values, dim, &low, &high)
    value_range = high - low
    scale = value_range / <float>255.0
    inverse_scale = <float>255.0 / (value_range + <float>1e-8)
    for j in range(dim):
        out[j] = <uint8_t>lrintf((values[j] - low) * inverse_scale)
    memcpy(out + dim, &scale, sizeof(float))
    memcpy(out + dim + sizeof(float), &low, sizeof(float))


cdef inline void quantize_row_4bit(const float *table, Py_ssize_t r, Py_ssize_t dim,
                                   uint8_t *out) noexcept nogil:
    """Row r of table (V, dim), quantized to 4 bits into out (dim / 2 + 4 bytes)."""
    cdef const float *values = table + r * dim if dim else NULL
    cdef float low, high, value_range, scale, inverse_scale
    cdef float16_t halves[2]  # the stored scale and bias
    cdef long code
    cdef Py_ssize_t j
    row_min_max(values, dim, &low, &high)
    halves[1] = float16_nearest(low)
    low = float16_value(halves[1])
    value_range = high - low
    scale = 1.0 if value_range == 0 else value_range / <float>15.0
    scale = float16_value(float16_nearest(scale))
    if scale == 0:
        scale = 1.0
    inverse_scale = <float>1.0 / scale
    if isinf(inverse_scale):
        scale = 1.0
        inverse_scale = 1.0
    halves[0] = float16_nearest(scale)
    memset(out, 0, dim // 2)
    for j in range(dim):
        code = min(max(lrintf((values[j] - low) * inverse_scale), 0), 15)
        out[j // 2] |= <uint8_t>(code << (4 * (j % 2)))
    memcpy(out + dim // 2, halves, sizeof(halves))


def quantize_rows(const float[:, ::1] weight, int bits, uint8_t[:, ::1] out, int num_threads):
    """Quantize each row of ``weight`` (V, D) into ``out`` (V, quantized_row_bytes(D, bits)),
    in torch's prepacked layout (see the maths above). 4 bits needs an even D."""
    cdef Py_ssize_t num_rows = weight.shape[0], dim = weight.shape[1], chunk, r
    cdef Py_ssize_t num_chunks = (num_rows + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK
    cdef const float *table
    if bits == 4 and dim % 2:
        raise ValueError(f"4-bit quantization needs an even embedding_dim, got {dim}")
    if out.shape[0] != num_rows or out.shape[1] != quantized_row_bytes(dim, bits):
        raise ValueError("quantize_rows: out must have shape "
                         "(weight.shape[0], quantized_row_bytes(weight.shape[1], bits))")
    if num_rows == 0:
        return
    # (a row of no element takes FLT_MAX and -FLT_MAX as its min and max, as FBGEMM does)
    table = &weight[0, 0] if dim > 0 else NULL
    with nogil:
        for chunk in prange(num_chunks, schedule="static", num_threads=team_size(num_threads)):
            for r in range(chunk * ROWS_PER_CHUNK, min((chunk + 1) * ROWS_PER_CHUNK, num_rows)):
                if bits == 8:
                    quantize_row_8bit(table, r, dim, &out[r, 0])
                else:
                    quantize_row_4bit(table, r, dim, &out[r, 0])


# --------------------------------------------------------------------------------------------
# Row gather of a quantized table (embedding forward, dequantize):
#   out[i, j] = scale_r * q_r[j] + bias_r      with r = indices[i]; zeros if r is not a row
# --------------------------------------------------------------------------------------------

def gather_quantized(const uint8_t[:, ::1] data, int bits, const index_t[::1] indices,
                     float[:, ::1] out, int num_threads):
    """Dequantize table row ``indices[i]`` into ``out[i]`` for every i (zeros if out of range).
    Returns how many indices were out of range (the caller raises when it is not 0)."""
    cdef QuantizedRows rows = describe_rows(data, bits)
    cdef Py_ssize_t n = indices.shape[0], i, out_of_range = 0
    cdef Py_ssize_t distance = prefetch_distance(rows.num_rows, rows.row_bytes, 1,
                                                 GATHER_PREFETCH_MIN_TABLE_BYTES)
    cdef int64_t row
    if out.shape[0] != n or out.shape[1] != rows.dim:
        raise ValueError("gather_quantized: out must have shape (len(indices), embedding_dim)")
    if n == 0:
        return 0
    if rows.dim == 0 or rows.data == NULL:
        out[:, :] = 0
        return count_out_of_range(&indices[0], 0, n, rows.num_rows)
    with nogil:
        for i in prange(n, schedule="static", num_threads=team_size(num_threads)):
            if distance and i + distance < n:
                prefetch_quantized_row(&rows, indices[i + distance])
            row = indices[i]
            if 0 <= row < rows.num_rows:
                dequantize_row(bits, False, &out[i, 0], rows.data + row * rows.row_bytes,
                               rows.code_bytes, rows.dim)
            else:
                memset(&out[i, 0], 0, rows.dim * sizeof(float))
                out_of_range += 1  # (an OpenMP reduction)
    return out_of_range


# --------------------------------------------------------------------------------------------
# Bag reductions of a quantized table (embedding_bag forward). Bag b holds positions
# [bounds[b], bounds[b+1]); the kept entries k are those whose row x_k is a row of the table
# and not padding_idx; value_k[j] = fma(scale_k, q_k[j], bias_k) (float32, rounded once).
#   sum:  out[b, j] = sum_k w_k * value_k[j]     (w_k = 1 and no multiply, unweighted)
#   mean: out[b] = the sum / count of kept entries (weighted: / sum_k w_k); 0 for a divisor 0
#   max:  out[b, j] = max_k value_k[j]  (a later entry wins only if strictly greater); 0 for a
#         bag without kept entries
# Sums accumulate in float32, left to right from +0, so the result is the same bits for any
# thread count and any build.
# --------------------------------------------------------------------------------------------

cdef inline void sum_quantized_bag(const QuantizedRows *rows, const index_t *indices,
                                   Py_ssize_t start, Py_ssize_t end, Py_ssize_t n,
                                   const float *sample_weights, int64_t padding_idx, float *out,
                                   Py_ssize_t distance) noexcept nogil:
    """out[:D] = the sum of the kept entries of [start, end) (weighted, with sample_weights), in
    one pass of the C loops over the entries, which read each row where they meet its index
    (prefetching the row ``distance`` positions ahead) and keep the running sums in registers
    over the whole bag."""
    if index_t is int32_t:
        bag_sum_int32(rows.bits, out, rows.data, rows.num_rows, rows.row_bytes, rows.code_bytes,
                      rows.dim, indices, start, end, n, sample_weights, padding_idx, distance)
    else:
        bag_sum_int64(rows.bits, out, rows.data, rows.num_rows, rows.row_bytes, rows.code_bytes,
                      rows.dim, indices, start, end, n, sample_weights, padding_idx, distance)


cdef inline void max_quantized_bag(const QuantizedRows *rows, const index_t *indices,
                                   Py_ssize_t start, Py_ssize_t end, Py_ssize_t n,
                                   int64_t padding_idx, float *out,
                                   Py_ssize_t distance) noexcept nogil:
    """out[:D] = the max of the kept entries of [start, end); zeros if there is none."""
    cdef Py_ssize_t k
    cdef int64_t row
    cdef bint first = True
    memset(out, 0, rows.dim * sizeof(float))
    for k in range(start, end):
        if distance and k + distance < n:
            prefetch_quantized_row(rows, indices[k + distance])
        row = indices[k]
        if not is_kept(row, padding_idx, rows.num_rows):
            continue
        dequantize_row(rows.bits, not first, out, rows.data + row * rows.row_bytes,
                       rows.code_bytes, rows.dim)
        first = False


cdef inline void reduce_quantized_bags(const QuantizedRows *rows, const index_t *indices,
                                       Py_ssize_t n, const int64_t *bounds, Py_ssize_t first_bag,
                                       Py_ssize_t end_bag, const float *sample_weights,
                                       int64_t padding_idx, bint take_max, float *out,
                                       Py_ssize_t distance) noexcept nogil:
    """The sums or maxima of bags [first_bag, end_bag) into their rows of out (B, D)."""
    cdef Py_ssize_t b, start, end
    for b in range(first_bag, end_bag):
        bag_extent(bounds, b, n, &start, &end)
        if take_max:
            max_quantized_bag(rows, indices, start, end, n, padding_idx, out + b * rows.dim,
                              distance)
        else:
            sum_quantized_bag(rows, indices, start, end, n, sample_weights, padding_idx,
                              out + b * rows.dim, distance)


cdef Py_ssize_t reduce_quantized_chunks(const QuantizedRows *rows, const index_t *indices,
                                        Py_ssize_t n, const int64_t *bounds,
                                        Py_ssize_t num_bags, BagMode mode,
                                        const float *sample_weights, int64_t padding_idx,
                                        float *out, int num_threads) noexcept nogil:
    """quantized_bag_reduce's loop on checked arguments (``n`` indices; out (num_bags, D),
    num_bags > 0): the bags in chunks, each chunk then counting the indices of its bags
    outside [0, V), as _lookup.bag_reduce does. Returns how many there were, those outside
    every bag included.

    Chunks go to whichever thread is free (a shared machine can slow one core for a while),
    CHUNKS_PER_THREAD a thread, of at least MIN_BAGS_PER_CHUNK bags: fewer, longer chunks ran
    faster (the 8-bit bag sum on 2 threads: 3-4% slower in 64-bag chunks, 32 a thread, than in
    256-bag ones, 7% in 32-bag ones)."""
    cdef int team = team_size(num_threads)
    cdef Py_ssize_t bags_per_chunk = max(MIN_BAGS_PER_CHUNK,
                                         num_bags // (<Py_ssize_t>team * CHUNKS_PER_THREAD))
    cdef Py_ssize_t num_chunks = (num_bags + bags_per_chunk - 1) // bags_per_chunk
    cdef Py_ssize_t chunk, first, last, out_of_range = 0
    cdef Py_ssize_t distance = prefetch_distance(rows.num_rows, rows.row_bytes, 1,
                                                 BAG_PREFETCH_MIN_TABLE_BYTES)
    cdef Py_ssize_t num_kept = n if rows.data != NULL else 0  # (no rows: every bag is empty)
    for chunk in prange(num_chunks, schedule="dynamic", num_threads=team):
        first = chunk * bags_per_chunk
        last = min(first + bags_per_chunk, num_bags)
        reduce_quantized_bags(rows, indices, num_kept, bounds, first, last, sample_weights,
                              padding_idx, mode == BAG_MAX, out, distance)
        if mode == BAG_MEAN:
            divide_by_bag_sizes(rows.num_rows, rows.dim, indices, num_kept, bounds, first, last,
                                sample_weights, padding_idx, out, rows.dim)
        if n:
            out_of_range += count_out_of_range(  # (an OpenMP reduction)
                indices, clamp(bounds[first], 0, n), clamp(bounds[last], 0, n), rows.num_rows)
    if n:  # indices before the first bag or after the last
        out_of_range += count_out_of_range(indices, 0, clamp(bounds[0], 0, n), rows.num_rows)
        out_of_range += count_out_of_range(indices, clamp(bounds[num_bags], 0, n), n,
                                           rows.num_rows)
    return out_of_range


def quantized_bag_reduce(const uint8_t[:, ::1] data, int bits, const index_t[::1] indices,
                         const int64_t[::1] bounds, BagMode mode,
                         const float[::1] sample_weights, int64_t padding_idx,
                         float[:, ::1] out, int num_threads):
    """Reduce each bag ``indices[bounds[b]:bounds[b+1]]`` of dequantized rows into ``out[b]``.

    ``mode`` is a BagMode; ``sample_weights`` (one per index, or None) weights sum and mean;
    ``padding_idx`` (-1 for none) marks entries to skip. Returns how many indices were outside
    ``[0, V)`` (skipped like padding; counted chunk by chunk right after each chunk's bags, as
    ``_lookup.bag_reduce`` does): the caller, whose output this is, raises when it is not 0.
    """
    check_enum(mode, BAG_MAX, "bag mode")
    cdef QuantizedRows rows = describe_rows(data, bits)
    cdef Py_ssize_t n = indices.shape[0], num_bags = bounds.shape[0] - 1
    cdef const index_t *index_data = &indices[0] if n > 0 else NULL
    cdef const float *weights_data = NULL
    cdef Py_ssize_t out_of_range
    if num_bags < 0 or out.shape[0] != num_bags or out.shape[1] != rows.dim:
        raise ValueError("quantized_bag_reduce: out must have shape "
                         "(len(bounds) - 1, embedding_dim)")
    if sample_weights is not None:
        if sample_weights.shape[0] != n:
            raise ValueError("quantized_bag_reduce: sample_weights must have one entry per index")
        if n > 0:
            weights_data = &sample_weights[0]
    if num_bags == 0 or rows.dim == 0:  # nothing to reduce, but the indices are still checked
        return count_out_of_range(index_data, 0, n, rows.num_rows) if n else 0
    with nogil:
        out_of_range = reduce_quantized_chunks(&rows, index_data, n, &bounds[0], num_bags, mode,
                                               weights_data, padding_idx, &out[0, 0],
                                               num_threads)
    return out_of_range


def quantized_bag_forward_common(input, data, int bits, offsets, mode, per_sample_weights,
                                 bint include_last_offset, padding_idx):
    """``fastemb.embedding_bag`` on a QuantizedTable's prepacked rows ``data`` (a plain uint8
    array; see _lookup.bag_forward_common) in one call, for its common case: the arguments
    parse_bag_call takes, float32 per-sample weights. Returns the float32 bags, bit for bit
    those of the general path, or None when the call is not that case or not valid: the
    caller then takes the general path. It writes nothing but the fresh output it returns."""
    cdef QuantizedRows rows
    cdef BagCall call
    cdef Py_ssize_t out_of_range
    cdef int num_threads
    cdef float *out_data
    if (not is_plain_array(data) or cnp.PyArray_NDIM(<cnp.ndarray>data) != 2
            or cnp.PyArray_TYPE(<cnp.ndarray>data) != cnp.NPY_UINT8):
        return None
    rows = describe_rows(data, bits)
    if rows.dim == 0 or not parse_bag_call(input, offsets, mode, per_sample_weights,
                                           include_last_offset, padding_idx, rows.num_rows,
                                           cnp.NPY_FLOAT32, &call):
        return None
    try:
        out = new_bag_output(call.num_bags, rows.dim, cnp.NPY_FLOAT32)
        out_data = <float *>cnp.PyArray_DATA(<cnp.ndarray>out)
        num_threads = threads_for(call.num_indices * rows.dim)
        with nogil:
            if call.index_type == cnp.NPY_INT64:
                out_of_range = reduce_quantized_chunks(
                    &rows, <const int64_t *>call.indices, call.num_indices, call.bounds,
                    call.num_bags, call.mode, <const float *>call.weights, call.padding_idx,
                    out_data, num_threads)
            else:
                out_of_range = reduce_quantized_chunks(
                    &rows, <const int32_t *>call.indices, call.num_indices, call.bounds,
                    call.num_bags, call.mode, <const float *>call.weights, call.padding_idx,
                    out_data, num_threads)
    finally:
        free_bag_call(&call)
    return out if out_of_range == 0 else None
