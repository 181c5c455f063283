// Greedy decoding's argmax over each row of the logits on the CPU: the index of the first maximum, or of the first
// NaN where a row has one (torch.max(dim=-1).indices' answer). torch's reduction ran at 2-5 GB/s on this
// package's CPUs (one row of SmolLM2's 49,152 logits: ~80 us, a step's 1 % at batch 1 and 3.5 % at 16:
// bench/RESULTS.md); this one makes two vectorized passes over a row that stays in L2: its maximum (and whether
// it holds a NaN), then the first index equal to it, 16 values at a time with AVX-512. float32 or bf16 logits, rows in parallel. The plain-torch
// reference is kernels/cpu_argmax.py's ``reference``.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) { return static_cast<float>(x); }

// The first index of a row's maximum, or of its first NaN, one value at a time (the tail, and CPUs without
// AVX-512).
template <typename T>
int64_t scalar_argmax(const T* x, int64_t n) {
  int64_t at = 0;
  float best = widen(x[0]);
  for (int64_t i = 0; i < n; ++i) {
    const float v = widen(x[i]);
    if (v != v) return i;
    if (v > best) best = v, at = i;
  }
  return at;
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

template <typename T>
int64_t row_argmax(const T* x, int64_t n) {
  const int64_t whole = n / 16 * 16;
  if (whole == 0) return scalar_argmax(x, n);
  __m512 best = load16(x);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < whole; i += 16) {
    const __m512 v = load16(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_max_ps(v, best);  // NaN-free lanes only matter: a NaN anywhere is answered below
  }
  float m = _mm512_reduce_max_ps(best);
  for (int64_t i = whole; i < n; ++i) {
    const float v = widen(x[i]);
    if (v != v) nan = 1;
    m = v > m ? v : m;
  }
  if (nan) return scalar_argmax(x, n);  // rare: find the first NaN
  const __m512 target = _mm512_set1_ps(m);
  for (int64_t i = 0; i < whole; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(load16(x + i), target, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  for (int64_t i = whole; i < n; ++i)
    if (widen(x[i]) == m) return i;
  return 0;
}
#else
template <typename T>
int64_t row_argmax(const T* x, int64_t n) { return scalar_argmax(x, n); }
#endif

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "etr_cpu_argmax: [rows, n > 0] logits expected, got sizes ",
              logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "etr_cpu_argmax: float32 or bf16 logits expected, got ", logits.scalar_type());
  const at::Tensor x = logits.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (x.scalar_type() == at::kFloat) {
        o[r] = row_argmax(x.data_ptr<float>() + r * n, n);
      } else {
        o[r] = row_argmax(x.data_ptr<at::BFloat16>() + r * n, n);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(etr_cpu_argmax, m) { m.def("argmax_rows(Tensor logits) -> Tensor"); }

TORCH_LIBRARY_IMPL(etr_cpu_argmax, CPU, m) { m.impl("argmax_rows", &argmax_rows); }
