/* Per-row cross-entropy and KL of next-token logits, in two passes over each row and no
 * log-probabilities written: what evaluation scores for every prediction of four forwards.
 *
 * For a row x of logits (and optionally a second row y of the same prediction, another forward):
 *   lse(x) = max(x) + log Σ e^(x - max(x))          (pass 1: the maximum; pass 2: the sums)
 *   CE(x)  = lse(x) - x[target]
 *   KL(softmax(x) || softmax(y)) = Σ p (x - y) - lse(x) + lse(y),  p = e^(x - max(x)) / Σ e^(...)
 * (Σ p = 1 turns Σ p (log p - log q) into that). A term with p = 0 adds nothing, even where x - y is
 * infinite (a -inf logit), as in the log-softmax form. The sums run in float lanes (each lane adds
 * about vocab / LANES terms of at most 1), the final combination in double. NaN in a row gives NaN.
 *
 * Why: torch's way writes each chunk's float32 log-softmax (two of them for the KL), its exp and
 * the difference, and reads them back: 0.8-1.0 s of the demo evaluation's scoring (8,000
 * predictions x 4 forwards x a 49,152-token vocabulary, 2 threads); this reads each row twice.
 * bfloat16 rows are widened into a float scratch row first (one more pass, in cache).
 * Built and loaded by sae/native.py; rows are split over a team of threads (team.h). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "team.h"
#include "vectors.h"

static inline FloatsN broadcast(float v) {
    FloatsN out;
    for (int lane = 0; lane < LANES; lane++) out[lane] = v;
    return out;
}

static inline FloatsN select_lanes(IntsN mask, FloatsN yes, FloatsN no) {
    return (FloatsN)(((IntsN)yes & mask) | ((IntsN)no & ~mask));
}

static inline FloatsN max_lanes(FloatsN a, FloatsN b) { return select_lanes(a > b, a, b); }

/* e^v per lane for v <= 0 (relative error ~2e-7): v = n ln 2 + r with |r| <= ln 2 / 2, e^r by
 * Cephes' expf polynomial, 2^n from the exponent bits. Below -87.3 (e^v under float's normal
 * range; -inf too) the result is 0. */
static inline FloatsN exp_lanes(FloatsN v) {
    const FloatsN low = broadcast(-87.33654f), round = broadcast(12582912.0f);  /* 1.5 * 2^23 */
    const IntsN underflow = v < low;
    const FloatsN x = max_lanes(v, low);
    const FloatsN n = (x * broadcast(1.44269504f) + round) - round;  /* nearest integer of x / ln 2 */
    const FloatsN r = (x - n * broadcast(0.693359375f)) - n * broadcast(-2.12194440e-4f);
    FloatsN p = broadcast(1.9875691500e-4f);
    p = p * r + broadcast(1.3981999507e-3f);
    p = p * r + broadcast(8.3334519073e-3f);
    p = p * r + broadcast(4.1665795894e-2f);
    p = p * r + broadcast(1.6666665459e-1f);
    p = p * r + broadcast(5.0000001201e-1f);
    p = p * (r * r) + r + broadcast(1.0f);
    const IntsN bits = (__builtin_convertvector(n, IntsN) + 127) << 23;
    return select_lanes(underflow, broadcast(0.0f), p * (FloatsN)bits);
}

static float row_max(const float *x, int64_t n) {
    FloatsN best = broadcast(-INFINITY);
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        FloatsN v = load_lanes(x + j);
        best = select_lanes((v > best) | (v != v), v, best);  /* NaN sticks */
    }
    float m = -INFINITY;
    for (int lane = 0; lane < LANES; lane++) m = (best[lane] > m || best[lane] != best[lane]) ? best[lane] : m;
    for (; j < n; j++) m = (x[j] > m || x[j] != x[j]) ? x[j] : m;
    return m;
}

/* Σ e^(x - mx) of a row, and where y: Σ e^(y - my) and Σ e^(x - mx) (x - y). */
static void row_sums(const float *x, const float *y, int64_t n, float mx, float my, double *sx, double *sy,
                     double *sd) {
    FloatsN ax = broadcast(0.0f), ay = broadcast(0.0f), ad = broadcast(0.0f);
    const FloatsN vmx = broadcast(mx), vmy = broadcast(my), zero = broadcast(0.0f);
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        const FloatsN vx = load_lanes(x + j), ex = exp_lanes(vx - vmx);
        ax += ex;
        if (y) {
            const FloatsN vy = load_lanes(y + j);
            ay += exp_lanes(vy - vmy);
            ad += ex * select_lanes(ex > zero, vx - vy, zero);
        }
    }
    double tx = total_lanes(ax), ty = total_lanes(ay), td = total_lanes(ad);
    for (; j < n; j++) {
        const float ex = expf(x[j] - mx);
        tx += ex;
        if (y) {
            ty += expf(y[j] - my);
            td += ex > 0.0f ? (double)ex * (double)(x[j] - y[j]) : 0.0;
        }
    }
    *sx = tx, *sy = ty, *sd = td;
}

static const float *as_floats(const void *row, int64_t bf16, int64_t n, float *wide) {
    if (!bf16) return row;
    const uint16_t *h = row;
    for (int64_t j = 0; j < n; j++) {
        uint32_t w = (uint32_t)h[j] << 16;
        memcpy(wide + j, &w, sizeof w);
    }
    return wide;
}

/* x, y: [rows] rows of `vocab` logits, row r at x + r * stride elements (float32, or bfloat16 as
 * uint16 where bf16); y may be NULL. targets [rows] in [0, vocab). Writes ce_x [rows], and where y:
 * ce_y, kl [rows]. Returns 0, -1 if scratch memory could not be allocated, -2 for a target out of
 * range (nothing is read for that row). */
int64_t logit_scores(const void *x, const void *y, int64_t bf16, int64_t rows, int64_t vocab, int64_t stride,
                     const int64_t *targets, double *ce_x, double *ce_y, double *kl, int64_t threads) {
    int64_t failed = 0;
    const size_t element = bf16 ? sizeof(uint16_t) : sizeof(float);
    TEAM_PARALLEL(threads)
    {
        int64_t begin, end;
        team_share(rows, &begin, &end);
        float *scratch = bf16 ? malloc((size_t)(2 * vocab) * sizeof(float)) : NULL;
        if (bf16 && scratch == NULL) {
            TEAM_ATOMIC
            failed |= 1;
        } else {
            for (int64_t r = begin; r < end; r++) {
                const int64_t t = targets[r];
                if (t < 0 || t >= vocab) {
                    TEAM_ATOMIC
                    failed |= 2;
                    continue;
                }
                const size_t offset = (size_t)(r * stride) * element;
                const float *row_x = as_floats((const char *)x + offset, bf16, vocab, scratch);
                const float *row_y = y ? as_floats((const char *)y + offset, bf16, vocab,
                                                   bf16 ? scratch + vocab : NULL) : NULL;
                const float mx = row_max(row_x, vocab), my = row_y ? row_max(row_y, vocab) : 0.0f;
                double sx, sy, sd;
                row_sums(row_x, row_y, vocab, mx, my, &sx, &sy, &sd);
                const double lse_x = (double)mx + log(sx);
                ce_x[r] = lse_x - (double)row_x[t];
                if (row_y) {
                    const double lse_y = (double)my + log(sy);
                    ce_y[r] = lse_y - (double)row_y[t];
                    kl[r] = sd / sx - lse_x + lse_y;
                }
            }
        }
        free(scratch);
    }
    return (failed & 2) ? -2 : (failed & 1) ? -1 : 0;
}
