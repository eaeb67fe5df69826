/* fastemb/_quantized.h: the C that the quantized-table kernels (fastemb/_quantized.pyx) use:
 * IEEE half-precision conversions and the loops that dequantize one row and combine it into
 * a float32 row, written so that gcc vectorises them (u8 -> i32 -> f32, times scale, plus
 * bias). Every build compiles them with -ffp-contract=off: no fused multiply-add, so each
 * value is rounded after the multiply and after each add, the same in every build. */
#ifndef FASTEMB_QUANTIZED_H
#define FASTEMB_QUANTIZED_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline float fastemb_float_from_bits(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint32_t fastemb_bits_of_float(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

/* The float32 value of an IEEE binary16 (exact: every half is a float). Without a branch on
   the exponent beyond one select, as in Marat Dukhan's FP16 library: a normal half's exponent
   and mantissa are moved into a float's and rebased by one exact multiply by 2^-112 (which
   also maps the half's infinity and NaNs to the float's); a subnormal half is its mantissa
   placed under the exponent of 0.5, minus 0.5. */
static inline float fastemb_half_to_float(uint16_t half) {
    const uint32_t shifted = (uint32_t)half << 16;
    const uint32_t sign = shifted & 0x80000000u;
    const uint32_t doubled = shifted + shifted;  /* exponent and mantissa, sign dropped */
    const float normal = fastemb_float_from_bits((doubled >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float subnormal = fastemb_float_from_bits((doubled >> 17) | (126u << 23)) - 0.5f;
    const uint32_t magnitude = doubled < (1u << 27) ? fastemb_bits_of_float(subnormal)
                                                    : fastemb_bits_of_float(normal);
    return fastemb_float_from_bits(sign | magnitude);
}

/* The IEEE binary16 nearest to a float32 (ties to even; overflow gives infinity), as FBGEMM's
   cpu_float2half_rn. Only quantization uses it (once per row), so the compiler's own
   conversion is fine: _Float16 (gcc 12 and clang on x86-64) converts correctly rounded. */
static inline uint16_t fastemb_float_to_half(float value) {
    _Float16 half = (_Float16)value;
    uint16_t bits;
    memcpy(&bits, &half, sizeof bits);
    return bits;
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

/* ---- Sums of rows with the running sums in vector registers ----
   fastemb_sum_rows_<bits>bit[_weighted](out, rows, scales, biases, weights, count, dim):
   out[j] = out[j] + value_e[j] for e = 0, 1, ..., count - 1 in that order (times weights[e]
   when weighted), value_e[j] = scales[e] * q_e[j] + biases[e], q_e the codes of rows[e].
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
/* 64 columns (32 with 16-byte vectors): 4 to 8 vectors of sums, registers left for the rest */
#define FASTEMB_QUANTIZED_BLOCK (FASTEMB_QUANTIZED_LANES == 4 ? 32 : 64)
#define FASTEMB_QUANTIZED_VECTORS (FASTEMB_QUANTIZED_BLOCK / FASTEMB_QUANTIZED_LANES)
typedef float fastemb_lanes_float __attribute__((vector_size(4 * FASTEMB_QUANTIZED_LANES)));
typedef int32_t fastemb_lanes_int __attribute__((vector_size(4 * FASTEMB_QUANTIZED_LANES)));

/* The first `count` bytes at `source` in the low bytes of a vector register. */
static inline __m128i fastemb_load_bytes(const uint8_t *source, size_t count) {
    __m128i bytes = _mm_setzero_si128();
    memcpy(&bytes, source, count);
    return bytes;
}

/* The first FASTEMB_QUANTIZED_LANES bytes of `bytes`, zero-extended to int32 lanes. */
static inline fastemb_lanes_int fastemb_widen_bytes(__m128i bytes) {
#if defined(__AVX512F__)
    return (fastemb_lanes_int)_mm512_cvtepu8_epi32(bytes);
#elif defined(__AVX2__)
    return (fastemb_lanes_int)_mm256_cvtepu8_epi32(bytes);
#else
    const __m128i zero = _mm_setzero_si128();
    return (fastemb_lanes_int)_mm_unpacklo_epi16(_mm_unpacklo_epi8(bytes, zero), zero);
#endif
}

/* The codes of FASTEMB_QUANTIZED_LANES columns from column `column` of a row, as floats. */
static inline fastemb_lanes_float fastemb_lanes_8bit(const uint8_t *codes, Py_ssize_t column) {
    return __builtin_convertvector(
        fastemb_widen_bytes(fastemb_load_bytes(codes + column, FASTEMB_QUANTIZED_LANES)),
        fastemb_lanes_float);
}

static inline fastemb_lanes_float fastemb_lanes_4bit(const uint8_t *codes, Py_ssize_t column) {
    /* each byte twice, widened: lane 2i and 2i + 1 hold byte i, then the even lanes keep the
       low nibble and the odd lanes the high one */
    static const int32_t nibble_shift[16] = {0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4};
    fastemb_lanes_int shifts;
    __m128i pairs = fastemb_load_bytes(codes + column / 2, FASTEMB_QUANTIZED_LANES / 2);
    fastemb_lanes_int doubled = fastemb_widen_bytes(_mm_unpacklo_epi8(pairs, pairs));
    memcpy(&shifts, nibble_shift, sizeof shifts);
    return __builtin_convertvector((doubled >> shifts) & 15, fastemb_lanes_float);
}

#define FASTEMB_QUANTIZED_SUM_ROWS(name, bits, COMBINE, row_loop) \
    static inline void name(float *restrict out, const uint8_t *const *rows, \
                            const float *scales, const float *biases, const float *weights, \
                            Py_ssize_t count, Py_ssize_t dim) { \
        Py_ssize_t column = 0, e; \
        (void)weights; \
        for (; column + FASTEMB_QUANTIZED_BLOCK <= dim; column += FASTEMB_QUANTIZED_BLOCK) { \
            fastemb_lanes_float acc[FASTEMB_QUANTIZED_VECTORS]; \
            _Pragma("GCC unroll 16") \
            for (int v = 0; v < FASTEMB_QUANTIZED_VECTORS; v++) \
                memcpy(&acc[v], out + column + v * FASTEMB_QUANTIZED_LANES, sizeof acc[v]); \
            for (e = 0; e < count; e++) { \
                const float scale = scales[e], bias = biases[e]; \
                _Pragma("GCC unroll 16") \
                for (int v = 0; v < FASTEMB_QUANTIZED_VECTORS; v++) { \
                    const fastemb_lanes_float value = scale * fastemb_lanes_##bits##bit( \
                        rows[e], column + v * FASTEMB_QUANTIZED_LANES) + bias; \
                    COMBINE(acc[v], value, weights[e]); \
                } \
            } \
            _Pragma("GCC unroll 16") \
            for (int v = 0; v < FASTEMB_QUANTIZED_VECTORS; v++) \
                memcpy(out + column + v * FASTEMB_QUANTIZED_LANES, &acc[v], sizeof acc[v]); \
        } \
        if (column < dim) \
            for (e = 0; e < count; e++) \
                row_loop(out + column, rows[e] + column * bits / 8, scales[e], biases[e], \
                         weights ? weights[e] : 1, dim - column); \
    }
#else  /* no vector extension: the plain loops, row by row */
#define FASTEMB_QUANTIZED_SUM_ROWS(name, bits, COMBINE, row_loop) \
    static inline void name(float *restrict out, const uint8_t *const *rows, \
                            const float *scales, const float *biases, const float *weights, \
                            Py_ssize_t count, Py_ssize_t dim) { \
        for (Py_ssize_t e = 0; e < count; e++) \
            row_loop(out, rows[e], scales[e], biases[e], weights ? weights[e] : 1, dim); \
    }
#endif
FASTEMB_QUANTIZED_SUM_ROWS(fastemb_sum_rows_8bit, 8, FASTEMB_COMBINE_ADD, fastemb_add_row_8bit)
FASTEMB_QUANTIZED_SUM_ROWS(fastemb_sum_rows_4bit, 4, FASTEMB_COMBINE_ADD, fastemb_add_row_4bit)
FASTEMB_QUANTIZED_SUM_ROWS(fastemb_sum_rows_8bit_weighted, 8, FASTEMB_COMBINE_ADD_WEIGHTED,
                           fastemb_add_weighted_row_8bit)
FASTEMB_QUANTIZED_SUM_ROWS(fastemb_sum_rows_4bit_weighted, 4, FASTEMB_COMBINE_ADD_WEIGHTED,
                           fastemb_add_weighted_row_4bit)

#endif  /* FASTEMB_QUANTIZED_H */
