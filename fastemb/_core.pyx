# cython: language_level=3
"""fastemb._core: every compute kernel of fastemb, in typed Cython with OpenMP.

Rules every kernel here follows:

- It is called by the Python layer (``fastemb/functional.py`` and friends) after all validation;
  the ``def`` wrapper only checks that the arrays fit together, with the GIL held, and then runs
  the loop with the GIL released.
- It is parallel over *output rows* with ``prange``: each output row is written by exactly one
  iteration (owner computes), in a fixed order, so the result is bitwise identical for any
  thread count and schedule. The schedule is static, except for the gradient sums over unique
  rows, whose work per row varies by thousands of times (dynamic).
- It is memory safe whatever it is handed: a row index outside ``[0, V)`` is skipped (treated like
  padding) and bag bounds are clamped into ``[0, n]``. The Python layer rejects such input before
  any kernel runs, so these guards never change a validated result.

Notation: ``V`` rows and ``D`` columns in the table (weight), ``n`` looked-up indices, ``B`` bags.
"""

from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport INFINITY, NAN, fabs, isinf, pow, sqrt, sqrtf
from libc.stdint cimport int32_t, int64_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset

import numpy as np

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define FASTEMB_PREFETCH(address) __builtin_prefetch((const void *)(address), 0, 3)
    #define FASTEMB_PREFETCH_WRITE(address) __builtin_prefetch((const void *)(address), 1, 3)
    #else
    #define FASTEMB_PREFETCH(address) ((void)(address))
    #define FASTEMB_PREFETCH_WRITE(address) ((void)(address))
    #endif

    #ifdef _OPENMP
    #include <omp.h>
    #define FASTEMB_HAVE_OPENMP 1
    #else
    static int omp_get_max_threads(void) { return 1; }
    #define FASTEMB_HAVE_OPENMP 0
    #endif

    #ifndef FASTEMB_COMPILE_FLAGS
    #define FASTEMB_COMPILE_FLAGS "unknown"
    #endif

    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    static int fastemb_cpu_has_avx2(void) { return __builtin_cpu_supports("avx2"); }
    #else
    static int fastemb_cpu_has_avx2(void) { return 0; }
    #endif
    """
    void FASTEMB_PREFETCH(const void *address) noexcept nogil
    void FASTEMB_PREFETCH_WRITE(const void *address) noexcept nogil
    int omp_get_max_threads() noexcept nogil
    const int FASTEMB_HAVE_OPENMP
    const char *FASTEMB_COMPILE_FLAGS
    int fastemb_cpu_has_avx2() noexcept nogil

ctypedef fused index_t:
    int32_t
    int64_t

# Lookups prefetch the table row they will need some positions ahead: enough rows to keep about
# PREFETCH_BYTES_IN_FLIGHT loading, 4 to 32 rows. Too few leaves the loads waiting on memory,
# too many evicts rows before they are used; a fixed byte budget keeps narrow rows (fewer
# bytes each) as far ahead in memory as wide ones. The bench's large and narrow workloads
# measure it.
cdef Py_ssize_t PREFETCH_BYTES_IN_FLIGHT = 4096
cdef Py_ssize_t PREFETCH_MIN_ROWS = 4
cdef Py_ssize_t PREFETCH_MAX_ROWS = 32
# Prefetching starts at a table size, below which the rows a lookup needs are mostly in the
# core's own caches and prefetch instructions are overhead. A bag's running sum waits on its
# rows' loads, so the bag kernels prefetch once the table is past half of a core's L2. A gather
# only copies rows, and the CPU overlaps the loads of its independent copies by itself, so it
# prefetches only tables well past the L3 (the bench's small workload sits between the two).
cdef Py_ssize_t BAG_PREFETCH_MIN_TABLE_BYTES = 256 << 10
cdef Py_ssize_t GATHER_PREFETCH_MIN_TABLE_BYTES = 8 << 20
# Optimizer steps walk the sorted unique rows and prefetch this many rows ahead.
cdef Py_ssize_t UPDATE_PREFETCH_ROWS = 32
# Gradient sums follow a chain of loads per unique row (order -> source -> grad row) that the
# CPU cannot run ahead on: they prefetch the source entry 2x and the grad row 1x this many
# unique rows ahead, so that each link of the chain is in cache when the sum reaches it.
cdef Py_ssize_t GRADIENT_PREFETCH_GROUPS = 16
# Within one unique row's positions (a frequent row has thousands), the grad row this many
# positions ahead is prefetched.
cdef Py_ssize_t GRADIENT_PREFETCH_POSITIONS = 8
cdef enum:
    CACHE_LINE_BYTES = 64  # a compile-time constant, so the prefetch loops unroll
    RANGE_CHECK_CHUNK = 4096  # indices checked per chunk by first_out_of_range
    BAGS_PER_CHUNK = 64  # bags reduced per prange iteration by bag_reduce


# --------------------------------------------------------------------------------------------
# Build and runtime information
# --------------------------------------------------------------------------------------------

def has_openmp():
    """True when this module was compiled with OpenMP (parallel kernels)."""
    return bool(FASTEMB_HAVE_OPENMP)


def openmp_max_threads():
    """``omp_get_max_threads()``: OMP_NUM_THREADS, the CPU count, or a threadpoolctl limit."""
    return omp_get_max_threads()


def cpu_has_avx2():
    """True when the CPU running this process has AVX2 (so _core_avx2 may be used)."""
    return bool(fastemb_cpu_has_avx2())


def compile_flags():
    """The C compiler flags this module was built with."""
    return FASTEMB_COMPILE_FLAGS.decode()


# --------------------------------------------------------------------------------------------
# Small helpers shared by the kernels
# --------------------------------------------------------------------------------------------

cdef inline void prefetch_row(const floating *row, Py_ssize_t dim, bint for_write=False,
                              bint lines_aligned=False) noexcept nogil:
    """Ask the CPU to start loading every cache line of one table row (to read or update)."""
    cdef Py_ssize_t line_elements = CACHE_LINE_BYTES // sizeof(floating)
    cdef Py_ssize_t j = 0
    # the loop covers the lines of row[0], row[line_elements], ...: as many lines as the row
    # has bytes, rounded up, which leave `slack` bytes spare after the row if it starts a line
    cdef Py_ssize_t row_bytes = dim * sizeof(floating)
    cdef Py_ssize_t lines = (row_bytes + CACHE_LINE_BYTES - 1) // CACHE_LINE_BYTES
    cdef Py_ssize_t slack = lines * CACHE_LINE_BYTES - row_bytes
    while j < dim:
        if for_write:
            FASTEMB_PREFETCH_WRITE(row + j)
        else:
            FASTEMB_PREFETCH(row + j)
        j += line_elements
    # a row that starts further into its line than that spans one line more; lines_aligned
    # says that none does (row and row size on cache lines; a literal True at an inlined call
    # site removes the test: a redundant prefetch per row cost a bag sum 2-8%)
    if not lines_aligned and <Py_ssize_t>(<uintptr_t>row % CACHE_LINE_BYTES) > slack:
        if for_write:
            FASTEMB_PREFETCH_WRITE(row + dim - 1)
        else:
            FASTEMB_PREFETCH(row + dim - 1)


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


cdef inline void prefetch_ahead(const floating *table, Py_ssize_t num_rows, Py_ssize_t dim,
                                const index_t *indices, Py_ssize_t n, Py_ssize_t position,
                                Py_ssize_t distance, Py_ssize_t column, Py_ssize_t width,
                                bint lines_aligned) noexcept nogil:
    """Prefetch columns [column, column + width) of the row ``indices[position + distance]``
    names. Without branches, as FBGEMM does: past the end it takes the current position, and an
    index that names no row prefetches row 0 (the table is not empty when this runs).
    ``lines_aligned``: every row's columns start on a cache line (see prefetch_row)."""
    cdef Py_ssize_t ahead = position + distance
    cdef int64_t row
    if ahead >= n:
        ahead = position
    row = indices[ahead]
    if <uint64_t>row >= <uint64_t>num_rows:  # one compare for "not 0 <= row < num_rows"
        row = 0
    prefetch_row(table + row * dim + column, width, False, lines_aligned)


cdef inline int team_size(int num_threads) noexcept nogil:
    """The OpenMP team a kernel asks for: num_threads, at least 1 (OpenMP reads 0 as "the
    default team" and aborts on a negative count)."""
    return num_threads if num_threads > 0 else 1


# What a bag reduces to, and which update an optimizer step applies. The public API names them
# with strings ("sum", "adam"); the Python layer maps those to these once.
cpdef enum BagMode:
    BAG_SUM = 0
    BAG_MEAN = 1
    BAG_MAX = 2

cpdef enum StepMethod:
    STEP_SGD = 0
    STEP_ADAGRAD = 1
    STEP_ROWWISE_ADAGRAD = 2
    STEP_ADAM = 3


cdef int check_enum(int value, int last, str what) except -1:
    """ValueError unless 0 <= value <= last (an enum argument may arrive as any int)."""
    if not 0 <= value <= last:
        raise ValueError(f"unknown {what} {value}; expected 0 to {last}")
    return 0


cdef inline Py_ssize_t clamp(int64_t value, Py_ssize_t low, Py_ssize_t high) noexcept nogil:
    if value < low:
        return low
    if value > high:
        return high
    return <Py_ssize_t>value


# --------------------------------------------------------------------------------------------
# Validation helper
# --------------------------------------------------------------------------------------------

cdef inline Py_ssize_t count_out_of_range(const index_t *indices, Py_ssize_t start,
                                          Py_ssize_t end, uint64_t limit) noexcept nogil:
    """How many of indices[start:end] lie outside [0, limit): one unsigned compare each
    (negative ones wrap to huge), branch-free, so the compiler vectorises it."""
    cdef Py_ssize_t i, count = 0
    for i in range(start, end):
        count = count + (<uint64_t>indices[i] >= limit)
    return count


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

def gather_rows(const floating[:, ::1] weight, const index_t[::1] indices,
                floating[:, ::1] out, int num_threads):
    """Copy ``weight[indices[i]]`` into ``out[i]`` for every i (a row of zeros if out of range).
    Returns how many indices were out of range: the caller, whose output this is, can skip a
    separate validation pass and raise only when it is not 0.

    ``out`` should come from ``np.empty``: each thread then touches its own output pages first.
    """
    cdef Py_ssize_t n = indices.shape[0], num_rows = weight.shape[0], dim = weight.shape[1]
    cdef Py_ssize_t out_of_range = 0
    cdef Py_ssize_t i, distance = prefetch_distance(num_rows, dim, sizeof(floating),
                                                    GATHER_PREFETCH_MIN_TABLE_BYTES)
    cdef int64_t row
    cdef bint lines_aligned
    if out.shape[0] != n or out.shape[1] != dim:
        raise ValueError("gather_rows: out must have shape (len(indices), weight.shape[1])")
    if n == 0:
        return 0
    if dim == 0:  # nothing to copy, but the indices are still checked
        return count_out_of_range(&indices[0], 0, n, num_rows)
    lines_aligned = num_rows > 0 and rows_on_lines(&weight[0, 0], dim * sizeof(floating))
    with nogil:
        for i in prange(n, schedule="static", num_threads=team_size(num_threads)):
            if distance:
                prefetch_ahead(&weight[0, 0], num_rows, dim, &indices[0], n, i, distance, 0, dim,
                               lines_aligned)
            row = indices[i]
            if 0 <= row < num_rows:
                memcpy(&out[i, 0], &weight[row, 0], dim * sizeof(floating))
            else:
                memset(&out[i, 0], 0, dim * sizeof(floating))
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

cdef extern from *:
    """
    #ifdef __AVX2__
    #define FASTEMB_BLOCK_BYTES 512  /* 16 ymm registers */
    #else
    #define FASTEMB_BLOCK_BYTES 256  /* 16 xmm registers */
    #endif
    #define FASTEMB_MAX_BLOCK_ELEMENTS (FASTEMB_BLOCK_BYTES / 4)
    /* Zero bits, never written. Not static const: the compiler must not know its contents, so
       that "add a block of it" stays a memory operand of the adds (each entry only picks the
       address to add from) instead of becoming a separate path that adds zeroed registers. */
    #if defined(__GNUC__)
    __attribute__((visibility("hidden")))
    #endif
    double fastemb_zero_block[FASTEMB_BLOCK_BYTES / sizeof(double)];

    /* The narrow blocks' loops, whole vectors at a time and fully unrolled: the running values
       become one vector variable each, which the compiler keeps in registers from the zeroing
       to the store (a plain loop leaves them in a stack array that is zeroed and copied out
       for every bag, and gcc's own vectorisation of unrolled scalars is fragile). The width is
       a multiple of the vector. Vector arithmetic is element by element: the same roundings. */
    #if defined(__GNUC__) || defined(__clang__)
    #ifdef __AVX__
    #define FASTEMB_VECTOR_BYTES 32
    #else
    #define FASTEMB_VECTOR_BYTES 16
    #endif
    #if defined(__clang__)
    #define FASTEMB_UNROLLED _Pragma("unroll")
    #else
    #define FASTEMB_UNROLLED _Pragma("GCC unroll 64")
    #endif
    #define FASTEMB_LANES(T) (FASTEMB_VECTOR_BYTES / sizeof(T))
    #define FASTEMB_UNROLLED_BLOCK_LOOPS(T) \
        typedef T fastemb_vector_##T __attribute__((vector_size(FASTEMB_VECTOR_BYTES), \
                                                    aligned(sizeof(T)), may_alias)); \
        static inline void fastemb_zero_##T(T *acc, Py_ssize_t width) { \
            FASTEMB_UNROLLED for (Py_ssize_t j = 0; j < width; j += FASTEMB_LANES(T)) \
                *(fastemb_vector_##T *)(acc + j) = (fastemb_vector_##T){0}; } \
        static inline void fastemb_add_##T(T *acc, const T *source, Py_ssize_t width) { \
            FASTEMB_UNROLLED for (Py_ssize_t j = 0; j < width; j += FASTEMB_LANES(T)) \
                *(fastemb_vector_##T *)(acc + j) += *(const fastemb_vector_##T *)(source + j); } \
        static inline void fastemb_add_scaled_##T(T *acc, T weight, const T *source, \
                                                  Py_ssize_t width) { \
            FASTEMB_UNROLLED for (Py_ssize_t j = 0; j < width; j += FASTEMB_LANES(T)) \
                *(fastemb_vector_##T *)(acc + j) += \
                    weight * *(const fastemb_vector_##T *)(source + j); } \
        static inline void fastemb_store_##T(T *out, const T *acc, Py_ssize_t width) { \
            FASTEMB_UNROLLED for (Py_ssize_t j = 0; j < width; j += FASTEMB_LANES(T)) \
                *(fastemb_vector_##T *)(out + j) = *(const fastemb_vector_##T *)(acc + j); }
    #else  /* no vector extension: plain loops */
    #define FASTEMB_UNROLLED_BLOCK_LOOPS(T) \
        static inline void fastemb_zero_##T(T *acc, Py_ssize_t width) { \
            for (Py_ssize_t j = 0; j < width; j++) acc[j] = 0; } \
        static inline void fastemb_add_##T(T *acc, const T *source, Py_ssize_t width) { \
            for (Py_ssize_t j = 0; j < width; j++) acc[j] += source[j]; } \
        static inline void fastemb_add_scaled_##T(T *acc, T weight, const T *source, \
                                                  Py_ssize_t width) { \
            for (Py_ssize_t j = 0; j < width; j++) acc[j] += weight * source[j]; } \
        static inline void fastemb_store_##T(T *out, const T *acc, Py_ssize_t width) { \
            for (Py_ssize_t j = 0; j < width; j++) out[j] = acc[j]; }
    #endif
    FASTEMB_UNROLLED_BLOCK_LOOPS(float)
    FASTEMB_UNROLLED_BLOCK_LOOPS(double)
    """
    # Columns are reduced in blocks of this many bytes whose running values the compiler keeps
    # in vector registers for the whole bag (all 16 of them); the block width is a compile-time
    # constant, so the loops over a block unroll. A row wider than a block is reduced in
    # several passes over the bag, each prefetching its own columns of the rows ahead. What is left
    # after the wide blocks goes in narrow blocks of 256, 128, 64 and 32 bytes (at most one of
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

# The block kernels are specialised on the block's width through a type tag (a NULL pointer of
# one of these types), so each width is a compile-time constant in its own C function whatever
# the compiler's inlining and cloning heuristics decide (left to them, gcc 12 compiled the
# narrow block as the generic one, with its accumulators in memory). Every common row width
# (8, 16, 32, 48, 64 float32 columns) has blocks that keep their sums in registers.
cdef struct WideColumns:
    char bytes[BLOCK_BYTES]

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


cdef inline void add_block(floating *acc, floating weight, const floating *source,
                           Py_ssize_t width, bint weighted, bint unrolled) noexcept nogil:
    """acc[:width] += source[:width] (times weight if weighted)."""
    cdef Py_ssize_t j
    if unrolled and not weighted:
        if floating is float:
            add_floats(acc, source, width)
        else:
            add_doubles(acc, source, width)
    elif unrolled:
        if floating is float:
            add_scaled_floats(acc, weight, source, width)
        else:
            add_scaled_doubles(acc, weight, source, width)
    elif not weighted:
        for j in range(width):
            acc[j] += source[j]
    else:
        for j in range(width):
            acc[j] += weight * source[j]


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


cdef inline bint is_kept(int64_t row, int64_t padding_idx, Py_ssize_t num_rows) noexcept nogil:
    """True for an entry a bag reduces: a row of the table that is not padding."""
    return <uint64_t>row < <uint64_t>num_rows and row != padding_idx


cdef inline void add_entry(floating *acc, const floating *table, Py_ssize_t num_rows,
                           Py_ssize_t dim, int64_t row, const floating *sample_weights,
                           Py_ssize_t k, int64_t padding_idx, Py_ssize_t column,
                           Py_ssize_t width, bint weighted, bint unrolled) noexcept nogil:
    """Add bag entry k (row ``row``) to a block's running sums. A skipped entry adds a block of
    +0 (weight 1), which changes no sum: a sum that starts at +0 is never -0. The adds then run
    for every entry, so the compiler keeps acc in registers (a conditional update makes gcc
    track, per register, whether to store it)."""
    cdef const floating *source = <const floating *>ZERO_BLOCK
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


cdef inline void bag_extent(const int64_t *bounds, Py_ssize_t b, Py_ssize_t n,
                            Py_ssize_t *start, Py_ssize_t *end) noexcept nogil:
    """Bag b's positions [start, end): its bounds clamped into [0, n], with end >= start."""
    start[0] = clamp(bounds[b], 0, n)
    end[0] = clamp(bounds[b + 1], start[0], n)


cdef inline void sum_block(reduction_t *reduction, const floating *table, Py_ssize_t num_rows,
                           Py_ssize_t dim, const index_t *indices, Py_ssize_t n,
                           const int64_t *bounds, Py_ssize_t first_bag, Py_ssize_t end_bag,
                           const floating *sample_weights, int64_t padding_idx,
                           Py_ssize_t column, columns_t *columns, Py_ssize_t any_width,
                           floating *out, Py_ssize_t distance, bint lines_aligned) noexcept nogil:
    """out[b, column:column+width] = the sum of bag b's kept rows' columns (times their
    weights, for a WeightedSumReduction), for the bags b in [first_bag, end_bag). With
    distance > 0 it prefetches the same columns of the row ``distance`` positions ahead."""
    cdef Py_ssize_t width = block_width(columns, any_width, sizeof(floating))
    cdef bint unrolled = not (columns_t is WideColumns or columns_t is AnyColumns)
    cdef bint weighted = reduction_t is WeightedSumReduction
    cdef floating acc[MAX_BLOCK_ELEMENTS]
    cdef Py_ssize_t b, k, start, end
    for b in range(first_bag, end_bag):
        bag_extent(bounds, b, n, &start, &end)
        zero_block(acc, width, unrolled)
        # three loops rather than tests per entry
        if distance and lines_aligned:
            for k in range(start, end):
                prefetch_ahead(table, num_rows, dim, indices, n, k, distance, column, width,
                               True)
                add_entry(acc, table, num_rows, dim, indices[k], sample_weights, k,
                          padding_idx, column, width, weighted, unrolled)
        elif distance:
            for k in range(start, end):
                prefetch_ahead(table, num_rows, dim, indices, n, k, distance, column, width,
                               False)
                add_entry(acc, table, num_rows, dim, indices[k], sample_weights, k,
                          padding_idx, column, width, weighted, unrolled)
        else:
            for k in range(start, end):
                add_entry(acc, table, num_rows, dim, indices[k], sample_weights, k,
                          padding_idx, column, width, weighted, unrolled)
        store_block(out + b * dim + column, acc, width, unrolled)


cdef inline void max_block(const floating *table, Py_ssize_t num_rows, Py_ssize_t dim,
                           const index_t *indices, Py_ssize_t n, const int64_t *bounds,
                           Py_ssize_t first_bag, Py_ssize_t end_bag, int64_t padding_idx,
                           Py_ssize_t column, columns_t *columns, Py_ssize_t any_width,
                           floating *out, int64_t *winners, Py_ssize_t distance,
                           bint lines_aligned) noexcept nogil:
    """out[b, column:column+width] = those columns' max over bag b's kept rows (first wins
    ties), for the bags b in [first_bag, end_bag); winners (unless NULL) gets the winning rows.
    No kept row: zeros and -1."""
    cdef Py_ssize_t width = block_width(columns, any_width, sizeof(floating))
    cdef floating acc[MAX_BLOCK_ELEMENTS]
    cdef int64_t winner[MAX_BLOCK_ELEMENTS]
    cdef const floating *source
    cdef floating *out_row
    cdef int64_t *winner_row
    cdef Py_ssize_t b, k, j, start, end
    cdef int64_t row
    for b in range(first_bag, end_bag):
        bag_extent(bounds, b, n, &start, &end)
        out_row = out + b * dim + column
        winner_row = winners + b * dim + column if winners != NULL else NULL
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
            acc[j] = source[j]
            winner[j] = row
        for k in range(k + 1, end):
            if distance:
                prefetch_ahead(table, num_rows, dim, indices, n, k, distance, column, width,
                               lines_aligned)
            row = indices[k]
            if not is_kept(row, padding_idx, num_rows):
                continue
            source = table + row * dim + column
            if winner_row == NULL:
                for j in range(width):
                    acc[j] = source[j] if source[j] > acc[j] else acc[j]
            else:
                for j in range(width):
                    if source[j] > acc[j]:
                        acc[j] = source[j]
                        winner[j] = row
        for j in range(width):
            out_row[j] = acc[j]
            if winner_row != NULL:
                winner_row[j] = winner[j]


cdef inline void reduce_block(reduction_t *reduction, const floating *table,
                              Py_ssize_t num_rows, Py_ssize_t dim, const index_t *indices,
                              Py_ssize_t n, const int64_t *bounds, Py_ssize_t first_bag,
                              Py_ssize_t end_bag, const floating *sample_weights,
                              int64_t padding_idx, Py_ssize_t column, columns_t *columns,
                              Py_ssize_t any_width, floating *out, int64_t *winners,
                              Py_ssize_t distance, bint lines_aligned) noexcept nogil:
    """One block of columns of bags [first_bag, end_bag): sum_block or max_block."""
    if reduction_t is MaxReduction:
        max_block(table, num_rows, dim, indices, n, bounds, first_bag, end_bag, padding_idx,
                  column, columns, any_width, out, winners, distance, lines_aligned)
    else:
        sum_block(reduction, table, num_rows, dim, indices, n, bounds, first_bag, end_bag,
                  sample_weights, padding_idx, column, columns, any_width, out, distance,
                  lines_aligned)


cdef inline Py_ssize_t reduce_block_if_it_fits(
        reduction_t *reduction, const floating *table, Py_ssize_t num_rows, Py_ssize_t dim,
        const index_t *indices, Py_ssize_t n, const int64_t *bounds, Py_ssize_t first_bag,
        Py_ssize_t end_bag, const floating *sample_weights, int64_t padding_idx,
        Py_ssize_t column, columns_t *columns, floating *out, int64_t *winners,
        Py_ssize_t distance, bint lines_aligned) noexcept nogil:
    """reduce_block on a block of this (compile-time) width at ``column``, if the row has that
    many columns left; returns the column after the block (``column`` when it did not fit)."""
    cdef Py_ssize_t width = sizeof(columns_t) // sizeof(floating)
    if dim - column < width:
        return column
    reduce_block(reduction, table, num_rows, dim, indices, n, bounds, first_bag, end_bag,
                 sample_weights, padding_idx, column, columns, 0, out, winners, distance,
                 lines_aligned)
    return column + width


cdef inline void reduce_columns(reduction_t *reduction, const floating *table,
                                Py_ssize_t num_rows, Py_ssize_t dim, const index_t *indices,
                                Py_ssize_t n, const int64_t *bounds, Py_ssize_t first_bag,
                                Py_ssize_t end_bag, const floating *sample_weights,
                                int64_t padding_idx, floating *out, int64_t *winners,
                                Py_ssize_t distance, bint lines_aligned) noexcept nogil:
    """Bags [first_bag, end_bag), block by block over the columns: wide blocks, then at most
    one narrow block of each width, all of compile-time width, then the rest."""
    cdef Py_ssize_t column = 0, wide = BLOCK_BYTES // sizeof(floating)
    while dim - column >= wide:
        column = reduce_block_if_it_fits(reduction, table, num_rows, dim, indices, n, bounds,
                                         first_bag, end_bag, sample_weights, padding_idx,
                                         column, <WideColumns *>NULL, out, winners, distance,
                                         lines_aligned)
    column = reduce_block_if_it_fits(reduction, table, num_rows, dim, indices, n, bounds,
                                     first_bag, end_bag, sample_weights, padding_idx, column,
                                     <Columns256 *>NULL, out, winners, distance, lines_aligned)
    column = reduce_block_if_it_fits(reduction, table, num_rows, dim, indices, n, bounds,
                                     first_bag, end_bag, sample_weights, padding_idx, column,
                                     <Columns128 *>NULL, out, winners, distance, lines_aligned)
    column = reduce_block_if_it_fits(reduction, table, num_rows, dim, indices, n, bounds,
                                     first_bag, end_bag, sample_weights, padding_idx, column,
                                     <Columns64 *>NULL, out, winners, distance, lines_aligned)
    column = reduce_block_if_it_fits(reduction, table, num_rows, dim, indices, n, bounds,
                                     first_bag, end_bag, sample_weights, padding_idx, column,
                                     <Columns32 *>NULL, out, winners, distance, lines_aligned)
    if column < dim:
        reduce_block(reduction, table, num_rows, dim, indices, n, bounds, first_bag, end_bag,
                     sample_weights, padding_idx, column, <AnyColumns *>NULL, dim - column, out,
                     winners, distance, lines_aligned)


cdef inline bint is_one_block(Py_ssize_t row_bytes) noexcept nogil:
    """True when reduce_columns reduces a row of this many bytes in a single block."""
    return (row_bytes == BLOCK_BYTES or row_bytes == 256 or row_bytes == 128 or row_bytes == 64
            or row_bytes <= 32)


cdef inline void reduce_bags(reduction_t *reduction, const floating *table,
                             Py_ssize_t num_rows, Py_ssize_t dim, const index_t *indices,
                             Py_ssize_t n, const int64_t *bounds, Py_ssize_t first_bag,
                             Py_ssize_t end_bag, const floating *sample_weights,
                             int64_t padding_idx, floating *out, int64_t *winners,
                             Py_ssize_t distance, bint lines_aligned) noexcept nogil:
    """The sums (weighted for a WeightedSumReduction) or maxima of bags [first_bag, end_bag).
    A row of one block of columns is reduced for all these bags in one call, the bag loop
    inside the block's loop function (a call per bag cost about 5% of a bag sum of 32 rows);
    a row of several blocks bag by bag, so that its blocks read their lines of a row close
    together."""
    cdef Py_ssize_t b
    if is_one_block(dim * sizeof(floating)):
        reduce_columns(reduction, table, num_rows, dim, indices, n, bounds, first_bag, end_bag,
                       sample_weights, padding_idx, out, winners, distance, lines_aligned)
    else:
        for b in range(first_bag, end_bag):
            reduce_columns(reduction, table, num_rows, dim, indices, n, bounds, b, b + 1,
                           sample_weights, padding_idx, out, winners, distance, lines_aligned)


cdef inline void divide_by_bag_sizes(Py_ssize_t num_rows, Py_ssize_t dim, const index_t *indices,
                                     Py_ssize_t n, const int64_t *bounds, Py_ssize_t first_bag,
                                     Py_ssize_t end_bag, const floating *sample_weights,
                                     int64_t padding_idx, floating *out) noexcept nogil:
    """Mean: divide each bag's sum by its kept entries' count (weighted: their weights' sum),
    for the bags in [first_bag, end_bag)."""
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
            out[b * dim + j] = out[b * dim + j] / divisor if divisor != 0 else 0


def bag_reduce(const floating[:, ::1] weight, const index_t[::1] indices,
               const int64_t[::1] bounds, BagMode mode, const floating[::1] sample_weights,
               int64_t padding_idx, floating[:, ::1] out, int64_t[:, ::1] winners,
               int num_threads):
    """Reduce each bag ``indices[bounds[b]:bounds[b+1]]`` of table rows into ``out[b]``.

    ``mode`` is a BagMode (sum, mean or max); ``sample_weights`` (same length as indices, or None)
    weights sum and mean; ``padding_idx`` (-1 for none) marks entries to skip; ``winners``
    (shape of out, int64) receives the winning rows in max mode and may be None otherwise.

    Returns how many indices of the bags were outside ``[0, V)`` (they were skipped, like
    padding): each chunk of bags counts its indices right after reducing them, while they are
    still in the core's cache, so the caller, whose output this is, needs no validation pass
    before the call and raises only when the count is not 0. Indices in no bag count too.
    """
    check_enum(mode, BAG_MAX, "bag mode")
    cdef Py_ssize_t n = indices.shape[0], num_rows = weight.shape[0], dim = weight.shape[1]
    cdef Py_ssize_t num_bags = bounds.shape[0] - 1
    cdef Py_ssize_t num_chunks = (num_bags + BAGS_PER_CHUNK - 1) // BAGS_PER_CHUNK
    cdef Py_ssize_t chunk, first, last, out_of_range = 0, num_indices = n
    cdef const floating *table
    cdef const index_t *index_data
    cdef const floating *weights_data = NULL
    cdef floating *out_data
    cdef int64_t *winner_data = NULL
    cdef Py_ssize_t distance = prefetch_distance(num_rows, dim, sizeof(floating),
                                                 BAG_PREFETCH_MIN_TABLE_BYTES)
    cdef bint lines_aligned  # (every block of columns starts a multiple of 256 bytes in)
    if num_bags < 0 or out.shape[0] != num_bags or out.shape[1] != dim:
        raise ValueError("bag_reduce: out must have shape (len(bounds) - 1, weight.shape[1])")
    if sample_weights is not None:
        if sample_weights.shape[0] != n:
            raise ValueError("bag_reduce: sample_weights must have one entry per index")
        if n > 0:
            weights_data = &sample_weights[0]
    if winners is not None:
        if mode != BAG_MAX or winners.shape[0] != num_bags or winners.shape[1] != dim:
            raise ValueError("bag_reduce: winners (max mode only) must have the shape of out")
        if num_bags and dim:
            winner_data = &winners[0, 0]
    if num_bags == 0 or dim == 0:  # nothing to reduce, but the indices are still checked
        return count_out_of_range(&indices[0], 0, n, num_rows) if n else 0
    out_data = &out[0, 0]
    # With no indices or an empty table every bag is empty (n = 0 clamps every bag to [0, 0]);
    # the kernels then read neither.
    table = &weight[0, 0] if num_rows > 0 else NULL
    index_data = &indices[0] if n > 0 else NULL
    if table == NULL:
        n = 0
    lines_aligned = rows_on_lines(table, dim * sizeof(floating))
    with nogil:
        # Chunks go to whichever thread is free: on a shared machine one core can run slower
        # than the other for a while, and a static split then waits for it.
        for chunk in prange(num_chunks, schedule="dynamic", num_threads=team_size(num_threads)):
            first = chunk * BAGS_PER_CHUNK
            last = min(first + BAGS_PER_CHUNK, num_bags)
            if mode == BAG_MAX:
                reduce_bags(<MaxReduction *>NULL, table, num_rows, dim, index_data, n,
                            &bounds[0], first, last, NULL, padding_idx, out_data, winner_data,
                            distance, lines_aligned)
            elif weights_data == NULL:
                reduce_bags(<SumReduction *>NULL, table, num_rows, dim, index_data, n,
                            &bounds[0], first, last, NULL, padding_idx, out_data, NULL,
                            distance, lines_aligned)
            else:
                reduce_bags(<WeightedSumReduction *>NULL, table, num_rows, dim, index_data, n,
                            &bounds[0], first, last, weights_data, padding_idx, out_data, NULL,
                            distance, lines_aligned)
            if mode == BAG_MEAN:
                divide_by_bag_sizes(num_rows, dim, index_data, n, &bounds[0], first, last,
                                    weights_data, padding_idx, out_data)
            if num_indices:
                out_of_range += count_out_of_range(  # (an OpenMP reduction)
                    &indices[0], clamp(bounds[first], 0, num_indices),
                    clamp(bounds[last], 0, num_indices), num_rows)
    if num_indices:  # indices before the first bag or after the last (none, with offsets
        # that start at 0 and a last bag that runs to the end)
        out_of_range += count_out_of_range(&indices[0], 0, clamp(bounds[0], 0, num_indices),
                                           num_rows)
        out_of_range += count_out_of_range(
            &indices[0], clamp(bounds[num_bags], 0, num_indices), num_indices, num_rows)
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
    bint scale_by_frequency


cdef int check_plan(str kernel, const floating[:, ::1] grad, Py_ssize_t num_groups,
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
    view.starts = &starts[0]
    view.order = &order[0] if order.shape[0] else NULL
    view.source = &source[0] if source is not None and num_positions else NULL
    view.coefficients = &coefficients[0] if coefficients is not None and num_positions else NULL
    view.winners = &winners[0, 0] if winners is not None and winners.size else NULL
    view.num_positions = num_positions
    view.grad_rows = grad.shape[0]
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
        prefetch_row(grad + grad_row * dim, dim)


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
        grad_source = grad + grad_row * dim
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
    return grad + grad_row * dim if grad_row >= 0 else NULL


def accumulate_rows(const floating[:, ::1] grad, const int64_t[::1] rows not None,
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


cdef void update_row(StepMethod method, floating *w, floating *state_a, floating *state_b,
                     const floating *g, Py_ssize_t dim, floating lr, floating one_minus_beta1,
                     floating one_minus_beta2, floating eps) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating m, v, denominator
    cdef double mean_square = 0
    if method == STEP_SGD:
        for j in range(dim):
            w[j] = w[j] + lr * g[j]
    elif method == STEP_ADAGRAD:
        for j in range(dim):
            state_a[j] = state_a[j] + g[j] * g[j]
            w[j] = w[j] + lr * (g[j] / (square_root(state_a[j]) + eps))
    elif method == STEP_ROWWISE_ADAGRAD:
        for j in range(dim):
            mean_square = mean_square + <double>g[j] * g[j]
        state_a[0] = state_a[0] + <floating>(mean_square / dim)
        denominator = square_root(state_a[0]) + eps
        for j in range(dim):
            w[j] = w[j] - lr * (g[j] / denominator)
    else:
        for j in range(dim):
            m = state_a[j] + (g[j] - state_a[j]) * one_minus_beta1
            v = state_b[j] + (g[j] * g[j] - state_b[j]) * one_minus_beta2
            state_a[j] = m
            state_b[j] = v
            w[j] = w[j] + lr * (m / (square_root(v) + eps))


def sparse_step(StepMethod method, floating[:, ::1] weight not None, floating[:, ::1] state_a,
                floating[:, ::1] state_b, const int64_t[::1] rows not None, plan, double lr,
                double one_minus_beta1, double one_minus_beta2, double eps, bint maximize,
                double weight_decay, int num_threads):
    """Apply one optimizer step to the rows of a gradient given by ``plan`` (a GradientPlan).

    ``method`` is a StepMethod; ``lr`` is the signed factor of the formula above (-lr, -clr, lr or -step_size); state_a /
    state_b are the per-row state (None where the method has none; row-wise Adagrad's
    accumulator is (V, 1)); ``weight_decay`` is the L2 factor (0: none).
    """
    check_enum(method, STEP_ADAM, "optimizer step method")
    cdef Py_ssize_t num_groups = rows.shape[0], dim = weight.shape[1]
    cdef Py_ssize_t num_rows = weight.shape[0], u, j
    cdef const floating[:, ::1] grad = plan.grad
    cdef const floating[::1] coefficients = plan.coefficients
    cdef const int64_t[::1] starts = plan.starts, order = plan.order, source = plan.source
    cdef const int64_t[:, ::1] winners = plan.winners
    cdef bint scale_by_frequency = plan.scale_by_frequency
    cdef PlanView view
    cdef floating *state_a_row
    cdef floating *state_b_row
    cdef floating *buffer
    cdef const floating *g
    cdef int64_t row, ahead
    cdef bint direct
    cdef floating decay = <floating>weight_decay
    cdef floating *w
    cdef Py_ssize_t state_a_width = 0 if state_a is None else state_a.shape[1]
    # one gradient-row buffer per thread (threadid() < num_threads), each followed by a cache
    # line that nobody writes, so no two threads ever write the same line (the false sharing
    # made the 2-thread SGD step as slow as the 1-thread one)
    cdef floating[:, ::1] buffers = np.empty(
        (team_size(num_threads), dim + CACHE_LINE_BYTES // sizeof(floating)),
        dtype=np.asarray(weight).dtype)
    check_plan("sparse_step", grad, num_groups, starts, order, source, coefficients, winners,
               scale_by_frequency, &view)
    if grad.shape[1] != dim:
        raise ValueError("sparse_step: the gradient does not match the table")
    if (state_a is not None and state_a.shape[0] != num_rows) or (
            state_b is not None and state_b.shape[0] != num_rows):
        raise ValueError("sparse_step: optimizer state does not match the table")
    if (method == STEP_ADAGRAD or method == STEP_ADAM) and (
            state_a is None or state_a_width != dim):
        raise ValueError("sparse_step: this method needs (V, D) state")
    if method == STEP_ADAM and (state_b is None or state_b.shape[1] != dim):
        raise ValueError("sparse_step: Adam needs two (V, D) states")
    if method == STEP_ROWWISE_ADAGRAD and (state_a is None or state_a_width != 1):
        raise ValueError("sparse_step: row-wise Adagrad needs (V, 1) state")
    if num_groups == 0 or dim == 0 or grad.shape[0] == 0:
        return
    direct = (not maximize and decay == 0 and view.coefficients == NULL
              and not view.scale_by_frequency and view.winners == NULL)
    with nogil:
        # dynamic: a frequent row's sum has thousands of positions, a static split would
        # leave the other threads waiting
        for u in prange(num_groups, schedule="dynamic", chunksize=256,
                        num_threads=team_size(num_threads)):
            if u + UPDATE_PREFETCH_ROWS < num_groups:
                ahead = rows[u + UPDATE_PREFETCH_ROWS]
                if 0 <= ahead < num_rows:
                    prefetch_row(&weight[ahead, 0], dim, True)
                    if state_a_width:
                        prefetch_row(&state_a[ahead, 0], state_a_width, True)
                    if method == STEP_ADAM:
                        prefetch_row(&state_b[ahead, 0], dim, True)
            prefetch_group_gradient(&grad[0, 0], dim, &view, u, num_groups)
            row = rows[u]
            if row < 0 or row >= num_rows:
                continue
            # a row looked up once (most rows of a uniform batch) reads its grad row in place
            g = single_gradient_row(&grad[0, 0], dim, &view, u) if direct else NULL
            w = &weight[row, 0]
            if g == NULL:
                buffer = &buffers[threadid(), 0]
                accumulate_one_row(&grad[0, 0], dim, row, &view, u, buffer)
                if maximize:
                    for j in range(dim):
                        buffer[j] = -buffer[j]
                if decay != 0:
                    for j in range(dim):
                        buffer[j] = buffer[j] + decay * w[j]
                g = buffer
            state_a_row = &state_a[row, 0] if state_a_width else NULL
            state_b_row = &state_b[row, 0] if method == STEP_ADAM else NULL
            update_row(method, w, state_a_row, state_b_row, g, dim,
                       <floating>lr, <floating>one_minus_beta1, <floating>one_minus_beta2,
                       <floating>eps)


# --------------------------------------------------------------------------------------------
# A NumPy allocator that keeps freed blocks for reuse (numpy's PyDataMem_Handler API).
# A training step allocates a handful of 1 MB-sized per-call arrays (the sort buffers, the
# gradient plan); glibc hands such memory back to the OS when they are freed, and faulting it in
# again on the next step costs thousands of page faults per step. The Python layer installs this allocator, for the current context only, around the
# calls that make those arrays; an array remembers its allocator, so when it is freed, whenever
# that is, its block comes back here. Freed blocks of BLOCK_CACHE_MIN_BYTES to
# BLOCK_CACHE_MAX_BYTES are kept, up to BLOCK_CACHE_SLOTS blocks and BLOCK_CACHE_MAX_BYTES in
# all, the oldest going back to libc to make room; a request takes the smallest kept block that
# holds it without wasting more than half of it.
# Every block starts with a BLOCK_HEADER_BYTES header that records its capacity.
# Like NumPy's own allocator, it asks Linux for huge pages on blocks of 4 MB and more: without
# that advice a fresh large output faults in 4 KB pages, one fault per page, where np.empty's
# pages come 2 MB at a time.
# --------------------------------------------------------------------------------------------

cdef extern from *:
    """
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    /* madvise(MADV_HUGEPAGE) on the whole 4 KB pages of [start, start + size) when the range
       is 4 MB or more (NumPy's rule and threshold). Only advice: errors are ignored. */
    static void fastemb_advise_huge_pages(void *start, size_t size) {
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        const uintptr_t page = 4096;
        uintptr_t first = ((uintptr_t)start + page - 1) & ~(page - 1);
        uintptr_t end = ((uintptr_t)start + size) & ~(page - 1);
        if (size >= ((size_t)1 << 22) && end > first)
            (void)madvise((void *)first, end - first, MADV_HUGEPAGE);
    #else
        (void)start; (void)size;
    #endif
    }
    """
    void advise_huge_pages "fastemb_advise_huge_pages"(void *start, size_t size) noexcept nogil

from cpython.pycapsule cimport PyCapsule_New
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock,
                               PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK)
from libc.stdint cimport uint8_t
from libc.stdlib cimport malloc, calloc, realloc, free

cdef extern from "numpy/arrayobject.h":
    ctypedef struct PyDataMemAllocator:
        void *ctx
        void *(*malloc)(void *ctx, size_t size) noexcept nogil
        void *(*calloc)(void *ctx, size_t nelem, size_t elsize) noexcept nogil
        void *(*realloc)(void *ctx, void *ptr, size_t new_size) noexcept nogil
        void (*free)(void *ctx, void *ptr, size_t size) noexcept nogil
    ctypedef struct PyDataMem_Handler:
        char name[127]
        uint8_t version
        PyDataMemAllocator allocator
    object PyDataMem_SetHandler(object handler)
    int _import_array() except -1

_import_array()

cdef enum:
    BLOCK_CACHE_SLOTS = 16
    BLOCK_HEADER_BYTES = 16  # keeps libc's 16-byte alignment for the data

cdef size_t BLOCK_CACHE_MIN_BYTES = 64 << 10
cdef size_t BLOCK_CACHE_MAX_BYTES = 64 << 20

cdef struct BlockCache:
    void *blocks[BLOCK_CACHE_SLOTS]  # block starts (headers, holding capacities), oldest first
    int count
    size_t bytes
    size_t reuses                      # requests served from the cache, for tests

cdef BlockCache block_cache
cdef PyThread_type_lock block_cache_lock = PyThread_allocate_lock()


cdef inline size_t *block_capacity(void *block) noexcept nogil:
    return <size_t *>block


cdef inline void *block_data(void *block) noexcept nogil:
    return <char *>block + BLOCK_HEADER_BYTES if block != NULL else NULL


cdef inline void *block_of(void *data) noexcept nogil:
    return <char *>data - BLOCK_HEADER_BYTES


cdef void *take_cached(int slot) noexcept nogil:
    """Remove kept block ``slot`` (the lock held), keeping the rest oldest first."""
    cdef void *block = block_cache.blocks[slot]
    cdef int k
    for k in range(slot + 1, block_cache.count):
        block_cache.blocks[k - 1] = block_cache.blocks[k]
    block_cache.count -= 1
    block_cache.bytes -= block_capacity(block)[0]
    return block


cdef void *cached_block(size_t size) noexcept nogil:
    """Remove and return the best kept block for ``size`` bytes, or NULL."""
    cdef int k, best = -1
    cdef size_t capacity, best_capacity = 0
    cdef void *block = NULL
    if size < BLOCK_CACHE_MIN_BYTES:
        return NULL
    PyThread_acquire_lock(block_cache_lock, WAIT_LOCK)
    for k in range(block_cache.count):
        capacity = block_capacity(block_cache.blocks[k])[0]
        if size <= capacity <= 2 * size and (best < 0 or capacity < best_capacity):
            best, best_capacity = k, capacity
    if best >= 0:
        block = take_cached(best)
        block_cache.reuses += 1
    PyThread_release_lock(block_cache_lock)
    return block


cdef void *new_block(size_t size, bint zeroed) noexcept nogil:
    cdef void *block
    if size > <size_t>-1 - BLOCK_HEADER_BYTES:
        return NULL
    block = calloc(1, BLOCK_HEADER_BYTES + size) if zeroed else malloc(BLOCK_HEADER_BYTES + size)
    if block != NULL:
        block_capacity(block)[0] = size
        advise_huge_pages(block_data(block), size)
    return block


cdef void *cache_malloc(void *context, size_t size) noexcept nogil:
    cdef void *block = cached_block(size)
    if block == NULL:
        block = new_block(size, False)
    return block_data(block)


cdef void *cache_calloc(void *context, size_t count, size_t item_size) noexcept nogil:
    cdef size_t size
    cdef void *block
    if item_size and count > <size_t>-1 // item_size:
        return NULL
    size = count * item_size
    block = cached_block(size)
    if block != NULL:
        memset(block_data(block), 0, size)
        return block_data(block)
    return block_data(new_block(size, True))  # libc's calloc: fresh pages are zero already


cdef void *cache_realloc(void *context, void *data, size_t size) noexcept nogil:
    cdef void *block
    if data == NULL:
        return cache_malloc(context, size)
    block = block_of(data)
    if size <= block_capacity(block)[0]:
        return data
    if size > <size_t>-1 - BLOCK_HEADER_BYTES:
        return NULL
    block = realloc(block, BLOCK_HEADER_BYTES + size)
    if block == NULL:
        return NULL
    block_capacity(block)[0] = size
    advise_huge_pages(block_data(block), size)
    return block_data(block)


cdef void cache_free(void *context, void *data, size_t size) noexcept nogil:
    """Keep the block (evicting the oldest kept ones to make room), or free it if too small or
    too large to keep."""
    cdef void *block
    cdef void *evicted[BLOCK_CACHE_SLOTS]
    cdef size_t capacity
    cdef int k, num_evicted = 0
    if data == NULL:
        return
    block = block_of(data)
    capacity = block_capacity(block)[0]
    if capacity < BLOCK_CACHE_MIN_BYTES or capacity > BLOCK_CACHE_MAX_BYTES:
        free(block)
        return
    PyThread_acquire_lock(block_cache_lock, WAIT_LOCK)
    while (block_cache.count == BLOCK_CACHE_SLOTS
           or block_cache.bytes + capacity > BLOCK_CACHE_MAX_BYTES):
        evicted[num_evicted] = take_cached(0)
        num_evicted += 1
    block_cache.blocks[block_cache.count] = block
    block_cache.count += 1
    block_cache.bytes += capacity
    PyThread_release_lock(block_cache_lock)
    for k in range(num_evicted):
        free(evicted[k])


cdef PyDataMem_Handler block_cache_handler
memset(&block_cache_handler, 0, sizeof(block_cache_handler))
memcpy(block_cache_handler.name, b"fastemb_block_cache", 20)  # with its terminating NUL
block_cache_handler.version = 1
block_cache_handler.allocator.ctx = NULL
block_cache_handler.allocator.malloc = cache_malloc
block_cache_handler.allocator.calloc = cache_calloc
block_cache_handler.allocator.realloc = cache_realloc
block_cache_handler.allocator.free = cache_free
BLOCK_CACHE_HANDLER = PyCapsule_New(&block_cache_handler, "mem_handler", NULL)


def set_allocator(handler):
    """Make ``handler`` (a "mem_handler" capsule: BLOCK_CACHE_HANDLER, or what this returned)
    NumPy's allocator in the current context; returns the one it replaces."""
    return PyDataMem_SetHandler(handler)


def block_cache_state():
    """``(blocks kept, bytes kept, requests served from kept blocks so far)``."""
    return block_cache.count, block_cache.bytes, block_cache.reuses


def clear_block_cache():
    """Give every kept block back to libc."""
    cdef void *block
    while True:
        PyThread_acquire_lock(block_cache_lock, WAIT_LOCK)
        block = take_cached(0) if block_cache.count else NULL
        PyThread_release_lock(block_cache_lock)
        if block == NULL:
            return
        free(block)
