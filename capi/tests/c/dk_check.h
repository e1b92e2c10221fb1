/* Shared pieces of the C test programs: the CHECK counter macro, a seeded xorshift64* generator
 * and bf16 conversions. Header-only (static inline), C99. */
#ifndef DK_CHECK_H
#define DK_CHECK_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                      \
  do {                                                        \
    ++checks;                                                 \
    if (!(cond)) {                                            \
      ++failures;                                             \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);    \
      fprintf(stderr, __VA_ARGS__);                           \
      fprintf(stderr, "  [%s]\n", #cond);                     \
    }                                                         \
  } while (0)

/* ---- random numbers (xorshift64*) ---------------------------------------------------------- */

static uint64_t rng_state = 88172645463325252ull;

static inline uint64_t rng_next(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 2685821657736338717ull;
}

static inline double rng_uniform(void) {
  return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0);
}

/* ---- bf16 ------------------------------------------------------------------------------------ */

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even (finite inputs only) */
  return (uint16_t)(u >> 16);
}

static inline double bf16_to_double(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return (double)f;
}

#endif
