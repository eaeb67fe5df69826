# cython: language_level=3
"""fastemb._grouping: the radix sort that groups looked-up positions by table row, which every
backward pass starts from. The rules every kernel follows are in ``fastemb/_core.pyx``."""

from cython.parallel cimport prange, threadid
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

import numpy as np

from fastemb._common cimport index_t, is_kept, team_size

__all__ = ["collection_group_by_row", "group_by_row"]


# --------------------------------------------------------------------------------------------
# Grouping positions by row: a stable, parallel LSD radix sort of (row, position) pairs.
#   rows[u]                   the u-th distinct row, ascending (padding and out-of-range skipped)
#   order[starts[u]:starts[u+1]]  the positions holding rows[u], ascending (or their payloads,
#                             in that order)
# Each pass: per-chunk digit histograms, a serial prefix over (digit, chunk), then each chunk
# scatters its elements in order. A stable sort has one answer, so the result does not depend
# on how many chunks (threads) were used. Memory is O(n), never O(V). When a row and a position
# fit in 63 bits together they travel as one int64 (row in the high bits): half the memory
# traffic of a pair. The first pass reads the
# indices themselves (counting, then scattering the kept entries), and the groups are found
# in parallel, chunk by chunk.
# --------------------------------------------------------------------------------------------

cdef inline Py_ssize_t chunk_start(Py_ssize_t chunk, Py_ssize_t num_chunks,
                                   Py_ssize_t n) noexcept nogil:
    return <Py_ssize_t>((<double>chunk * n) / num_chunks) if chunk < num_chunks else n


cdef void exclusive_prefix_by_digit(int64_t[:, ::1] histogram) noexcept nogil:
    """Turn per-chunk digit counts into each (chunk, digit)'s first output slot: digit by
    digit, chunk by chunk, so equal digits keep their chunks' order (a stable sort)."""
    cdef Py_ssize_t chunk, digit
    cdef int64_t running = 0, count
    for digit in range(histogram.shape[1]):
        for chunk in range(histogram.shape[0]):
            count = histogram[chunk, digit]
            histogram[chunk, digit] = running
            running = running + count


cdef void radix_pass(const int64_t[::1] keys_in, const int64_t[::1] values_in,
                     int64_t[::1] keys_out, int64_t[::1] values_out, bint with_values,
                     int64_t[:, ::1] histogram, int shift, int64_t mask,
                     int num_threads) noexcept nogil:
    """One stable pass on the digit ``(key >> shift) & mask``, carrying the values along if
    ``with_values``."""
    cdef Py_ssize_t num_chunks = histogram.shape[0], num_bins = histogram.shape[1]
    cdef Py_ssize_t n = keys_in.shape[0], chunk, i, digit, slot
    for chunk in prange(num_chunks, schedule="static", num_threads=team_size(num_threads)):
        memset(&histogram[chunk, 0], 0, num_bins * sizeof(int64_t))
        for i in range(chunk_start(chunk, num_chunks, n), chunk_start(chunk + 1, num_chunks, n)):
            histogram[chunk, (keys_in[i] >> shift) & mask] += 1
    exclusive_prefix_by_digit(histogram)
    for chunk in prange(num_chunks, schedule="static", num_threads=team_size(num_threads)):
        for i in range(chunk_start(chunk, num_chunks, n), chunk_start(chunk + 1, num_chunks, n)):
            digit = (keys_in[i] >> shift) & mask
            slot = histogram[chunk, digit]
            histogram[chunk, digit] = slot + 1
            keys_out[slot] = keys_in[i]
            if with_values:
                values_out[slot] = values_in[i]


def group_by_row(const index_t[::1] indices, int64_t num_rows, int64_t padding_idx,
                 int num_threads, const int64_t[::1] payload=None):
    """Group the positions of ``indices`` by row; returns ``(rows, starts, order)`` (int64).

    Positions whose row is ``padding_idx`` or outside ``[0, num_rows)`` are left out. With a
    ``payload`` (one entry per position), ``order`` holds ``payload[p]`` instead of p, in the
    same order (a bag backward passes each position's bag: one indirection less to follow).
    """
    cdef Py_ssize_t n = indices.shape[0], num_chunks = max(1, min(num_threads, n))
    cdef bint has_payload = payload is not None
    if has_payload and payload.shape[0] != n:
        raise ValueError("group_by_row: payload needs one entry per index")
    cdef Py_ssize_t chunk, i, end, kept, slot, m = 0, group_starts, u, num_groups = 0
    cdef int64_t row, value, lowest, highest, smallest_value = 0, largest_value = max(n - 1, 0)
    num_rows = max(num_rows, 0)  # (is_kept reads a negative count as a huge one)
    cdef int key_bits = int(num_rows - 1).bit_length() if num_rows > 1 else 0
    # Digits of up to 11 bits, or up to 14 once there are 4 entries for each of 2^14 bins: a
    # pass costs O(n + 2^digit_bits), so wider digits pay once there are enough entries to
    # fill their bins (a 10,000-row table then sorts in one pass instead of two). The first
    # pass also runs for a one-row table (a digit of 0 bits): it builds the keys.
    cdef int max_digit_bits = 14 if n >= 4 << 14 else 11
    cdef int num_passes = max(1, (key_bits + max_digit_bits - 1) // max_digit_bits)
    cdef int digit_bits = (key_bits + num_passes - 1) // num_passes
    cdef int64_t digit_mask = (<int64_t>1 << digit_bits) - 1
    cdef int64_t[:, ::1] histogram = np.zeros((num_chunks, 1 << digit_bits), dtype=np.int64)
    cdef int64_t[:, ::1] chunk_facts = np.zeros((num_chunks, 3), dtype=np.int64)
    # 1. Per chunk: how many entries are kept, the range of their values, and the histogram of
    #    their first digit (the lowest digit_bits bits of the row).
    with nogil:
        for chunk in prange(num_chunks, schedule="static", num_threads=team_size(num_threads)):
            kept = 0
            lowest = 0
            highest = 0
            end = chunk_start(chunk + 1, num_chunks, n)
            for i in range(chunk_start(chunk, num_chunks, n), end):
                row = indices[i]
                if is_kept(row, padding_idx, num_rows):
                    kept = kept + 1
                    histogram[chunk, row & digit_mask] += 1
                    if has_payload:
                        lowest = min(lowest, payload[i])
                        highest = max(highest, payload[i])
            chunk_facts[chunk, 0] = kept
            chunk_facts[chunk, 1] = lowest
            chunk_facts[chunk, 2] = highest
        for chunk in range(num_chunks):
            m = m + chunk_facts[chunk, 0]
            if has_payload:
                smallest_value = min(smallest_value, chunk_facts[chunk, 1])
                largest_value = max(largest_value, chunk_facts[chunk, 2])
        exclusive_prefix_by_digit(histogram)
    # Packed: when row and value fit in 63 bits together, each element is one int64,
    # row << value_bits | value, and the sort moves one array instead of two.
    cdef int value_bits = int(largest_value).bit_length()
    cdef bint packed = smallest_value >= 0 and key_bits + value_bits <= 63
    cdef int64_t value_mask = (<int64_t>1 << value_bits) - 1 if packed else 0
    cdef int first_shift = value_bits if packed else 0
    keys_array, spare_keys = np.empty(m, dtype=np.int64), np.empty(m, dtype=np.int64)
    positions_array = np.empty(0 if packed else m, dtype=np.int64)
    spare_positions = np.empty_like(positions_array)
    cdef int64_t[::1] keys = keys_array, positions = positions_array
    cdef int64_t[::1] keys_out = spare_keys, positions_out = spare_positions
    # 2. The first pass scatters straight from indices (and payload) into the keys.
    with nogil:
        for chunk in prange(num_chunks, schedule="static", num_threads=team_size(num_threads)):
            end = chunk_start(chunk + 1, num_chunks, n)
            for i in range(chunk_start(chunk, num_chunks, n), end):
                row = indices[i]
                if is_kept(row, padding_idx, num_rows):
                    value = payload[i] if has_payload else i
                    slot = histogram[chunk, row & digit_mask]
                    histogram[chunk, row & digit_mask] = slot + 1
                    if packed:
                        keys[slot] = row << value_bits | value
                    else:
                        keys[slot] = row
                        positions[slot] = value
    # 3. The other passes sort the keys on their higher digits.
    cdef int pass_number
    for pass_number in range(1, num_passes):
        with nogil:
            radix_pass(keys, positions, keys_out, positions_out, not packed, histogram,
                       first_shift + pass_number * digit_bits, digit_mask, num_threads)
        keys, keys_out = keys_out, keys
        positions, positions_out = positions_out, positions
    # 4. Groups: a key whose row differs from the previous one starts a group. Per chunk, count
    #    the group starts (and unpack the values into the spare array); then each chunk writes
    #    its groups' rows and starts from its first group's number on.
    if packed:
        positions = keys_out
    with nogil:
        for chunk in prange(num_chunks, schedule="static", num_threads=team_size(num_threads)):
            group_starts = 0
            end = chunk_start(chunk + 1, num_chunks, m)
            for i in range(chunk_start(chunk, num_chunks, m), end):
                group_starts = group_starts + (
                    i == 0 or (keys[i] >> first_shift) != (keys[i - 1] >> first_shift))
                if packed:
                    positions[i] = keys[i] & value_mask
            chunk_facts[chunk, 0] = group_starts
        for chunk in range(num_chunks):
            chunk_facts[chunk, 1] = num_groups
            num_groups = num_groups + chunk_facts[chunk, 0]
    rows_array = np.empty(num_groups, dtype=np.int64)
    starts_array = np.empty(num_groups + 1, dtype=np.int64)
    cdef int64_t[::1] rows = rows_array, starts = starts_array
    with nogil:
        for chunk in prange(num_chunks, schedule="static", num_threads=team_size(num_threads)):
            u = chunk_facts[chunk, 1]
            end = chunk_start(chunk + 1, num_chunks, m)
            for i in range(chunk_start(chunk, num_chunks, m), end):
                if i == 0 or (keys[i] >> first_shift) != (keys[i - 1] >> first_shift):
                    rows[u] = keys[i] >> first_shift
                    starts[u] = i
                    u = u + 1
        starts[num_groups] = m
    return rows_array, starts_array, np.asarray(positions)


# --------------------------------------------------------------------------------------------
# A collection's backward: the same grouping, table by table. A collection's values lie table
# by table (its features in config order, a table's features neighbours), so each table's
# positions are one segment, sorted on its own, in the core's cache: one prange iteration per
# table, each a sequential LSD radix sort of packed (row, value) keys with digits of at most
# SEGMENT_DIGIT_BITS bits. While it places each position it also finds the gradient row the
# position reads (its source): its bag, or its place among the table's values.
# --------------------------------------------------------------------------------------------

cdef enum:
    SEGMENT_DIGIT_BITS = 11


cdef struct Segment:
    # one table of collection_group_by_row: its number, its positions [start, end), its rows
    # and its features
    Py_ssize_t number
    Py_ssize_t start
    Py_ssize_t end
    int64_t num_rows
    int key_bits
    Py_ssize_t first_feature
    Py_ssize_t end_feature


cdef Py_ssize_t sort_pass(const int64_t *keys_in, int64_t *keys_out, Py_ssize_t m,
                          int shift, int64_t mask, int64_t *histogram) noexcept nogil:
    """One stable counting-sort pass of keys_in[:m] into keys_out on (key >> shift) & mask."""
    cdef Py_ssize_t i, digit
    cdef int64_t running = 0, count
    memset(histogram, 0, (mask + 1) * sizeof(int64_t))
    for i in range(m):
        histogram[(keys_in[i] >> shift) & mask] += 1
    for digit in range(mask + 1):
        count = histogram[digit]
        histogram[digit] = running
        running = running + count
    for i in range(m):
        digit = (keys_in[i] >> shift) & mask
        keys_out[histogram[digit]] = keys_in[i]
        histogram[digit] += 1
    return m


cdef Py_ssize_t group_segment(const Segment *segment, const index_t *values,
                              const int64_t *bounds, Py_ssize_t batch_size,
                              const int64_t *padding, const int64_t *grad_row_bases,
                              bint one_row_per_value, bint positions_in_order, int value_bits,
                              int64_t *source, int64_t *keys, int64_t *spare, int64_t *order,
                              int64_t *rows, int64_t *starts, int64_t *histogram) noexcept nogil:
    """Group one table's positions by row (see collection_group_by_row); returns its number of
    unique rows U. Writes source over the segment, order[start:start + m] (m kept positions),
    rows[start:start + U] and starts[start + t:start + t + U + 1] (t: the table's number, so
    that each table has one more entry than positions), using keys and spare over the segment
    as scratch."""
    cdef Py_ssize_t f, b, k, m = 0, i, u = 0, num_passes, pass_number
    cdef Py_ssize_t start = segment.start, feature_start, bag_start, bag_end
    cdef int64_t row, value, value_mask = (<int64_t>1 << value_bits) - 1
    cdef int digit_bits
    cdef int64_t *sorted_keys = keys + start
    cdef int64_t *other_keys = spare + start
    cdef int64_t *swap
    # 1. Each kept position's source and packed key, in position order.
    for f in range(segment.first_feature, segment.end_feature):
        feature_start = bounds[f * batch_size]
        for b in range(batch_size):
            bag_start = bounds[f * batch_size + b]
            bag_end = bounds[f * batch_size + b + 1]
            for k in range(bag_start, bag_end):
                source[k] = grad_row_bases[f] + (k - feature_start if one_row_per_value else b)
                row = values[k]
                if row == padding[f] or not 0 <= row < segment.num_rows:
                    continue
                value = k if positions_in_order else source[k]
                sorted_keys[m] = row << value_bits | value
                m += 1
    # 2. LSD passes on the row's digits.
    num_passes = (segment.key_bits + SEGMENT_DIGIT_BITS - 1) // SEGMENT_DIGIT_BITS
    digit_bits = (segment.key_bits + num_passes - 1) // num_passes if num_passes else 0
    for pass_number in range(num_passes):
        sort_pass(sorted_keys, other_keys, m, value_bits + pass_number * digit_bits,
                  (<int64_t>1 << digit_bits) - 1, histogram)
        swap = sorted_keys
        sorted_keys = other_keys
        other_keys = swap
    # 3. Groups: a key whose row differs from the previous one starts one.
    for i in range(m):
        if i == 0 or (sorted_keys[i] >> value_bits) != (sorted_keys[i - 1] >> value_bits):
            rows[start + u] = sorted_keys[i] >> value_bits
            starts[start + segment.number + u] = start + i
            u += 1
        order[start + i] = sorted_keys[i] & value_mask
    starts[start + segment.number + u] = start + m
    return u


def collection_group_by_row(const index_t[::1] values, const int64_t[::1] bounds,
                            Py_ssize_t batch_size, const int64_t[::1] table_features,
                            const int64_t[::1] num_rows, const int64_t[::1] padding,
                            const int64_t[::1] grad_row_bases, bint one_row_per_value,
                            bint positions_in_order, int num_threads):
    """Group a collection's positions by row, table by table; returns ``(source, order, rows,
    starts, group_counts)`` (int64).

    Feature f's values are bags ``bounds[f * B:(f + 1) * B + 1]`` (bounds from 0 to
    ``len(values)``, non-decreasing); table t reads features ``table_features[t]`` to
    ``table_features[t + 1]`` (from 0 to K, non-decreasing), whose values are one segment.
    Position p of feature f, in bag b, reads gradient row ``source[p] = grad_row_bases[f] +
    b`` (or ``+ p - (f's first position)`` with ``one_row_per_value``); it is skipped when
    ``values[p]`` is ``padding[f]`` or outside ``[0, num_rows[t])`` (0 rows skips a table).
    Table t has ``U = group_counts[t]`` unique rows, ascending, in ``rows[s:s + U]``, where s
    is its segment's first position, and ``order[starts[s + t + u]:starts[s + t + u + 1]]``
    holds the positions of its u-th row, ascending, or with ``positions_in_order`` False, their
    sources, in that order (as group_by_row's payload)."""
    cdef Py_ssize_t n = values.shape[0], num_tables = table_features.shape[0] - 1
    cdef Py_ssize_t num_features = padding.shape[0], t, f, k, span, largest = n
    cdef int value_bits, histogram_bins = 1 << SEGMENT_DIGIT_BITS
    if (num_tables < 0 or num_rows.shape[0] != num_tables
            or grad_row_bases.shape[0] != num_features or batch_size < 0
            or num_features and batch_size > (bounds.shape[0] - 1) // num_features  # (no
            or bounds.shape[0] != num_features * batch_size + 1):  # product can overflow)
        raise ValueError("collection_group_by_row: table_features needs one entry per table "
                         "plus one, num_rows one per table, padding and grad_row_bases one "
                         "per feature, bounds K * B + 1")
    if table_features[0] != 0 or table_features[num_tables] != num_features:
        raise ValueError("collection_group_by_row: table_features must run from 0 to K")
    for t in range(num_tables):
        if table_features[t + 1] < table_features[t]:
            raise ValueError("collection_group_by_row: table_features must be non-decreasing")
    if bounds[0] != 0 or bounds[bounds.shape[0] - 1] != n:
        raise ValueError("collection_group_by_row: bounds must run from 0 to len(values)")
    for k in range(bounds.shape[0] - 1):
        if bounds[k + 1] < bounds[k]:
            raise ValueError("collection_group_by_row: bounds must be non-decreasing")
    for f in range(num_features):
        span = max(batch_size, bounds[(f + 1) * batch_size] - bounds[f * batch_size])
        if not 0 <= grad_row_bases[f] <= PY_SSIZE_T_MAX - span:
            raise ValueError("collection_group_by_row: grad_row_bases must be >= 0, and their "
                             "gradient rows below 2**63")
        largest = max(largest, grad_row_bases[f] + span)
    value_bits = int(largest).bit_length()
    source_array, order_array = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    rows_array, starts_array = np.empty(n, dtype=np.int64), np.empty(n + num_tables, np.int64)
    counts_array = np.zeros(num_tables, dtype=np.int64)
    keys_array, spare_array = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    histograms_array = np.empty((team_size(num_threads), histogram_bins), dtype=np.int64)
    cdef int64_t[::1] source = source_array, order = order_array, rows = rows_array
    cdef int64_t[::1] starts = starts_array, counts = counts_array, keys = keys_array
    cdef int64_t[::1] spare = spare_array
    cdef int64_t[:, ::1] histograms = histograms_array
    if n == 0:
        starts_array[:] = 0
        return source_array, order_array, rows_array, starts_array, counts_array
    cdef Segment *segments = <Segment *>malloc(num_tables * sizeof(Segment))
    if segments == NULL:
        raise MemoryError()
    try:
        for t in range(num_tables):
            segments[t].number = t
            segments[t].first_feature = table_features[t]
            segments[t].end_feature = table_features[t + 1]
            segments[t].start = bounds[table_features[t] * batch_size]
            segments[t].end = bounds[table_features[t + 1] * batch_size]
            segments[t].num_rows = max(num_rows[t], 0)
            segments[t].key_bits = int(segments[t].num_rows - 1).bit_length() if (
                segments[t].num_rows > 1) else 0
            if segments[t].key_bits + value_bits > 63:
                raise ValueError(f"collection_group_by_row: table {t} has too many rows to group "
                                 f"with {largest} positions")
        with nogil:
            for t in prange(num_tables, schedule="dynamic", num_threads=team_size(num_threads)):
                counts[t] = group_segment(&segments[t], &values[0], &bounds[0], batch_size,
                                          &padding[0], &grad_row_bases[0], one_row_per_value,
                                          positions_in_order, value_bits, &source[0],
                                          &keys[0], &spare[0], &order[0], &rows[0],
                                          &starts[0], &histograms[threadid(), 0])
    finally:
        free(segments)
    return source_array, order_array, rows_array, starts_array, counts_array
