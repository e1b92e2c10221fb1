/*
 * Calls made while a thread exits, built and run by capi/tests/c_abi.rs.
 *
 * A common C pattern keeps a per-thread context in pthread-specific data and destroys it in the
 * key's destructor. glibc runs those destructors after the thread's Rust thread-locals may have
 * been torn down, so a dk_ call there must not touch them unguarded: the header promises that no
 * panic crosses the boundary, and a panic there would abort the process. Each worker thread:
 *  - creates a CPU context and stores it under a key whose destructor then
 *  - makes a failing call (status 1, a null pointer: the error message is recorded),
 *  - reads dk_last_error() (a valid string: the message or a note that it is unavailable),
 *  - runs a small forward-KL divergence (the CPU backend's per-thread row buffers) and compares
 *    it with the same call made while the thread was alive,
 *  - destroys the context (status 0).
 * The process must reach the end of main: an abort fails the test by its exit status.
 *
 * Usage: thread_exit_test SEED CUDA_EXPECTED (CUDA_EXPECTED is ignored: CPU contexts only)
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill_kernels.h"
#include "dk_check.h"

enum { THREADS = 4, ROWS = 3, VOCAB = 50 };

static pthread_key_t key;
static float student[ROWS * VOCAB], teacher[ROWS * VOCAB];

/* What each thread saw, written by the thread (alive, then in its key's destructor). */
typedef struct {
  dk_context* ctx;
  float loss_alive;
  dk_status failing_call;
  int message_valid;
  dk_status divergence_status;
  float loss_at_exit;
  dk_status destroy_status;
  int destructor_ran;
} report;

static report reports[THREADS];

static dk_status divergence(const dk_context* ctx, float* loss) {
  dk_divergence_args a;
  memset(&a, 0, sizeof a);
  a.n = ROWS;
  a.v = VOCAB;
  a.student = student;
  a.student_dtype = DK_DTYPE_F32;
  a.student_stride = VOCAB;
  a.teacher = teacher;
  a.teacher_dtype = DK_DTYPE_F32;
  a.teacher_stride = VOCAB;
  a.loss = loss;
  dk_divergence_params p = dk_divergence_params_default();
  return dk_divergence(ctx, &a, &p, NULL, 0, NULL);
}

static void at_exit(void* value) {
  report* r = (report*)value;
  int32_t device = 0;
  r->failing_call = dk_context_device(NULL, &device);
  const char* message = dk_last_error();
  r->message_valid = message != NULL && strlen(message) < 4096;
  r->divergence_status = divergence(r->ctx, &r->loss_at_exit);
  r->destroy_status = dk_context_destroy(r->ctx);
  r->destructor_ran = 1;
}

static void* worker(void* arg) {
  report* r = (report*)arg;
  if (dk_context_create(-1, &r->ctx) != DK_OK) return NULL;
  if (divergence(r->ctx, &r->loss_alive) != DK_OK) return NULL;
  pthread_setspecific(key, r);
  return NULL;
}

int main(int argc, char** argv) {
  uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 10) : 1;
  rng_state ^= seed * 0x9E3779B97F4A7C15ull;
  for (int i = 0; i < ROWS * VOCAB; ++i) {
    student[i] = (float)(4.0 * rng_uniform() - 2.0);
    teacher[i] = (float)(4.0 * rng_uniform() - 2.0);
  }
  CHECK(pthread_key_create(&key, at_exit) == 0, "pthread_key_create");
  pthread_t threads[THREADS];
  for (int t = 0; t < THREADS; ++t) {
    CHECK(pthread_create(&threads[t], NULL, worker, &reports[t]) == 0, "pthread_create %d", t);
  }
  for (int t = 0; t < THREADS; ++t) pthread_join(threads[t], NULL);
  for (int t = 0; t < THREADS; ++t) {
    const report* r = &reports[t];
    CHECK(r->destructor_ran, "thread %d: the key's destructor did not run", t);
    CHECK(r->failing_call == DK_ERR_NULL_POINTER, "thread %d: failing call gave %d", t,
          (int)r->failing_call);
    CHECK(r->message_valid, "thread %d: dk_last_error() at exit", t);
    CHECK(r->divergence_status == DK_OK, "thread %d: divergence at exit gave %d", t,
          (int)r->divergence_status);
    CHECK(isfinite(r->loss_alive) && r->loss_alive > 0.0f, "thread %d: loss %g", t,
          (double)r->loss_alive);
    CHECK(memcmp(&r->loss_alive, &r->loss_at_exit, sizeof(float)) == 0,
          "thread %d: loss at exit %.9g, alive %.9g", t, (double)r->loss_at_exit,
          (double)r->loss_alive);
    CHECK(r->destroy_status == DK_OK, "thread %d: destroy gave %d", t, (int)r->destroy_status);
  }
  printf("thread_exit_test: %d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
