/* fastemb/_quantized.h: the C that the quantized-table kernels (fastemb/_quantized.pyx) use:
 * the loops that dequantize one row and combine it into a float32 row, and the bag sums that
 * keep their running sums in vector registers. A code q of a row with scale s and bias b has
 * the value fma(s, q, b): s * q + b rounded once, as FBGEMM computes it (with the CPU's fused
 * multiply-add in the vector builds, from float64 in the portable one: the same bits in every
 * build). Every build compiles with -ffp-contract=off, so nothing else is fused. */
#ifndef FASTEMB_QUANTIZED_H
#define FASTEMB_QUANTIZED_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_core.h"  /* the float16 conversions */

/* The value of code q (0 to 255) in a row of scale `scale` and bias `bias` is fma(scale, q,
   bias), rounded once: fastemb_dequantized, for any floats. fastemb_dequantized_in_row gives
   the same where FASTEMB_ROW_IS_EXACT(scale, bias), as every row is where fmaf is a single
   instruction (FP_FAST_FMAF: the vector builds, with FMA). Where it is not (the portable x86
   build: SSE2 math, no FMA instruction; glibc's fmaf is a call, with which the 8-bit bag sum
   ran 7x slower), fastemb_dequantized_in_row computes in float64, where scale * q is exact
   (24 + 8 bits) and so is scale * q + bias in almost every row: one rounding to float32 then
   gives the fused result. The other rows take fastemb_dequantized, made exact in float64. */
#if !defined(FP_FAST_FMAF) && defined(__SSE2_MATH__)
#define FASTEMB_FMA_IN_DOUBLE 1
#else
#define FASTEMB_FMA_IN_DOUBLE 0
#endif
#if !FASTEMB_FMA_IN_DOUBLE
#define FASTEMB_ROW_IS_EXACT(scale, bias) 1
static inline float fastemb_dequantized(float scale, float q, float bias) {
    return fmaf(scale, q, bias);
}
#define fastemb_dequantized_in_row fastemb_dequantized
#else
/* The lowest bit a float32 x can have set (its ulp; 2^-149 for zero and subnormals), as a
   double. */
static inline double fastemb_lowest_bit(float x) {
    uint32_t bits;
    uint64_t lowest;
    double value;
    memcpy(&bits, &x, sizeof bits);
    bits = (bits >> 23) & 255;  /* the biased exponent */
    lowest = (uint64_t)((bits ? bits : 1) - 150 + 1023) << 52;  /* 2^(exponent - 150) */
    memcpy(&value, &lowest, sizeof value);
    return value;
}

/* Whether scale * q + bias is exact in float64 for every q of 0 to 255: each is a multiple of
   the smaller of the two's lowest bits u (both powers of two) and at most
   255 |scale| + |bias| in magnitude, so it is when that is below 2^53 u (2^52 here: the bound
   is itself rounded). False for an infinite or NaN scale or bias. */
static inline int fastemb_sums_exact_in_double(float scale, float bias) {
    const double low_scale = fastemb_lowest_bit(scale), low_bias = fastemb_lowest_bit(bias);
    const double lowest = low_scale < low_bias ? low_scale : low_bias;
    return 255.0 * fabs((double)scale) + fabs((double)bias) < 0x1p52 * lowest;
}
#define FASTEMB_ROW_IS_EXACT(scale, bias) fastemb_sums_exact_in_double((scale), (bias))

static inline float fastemb_dequantized_in_row(float scale, float q, float bias) {
    return (float)((double)scale * (double)q + (double)bias);
}

/* fma(scale, q, bias) for any floats, from float64: the product is exact (24 + 24 bits) and
   the sum's rounding error is found exactly (Knuth's two-sum); an inexact sum with an even
   last bit moves one step towards the error (round to odd), which 53 bits, 2 more than
   float32's 24 + 1 need, then round to nearest float32 correctly (Boldo and Melquiond,
   2008). */
static inline float fastemb_dequantized(float scale, float q, float bias) {
    const double product = (double)scale * (double)q, addend = (double)bias;
    double sum = product + addend;
    const double moved = sum - product;
    const double error = (product - (sum - moved)) + (addend - moved);
    uint64_t bits;
    memcpy(&bits, &sum, sizeof bits);
    if ((error > 0 || error < 0) && !(bits & 1)) {  /* (false for a NaN error: inf or NaN) */
        bits += (error > 0) == (sum > 0) ? 1 : (uint64_t)-1;  /* away from 0, or towards */
        memcpy(&sum, &bits, sizeof sum);
    }
    return (float)sum;
}
#endif

/* The value of a 4-bit code: the scale is a float16 (11 significant bits) and q < 16, so
   scale * q is exact in float32, and scale * q + bias, rounded after the add alone, is the
   fused result (the portable build computes it so). */
static inline float fastemb_dequantized_4bit(float scale, float q, float bias) {
#if FASTEMB_FMA_IN_DOUBLE
    return scale * q + bias;
#else
    return fmaf(scale, q, bias);
#endif
}

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
   value = fastemb_dequantized(scale, q[j], bias) (fastemb_dequantized_in_row where the row
   allows; fastemb_dequantized_4bit for 4 bits), combined into acc[j]. 8 bits:
   q[j] = codes[j]. 4 bits: q[j] is the low nibble of codes[j / 2] for an even j and the high
   nibble for an odd j (dim is even). */
#define FASTEMB_QUANTIZED_ROW_LOOP_8BIT(dequantize, COMBINE) \
    for (Py_ssize_t j = 0; j < dim; j++) \
        COMBINE(acc[j], dequantize(scale, (float)codes[j], bias), weight)
#define FASTEMB_QUANTIZED_ROW_LOOPS(name, COMBINE) \
    static inline void fastemb_##name##_8bit(float *restrict acc, \
                                             const uint8_t *restrict codes, float scale, \
                                             float bias, float weight, Py_ssize_t dim) { \
        (void)weight; \
        if (FASTEMB_ROW_IS_EXACT(scale, bias)) \
            FASTEMB_QUANTIZED_ROW_LOOP_8BIT(fastemb_dequantized_in_row, COMBINE); \
        else \
            FASTEMB_QUANTIZED_ROW_LOOP_8BIT(fastemb_dequantized, COMBINE); \
    } \
    static inline void fastemb_##name##_4bit(float *restrict acc, \
                                             const uint8_t *restrict codes, float scale, \
                                             float bias, float weight, Py_ssize_t dim) { \
        (void)weight; \
        for (Py_ssize_t i = 0; i < dim / 2; i++) { \
            const uint8_t pair = codes[i]; \
            COMBINE(acc[2 * i], fastemb_dequantized_4bit(scale, (float)(pair & 15), bias), \
                    weight); \
            COMBINE(acc[2 * i + 1], fastemb_dequantized_4bit(scale, (float)(pair >> 4), bias), \
                    weight); \
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
   value_k[j] = fastemb_dequantized(scale_k, q_k[j], bias_k), from row indices[k].
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
/* A block is FASTEMB_QUANTIZED_VECTORS vectors of running sums: 64 columns (32 with 16-byte
   vectors), which leaves registers for a row's values (AVX2 has 16 vector registers: the 8
   sums, scale, bias and the value being added; a block that computed all 8 values before
   adding them spilled 2 sums to the stack, and the 8-bit bag sum ran 7-11% slower). */
#define FASTEMB_QUANTIZED_VECTORS (FASTEMB_QUANTIZED_LANES == 16 ? 4 : 8)
#define FASTEMB_QUANTIZED_BLOCK (FASTEMB_QUANTIZED_LANES * FASTEMB_QUANTIZED_VECTORS)
typedef float fastemb_lanes_float __attribute__((vector_size(4 * FASTEMB_QUANTIZED_LANES)));
typedef int32_t fastemb_lanes_int __attribute__((vector_size(4 * FASTEMB_QUANTIZED_LANES)));

/* FASTEMB_QUANTIZED_LANES bytes from `bytes`, zero-extended to int32 lanes (read: exactly
   those bytes). */
static inline fastemb_lanes_int fastemb_widen_bytes(const uint8_t *bytes) {
#if defined(__AVX512F__)
    return (fastemb_lanes_int)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
#elif defined(__AVX2__)
    return (fastemb_lanes_int)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)bytes));
#else
    int32_t four;
    const __m128i zero = _mm_setzero_si128();
    memcpy(&four, bytes, sizeof four);
    return (fastemb_lanes_int)_mm_unpacklo_epi16(
        _mm_unpacklo_epi8(_mm_cvtsi32_si128(four), zero), zero);
#endif
}

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

/* fastemb_dequantized_in_row lane by lane, of a row's scale and bias (the same in every
   lane), and fastemb_dequantized lane by lane. */
static inline fastemb_lanes_float fastemb_lanes_dequantized(fastemb_lanes_float scale,
                                                            fastemb_lanes_int codes,
                                                            fastemb_lanes_float bias) {
#if defined(__AVX512F__)
    return (fastemb_lanes_float)_mm512_fmadd_ps(
        (__m512)scale, _mm512_cvtepi32_ps((__m512i)codes), (__m512)bias);
#elif defined(__AVX2__) && defined(__FMA__)
    return (fastemb_lanes_float)_mm256_fmadd_ps(
        (__m256)scale, _mm256_cvtepi32_ps((__m256i)codes), (__m256)bias);
#elif FASTEMB_QUANTIZED_LANES == 4 && FASTEMB_FMA_IN_DOUBLE
    /* two lanes of float64 at a time */
    const __m128d row_scale = _mm_set1_pd((double)scale[0]);
    const __m128d row_bias = _mm_set1_pd((double)bias[0]);
    const __m128d low = _mm_add_pd(_mm_mul_pd(row_scale, _mm_cvtepi32_pd((__m128i)codes)),
                                   row_bias);
    const __m128d high = _mm_add_pd(
        _mm_mul_pd(row_scale, _mm_cvtepi32_pd(_mm_unpackhi_epi64((__m128i)codes,
                                                                  (__m128i)codes))),
        row_bias);
    return (fastemb_lanes_float)_mm_movelh_ps(_mm_cvtpd_ps(low), _mm_cvtpd_ps(high));
#else
    fastemb_lanes_float value;
    for (int lane = 0; lane < FASTEMB_QUANTIZED_LANES; lane++)
        value[lane] = fastemb_dequantized_in_row(scale[lane], (float)codes[lane], bias[lane]);
    return value;
#endif
}

static inline fastemb_lanes_float fastemb_lanes_dequantized_exactly(fastemb_lanes_float scale,
                                                                    fastemb_lanes_int codes,
                                                                    fastemb_lanes_float bias) {
    fastemb_lanes_float value;
    for (int lane = 0; lane < FASTEMB_QUANTIZED_LANES; lane++)
        value[lane] = fastemb_dequantized(scale[lane], (float)codes[lane], bias[lane]);
    return value;
}

/* What a row's values need, in every lane: setup[0] its scale and setup[1] its bias; for
   4 bits with AVX-512, setup[0] its 16 possible values instead (fma(scale, c, bias) for the
   codes c = 0, ..., 15, in lane c: the same operation on the same floats, so the same bits). */
static inline void fastemb_row_setup_8bit(const uint8_t *row, Py_ssize_t code_bytes,
                                          fastemb_lanes_float setup[2]) {
    float scale, bias;
    fastemb_scale_bias_8bit(row, code_bytes, &scale, &bias);
    setup[0] = fastemb_lanes_broadcast(scale);
    setup[1] = fastemb_lanes_broadcast(bias);
}

static inline void fastemb_row_setup_4bit(const uint8_t *row, Py_ssize_t code_bytes,
                                          fastemb_lanes_float setup[2]) {
#if defined(__AVX512F__) && defined(__F16C__)
    /* both halves converted at once (F16C, as fastemb_float16_value in this build), then
       spread: lane 0 is the scale, lane 1 the bias */
    uint32_t halves;
    memcpy(&halves, row + code_bytes, sizeof halves);
    const __m512 pair = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128((int)halves)));
    const fastemb_lanes_int codes = (fastemb_lanes_int)_mm512_set_epi32(
        15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    setup[0] = fastemb_lanes_dequantized(
        (fastemb_lanes_float)_mm512_permutexvar_ps(_mm512_set1_epi32(0), pair), codes,
        (fastemb_lanes_float)_mm512_permutexvar_ps(_mm512_set1_epi32(1), pair));
#else
    float scale, bias;
    fastemb_scale_bias_4bit(row, code_bytes, &scale, &bias);
    setup[0] = fastemb_lanes_broadcast(scale);
    setup[1] = fastemb_lanes_broadcast(bias);
#endif
}

/* The codes of vector v of a block from column `column` of a row. 8 bits: columns
   column + LANES v, ... in order. 4 bits: vectors 2p and 2p + 1 take the LANES bytes of codes
   at column / 2 + LANES p, the low nibbles (the even columns column + 2 LANES p + 2i) and the
   high ones (the odd columns + 2i + 1); with AVX-512 the low nibbles keep the high ones above
   them, which the lookup (vpermps reads the low 4 bits of each lane) ignores. */
static inline fastemb_lanes_int fastemb_vector_codes_8bit(const uint8_t *row, Py_ssize_t column,
                                                          int v) {
    return fastemb_widen_bytes(row + column + FASTEMB_QUANTIZED_LANES * v);
}

static inline fastemb_lanes_int fastemb_vector_codes_4bit(const uint8_t *row, Py_ssize_t column,
                                                          int v) {
    const fastemb_lanes_int pairs = fastemb_widen_bytes(
        row + column / 2 + FASTEMB_QUANTIZED_LANES * (v / 2));
#if defined(__AVX512F__)
    return v % 2 ? pairs >> 4 : pairs;
#else
    return v % 2 ? pairs >> 4 : pairs & 15;
#endif
}

/* Vector v of a block's values, each fastemb_dequantized_in_row of its code (4 bits:
   fastemb_dequantized_4bit; with AVX-512 looked up). */
static inline fastemb_lanes_float fastemb_vector_value_8bit(const uint8_t *row,
                                                            Py_ssize_t column, int v,
                                                            const fastemb_lanes_float setup[2]) {
    return fastemb_lanes_dequantized(setup[0], fastemb_vector_codes_8bit(row, column, v),
                                     setup[1]);
}

static inline fastemb_lanes_float fastemb_vector_value_4bit(const uint8_t *row,
                                                            Py_ssize_t column, int v,
                                                            const fastemb_lanes_float setup[2]) {
    const fastemb_lanes_int codes = fastemb_vector_codes_4bit(row, column, v);
#if defined(__AVX512F__)
    return (fastemb_lanes_float)_mm512_permutexvar_ps((__m512i)codes, (__m512)setup[0]);
#elif FASTEMB_FMA_IN_DOUBLE  /* (as fastemb_dequantized_4bit) */
    return setup[0] * __builtin_convertvector(codes, fastemb_lanes_float) + setup[1];
#else
    return fastemb_lanes_dequantized(setup[0], codes, setup[1]);
#endif
}

/* out[:FASTEMB_QUANTIZED_BLOCK] = a block's running sums, in column order: 8 bits, as they
   are; 4 bits, sums 2p (the even columns) and 2p + 1 (the odd ones) interleaved. */
static inline void fastemb_store_block_8bit(float *out,
                                            const fastemb_lanes_float acc[FASTEMB_QUANTIZED_VECTORS]) {
    _Pragma("GCC unroll 16")
    for (int v = 0; v < FASTEMB_QUANTIZED_VECTORS; v++)
        memcpy(out + v * FASTEMB_QUANTIZED_LANES, &acc[v], sizeof acc[v]);
}

static inline void fastemb_store_block_4bit(float *out,
                                            const fastemb_lanes_float acc[FASTEMB_QUANTIZED_VECTORS]) {
    _Pragma("GCC unroll 8")
    for (int v = 0; v < FASTEMB_QUANTIZED_VECTORS; v += 2) {
        float *pair_out = out + v * FASTEMB_QUANTIZED_LANES;
#if defined(__AVX512F__)
        const __m512 even = (__m512)acc[v], odd = (__m512)acc[v + 1];
        const __m512i low = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                             16, 0);
        const __m512i high = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10,
                                              25, 9, 24, 8);
        _mm512_storeu_ps(pair_out, _mm512_permutex2var_ps(even, low, odd));
        _mm512_storeu_ps(pair_out + 16, _mm512_permutex2var_ps(even, high, odd));
#elif defined(__AVX2__)
        /* in each 128-bit half: columns (0, 1, 2, 3) and (4, 5, 6, 7) of that half's pairs */
        const __m256 low = _mm256_unpacklo_ps((__m256)acc[v], (__m256)acc[v + 1]);
        const __m256 high = _mm256_unpackhi_ps((__m256)acc[v], (__m256)acc[v + 1]);
        _mm256_storeu_ps(pair_out, _mm256_permute2f128_ps(low, high, 0x20));
        _mm256_storeu_ps(pair_out + 8, _mm256_permute2f128_ps(low, high, 0x31));
#else
        _mm_storeu_ps(pair_out, _mm_unpacklo_ps((__m128)acc[v], (__m128)acc[v + 1]));
        _mm_storeu_ps(pair_out + 4, _mm_unpackhi_ps((__m128)acc[v], (__m128)acc[v + 1]));
#endif
    }
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
                fastemb_lanes_float setup[2]; \
                const int64_t row = (int64_t)indices[k]; \
                const uint8_t *source; \
                if (prefetching) \
                    FASTEMB_PREFETCH_QUANTIZED_ROW(table, num_rows, row_bytes, indices, n, k, \
                                                   distance); \
                if (!fastemb_quantized_is_kept(row, padding_idx, num_rows)) \
                    continue; \
                source = table + row * row_bytes; \
                fastemb_row_setup_##bits##bit(source, code_bytes, setup); \
                if (bits == 8 && !FASTEMB_ROW_IS_EXACT(setup[0][0], setup[1][0])) { \
                    for (int v = 0; v < VECTORS; v++) \
                        COMBINE(acc[v], fastemb_lanes_dequantized_exactly( \
                                    setup[0], fastemb_vector_codes_##bits##bit(source, column, \
                                                                               v), \
                                    setup[1]), weights[k]); \
                    continue; \
                } \
                /* each value added as soon as it is made: see FASTEMB_QUANTIZED_VECTORS */ \
                _Pragma("GCC unroll 16") \
                for (int v = 0; v < VECTORS; v++) \
                    COMBINE(acc[v], fastemb_vector_value_##bits##bit(source, column, v, setup), \
                            weights[k]); \
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
