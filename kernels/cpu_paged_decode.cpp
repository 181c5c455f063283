// Decode attention on the CPU reading the KV pages in place: one query token per sequence, each (sequence,
// KV head) pair a task of at::parallel_for. For its group of query heads a task reads every key row once
// (scores), takes a float32 softmax, then reads every value row once (weighted sum); bf16 rows are widened to
// float32 one row at a time in a small buffer, so nothing of the context is gathered or converted as a whole.
// The plain-torch reference is engine/attention/torch_backend.py's gather + grouped_decode_attention.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline void widen(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void widen(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t wide = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &wide, sizeof(float));
  }
}

inline float narrow(float x, float) { return x; }
inline at::BFloat16 narrow(float x, at::BFloat16) { return at::BFloat16(x); }  // round to nearest even

template <typename T>
struct Task {
  const T* q;            // [G, D] this task's query heads
  const T* k_pages;      // [blocks, block_size, kv_heads, D]
  const T* v_pages;
  const int32_t* blocks;  // this sequence's block table
  int64_t len, block_size, kv_heads, kv_head, dim, group;
  float scale;
  T* out;                // [G, D]
};

// exp(x) for x <= 0 (scores minus their maximum) that the compiler vectorizes: 2^n * p(r), x = n ln2 + r,
// |r| <= ln2 / 2, p of degree 6 (relative error below 2e-7); exp(-87.3) underflows to ~1e-38, not to 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.3f);
  float n = std::nearbyint(x * 1.44269504089f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.f + r * (1.f + r * (0.5f + r * (0.166666672f + r * (4.16664891e-2f + r * (8.33336760e-3f +
            r * 1.38889625e-3f)))));
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

// Calls fn(row pointer of K or V, position) for every position, block by block (no division per row), and
// prefetches the next block's rows while the current one is consumed.
template <typename T, typename Fn>
inline void for_each_row(const T* pages, const Task<T>& t, Fn&& fn) {
  const int64_t stride = t.kv_heads * t.dim;
  const int64_t num_blocks = (t.len + t.block_size - 1) / t.block_size;
  for (int64_t j = 0; j < num_blocks; ++j) {
    const T* base = pages + (t.blocks[j] * t.block_size * t.kv_heads + t.kv_head) * t.dim;
    const int64_t n = std::min(t.block_size, t.len - j * t.block_size);
    if (j + 1 < num_blocks) {
      const T* next = pages + (t.blocks[j + 1] * t.block_size * t.kv_heads + t.kv_head) * t.dim;
      for (int64_t i = 0; i < std::min(t.block_size, t.len - (j + 1) * t.block_size); ++i)
        for (int64_t b = 0; b < t.dim * static_cast<int64_t>(sizeof(T)); b += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(next + i * stride) + b);
    }
    for (int64_t i = 0; i < n; ++i) fn(base + i * stride, j * t.block_size + i);
  }
}

// scratch: q (G*D) | one K/V row (D) | scores (G*len) | accumulator (G*D)
template <typename T>
void run_task(const Task<T>& t, std::vector<float>& scratch) {
  const int64_t D = t.dim, G = t.group, L = t.len;
  scratch.resize(static_cast<size_t>(G * D + D + G * L + G * D));
  float* q = scratch.data();
  float* buf = q + G * D;
  float* scores = buf + D;
  float* acc = scores + G * L;
  widen(t.q, q, G * D);
  for (int64_t i = 0; i < G * D; ++i) q[i] *= t.scale;
  for_each_row(t.k_pages, t, [&](const T* k, int64_t pos) {
    widen(k, buf, D);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < D; ++i) s += qg[i] * buf[i];
      scores[g * L + pos] = s;
    }
  });
  std::vector<float> inv_sum(G);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * L;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t pos = 0; pos < L; ++pos) m = std::max(m, sg[pos]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t pos = 0; pos < L; ++pos) {
      sg[pos] = exp_nonpositive(sg[pos] - m);
      sum += sg[pos];
    }
    inv_sum[g] = 1.f / sum;
  }
  std::fill(acc, acc + G * D, 0.f);
  for_each_row(t.v_pages, t, [&](const T* v, int64_t pos) {
    widen(v, buf, D);
    for (int64_t g = 0; g < G; ++g) {
      float p = scores[g * L + pos];
      float* ag = acc + g * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) ag[i] += p * buf[i];
    }
  });
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i) t.out[g * D + i] = narrow(acc[g * D + i] * inv_sum[g], T());
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& tables,
            const at::Tensor& lens, double scale, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_pages.size(1), kv_heads = k_pages.size(2), group = heads / kv_heads;
  const int64_t max_blocks = tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pages.data_ptr<T>();
  const T* vp = v_pages.data_ptr<T>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      const int64_t offset = (b * heads + h * group) * dim;
      Task<T> t{qp + offset, kp, vp, tp + b * max_blocks, lp[b], block_size, kv_heads, h, dim, group,
                static_cast<float>(scale), op + offset};
      run_task(t, scratch);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pages.dim() == 4 && v_pages.sizes() == k_pages.sizes(),
              "paged_decode: q [B, H, D] and pages [blocks, block_size, kv_heads, D] expected");
  TORCH_CHECK(q.size(2) == k_pages.size(3) && q.size(1) % k_pages.size(2) == 0,
              "paged_decode: head_dim or head grouping mismatch");
  TORCH_CHECK(q.scalar_type() == k_pages.scalar_type() && k_pages.scalar_type() == v_pages.scalar_type(),
              "paged_decode: q and pages must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "paged_decode: block_tables and context_lens must be int32");
  TORCH_CHECK(k_pages.is_contiguous() && v_pages.is_contiguous(), "paged_decode: pages must be contiguous");
  at::Tensor qc = q.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
  at::Tensor out = at::empty_like(qc);
  if (q.scalar_type() == at::kBFloat16) {
    decode<at::BFloat16>(qc, k_pages, v_pages, tables, lens, scale, out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "paged_decode: float32 or bfloat16 only");
    decode<float>(qc, k_pages, v_pages, tables, lens, scale, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(etr_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_tables, Tensor context_lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(etr_cpu, CPU, m) { m.impl("paged_decode", &paged_decode); }
