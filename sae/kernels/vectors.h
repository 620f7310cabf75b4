/* GCC/Clang vector types for the kernels: one type = one AVX-512 register, or four SSE ones; the
 * compiler maps them onto whatever the CPU has (-march=native), and arithmetic on them keeps
 * running sums in registers where plain float arrays went through memory. */

#ifndef SAEWORKS_VECTORS_H
#define SAEWORKS_VECTORS_H

#include <stdint.h>
#include <string.h>

typedef float Floats16 __attribute__((vector_size(64)));
typedef int32_t Ints16 __attribute__((vector_size(64)));  /* a Floats16 comparison's lanes: -1 or 0 */
typedef float Floats8 __attribute__((vector_size(32)));
typedef float Floats4 __attribute__((vector_size(16)));

static inline Floats16 load16(const float *from) {
    Floats16 v;
    memcpy(&v, from, sizeof v);  /* unaligned */
    return v;
}

/* The sum of v's 16 lanes by halving (8 + 8, 4 + 4, then 4 scalars): a chain of 16 scalar adds
 * per dot product was most of sparse_row_dots' time. */
static inline float total16(Floats16 v) {
    Floats8 low, high;
    memcpy(&low, &v, sizeof low);
    memcpy(&high, (const char *)&v + sizeof low, sizeof high);
    const Floats8 eight = low + high;
    Floats4 first, second;
    memcpy(&first, &eight, sizeof first);
    memcpy(&second, (const char *)&eight + sizeof first, sizeof second);
    const Floats4 four = first + second;
    return (four[0] + four[1]) + (four[2] + four[3]);
}

#endif
