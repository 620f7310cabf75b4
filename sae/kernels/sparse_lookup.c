/* Look up entries of a sparse [rows, d_sae] matrix stored row by row: row r's entries are
 * [row_start[r], row_start[r + 1]) of `features` (ascending within the row) and `values`.
 * out[i] = the value at (query_rows[i], query_features[i]), 0 where that row does not hold the
 * latent. A binary search within one row (k entries, for a TopK SAE) instead of within all of
 * them. Returns -1 if a query row is outside [0, rows) (out is then incomplete), else 0.
 * Built and loaded by sae/native.py; queries are split over a team of threads (team.h). */

#include <stdint.h>

#include "team.h"

static int64_t sparse_lookup_span(const int64_t *row_start, int64_t rows, const int64_t *features,
                                  const float *values, const int64_t *query_rows,
                                  const int64_t *query_features, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = query_rows[i], f = query_features[i];
        if (r < 0 || r >= rows) return -1;
        int64_t lo = row_start[r], hi = row_start[r + 1];  /* search [lo, hi) */
        while (lo < hi) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (features[mid] < f) lo = mid + 1;
            else hi = mid;
        }
        out[i] = lo < row_start[r + 1] && features[lo] == f ? values[lo] : 0.0f;
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
