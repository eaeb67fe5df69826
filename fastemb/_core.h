/* fastemb/_core.h: the C that fastemb's kernels use besides what Cython writes: prefetch
 * and OpenMP shims, build information, the bag kernels' unrolled vector loops, and the
 * allocator's huge-page advice. Every kernel module includes it (fastemb/_common.pxd). */
#ifndef FASTEMB_CORE_H
#define FASTEMB_CORE_H

#include <stddef.h>
#include <stdint.h>

/* ---- Prefetching, OpenMP and build information ---- */
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

/* What the CPU running this process has, for fastemb/_kernels.py to pick a build: AVX2, and
   the AVX-512 subsets the _avx512 build is compiled for (x86-64-v4: F, BW, VL, DQ). GCC and
   clang also check that the OS saves the wider registers. */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
static int fastemb_cpu_has_avx2(void) { return __builtin_cpu_supports("avx2"); }
static int fastemb_cpu_has_avx512(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
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
