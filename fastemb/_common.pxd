"""Declarations and inline helpers that fastemb's kernel modules share (``_lookup``,
``_grouping``, ``_training``, ``_quantized``, ``_allocator``; ``_core`` is their entry). The C
they use beside Cython's lives in ``_core.h``. The enums are exposed to Python by
``fastemb._common``.
"""

from cython cimport floating
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t, uintptr_t

cdef extern from "_core.h":
    void FASTEMB_PREFETCH(const void *address) noexcept nogil
    void FASTEMB_PREFETCH_WRITE(const void *address) noexcept nogil
    int omp_get_max_threads() noexcept nogil
    const int FASTEMB_HAVE_OPENMP
    const char *FASTEMB_COMPILE_FLAGS
    int fastemb_cpu_has_avx2() noexcept nogil
    int fastemb_cpu_has_avx512() noexcept nogil

ctypedef fused index_t:
    int32_t
    int64_t

# 16-bit table elements (distinct C types, so kernels specialise on them) and their float32
# values (exact).
cdef extern from "_core.h":
    ctypedef struct bfloat16_t "fastemb_bfloat16":
        uint16_t bits
    ctypedef struct float16_t "fastemb_float16":
        uint16_t bits
    float bfloat16_value "fastemb_bfloat16_value"(bfloat16_t value) noexcept nogil
    float float16_value "fastemb_float16_value"(float16_t value) noexcept nogil
    float16_t float16_nearest "fastemb_float16_nearest"(float value) noexcept nogil
    bfloat16_t bfloat16_nearest "fastemb_bfloat16_nearest"(float value) noexcept nogil
    void widen_float16_row "fastemb_widen_float16_row"(const float16_t *row, float *wide,
                                                       Py_ssize_t dim) noexcept nogil
    void round_float16_row "fastemb_round_float16_row"(const float *wide, float16_t *row,
                                                       Py_ssize_t dim) noexcept nogil
    # (stochastic rounding: see _core.h)
    float16_t float16_stochastic "fastemb_float16_stochastic"(float value,
                                                             uint64_t random) noexcept nogil
    bfloat16_t bfloat16_stochastic "fastemb_bfloat16_stochastic"(float value,
                                                                uint64_t random) noexcept nogil
    uint64_t mix64 "fastemb_mix64"(uint64_t value) noexcept nogil
    float joined "fastemb_joined"(uint16_t high, uint16_t low) noexcept nogil
    uint32_t float_bits "fastemb_float_bits"(float value) noexcept nogil

# What a table holds: float32 and float64 (computed in their own dtype), or bfloat16 and
# float16 (read as float32, computed in float32).
ctypedef fused table_t:
    float
    double
    bfloat16_t
    float16_t

# What a table's NumPy array is viewed as by a kernel's def: its floats, or the bits of its
# 16-bit floats (the call says which format, a HalfFormat).
ctypedef fused stored_t:
    float
    double
    uint16_t

cdef enum:
    CACHE_LINE_BYTES = 64  # a compile-time constant, so the prefetch loops unroll
    # Lookups prefetch the table row they will need some positions ahead: enough rows to keep
    # about PREFETCH_BYTES_IN_FLIGHT loading, 4 to 32 rows. Too few leaves the loads waiting on
    # memory, too many evicts rows before they are used; a fixed byte budget keeps narrow rows
    # (fewer bytes each) as far ahead in memory as wide ones. The bench's large and narrow
    # workloads measure it.
    PREFETCH_BYTES_IN_FLIGHT = 4096
    PREFETCH_MIN_ROWS = 4
    PREFETCH_MAX_ROWS = 32
    # A kernel call with less work than this (in table elements touched) runs on one thread:
    # the fork/join costs more than it saves, and far more when the cores are shared with other
    # work.
    PARALLEL_GRAIN = 32768

# What a bag reduces to, and which update an optimizer step applies. The public API names them
# with strings ("sum", "adam"); the Python layer maps those to these once.
cpdef enum BagMode:
    BAG_SUM = 0
    BAG_MEAN = 1
    BAG_MAX = 2

cpdef enum HalfFormat:
    BFLOAT16 = 0
    FLOAT16 = 1

cpdef enum StepMethod:
    STEP_SGD = 0
    STEP_ADAGRAD = 1
    STEP_ROWWISE_ADAGRAD = 2
    STEP_ADAM = 3


cdef inline int check_enum(int64_t value, int last, str what) except -1:
    """ValueError unless 0 <= value <= last (an enum argument may arrive as any int)."""
    if not 0 <= value <= last:
        raise ValueError(f"unknown {what} {value}; expected 0 to {last}")
    return 0


cdef inline int team_size(int num_threads) noexcept nogil:
    """The OpenMP team a kernel asks for: num_threads, at least 1 (OpenMP reads 0 as "the
    default team" and aborts on a negative count)."""
    return num_threads if num_threads > 0 else 1


cdef inline Py_ssize_t clamp(int64_t value, Py_ssize_t low, Py_ssize_t high) noexcept nogil:
    if value < low:
        return low
    if value > high:
        return high
    return <Py_ssize_t>value


cdef inline double element_value(const table_t *row, Py_ssize_t j) noexcept nogil:
    """row[j] as a number (a 16-bit float widened exactly; float32 stays exact in double)."""
    if table_t is bfloat16_t:
        return bfloat16_value(row[j])
    elif table_t is float16_t:
        return float16_value(row[j])
    else:
        return row[j]


cdef inline bint is_kept(int64_t row, int64_t padding_idx, Py_ssize_t num_rows) noexcept nogil:
    """True for an entry a bag reduces: a row of the table that is not padding."""
    return <uint64_t>row < <uint64_t>num_rows and row != padding_idx


cdef inline void bag_extent(const int64_t *bounds, Py_ssize_t b, Py_ssize_t n,
                            Py_ssize_t *start, Py_ssize_t *end) noexcept nogil:
    """Bag b's positions [start, end): its bounds clamped into [0, n], with end >= start."""
    start[0] = clamp(bounds[b], 0, n)
    end[0] = clamp(bounds[b + 1], start[0], n)


cdef inline void divide_by_bag_sizes(Py_ssize_t num_rows, Py_ssize_t dim, const index_t *indices,
                                     Py_ssize_t n, const int64_t *bounds, Py_ssize_t first_bag,
                                     Py_ssize_t end_bag, const floating *sample_weights,
                                     int64_t padding_idx, floating *out,
                                     Py_ssize_t out_stride) noexcept nogil:
    """Mean: divide each bag's sum by its kept entries' count (weighted: their weights' sum),
    for the bags in [first_bag, end_bag), whose rows of out lie out_stride elements apart."""
    cdef Py_ssize_t b, k, j, start, end, count
    cdef floating divisor, weight_total
    for b in range(first_bag, end_bag):
        bag_extent(bounds, b, n, &start, &end)
        count = 0
        weight_total = 0
        for k in range(start, end):
            if is_kept(indices[k], padding_idx, num_rows):
                count += 1
                if sample_weights != NULL:
                    weight_total = weight_total + sample_weights[k]
        divisor = weight_total if sample_weights != NULL else <floating>count
        for j in range(dim):
            out[b * out_stride + j] = out[b * out_stride + j] / divisor if divisor != 0 else 0


cdef inline Py_ssize_t count_out_of_range(const index_t *indices, Py_ssize_t start,
                                          Py_ssize_t end, uint64_t limit) noexcept nogil:
    """How many of indices[start:end] lie outside [0, limit): one unsigned compare each
    (negative ones wrap to huge), branch-free, so the compiler vectorises it."""
    cdef Py_ssize_t i, count = 0
    for i in range(start, end):
        count = count + (<uint64_t>indices[i] >= limit)
    return count


cdef inline Py_ssize_t count_bags_out_of_range(const index_t *indices, Py_ssize_t n,
                                               const int64_t *bounds, Py_ssize_t first_bag,
                                               Py_ssize_t end_bag,
                                               uint64_t limit) noexcept nogil:
    """How many indices of bags [first_bag, end_bag) lie outside [0, limit): each bag's
    clamped extent is counted (a position in two bags twice), the bags that follow one another
    in one pass (with non-decreasing bounds: all of them)."""
    cdef Py_ssize_t b, start, end, run_start, run_end, count = 0
    if n == 0 or end_bag <= first_bag:
        return 0
    bag_extent(bounds, first_bag, n, &run_start, &run_end)
    for b in range(first_bag + 1, end_bag):
        bag_extent(bounds, b, n, &start, &end)
        if start != run_end:
            count = count + count_out_of_range(indices, run_start, run_end, limit)
            run_start = start
        run_end = end
    return count + count_out_of_range(indices, run_start, run_end, limit)


cdef inline void prefetch_row(const void *row, Py_ssize_t row_bytes, bint for_write=False,
                              bint lines_aligned=False) noexcept nogil:
    """Ask the CPU to start loading every cache line of one table row (to read or update)."""
    cdef const char *start = <const char *>row
    cdef Py_ssize_t offset = 0
    # the loop covers the lines of start[0], start[64], ...: as many lines as the row has
    # bytes, rounded up, which leave `slack` bytes spare after the row if it starts a line
    cdef Py_ssize_t lines = (row_bytes + CACHE_LINE_BYTES - 1) // CACHE_LINE_BYTES
    cdef Py_ssize_t slack = lines * CACHE_LINE_BYTES - row_bytes
    while offset < row_bytes:
        if for_write:
            FASTEMB_PREFETCH_WRITE(start + offset)
        else:
            FASTEMB_PREFETCH(start + offset)
        offset += CACHE_LINE_BYTES
    # a row that starts further into its line than that spans one line more; lines_aligned
    # says that none does (row and row size on cache lines; a literal True at an inlined call
    # site removes the test: a redundant prefetch per row cost a bag sum 2-8%)
    if not lines_aligned and <Py_ssize_t>(<uintptr_t>start % CACHE_LINE_BYTES) > slack:
        if for_write:
            FASTEMB_PREFETCH_WRITE(start + row_bytes - 1)
        else:
            FASTEMB_PREFETCH(start + row_bytes - 1)


cdef inline bint rows_on_lines(const void *table, Py_ssize_t row_bytes) noexcept nogil:
    """True when every row of a table starts on a cache line."""
    return <uintptr_t>table % CACHE_LINE_BYTES == 0 and row_bytes % CACHE_LINE_BYTES == 0


cdef inline Py_ssize_t prefetch_distance(Py_ssize_t num_rows, Py_ssize_t dim,
                                         Py_ssize_t item_size,
                                         Py_ssize_t min_table_bytes) noexcept nogil:
    """How many positions ahead lookups in a (num_rows, dim) table prefetch; 0 for none (a
    table of at most min_table_bytes)."""
    cdef Py_ssize_t row_bytes = max(dim * item_size, 1)
    if num_rows * row_bytes <= min_table_bytes:
        return 0
    return min(max(PREFETCH_BYTES_IN_FLIGHT // row_bytes, PREFETCH_MIN_ROWS), PREFETCH_MAX_ROWS)


cdef inline void prefetch_table_row(const void *table, Py_ssize_t num_rows, Py_ssize_t row_bytes,
                                    int64_t row, Py_ssize_t start_byte, Py_ssize_t num_bytes,
                                    bint lines_aligned) noexcept nogil:
    """Prefetch bytes [start_byte, start_byte + num_bytes) of table row ``row``; an index that
    names no row prefetches row 0 (the table is not empty when this runs), without a branch."""
    if <uint64_t>row >= <uint64_t>num_rows:  # one compare for "not 0 <= row < num_rows"
        row = 0
    prefetch_row(<const char *>table + row * row_bytes + start_byte, num_bytes, False,
                 lines_aligned)


cdef inline void prefetch_ahead(const void *table, Py_ssize_t num_rows, Py_ssize_t row_bytes,
                                const index_t *indices, Py_ssize_t n, Py_ssize_t position,
                                Py_ssize_t distance, Py_ssize_t start_byte, Py_ssize_t num_bytes,
                                bint lines_aligned) noexcept nogil:
    """Prefetch bytes [start_byte, start_byte + num_bytes) of the row
    ``indices[position + distance]`` names (see prefetch_table_row). Without branches, as FBGEMM
    does: past the end it takes the current position. ``lines_aligned``: every row's bytes
    start on a cache line (see prefetch_row)."""
    cdef Py_ssize_t ahead = position + distance
    if ahead >= n:
        ahead = position
    prefetch_table_row(table, num_rows, row_bytes, indices[ahead], start_byte, num_bytes,
                       lines_aligned)
