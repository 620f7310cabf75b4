/* GCC/Clang vector types for the kernels, at the CPU's own register width (-march=native): 16
 * floats with AVX-512, 8 with AVX, else 4 (SSE, NEON). Arithmetic on them keeps running sums in
 * registers where plain float arrays went through memory.
 *
 * Why the width is the machine's and not a fixed 16: GCC lowers a vector wider than the registers
 * badly wherever a scalar meets it. A 16-float comparison became one scalar compare per lane,
 * and `weight * row16` built the broadcast weight lane by lane on the stack and reloaded it
 * (a store-forwarding stall per entry). On a Zen 3 (AVX2, 2 threads) bias_top_k over [4096, 9216]
 * rows, k 32, took 61 ms against a 3.5 ms read of the rows, decode_error [4096, 576] 59 ms and
 * topk_backward 99 ms; an AVX-512 CPU ran the same code in 14, 4.4 and 9.5 ms. So each kernel
 * holds a block of B floats as B / LANES vectors in an array (the loops over it unroll fully), and
 * picks how many blocks it keeps in flight from the number of registers (REGISTERS). */

#ifndef SAEWORKS_VECTORS_H
#define SAEWORKS_VECTORS_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define LANES 16
#define REGISTERS 32
#elif defined(__AVX__)
#define LANES 8
#define REGISTERS 16
#elif defined(__aarch64__)
#define LANES 4
#define REGISTERS 32
#else
#define LANES 4
#define REGISTERS 16
#endif

typedef float FloatsN __attribute__((vector_size(4 * LANES)));
typedef int32_t IntsN __attribute__((vector_size(4 * LANES)));  /* a FloatsN comparison's lanes: -1 or 0 */
typedef float Floats4 __attribute__((vector_size(16)));

static inline FloatsN load_lanes(const float *from) {
    FloatsN v;
    memcpy(&v, from, sizeof v);  /* unaligned */
    return v;
}

/* The sum of v's lanes by halving down to four, then (0 + 1) + (2 + 3): a chain of scalar adds
 * per dot product was most of sparse_row_dots' time. */
static inline float total_lanes(FloatsN v) {
    float half[LANES];
    memcpy(half, &v, sizeof half);
    for (int width = LANES / 2; width >= 4; width /= 2)
        for (int lane = 0; lane < width; lane++) half[lane] += half[lane + width];
    Floats4 four;
    memcpy(&four, half, sizeof four);
    return (four[0] + four[1]) + (four[2] + four[3]);
}

/* sums[0] = the pairwise sum of sums[0 .. count) (count a power of two): ((0 + 1) + (2 + 3)) ... */
static inline FloatsN pairwise_total(FloatsN *sums, int count) {
    for (int width = count / 2; width >= 1; width /= 2)
        for (int v = 0; v < width; v++) sums[v] = sums[2 * v] + sums[2 * v + 1];
    return sums[0];
}

#define DOT_VECTORS (64 / LANES)

/* a . b over d floats, 64 at a time in DOT_VECTORS running sums: one would wait on its own adds (a
 * chain of d / LANES of them); as vector types they stay in registers (as float arrays:
 * 10.5-12.6 -> 8.2-10.1 ms for sparse_row_dots over [4096, 576], k 32). */
static inline float row_dot(const float *restrict a, const float *restrict b, int64_t d) {
    FloatsN sums[DOT_VECTORS];
    for (int v = 0; v < DOT_VECTORS; v++) sums[v] = (FloatsN){0};
    int64_t c = 0;
    for (; c + 64 <= d; c += 64)
        for (int v = 0; v < DOT_VECTORS; v++)
            sums[v] += load_lanes(a + c + LANES * v) * load_lanes(b + c + LANES * v);
    for (; c + LANES <= d; c += LANES) sums[0] += load_lanes(a + c) * load_lanes(b + c);
    float sum = 0.0f;
    for (; c < d; c++) sum += a[c] * b[c];
    return sum + total_lanes(pairwise_total(sums, DOT_VECTORS));
}

/* Whole 64-byte lines written with non-temporal stores where the CPU has them (AVX-512: one
 * store a line; AVX: two), plain stores elsewhere. A line written through the cache is first read
 * (for ownership) and evicts data the kernel reads next; a line streamed past it is neither.
 * stream_aligned: whether the lines of rows `stride` floats apart from `base` are whole lines. */
#if defined(__AVX512F__) || defined(__AVX__)
static inline int stream_aligned(const float *base, int64_t stride) {
    return ((uintptr_t)base % 64 == 0) && (stride % 16 == 0);
}
#ifdef __AVX512F__
static inline void stream16(float *to, const float *from) { _mm512_stream_ps(to, _mm512_loadu_ps(from)); }
#else
static inline void stream16(float *to, const float *from) {
    _mm256_stream_ps(to, _mm256_loadu_ps(from));
    _mm256_stream_ps(to + 8, _mm256_loadu_ps(from + 8));
}
#endif
/* Each thread orders its own streamed stores before the team's closing barrier. */
static inline void stream_fence(void) { _mm_sfence(); }
#else
static inline int stream_aligned(const float *base, int64_t stride) { (void)base; (void)stride; return 0; }
static inline void stream16(float *to, const float *from) { memcpy(to, from, 64); }
static inline void stream_fence(void) {}
#endif

#endif
