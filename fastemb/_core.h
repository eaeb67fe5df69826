/* fastemb/_core.h: the C that fastemb's kernels use besides what Cython writes: prefetch
 * and OpenMP shims, build information, the bag kernels' unrolled vector loops, and the
 * allocator's huge-page advice. Every kernel module includes it (fastemb/_common.pxd). */
#ifndef FASTEMB_CORE_H
#define FASTEMB_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ---- Prefetching, OpenMP and build information ---- */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
/* As volatile asm, not __builtin_prefetch: GCC takes a function whose only effects are
 * __builtin_prefetch calls for a pure one, and where it can prove the function's loop ends (it
 * can unless -fwrapv is given, as CPython's own flags do) it deletes the calls as unused: the
 * Cython prefetch helpers would compile to nothing. */
#define FASTEMB_PREFETCH(address) \
    __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)(address)))
#ifdef __PRFCHW__  /* (what __builtin_prefetch(address, 1, 3) compiles to, with or without) */
#define FASTEMB_PREFETCH_WRITE(address) \
    __asm__ volatile("prefetchw %0" : : "m"(*(const char *)(address)))
#else
#define FASTEMB_PREFETCH_WRITE(address) FASTEMB_PREFETCH(address)
#endif
#elif defined(__GNUC__) || defined(__clang__)
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

/* What the CPU running this process has, for fastemb/_kernels.py to pick a build: AVX2 (with
   F16C and FMA), and the AVX-512 subsets the _avx512 build is compiled for (x86-64-v4: F, BW,
   VL, DQ). GCC and clang also check that the OS saves the wider registers. */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
static int fastemb_cpu_has_avx2(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")
        && __builtin_cpu_supports("fma");
}
static int fastemb_cpu_has_avx512(void) {
    return fastemb_cpu_has_avx2() && __builtin_cpu_supports("avx512f")
        && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512dq");
}
#else
static int fastemb_cpu_has_avx2(void) { return 0; }
static int fastemb_cpu_has_avx512(void) { return 0; }
#endif

/* ---- Bag reductions: column blocks and their unrolled loops ---- */
#ifdef __AVX512F__
#define FASTEMB_BLOCK_BYTES 1024  /* 16 of the 32 zmm registers */
#elif defined(__AVX2__)
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
   a multiple of 32 bytes: full vectors first, then (AVX-512) a 32-byte one for the rest.
   Vector arithmetic is element by element: the same roundings in every build. */
#if defined(__GNUC__) || defined(__clang__)
#ifdef __AVX512F__
#define FASTEMB_VECTOR_BYTES 64
#elif defined(__AVX__)
#define FASTEMB_VECTOR_BYTES 32
#else
#define FASTEMB_VECTOR_BYTES 16
#endif
#define FASTEMB_SHORT_VECTOR_BYTES (FASTEMB_VECTOR_BYTES < 32 ? FASTEMB_VECTOR_BYTES : 32)
#if defined(__clang__)
#define FASTEMB_UNROLLED _Pragma("unroll")
#else
#define FASTEMB_UNROLLED _Pragma("GCC unroll 64")
#endif
/* Run `statement` for each vector of a block of `width` T's: V is the vector type and j the
   position of its first element (full vectors, then short ones for what they leave). */
#define FASTEMB_FOR_VECTORS(T, width, statement) do { { \
        Py_ssize_t j = 0; \
        typedef fastemb_vector_##T V; \
        FASTEMB_UNROLLED for (; j + FASTEMB_VECTOR_BYTES / (Py_ssize_t)sizeof(T) <= (width); \
                              j += FASTEMB_VECTOR_BYTES / sizeof(T)) { statement; } } { \
        Py_ssize_t j = (width) / (FASTEMB_VECTOR_BYTES / sizeof(T)) \
                       * (FASTEMB_VECTOR_BYTES / sizeof(T)); \
        typedef fastemb_short_vector_##T V; \
        FASTEMB_UNROLLED for (; j + FASTEMB_SHORT_VECTOR_BYTES / (Py_ssize_t)sizeof(T) <= (width); \
                              j += FASTEMB_SHORT_VECTOR_BYTES / sizeof(T)) { statement; } \
    } } while (0)
#define FASTEMB_UNROLLED_BLOCK_LOOPS(T) \
    typedef T fastemb_vector_##T __attribute__((vector_size(FASTEMB_VECTOR_BYTES), \
                                                aligned(sizeof(T)), may_alias)); \
    typedef T fastemb_short_vector_##T __attribute__((vector_size(FASTEMB_SHORT_VECTOR_BYTES), \
                                                      aligned(sizeof(T)), may_alias)); \
    static inline void fastemb_zero_##T(T *acc, Py_ssize_t width) { \
        FASTEMB_FOR_VECTORS(T, width, *(V *)(acc + j) = (V){0}); } \
    static inline void fastemb_add_##T(T *acc, const T *source, Py_ssize_t width) { \
        FASTEMB_FOR_VECTORS(T, width, *(V *)(acc + j) += *(const V *)(source + j)); } \
    static inline void fastemb_add_scaled_##T(T *acc, T weight, const T *source, \
                                              Py_ssize_t width) { \
        FASTEMB_FOR_VECTORS(T, width, *(V *)(acc + j) += weight * *(const V *)(source + j)); } \
    static inline void fastemb_store_##T(T *out, const T *acc, Py_ssize_t width) { \
        FASTEMB_FOR_VECTORS(T, width, *(V *)(out + j) = *(const V *)(acc + j)); }
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

/* ---- 16-bit tables: bfloat16 and IEEE float16 elements, read as float32 ----
   Each is its own struct type, so the kernels are specialised on it like on float and double.
   Both widen to float32 exactly: bfloat16 is the top half of a float32's bits; float16 goes
   through the compiler's _Float16 (F16C's vcvtph2ps where the build has it). */
typedef struct { uint16_t bits; } fastemb_bfloat16;
typedef struct { uint16_t bits; } fastemb_float16;

static inline float fastemb_bfloat16_value(fastemb_bfloat16 x) {
    uint32_t bits = (uint32_t)x.bits << 16;
    float value;
    memcpy(&value, &bits, sizeof(value));
    return value;
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__FLT16_MAX__)
#define FASTEMB_HAVE_FLOAT16 1
static inline float fastemb_float16_value(fastemb_float16 x) {
    _Float16 value;
    memcpy(&value, &x.bits, sizeof(value));
    return (float)value;
}
#else  /* no _Float16: widen the bits by hand (sign, exponent rebias, subnormals, inf/NaN) */
#define FASTEMB_HAVE_FLOAT16 0
static inline float fastemb_float16_value(fastemb_float16 x) {
    uint32_t sign = (uint32_t)(x.bits & 0x8000) << 16, exponent = (x.bits >> 10) & 0x1f;
    uint32_t mantissa = x.bits & 0x3ff, bits;
    float value;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000 | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else {  /* zero or subnormal: mantissa * 2**-24, exact in float32 */
        value = (float)mantissa * 5.9604644775390625e-08f;
        return sign ? -value : value;
    }
    memcpy(&value, &bits, sizeof(value));
    return value;
}
#endif

/* The float16 nearest to a float32 (ties to even; overflow gives infinity), as FBGEMM's
   cpu_float2half_rn: the compiler's _Float16 conversion (vcvtps2ph with F16C), or by hand. */
#if FASTEMB_HAVE_FLOAT16
static inline fastemb_float16 fastemb_float16_nearest(float value) {
    _Float16 half = (_Float16)value;
    fastemb_float16 rounded;
    memcpy(&rounded.bits, &half, sizeof(rounded.bits));
    return rounded;
}
#else
static inline fastemb_float16 fastemb_float16_nearest(float value) {
    uint32_t bits, magnitude, sign;
    fastemb_float16 rounded;
    memcpy(&bits, &value, sizeof(bits));
    sign = (bits >> 16) & 0x8000;
    magnitude = bits & 0x7fffffff;
    if (magnitude > 0x7f800000) {  /* NaN: keep it quiet */
        rounded.bits = (uint16_t)(sign | 0x7e00 | (magnitude >> 13));
    } else if (magnitude >= 0x477ff000) {  /* rounds past the largest half: infinity */
        rounded.bits = (uint16_t)(sign | 0x7c00);
    } else if (magnitude < 0x38800000) {  /* subnormal or zero: the float's value in 2^-24 */
        float scaled;
        memcpy(&scaled, &magnitude, sizeof(scaled));
        scaled = scaled * 16777216.0f;  /* exact */
        uint32_t units = (uint32_t)scaled, rest;
        float fraction = scaled - (float)units;
        rest = fraction > 0.5f || (fraction == 0.5f && (units & 1));
        rounded.bits = (uint16_t)(sign | (units + rest));
    } else {  /* normal: rebias, round the 13 dropped bits to nearest even */
        uint32_t kept = magnitude - (112u << 23);
        kept += 0x0fff + ((kept >> 13) & 1);
        rounded.bits = (uint16_t)(sign | (kept >> 13));
    }
    return rounded;
}
#endif

/* A float16 row widened to float32 (exact), and a float32 row rounded to the nearest float16s
   (ties to even), as the element functions above give them: F16C's vcvtph2ps / vcvtps2ph on
   16 or 8 columns at a time where the build has them (gcc converts a _Float16 loop element by
   element, which made a float16 table's SGD update 2.7x slower than a bfloat16 one's), the
   element functions for the columns left. */
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
static inline void fastemb_widen_float16_row(const fastemb_float16 *restrict row,
                                             float *restrict wide, Py_ssize_t dim) {
    Py_ssize_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= dim; j += 16)
        _mm512_storeu_ps(wide + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + j))));
#endif
#if defined(__F16C__)
    for (; j + 8 <= dim; j += 8)
        _mm256_storeu_ps(wide + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + j))));
#endif
    for (; j < dim; j++)
        wide[j] = fastemb_float16_value(row[j]);
}

static inline void fastemb_round_float16_row(const float *restrict wide,
                                             fastemb_float16 *restrict row, Py_ssize_t dim) {
    Py_ssize_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= dim; j += 16)
        _mm256_storeu_si256((__m256i *)(row + j),
                            _mm512_cvtps_ph(_mm512_loadu_ps(wide + j), _MM_FROUND_TO_NEAREST_INT));
#endif
#if defined(__F16C__)
    for (; j + 8 <= dim; j += 8)
        _mm_storeu_si128((__m128i *)(row + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(wide + j), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; j < dim; j++)
        row[j] = fastemb_float16_nearest(wide[j]);
}

/* The bfloat16 nearest to a float32 (ties to even; NaN stays a quiet NaN), as ml_dtypes and
   torch round. */
static inline fastemb_bfloat16 fastemb_bfloat16_nearest(float value) {
    uint32_t bits;
    fastemb_bfloat16 rounded;
    memcpy(&bits, &value, sizeof(bits));
    if ((bits & 0x7fffffff) > 0x7f800000)
        rounded.bits = (uint16_t)((bits >> 16) | 0x40);
    else
        rounded.bits = (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
    return rounded;
}

/* ---- Stochastic rounding of float32 to a 16-bit format ----
   A magnitude between two neighbouring 16-bit magnitudes low < x < high (consecutive bit
   patterns) becomes high with probability (x - low) / (high - low), else low: the expected
   result is x, so many small updates add up where rounding to nearest would drop them all.
   The draw is the top 32 bits of `random`. Exact values, infinities and NaN round to nearest;
   a magnitude past the largest finite one stays at it (high is infinity: probability 0). */
static inline uint16_t fastemb_round_between(uint32_t float_bits, float magnitude,
                                             uint16_t low, float low_value, float high_value,
                                             uint64_t random) {
    double chance = ((double)magnitude - low_value) / ((double)high_value - low_value);
    uint16_t sign = (uint16_t)((float_bits >> 16) & 0x8000);
    return (uint16_t)(sign | (low + ((double)(random >> 32) * 0x1p-32 < chance)));
}

/* A float32's bits, and its magnitude (its value without the sign). */
static inline uint32_t fastemb_magnitude(float value, float *magnitude) {
    uint32_t bits, magnitude_bits;
    memcpy(&bits, &value, sizeof(bits));
    magnitude_bits = bits & 0x7fffffff;
    memcpy(magnitude, &magnitude_bits, sizeof(*magnitude));
    return bits;
}

static inline fastemb_bfloat16 fastemb_bfloat16_stochastic(float value, uint64_t random) {
    float magnitude;
    uint32_t bits = fastemb_magnitude(value, &magnitude);
    fastemb_bfloat16 low = {(uint16_t)((bits & 0x7fffffff) >> 16)}, high, rounded;
    high.bits = (uint16_t)(low.bits + 1);  /* (low: the magnitude truncated) */
    if ((bits & 0x7fffffff) >= 0x7f800000 || (bits & 0xffff) == 0)
        return fastemb_bfloat16_nearest(value);  /* infinite, NaN or exact */
    rounded.bits = fastemb_round_between(bits, magnitude, low.bits, fastemb_bfloat16_value(low),
                                         fastemb_bfloat16_value(high), random);
    return rounded;
}

static inline fastemb_float16 fastemb_float16_stochastic(float value, uint64_t random) {
    float magnitude;
    uint32_t bits = fastemb_magnitude(value, &magnitude);
    fastemb_float16 low = fastemb_float16_nearest(magnitude), high, rounded;
    if ((bits & 0x7fffffff) >= 0x7f800000)
        return fastemb_float16_nearest(value);  /* infinite or NaN */
    if (fastemb_float16_value(low) > magnitude)  /* (it rounded up, perhaps to infinity) */
        low.bits = (uint16_t)(low.bits - 1);
    if (fastemb_float16_value(low) == magnitude)
        return fastemb_float16_nearest(value);  /* exact */
    high.bits = (uint16_t)(low.bits + 1);
    rounded.bits = fastemb_round_between(bits, magnitude, low.bits, fastemb_float16_value(low),
                                         fastemb_float16_value(high), random);
    return rounded;
}

/* A split float32 table's element: the float32 whose top 16 bits are `high` and low 16 bits
   `low` (joined), and a float32's 32 bits (to split it back), exactly. */
static inline float fastemb_joined(uint16_t high, uint16_t low) {
    const uint32_t bits = ((uint32_t)high << 16) | low;
    float value;
    memcpy(&value, &bits, sizeof(float));
    return value;
}

static inline uint32_t fastemb_float_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof(float));
    return bits;
}

/* splitmix64's output function: a well-mixed 64-bit hash, for counter-based random numbers
   (the draw of element (row, j) depends on the key, the row and j only: on no thread). */
static inline uint64_t fastemb_mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* The bag kernels' block loops over 16-bit rows: acc (float32) += source (times weight), a
   vector of float32 at a time, each widened from half as many bytes of the row. */
#if defined(__GNUC__) || defined(__clang__)
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
/* bfloat16: zero-extend each 16 bits to 32 and shift them to the top (vpmovzxwd, vpslld). */
#define FASTEMB_WIDEN_BFLOAT16_GENERIC(V, source) ({ \
        typedef uint16_t H __attribute__((vector_size(sizeof(V) / 2), aligned(2), may_alias)); \
        typedef uint32_t W __attribute__((vector_size(sizeof(V)))); \
        (V)(__builtin_convertvector(*(const H *)(source), W) << 16); })
static inline fastemb_vector_float fastemb_widen_bfloat16_full(const fastemb_bfloat16 *source) {
#if defined(__AVX512F__)
    return (fastemb_vector_float)_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)source)), 16);
#elif defined(__AVX2__)
    return (fastemb_vector_float)_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)source)), 16);
#else
    return FASTEMB_WIDEN_BFLOAT16_GENERIC(fastemb_vector_float, source);
#endif
}
static inline fastemb_short_vector_float fastemb_widen_bfloat16_short(
        const fastemb_bfloat16 *source) {
#if defined(__AVX2__) && FASTEMB_SHORT_VECTOR_BYTES == 32
    return (fastemb_short_vector_float)_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)source)), 16);
#else
    return FASTEMB_WIDEN_BFLOAT16_GENERIC(fastemb_short_vector_float, source);
#endif
}
#define FASTEMB_WIDEN_BFLOAT16(V, source) \
    __builtin_choose_expr(sizeof(V) == FASTEMB_VECTOR_BYTES, \
                          fastemb_widen_bfloat16_full(source), \
                          fastemb_widen_bfloat16_short(source))
/* float16: F16C's vcvtph2ps (gcc lowers a _Float16 vector conversion element by element);
   without F16C, element by element. A full vector or a short one, as V is. */
#if defined(__F16C__) && !defined(__AVX2__)
#include <immintrin.h>
#endif
#define FASTEMB_WIDEN_FLOAT16_LOOP(VECTOR, source) \
    VECTOR widened; \
    for (size_t i = 0; i < sizeof(VECTOR) / sizeof(float); i++) \
        widened[i] = fastemb_float16_value((source)[i]); \
    return widened;
static inline fastemb_vector_float fastemb_widen_float16_full(const fastemb_float16 *source) {
#if defined(__AVX512F__)
    return (fastemb_vector_float)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)source));
#elif defined(__F16C__) && FASTEMB_VECTOR_BYTES == 32
    return (fastemb_vector_float)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)source));
#else
    FASTEMB_WIDEN_FLOAT16_LOOP(fastemb_vector_float, source)
#endif
}
static inline fastemb_short_vector_float fastemb_widen_float16_short(
        const fastemb_float16 *source) {
#if defined(__F16C__) && FASTEMB_SHORT_VECTOR_BYTES == 32
    return (fastemb_short_vector_float)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)source));
#else
    FASTEMB_WIDEN_FLOAT16_LOOP(fastemb_short_vector_float, source)
#endif
}
#define FASTEMB_WIDEN_FLOAT16(V, source) \
    __builtin_choose_expr(sizeof(V) == FASTEMB_VECTOR_BYTES, \
                          fastemb_widen_float16_full(source), \
                          fastemb_widen_float16_short(source))
#endif
#if defined(FASTEMB_VECTOR_BYTES) && defined(FASTEMB_WIDEN_BFLOAT16)
#define FASTEMB_HALF_BLOCK_LOOPS(NAME, WIDEN) \
    static inline void fastemb_add_##NAME(float *acc, const fastemb_##NAME *source, \
                                          Py_ssize_t width) { \
        FASTEMB_FOR_VECTORS(float, width, *(V *)(acc + j) += WIDEN(V, source + j)); } \
    static inline void fastemb_add_scaled_##NAME(float *acc, float weight, \
                                                 const fastemb_##NAME *source, Py_ssize_t width) { \
        FASTEMB_FOR_VECTORS(float, width, *(V *)(acc + j) += weight * WIDEN(V, source + j)); }
#else
#define FASTEMB_HALF_BLOCK_LOOPS(NAME, WIDEN) \
    static inline void fastemb_add_##NAME(float *acc, const fastemb_##NAME *source, \
                                          Py_ssize_t width) { \
        for (Py_ssize_t j = 0; j < width; j++) acc[j] += fastemb_##NAME##_value(source[j]); } \
    static inline void fastemb_add_scaled_##NAME(float *acc, float weight, \
                                                 const fastemb_##NAME *source, Py_ssize_t width) { \
        for (Py_ssize_t j = 0; j < width; j++) \
            acc[j] += weight * fastemb_##NAME##_value(source[j]); }
#endif
FASTEMB_HALF_BLOCK_LOOPS(bfloat16, FASTEMB_WIDEN_BFLOAT16)
FASTEMB_HALF_BLOCK_LOOPS(float16, FASTEMB_WIDEN_FLOAT16)

/* ---- The block-cache allocator ---- */
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

#endif  /* FASTEMB_CORE_H */
