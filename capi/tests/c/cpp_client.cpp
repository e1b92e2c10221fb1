/*
 * A C++17 client of the distill-kernels C ABI, built with -Wall -Wextra -pedantic -Werror and
 * run by capi/tests/c_abi.rs, as a C++ trainer or extension would use it:
 * - the header compiles as C++ (its extern "C" block, no C-only constructs);
 * - every struct it declares is standard-layout and trivially copyable (safe to build in C++
 *   and hand across the ABI);
 * - on a CPU context held by a std::unique_ptr: a forward KL with temperature, an ignored label
 *   and a std::vector gradient, against the double-precision reference below; an error call
 *   (null student) returns the status, says why, and writes nothing.
 * The CUDA paths are the C programs' and the Rust tests' (this program needs no CUDA headers).
 *
 * Usage: cpp_client SEED CUDA_EXPECTED (the second argument is accepted and ignored).
 */
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "distill_kernels.h"
#include "dk_check.h"

template <typename T>
constexpr bool plain_struct = std::is_standard_layout<T>::value && std::is_trivially_copyable<T>::value;

static_assert(plain_struct<dk_divergence_params> && plain_struct<dk_divergence_args>, "divergence");
static_assert(plain_struct<dk_scale_rows_args>, "scale_rows");
static_assert(plain_struct<dk_moe_route_params> && plain_struct<dk_moe_route_args> &&
                  plain_struct<dk_moe_permute_args> && plain_struct<dk_moe_combine_args> &&
                  plain_struct<dk_moe_slot_dot_args> &&
                  plain_struct<dk_moe_permute_backward_args> &&
                  plain_struct<dk_moe_combine_backward_args>,
              "moe");
static_assert(plain_struct<dk_fused_linear_params> && plain_struct<dk_fused_linear_args>, "fused");
static_assert(plain_struct<dk_attention_params> && plain_struct<dk_attention_batch> &&
                  plain_struct<dk_attention_args> && plain_struct<dk_attention_backward_args>,
              "attention");
static_assert(std::is_same<dk_status, std::int32_t>::value, "dk_status is int32_t");

namespace {

struct ContextDeleter {
  void operator()(dk_context* c) const noexcept { dk_context_destroy(c); }
};
using Context = std::unique_ptr<dk_context, ContextDeleter>;

double normal() {
  const double u1 = 1.0 - rng_uniform(), u2 = rng_uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

// log-softmax of x / t.
std::vector<double> log_softmax(const float* x, std::size_t v, double t) {
  std::vector<double> out(v);
  double m = -INFINITY, s = 0.0;
  for (std::size_t i = 0; i < v; ++i) m = std::fmax(m, x[i] / t);
  for (std::size_t i = 0; i < v; ++i) s += std::exp(x[i] / t - m);
  for (std::size_t i = 0; i < v; ++i) out[i] = x[i] / t - m - std::log(s);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) rng_state = std::strtoull(argv[1], nullptr, 0) | 1u;
  CHECK(std::string(dk_version()) == DK_VERSION_STRING, "dk_version %s", dk_version());
  CHECK(dk_abi_version() == DK_ABI_VERSION, "dk_abi_version %u vs the header's %u",
        static_cast<unsigned>(dk_abi_version()), static_cast<unsigned>(DK_ABI_VERSION));

  dk_context* raw = nullptr;
  CHECK(dk_context_create(-1, &raw) == DK_OK, "CPU context: %s", dk_last_error());
  const Context ctx(raw);
  if (!ctx) {
    std::printf("%d checks, %d failures\n", checks, failures);
    return 1;
  }

  // Three rows over 37 entries, row 1 ignored by its label; temperature 1.5, batchmean.
  const std::size_t n = 3, v = 37;
  const double t = 1.5;
  std::vector<float> student(n * v), teacher(n * v);
  for (auto& x : student) x = static_cast<float>(2.0 * normal());
  for (auto& x : teacher) x = static_cast<float>(2.0 * normal());
  const std::vector<std::int64_t> labels = {5, -100, 0};
  std::vector<float> grad(n * v, NAN), per_token(n, NAN);
  float loss = NAN;

  dk_divergence_params p = dk_divergence_params_default();
  p.kind = DK_FORWARD_KL;
  p.temperature = static_cast<float>(t);
  dk_divergence_args a{};
  a.n = static_cast<std::int64_t>(n);
  a.v = static_cast<std::int64_t>(v);
  a.student = student.data();
  a.student_dtype = DK_DTYPE_F32;
  a.student_stride = a.v;
  a.teacher = teacher.data();
  a.teacher_dtype = DK_DTYPE_F32;
  a.teacher_stride = a.v;
  a.labels = labels.data();
  a.loss = &loss;
  a.per_token = per_token.data();
  a.grad = grad.data();
  a.grad_stride = a.v;
  CHECK(dk_divergence(ctx.get(), &a, &p, nullptr, 0, nullptr) == DK_OK, "%s", dk_last_error());

  // Reference: KL(p || q) per valid row; gradient (q - p) / T / #valid rows.
  double want_loss = 0.0, worst_grad = 0.0;
  for (std::size_t r = 0; r < n; ++r) {
    const bool valid = labels[r] != -100;
    const auto lq = log_softmax(&student[r * v], v, t), lp = log_softmax(&teacher[r * v], v, t);
    double row = 0.0;
    for (std::size_t i = 0; i < v; ++i) {
      row += std::exp(lp[i]) * (lp[i] - lq[i]);
      const double g = valid ? (std::exp(lq[i]) - std::exp(lp[i])) / t / 2.0 : 0.0;
      worst_grad = std::fmax(worst_grad, std::fabs(grad[r * v + i] - g));
    }
    if (valid) want_loss += row / 2.0;
    const double want_row = valid ? row : 0.0;
    CHECK(std::fabs(per_token[r] - want_row) <= 1e-5 * (1.0 + want_row), "per_token[%zu] %g vs %g",
          r, static_cast<double>(per_token[r]), want_row);
  }
  CHECK(std::fabs(loss - want_loss) <= 1e-5 * (1.0 + want_loss), "loss %g vs %g",
        static_cast<double>(loss), want_loss);
  CHECK(worst_grad <= 1e-6, "gradient off by %g", worst_grad);

  // The divisor as a float in the context's memory (a token count the trainer computed), read
  // when the call runs: 4 here, twice the valid rows, so exactly half the loss and gradient.
  const float items = 4.0f;
  const std::vector<float> grad_by_count = grad;
  const float loss_by_count = loss;
  a.num_items = &items;
  CHECK(dk_divergence(ctx.get(), &a, &p, nullptr, 0, nullptr) == DK_OK, "%s", dk_last_error());
  CHECK(loss == loss_by_count / 2.0f, "num_items in memory: loss %g vs %g / 2",
        static_cast<double>(loss), static_cast<double>(loss_by_count));
  bool halved = true;
  for (std::size_t i = 0; i < grad.size(); ++i) {
    halved = halved && grad[i] == grad_by_count[i] / 2.0f;
  }
  CHECK(halved, "num_items in memory: the gradient is not half the counted one");
  p.num_items = 2.0f;  // both ways at once is refused
  CHECK(dk_divergence(ctx.get(), &a, &p, nullptr, 0, nullptr) == DK_ERR_INVALID_ARGUMENT,
        "num_items twice");
  p.num_items = 0.0f;
  a.num_items = nullptr;

  // An error: status, a message naming the argument, and nothing written.
  const std::vector<float> grad_before = grad;
  loss = -1.0f;
  a.student = nullptr;
  CHECK(dk_divergence(ctx.get(), &a, &p, nullptr, 0, nullptr) == DK_ERR_NULL_POINTER,
        "null student");
  CHECK(std::strstr(dk_last_error(), "student") != nullptr, "message: %s", dk_last_error());
  CHECK(loss == -1.0f, "loss written on error");
  CHECK(std::memcmp(grad.data(), grad_before.data(), grad.size() * sizeof(float)) == 0,
        "gradient written on error");

  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
