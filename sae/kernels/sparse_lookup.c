/* Look up entries of a sparse [rows, d_sae] matrix stored row by row: row r's entries are
 * [row_start[r], row_start[r + 1]) of `features` (ascending within the row) and `values`.
 *   sparse_lookup         out[i] = the value at (query_rows[i], query_features[i]), 0 where that
 *                         row does not hold the latent.
 *   sparse_window_lookup  the same latent in a window of rows around each query row, with the
 *                         window's tokens (a feature's context: eval/analysis.py).
 * A binary search within one row (k entries, for a TopK SAE) instead of within all of them. Each
 * returns -1 if a query row is outside [0, rows) (the output is then incomplete), else 0.
 * Built and loaded by sae/native.py; queries are split over a team of threads (team.h). */

#include <stdint.h>

#include "team.h"

/* The value of latent f in row r, 0 if the row does not hold it. */
static inline float row_value(const int64_t *row_start, const int64_t *features, const float *values,
                              int64_t r, int64_t f) {
    int64_t lo = row_start[r], hi = row_start[r + 1];  /* search [lo, hi) */
    const int64_t end = hi;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (features[mid] < f) lo = mid + 1;
        else hi = mid;
    }
    return lo < end && features[lo] == f ? values[lo] : 0.0f;
}

static int64_t sparse_lookup_span(const int64_t *row_start, int64_t rows, const int64_t *features,
                                  const float *values, const int64_t *query_rows,
                                  const int64_t *query_features, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = query_rows[i];
        if (r < 0 || r >= rows) return -1;
        out[i] = row_value(row_start, features, values, r, query_features[i]);
    }
    return 0;
}

int64_t sparse_lookup(const int64_t *row_start, int64_t rows, const int64_t *features,
                      const float *values, const int64_t *query_rows, const int64_t *query_features,
                      int64_t n, float *out, int64_t threads) {
    int64_t failed = 0;
    TEAM_PARALLEL(threads)
    {
        int64_t begin, end;
        team_share(n, &begin, &end);
        if (sparse_lookup_span(row_start, rows, features, values, query_rows + begin,
                               query_features + begin, end - begin, out + begin) != 0) {
            TEAM_ATOMIC
            failed += 1;
        }
    }
    return failed ? -1 : 0;
}

/* Queries [0, n) of sparse_window_lookup; out_* already offset to the first. */
static int64_t window_span(const int64_t *row_start, int64_t rows, const int64_t *features,
                           const float *values, const int64_t *tokens, const int64_t *query_rows,
                           const int64_t *query_features, int64_t n, int64_t window, int64_t before,
                           int64_t after, int32_t *out_tokens, float *out_values) {
    const int64_t width = before + 1 + after;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = query_rows[i], f = query_features[i];
        if (r < 0 || r >= rows) return -1;
        const int64_t position = r % window;
        for (int64_t c = 0; c < width; c++) {
            const int64_t offset = c - before, target = r + offset;
            const int inside = position + offset >= 0 && position + offset < window && target < rows;
            out_tokens[i * width + c] = inside ? (int32_t)tokens[target] : -1;
            out_values[i * width + c] = inside ? row_value(row_start, features, values, target, f) : 0.0f;
        }
    }
    return 0;
}

/* For each query (row r, latent f): out_tokens [n, width] (int32, -1 outside r's window) and
 * out_values [n, width] (the latent's value, 0 outside or where inactive) at rows r - before ..
 * r + after, where the matrix's rows are consecutive windows of `window` rows and tokens [rows]
 * holds each row's token; width = before + 1 + after. */
int64_t sparse_window_lookup(const int64_t *row_start, int64_t rows, const int64_t *features,
                             const float *values, const int64_t *tokens, const int64_t *query_rows,
                             const int64_t *query_features, int64_t n, int64_t window, int64_t before,
                             int64_t after, int32_t *out_tokens, float *out_values, int64_t threads) {
    const int64_t width = before + 1 + after;
    int64_t failed = 0;
    TEAM_PARALLEL(threads)
    {
        int64_t begin, end;
        team_share(n, &begin, &end);
        if (window_span(row_start, rows, features, values, tokens, query_rows + begin,
                        query_features + begin, end - begin, window, before, after,
                        out_tokens + begin * width, out_values + begin * width) != 0) {
            TEAM_ATOMIC
            failed += 1;
        }
    }
    return failed ? -1 : 0;
}
