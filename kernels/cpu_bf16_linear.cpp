// bf16 linear layers on CPUs with AVX512-BF16 (and no AMX): y = x W^T + b for any number of rows, on weights
// packed once so that one 64-byte load holds 16 outputs' pairs of consecutive inputs, the operand layout of
// the bf16 dot instruction (VDPBF16PS). A tile of up to 8 input rows times 32 outputs keeps its 16 float32
// accumulators in registers while the weights stream through once per tile, so no horizontal sums are needed
// and a thread reads its outputs' weights as one sequential run. Measured against oneDNN's prepacked bf16
// GEMM on the same CPU it is faster from 1 row (a decode step at batch 1, where it streams the weights at
// close to the read bandwidth) to 1,024 (bench/RESULTS.md). Products and sums are float32, the bias is added in
// float32 and the result rounded to bf16 once, to nearest even. The plain-torch reference is in
// cpu_bf16_linear.py.
//
// Packed layout: [ceil(N / 32), ceil(K / 2), 32, 2] bf16; element [b, p, o, i] = W[32 b + o, 2 p + i], zero
// past W's edges.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kBlock = 32;    // outputs per packed block: two registers of 16 float32 accumulators
constexpr int64_t kRowChunk = 48;  // input rows whose tiles a thread runs over one block before the next

at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
              "etr_cpu_linear.pack: a bf16 [out, in] weight expected, got ", weight.scalar_type(), " ",
              weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t blocks = (n + kBlock - 1) / kBlock, pairs = (k + 1) / 2;
  at::Tensor padded = at::zeros({blocks * kBlock, pairs * 2}, weight.options());
  padded.slice(0, 0, n).slice(1, 0, k).copy_(weight);
  return padded.view({blocks, kBlock, pairs, 2}).permute({0, 2, 1, 3}).contiguous();
}

// Whether row tiles prefetch the next block (rows()): on unless ETR_CPU_GEMM_PREFETCH=0; set_prefetch switches it
// at run time, so that bench/knob_ab.py can time both in one process. It changes no result, only the timing.
std::atomic<bool> g_prefetch{[] {
  const char* v = std::getenv("ETR_CPU_GEMM_PREFETCH");
  return !(v && std::strcmp(v, "0") == 0);
}()};

bool set_prefetch(bool on) { return g_prefetch.exchange(on); }

#if defined(__AVX512BF16__)
constexpr bool kNative = true;

// The 64-byte lines of memory one tile fetches into L2 while it runs, spread evenly over its pairs.
struct Ahead {
  const char* first;
  int64_t lines;
};

// Rows [0, MT) of x (row stride `stride`, `pairs` pairs of inputs each) times one packed block `w`: out[m, :32].
// Tiles that fetch nothing ahead (kFetch false) are built without the fetch bookkeeping: at 1 to 4 rows a tile
// waits on memory, and with fewer instructions a pair the out-of-order window holds more pairs' loads in flight
// (bench/RESULTS.md: the weights of a batch-1 step read ~10 % faster).
template <int MT, bool kFetch>
void tile(const bf16* x, int64_t stride, int64_t pairs, const bf16* w, const float* bias, bf16* y,
          int64_t y_stride, int64_t count, Ahead ahead) {
  __m512 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  [[maybe_unused]] int64_t fetched = 0, due = 0;  // due / pairs lines are owed by now (no division in the loop)
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * 64);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + p * 64 + 32);
    if constexpr (kFetch)
      for (due += ahead.lines; due >= pairs; due -= pairs) _mm_prefetch(ahead.first + 64 * fetched++, _MM_HINT_T1);
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

// Rows [0, rows_n) times one packed block, as tiles of 8 rows (the rest as 4, 2, 1; 5 to 8 rows as 4 and the
// rest). Where there are more than 4 rows the block is walked by two tiles or more: the first reads it from
// memory, the others from L2, and with nothing else to fetch the memory would idle during those. So the tiles
// prefetch the next block (the next in memory: the one this thread runs next, as a rule), each a share in
// proportion to its rows, and the stream runs through the whole block's time. With 4 rows or fewer the block is
// read at about the stream's rate in one walk, and prefetching more did not pay (bench/RESULTS.md).
void rows(const bf16* x, int64_t rows_n, int64_t stride, int64_t pairs, const bf16* w, const float* bias,
          bf16* y, int64_t y_stride, int64_t count) {
  const bool fetch = rows_n > 4 && g_prefetch.load(std::memory_order_relaxed);
  const int64_t lines = fetch ? pairs * 2 * kBlock * static_cast<int64_t>(sizeof(bf16)) / 64 : 0;
  const char* next = reinterpret_cast<const char*>(w + pairs * 2 * kBlock);
  int64_t m = 0;
  auto run = [&](auto size) {
    constexpr int MT = decltype(size)::value;
    const Ahead ahead{next + 64 * (lines * m / rows_n), lines * (m + MT) / rows_n - lines * m / rows_n};
    if (ahead.lines)
      tile<MT, true>(x + m * stride, stride, pairs, w, bias, y + m * y_stride, y_stride, count, ahead);
    else
      tile<MT, false>(x + m * stride, stride, pairs, w, bias, y + m * y_stride, y_stride, count, ahead);
    m += MT;
  };
  if (rows_n > 4 && rows_n <= 8) run(std::integral_constant<int, 4>());
  while (rows_n - m >= 8) run(std::integral_constant<int, 8>());
  if (rows_n - m >= 4) run(std::integral_constant<int, 4>());
  if (rows_n - m >= 2) run(std::integral_constant<int, 2>());
  if (rows_n - m >= 1) run(std::integral_constant<int, 1>());
}

// The bf16 dot instruction's rate on this CPU, all threads (GFLOP/s, 2 per multiply-add): `iterations` rounds
// of 16 independent accumulator chains per thread, registers only, so no memory in the way. bench/scaling.py
// draws a step's compute floor from it (its FLOPs at this rate). Best of 3. The chains start from distinct values:
// from equal ones the compiler proves them equal and keeps one, whose latency-bound rate, counted 16 times, read
// ~1.3x the true peak on a Zen 5. Each thread checks its sums, which are exact in float32 (every term is 2).
double dot_peak(int64_t iterations) {
  TORCH_CHECK(iterations > 0 && iterations <= (1 << 22), "etr_cpu_linear.dot_peak: iterations must be in 1 .. ",
              1 << 22, " (float32 sums stay exact), got ", iterations);
  const int64_t threads = at::get_num_threads();
  double best = 0.;
  for (int rep = 0; rep < 3; ++rep) {
    std::atomic<int64_t> wrong{0};
    const auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        __m512 acc[16];
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
        __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80);  // 1.0: each instruction adds 1 * 1 + 1 * 1 to a lane
        for (int64_t i = 0; i < iterations; ++i) {
          for (auto& a : acc) a = _mm512_dpbf16_ps(a, x, x);
          __asm__ volatile("" : "+v"(x));  // x stays unknown to the compiler: no loop folded away
        }
        for (int i = 0; i < 16; ++i)
          if (_mm512_reduce_add_ps(acc[i]) != 16.f * (static_cast<float>(i) + 2.f * static_cast<float>(iterations)))
            wrong.fetch_add(1);
      }
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    TORCH_CHECK(wrong.load() == 0, "etr_cpu_linear.dot_peak: ", wrong.load(), " chains summed wrong");
    best = std::max(best, static_cast<double>(threads) * iterations * 16 * 32 * 2 / s / 1e9);
  }
  return best;
}
#else
double dot_peak(int64_t iterations) {  // no instruction: no figure (cpu_bf16_linear.py answers None)
  TORCH_CHECK(iterations > 0 && iterations <= (1 << 22), "etr_cpu_linear.dot_peak: iterations must be in 1 .. ",
              1 << 22, " (float32 sums stay exact), got ", iterations);
  return 0.;
}
constexpr bool kNative = false;  // correct everywhere, fast only with the instruction (cpu_bf16_linear.py asks)

// Rounds 16 float32 to bf16, nearest even, and stores the first `count`.
inline void store16(bf16* out, const float* acc, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = bf16(acc[i]);
}

void rows(const bf16* x, int64_t rows_n, int64_t stride, int64_t pairs, const bf16* w, const float* bias,
          bf16* y, int64_t y_stride, int64_t count) {
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

bool native() { return kNative; }

// run_block(b) for every output block b in [0, blocks) on `threads` threads, each thread first its own contiguous
// run (so that a thread reads its weights as one stream and prefetches the block it runs next), then blocks from
// the ends of runs not yet done. The two cores of a VM drift apart by several per cent for stretches (perf: one
// thread or the other idling ~10 % of a GEMM at 40 rows), and a static split waits for the slower. A run is
// one atomic word: its next untaken block (low half) and its end (high half); the owner takes from the front
// and a thread that is done takes half of what is left from the back. Which thread runs a block does not
// change its bits.
template <typename F>
void balanced_runs(int64_t blocks, int64_t threads, const F& run_block) {
  struct alignas(64) Run {
    std::atomic<uint64_t> span;
  };
  std::vector<Run> runs(threads);
  for (int64_t t = 0; t < threads; ++t)
    runs[t].span.store(static_cast<uint64_t>(blocks * t / threads) | static_cast<uint64_t>(blocks * (t + 1) / threads) << 32);
  auto next_of = [](uint64_t s) { return s & 0xFFFFFFFFu; };
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
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
  });
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                  int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "etr_cpu_linear.linear: bf16 input and packed weight expected, got ", x.scalar_type(), " and ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kBlock && packed.size(3) == 2 && packed.is_contiguous() &&
                  out_features > (packed.size(0) - 1) * kBlock && out_features <= packed.size(0) * kBlock,
              "etr_cpu_linear.linear: a weight from etr_cpu_linear.pack of ", out_features,
              " outputs expected, got sizes ", packed.sizes());
  const int64_t pairs = packed.size(1), k = x.dim() ? x.size(-1) : 0;
  TORCH_CHECK(x.dim() >= 1 && (k + 1) / 2 == pairs, "etr_cpu_linear.linear: inputs of ", 2 * pairs - 1, " or ",
              2 * pairs, " features expected, got sizes ", x.sizes());
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kBFloat16 && bias->numel() == out_features),
              "etr_cpu_linear.linear: a bf16 bias of ", out_features, " expected");
  at::Tensor x2 = x.reshape({-1, k});
  if (k % 2 || !x2.is_contiguous()) {  // rows of whole pairs, zero-padded
    at::Tensor padded = at::zeros({x2.size(0), 2 * pairs}, x.options());
    padded.slice(1, 0, k).copy_(x2);
    x2 = padded;
  }
  const int64_t m_rows = x2.size(0), stride = x2.size(1), blocks = packed.size(0);
  std::vector<float> b32(bias ? blocks * kBlock : 0, 0.f);
  if (bias) {
    const at::Tensor b = bias->contiguous();
    const bf16* bb = b.data_ptr<bf16>();
    for (int64_t i = 0; i < out_features; ++i) b32[i] = static_cast<float>(bb[i]);
  }
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out_features;
  at::Tensor y = at::empty(sizes, x.options());
  const bf16 *xp = x2.data_ptr<bf16>(), *wp = packed.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  const float* bp = bias ? b32.data() : nullptr;
  const int64_t chunks = (m_rows + kRowChunk - 1) / kRowChunk;
  auto run = [&](int64_t chunk_i, int64_t blk) {
    const int64_t m0 = chunk_i * kRowChunk;
    rows(xp + m0 * stride, std::min(kRowChunk, m_rows - m0), stride, pairs, wp + blk * pairs * kBlock * 2,
         bp ? bp + blk * kBlock : nullptr, yp + m0 * out_features + blk * kBlock, out_features,
         std::min(kBlock, out_features - blk * kBlock));
  };
  const int64_t threads = at::get_num_threads();
  if (chunks == 1 && m_rows > 4 && threads > 1 && blocks >= 2 * threads && blocks < (int64_t{1} << 31)) {
    // One chunk of rows, more than the 1-4 that wait on memory: the threads balance their runs (balanced_runs;
    // 0.95-1.01 of the static split's time at 5-48 rows, median ~0.98, bench/RESULTS.md).
    balanced_runs(blocks, threads, [&](int64_t blk) { run(0, blk); });
  } else if (blocks >= threads || chunks == 1) {
    // Each thread one contiguous run of output blocks (at::parallel_for splits the range evenly), so each
    // weight block is read by one thread only.
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t blk = begin; blk < end; ++blk) run(c, blk);
    });
  } else {
    // Fewer output blocks than threads: the row chunks are split too, so that no thread idles.
    at::parallel_for(0, chunks * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) run(i / blocks, i % blocks);
    });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(etr_cpu_linear, m) {
  m.def("pack(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.def("native() -> bool", &native);
  m.def("set_prefetch(bool on) -> bool", &set_prefetch);
  m.def("dot_peak(int iterations) -> float", &dot_peak);
}

TORCH_LIBRARY_IMPL(etr_cpu_linear, CPU, m) {
  m.impl("pack", &pack);
  m.impl("linear", &linear);
}
