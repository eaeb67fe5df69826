/*
 * A plain C reference for the bag-sum forward, the yardstick fastemb's kernel is measured against
 * (benchmarks/test_forward.py). It does what a careful hand-written C loop would do:
 *
 *   - OpenMP `parallel for schedule(static)` over bags, so each thread owns a contiguous range;
 *   - the running sum of a 64-column block of the bag's rows lives in a local array that the
 *     compiler keeps in vector registers (the block width is a constant, so the loops over it are
 *     fully unrolled), and is stored once per bag;
 *   - the rows are added in bag order, starting from zero, so the result is bit for bit the
 *     sequential float sum (built with -ffp-contract=off, never -ffast-math);
 *   - the row named PREFETCH_DISTANCE indices ahead is prefetched, one prefetch per 64-byte cache
 *     line it spans (a row that does not start on a line boundary spans one line more).
 *
 * out[b, :] = sum of table[indices[k], :] for k in [offsets[b], offsets[b + 1]).
 * The caller guarantees valid input: offsets has num_bags + 1 non-decreasing entries starting at 0
 * and every index is a row of the table.
 */
#include <stdint.h>

#define BLOCK 64              /* columns summed in registers at once: 16 SSE registers of floats */
#define PREFETCH_DISTANCE 16  /* indices ahead, FBGEMM's default */
#define CACHE_LINE 64

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(address) __builtin_prefetch((address), 0, 3)
#else
#define PREFETCH(address) ((void)(address))
#endif

/* Prefetch every cache line of columns [0, width) of a row. */
static inline void prefetch_columns(const float *row, int64_t width)
{
    uintptr_t line = (uintptr_t)row & ~(uintptr_t)(CACHE_LINE - 1);
    uintptr_t last = (uintptr_t)(row + width - 1);
    for (; line <= last; line += CACHE_LINE)
        PREFETCH((const void *)line);
}

/*
 * Sum columns [column, column + width) of the rows indices[start:end] into out. Inlined at both
 * call sites, with width either the constant BLOCK (the loops over `acc` are then unrolled and
 * `acc` lives in SSE registers; gcc 12 keeps 15 of its 16 there and spills one) or the tail width.
 */
static inline void sum_block(
    const float *table, int64_t dim, const int64_t *indices, int64_t num_indices,
    int64_t start, int64_t end, int64_t column, int64_t width, float *out)
{
    float acc[BLOCK];
    for (int64_t j = 0; j < width; j++)
        acc[j] = 0.0f;
    for (int64_t k = start; k < end; k++) {
        if (k + PREFETCH_DISTANCE < num_indices)
            prefetch_columns(table + indices[k + PREFETCH_DISTANCE] * dim + column, width);
        const float *row = table + indices[k] * dim + column;
        for (int64_t j = 0; j < width; j++)
            acc[j] += row[j];
    }
    for (int64_t j = 0; j < width; j++)
        out[column + j] = acc[j];
}

void reference_bag_sum(const float *table, int64_t dim, const int64_t *indices,
                       const int64_t *offsets, int64_t num_bags, float *out, int num_threads)
{
    const int64_t num_indices = offsets[num_bags];
    const int64_t full_columns = dim - dim % BLOCK;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t b = 0; b < num_bags; b++) {
        for (int64_t column = 0; column < full_columns; column += BLOCK)
            sum_block(table, dim, indices, num_indices, offsets[b], offsets[b + 1], column, BLOCK,
                      out + b * dim);
        if (full_columns < dim)
            sum_block(table, dim, indices, num_indices, offsets[b], offsets[b + 1], full_columns,
                      dim - full_columns, out + b * dim);
    }
}
