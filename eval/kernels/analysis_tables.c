/* The feature analysis' per-entry bookkeeping (eval/analysis.py), one serial pass over a batch's
 * non-zero SAE activations instead of a dozen torch ops over all of them:
 *
 *   top_stats        pass 1: count, sum and max of every latent; the entries whose key beats
 *                    their latent's worst top-N key (the candidates for the top-N table);
 *   band_candidates  pass 2: the fine histogram; each entry's band, its sample key, and the
 *                    entries that beat their band's worst sample and are not in the top-N;
 *   slot_offer       a SlotTable merge: per group the `slots` smallest (key, row) pairs.
 * (The contexts of the entries that enter a table: sparse_window_lookup in sae/kernels.)
 *
 * Each computes what the torch code in eval/analysis.py computes, bit for bit (the same float32
 * operations in the same order; the sum in entry order, as index_add_ adds). Serial: entries of one
 * latent update the same counters. Entry arrays are int64 (rows within the batch, latents), float32
 * (values) and uint8 (keep, per batch row). Each returns -1 if an index is out of range (checked
 * before anything is written), else the number of entries written. Built and loaded by sae/native.py. */

#include <stdint.h>

static const int64_t FLOAT_KEY_BASE = 0x7FFFFFFF;

/* Whether every entry's row is in [0, rows) and latent in [0, d_sae): checked before anything is
 * written, so that a bad index leaves the counters as they were. */
static int entries_in_range(const int64_t *local, const int64_t *features, int64_t n, int64_t rows,
                            int64_t d_sae) {
    for (int64_t i = 0; i < n; i++) {
        if (local[i] < 0 || local[i] >= rows || features[i] < 0 || features[i] >= d_sae) return 0;
    }
    return 1;
}

/* The key of a positive float32 value: smaller for larger values (their bits are monotone). */
static inline int64_t descending_key(float value) {
    union { float f; int32_t i; } bits = {value};
    return FLOAT_KEY_BASE - (int64_t)bits.i;
}

int64_t top_stats(const int64_t *local, const int64_t *features, const float *values, int64_t n,
                  const uint8_t *keep, int64_t rows, int64_t d_sae, int64_t *count, double *sum,
                  float *max, const int64_t *worst_keys, int64_t *candidates) {
    if (!entries_in_range(local, features, n, rows, d_sae)) return -1;
    int64_t found = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = local[i], f = features[i];
        if (!keep[r]) continue;
        const float v = values[i];
        count[f] += 1;
        sum[f] += (double)v;
        if (v > max[f]) max[f] = v;
        if (descending_key(v) < worst_keys[f]) candidates[found++] = i;
    }
    return found;
}

/* (a * c) mod 2^32 and murmur3's 32-bit finaliser, as eval/analysis.py's sample_keys. */
static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    return h ^ (h >> 16);
}

static inline int64_t sample_key(int64_t row, int64_t feature) {
    const uint32_t low = (uint32_t)((uint64_t)row & 0xFFFFFFFFu);
    const uint32_t high = (uint32_t)(((uint64_t)row >> 32) & 0xFFFFFFFFu);
    uint32_t key = fmix32(((uint32_t)feature * 0x9E3779B1u) ^ low);
    return (int64_t)fmix32(key ^ high);
}

/* Entries ahead whose histogram counter and worst band keys are prefetched: the counters of all
 * latents (19 MB on the demo SAE) leave the cache during each batch's encode, and a miss per entry
 * made the histogram most of pass 2's bookkeeping (10 ms a batch of 131,072 entries; 4 ms with
 * the prefetch, cache flushed before each batch). */
#define PREFETCH_AHEAD 32

/* The fine-histogram sub-bin of value v of a latent whose maximum is m, as eval/analysis.py's fine_bin. */
static inline int64_t fine_bin(float v, float m, int64_t sub_bins) {
    const int64_t bin = (int64_t)__builtin_ceilf((v / m) * (float)sub_bins) - 1;
    return bin < 0 ? 0 : (bin > sub_bins - 1 ? sub_bins - 1 : bin);
}

int64_t band_candidates(const int64_t *local, const int64_t *features, const float *values, int64_t n,
                        const uint8_t *keep, int64_t rows, int64_t start, int64_t d_sae,
                        const float *max, int64_t sub_bins, int64_t *fine, const float *inner_edges,
                        int64_t bands, const int64_t *top_rows, int64_t top_n,
                        const int64_t *worst_keys, int64_t *candidates, int64_t *groups,
                        int64_t *keys) {
    if (!entries_in_range(local, features, n, rows, d_sae)) return -1;
    int64_t found = 0;
    for (int64_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) {
            const int64_t j = i + PREFETCH_AHEAD, f_ahead = features[j];
            __builtin_prefetch(fine + f_ahead * sub_bins + fine_bin(values[j], max[f_ahead], sub_bins), 1);
            __builtin_prefetch(worst_keys + f_ahead * bands, 0);
        }
        const int64_t r = local[i], f = features[i];
        if (!keep[r]) continue;
        const float v = values[i], m = max[f];
        fine[f * sub_bins + fine_bin(v, m, sub_bins)] += 1;
        int64_t band = 0;
        for (int64_t b = 0; b < bands - 1; b++) band += v <= inner_edges[b] * m;
        const int64_t group = f * bands + band, row = r + start;
        const int64_t key = sample_key(row, f);
        if (key >= worst_keys[group]) continue;
        int in_top = 0;
        for (int64_t t = 0; t < top_n; t++) in_top |= top_rows[f * top_n + t] == row;
        if (in_top) continue;
        candidates[found] = i;
        groups[found] = group;
        keys[found] = key;
        found++;
    }
    return found;
}

/* Whether (key_a, row_a) sorts after (key_b, row_b): the larger key, on equal keys the later row. */
static inline int after(int64_t key_a, int64_t row_a, int64_t key_b, int64_t row_b) {
    return key_a > key_b || (key_a == key_b && row_a > row_b);
}

/* Merge candidates into per-group tables of `slots` entries ([n_groups, slots] keys and rows,
 * unordered), keeping per group the smallest (key, row) pairs; an equal pair keeps the one already
 * there (the one offered first). slot_of[i] is the slot candidate i holds at the end, or -1.
 * owner [n_groups, slots]: all -1 on entry and on return (scratch kept by the caller).
 * worst_keys [n_groups]: each group's largest key, kept up to date. Returns the candidates that
 * hold a slot at the end. */
int64_t slot_offer(const int64_t *groups, const int64_t *keys, const int64_t *rows, int64_t n,
                   int64_t n_groups, int64_t slots, int64_t *table_keys, int64_t *table_rows,
                   int64_t *worst_keys, int64_t *owner, int64_t *slot_of) {
    for (int64_t i = 0; i < n; i++) {
        if (groups[i] < 0 || groups[i] >= n_groups) return -1;
    }
    for (int64_t i = 0; i < n; i++) {
        const int64_t g = groups[i], key = keys[i], row = rows[i];
        slot_of[i] = -1;
        if (key > worst_keys[g]) continue;
        int64_t *group_keys = table_keys + g * slots, *group_rows = table_rows + g * slots;
        int64_t worst = 0;
        for (int64_t s = 1; s < slots; s++) {
            if (after(group_keys[s], group_rows[s], group_keys[worst], group_rows[worst])) worst = s;
        }
        if (!after(group_keys[worst], group_rows[worst], key, row)) continue;
        int64_t *held_by = owner + g * slots + worst;
        if (*held_by >= 0) slot_of[*held_by] = -1;  /* an earlier candidate of this call leaves */
        *held_by = i;
        slot_of[i] = worst;
        group_keys[worst] = key;
        group_rows[worst] = row;
        int64_t largest = group_keys[0];
        for (int64_t s = 1; s < slots; s++) largest = group_keys[s] > largest ? group_keys[s] : largest;
        worst_keys[g] = largest;
    }
    int64_t entered = 0;
    for (int64_t i = 0; i < n; i++) {
        if (slot_of[i] >= 0) {
            owner[groups[i] * slots + slot_of[i]] = -1;
            entered++;
        }
    }
    return entered;
}
