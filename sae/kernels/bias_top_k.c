/* Fused bias add and top-k selection over the rows of an SAE's pre-activations.
 *
 * pre[r, :] += bias, in place, then the k largest entries of the row (values and column indices),
 * by ascending column: what a caller wanting the entries in (row, column) order would sort for (the
 * analysis: 1.5 ms a batch of 4,096 rows, k 32, 2 threads). One pass over memory instead of
 * torch's three (bias add, block maxima, gathers):
 *
 * Pass 1 (vectorised by the compiler, plain C): the row's width = 16 * nb columns form nb
 *   interleaved blocks (block b: columns b, b + nb, ..., b + 15 nb); while the bias is added and
 *   the result stored, an elementwise max over the 16 contiguous slices gives every block's maximum.
 * Pass 2 (on the row while it is still in cache): T = the k-th largest block maximum
 *   (`kth_largest_maximum`). The
 *   k blocks with the largest maxima hold k entries >= T, so the row's k-th largest entry is >= T:
 *   every entry of the top k lies in a block whose maximum is >= T and is itself >= T. Those
 *   candidates (about k of them: 32.9 for k = 32 on the demo SAE) are gathered without branches
 *   and the k largest kept by counting, for each, the candidates above it (`keep_largest`).
 *   T itself is found the same way among the few block maxima that can reach it. Branches on
 *   the data were most of pass 2's time, about half of them mispredicted (a quickselect, the
 *   scan of the blocks, a min-heap): pass 2 over [4096, 9216], k 32, 2 threads, 8.2 -> 5.4 ms.
 *   A row with many ties (more than COUNTING_MAX candidates) still goes through the heap.
 *
 * bfloat16 rows are widened to float, the bias added in float and the sum rounded to the nearest
 * even bfloat16 (torch's own bfloat16 add); the bias arrives as float (the bfloat16 bias widened).
 * A row holding NaN makes the call return nonzero, and the caller uses torch.topk for the batch.
 *
 * The refined selection at the end of the file (refined_top_k, encoder_copies) takes the top k of
 * float32 pre-activations from a bfloat16 product's candidates, certified by an error bound.
 * Built and loaded by sae/native.py; rows are split over a team of threads (team.h). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "team.h"
#include "vectors.h"

#define COUNTING_MAX 256  /* the most values whose ranks are counted (n^2 / 16 vector compares) */

static inline float bf16_to_float(uint16_t h) {
    uint32_t w = (uint32_t)h << 16;
    float f;
    memcpy(&f, &w, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t w;
    memcpy(&w, &f, sizeof w);
    uint16_t rounded = (uint16_t)((w + 0x7FFFu + ((w >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0u : rounded;
}

/* The k-th largest of a[0..n) (1 <= k <= n, no NaN); reorders a. Hoare quickselect. */
static float kth_largest(float *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, target = k - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                float t = a[i]; a[i] = a[j]; a[j] = t;
                i++; j--;
            }
        }
        if (target <= j) hi = j;
        else if (target >= i) lo = i;
        else return a[target];
    }
    return a[lo];
}

/* A min-heap of the k largest offers so far: heap[0] is the smallest kept. */
typedef struct { float *value; int64_t *index; int64_t size, k; } Heap;

static void sift_down(Heap *h, int64_t pos) {
    float v = h->value[pos];
    int64_t id = h->index[pos];
    for (;;) {
        int64_t c = 2 * pos + 1;
        if (c >= h->size) break;
        if (c + 1 < h->size && h->value[c + 1] < h->value[c]) c++;
        if (h->value[c] >= v) break;
        h->value[pos] = h->value[c]; h->index[pos] = h->index[c];
        pos = c;
    }
    h->value[pos] = v; h->index[pos] = id;
}

static void offer(Heap *h, float v, int64_t id) {
    if (h->size < h->k) {  /* sift up */
        int64_t pos = h->size++;
        while (pos > 0) {
            int64_t parent = (pos - 1) / 2;
            if (h->value[parent] <= v) break;
            h->value[pos] = h->value[parent]; h->index[pos] = h->index[parent];
            pos = parent;
        }
        h->value[pos] = v; h->index[pos] = id;
    } else if (v > h->value[0]) {
        h->value[0] = v; h->index[0] = id;
        sift_down(h, 0);
    }
}

/* values, indices [n] reordered by ascending index (insertion sort: only after the heap, rare). */
static void sort_by_column(float *values, int64_t *indices, int64_t n) {
    for (int64_t i = 1; i < n; i++) {
        const float v = values[i];
        const int64_t id = indices[i];
        int64_t j = i;
        for (; j > 0 && indices[j - 1] > id; j--) {
            values[j] = values[j - 1];
            indices[j] = indices[j - 1];
        }
        values[j] = v;
        indices[j] = id;
    }
}

#define RANKED 32  /* values whose ranks one count_above pass counts */
#define RANKED_VECTORS (RANKED / LANES)

/* For each of a[i0 .. i0 + RANKED): how many of a[0..n) are larger (`ties_before`: plus how many
 * equal ones come before it), into above[RANKED_VECTORS] (RANKED_VECTORS independent chains of
 * adds, one register each). a[n..i0 + RANKED) must be readable. */
static inline void count_above(const float *a, int64_t n, int64_t i0, int ties_before,
                               IntsN above[RANKED_VECTORS]) {
    FloatsN mine[RANKED_VECTORS];
    IntsN counts[RANKED_VECTORS], position[RANKED_VECTORS], lane_of = {0};
    for (int lane = 0; lane < LANES; lane++) lane_of[lane] = lane;
    for (int v = 0; v < RANKED_VECTORS; v++) {
        mine[v] = load_lanes(a + i0 + v * LANES);
        counts[v] = (IntsN){0};
        position[v] = lane_of + (int32_t)(i0 + v * LANES);
    }
    if (ties_before) {
        for (int64_t j = 0; j < n; j++)  /* a comparison's lanes are -1 where true */
            for (int v = 0; v < RANKED_VECTORS; v++)
                counts[v] -= (a[j] > mine[v]) | ((a[j] == mine[v]) & ((int32_t)j < position[v]));
    } else {
        for (int64_t j = 0; j < n; j++)
            for (int v = 0; v < RANKED_VECTORS; v++) counts[v] -= a[j] > mine[v];
    }
    memcpy(above, counts, sizeof counts);
}

/* a[n .. n rounded up to RANKED) = -inf (n values above each: never among the k largest); that count. */
static int64_t pad_ranked(float *a, int64_t n) {
    const int64_t padded = (n + RANKED - 1) / RANKED * RANKED;
    for (int64_t i = n; i < padded; i++) a[i] = -INFINITY;
    return padded;
}

/* The k-th largest of a[0..n) (1 <= k <= n <= COUNTING_MAX): the smallest value with fewer than
 * k values above it. a has room for n rounded up to RANKED (`pad_ranked`). */
static float kth_largest_counting(float *a, int64_t n, int64_t k) {
    const int64_t padded = pad_ranked(a, n);
    const FloatsN none = (FloatsN){0} + INFINITY;
    FloatsN best = none;  /* lane-wise smallest of the values with fewer than k above them */
    for (int64_t i0 = 0; i0 < padded; i0 += RANKED) {
        IntsN above[RANKED_VECTORS];
        count_above(a, n, i0, 0, above);
        for (int v = 0; v < RANKED_VECTORS; v++) {
            const IntsN kept = above[v] < (int32_t)k;
            const IntsN bits = (IntsN)load_lanes(a + i0 + LANES * v);
            const FloatsN mine = (FloatsN)((bits & kept) | ((IntsN)none & ~kept));
            const IntsN smaller = mine < best;
            best = (FloatsN)(((IntsN)mine & smaller) | ((IntsN)best & ~smaller));
        }
    }
    float smallest = best[0];
    for (int lane = 1; lane < LANES; lane++) smallest = best[lane] < smallest ? best[lane] : smallest;
    return smallest;
}

/* The k-th largest of maxima [nb] (k <= nb / 4; scratch: work [nb + RANKED], groups [k]), and in
 * *found the blocks that reach it (blocks [*found], ascending). k interleaved groups (group g:
 * maxima g, g + k, g + 2k, ...) each have a maximum, so k blocks reach the smallest of those: it
 * is a lower bound of the answer, reached by only two or three times k of the maxima. Those are
 * copied out without branches and their k-th largest found by counting (a quickselect where
 * there are more than COUNTING_MAX). */
static float kth_largest_maximum(const float *maxima, float *work, float *groups, int64_t *blocks,
                                 int64_t nb, int64_t k, int64_t *found) {
    memcpy(groups, maxima, (size_t)k * sizeof(float));
    for (int64_t j = 1; j < nb / k; j++) {
        const float *slice = maxima + j * k;
        for (int64_t g = 0; g < k; g++) groups[g] = groups[g] > slice[g] ? groups[g] : slice[g];
    }
    float bound = groups[0];
    for (int64_t g = 1; g < k; g++) bound = bound < groups[g] ? bound : groups[g];
    int64_t n = 0;
    for (int64_t b = 0; b < nb; b++) {
        work[n] = maxima[b];
        blocks[n] = b;
        n += maxima[b] >= bound;
    }
    float threshold;
    if (n <= COUNTING_MAX) {
        threshold = kth_largest_counting(work, n, k);
    } else {  /* many equal maxima: the quickselect reorders work, so the blocks come from maxima */
        threshold = kth_largest(work, n, k);
        memcpy(work, maxima, (size_t)nb * sizeof(float));
        for (int64_t b = 0; b < nb; b++) blocks[b] = b;
        n = nb;
    }
    int64_t chosen = 0;
    for (int64_t i = 0; i < n; i++) {  /* k blocks or a few more */
        blocks[chosen] = blocks[i];
        chosen += work[i] >= threshold;
    }
    *found = chosen;
    return threshold;
}

/* values, indices [k] = the k largest of candidates (value [n], column [n]; k <= n <= COUNTING_MAX,
 * value with room for n rounded up to RANKED), in the candidates' order: those with fewer than k
 * candidates above them, an equal one counting as above where it comes first. */
static void keep_largest(float *value, const int64_t *column, int64_t n, int64_t k, float *values,
                         int64_t *indices) {
    const int64_t padded = pad_ranked(value, n);
    int64_t kept = 0;
    for (int64_t i0 = 0; i0 < padded; i0 += RANKED) {
        IntsN above[RANKED_VECTORS];
        count_above(value, n, i0, 1, above);
        for (int lane = 0; lane < RANKED && i0 + lane < n; lane++)
            if (above[lane / LANES][lane % LANES] < k) {
                values[kept] = value[i0 + lane];
                indices[kept++] = column[i0 + lane];
            }
    }
}

/* Scratch of select_row for rows of nb blocks (16 nb columns) and k. */
typedef struct {
    int64_t *blocks;  /* [nb] */
    int64_t *column;  /* [16 nb] */
    float *work;  /* [nb + RANKED] */
    float *groups;  /* [k] */
    float *value;  /* [16 nb + RANKED] */
} Scratch;

static int64_t scratch_bytes(int64_t nb, int64_t k) {
    return (int64_t)sizeof(int64_t) * (nb + 16 * nb) + (int64_t)sizeof(float) * (nb + RANKED + k + 16 * nb + RANKED);
}

/* The Scratch at the start of `memory` (malloc's: aligned for the int64 arrays, which come first). */
static Scratch scratch_at(void *memory, int64_t nb, int64_t k) {
    Scratch s;
    s.blocks = memory;
    s.column = s.blocks + nb;
    s.work = (float *)(s.column + 16 * nb);
    s.groups = s.work + nb + RANKED;
    s.value = s.groups + k;
    return s;
}

/* Pass 2 over a row whose block maxima are in `maxima` [nb]. */
static void select_row(const float *row, const float *maxima, Scratch *scratch, int64_t nb,
                       int64_t k, float *values, int64_t *indices) {
    int64_t chosen, n = 0;
    const float threshold = kth_largest_maximum(maxima, scratch->work, scratch->groups, scratch->blocks,
                                                nb, k, &chosen);
    float *value = scratch->value;
    int64_t *column = scratch->column;
    /* slice by slice, the chosen blocks (ascending) within each: the columns come out ascending */
    for (int64_t s = 0; s < 16; s++)
        for (int64_t c = 0; c < chosen; c++) {
            const int64_t j = scratch->blocks[c] + s * nb;
            value[n] = row[j];
            column[n] = j;
            n += row[j] >= threshold;
        }
    if (n == k) {  /* the usual case: exactly the top k */
        memcpy(values, value, (size_t)k * sizeof(float));
        memcpy(indices, column, (size_t)k * sizeof(int64_t));
    } else if (n <= COUNTING_MAX) {
        keep_largest(value, column, n, k, values, indices);
    } else {  /* many ties at the threshold */
        Heap heap = {values, indices, 0, k};
        for (int64_t i = 0; i < n; i++) offer(&heap, value[i], column[i]);
        sort_by_column(values, indices, k);
    }
}

/* float32 rows [rows, width] (width = 16 nb, k <= nb). Returns the number of rows holding NaN
 * (their outputs are unspecified). */
static int64_t bias_top_k_f32_rows(void *rows_in, const float *bias, int64_t rows, int64_t width,
                                   int64_t k, void *values_out, int64_t *indices,
                                   float *scratch /* scratch_bytes, then [nb] */) {
    float *pre = rows_in, *values = values_out;
    const int64_t nb = width / 16;
    Scratch select = scratch_at(scratch, nb, k);
    float *maxima = scratch + scratch_bytes(nb, k) / (int64_t)sizeof(float);
    int64_t nan_rows = 0;
    for (int64_t r = 0; r < rows; r++) {
        float *row = pre + r * width;
        int bad = 0;
        for (int64_t b = 0; b < nb; b++) {
            float v = row[b] + bias[b];
            row[b] = v;
            maxima[b] = v;
            bad |= v != v;
        }
        for (int64_t s = 1; s < 16; s++) {
            float *slice = row + s * nb;
            const float *bias_slice = bias + s * nb;
            for (int64_t b = 0; b < nb; b++) {
                float v = slice[b] + bias_slice[b];
                slice[b] = v;
                maxima[b] = maxima[b] > v ? maxima[b] : v;
                bad |= v != v;
            }
        }
        if (bad) { nan_rows++; continue; }
        float *row_values = values + r * k;
        select_row(row, maxima, &select, nb, k, row_values, indices + r * k);
    }
    return nan_rows;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define BF16_VECTOR_PASS 1

/* 16 floats rounded to bfloat16 as float_to_bf16 rounds them. vcvtneps2bf16 rounds to nearest even
 * too, but flushes denormals to zero and keeps a NaN's payload: lanes holding those (never seen in
 * a real pre-activation) are rounded again one by one. */
static inline __m256i round16_bf16(__m512 v) {
    __m256i rounded = (__m256i)_mm512_cvtneps_pbh(v);
    const __mmask16 special = _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(0x1p-126f), _CMP_NGE_UQ)
                              & _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    if (__builtin_expect(special != 0, 0)) {
        uint16_t lanes[16];
        float floats[16];
        _mm256_storeu_si256((__m256i *)lanes, rounded);
        _mm512_storeu_ps(floats, v);
        for (int lane = 0; lane < 16; lane++)
            if (special >> lane & 1) lanes[lane] = float_to_bf16(floats[lane]);
        rounded = _mm256_loadu_si256((const __m256i *)lanes);
    }
    return rounded;
}

/* 16 bfloat16 values as floats. */
static inline __m512 widen16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

/* Columns [begin, end) of one slice of a bfloat16 row: the bias added in float and the sum rounded
 * in place, its float value into `wide`, into the block maxima (set where `first`); nonzero if a
 * sum is NaN. */
static inline int bf16_slice(uint16_t *slice, const float *bias_slice, float *wide_slice, float *maxima,
                             int64_t begin, int64_t end, int first) {
    int bad = 0;
    for (int64_t b = begin; b < end; b++) {
        uint16_t h = float_to_bf16(bf16_to_float(slice[b]) + bias_slice[b]);
        slice[b] = h;
        float v = bf16_to_float(h);
        wide_slice[b] = v;
        maxima[b] = first || v > maxima[b] ? v : maxima[b];
        bad |= v != v;
    }
    return bad;
}

/* bfloat16 rows (as uint16) [rows, width]; values out as bfloat16; bias as float (see above).
 * The row is widened into `scratch` so that pass 2 reads floats. Pass 1 goes 16 columns at a time
 * with vcvtneps2bf16 rounding where the CPU has AVX512-BF16 (the rounding by integer adds and a
 * NaN blend cost 2.2 of pass 1's 8.7 ms: [4096, 9216], k 32, 2 threads, 11.3 -> 9.1 ms in all, the
 * same bits; pass 2 is the other 2.5); a block vector's 16 slices in the inner loop instead, its
 * maximum in a register, took 12.5, and prefetching the next row during pass 2 10.1. */
static int64_t bias_top_k_bf16_rows(void *rows_in, const float *bias, int64_t rows, int64_t width,
                                    int64_t k, void *values_out, int64_t *indices,
                                    float *scratch /* scratch_bytes, then [width + nb + k] */) {
    uint16_t *pre = rows_in, *values = values_out;
    const int64_t nb = width / 16;
    Scratch select = scratch_at(scratch, nb, k);
    float *wide = scratch + scratch_bytes(nb, k) / (int64_t)sizeof(float);
    float *maxima = wide + width, *kept = maxima + nb;
#ifdef BF16_VECTOR_PASS
    const int64_t vectors_end = nb / 16 * 16;
#else
    const int64_t vectors_end = 0;
#endif
    int64_t nan_rows = 0;
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *row = pre + r * width;
        int bad = 0;
        for (int64_t s = 0; s < 16; s++) {  /* slice 0 sets the maxima, the others raise them */
            uint16_t *slice = row + s * nb;
            const float *bias_slice = bias + s * nb;
            float *wide_slice = wide + s * nb;
#ifdef BF16_VECTOR_PASS
            __mmask16 nan = 0;
            for (int64_t b = 0; b < vectors_end; b += 16) {
                const __m512 sum = _mm512_add_ps(widen16(_mm256_loadu_si256((const __m256i *)(slice + b))),
                                                 _mm512_loadu_ps(bias_slice + b));
                const __m256i rounded = round16_bf16(sum);
                _mm256_storeu_si256((__m256i *)(slice + b), rounded);
                const __m512 v = widen16(rounded);
                _mm512_storeu_ps(wide_slice + b, v);
                _mm512_storeu_ps(maxima + b, s == 0 ? v : _mm512_max_ps(_mm512_loadu_ps(maxima + b), v));
                nan |= _mm512_cmp_ps_mask(sum, sum, _CMP_UNORD_Q);
            }
            bad |= nan != 0;
#endif
            bad |= bf16_slice(slice, bias_slice, wide_slice, maxima, vectors_end, nb, s == 0);
        }
        if (bad) { nan_rows++; continue; }
        select_row(wide, maxima, &select, nb, k, kept, indices + r * k);
        for (int64_t j = 0; j < k; j++) values[r * k + j] = float_to_bf16(kept[j]);
    }
    return nan_rows;
}

typedef int64_t (*RowsKernel)(void *pre, const float *bias, int64_t rows, int64_t width, int64_t k,
                              void *values, int64_t *indices, float *scratch);

/* rows [rows, width] of `element`-byte values split over `threads` threads, each with its own
 * scratch of `scratch_floats`. The number of rows holding NaN, or -1 if scratch memory could not
 * be allocated. */
static int64_t on_team(RowsKernel kernel, size_t element, void *pre, const float *bias, int64_t rows,
                       int64_t width, int64_t k, void *values, int64_t *indices,
                       int64_t scratch_floats, int64_t threads) {
    int64_t nan_rows = 0, failed = 0;
    TEAM_PARALLEL(threads)
    {
        int64_t begin, end;
        team_share(rows, &begin, &end);
        float *scratch = malloc((size_t)scratch_floats * sizeof(float));
        if (scratch == NULL) {
            TEAM_ATOMIC
            failed += 1;
        } else {
            int64_t found = kernel((char *)pre + (size_t)(begin * width) * element, bias, end - begin,
                                   width, k, (char *)values + (size_t)(begin * k) * element,
                                   indices + begin * k, scratch);
            TEAM_ATOMIC
            nan_rows += found;
        }
        free(scratch);
    }
    return failed ? -1 : nan_rows;
}

/* The entry points (see on_team). */
int64_t bias_top_k_f32(float *pre, const float *bias, int64_t rows, int64_t width, int64_t k,
                       float *values, int64_t *indices, int64_t threads) {
    const int64_t nb = width / 16;
    return on_team(bias_top_k_f32_rows, sizeof(float), pre, bias, rows, width, k, values, indices,
                   nb + scratch_bytes(nb, k) / (int64_t)sizeof(float) + 1, threads);
}

int64_t bias_top_k_bf16(uint16_t *pre, const float *bias, int64_t rows, int64_t width, int64_t k,
                        uint16_t *values, int64_t *indices, int64_t threads) {
    const int64_t nb = width / 16;
    return on_team(bias_top_k_bf16_rows, sizeof(uint16_t), pre, bias, rows, width, k, values, indices,
                   width + nb + k + scratch_bytes(nb, k) / (int64_t)sizeof(float) + 1, threads);
}

/* ---- Refined selection: a bfloat16 product chooses, float32 decides -------------------------
 *
 * On a CPU whose bfloat16 matmuls are much faster than float32 (AMX: [4096 x 576] @ [576 x 9216]
 * in 16 against 133 ms), the top k of x @ W + b can come from the bfloat16 product without its
 * rounding reaching the answer: every latent whose bfloat16 pre-activation comes within twice the
 * error bound of the row's k-th is a candidate; their float32 pre-activations are computed exactly
 * as dot products (row_dot) and the k largest kept; and the bound shows that no other latent could
 * have come above them. A row with too many candidates is reported, and the caller computes it
 * densely in float32. The answer is the top k of float32 dot products: the float32 path's up to
 * its rounding (which already differs between BLAS builds).
 *
 * The bound, for a latent j whose bfloat16 value (bias added in float, no rounding after) is v:
 * with x~, w~ the bfloat16 roundings of x and w_j (unit roundoff u = 2^-8), s the product
 * accumulated in float32 and rounded once,
 *   |x.w - x~.w~| <= |x - x~| |w_j| + |x~| |w_j - w~_j|  (Cauchy-Schwarz),
 *   |s~ - s| <= u |s~| / (1 - u),  |s - x~.w~| <= gamma |x~| |w~_j|,
 * and the refined float32 dot differs from x.w by at most gamma |x| |w_j|, gamma = 2 d 2^-24.
 * So its float32 pre-activation lies within error(v) = u' (|v| + max |b|) + |x - x~| W + |x~| E +
 * gamma (|x~| + |x|) (W + E) of v, with W, E the largest |w_j|, |w_j - w~_j| over j
 * (`encoder_copies`) and u' = u/(1-u); v - error(v) and v + error(v) both grow with v, so bounds
 * at a threshold hold for every latent on its side (`refined_rows` chooses the threshold). On the
 * demo SAE (SmolLM2 layer 15, 9,216 latents, k 32) 13 of 16,384 rows had too many candidates, and
 * every other row's set was the float64 top k's. */

typedef uint32_t UintsN __attribute__((vector_size(4 * LANES)));
typedef uint16_t HalvesN __attribute__((vector_size(2 * LANES)));
#define COPY_VECTORS (16 / LANES)  /* a block of 16 columns */

/* float_to_bf16 lane by lane, as the high halves of 32-bit lanes (the low halves zero). */
static inline UintsN round_to_bf16_bits(FloatsN w) {
    const UintsN bits = (UintsN)w;
    const UintsN rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    const UintsN nan = (UintsN)(w != w);
    return (rounded & ~nan) | (nan & 0x7FC00000u);
}

/* Columns [16 b0, 16 b1) of encoder_copies (below) as vectors, 16 rows of W at a time: each row's
 * 16-column blocks are rounded, their squares summed into squares/errors [16 (b1 - b0)] (each
 * column's sum in row order) and kept in a 16 x 16 tile, which is then stored transposed. Reading
 * 16 rows along (not a 16-column block down all rows) lets the prefetcher follow each row. As plain
 * C over the columns (the tile written column by column) the compiler left it scalar, and plain
 * stores of the transposed lines read each line first: 11.5 -> 3.6 ms for the demo encoder
 * [576, 9216], 2 threads, caches flushed. */
static void copy_blocks(const float *W, int64_t d_in, int64_t d_sae, int64_t b0, int64_t b1, float *WT,
                        uint16_t *Wb, float *squares, float *errors) {
    float tile[16][16];
    const int lines = stream_aligned(WT, d_in);  /* WT's tile columns are whole lines: streamed */
    for (int64_t i0 = 0; i0 < d_in; i0 += 16) {
        const int64_t height = d_in - i0 < 16 ? d_in - i0 : 16;
        for (int64_t block = b0; block < b1; block++) {
            const int64_t j0 = block * 16;
            FloatsN square_sums[COPY_VECTORS], error_sums[COPY_VECTORS];
            float *block_squares = squares + (j0 - 16 * b0), *block_errors = errors + (j0 - 16 * b0);
            for (int v = 0; v < COPY_VECTORS; v++) {
                square_sums[v] = load_lanes(block_squares + LANES * v);
                error_sums[v] = load_lanes(block_errors + LANES * v);
            }
            for (int64_t r = 0; r < height; r++) {
                const float *from = W + (i0 + r) * d_sae + j0;
                uint16_t *to = Wb + (i0 + r) * d_sae + j0;
                for (int v = 0; v < COPY_VECTORS; v++) {
                    const FloatsN w = load_lanes(from + LANES * v);
                    const UintsN rounded = round_to_bf16_bits(w);
                    const HalvesN halves = __builtin_convertvector(rounded >> 16, HalvesN);
                    memcpy(to + LANES * v, &halves, sizeof halves);
                    const FloatsN e = w - (FloatsN)rounded;
                    square_sums[v] += w * w;
                    error_sums[v] += e * e;
                    memcpy(&tile[r][LANES * v], &w, sizeof w);
                }
            }
            memcpy(block_squares, square_sums, sizeof square_sums);
            memcpy(block_errors, error_sums, sizeof error_sums);
            if (height == 16 && lines) {
                for (int c = 0; c < 16; c++) {  /* a plain store would read each line first */
                    float column[16];
                    for (int r = 0; r < 16; r++) column[r] = tile[r][c];
                    stream16(WT + (j0 + c) * d_in + i0, column);
                }
            } else {
                for (int c = 0; c < 16; c++)
                    for (int64_t r = 0; r < height; r++) WT[(j0 + c) * d_in + i0 + r] = tile[r][c];
            }
        }
    }
    stream_fence();
}

/* W [d_in, d_sae] float32 -> WT [d_sae, d_in] (its transpose, for contiguous dot products) and
 * Wb [d_in, d_sae] bfloat16 (round to nearest even, as torch's .bfloat16()), with
 * stats[0] = max_j |W[:, j]| and stats[1] = max_j |W[:, j] - Wb[:, j]| (Euclidean norms).
 * Columns in blocks of 16 (copy_blocks; a last narrower block lane by lane), split over `threads`
 * threads. -1 where the per-thread sums could not be allocated. */
int64_t encoder_copies(const float *W, int64_t d_in, int64_t d_sae, float *WT, uint16_t *Wb,
                       double *stats, int64_t threads) {
    const int64_t full_blocks = d_sae / 16;
    double largest = 0.0, largest_error = 0.0;
    int64_t failed = 0;
    TEAM_PARALLEL(threads)
    {
        int64_t begin, end;
        team_share(full_blocks, &begin, &end);
        double mine = 0.0, mine_error = 0.0;
        /* float sums: relative error < d_in 2^-24 */
        float *sums = calloc((size_t)(32 * (end - begin) + 1), sizeof(float));
        if (sums == NULL) {
            TEAM_ATOMIC
            failed += 1;
        } else {
            float *squares = sums, *errors = sums + 16 * (end - begin);
            copy_blocks(W, d_in, d_sae, begin, end, WT, Wb, squares, errors);
            for (int64_t c = 0; c < 16 * (end - begin); c++) {
                mine = squares[c] > mine ? squares[c] : mine;
                mine_error = errors[c] > mine_error ? errors[c] : mine_error;
            }
        }
        free(sums);
        TEAM_CRITICAL
        {
            largest = mine > largest ? mine : largest;
            largest_error = mine_error > largest_error ? mine_error : largest_error;
        }
    }
    const int64_t j0 = 16 * full_blocks, width = d_sae - j0;  /* a last, narrower block, lane by lane */
    float squares[16] = {0}, errors[16] = {0};
    for (int64_t i = 0; i < d_in && width > 0; i++)
        for (int64_t c = 0; c < width; c++) {
            const float w = W[i * d_sae + j0 + c];
            const uint16_t h = float_to_bf16(w);
            const float e = w - bf16_to_float(h);
            Wb[i * d_sae + j0 + c] = h;
            squares[c] += w * w;
            errors[c] += e * e;
            WT[(j0 + c) * d_in + i] = w;
        }
    for (int64_t c = 0; c < width; c++) {
        largest = squares[c] > largest ? squares[c] : largest;
        largest_error = errors[c] > largest_error ? errors[c] : largest_error;
    }
    stats[0] = sqrt(largest);
    stats[1] = sqrt(largest_error);
    return failed ? -1 : 0;
}

#define REFINED_BLOCK 512  /* rows whose candidates are refined together, latent by latent */

/* The part of a row's error bound that does not depend on the value (see above): from the row x
 * [d] and its rounding xb, bounds = {W, E, max |b|}; INFINITY where the row is not finite. The
 * norms are float sums (relative error below d 2^-24, inside gamma). */
static double row_slack(const float *x, const uint16_t *xb, int64_t d, const double *bounds) {
    const double gamma = 2.0 * (double)d / 16777216.0;
    FloatsN sums_x = {0}, sums_xb = {0}, sums_error = {0};
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES) {
        const FloatsN a = load_lanes(x + i);
        IntsN bits = {0};
        for (int lane = 0; lane < LANES; lane++) bits[lane] = (int32_t)((uint32_t)xb[i + lane] << 16);
        const FloatsN ab = (FloatsN)bits, e = a - ab;
        sums_x += a * a;
        sums_xb += ab * ab;
        sums_error += e * e;
    }
    double norm_x = total_lanes(sums_x), norm_xb = total_lanes(sums_xb), norm_error = total_lanes(sums_error);
    for (; i < d; i++) {
        const double a = x[i], ab = bf16_to_float(xb[i]);
        norm_x += a * a;
        norm_xb += ab * ab;
        norm_error += (a - ab) * (a - ab);
    }
    if (!isfinite(norm_x) || !isfinite(norm_xb)) return INFINITY;
    norm_x = sqrt(norm_x);
    norm_xb = sqrt(norm_xb);
    return (sqrt(norm_error) * bounds[0] + norm_xb * bounds[1]) * (1.0 + gamma)
        + gamma * (norm_xb + norm_x) * (bounds[0] + bounds[1]);
}

#define UNIT_ROUNDOFF (1.0 / 255.0)  /* u' = u / (1 - u), u = 2^-8: one bfloat16 rounding */

/* How far a latent's float32 pre-activation can lie from its bfloat16 value v in a row of
 * `slack` (row_slack): v +- error(v). v - error(v) and v + error(v) both grow with v. */
static inline double error_at(double v, double slack, double largest_bias) {
    return UNIT_ROUNDOFF * (fabs(v) + largest_bias) + slack;
}

/* Per-thread memory of refined_rows (one malloc each; NULL members where one failed). */
typedef struct {
    void *select_memory;  /* Scratch for k */
    float *wide, *maxima;  /* [width], [nb] */
    double *reach;  /* [REFINED_BLOCK] */
    int64_t *count;  /* [REFINED_BLOCK] candidates per row */
    float *exact;  /* [REFINED_BLOCK][cap + RANKED] */
    int64_t *columns;  /* [REFINED_BLOCK][cap] */
    int32_t *starts;  /* [width + 1] */
    int32_t *order;  /* [REFINED_BLOCK * cap] */
} RefineMemory;

static int refine_memory(RefineMemory *m, int64_t width, int64_t k, int64_t cap) {
    const int64_t nb = width / 16;
    m->select_memory = malloc((size_t)scratch_bytes(nb, k));
    m->wide = malloc((size_t)(width + nb) * sizeof(float));
    m->maxima = m->wide ? m->wide + width : NULL;
    m->reach = malloc(REFINED_BLOCK * sizeof(double));
    m->count = malloc(REFINED_BLOCK * sizeof(int64_t));
    m->exact = malloc((size_t)(REFINED_BLOCK * (cap + RANKED)) * sizeof(float));
    m->columns = malloc((size_t)(REFINED_BLOCK * cap) * sizeof(int64_t));
    m->starts = malloc((size_t)(width + 1) * sizeof(int32_t));
    m->order = malloc((size_t)(REFINED_BLOCK * cap) * sizeof(int32_t));
    return m->select_memory && m->wide && m->reach && m->count && m->exact && m->columns && m->starts
        && m->order;
}

static void free_refine_memory(RefineMemory *m) {
    free(m->select_memory);
    free(m->wide);
    free(m->reach);
    free(m->count);
    free(m->exact);
    free(m->columns);
    free(m->starts);
    free(m->order);
}

/* Rows [rows) of the refined selection (see above): pre [rows, width] the bfloat16 products
 * x~ @ W~ (no bias), bias [width] float32, x [rows, d] float32, xb [rows, d] its bfloat16
 * rounding, WT [width, d]; bounds = {W, E, max |b|}. values, indices [rows, k] (by ascending
 * column) and status [rows]: 0 certified, 1 not certified (more than `cap` candidates), 2 NaN or
 * inf in the row. Returns the number of rows not certified.
 *
 * The candidates are chosen so that the bound holds by construction: with T the k-th largest
 * block maximum (k bfloat16 values >= T, so the k-th float32 value >= T - error(T)), every latent
 * whose bfloat16 value is at least floor = T - (2 + 3u') error(T) is a candidate, and any other
 * one's float32 value is below floor + error(floor) < T - error(T). A row holds as many candidates
 * as it has values that close to its k-th: ~2k on the demo SAE, more where values crowd. (A fixed
 * 2k candidates, the 2k largest, left 1.7% of the demo rows uncertified, each then computed
 * densely, and cost a larger selection, the 2k-th of the block maxima: the whole call 25.3 against
 * 15.1-15.7 ms now, demo shapes, 2 threads.)
 *
 * REFINED_BLOCK rows at a time, in three passes: each row's candidates; every candidate's dot
 * product, latent by latent (a counting sort of the block's entries), so that a row of WT is read
 * from memory once for all the block's rows that chose it and the block's rows of x (1.2 MB at
 * d 576) stay in cache; each row's k largest and the bound checked. Row by row, each dot read its
 * own row of WT from memory: the whole call 30.6 against 25.3 ms, of which the dots about 15
 * against 6 (demo SAE, [4096, 9216], k 32, 2 threads; blocks of 256 to 1024 rows alike). */
static int64_t refined_rows(const uint16_t *pre, const float *bias, const float *x, const uint16_t *xb,
                            const float *WT, const double *bounds, int64_t rows, int64_t width,
                            int64_t d, int64_t k, int64_t cap, float *values, int64_t *indices,
                            int64_t *status, RefineMemory *m) {
    const int64_t nb = width / 16, stride = cap + RANKED;
    Scratch select = scratch_at(m->select_memory, nb, k);
    float *wide = m->wide, *maxima = m->maxima;
    int64_t uncertified = 0;
    for (int64_t r0 = 0; r0 < rows; r0 += REFINED_BLOCK) {
        const int64_t block = rows - r0 < REFINED_BLOCK ? rows - r0 : REFINED_BLOCK;
        for (int64_t i = 0; i < block; i++) {  /* 1: candidates */
            const uint16_t *row = pre + (r0 + i) * width;
            int bad = 0;
            for (int64_t b = 0; b < nb; b++) {
                const float v = bf16_to_float(row[b]) + bias[b];
                wide[b] = v;
                maxima[b] = v;
                bad |= v != v;
            }
            for (int64_t s = 1; s < 16; s++) {
                const uint16_t *slice = row + s * nb;
                const float *bias_slice = bias + s * nb;
                float *wide_slice = wide + s * nb;
                for (int64_t b = 0; b < nb; b++) {
                    const float v = bf16_to_float(slice[b]) + bias_slice[b];
                    wide_slice[b] = v;
                    maxima[b] = maxima[b] > v ? maxima[b] : v;
                    bad |= v != v;
                }
            }
            m->count[i] = 0;
            status[r0 + i] = 2;
            const double slack = bad ? INFINITY : row_slack(x + (r0 + i) * d, xb + (r0 + i) * d, d, bounds);
            if (!isfinite(slack)) continue;
            int64_t ignored;
            const double top = kth_largest_maximum(maxima, select.work, select.groups, select.blocks, nb, k,
                                                   &ignored);
            const double error_top = error_at(top, slack, bounds[2]);
            const double floor_wanted = top - (2.0 + 3.0 * UNIT_ROUNDOFF) * error_top - 1e-6 * fabs(top) - 1e-30;
            float floor = (float)floor_wanted;
            if ((double)floor > floor_wanted) floor = nextafterf(floor, -INFINITY);
            int64_t chosen = 0, n = 0;
            for (int64_t b = 0; b < nb; b++) {  /* the blocks reaching floor, then their entries that do */
                select.blocks[chosen] = b;
                chosen += maxima[b] >= floor;
            }
            for (int64_t s = 0; s < 16 && n <= cap; s++)
                for (int64_t c = 0; c < chosen; c++) {
                    const int64_t j = select.blocks[c] + s * nb;
                    select.column[n] = j;
                    n += wide[j] >= floor;
                }
            status[r0 + i] = 1;
            if (n > cap) continue;  /* values crowd near the k-th: the caller computes the row densely */
            memcpy(m->columns + i * cap, select.column, (size_t)n * sizeof(int64_t));
            m->count[i] = n;
            m->reach[i] = (double)floor + error_at(floor, slack, bounds[2]);
            m->reach[i] += 1e-6 * fabs(m->reach[i]) + 1e-30;
            status[r0 + i] = 0;
        }
        memset(m->starts, 0, (size_t)(width + 1) * sizeof(int32_t));  /* 2: the dots, by latent */
        for (int64_t i = 0; i < block; i++)
            for (int64_t j = 0; j < m->count[i]; j++) m->starts[m->columns[i * cap + j] + 1]++;
        for (int64_t c = 0; c < width; c++) m->starts[c + 1] += m->starts[c];
        const int64_t entries = m->starts[width];
        for (int64_t i = 0; i < block; i++)
            for (int64_t j = 0; j < m->count[i]; j++)
                m->order[m->starts[m->columns[i * cap + j]]++] = (int32_t)(i * cap + j);
        for (int64_t e = 0; e < entries; e++) {
            const int64_t entry = m->order[e], i = entry / cap, j = entry % cap, c = m->columns[entry];
            if (e + 8 < entries) {  /* the row of WT a later entry reads, if it is another latent's */
                const int64_t later = m->columns[m->order[e + 8]];
                if (later != m->columns[m->order[e + 7]])
                    for (int64_t at = 0; at < d; at += 16) __builtin_prefetch(WT + later * d + at, 0, 3);
            }
            m->exact[i * stride + j] = row_dot(x + (r0 + i) * d, WT + c * d, d) + bias[c];
        }
        for (int64_t i = 0; i < block; i++) {  /* 3: the k largest and the bound checked */
            if (status[r0 + i] != 0) {
                uncertified++;
                continue;
            }
            float *row_values = values + (r0 + i) * k;
            keep_largest(m->exact + i * stride, m->columns + i * cap, m->count[i], k, row_values,
                         indices + (r0 + i) * k);
            float kth = row_values[0];
            for (int64_t j = 1; j < k; j++) kth = row_values[j] < kth ? row_values[j] : kth;
            const int certified = (double)kth > m->reach[i] && kth == kth;  /* by construction; checked */
            status[r0 + i] = certified ? 0 : 1;
            uncertified += !certified;
        }
    }
    return uncertified;
}

/* The refined selection over all rows, split over `threads` threads (see refined_rows; k <= width /
 * 64, k <= cap <= COUNTING_MAX). Returns the number of rows not certified, or -1 where memory could
 * not be allocated. */
int64_t refined_top_k(const uint16_t *pre, const float *bias, const float *x, const uint16_t *xb,
                      const float *WT, const double *bounds, int64_t rows, int64_t width, int64_t d,
                      int64_t k, int64_t cap, float *values, int64_t *indices, int64_t *status,
                      int64_t threads) {
    int64_t uncertified = 0, failed = 0;
    TEAM_PARALLEL(threads)
    {
        int64_t begin, end;
        team_share(rows, &begin, &end);
        RefineMemory memory;
        if (!refine_memory(&memory, width, k, cap)) {
            TEAM_ATOMIC
            failed += 1;
        } else {
            const int64_t found = refined_rows(pre + begin * width, bias, x + begin * d, xb + begin * d, WT,
                                               bounds, end - begin, width, d, k, cap, values + begin * k,
                                               indices + begin * k, status + begin, &memory);
            TEAM_ATOMIC
            uncertified += found;
        }
        free_refine_memory(&memory);
    }
    return failed ? -1 : uncertified;
}
