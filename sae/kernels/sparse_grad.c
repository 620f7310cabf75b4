/* The sparse gradients of a TopK SAE step: products with the [batch, d_sae] matrix M that holds
 * `weights[b, j]` at column `indices[b, j]` (k entries per row, nothing else).
 *
 *   W_enc's gradient [d_in, d_sae] = (M^T @ x)^T,       M holding the selected values' gradients;
 *   W_dec's gradient [d_sae, d_in] =  M^T @ grad_x_hat, M holding the selected values;
 *   the values' gradient [batch, k]: grad_x_hat[b] . W_dec[indices[b, j]]  (sparse_row_dots).
 *
 * The forward's decode is here too (decode_error): with the mse as the loss, grad_x_hat is the
 * error scaled, so the values' gradient is each error row's dots with its decoder rows, taken in
 * the forward while those rows are in cache.
 *
 * torch does the first with a CSR product and then a transposed copy into W_enc's layout (as
 * costly as the product), the other two with embedding_bag's backward (a zero-filled scatter and a
 * per-sample pass). Here the entries are counting-sorted by latent once, and every latent's slice
 * of M^T @ dense is summed in registers and written once, in the parameter's own layout. (Fusing
 * W_dec's gradient and the values' into one pass over grad_x_hat measured slower: a horizontal
 * sum per entry and chunk. So did W_dec's and W_enc's gradients in one pass over the entries,
 * gathering from both dense inputs at once: 21 against 17 ms, the two chunks and the outputs no
 * longer fit in L2. `topk_backward` shares the sort between them instead.) Built and loaded by
 * sae/native.py; latents, or rows, are split over a team of threads (team.h). */

#include <stdint.h>
#include <string.h>

#include "team.h"
#include "vectors.h"

/* Columns of `dense` per pass: [batch, 64] floats (1 MiB for a batch of 4096) stay in a core's L2.
 * 64, not 32: each pass reads every entry's row and weight again, and each gathered row segment
 * is a whole cache line pair (topk_backward, demo step: 12.3-13.0 -> 9.4-9.6 ms alone, 16 -> 14.5 ms
 * of backward in the step; 96 or 128 columns no longer fit beside the rest: 20-25 ms). */
#define CHUNK 64
#define LATENTS 16  /* latents summed before a store: a transposed store is one 64-byte line */

/* Counting sort of the n = batch * k entries by latent: offsets [d_sae + 1]; for each sorted
 * entry its batch row and its weight (rows, sorted_weights [n]), and where `second` is not NULL
 * its second weight (sorted_second [n]); cursor [d_sae] scratch. Returns -1 if an index is outside
 * [0, d_sae), else 0. */
static int64_t sort_entries(const int64_t *indices, const float *weights, const float *second,
                            int64_t n, int64_t k, int64_t d_sae, int64_t *offsets, int64_t *rows,
                            float *sorted_weights, float *sorted_second, int64_t *cursor) {
    memset(offsets, 0, (size_t)(d_sae + 1) * sizeof(int64_t));
    for (int64_t e = 0; e < n; e++) {
        int64_t s = indices[e];
        if (s < 0 || s >= d_sae) return -1;
        offsets[s + 1]++;
    }
    for (int64_t s = 0; s < d_sae; s++) offsets[s + 1] += offsets[s];
    memcpy(cursor, offsets, (size_t)d_sae * sizeof(int64_t));
    for (int64_t b = 0, e = 0; b < n / k; b++)
        for (int64_t j = 0; j < k; j++, e++) {
            int64_t slot = cursor[indices[e]]++;
            rows[slot] = b;
            sorted_weights[slot] = weights[e];
            if (second) sorted_second[slot] = second[e];
        }
    return 0;
}

int64_t sort_by_latent(const int64_t *indices, const float *weights, int64_t n, int64_t k,
                       int64_t d_sae, int64_t *offsets, int64_t *rows, float *sorted_weights,
                       int64_t *cursor) {
    return sort_entries(indices, weights, NULL, n, k, d_sae, offsets, rows, sorted_weights, NULL, cursor);
}

#define CHUNK_VECTORS (CHUNK / LANES)
/* Entries summed side by side in latent_chunk_sum: two sets of sums where the registers hold them
 * (AVX-512: 2 x 4), one set where a set alone is half the registers (AVX2: 8 of 16). */
#define CHUNK_SETS (4 * CHUNK_VECTORS <= REGISTERS ? 2 : 1)

/* sum [CHUNK] = sum over sorted entries [begin, end) of weight * dense[row] [CHUNK] (dense already
 * at the chunk's first column; row stride d). The sums stay in registers, CHUNK_SETS entries at a
 * time into as many sets: the plain loop kept them in memory, a chain of loads, adds and stores
 * per entry (one sparse_outer over [4096, 576], k 32, d_sae 9216: 14.2 -> 8.8 ms, 2 threads). */
static inline void latent_chunk_sum(const int64_t *rows, const float *sorted_weights, const float *dense,
                                    int64_t d, int64_t begin, int64_t end, float *sum) {
    FloatsN acc[CHUNK_SETS][CHUNK_VECTORS];
    for (int set = 0; set < CHUNK_SETS; set++)
        for (int v = 0; v < CHUNK_VECTORS; v++) acc[set][v] = (FloatsN){0};
    int64_t i = begin;
    for (; i + CHUNK_SETS <= end; i += CHUNK_SETS)
        for (int set = 0; set < CHUNK_SETS; set++) {
            const float *row = dense + rows[i + set] * d;
            const float w = sorted_weights[i + set];
            for (int v = 0; v < CHUNK_VECTORS; v++) acc[set][v] += w * load_lanes(row + LANES * v);
        }
    for (; i < end; i++) {
        const float *row = dense + rows[i] * d;
        const float w = sorted_weights[i];
        for (int v = 0; v < CHUNK_VECTORS; v++) acc[0][v] += w * load_lanes(row + LANES * v);
    }
    for (int set = 1; set < CHUNK_SETS; set++)
        for (int v = 0; v < CHUNK_VECTORS; v++) acc[0][v] += acc[set][v];
    memcpy(sum, acc[0], sizeof acc[0]);
}

/* Whole 64-byte lines of a gradient go out with non-temporal stores (vectors.h, stream16): the
 * 21 MB gradients are not read again in this call, and through the cache each line costs a read
 * for ownership and evicts the chunk of `dense` that the next latents gather from (both outer
 * products of a demo step, [4096, 576], k 32, d_sae 9216, 2 threads: ~10.5 -> ~8.5 ms on AVX-512;
 * the fused topk_backward on AVX2, two 32-byte stores a line: 16.8-18.6 -> 14.1-15.1 ms). */

/* Latents [s_begin, s_end) of M^T @ dense (dense [batch, d]): into out [d_sae, d] rows, or with
 * transposed != 0 into out [d, d_sae] columns. The columns of dense go CHUNK at a time, so that the
 * rows every latent gathers are read from cache, not memory (a latent's entries sit on random
 * batch rows: whole rows at a time read the 9 MB of x 32 times over). */
static void sparse_outer_span(const int64_t *offsets, const int64_t *rows, const float *sorted_weights,
                              const float *dense, int64_t d, int64_t d_sae, int64_t s_begin,
                              int64_t s_end, int64_t transposed, float *out) {
    float acc[LATENTS][CHUNK];  /* LATENTS latents' sums over one chunk of columns */
    for (int64_t c0 = 0; c0 < d; c0 += CHUNK) {
        const int64_t width = d - c0 < CHUNK ? d - c0 : CHUNK;
        for (int64_t s0 = s_begin; s0 < s_end; s0 += LATENTS) {
            const int64_t count = s_end - s0 < LATENTS ? s_end - s0 : LATENTS;
            for (int64_t t = 0; t < count; t++) {
                if (width == CHUNK) {
                    latent_chunk_sum(rows, sorted_weights, dense + c0, d, offsets[s0 + t],
                                     offsets[s0 + t + 1], acc[t]);
                    continue;
                }
                float *restrict sum = acc[t];
                memset(sum, 0, sizeof acc[t]);
                for (int64_t i = offsets[s0 + t]; i < offsets[s0 + t + 1]; i++) {
                    const float w = sorted_weights[i];
                    const float *restrict row = dense + rows[i] * d + c0;
                    for (int64_t c = 0; c < width; c++) sum[c] += w * row[c];
                }
            }
            if (width == CHUNK && count == LATENTS && stream_aligned(out, transposed ? d_sae : d)) {
                if (transposed) {
                    for (int64_t c = 0; c < width; c++) {
                        float line[LATENTS];
                        for (int64_t t = 0; t < LATENTS; t++) line[t] = acc[t][c];
                        stream16(out + (c0 + c) * d_sae + s0, line);
                    }
                } else {
                    for (int64_t t = 0; t < count; t++)
                        for (int64_t h = 0; h < CHUNK; h += 16) stream16(out + (s0 + t) * d + c0 + h, acc[t] + h);
                }
                continue;
            }
            if (transposed) {  /* column c0 + c of the LATENTS latents: one contiguous run */
                for (int64_t c = 0; c < width; c++) {
                    float *restrict line = out + (c0 + c) * d_sae + s0;
                    for (int64_t t = 0; t < count; t++) line[t] = acc[t][c];
                }
            } else {
                for (int64_t t = 0; t < count; t++) memcpy(out + (s0 + t) * d + c0, acc[t],
                                                           (size_t)width * sizeof(float));
            }
        }
    }
}

/* Latents [s_begin, s_end) of a TopK step's three sparse gradients (see topk_backward), the
 * columns CHUNK at a time as in sparse_outer_span: W_dec's rows [d_sae, d] and W_enc's columns
 * [d, d_sae], and b_enc's entries. */
static void topk_backward_span(const int64_t *offsets, const int64_t *rows, const float *sorted_values,
                               const float *sorted_grads, const float *x, const float *grad_x_hat,
                               int64_t d, int64_t d_sae, int64_t s_begin, int64_t s_end,
                               float *grad_W_dec, float *grad_W_enc, float *grad_b_enc) {
    for (int64_t s = s_begin; s < s_end; s++) {
        float total = 0.0f;
        for (int64_t i = offsets[s]; i < offsets[s + 1]; i++) total += sorted_grads[i];
        grad_b_enc[s] = total;
    }
    sparse_outer_span(offsets, rows, sorted_values, grad_x_hat, d, d_sae, s_begin, s_end, 0, grad_W_dec);
    sparse_outer_span(offsets, rows, sorted_grads, x, d, d_sae, s_begin, s_end, 1, grad_W_enc);
}

/* Rows [b_begin, b_end) of out [batch, k]: out[b, j] = dense[b] . table[indices[b, j]], table
 * [n, d] (the values' gradient of an embedding-bag decode: grad_x_hat[b] . W_dec[latent]). */
static void sparse_row_dots_span(const int64_t *indices, const float *table, const float *dense,
                                 int64_t k, int64_t d, int64_t b_begin, int64_t b_end, float *out) {
    for (int64_t b = b_begin; b < b_end; b++)
        for (int64_t j = 0; j < k; j++)
            out[b * k + j] = row_dot(dense + b * d, table + indices[b * k + j] * d, d);
}

/* Columns [c, c + 16 N) of one row's decode: sum [16 N] = sum over j < k of weights[j] *
 * table[indices[j]], 16 N / LANES sums in registers (as many chains of adds side by side). */
#define DECODE_PASS(N)                                                                             \
    static inline void decode_pass##N(const int64_t *indices, const float *weights,               \
                                      const float *table, int64_t k, int64_t d, int64_t c,         \
                                      float *sum) {                                                \
        FloatsN acc[16 * N / LANES];                                                               \
        for (int v = 0; v < 16 * N / LANES; v++) acc[v] = (FloatsN){0};                            \
        for (int64_t j = 0; j < k; j++) {                                                          \
            const float *row = table + indices[j] * d + c;                                         \
            const float w = weights[j];                                                            \
            for (int v = 0; v < 16 * N / LANES; v++) acc[v] += w * load_lanes(row + LANES * v);    \
        }                                                                                          \
        memcpy(sum, acc, sizeof acc);                                                              \
    }
DECODE_PASS(8)
DECODE_PASS(4)
DECODE_PASS(2)
DECODE_PASS(1)

/* Rows [b_begin, b_end) of decode_error (below); returns -1 if an index is outside [0, n). */
static int64_t decode_error_span(const int64_t *indices, const float *weights, const float *table,
                                 const float *bias, const float *x, int64_t n, int64_t k, int64_t d,
                                 int64_t b_begin, int64_t b_end, float *x_hat, float *error,
                                 float *squares, float *dots) {
    for (int64_t b = b_begin; b < b_end; b++) {
        const int64_t *idx = indices + b * k;
        for (int64_t j = 0; j < k; j++)
            if (idx[j] < 0 || idx[j] >= n) return -1;
        const float *w = weights + b * k, *x_row = x + b * d;
        float *hat = x_hat + b * d, *err = error + b * d;
        int64_t c = 0;
        if (8 * 16 / LANES <= REGISTERS / 2)  /* eight 16-float sums in at most half the registers */
            for (; c + 128 <= d; c += 128) decode_pass8(idx, w, table, k, d, c, hat + c);
        for (; c + 64 <= d; c += 64) decode_pass4(idx, w, table, k, d, c, hat + c);
        if (c + 32 <= d) decode_pass2(idx, w, table, k, d, c, hat + c), c += 32;
        if (c + 16 <= d) decode_pass1(idx, w, table, k, d, c, hat + c), c += 16;
        for (; c < d; c++) {
            float sum = 0.0f;
            for (int64_t j = 0; j < k; j++) sum += w[j] * table[idx[j] * d + c];
            hat[c] = sum;
        }
        FloatsN square = {0};
        float tail = 0.0f;
        for (c = 0; c + LANES <= d; c += LANES) {
            const FloatsN h = load_lanes(hat + c) + load_lanes(bias + c), e = h - load_lanes(x_row + c);
            memcpy(hat + c, &h, sizeof h);
            memcpy(err + c, &e, sizeof e);
            square += e * e;
        }
        for (; c < d; c++) {
            hat[c] += bias[c];
            err[c] = hat[c] - x_row[c];
            tail += err[c] * err[c];
        }
        squares[b] = total_lanes(square) + tail;
        for (int64_t j = 0; j < k; j++) dots[b * k + j] = row_dot(err, table + idx[j] * d, d);
    }
    return 0;
}

/* The first latent of thread t's span out of `size`: about total * t / size entries before it
 * (a few frequent latents make equal numbers of latents uneven), rounded down to a multiple of
 * LATENTS so that one thread writes each 64-byte line of a transposed gradient. */
static int64_t latent_cut(const int64_t *offsets, int64_t d_sae, int64_t t, int64_t size) {
    if (t >= size) return d_sae;
    const int64_t target = offsets[d_sae] * t / size;
    int64_t lo = 0, hi = d_sae;  /* the first latent s with offsets[s] >= target */
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (offsets[mid] < target) lo = mid + 1;
        else hi = mid;
    }
    return lo / LATENTS * LATENTS;
}

/* M^T @ dense over all latents, split over `threads` threads by entries (latent_cut). */
int64_t sparse_outer(const int64_t *offsets, const int64_t *rows, const float *sorted_weights,
                     const float *dense, int64_t d, int64_t d_sae, int64_t transposed, float *out,
                     int64_t threads) {
    TEAM_PARALLEL(threads)
    {
        const int64_t t = team_rank(), size = team_size();
        sparse_outer_span(offsets, rows, sorted_weights, dense, d, d_sae,
                          latent_cut(offsets, d_sae, t, size), latent_cut(offsets, d_sae, t + 1, size),
                          transposed, out);
        stream_fence();
    }
    return 0;
}

/* sparse_row_dots over all `batch` rows, split over `threads` threads. */
int64_t sparse_row_dots(const int64_t *indices, const float *table, const float *dense, int64_t k,
                        int64_t d, int64_t batch, float *out, int64_t threads) {
    TEAM_PARALLEL(threads)
    {
        int64_t begin, end;
        team_share(batch, &begin, &end);
        sparse_row_dots_span(indices, table, dense, k, d, begin, end, out);
    }
    return 0;
}

/* A TopK SAE step's sparse gradients from one counting sort of its entries: with
 * values [batch, k] the selected latents' (ReLU'd) values at indices [batch, k], grads [batch, k]
 * the loss's gradient with respect to their pre-activations, x [batch, d] the centred input and
 * grad_x_hat [batch, d] the reconstruction's gradient:
 *   grad_W_dec [d_sae, d] = M_values^T @ grad_x_hat,  grad_W_enc [d, d_sae] = (M_grads^T @ x)^T,
 *   grad_b_enc [d_sae] = the column sums of M_grads.
 * Scratch: offsets [d_sae + 1], rows [n], sorted_values [n], sorted_grads [n], cursor [d_sae].
 * Returns -1 if an index is outside [0, d_sae), else 0. */
int64_t topk_backward(const int64_t *indices, const float *values, const float *grads, int64_t batch,
                      int64_t k, int64_t d_sae, const float *x, const float *grad_x_hat, int64_t d,
                      float *grad_W_dec, float *grad_W_enc, float *grad_b_enc, int64_t *offsets,
                      int64_t *rows, float *sorted_values, float *sorted_grads, int64_t *cursor,
                      int64_t threads) {
    if (sort_entries(indices, values, grads, batch * k, k, d_sae, offsets, rows, sorted_values,
                     sorted_grads, cursor))
        return -1;
    TEAM_PARALLEL(threads)
    {
        const int64_t t = team_rank(), size = team_size();
        topk_backward_span(offsets, rows, sorted_values, sorted_grads, x, grad_x_hat, d, d_sae,
                           latent_cut(offsets, d_sae, t, size), latent_cut(offsets, d_sae, t + 1, size),
                           grad_W_dec, grad_W_enc, grad_b_enc);
        stream_fence();
    }
    return 0;
}

/* A TopK reconstruction and its error, each row while its k decoder rows are in cache: with
 * indices [batch, k] of table (W_dec) [n, d], weights [batch, k], bias (b_dec) [d], x [batch, d]:
 *   x_hat [batch, d] = the weighted sum of the rows + bias (the sum first, then the bias, as an
 *                      embedding bag and an add), error [batch, d] = x_hat - x,
 *   squares [batch] = each row's error . error,
 *   dots [batch, k] = error[b] . table[indices[b, j]]: half the values' gradient of the squared
 *                     error, computed here while the rows are at hand (sparse_row_dots in the
 *                     backward read them again, from memory).
 * Returns -1 if an index is outside [0, n) (the outputs are then partly written), else 0. */
int64_t decode_error(const int64_t *indices, const float *weights, const float *table, const float *bias,
                     const float *x, int64_t batch, int64_t k, int64_t n, int64_t d, float *x_hat,
                     float *error, float *squares, float *dots, int64_t threads) {
    int64_t failed = 0;
    TEAM_PARALLEL(threads)
    {
        int64_t begin, end;
        team_share(batch, &begin, &end);
        if (decode_error_span(indices, weights, table, bias, x, n, k, d, begin, end, x_hat, error,
                              squares, dots)) {
            TEAM_ATOMIC
            failed += 1;
        }
    }
    return failed ? -1 : 0;
}
