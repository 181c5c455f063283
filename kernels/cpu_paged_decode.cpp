// Decode attention on the CPU reading the KV pages in place: one query token per sequence. A task is one
// sequence's run of whole pages (a sequence is cut into several when there are fewer sequences than threads
// want work), all heads at once, so it reads each position's keys and values as one contiguous row of the
// page. For every query head it keeps a float32 running maximum, sum and weighted value sum (split-K, as in
// flash decoding); a second pass combines a sequence's parts. bf16 rows are widened to float32 one row at a
// time, so nothing of the context is gathered or converted as a whole. The plain-torch reference is
// kernels/cpu_paged_decode.py's ``reference``.

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
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t wide = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &wide, sizeof(float));
  }
}

inline float narrow(float x, float) { return x; }
inline at::BFloat16 narrow(float x, at::BFloat16) { return at::BFloat16(x); }  // round to nearest even

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

struct Shape {
  int64_t heads, kv_heads, dim, group, block_size, max_blocks;
  float scale;
};

struct Part {  // one task: sequence b, pages [first, last) of its block table, positions [first * bs, end)
  int64_t b, first, last, end;
};

// Running results of one part, per query head: maximum m, sum l, and the unnormalised weighted sum acc [D].
template <typename T>
void run_part(const Part& part, const Shape& s, const T* q_all, const T* k_pages, const T* v_pages,
              const int32_t* tables, float* m, float* l, float* acc, std::vector<float>& scratch) {
  const int64_t H = s.heads, D = s.dim, G = s.group, row = s.kv_heads * D, bs = s.block_size;
  const int64_t begin = part.first * bs, n = part.end - begin;
  scratch.resize(static_cast<size_t>(H * D + row + H * n));
  float* q = scratch.data();
  float* buf = q + H * D;
  float* scores = buf + row;  // [H, n]
  widen(q_all + part.b * H * D, q, H * D);
  for (int64_t i = 0; i < H * D; ++i) q[i] *= s.scale;
  const int32_t* blocks = tables + part.b * s.max_blocks;
  auto each_row = [&](const T* pages, auto&& fn) {
    for (int64_t j = part.first; j < part.last; ++j) {
      const T* base = pages + static_cast<int64_t>(blocks[j]) * bs * row;
      if (j + 1 < part.last) {
        const char* next = reinterpret_cast<const char*>(pages + static_cast<int64_t>(blocks[j + 1]) * bs * row);
        for (int64_t b = 0; b < bs * row * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(next + b);
      }
      const int64_t count = std::min(bs, part.end - j * bs);
      for (int64_t i = 0; i < count; ++i) fn(base + i * row, j * bs + i - begin);
    }
  };
  each_row(k_pages, [&](const T* k, int64_t pos) {
    widen(k, buf, row);
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = q + h * D;
      const float* kh = buf + (h / G) * D;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < D; ++i) dot += qh[i] * kh[i];
      scores[h * n + pos] = dot;
    }
  });
  for (int64_t h = 0; h < H; ++h) {
    float* sh = scores + h * n;
    float mh = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) mh = std::max(mh, sh[i]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      sh[i] = exp_nonpositive(sh[i] - mh);
      sum += sh[i];
    }
    m[h] = mh;
    l[h] = sum;
  }
  std::fill(acc, acc + H * D, 0.f);
  each_row(v_pages, [&](const T* v, int64_t pos) {
    widen(v, buf, row);
    for (int64_t h = 0; h < H; ++h) {
      const float p = scores[h * n + pos];
      const float* vh = buf + (h / G) * D;
      float* ah = acc + h * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) ah[i] += p * vh[i];
    }
  });
}

// Tasks: every sequence cut into runs of whole pages of at least MIN_PART_POSITIONS positions, so that there
// are about TASKS_PER_THREAD tasks per thread when sequences are few and long.
constexpr int64_t MIN_PART_POSITIONS = 256;
constexpr int64_t TASKS_PER_THREAD = 4;

std::vector<Part> plan(const int32_t* lens, const int32_t* tables, int64_t batch, int64_t bs, int64_t max_blocks,
                       int64_t num_blocks) {
  int64_t total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] >= 1, "paged_decode: context_lens[", b, "] = ", lens[b], " (must be >= 1)");
    const int64_t used = (lens[b] + bs - 1) / bs;
    TORCH_CHECK(used <= max_blocks, "paged_decode: context_lens[", b, "] = ", lens[b], " needs ", used,
                " pages; block_tables has ", max_blocks, " columns");
    for (int64_t j = 0; j < used; ++j) {
      const int32_t page = tables[b * max_blocks + j];
      TORCH_CHECK(page >= 0 && page < num_blocks, "paged_decode: block_tables[", b, ", ", j, "] = ", page,
                  " is not a page of the ", num_blocks, " in the cache");
    }
    total += lens[b];
  }
  const int64_t want = TASKS_PER_THREAD * at::get_num_threads();
  const int64_t positions = std::max(MIN_PART_POSITIONS, (total + want - 1) / want);
  const int64_t pages = std::max<int64_t>(1, (positions + bs - 1) / bs);
  std::vector<Part> parts;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t used = (lens[b] + bs - 1) / bs;
    for (int64_t first = 0; first < used; first += pages)
      parts.push_back({b, first, std::min(used, first + pages), std::min<int64_t>(lens[b], (first + pages) * bs)});
  }
  return parts;
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& tables,
            const at::Tensor& lens, double scale, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const Shape s{heads, k_pages.size(2), dim, heads / k_pages.size(2), k_pages.size(1), tables.size(1),
                static_cast<float>(scale)};
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const std::vector<Part> parts = plan(lp, tp, batch, s.block_size, s.max_blocks, k_pages.size(0));
  const int64_t P = static_cast<int64_t>(parts.size());
  std::vector<float> m(P * heads), l(P * heads), acc(P * heads * dim);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pages.data_ptr<T>();
  const T* vp = v_pages.data_ptr<T>();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t i = begin; i < end; ++i)
      run_part(parts[i], s, qp, kp, vp, tp, &m[i * heads], &l[i * heads], &acc[i * heads * dim], scratch);
  });
  // Combine each sequence's parts (consecutive in `parts`): rescale to the largest maximum, then normalise.
  T* op = out.data_ptr<T>();
  std::vector<int64_t> first_part(batch + 1, P);
  for (int64_t i = P - 1; i >= 0; --i) first_part[parts[i].b] = i;
  for (int64_t b = batch - 1; b >= 0; --b) first_part[b] = std::min(first_part[b], first_part[b + 1]);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> total(dim);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t h = 0; h < heads; ++h) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t i = first_part[b]; i < first_part[b + 1]; ++i) mx = std::max(mx, m[i * heads + h]);
        std::fill(total.begin(), total.end(), 0.f);
        float sum = 0.f;
        for (int64_t i = first_part[b]; i < first_part[b + 1]; ++i) {
          const float w = std::exp(m[i * heads + h] - mx);
          sum += w * l[i * heads + h];
          const float* a = &acc[(i * heads + h) * dim];
          for (int64_t d = 0; d < dim; ++d) total[d] += w * a[d];
        }
        T* o = op + (b * heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = narrow(total[d] / sum, T());
      }
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pages.dim() == 4 && v_pages.sizes() == k_pages.sizes(),
              "paged_decode: q [B, H, D] and pages [blocks, block_size, kv_heads, D] expected");
  TORCH_CHECK(k_pages.size(2) > 0 && q.size(2) == k_pages.size(3) && q.size(1) % k_pages.size(2) == 0,
              "paged_decode: head_dim or head grouping mismatch");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && context_lens.dim() == 1 &&
                  context_lens.size(0) == q.size(0),
              "paged_decode: block_tables [B, pages] and context_lens [B] must have one row per query");
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
