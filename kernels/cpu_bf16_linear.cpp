// bf16 linear layers on CPUs with AVX512-BF16 (and no AMX): y = x W^T + b for any number of rows, on weights
// packed once so that one 64-byte load holds 16 outputs' pairs of consecutive inputs, the operand layout of
// the bf16 dot instruction (VDPBF16PS). A tile of up to 12 input rows times 32 outputs keeps its float32
// accumulators (2 a row) in registers while the weights stream through once per tile, so no horizontal sums are needed
// and a thread reads its outputs' weights as one sequential run. Measured against oneDNN's prepacked bf16
// GEMM on the same CPU it is faster from 1 row (a decode step at batch 1, where it streams the weights at
// close to the read bandwidth) to 1,024 (bench/RESULTS.md). Products and sums are float32, the bias is added in
// float32 and the result rounded to bf16 once, to nearest even. The plain-torch reference is in
// cpu_bf16_linear.py.
//
// Packed layout: [ceil(N / 32), ceil(K / 2), 32, 2] bf16; element [b, p, o, i] = W[32 b + o, 2 p + i], zero
// past W's edges. The tiles themselves are in cpu_bf16_tile.h, which the decode step
// (cpu_decode_step.cpp) runs too.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_bf16_tile.h"

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

using etr_gemm::bf16;
using etr_gemm::kBlock;
using etr_gemm::kNative;
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

#if defined(__AVX512BF16__)

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

#endif

bool native() { return kNative; }

// run_block(b) for every output block b in [0, blocks) on `threads` threads, each thread first its own contiguous
// run (so that a thread reads its weights as one stream and prefetches the block it runs next), then blocks from
// the ends of runs not yet done. The two cores of a VM drift apart by several per cent for stretches (perf: one
// thread or the other idling ~10 % of a GEMM at 40 rows), and a static split waits for the slower (the runs:
// etr_gemm::Run in cpu_bf16_tile.h).
template <typename F>
void balanced_runs(int64_t blocks, int64_t threads, const F& run_block) {
  std::vector<etr_gemm::Run> runs(threads);
  etr_gemm::split_runs(runs.data(), blocks, threads);
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) etr_gemm::own_then_others(runs.data(), t, threads, run_block);
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
  const bool prefetch = etr_gemm::g_prefetch.load(std::memory_order_relaxed);
  auto run = [&](int64_t chunk_i, int64_t blk) {
    const int64_t m0 = chunk_i * kRowChunk;
    etr_gemm::rows(xp + m0 * stride, std::min(kRowChunk, m_rows - m0), stride, pairs,
                   wp + blk * pairs * kBlock * 2, bp ? bp + blk * kBlock : nullptr,
                   yp + m0 * out_features + blk * kBlock, out_features, std::min(kBlock, out_features - blk * kBlock),
                   prefetch);
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
  m.def("set_prefetch(bool on) -> bool", &etr_gemm::set_prefetch);
  m.def("set_stream_hint(bool on) -> bool", &etr_gemm::set_stream_hint);
  m.def("set_one_walk(bool on) -> bool", &etr_gemm::set_one_walk);
  m.def("dot_peak(int iterations) -> float", &dot_peak);
}

TORCH_LIBRARY_IMPL(etr_cpu_linear, CPU, m) {
  m.impl("pack", &pack);
  m.impl("linear", &linear);
}
