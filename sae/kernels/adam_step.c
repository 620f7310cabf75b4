/* The optimiser step of an SAE on the CPU in two passes over its tensors instead of about six.
 *
 * What the step does (train/trainer.py): project each decoder row's gradient off the row, clip
 * the gradients to a global norm, Adam, zero the gradients, rescale the decoder rows to unit
 * norm. torch does these as separate ops, each a pass over 10.6M floats (the demo SAE): the
 * projection reads the gradient twice, the clip reads every gradient and writes it scaled, Adam
 * reads and writes four tensors, zero_grad and the row norms one or two more.
 *
 * Here: `row_squares` projects (where asked) and sums each row's squares in one read; Adam then
 * takes the clip coefficient as a factor on the gradient it reads anyway and rescales each decoder
 * row while the row is still in L1. The gradients are not zeroed: the caller drops them (None), so
 * that the next backward hands its own over instead of adding them to zeros.
 *
 * The sums are per row, in registers, each row by one thread; the caller adds the rows in order,
 * so the norm (hence the clip) does not depend on the number of threads. Built and loaded by
 * sae/native.py; rows are split over a team of threads (team.h). */

#include <math.h>
#include <stdint.h>

#include "team.h"
#include "vectors.h"

#define ROW_DOT_VECTORS (32 / LANES)

/* sum over c < n of a[c] * b[c], 32 at a time in ROW_DOT_VECTORS running sums. */
static float dot(const float *a, const float *b, int64_t n) {
    FloatsN sums[ROW_DOT_VECTORS];
    for (int v = 0; v < ROW_DOT_VECTORS; v++) sums[v] = (FloatsN){0};
    int64_t c = 0;
    for (; c + 32 <= n; c += 32)
        for (int v = 0; v < ROW_DOT_VECTORS; v++)
            sums[v] += load_lanes(a + c + LANES * v) * load_lanes(b + c + LANES * v);
    float sum = total_lanes(pairwise_total(sums, ROW_DOT_VECTORS));
    for (; c < n; c++) sum += a[c] * b[c];
    return sum;
}

/* For each row r of grad [rows, cols]: where `project`, grad[r] -= (grad[r] . weight[r]) weight[r]
 * (weight's rows have unit norm: what is left leaves the row's norm unchanged to first order);
 * then squares[r] = grad[r] . grad[r]. weight is not read where not `project`. */
int64_t row_squares(const float *weight, float *grad, int64_t rows, int64_t cols, int64_t project,
                    double *squares, int64_t threads) {
    TEAM_PARALLEL(threads) {
        int64_t begin, end;
        team_share(rows, &begin, &end);
        for (int64_t r = begin; r < end; r++) {
            float *g = grad + r * cols;
            if (project) {
                const float *w = weight + r * cols;
                const float parallel = dot(g, w, cols);
                for (int64_t c = 0; c < cols; c++) g[c] -= parallel * w[c];
            }
            squares[r] = (double)dot(g, g, cols);
        }
    }
    return 0;
}

/* One Adam step (torch.optim.Adam's, no weight decay, no amsgrad) on param [rows, cols], its
 * gradient multiplied by grad_factor (the clip coefficient) first; the gradient is only read.
 * step_size = lr / (1 - beta1^t), root_correction = sqrt(1 - beta2^t). Where `unit_rows`, each
 * row is then divided by its norm (at least 1e-8), as SparseAutoencoder.normalize_decoder does. */
int64_t adam_rows(float *param, const float *grad, float *exp_avg, float *exp_avg_sq, int64_t rows,
                  int64_t cols, double grad_factor, double beta1, double beta2, double step_size,
                  double root_correction, double eps, int64_t unit_rows, int64_t threads) {
    const float factor = (float)grad_factor, keep_sq = (float)beta2, add_avg = (float)(1.0 - beta1);
    const float add_sq = (float)(1.0 - beta2), size = (float)step_size, root = (float)root_correction;
    const float epsilon = (float)eps;
    TEAM_PARALLEL(threads) {
        int64_t begin, end;
        team_share(rows, &begin, &end);
        for (int64_t r = begin; r < end; r++) {
            float *p = param + r * cols;
            const float *g = grad + r * cols;
            float *m = exp_avg + r * cols, *v = exp_avg_sq + r * cols;
            for (int64_t c = 0; c < cols; c++) {
                const float scaled = g[c] * factor;
                const float mean = m[c] + add_avg * (scaled - m[c]);
                const float square = v[c] * keep_sq + add_sq * scaled * scaled;
                m[c] = mean;
                v[c] = square;
                p[c] -= size * mean / (sqrtf(square) / root + epsilon);
            }
            if (unit_rows) {
                const float norm = sqrtf(dot(p, p, cols));
                const float divisor = norm > 1e-8f ? norm : 1e-8f;
                for (int64_t c = 0; c < cols; c++) p[c] /= divisor;
            }
        }
    }
    return 0;
}
