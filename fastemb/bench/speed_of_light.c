/* Speed-of-light references (fastemb/bench/speed_of_light.py): plain OpenMP loops that move the bytes of
 * looked-up table rows and do as little else as possible. Every cache line of the row
 * `distance` positions ahead is prefetched (a row that does not start on a line boundary spans
 * one line more), with about 8 KB in flight. */
#include <stdint.h>
#include <string.h>

#define CACHE_LINE 64
#define LANES 16  /* 32-bit words ORed at once */

static int64_t prefetch_distance(int64_t row_bytes)
{
    int64_t rows = 8192 / (row_bytes > 0 ? row_bytes : 1);
    return rows < 8 ? 8 : rows > 64 ? 64 : rows;
}

static inline void prefetch_for_read(const void *start, int64_t bytes)
{
    uintptr_t line = (uintptr_t)start & ~(uintptr_t)(CACHE_LINE - 1);
    for (; line < (uintptr_t)start + bytes; line += CACHE_LINE)
        __builtin_prefetch((const void *)line, 0, 3);
}

static inline void prefetch_for_write(const void *start, int64_t bytes)
{
    uintptr_t line = (uintptr_t)start & ~(uintptr_t)(CACHE_LINE - 1);
    for (; line < (uintptr_t)start + bytes; line += CACHE_LINE)
        __builtin_prefetch((const void *)line, 1, 3);
}

/* Read rows[0:n] of a table of 32-bit words, ORing them into LANES + 1 words of sink so that
 * the loads cannot be optimized away. */
void sol_read(const uint32_t *table, int64_t dim, const int64_t *rows, int64_t n,
              uint32_t *sink, int num_threads)
{
    const int64_t distance = prefetch_distance(dim * 4);
    memset(sink, 0, (LANES + 1) * sizeof *sink);
    #pragma omp parallel num_threads(num_threads)
    {
        uint32_t acc[LANES] = {0};
        uint32_t tail = 0;  /* a separate word, so that acc stays in vector registers */
        #pragma omp for schedule(static)
        for (int64_t k = 0; k < n; k++) {
            if (k + distance < n)
                prefetch_for_read(table + rows[k + distance] * dim, dim * 4);
            const uint32_t *row = table + rows[k] * dim;
            int64_t j = 0;
            for (; j + LANES <= dim; j += LANES)
                for (int lane = 0; lane < LANES; lane++)
                    acc[lane] |= row[j + lane];
            for (; j < dim; j++)
                tail |= row[j];
        }
        #pragma omp critical
        {
            for (int lane = 0; lane < LANES; lane++)
                sink[lane] |= acc[lane];
            sink[LANES] |= tail;
        }
    }
}

/* out[k, :] = table[rows[k], :] for k in [0, n). */
void sol_copy(const float *table, int64_t dim, const int64_t *rows, int64_t n, float *out,
              int num_threads)
{
    const int64_t distance = prefetch_distance(dim * 4);
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t k = 0; k < n; k++) {
        if (k + distance < n)
            prefetch_for_read(table + rows[k + distance] * dim, dim * 4);
        memcpy(out + k * dim, table + rows[k] * dim, dim * sizeof(float));
    }
}

/* Add 1 to each 32-bit word of rows[0:n] (unique) of each of the num_arrays tables, whose rows
 * have row_words[a] words: read and write each row once. */
void sol_update(uint32_t *const *arrays, const int64_t *row_words, int num_arrays,
                const int64_t *rows, int64_t n, int num_threads)
{
    int64_t bytes_per_row = 0;
    for (int a = 0; a < num_arrays; a++)
        bytes_per_row += row_words[a] * 4;
    const int64_t distance = prefetch_distance(bytes_per_row);
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t k = 0; k < n; k++) {
        for (int a = 0; a < num_arrays; a++) {
            const int64_t words = row_words[a];
            if (k + distance < n)
                prefetch_for_write(arrays[a] + rows[k + distance] * words, words * 4);
            uint32_t *row = arrays[a] + rows[k] * words;
            for (int64_t j = 0; j < words; j++)
                row[j] += 1;
        }
    }
}
