// Decode attention on the CPU reading the KV pages in place: one query token per sequence. A task is one
// sequence's run of whole pages (a sequence is cut into several when there are fewer sequences than threads
// want work), all heads at once, so it reads each position's keys and values as one contiguous row of the
// page. For every query head it keeps a float32 running maximum, sum and weighted value sum (split-K, as in
// flash decoding); a second pass combines a sequence's parts. bf16 rows are widened to float32 one row at a
// time, so nothing of the context is gathered or converted as a whole. bf16 caches with head sizes of 32 to
// 128 take a path built on the AVX512-BF16 dot instruction where the CPU has it (run_part_bf16); it rounds the
// softmax weights to bf16 before the values pass, as torch's CPU flash attention and HF's eager attention do.
// On that path the K pages may be packed (a 5-d K pool, [blocks, kv_heads, D/2, block_size, 2]: each page's
// keys of one KV head stored as pairs of dimensions, position after position), so that one 64-byte load holds one
// dimension pair of 16 positions and the dot instruction gives 16 scores at once, with no sums across lanes; the
// engine allocates its CPU pools so (kernels/cpu_paged_decode.py, ``pack_k``). The plain-torch reference is
// kernels/cpu_paged_decode.py's ``reference``.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
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

// Each of the H rows of n scores becomes exp(score - its maximum); m gets the maxima, l the sums.
inline void softmax_rows(float* scores, int64_t H, int64_t n, float* m, float* l) {
  for (int64_t h = 0; h < H; ++h) {
    float* sh = scores + h * n;
    float mh = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mh)  // as written, std::max's loop stayed scalar: a tenth of the attention
    for (int64_t i = 0; i < n; ++i) mh = sh[i] > mh ? sh[i] : mh;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      sh[i] = exp_nonpositive(sh[i] - mh);
      sum += sh[i];
    }
    m[h] = mh;
    l[h] = sum;
  }
}

struct Shape {
  int64_t heads, kv_heads, dim, group, block_size, max_blocks;
  float scale;
  bool packed_k;  // K pages [blocks, kv_heads, D/2, block_size, 2] (bf16 path only), else like V's
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
  softmax_rows(scores, H, n, m, l);
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

// Whether the bf16 path's values pass streams its V rows into L2 itself, kValuesAhead positions ahead of its loads.
// Off, it fetches them into L1 kPositions (16) positions ahead, and with packed K the scores pass also fetches
// the V pages into L2 one page ahead of its own (with K in rows it fetches no V either way). Fetched by the scores
// pass, the memory idled through the values pass while the scores pass asked for twice its own bytes; streamed by
// each pass, both passes overlap their reads with their arithmetic (bench/RESULTS.md, bench/knob_ab.py --knob
// v_stream). On unless ETR_CPU_ATTN_V_STREAM=0; it changes no result.
std::atomic<bool> g_values_stream{[] {
  const char* v = std::getenv("ETR_CPU_ATTN_V_STREAM");
  return !(v && std::strcmp(v, "0") == 0);
}()};
// 32 and 128 measured slower. Each KV head's sweep leaves its first kValuesAhead rows unfetched (fetching them at
// the end of the sweep before measured within the noise), so parts of up to 65 positions get no V prefetch.
constexpr int64_t kValuesAhead = 64;

bool set_values_stream(bool on) { return g_values_stream.exchange(on); }

#if defined(__AVX512BF16__)
// The bf16 path of run_part for head sizes of 32, 64, 96 or 128 on CPUs with AVX512-BF16. Scores: each key row
// is multiplied with the unscaled bf16 query by the bf16 dot instruction (float32 products and sums), 16
// positions at a time, and the 16 partial sums are reduced together (one transpose-add tree instead of 16
// horizontal sums); the scale is applied to the sum. Values: two positions at a time by the same instruction,
// with their softmax weights rounded to bf16, into float32 registers for up to head_chunk() query heads of a
// KV head.
constexpr int64_t kPositions = 16;

// r[i] = the sum of the 16 lanes of v[i].
inline __m512 sum16(__m512* v) {
  __m512 s[8], t[4], u[2];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(s[2 * i]), b = _mm512_castps_pd(s[2 * i + 1]);
    t[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
}

inline __m512 widen16(const at::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Scores of query head `qh` (bf16, kC chunks of 32) against rows[0, n) (each the KV head's D values).
template <int kC>
void scores_bf16(const at::BFloat16* qh, const at::BFloat16* const* rows, int64_t n, float scale, float* out) {
  __m512bh q[kC];
  for (int c = 0; c < kC; ++c) q[c] = (__m512bh)_mm512_loadu_si512(qh + 32 * c);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t p0 = 0; p0 < n; p0 += kPositions) {
    const int64_t count = std::min(kPositions, n - p0);
    for (int64_t j = p0 + kPositions; j < std::min(n, p0 + 2 * kPositions); ++j)  // the next block's rows
      for (int c = 0; c < kC; ++c) _mm_prefetch(reinterpret_cast<const char*>(rows[j] + 32 * c), _MM_HINT_T0);
    __m512 acc[kPositions];
    for (int j = 0; j < kPositions; ++j) {
      acc[j] = _mm512_setzero_ps();
      if (j < count)
        for (int c = 0; c < kC; ++c)
          acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(rows[p0 + j] + 32 * c), q[c]);
    }
    _mm512_mask_storeu_ps(out + p0, static_cast<__mmask16>((1u << count) - 1), _mm512_mul_ps(sum16(acc), sc));
  }
}

// Pages ahead of the scores pass that it prefetches: K pages for itself, and V pages for the values pass where
// that pass does not stream its own (g_values_stream off).
constexpr int64_t kKPagesAhead = 4;
constexpr int64_t kVPagesAhead = 1;

// Scores of NH query heads (pairs of dimensions at q, q_stride pairs apart) against 16 packed positions of one KV
// head (kz: dimension pair i of the 16 at kz + i * bs), scaled, into out (heads n apart), lanes past `mask` not
// stored. A compile-time head count keeps the 2 * NH accumulators in registers: with a run-time count the
// compiler kept them on the stack, and every dot instruction waited on a store and a reload. k_ahead and v_ahead
// (or nullptr) get two lines each per dimension step, from byte `at` on.
template <int NH>
inline void score_heads(const int32_t* kz, int64_t bs, int64_t pairs, const int32_t* q, int64_t q_stride, __m512 sc,
                        __mmask16 mask, float* out, int64_t n, const char* k_ahead, const char* v_ahead, int64_t at) {
  __m512 a[NH][2];
  for (int h = 0; h < NH; ++h) a[h][0] = a[h][1] = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; i += 2, at += 128) {
    if (k_ahead) {
      _mm_prefetch(k_ahead + at, _MM_HINT_T1);
      _mm_prefetch(k_ahead + at + 64, _MM_HINT_T1);
    }
    if (v_ahead) {
      _mm_prefetch(v_ahead + at, _MM_HINT_T1);
      _mm_prefetch(v_ahead + at + 64, _MM_HINT_T1);
    }
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kz + i * bs);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kz + (i + 1) * bs);
    for (int h = 0; h < NH; ++h) {
      a[h][0] = _mm512_dpbf16_ps(a[h][0], k0, (__m512bh)_mm512_set1_epi32(q[h * q_stride + i]));
      a[h][1] = _mm512_dpbf16_ps(a[h][1], k1, (__m512bh)_mm512_set1_epi32(q[h * q_stride + i + 1]));
    }
  }
  for (int h = 0; h < NH; ++h)
    _mm512_mask_storeu_ps(out + h * n, mask, _mm512_mul_ps(_mm512_add_ps(a[h][0], a[h][1]), sc));
}

// Scores of every query head against the positions [first * bs, end) of packed K pages (see the top of the
// file): per page and KV head, 16 positions at a time, one load per dimension pair shared by up to 4 query heads,
// two accumulator chains each; the query's pair is broadcast. Garbage past `end` stays out of the stored lanes.
// Meanwhile it prefetches into L2, two lines per dimension step spread over the page's work, the K page
// kKPagesAhead on and, where `fetch_v`, the V page kVPagesAhead on. Prefetched in a burst at each page, or into
// L1, the lines arrived no sooner than the loads that wanted them, and the passes' misses added to their
// arithmetic.
void scores_packed(const Part& part, const Shape& s, const at::BFloat16* q, const at::BFloat16* k_pages,
                   const at::BFloat16* v_pages, const int32_t* blocks, float* scores, int64_t n, bool fetch_v) {
  const int64_t D = s.dim, G = s.group, bs = s.block_size, page = bs * s.kv_heads * D, begin = part.first * bs;
  const int32_t* qw = reinterpret_cast<const int32_t*>(q);  // pairs of dimensions
  const __m512 sc = _mm512_set1_ps(s.scale);
  auto page_at = [&](const at::BFloat16* pages, int64_t j) {
    return j < part.last ? reinterpret_cast<const char*>(pages + static_cast<int64_t>(blocks[j]) * page) : nullptr;
  };
  for (int64_t j = part.first; j < part.last; ++j) {
    const int32_t* kb = reinterpret_cast<const int32_t*>(k_pages + static_cast<int64_t>(blocks[j]) * page);
    const char* k_ahead = page_at(k_pages, j + kKPagesAhead);
    const char* v_ahead = fetch_v ? page_at(v_pages, j + kVPagesAhead) : nullptr;
    for (int64_t t0 = 0; t0 < bs && j * bs + t0 < part.end; t0 += kPositions) {
      const int64_t count = std::min(kPositions, part.end - j * bs - t0);
      const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
      for (int64_t kh = 0; kh < s.kv_heads; ++kh) {
        const int32_t* kz = kb + kh * (D / 2) * bs + t0;
        // 128 bytes per dimension step: over the page's (t0, kh, i) steps, one page of each.
        const int64_t at = (kh * (bs / kPositions) * (D / 4) + (t0 / kPositions) * (D / 4)) * 128;
        for (int64_t h0 = kh * G; h0 < (kh + 1) * G; h0 += 4) {
          const bool first = h0 == kh * G;  // the group's first heads prefetch
          const char* ka = first ? k_ahead : nullptr;
          const char* va = first ? v_ahead : nullptr;
          const int32_t* qh = qw + h0 * (D / 2);
          float* out = scores + h0 * n + j * bs + t0 - begin;
          switch (std::min<int64_t>(4, (kh + 1) * G - h0)) {
            case 1: score_heads<1>(kz, bs, D / 2, qh, D / 2, sc, mask, out, n, ka, va, at); break;
            case 2: score_heads<2>(kz, bs, D / 2, qh, D / 2, sc, mask, out, n, ka, va, at); break;
            case 3: score_heads<3>(kz, bs, D / 2, qh, D / 2, sc, mask, out, n, ka, va, at); break;
            default: score_heads<4>(kz, bs, D / 2, qh, D / 2, sc, mask, out, n, ka, va, at); break;
          }
        }
      }
    }
  }
}

// Query heads a values pass accumulates at once: kZ registers each, at most 24 accumulators of the 32.
constexpr int head_chunk(int kZ) { return kZ >= 8 ? 3 : kZ >= 6 ? 4 : 6; }

// acc[h, :] = sum over positions of p[h, pos] * rows[pos] for `heads` (<= head_chunk(2 * kC)) query heads, kC
// chunks of 32 values a row. p is bf16, [heads, n2] (n2 = n rounded up to even, 0 past n), read as pairs: the
// dot instruction multiplies two positions' values by their two weights at once. Two value rows are
// interleaved a 16-bit element at a time (unpack lo/hi within each 128-bit lane), so each 32-bit lane of an
// accumulator holds one dimension, in the order unpack leaves them; the store puts them back in order. With
// `stream` it prefetches its rows into L2 kValuesAhead positions ahead, else into L1 kPositions ahead.
template <int kC>
void values_bf16(const uint32_t* p, int64_t n2, int64_t n, int64_t heads, const at::BFloat16* const* rows,
                 float* acc, int64_t dim, bool stream) {
  const int64_t ahead = stream ? kValuesAhead : kPositions;
  constexpr int kHC = head_chunk(2 * kC);
  __m512 a[kHC][2 * kC];
  for (int h = 0; h < kHC; ++h)
    for (int z = 0; z < 2 * kC; ++z) a[h][z] = _mm512_setzero_ps();
  for (int64_t pos = 0; pos < n; pos += 2) {
    const at::BFloat16* r0 = rows[pos];
    const at::BFloat16* r1 = pos + 1 < n ? rows[pos + 1] : r0;  // weight 0 there; r0 is a real row, not garbage
    if (pos + ahead + 1 < n)
      for (int c = 0; c < kC; ++c) {
        const char* n0 = reinterpret_cast<const char*>(rows[pos + ahead] + 32 * c);
        const char* n1 = reinterpret_cast<const char*>(rows[pos + ahead + 1] + 32 * c);
        if (stream) {
          _mm_prefetch(n0, _MM_HINT_T1);
          _mm_prefetch(n1, _MM_HINT_T1);
        } else {
          _mm_prefetch(n0, _MM_HINT_T0);
          _mm_prefetch(n1, _MM_HINT_T0);
        }
      }
    __m512i lo[kC], hi[kC];
    for (int c = 0; c < kC; ++c) {
      const __m512i x = _mm512_loadu_si512(r0 + 32 * c), y = _mm512_loadu_si512(r1 + 32 * c);
      lo[c] = _mm512_unpacklo_epi16(x, y);
      hi[c] = _mm512_unpackhi_epi16(x, y);
    }
    for (int h = 0; h < kHC; ++h) {
      if (h >= heads) break;
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[(h * n2 + pos) / 2]));
      for (int c = 0; c < kC; ++c) {
        a[h][2 * c] = _mm512_dpbf16_ps(a[h][2 * c], (__m512bh)lo[c], w);
        a[h][2 * c + 1] = _mm512_dpbf16_ps(a[h][2 * c + 1], (__m512bh)hi[c], w);
      }
    }
  }
  // Lane 4L + j of lo[c] is dimension 32c + 8L + j, of hi[c] dimension 32c + 8L + 4 + j (L, j < 4).
  alignas(64) float lo[16], hi[16];
  for (int h = 0; h < heads; ++h)
    for (int c = 0; c < kC; ++c) {
      _mm512_store_ps(lo, a[h][2 * c]);
      _mm512_store_ps(hi, a[h][2 * c + 1]);
      float* out = acc + h * dim + 32 * c;
      for (int L = 0; L < 4; ++L)
        for (int j = 0; j < 4; ++j) {
          out[8 * L + j] = lo[4 * L + j];
          out[8 * L + 4 + j] = hi[4 * L + j];
        }
    }
}

// p [H, n] float32 -> bf16 [H, n2] (round to nearest even), zero in the odd tail of each row.
inline void to_bf16_pairs(const float* p, int64_t H, int64_t n, int64_t n2, uint16_t* out) {
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 mk = static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
      const __m256bh b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, p + h * n + i));
      _mm256_mask_storeu_epi16(out + h * n2 + i, mk, (__m256i)b);
    }
    if (n2 > n) out[h * n2 + n] = 0;
  }
}

bool fast_bf16_dim(int64_t dim) { return dim >= 32 && dim % 32 == 0 && dim <= 128; }

void run_part_bf16(const Part& part, const Shape& s, const at::BFloat16* q_all, const at::BFloat16* k_pages,
                   const at::BFloat16* v_pages, const int32_t* tables, float* m, float* l, float* acc,
                   std::vector<float>& scratch, std::vector<const at::BFloat16*>& rows) {
  const int64_t H = s.heads, D = s.dim, G = s.group, row = s.kv_heads * D, bs = s.block_size;
  const int64_t begin = part.first * bs, n = part.end - begin;
  const int64_t n2 = n + (n & 1);
  scratch.resize(static_cast<size_t>(H * n + (H * n2 + 1) / 2));
  float* scores = scratch.data();  // [H, n]
  uint16_t* weights = reinterpret_cast<uint16_t*>(scores + H * n);  // [H, n2] bf16
  rows.resize(static_cast<size_t>(2 * n));
  const int32_t* blocks = tables + part.b * s.max_blocks;
  for (int64_t j = part.first, i = 0; j < part.last; ++j) {  // page by page: no division a position
    const int64_t base = static_cast<int64_t>(blocks[j]) * bs * row;
    for (int64_t t = 0; t < bs && i < n; ++t, ++i) {
      if (!s.packed_k) rows[i] = k_pages + base + t * row;
      rows[n + i] = v_pages + base + t * row;
    }
  }
  thread_local std::vector<const at::BFloat16*> head_rows;
  head_rows.resize(static_cast<size_t>(n));
  const at::BFloat16* q = q_all + part.b * H * D;
  const bool stream = g_values_stream.load(std::memory_order_relaxed);
  if (s.packed_k) scores_packed(part, s, q, k_pages, v_pages, blocks, scores, n, !stream);
  for (int64_t kh = 0; kh < (s.packed_k ? 0 : s.kv_heads); ++kh) {
    for (int64_t i = 0; i < n; ++i) head_rows[i] = rows[i] + kh * D;
    for (int64_t h = kh * G; h < (kh + 1) * G; ++h) {
      switch (D / 32) {
        case 1: scores_bf16<1>(q + h * D, head_rows.data(), n, s.scale, scores + h * n); break;
        case 2: scores_bf16<2>(q + h * D, head_rows.data(), n, s.scale, scores + h * n); break;
        case 3: scores_bf16<3>(q + h * D, head_rows.data(), n, s.scale, scores + h * n); break;
        default: scores_bf16<4>(q + h * D, head_rows.data(), n, s.scale, scores + h * n); break;
      }
    }
  }
  softmax_rows(scores, H, n, m, l);
  to_bf16_pairs(scores, H, n, n2, weights);
  const uint32_t* pairs = reinterpret_cast<const uint32_t*>(weights);
  for (int64_t kh = 0; kh < s.kv_heads; ++kh) {
    for (int64_t i = 0; i < n; ++i) head_rows[i] = rows[n + i] + kh * D;
    const int64_t chunk = head_chunk(static_cast<int>(D / 16));
    for (int64_t h0 = kh * G; h0 < (kh + 1) * G; h0 += chunk) {
      const int64_t heads = std::min<int64_t>(chunk, (kh + 1) * G - h0);
      const uint32_t* ph = pairs + h0 * n2 / 2;
      switch (D / 32) {
        case 1: values_bf16<1>(ph, n2, n, heads, head_rows.data(), acc + h0 * D, D, stream); break;
        case 2: values_bf16<2>(ph, n2, n, heads, head_rows.data(), acc + h0 * D, D, stream); break;
        case 3: values_bf16<3>(ph, n2, n, heads, head_rows.data(), acc + h0 * D, D, stream); break;
        default: values_bf16<4>(ph, n2, n, heads, head_rows.data(), acc + h0 * D, D, stream); break;
      }
    }
  }
}
#else
bool fast_bf16_dim(int64_t) { return false; }
#endif

// Tasks: every sequence cut into runs of whole pages of at least MIN_PART_POSITIONS positions, so that there
// are about TASKS_PER_THREAD tasks per thread when sequences are few and long, and of at most
// MAX_PART_POSITIONS, so that a part's scores and weights (9 heads x 1,024 positions: 55 KB) stay near L1 and,
// with g_values_stream off, its V pages (384 KB) are still in L2 when the values pass reads them where the scores
// pass fetched them. (The cap was chosen with the stream off; with it on, only one noisy run at 2,048 was made.)
constexpr int64_t MIN_PART_POSITIONS = 256;  // cpu_decode_step.cpp's kInlineAttentionPositions relies on it
constexpr int64_t MAX_PART_POSITIONS = 1024;
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
  const int64_t positions =
      std::min(MAX_PART_POSITIONS, std::max(MIN_PART_POSITIONS, (total + want - 1) / want));
  const int64_t pages = std::max<int64_t>(1, (positions + bs - 1) / bs);
  std::vector<Part> parts;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t used = (lens[b] + bs - 1) / bs;
    for (int64_t first = 0; first < used; first += pages)
      parts.push_back({b, first, std::min(used, first + pages), std::min<int64_t>(lens[b], (first + pages) * bs)});
  }
  return parts;
}

// Positions a packed K page's size must be a multiple of (one 64-byte load: 16 positions x a dimension pair).
constexpr int64_t kPackedPositions = 16;

int64_t packed_positions() { return kPackedPositions; }

// Whether a bf16 query of head size `dim` takes run_part_bf16 (the package's tests ask, so that a build without
// the instruction, or a head size the dispatch misses, cannot pass as the fast path unnoticed).
bool bf16_path(int64_t dim) {
#if defined(__AVX512BF16__)
  return fast_bf16_dim(dim);
#else
  return false;
#endif
}

// What a part costs besides its positions, in positions. From cache, on one thread, a part's own cost (its setup,
// softmax rows and combine) came to ~35 positions; across two threads 128 split best (bench/RESULTS.md).
constexpr int64_t PART_COST_POSITIONS = 128;

// Bounds of `threads` contiguous runs of parts of about equal work (positions plus PART_COST_POSITIONS a part):
// run t is parts [bounds[t], bounds[t + 1]). An even split by count left one thread most of the work where the
// parts differ in length: sequences of mixed lengths, or a short prompt's rows (1, 2, ..., n positions).
std::vector<int64_t> split_by_work(const std::vector<Part>& parts, int64_t bs, int64_t threads) {
  const int64_t P = static_cast<int64_t>(parts.size());
  std::vector<int64_t> done(P + 1, 0);  // work of parts [0, i)
  for (int64_t i = 0; i < P; ++i)
    done[i + 1] = done[i] + parts[i].end - parts[i].first * bs + PART_COST_POSITIONS;
  std::vector<int64_t> bounds(std::max<int64_t>(threads, 1) + 1, P);
  bounds[0] = 0;
  for (int64_t t = 1; t < threads; ++t)  // the first part whose work starts at or past t / threads of the total
    bounds[t] = std::lower_bound(done.begin(), done.end() - 1, done[P] * t / threads) - done.begin();
  return bounds;
}

template <typename T>
void run_any(const Part& part, const Shape& s, const T* qp, const T* kp, const T* vp, const int32_t* tp, int64_t i,
             std::vector<float>& m, std::vector<float>& l, std::vector<float>& acc, std::vector<float>& scratch) {
  const int64_t H = s.heads, D = s.dim;
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (bf16_path(D)) {
#if defined(__AVX512BF16__)
      thread_local std::vector<const at::BFloat16*> rows;
      run_part_bf16(part, s, qp, kp, vp, tp, &m[i * H], &l[i * H], &acc[i * H * D], scratch, rows);
      return;
#endif
    }
  }
  run_part(part, s, qp, kp, vp, tp, &m[i * H], &l[i * H], &acc[i * H * D], scratch);
}

// Sequence b's output from its parts [first, last): each part's sums rescaled to the largest maximum, then
// normalised. Over one part the scale is exp(0) = 1 and the sums stay as they are.
template <typename T>
void combine(int64_t b, int64_t first, int64_t last, int64_t heads, int64_t dim, const float* m, const float* l,
             const float* acc, T* op, std::vector<float>& total) {
  total.resize(dim);
  for (int64_t h = 0; h < heads; ++h) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = first; i < last; ++i) mx = std::max(mx, m[i * heads + h]);
    std::fill(total.begin(), total.end(), 0.f);
    float sum = 0.f;
    for (int64_t i = first; i < last; ++i) {
      const float w = std::exp(m[i * heads + h] - mx);
      sum += w * l[i * heads + h];
      const float* a = &acc[(i * heads + h) * dim];
      for (int64_t d = 0; d < dim; ++d) total[d] += w * a[d];
    }
    T* o = op + (b * heads + h) * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] = narrow(total[d] / sum, T());
  }
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& tables,
            const at::Tensor& lens, double scale, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const Shape s{heads, v_pages.size(2), dim, heads / v_pages.size(2), v_pages.size(1), tables.size(1),
                static_cast<float>(scale), k_pages.dim() == 5};
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const std::vector<Part> parts = plan(lp, tp, batch, s.block_size, s.max_blocks, v_pages.size(0));
  const int64_t P = static_cast<int64_t>(parts.size());
  std::vector<float> m(P * heads), l(P * heads), acc(P * heads * dim);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pages.data_ptr<T>();
  const T* vp = v_pages.data_ptr<T>();
  T* op = out.data_ptr<T>();
  // Where every sequence is one part (short contexts, many sequences) a task finishes its sequence itself: the
  // combine below, run over one part, and one parallel region a layer fewer.
  const bool one_part_each = P == batch;
  const std::vector<int64_t> runs = split_by_work(parts, s.block_size, std::min<int64_t>(at::get_num_threads(), P));
  at::parallel_for(0, static_cast<int64_t>(runs.size()) - 1, 1, [&](int64_t first_run, int64_t last_run) {
    std::vector<float> scratch, total;
    for (int64_t i = runs[first_run]; i < runs[last_run]; ++i) {
      run_any(parts[i], s, qp, kp, vp, tp, i, m, l, acc, scratch);
      if (one_part_each) combine(parts[i].b, i, i + 1, heads, dim, m.data(), l.data(), acc.data(), op, total);
    }
  });
  if (one_part_each) return;
  // Combine each sequence's parts (consecutive in `parts`).
  std::vector<int64_t> first_part(batch + 1, P);
  for (int64_t i = P - 1; i >= 0; --i) first_part[parts[i].b] = i;
  for (int64_t b = batch - 1; b >= 0; --b) first_part[b] = std::min(first_part[b], first_part[b + 1]);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> total;
    for (int64_t b = begin; b < end; ++b)
      combine(b, first_part[b], first_part[b + 1], heads, dim, m.data(), l.data(), acc.data(), op, total);
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && v_pages.dim() == 4 && (k_pages.dim() == 4 || k_pages.dim() == 5),
              "paged_decode: q [B, H, D], V pages [blocks, block_size, kv_heads, D] and K pages of that shape or "
              "packed [blocks, kv_heads, D/2, block_size, 2] expected");
  TORCH_CHECK(v_pages.size(2) > 0 && q.size(2) == v_pages.size(3) && q.size(1) % v_pages.size(2) == 0,
              "paged_decode: head_dim or head grouping mismatch");
  if (k_pages.dim() == 4) {
    TORCH_CHECK(k_pages.sizes() == v_pages.sizes(), "paged_decode: K pages ", k_pages.sizes(), " and V pages ",
                v_pages.sizes(), " differ");
  } else {
    const int64_t blocks = v_pages.size(0), bs = v_pages.size(1), kv = v_pages.size(2), D = v_pages.size(3);
    TORCH_CHECK(k_pages.sizes() == at::IntArrayRef({blocks, kv, D / 2, bs, 2}) && D % 2 == 0,
                "paged_decode: packed K pages [", blocks, ", ", kv, ", ", D / 2, ", ", bs, ", 2] expected beside V ",
                "pages ", v_pages.sizes(), ", got ", k_pages.sizes());
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && bf16_path(D) && bs % kPackedPositions == 0,
                "paged_decode: packed K pages need bf16, a head size the bf16 path takes (32 to 128 in steps of 32, ",
                "on a CPU with AVX512-BF16) and pages of a multiple of ", kPackedPositions, " positions; got ",
                q.scalar_type(), ", head size ", D, ", pages of ", bs);
  }
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
  m.def("bf16_path(int head_dim) -> bool", &bf16_path);
  m.def("packed_positions() -> int", &packed_positions);
  m.def("set_values_stream(bool on) -> bool", &set_values_stream);
}

TORCH_LIBRARY_IMPL(etr_cpu, CPU, m) { m.impl("paged_decode", &paged_decode); }
