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

#endif  /* FASTEMB_QUANTIZED_H */
