// A bf16 linear of one row (a GEMV: y = W x + b) for decode at batch 1 on CPUs with AVX512-BF16. At batch 1 a
// decode step is a stream of weights read once each, so its speed is the rate at which the cores pull weight
// rows from memory. Each thread here walks one contiguous run of whole rows, one row after the other: a single
// sequential stream per core, which the hardware prefetcher follows at close to the machine's read bandwidth.
// oneDNN's GEMV on prepacked weights and kernels that walk several rows at once read at two thirds of it
// (bench/RESULTS.md). Products and sums are float32 (the AVX512-BF16 dot instruction), the bias is added in
// float32 and the result rounded to bf16 once, to nearest even. The plain-torch reference is in cpu_gemv.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <optional>

namespace {

using bf16 = c10::BFloat16;

#if defined(__AVX512BF16__)
constexpr bool kNative = true;

// The first n (< 32) bf16 of p, zeros after them.
inline __m512bh load_part(const bf16* p, int64_t n) {
  return (__m512bh)_mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << n) - 1), p);
}

inline __m512bh load(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }

float dot(const bf16* w, const bf16* x, int64_t k_size) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= k_size; k += 64) {
    a0 = _mm512_dpbf16_ps(a0, load(w + k), load(x + k));
    a1 = _mm512_dpbf16_ps(a1, load(w + k + 32), load(x + k + 32));
  }
  for (; k < k_size; k += 32) {
    const int64_t n = std::min<int64_t>(32, k_size - k);
    a0 = _mm512_dpbf16_ps(a0, load_part(w + k, n), load_part(x + k, n));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#else
constexpr bool kNative = false;  // correct everywhere, fast only with the instruction (cpu_gemv.py asks)

float dot(const bf16* w, const bf16* x, int64_t k_size) {
  float sum = 0.f;
  for (int64_t k = 0; k < k_size; ++k) sum += static_cast<float>(w[k]) * static_cast<float>(x[k]);
  return sum;
}
#endif

bool native() { return kNative; }

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "etr_cpu_gemv.gemv: bf16 input and weight expected, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(),
              "etr_cpu_gemv.gemv: a contiguous [out, in] weight expected, got sizes ", weight.sizes());
  const int64_t rows = weight.size(0), k_size = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k_size && x.numel() == k_size,
              "etr_cpu_gemv.gemv: one row of ", k_size, " inputs expected, got sizes ", x.sizes());
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kBFloat16 && bias->numel() == rows),
              "etr_cpu_gemv.gemv: a bf16 bias of ", rows, " expected");
  const at::Tensor xc = x.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = rows;
  at::Tensor y = at::empty(sizes, x.options());
  const bf16 *xp = xc.data_ptr<bf16>(), *wp = weight.data_ptr<bf16>(), *bp = bias ? b.data_ptr<bf16>() : nullptr;
  bf16* yp = y.data_ptr<bf16>();
  // One contiguous run of rows per thread (at::parallel_for splits the range evenly over the threads).
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float acc = dot(wp + r * k_size, xp, k_size);
      yp[r] = bf16(bp ? acc + static_cast<float>(bp[r]) : acc);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(etr_cpu_gemv, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("native() -> bool", &native);
}

TORCH_LIBRARY_IMPL(etr_cpu_gemv, CPU, m) { m.impl("gemv", &gemv); }
