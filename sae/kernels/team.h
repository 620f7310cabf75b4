/* Work split over a team of threads: OpenMP where the library was built with -fopenmp (its
 * parallel regions then run on torch's own OpenMP threads: libgomp.so.1 is loaded once per
 * process, and torch loaded it first), one thread otherwise.
 *
 * Why not threads of the caller's own: after each torch op its OpenMP threads spin for a while
 * waiting for the next one, on the same cores; a kernel on other threads shared the cores with
 * them (measured bias + top-k on [4096, 9216] after a matmul, 2 cores: 26 ms on two Python pool
 * threads, 17 ms on torch's team). */

#ifndef SAEWORKS_TEAM_H
#define SAEWORKS_TEAM_H

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#define TEAM_PARALLEL(threads) _Pragma("omp parallel num_threads((int)(threads))")
static inline int64_t team_rank(void) { return omp_get_thread_num(); }
static inline int64_t team_size(void) { return omp_get_num_threads(); }
#define TEAM_ATOMIC _Pragma("omp atomic")
#define TEAM_CRITICAL _Pragma("omp critical")
#else
#define TEAM_PARALLEL(threads) (void)(threads);
static inline int64_t team_rank(void) { return 0; }
static inline int64_t team_size(void) { return 1; }
#define TEAM_ATOMIC
#define TEAM_CRITICAL
#endif

/* [*begin, *end): this thread's share of n items, as even as can be. */
static inline void team_share(int64_t n, int64_t *begin, int64_t *end) {
    const int64_t t = team_rank(), size = team_size();
    *begin = n * t / size;
    *end = n * (t + 1) / size;
}

#endif
