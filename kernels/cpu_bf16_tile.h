// The package's bf16 GEMM tiles (see cpu_bf16_linear.cpp for the packed layout and why they are built so), in a
// header so that the CPU decode step (cpu_decode_step.cpp) runs the very same code on its own threads. rows()
// computes rows [0, rows_n) of x times one packed block of 32 outputs; `prefetch` lets the tiles of a block that
// several tiles walk (and one tile of 5-12 rows that does not stream) fetch the next block while they run.
// kernels/cpp_op.py rebuilds every op that includes this file when it changes.
#pragma once

#include <ATen/ATen.h>

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace etr_gemm {
namespace {  // each op's own copy of everything (see g_stream_hint)

using bf16 = c10::BFloat16;
constexpr int64_t kBlock = 32;  // outputs per packed block: two registers of 16 float32 accumulators

// Whether tiles that walk their block once (1-4 rows, and up to 12 with g_one_walk) mark the weights they stream as
// non-temporal (see tile() and rows()): on unless ETR_CPU_GEMM_NTA=0.
// Each op that includes this file has its own copy (everything here has internal linkage: an inline variable would
// be one symbol, which the dynamic linker shares between the ops), switched by its own set_stream_hint. It
// changes no result.
std::atomic<bool> g_stream_hint{[] {
  const char* v = std::getenv("ETR_CPU_GEMM_NTA");
  return !(v && std::strcmp(v, "0") == 0);
}()};

bool set_stream_hint(bool on) { return g_stream_hint.exchange(on); }

// Whether tiles that do not stream (rows(): from 13 rows up, from 5 with the stream hint or the one walk off)
// prefetch the next block: on unless ETR_CPU_GEMM_PREFETCH=0; each op's
// own copy, as g_stream_hint, switched at run time by its set_prefetch, so that bench/knob_ab.py can time both in
// one process. It changes no result, only the timing.
std::atomic<bool> g_prefetch{[] {
  const char* v = std::getenv("ETR_CPU_GEMM_PREFETCH");
  return !(v && std::strcmp(v, "0") == 0);
}()};

bool set_prefetch(bool on) { return g_prefetch.exchange(on); }

// Whether rows() runs up to 12 rows (kOneWalkRows) as one tile, one walk of the block, rather than as tiles of 8,
// 4 and less: on unless ETR_CPU_GEMM_ONE_WALK=0; each op's own copy, as g_stream_hint, switched at run time by its
// set_one_walk, so that bench/knob_ab.py can time both in one process. It changes no result: each output's sum
// runs over the pairs in the same order either way.
std::atomic<bool> g_one_walk{[] {
  const char* v = std::getenv("ETR_CPU_GEMM_ONE_WALK");
  return !(v && std::strcmp(v, "0") == 0);
}()};

bool set_one_walk(bool on) { return g_one_walk.exchange(on); }

#if defined(__AVX512BF16__)
constexpr bool kNative = true;
// How far ahead of its loads a streaming tile issues its non-temporal prefetches (bench/RESULTS.md).
constexpr int64_t kStreamAhead = 4096;

// The 64-byte lines of memory one tile fetches into L2 while it runs, spread evenly over its pairs.
struct Ahead {
  const char* first;
  int64_t lines;
};

// Rows [0, MT) of x (row stride `stride`, `pairs` pairs of inputs each) times one packed block `w`: out[m, :32].
// Tiles that fetch nothing ahead (kFetch false) are built without the fetch bookkeeping: a block's only tile (1-12
// rows) waits on memory, and with fewer instructions a pair the out-of-order window holds more pairs' loads in flight
// (bench/RESULTS.md: the weights of a batch-1 step read ~10 % faster).
// Streaming tiles (kStream: a block's only walk, 1-12 rows) prefetch their own block kStreamAhead bytes ahead with
// the non-temporal hint. A batch-1 step reads ~270 MB of weights once each; through plain loads every line of them
// passes through L2 and L3 and evicts what the glue, the attention and the Python between two steps use next (the
// activations, the KV pages, the interpreter's own data). Marked non-temporal, the weights leave the caches
// to those (bench/RESULTS.md, bench/knob_ab.py --knob stream_hint).
template <int MT, bool kFetch, bool kStream = false>
inline void tile(const bf16* x, int64_t stride, int64_t pairs, const bf16* w, const float* bias, bf16* y,
          int64_t y_stride, int64_t count, Ahead ahead) {
  __m512 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  [[maybe_unused]] int64_t fetched = 0, due = 0;  // due / pairs lines are owed by now (no division in the loop)
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * 64);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + p * 64 + 32);
    if constexpr (kFetch)
      for (due += ahead.lines; due >= pairs; due -= pairs) _mm_prefetch(ahead.first + 64 * fetched++, _MM_HINT_T1);
    if constexpr (kStream) {  // a pair is two lines; past the block's end this reads into the next (a hint only)
      const char* line = reinterpret_cast<const char*>(w + p * 64) + kStreamAhead;
      _mm_prefetch(line, _MM_HINT_NTA);
      _mm_prefetch(line + 64, _MM_HINT_NTA);
    }
    for (int m = 0; m < MT; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * stride + 2 * p, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
    }
  }
  // Full and partial blocks round alike (the instruction's nearest even, which flushes denormals to zero): a
  // partial block is rounded whole and its first `count` values are copied.
  for (int m = 0; m < MT; ++m) {
    const __m512 lo = bias ? _mm512_add_ps(acc[m][0], _mm512_loadu_ps(bias)) : acc[m][0];
    const __m512 hi = bias ? _mm512_add_ps(acc[m][1], _mm512_loadu_ps(bias + 16)) : acc[m][1];
    bf16* out = y + m * y_stride;
    if (count == kBlock) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(lo));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), (__m256i)_mm512_cvtneps_pbh(hi));
    } else {
      alignas(64) bf16 rounded[kBlock];
      _mm256_store_si256(reinterpret_cast<__m256i*>(rounded), (__m256i)_mm512_cvtneps_pbh(lo));
      _mm256_store_si256(reinterpret_cast<__m256i*>(rounded + 16), (__m256i)_mm512_cvtneps_pbh(hi));
      std::memcpy(out, rounded, count * sizeof(bf16));
    }
  }
}

// The most rows one tile takes: 2 x 12 accumulators, 2 registers of weights and the broadcast input fit the 32.
constexpr int64_t kOneWalkRows = 12;

// f(std::integral_constant<int, n>()) for n in 1 .. kOneWalkRows.
template <typename F>
inline void with_rows(int64_t n, const F& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    case 8: f(std::integral_constant<int, 8>()); break;
    case 9: f(std::integral_constant<int, 9>()); break;
    case 10: f(std::integral_constant<int, 10>()); break;
    case 11: f(std::integral_constant<int, 11>()); break;
    case 12: f(std::integral_constant<int, 12>()); break;
    default: break;  // rows() passes 1 .. kOneWalkRows only
  }
}

// Rows [0, rows_n) times one packed block. Up to kOneWalkRows rows are one tile; more run as tiles of 8 until at
// most kOneWalkRows are left, which are one tile. Each tile walks the whole block, so a tile of its own for a
// few rows (8 + 4, or 4 + 1) walked it again at a rate set by the dot instruction's latency (a 4-row tile's 8
// chains cannot fill its pipes). One walk was faster at every row count tried where the plan changes (from memory
// 5, 6, 8, 10, 12, 13, 20; from L3 5, 8, 10, 12, 13, 20; bench/RESULTS.md). With g_one_walk off, the plan before
// that: tiles of 8 rows, the rest as 4, 3, 2, 1, and 5 to 8 rows as 4 and the rest.
// A block walked once (one tile) streams: the tile fetches its own block 4 KB ahead of its loads with the
// non-temporal hint (tile()). From 5 to 12 rows that read the weights faster than fetching the next block into L2
// over the walk, which it replaced (0.87-0.93 of the time from memory, 0.82-0.90 from L3; bench/RESULTS.md).
// Where a block is walked by several tiles (more than 12 rows, or more than 4 with g_one_walk off), the tiles
// prefetch the next block (the next in memory: the one this thread runs next, as a rule), each a share in
// proportion to its rows, so the stream runs through the whole block's time, also while a later tile reads the
// block from L2; a first tile streaming ahead instead, the later ones reading from the caches, was slower at 16
// rows (1.07). With the stream hint off, one tile of 5-12 rows fetches the next block too, and 1-4 rows fetch
// nothing: there the block is read at about the stream's rate in one walk, and prefetching more did not pay.
inline void rows(const bf16* x, int64_t rows_n, int64_t stride, int64_t pairs, const bf16* w, const float* bias,
                 bf16* y, int64_t y_stride, int64_t count, bool prefetch) {
  const bool one_walk = g_one_walk.load(std::memory_order_relaxed);  // read once: the plan and `once` agree
  const bool once = rows_n <= 4 || (rows_n <= kOneWalkRows && one_walk);
  const bool stream = once && g_stream_hint.load(std::memory_order_relaxed);
  const bool fetch = rows_n > 4 && prefetch && !stream;
  const int64_t lines = fetch ? pairs * 2 * kBlock * static_cast<int64_t>(sizeof(bf16)) / 64 : 0;
  const char* next = reinterpret_cast<const char*>(w + pairs * 2 * kBlock);
  int64_t m = 0;
  auto run = [&](auto size) {
    constexpr int MT = decltype(size)::value;
    const Ahead ahead{next + 64 * (lines * m / rows_n), lines * (m + MT) / rows_n - lines * m / rows_n};
    if (ahead.lines)
      tile<MT, true>(x + m * stride, stride, pairs, w, bias, y + m * y_stride, y_stride, count, ahead);
    else if (stream)  // the block's only tile
      tile<MT, false, true>(x + m * stride, stride, pairs, w, bias, y + m * y_stride, y_stride, count, ahead);
    else
      tile<MT, false>(x + m * stride, stride, pairs, w, bias, y + m * y_stride, y_stride, count, ahead);
    m += MT;
  };
  if (one_walk) {
    while (rows_n - m > kOneWalkRows) run(std::integral_constant<int, 8>());
    if (rows_n > m) with_rows(rows_n - m, run);
    return;
  }
  if (rows_n > 4 && rows_n <= 8) run(std::integral_constant<int, 4>());
  while (rows_n - m >= 8) run(std::integral_constant<int, 8>());
  if (rows_n - m >= 4) run(std::integral_constant<int, 4>());
  if (rows_n - m == 3) run(std::integral_constant<int, 3>());  // one walk of the block, not two (2 + 1)
  if (rows_n - m >= 2) run(std::integral_constant<int, 2>());
  if (rows_n - m >= 1) run(std::integral_constant<int, 1>());
}
#else
constexpr bool kNative = false;  // correct everywhere, fast only with the instruction (cpu_bf16_linear.py asks)

// Rounds 16 float32 to bf16, nearest even, and stores the first `count`.
inline void store16(bf16* out, const float* acc, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = bf16(acc[i]);
}

inline void rows(const bf16* x, int64_t rows_n, int64_t stride, int64_t pairs, const bf16* w, const float* bias,
                 bf16* y, int64_t y_stride, int64_t count, bool) {
  for (int64_t m = 0; m < rows_n; ++m) {
    float out[kBlock];
    for (int64_t o = 0; o < kBlock; ++o) {
      float acc = 0.f;
      for (int64_t p = 0; p < pairs; ++p)
        for (int64_t i = 0; i < 2; ++i)
          acc += static_cast<float>(w[(p * kBlock + o) * 2 + i]) * static_cast<float>(x[m * stride + 2 * p + i]);
      out[o] = bias ? acc + bias[o] : acc;
    }
    store16(y + m * y_stride, out, std::min<int64_t>(count, 16));
    if (count > 16) store16(y + m * y_stride + 16, out + 16, count - 16);
  }
}
#endif

// A thread's run of output blocks in one atomic word: its next untaken block (low half) and its end (high half).
// The owner takes from the front; a thread that is done takes half of what is left from the back (see
// balanced_runs in cpu_bf16_linear.cpp for why). Which thread runs a block does not change its bits.
struct alignas(64) Run {
  std::atomic<uint64_t> span;
};

// `threads` contiguous runs of about equal length over blocks [0, blocks) (blocks < 2^31).
inline void split_runs(Run* runs, int64_t blocks, int64_t threads) {
  for (int64_t t = 0; t < threads; ++t)
    runs[t].span.store(static_cast<uint64_t>(blocks * t / threads) |
                           static_cast<uint64_t>(blocks * (t + 1) / threads) << 32,
                       std::memory_order_relaxed);
}

// Thread t's part of split_runs: its own run from the front, then halves of the other runs from their ends.
template <typename F>
void own_then_others(Run* runs, int64_t t, int64_t threads, const F& run_block) {
  auto next_of = [](uint64_t s) { return s & 0xFFFFFFFFu; };
  std::atomic<uint64_t>& own = runs[t].span;
  for (uint64_t s = own.load(std::memory_order_relaxed); next_of(s) < s >> 32;)
    if (own.compare_exchange_weak(s, s + 1, std::memory_order_relaxed)) {
      run_block(static_cast<int64_t>(next_of(s)));
      s = own.load(std::memory_order_relaxed);
    }
  for (int64_t o = 1; o < threads; ++o) {
    std::atomic<uint64_t>& other = runs[(t + o) % threads].span;
    // The last untaken block stays with the owner, which is running the one before it or about to take it.
    for (uint64_t s = other.load(std::memory_order_relaxed); (s >> 32) > next_of(s) + 1;) {
      const uint64_t end = s >> 32, from = end - (end - next_of(s)) / 2;
      if (other.compare_exchange_weak(s, next_of(s) | from << 32, std::memory_order_relaxed)) {
        for (uint64_t b = from; b < end; ++b) run_block(static_cast<int64_t>(b));
        s = other.load(std::memory_order_relaxed);
      }
    }
  }
}

}  // namespace
}  // namespace etr_gemm
