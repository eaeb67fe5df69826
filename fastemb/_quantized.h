/* fastemb/_quantized.h: the C that the quantized-table kernels (fastemb/_quantized.pyx) use:
 * the loops that dequantize one row and combine it into
 * a float32 row, written so that gcc vectorises them (u8 -> i32 -> f32, times scale, plus
 * bias). Every build compiles them with -ffp-contract=off: no fused multiply-add, so each
 * value is rounded after the multiply and after each add, the same in every build. */
#ifndef FASTEMB_QUANTIZED_H
#define FASTEMB_QUANTIZED_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_core.h"  /* the float16 conversions */

/* The scale and bias stored after a row's `code_bytes` bytes of codes: float32 (8 bits) or
   float16 (4 bits), at any alignment. */
static inline void fastemb_scale_bias_8bit(const uint8_t *row, Py_ssize_t code_bytes,
                                           float *scale, float *bias) {
    memcpy(scale, row + code_bytes, sizeof *scale);
    memcpy(bias, row + code_bytes + sizeof *scale, sizeof *bias);
}

static inline void fastemb_scale_bias_4bit(const uint8_t *row, Py_ssize_t code_bytes,
                                           float *scale, float *bias) {
    uint16_t halves[2];
    memcpy(halves, row + code_bytes, sizeof halves);
    *scale = fastemb_float16_value((fastemb_float16){halves[0]});
    *bias = fastemb_float16_value((fastemb_float16){halves[1]});
}

/* What a bag does with a dequantized value of an entry: add it, add it times the entry's
   weight, keep the larger (a later entry wins only if strictly greater), or store it. */
#define FASTEMB_COMBINE_ADD(acc, value, weight) (acc) = (acc) + (value)
#define FASTEMB_COMBINE_ADD_WEIGHTED(acc, value, weight) (acc) = (acc) + (weight) * (value)
#define FASTEMB_COMBINE_MAX(acc, value, weight) (acc) = (value) > (acc) ? (value) : (acc)
#define FASTEMB_COMBINE_STORE(acc, value, weight) (acc) = (value)

/* fastemb_<name>_8bit / _4bit(acc, codes, scale, bias, weight, dim): for every column j,
   value = scale * q[j] + bias (rounded after the multiply, then after the add), combined into
   acc[j]. 8 bits: q[j] = codes[j]. 4 bits: q[j] is the low nibble of codes[j / 2] for an even
   j and the high nibble for an odd j (dim is even). */
#define FASTEMB_QUANTIZED_ROW_LOOPS(name, COMBINE) \
    static inline void fastemb_##name##_8bit(float *restrict acc, \
                                             const uint8_t *restrict codes, float scale, \
                                             float bias, float weight, Py_ssize_t dim) { \
        (void)weight; \
        for (Py_ssize_t j = 0; j < dim; j++) { \
            const float value = scale * (float)(int32_t)codes[j] + bias; \
            COMBINE(acc[j], value, weight); \
        } \
    } \
    static inline void fastemb_##name##_4bit(float *restrict acc, \
                                             const uint8_t *restrict codes, float scale, \
                                             float bias, float weight, Py_ssize_t dim) { \
        (void)weight; \
        for (Py_ssize_t i = 0; i < dim / 2; i++) { \
            const uint8_t pair = codes[i]; \
            const float low = scale * (float)(int32_t)(pair & 15) + bias; \
            const float high = scale * (float)(int32_t)(pair >> 4) + bias; \
            COMBINE(acc[2 * i], low, weight); \
            COMBINE(acc[2 * i + 1], high, weight); \
        } \
    }
FASTEMB_QUANTIZED_ROW_LOOPS(add_row, FASTEMB_COMBINE_ADD)
FASTEMB_QUANTIZED_ROW_LOOPS(add_weighted_row, FASTEMB_COMBINE_ADD_WEIGHTED)
FASTEMB_QUANTIZED_ROW_LOOPS(max_row, FASTEMB_COMBINE_MAX)
FASTEMB_QUANTIZED_ROW_LOOPS(store_row, FASTEMB_COMBINE_STORE)

/* acc[:dim] = the dequantized row (take_max 0), or the elementwise max of acc and it
   (take_max 1), for a table of `bits` bits whose rows have `code_bytes` bytes of codes. */
static inline void fastemb_dequantize_row(int bits, int take_max, float *restrict acc,
                                          const uint8_t *row, Py_ssize_t code_bytes,
                                          Py_ssize_t dim) {
    float scale, bias;
    if (bits == 8)
        fastemb_scale_bias_8bit(row, code_bytes, &scale, &bias);
    else
        fastemb_scale_bias_4bit(row, code_bytes, &scale, &bias);
    if (bits == 8 && take_max)
        fastemb_max_row_8bit(acc, row, scale, bias, 1, dim);
    else if (bits == 8)
        fastemb_store_row_8bit(acc, row, scale, bias, 1, dim);
    else if (take_max)
        fastemb_max_row_4bit(acc, row, scale, bias, 1, dim);
    else
        fastemb_store_row_4bit(acc, row, scale, bias, 1, dim);
}

/* ---- Bag sums in one pass, with the running sums in vector registers ----
   fastemb_bag_sum_<bits>bit[_weighted]_<index type>(out, table, num_rows, row_bytes,
   code_bytes, dim, indices, start, end, n, weights, padding_idx, distance):
   out[j] = the sum over the kept entries k of [start, end) (rows of the table, not padding_idx)
   of value_k[j] (times weights[k] when weighted), added left to right from +0, with
   value_k[j] = scale_k * q_k[j] + bias_k from the codes, scale and bias of row indices[k].
   Entry by entry the row is read where its index is, in the same loop that prefetches every
   line of the row `distance` positions ahead (0: none; past n, the current one's), so the
   loads never wait on a collect pass and rows that straddle cache lines come in whole.
   Columns go in blocks of FASTEMB_QUANTIZED_BLOCK whose sums stay in registers over the whole
   bag (gcc's vector extension: the block's loops unroll into one variable per vector); the
   first block's pass prefetches, the later ones find the bag's rows in the cache. The columns
   left take the plain loops above. Each column sees the same operations in the same order
   either way, so the bits do not depend on the build's vector width. */

/* How many cache lines a row of this table can touch: every row starts a multiple of a bytes
   into the table, a the largest power of two up to 64 that divides both the table's address
   and row_bytes, so at most 64 - a bytes into a line, and touches at most
   ceil((64 - a + row_bytes) / 64) lines: 2 for the 72-byte 8-bit rows of dim 64, whose
   bytes 0, 64 and last, prefetched each, took one line twice (2-3% of the bag sum). */
static inline Py_ssize_t fastemb_quantized_row_lines(const uint8_t *table, Py_ssize_t row_bytes) {
    const uintptr_t bits = (uintptr_t)table | (uintptr_t)row_bytes | 64;
    const Py_ssize_t alignment = (Py_ssize_t)(bits & (~bits + 1));  /* its lowest set bit */
    return (64 - alignment + row_bytes + 63) / 64;
}

/* Prefetch every cache line of table row `row` (row 0 for a row outside [0, num_rows)),
   without branches on the data, as FBGEMM does: the row's first and last bytes, then its bytes
   64 i for 0 < i < fastemb_quantized_row_lines - 1 (none for rows of up to 2 lines), which lie
   inside the row and cover every line between, wherever the row starts. The loop's count does
   not depend on the row (a loop up to the row's last line, 1 or 2 lines for a 36-byte 4-bit
   row, mispredicted its exit at every other row and cost the 4-bit bag sum a third of its
   time). */
static inline void fastemb_prefetch_quantized_row(const uint8_t *table, Py_ssize_t num_rows,
                                                  Py_ssize_t row_bytes, int64_t row) {
    const Py_ssize_t lines = fastemb_quantized_row_lines(table, row_bytes);
    const uint8_t *row_start;
    if ((uint64_t)row >= (uint64_t)num_rows)
        row = 0;
    row_start = table + row * row_bytes;
    FASTEMB_PREFETCH(row_start);
    FASTEMB_PREFETCH(row_start + row_bytes - 1);
    for (Py_ssize_t line = 1; line < lines - 1; line++)
        FASTEMB_PREFETCH(row_start + 64 * line);
}

/* How far past the position a bag sum prefetches a row for it also prefetches the indices: a
   thread's bags are a few runs of the indices (chunks of bags), which the hardware's stream
   prefetcher picks up late at each start, and a late index delays every row prefetch behind
   it (8 bits: 2-5% of the bag sum, 1 and 2 threads). */
#define FASTEMB_INDEX_PREFETCH_BYTES 256

/* Prefetch the row that indices[k + distance] names (the row of indices[k] past the end) and
   the indices FASTEMB_INDEX_PREFETCH_BYTES further on (an address past the array's end is only
   prefetched, never read). */
#define FASTEMB_PREFETCH_QUANTIZED_ROW(table, num_rows, row_bytes, indices, n, k, distance) \
    do { \
        Py_ssize_t ahead_ = (k) + (distance); \
        if (ahead_ >= (n)) \
            ahead_ = (k); \
        FASTEMB_PREFETCH((const void *)((uintptr_t)((indices) + ahead_) \
                                        + FASTEMB_INDEX_PREFETCH_BYTES)); \
        fastemb_prefetch_quantized_row((table), (num_rows), (row_bytes), \
                                       (int64_t)(indices)[ahead_]); \
    } while (0)

static inline int fastemb_quantized_is_kept(int64_t row, int64_t padding_idx,
                                            Py_ssize_t num_rows) {
    return (uint64_t)row < (uint64_t)num_rows && row != padding_idx;
}

#define FASTEMB_QUANTIZED_BAG_SUM_ARGS(index_type) \
    float *restrict out, const uint8_t *table, Py_ssize_t num_rows, Py_ssize_t row_bytes, \
    Py_ssize_t code_bytes, Py_ssize_t dim, const index_type *indices, Py_ssize_t start, \
    Py_ssize_t end, Py_ssize_t n, const float *weights, int64_t padding_idx, \
    Py_ssize_t distance

/* The columns from `column` on, row by row with the plain loops (prefetching when column is
   0: then they are all the columns). */
#define FASTEMB_QUANTIZED_BAG_SUM_REST(bits, row_loop) \
    if (column < dim) { \
        memset(out + column, 0, (size_t)(dim - column) * sizeof(float)); \
        for (k = start; k < end; k++) { \
            float scale, bias; \
            const int64_t row = (int64_t)indices[k]; \
            const uint8_t *source; \
            if (column == 0 && distance) \
                FASTEMB_PREFETCH_QUANTIZED_ROW(table, num_rows, row_bytes, indices, n, k, \
                                               distance); \
            if (!fastemb_quantized_is_kept(row, padding_idx, num_rows)) \
                continue; \
            source = table + row * row_bytes; \
            fastemb_scale_bias_##bits##bit(source, code_bytes, &scale, &bias); \
            row_loop(out + column, source + column * bits / 8, scale, bias, \
                     weights ? weights[k] : 1, dim - column); \
        } \
    }

#if (defined(__GNUC__) || defined(__clang__)) && defined(__SSE2__)
#include <immintrin.h>
#if defined(__AVX512F__)
#define FASTEMB_QUANTIZED_LANES 16
#elif defined(__AVX2__)
#define FASTEMB_QUANTIZED_LANES 8
#else
#define FASTEMB_QUANTIZED_LANES 4
#endif
/* Codes go 16 at a time (one 16-byte register of u8 codes, a "group"); a block is 4 groups,
   64 columns (2 groups with 16-byte float vectors, so that the sums leave registers free). */
#define FASTEMB_QUANTIZED_GROUPS (FASTEMB_QUANTIZED_LANES == 4 ? 2 : 4)
#define FASTEMB_QUANTIZED_BLOCK (16 * FASTEMB_QUANTIZED_GROUPS)
#define FASTEMB_VECTORS_PER_GROUP (16 / FASTEMB_QUANTIZED_LANES)
typedef float fastemb_lanes_float __attribute__((vector_size(4 * FASTEMB_QUANTIZED_LANES)));
typedef int32_t fastemb_lanes_int __attribute__((vector_size(4 * FASTEMB_QUANTIZED_LANES)));

/* 16 u8 codes, zero-extended to int32 and converted: FASTEMB_VECTORS_PER_GROUP vectors. */
static inline void fastemb_widen_group(__m128i codes,
                                       fastemb_lanes_float out[FASTEMB_VECTORS_PER_GROUP]) {
#if defined(__AVX512F__)
    out[0] = (fastemb_lanes_float)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
#elif defined(__AVX2__)
    out[0] = (fastemb_lanes_float)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
    out[1] = (fastemb_lanes_float)_mm256_cvtepi32_ps(
        _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(codes, codes)));
#else
    const __m128i zero = _mm_setzero_si128();
    const __m128i low = _mm_unpacklo_epi8(codes, zero), high = _mm_unpackhi_epi8(codes, zero);
    out[0] = (fastemb_lanes_float)_mm_cvtepi32_ps(_mm_unpacklo_epi16(low, zero));
    out[1] = (fastemb_lanes_float)_mm_cvtepi32_ps(_mm_unpackhi_epi16(low, zero));
    out[2] = (fastemb_lanes_float)_mm_cvtepi32_ps(_mm_unpacklo_epi16(high, zero));
    out[3] = (fastemb_lanes_float)_mm_cvtepi32_ps(_mm_unpackhi_epi16(high, zero));
#endif
}

/* The codes of a block's groups, from column `column` of a row: 8 bits, 16 bytes a group;
   4 bits, 16 bytes for two groups, whose low nibbles (the even columns) and high nibbles
   (the odd ones) are interleaved back into column order. */
static inline void fastemb_block_codes_8bit(const uint8_t *row, Py_ssize_t column,
                                            __m128i groups[FASTEMB_QUANTIZED_GROUPS]) {
    for (int g = 0; g < FASTEMB_QUANTIZED_GROUPS; g++)
        groups[g] = _mm_loadu_si128((const __m128i *)(row + column + 16 * g));
}

static inline void fastemb_block_codes_4bit(const uint8_t *row, Py_ssize_t column,
                                            __m128i groups[FASTEMB_QUANTIZED_GROUPS]) {
    const __m128i nibble = _mm_set1_epi8(15);
    for (int g = 0; g < FASTEMB_QUANTIZED_GROUPS; g += 2) {
        const __m128i pairs = _mm_loadu_si128((const __m128i *)(row + column / 2 + 8 * g));
        const __m128i even = _mm_and_si128(pairs, nibble);
        const __m128i odd = _mm_and_si128(_mm_srli_epi16(pairs, 4), nibble);
        groups[g] = _mm_unpacklo_epi8(even, odd);
        groups[g + 1] = _mm_unpackhi_epi8(even, odd);
    }
}

#define FASTEMB_QUANTIZED_VECTORS (FASTEMB_QUANTIZED_GROUPS * FASTEMB_VECTORS_PER_GROUP)

/* A float in every lane. */
static inline fastemb_lanes_float fastemb_lanes_broadcast(float value) {
#if defined(__AVX512F__)
    return (fastemb_lanes_float)_mm512_set1_ps(value);
#elif defined(__AVX2__)
    return (fastemb_lanes_float)_mm256_set1_ps(value);
#else
    return (fastemb_lanes_float)_mm_set1_ps(value);
#endif
}

/* A row's scale and bias, in every lane. */
static inline void fastemb_scale_bias_lanes_8bit(const uint8_t *row, Py_ssize_t code_bytes,
                                                 fastemb_lanes_float *scale,
                                                 fastemb_lanes_float *bias) {
    float s, b;
    fastemb_scale_bias_8bit(row, code_bytes, &s, &b);
    *scale = fastemb_lanes_broadcast(s);
    *bias = fastemb_lanes_broadcast(b);
}

static inline void fastemb_scale_bias_lanes_4bit(const uint8_t *row, Py_ssize_t code_bytes,
                                                 fastemb_lanes_float *scale,
                                                 fastemb_lanes_float *bias) {
#if defined(__AVX512F__) && defined(__F16C__)
    /* both halves converted at once (F16C, as fastemb_float16_value in this build), then
       spread: lane 0 is the scale, lane 1 the bias */
    uint32_t halves;
    memcpy(&halves, row + code_bytes, sizeof halves);
    const __m512 pair = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128((int)halves)));
    *scale = (fastemb_lanes_float)_mm512_permutexvar_ps(_mm512_set1_epi32(0), pair);
    *bias = (fastemb_lanes_float)_mm512_permutexvar_ps(_mm512_set1_epi32(1), pair);
#else
    float s, b;
    fastemb_scale_bias_4bit(row, code_bytes, &s, &b);
    *scale = fastemb_lanes_broadcast(s);
    *bias = fastemb_lanes_broadcast(b);
#endif
}

/* values[v] = scale * code + bias for the block's codes in `groups`, in column order. */
static inline void fastemb_group_values(const __m128i groups[FASTEMB_QUANTIZED_GROUPS],
                                        fastemb_lanes_float scale, fastemb_lanes_float bias,
                                        fastemb_lanes_float values[FASTEMB_QUANTIZED_VECTORS]) {
    _Pragma("GCC unroll 4")
    for (int g = 0; g < FASTEMB_QUANTIZED_GROUPS; g++)
        fastemb_widen_group(groups[g], values + g * FASTEMB_VECTORS_PER_GROUP);
    _Pragma("GCC unroll 16")
    for (int v = 0; v < FASTEMB_QUANTIZED_VECTORS; v++)
        values[v] = scale * values[v] + bias;
}

/* The values scale * q[j] + bias (rounded after the multiply, then after the add) of a block
   of a row from column `column`: the block's vectors in the order of its running sums, which
   fastemb_store_block_<bits>bit puts back in column order. 8 bits, and 4 bits in the narrower
   builds: column order, each vector from its codes widened to float (the nibbles interleaved
   back by fastemb_block_codes_4bit). 4 bits with AVX-512: a code has 16 values, so the row's
   16 possible values are computed once (scale * 0 + bias, ..., scale * 15 + bias: the same
   multiply and add of the same floats, so the same bits), and each 16 bytes of codes, widened
   to 16 int32 lanes of pairs, look them up (vpermps reads the low 4 bits of each lane) for
   the even columns (the low nibbles) and, shifted right by 4, for the odd ones: the sums of
   even and odd columns are kept apart until the store. */
static inline void fastemb_block_values_8bit(const uint8_t *row, Py_ssize_t code_bytes,
                                             Py_ssize_t column,
                                             fastemb_lanes_float values[FASTEMB_QUANTIZED_VECTORS]) {
    __m128i groups[FASTEMB_QUANTIZED_GROUPS];
    fastemb_lanes_float scale, bias;
    fastemb_scale_bias_lanes_8bit(row, code_bytes, &scale, &bias);
    fastemb_block_codes_8bit(row, column, groups);
    fastemb_group_values(groups, scale, bias, values);
}

static inline void fastemb_block_values_4bit(const uint8_t *row, Py_ssize_t code_bytes,
                                             Py_ssize_t column,
                                             fastemb_lanes_float values[FASTEMB_QUANTIZED_VECTORS]) {
    fastemb_lanes_float scale, bias;
    fastemb_scale_bias_lanes_4bit(row, code_bytes, &scale, &bias);
#if defined(__AVX512F__)
    const fastemb_lanes_float codes = (fastemb_lanes_float)_mm512_set_ps(
        15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 lookup = (__m512)(scale * codes + bias);
    _Pragma("GCC unroll 4")
    for (int g = 0; g < FASTEMB_QUANTIZED_GROUPS; g += 2) {
        const __m512i pairs = _mm512_cvtepu8_epi32(
            _mm_loadu_si128((const __m128i *)(row + column / 2 + 8 * g)));
        values[g] = (fastemb_lanes_float)_mm512_permutexvar_ps(pairs, lookup);
        values[g + 1] = (fastemb_lanes_float)_mm512_permutexvar_ps(_mm512_srli_epi32(pairs, 4),
                                                                   lookup);
    }
#else
    __m128i groups[FASTEMB_QUANTIZED_GROUPS];
    fastemb_block_codes_4bit(row, column, groups);
    fastemb_group_values(groups, scale, bias, values);
#endif
}

/* out[:FASTEMB_QUANTIZED_BLOCK] = a block's running sums, in column order. */
static inline void fastemb_store_block_8bit(float *out,
                                            const fastemb_lanes_float acc[FASTEMB_QUANTIZED_VECTORS]) {
    _Pragma("GCC unroll 16")
    for (int v = 0; v < FASTEMB_QUANTIZED_VECTORS; v++)
        memcpy(out + v * FASTEMB_QUANTIZED_LANES, &acc[v], sizeof acc[v]);
}

static inline void fastemb_store_block_4bit(float *out,
                                            const fastemb_lanes_float acc[FASTEMB_QUANTIZED_VECTORS]) {
#if defined(__AVX512F__)
    /* acc[g] holds columns 32 * (g / 2) + 0, 2, ..., 30 and acc[g + 1] the odd ones */
    const __m512i low = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i high = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                          24, 8);
    _Pragma("GCC unroll 4")
    for (int g = 0; g < FASTEMB_QUANTIZED_GROUPS; g += 2) {
        const __m512 even = (__m512)acc[g], odd = (__m512)acc[g + 1];
        _mm512_storeu_ps(out + 16 * g, _mm512_permutex2var_ps(even, low, odd));
        _mm512_storeu_ps(out + 16 * g + 16, _mm512_permutex2var_ps(even, high, odd));
    }
#else
    fastemb_store_block_8bit(out, acc);
#endif
}

#define FASTEMB_QUANTIZED_BAG_SUM(name, index_type, bits, COMBINE, row_loop) \
    static inline void name(FASTEMB_QUANTIZED_BAG_SUM_ARGS(index_type)) { \
        enum { VECTORS = FASTEMB_QUANTIZED_VECTORS }; \
        Py_ssize_t column = 0, k; \
        (void)weights; \
        for (; column + FASTEMB_QUANTIZED_BLOCK <= dim; column += FASTEMB_QUANTIZED_BLOCK) { \
            fastemb_lanes_float acc[VECTORS]; \
            const int prefetching = column == 0 && distance; \
            _Pragma("GCC unroll 16") \
            for (int v = 0; v < VECTORS; v++) \
                acc[v] = (fastemb_lanes_float){0}; \
            for (k = start; k < end; k++) { \
                fastemb_lanes_float values[VECTORS]; \
                const int64_t row = (int64_t)indices[k]; \
                const uint8_t *source; \
                if (prefetching) \
                    FASTEMB_PREFETCH_QUANTIZED_ROW(table, num_rows, row_bytes, indices, n, k, \
                                                   distance); \
                if (!fastemb_quantized_is_kept(row, padding_idx, num_rows)) \
                    continue; \
                source = table + row * row_bytes; \
                fastemb_block_values_##bits##bit(source, code_bytes, column, values); \
                _Pragma("GCC unroll 16") \
                for (int v = 0; v < VECTORS; v++) \
                    COMBINE(acc[v], values[v], weights[k]); \
            } \
            fastemb_store_block_##bits##bit(out + column, acc); \
        } \
        FASTEMB_QUANTIZED_BAG_SUM_REST(bits, row_loop) \
    }
#else  /* no vector extension: the plain loops, row by row */
#define FASTEMB_QUANTIZED_BAG_SUM(name, index_type, bits, COMBINE, row_loop) \
    static inline void name(FASTEMB_QUANTIZED_BAG_SUM_ARGS(index_type)) { \
        Py_ssize_t column = 0, k; \
        FASTEMB_QUANTIZED_BAG_SUM_REST(bits, row_loop) \
    }
#endif
/* The bag sums of each table (8 or 4 bits), weighting and index type. */
#define FASTEMB_QUANTIZED_BAG_SUMS(index_type) \
    FASTEMB_QUANTIZED_BAG_SUM(fastemb_bag_sum_8bit_##index_type, index_type, 8, \
                              FASTEMB_COMBINE_ADD, fastemb_add_row_8bit) \
    FASTEMB_QUANTIZED_BAG_SUM(fastemb_bag_sum_4bit_##index_type, index_type, 4, \
                              FASTEMB_COMBINE_ADD, fastemb_add_row_4bit) \
    FASTEMB_QUANTIZED_BAG_SUM(fastemb_bag_sum_8bit_weighted_##index_type, index_type, 8, \
                              FASTEMB_COMBINE_ADD_WEIGHTED, fastemb_add_weighted_row_8bit) \
    FASTEMB_QUANTIZED_BAG_SUM(fastemb_bag_sum_4bit_weighted_##index_type, index_type, 4, \
                              FASTEMB_COMBINE_ADD_WEIGHTED, fastemb_add_weighted_row_4bit) \
    /* The sum of a table of `bits` bits, weighted unless weights is NULL. */ \
    static inline void fastemb_quantized_bag_sum_##index_type( \
            int bits, FASTEMB_QUANTIZED_BAG_SUM_ARGS(index_type)) { \
        if (bits == 8 && weights == NULL) \
            fastemb_bag_sum_8bit_##index_type(out, table, num_rows, row_bytes, code_bytes, dim, \
                                              indices, start, end, n, NULL, padding_idx, \
                                              distance); \
        else if (bits == 8) \
            fastemb_bag_sum_8bit_weighted_##index_type(out, table, num_rows, row_bytes, \
                                                       code_bytes, dim, indices, start, end, n, \
                                                       weights, padding_idx, distance); \
        else if (weights == NULL) \
            fastemb_bag_sum_4bit_##index_type(out, table, num_rows, row_bytes, code_bytes, dim, \
                                              indices, start, end, n, NULL, padding_idx, \
                                              distance); \
        else \
            fastemb_bag_sum_4bit_weighted_##index_type(out, table, num_rows, row_bytes, \
                                                       code_bytes, dim, indices, start, end, n, \
                                                       weights, padding_idx, distance); \
    }
FASTEMB_QUANTIZED_BAG_SUMS(int32_t)
FASTEMB_QUANTIZED_BAG_SUMS(int64_t)

#endif  /* FASTEMB_QUANTIZED_H */
