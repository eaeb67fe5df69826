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

/* ---- Sums of rows with the running sums in vector registers ----
   fastemb_sum_rows_<bits>bit[_weighted](out, rows, code_bytes, weights, count, dim):
   out[j] = out[j] + value_e[j] for e = 0, 1, ..., count - 1 in that order (times weights[e]
   when weighted), value_e[j] = scale_e * q_e[j] + bias_e from the codes, scale and bias of
   rows[e]. The rows are read here only (the caller collects their addresses), so their codes,
   scale and bias come in together.
   Columns go in blocks of FASTEMB_QUANTIZED_BLOCK whose sums stay in registers over all the
   rows (gcc's vector extension: the block's loops unroll into one variable per vector), then
   the columns left take the plain loops above. Each column sees the same operations in the
   same order either way, so the bits do not depend on the build's vector width. */
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

#define FASTEMB_QUANTIZED_SUM_ROWS(name, bits, COMBINE, row_loop) \
    static inline void name(float *restrict out, const uint8_t *const *rows, \
                            Py_ssize_t code_bytes, const float *weights, Py_ssize_t count, \
                            Py_ssize_t dim) { \
        enum { VECTORS = FASTEMB_QUANTIZED_GROUPS * FASTEMB_VECTORS_PER_GROUP }; \
        Py_ssize_t column = 0, e; \
        (void)weights; \
        for (; column + FASTEMB_QUANTIZED_BLOCK <= dim; column += FASTEMB_QUANTIZED_BLOCK) { \
            fastemb_lanes_float acc[VECTORS]; \
            _Pragma("GCC unroll 16") \
            for (int v = 0; v < VECTORS; v++) \
                memcpy(&acc[v], out + column + v * FASTEMB_QUANTIZED_LANES, sizeof acc[v]); \
            for (e = 0; e < count; e++) { \
                float scale, bias; \
                __m128i groups[FASTEMB_QUANTIZED_GROUPS]; \
                fastemb_scale_bias_##bits##bit(rows[e], code_bytes, &scale, &bias); \
                fastemb_block_codes_##bits##bit(rows[e], column, groups); \
                _Pragma("GCC unroll 4") \
                for (int g = 0; g < FASTEMB_QUANTIZED_GROUPS; g++) { \
                    fastemb_lanes_float codes[FASTEMB_VECTORS_PER_GROUP]; \
                    fastemb_widen_group(groups[g], codes); \
                    _Pragma("GCC unroll 4") \
                    for (int i = 0; i < FASTEMB_VECTORS_PER_GROUP; i++) { \
                        const fastemb_lanes_float value = scale * codes[i] + bias; \
                        COMBINE(acc[g * FASTEMB_VECTORS_PER_GROUP + i], value, weights[e]); \
                    } \
                } \
            } \
            _Pragma("GCC unroll 16") \
            for (int v = 0; v < VECTORS; v++) \
                memcpy(out + column + v * FASTEMB_QUANTIZED_LANES, &acc[v], sizeof acc[v]); \
        } \
        for (e = 0; column < dim && e < count; e++) { \
            float scale, bias; \
            fastemb_scale_bias_##bits##bit(rows[e], code_bytes, &scale, &bias); \
            row_loop(out + column, rows[e] + column * bits / 8, scale, bias, \
                     weights ? weights[e] : 1, dim - column); \
        } \
    }
#else  /* no vector extension: the plain loops, row by row */
#define FASTEMB_QUANTIZED_SUM_ROWS(name, bits, COMBINE, row_loop) \
    static inline void name(float *restrict out, const uint8_t *const *rows, \
                            Py_ssize_t code_bytes, const float *weights, Py_ssize_t count, \
                            Py_ssize_t dim) { \
        for (Py_ssize_t e = 0; e < count; e++) { \
            float scale, bias; \
            fastemb_scale_bias_##bits##bit(rows[e], code_bytes, &scale, &bias); \
            row_loop(out, rows[e], scale, bias, weights ? weights[e] : 1, dim); \
        } \
    }
#endif
FASTEMB_QUANTIZED_SUM_ROWS(fastemb_sum_rows_8bit, 8, FASTEMB_COMBINE_ADD, fastemb_add_row_8bit)
FASTEMB_QUANTIZED_SUM_ROWS(fastemb_sum_rows_4bit, 4, FASTEMB_COMBINE_ADD, fastemb_add_row_4bit)
FASTEMB_QUANTIZED_SUM_ROWS(fastemb_sum_rows_8bit_weighted, 8, FASTEMB_COMBINE_ADD_WEIGHTED,
                           fastemb_add_weighted_row_8bit)
FASTEMB_QUANTIZED_SUM_ROWS(fastemb_sum_rows_4bit_weighted, 4, FASTEMB_COMBINE_ADD_WEIGHTED,
                           fastemb_add_weighted_row_4bit)

/* The sum loop of a table of `bits` bits, weighted unless weights is NULL. */
static inline void fastemb_sum_rows(int bits, float *restrict out, const uint8_t *const *rows,
                                    Py_ssize_t code_bytes, const float *weights,
                                    Py_ssize_t count, Py_ssize_t dim) {
    if (bits == 8 && weights == NULL)
        fastemb_sum_rows_8bit(out, rows, code_bytes, NULL, count, dim);
    else if (bits == 8)
        fastemb_sum_rows_8bit_weighted(out, rows, code_bytes, weights, count, dim);
    else if (weights == NULL)
        fastemb_sum_rows_4bit(out, rows, code_bytes, NULL, count, dim);
    else
        fastemb_sum_rows_4bit_weighted(out, rows, code_bytes, weights, count, dim);
}

#endif  /* FASTEMB_QUANTIZED_H */
