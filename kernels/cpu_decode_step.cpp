// One decode step of the whole decoder stack on the CPU, from token ids to the final norm's output, as one torch
// op. It runs the very ATen ops, in the same order and dtypes, that models/decoder.py runs for a decode step
// with the torch backend's in-place attention (so its outputs are the same bits); what it removes is the
// Python between those ops: the interpreter, the binding's argument parsing and the module calls, about 1,000
// times a step for a 30-layer model. The plain-torch reference is the model's own forward.
//
// bf16 models can take a second glue (``glue`` 1, "raw"): the elementwise work between the linears and the
// attention (residual adds, RMSNorm, rotary, the KV write, SiLU-mul) as AVX-512 loops over each row, each
// rounding to bf16 where the ATen op rounds, so a layer is its four linears, the attention and four loops
// instead of ~35 ATen ops. Its results are not bit for bit the forward's: the norm's sum of squares adds
// in another order and SiLU's exp is not ATen's (tests/test_cpu_decode_step.py states the tolerance).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include "cpu_bf16_tile.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <thread>
#include <optional>
#include <string>
#include <vector>

namespace {

constexpr int64_t kWeightsPerLayer = 6;  // input norm, qkv, o, post-attention norm, gate_up, down
constexpr int64_t kBiasesPerLayer = 4;   // qkv, o, gate_up, down (None where the model has none)

// How a model's linears run, as kernels/cpu_decode_step.py passes it.
enum LinearKind : int64_t { kPlain = 0, kOneDnn = 1, kEtr = 2 };

// A linear as the model's forward runs it: ``F.linear`` on a plain weight, or ``PackedBf16Linear`` on a weight
// packed for oneDNN or for the package's own bf16 GEMM (kernels/cpu_bf16_linear.cpp, ``out`` outputs).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  int64_t kind, int64_t out) {
  if (kind == kPlain) return at::linear(x, weight, bias);
  if (kind == kEtr) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("etr_cpu_linear::linear", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&, int64_t)>();
    return op.call(x, weight, bias, out);
  }
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x.contiguous(), weight, bias, std::string("none"),
                                 c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// RMSNorm in transformers' op order (models/decoder.py, ``RMSNorm._norm``).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor x32 = x.to(at::kFloat);
  x32 = x32 * at::rsqrt(x32.pow(2).mean(-1, true) + eps);
  return weight * x32.to(x.scalar_type());
}

// ``apply_rotary`` of models/rope.py: x * cos + rotate_half(x) * sin, cos and sin ``[tokens, 1, head_dim]``.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor rotated = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                        const at::Tensor& tables, const at::Tensor& lens, double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("etr_cpu::paged_decode", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, double)>();
  return op.call(q, k_pages, v_pages, tables, lens, scale);
}

struct Step {
  int64_t heads, kv_heads, head_dim, intermediate, hidden;
  double eps, scale;
  int64_t kind;
  const at::Tensor &cos, &sin, &slots, &tables, &lens;
};

// Row `src` of K (kv_heads x 2 * half bf16 values) into slot `slot` of packed K pages with `bs` positions a page.
inline void put_packed_k(uint32_t* dst, const at::BFloat16* src, int64_t slot, int64_t kv, int64_t half, int64_t bs) {
  const int64_t block = slot / bs, t = slot % bs;
  for (int64_t h = 0; h < kv; ++h)
    for (int64_t i = 0; i < half; ++i)
      std::memcpy(dst + ((block * kv + h) * half + i) * bs + t, src + 2 * (h * half + i), sizeof(uint32_t));
}

// Row r of `k` (kv_heads x head_dim bf16 values, rows `stride` apart) into slot slots[r] of packed K pages
// [blocks, kv_heads, D/2, block_size, 2] (cpu_paged_decode.cpp): each dimension pair to its place in the page.
void write_packed_k(const at::Tensor& k_pages, const at::BFloat16* k, int64_t stride, const int64_t* slots,
                    int64_t rows) {
  const int64_t kv = k_pages.size(1), half = k_pages.size(2), bs = k_pages.size(3);
  uint32_t* dst = reinterpret_cast<uint32_t*>(k_pages.data_ptr<at::BFloat16>());
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(slots[r] >= 0 && slots[r] < k_pages.size(0) * bs, "decode_layers: slot ", slots[r], " of row ", r,
                " is outside the KV pool of ", k_pages.size(0) * bs, " slots");
  for (int64_t r = 0; r < rows; ++r) put_packed_k(dst, k + r * stride, slots[r], kv, half, bs);
}

at::Tensor attention(const Step& s, const at::Tensor& h, const at::Tensor* w,
                     const std::optional<at::Tensor>* b, const at::Tensor& k_pages, const at::Tensor& v_pages) {
  const int64_t q_size = s.heads * s.head_dim, kv_size = s.kv_heads * s.head_dim;
  std::vector<at::Tensor> qk_v = linear(h, w[1], b[0], s.kind, q_size + 2 * kv_size).split_with_sizes({q_size + kv_size, kv_size}, -1);
  at::Tensor qk = rotary(qk_v[0].view({-1, s.heads + s.kv_heads, s.head_dim}), s.cos, s.sin);
  std::vector<at::Tensor> q_k = qk.split_with_sizes({s.heads, s.kv_heads}, 1);
  at::Tensor v = qk_v[1].view({-1, s.kv_heads, s.head_dim});
  if (k_pages.dim() == 5) {
    const at::Tensor k = q_k[1].contiguous();
    write_packed_k(k_pages, k.data_ptr<at::BFloat16>(), kv_size, s.slots.data_ptr<int64_t>(), k.size(0));
  } else {
    k_pages.view({-1, s.kv_heads, s.head_dim}).index_copy_(0, s.slots, q_k[1]);
  }
  v_pages.view({-1, s.kv_heads, s.head_dim}).index_copy_(0, s.slots, v);
  at::Tensor out = paged_decode(q_k[0], k_pages, v_pages, s.tables, s.lens, s.scale);
  return linear(out.reshape({-1, q_size}), w[2], b[1], s.kind, s.hidden);
}

at::Tensor mlp(const Step& s, const at::Tensor& h, const at::Tensor* w, const std::optional<at::Tensor>* b) {
  std::vector<at::Tensor> gate_up = linear(h, w[4], b[2], s.kind, 2 * s.intermediate).split(s.intermediate, -1);
  return linear(at::silu(gate_up[0]) * gate_up[1], w[5], b[3], s.kind, s.hidden);
}

// ---- The raw glue (bf16 only; see the top of the file) ----
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr bool kRawGlue = true;
using bf16 = c10::BFloat16;

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

inline __m512 load(const bf16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// Rounds to bf16 as c10 does (nearest even; NaN to 0x7FC0) and widens back: what an ATen bf16 op returns.
inline __m512 bf(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                               _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(r);
}

inline __m512 neg(__m512 x) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
}

// Stores values already rounded by bf().
inline void store(bf16* p, __m512 rounded, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16)));
}

// exp in float32 (Cephes' polynomial on [-ln2/2, ln2/2], scaled by 2^n): within ~2 ulp of float, not ATen's.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(89.f), x));  // NaN stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// Rows [begin, end) of a [rows, width] pass, on several threads only where the pass is large enough to pay.
template <typename F>
void each_row(int64_t rows, int64_t width, const F& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) f(r);
  });
}

// residual += x (when given, rounded as ATen's bf16 add), then out = RMSNorm(residual) in transformers' op
// order: float32 mean of squares, x * rsqrt(mean + eps) rounded to bf16, times the weight rounded to bf16.
void add_rms_norm(const bf16* x, bf16* residual, const bf16* weight, bf16* out, int64_t rows, int64_t n,
                  float eps) {
  each_row(rows, n, [&](int64_t r) {
    bf16* res = residual + r * n;
    __m512 sq = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = lanes(n - i);
      __m512 v = load(res + i, m);
      if (x) {
        v = bf(_mm512_add_ps(load(x + r * n + i, m), v));
        store(res + i, v, m);
      }
      sq = _mm512_fmadd_ps(v, v, sq);
    }
    const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(sq) / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = lanes(n - i);
      const __m512 normed = bf(_mm512_mul_ps(load(res + i, m), _mm512_set1_ps(inv)));
      store(out + r * n + i, bf(_mm512_mul_ps(load(weight + i, m), normed)), m);
    }
  });
}

// ``apply_rotary`` on the first `heads` heads of one row `x` in place: x * cos + rotate_half(x) * sin, each
// product and the sum rounded to bf16 as ATen's ops round them.
inline void rotary_row(bf16* row, const bf16* c, const bf16* s, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    bf16* x = row + h * dim;
    for (int64_t i = 0; i < half; i += 16) {
      const __mmask16 m = lanes(half - i);
      const __m512 lo = load(x + i, m), hi = load(x + half + i, m);
      const __m512 new_lo = bf(_mm512_add_ps(bf(_mm512_mul_ps(lo, load(c + i, m))),
                                             bf(_mm512_mul_ps(neg(hi), load(s + i, m)))));
      const __m512 new_hi = bf(_mm512_add_ps(bf(_mm512_mul_ps(hi, load(c + half + i, m))),
                                             bf(_mm512_mul_ps(lo, load(s + half + i, m)))));
      store(x + i, new_lo, m);
      store(x + half + i, new_hi, m);
    }
  }
}

// out = silu(gate) * up with gate_up = [gate | up] per row, SiLU as x / (1 + exp(-x)), each op rounded to bf16.
void silu_mul(const bf16* gate_up, bf16* out, int64_t rows, int64_t n) {
  each_row(rows, n, [&](int64_t r) {
    const bf16 *g = gate_up + r * 2 * n, *u = g + n;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = lanes(n - i);
      const __m512 x = load(g + i, m);
      const __m512 act = bf(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f),
                                                            exp_ps(neg(x)))));
      store(out + r * n + i, bf(_mm512_mul_ps(act, load(u + i, m))), m);
    }
  });
}
#else
constexpr bool kRawGlue = false;
#endif

bool raw_glue() { return kRawGlue; }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// Rows [first, last) of `qkv` [B, q + 2 kv] (all where last < 0) rotated in place (q and K), each one's K and V
// written into its slot.
void rope_write(const Step& s, const at::Tensor& qkv, const at::Tensor& k_pages, const at::Tensor& v_pages,
                int64_t first = 0, int64_t last = -1) {
  const int64_t end = last < 0 ? qkv.size(0) : last;
  const int64_t D = s.head_dim, q_size = s.heads * D, kv_size = s.kv_heads * D;
  const int64_t width = q_size + 2 * kv_size;
  bf16* qp = qkv.data_ptr<bf16>();
  const bf16 *cos = s.cos.data_ptr<bf16>(), *sin = s.sin.data_ptr<bf16>();
  // Every slot is inside the pool (raw_layers checked) and each row's own (a new position of its sequence).
  const int64_t* slots = s.slots.data_ptr<int64_t>();
  bf16 *kp = k_pages.data_ptr<bf16>(), *vp = v_pages.data_ptr<bf16>();
  const bool packed = k_pages.dim() == 5;
  const int64_t half = D / 2, bs = packed ? k_pages.size(3) : 0;
  each_row(end - first, width, [&](int64_t i) {
    const int64_t r = first + i;
    bf16* row = qp + r * width;
    rotary_row(row, cos + r * D, sin + r * D, s.heads + s.kv_heads, D);
    if (packed) {
      put_packed_k(reinterpret_cast<uint32_t*>(kp), row + q_size, slots[r], s.kv_heads, half, bs);
    } else {
      std::memcpy(kp + slots[r] * kv_size, row + q_size, kv_size * sizeof(bf16));
    }
    std::memcpy(vp + slots[r] * kv_size, row + q_size + kv_size, kv_size * sizeof(bf16));
  });
}

// rope_write, then the attention of the rotated queries over each sequence's pages: [B, heads, head_dim].
at::Tensor rope_write_attend(const Step& s, const at::Tensor& qkv, const at::Tensor& k_pages,
                             const at::Tensor& v_pages) {
  rope_write(s, qkv, k_pages, v_pages);
  const at::Tensor q = qkv.view({qkv.size(0), s.heads + 2 * s.kv_heads, s.head_dim}).narrow(1, 0, s.heads);
  return paged_decode(q, k_pages, v_pages, s.tables, s.lens, s.scale);
}

// One layer with the raw glue: `x` is the last layer's MLP output (null at the first layer), `residual` the
// residual stream (updated in place), `h` and `act` scratch rows. Returns the MLP output.
at::Tensor raw_layer(const Step& s, const at::Tensor* x, at::Tensor& residual, at::Tensor& h, at::Tensor& act,
                     const at::Tensor* w, const std::optional<at::Tensor>* b, const at::Tensor& k_pages,
                     const at::Tensor& v_pages) {
  const int64_t B = residual.size(0), n = s.hidden, D = s.head_dim;
  const int64_t q_size = s.heads * D, kv_size = s.kv_heads * D, width = q_size + 2 * kv_size;
  add_rms_norm(x ? x->data_ptr<bf16>() : nullptr, residual.data_ptr<bf16>(), w[0].data_ptr<bf16>(),
               h.data_ptr<bf16>(), B, n, static_cast<float>(s.eps));
  at::Tensor qkv = linear(h, w[1], b[0], s.kind, width);
  at::Tensor out = rope_write_attend(s, qkv, k_pages, v_pages);
  at::Tensor o = linear(out.view({B, q_size}), w[2], b[1], s.kind, n);
  add_rms_norm(o.data_ptr<bf16>(), residual.data_ptr<bf16>(), w[3].data_ptr<bf16>(), h.data_ptr<bf16>(), B, n,
               static_cast<float>(s.eps));
  at::Tensor gate_up = linear(h, w[4], b[2], s.kind, 2 * s.intermediate);
  silu_mul(gate_up.data_ptr<bf16>(), act.data_ptr<bf16>(), B, s.intermediate);
  return linear(act, w[5], b[3], s.kind, n);
}

// ---- One parallel region a layer at 1-64 rows ----
// At 1-4 rows a step is the stream of its weights, and each linear as its own op is a parallel region of its own:
// between two of them the first thread runs the glue, the attention of a short context and the op's own call
// while the others wait in the OpenMP runtime and the memory idles (bench/RESULTS.md: ~15 % of a batch-1 step).
// Here the threads stay in one region for a layer's four linears. At 1-4 rows, while the first runs the glue,
// the others prefetch the start of their run of the next linear's weights into L2 until it is done. From 5 rows
// up the glue is no longer short (at 16 rows the norms, rotary and SiLU on the first thread were ~10 % of its
// step), so every thread runs it on its share of the rows and they meet before the linear. Then every thread
// runs its run and takes blocks from the ends of the others' (etr_gemm::own_then_others), so that threads which
// start ahead finish the work of those behind. The linears run the tiles of the linear op (cpu_bf16_tile.h) over
// the same blocks, and the glue is the same per row, so the output is the same bits. Taken by bf16 models on the
// package's own GEMM without biases (SmolLM2, Llama) where the build has the bf16 dot instruction;
// ETR_CPU_STEP_REGION=0 or set_region(false) keeps one op a linear.
std::atomic<bool> g_region{[] {
  const char* v = std::getenv("ETR_CPU_STEP_REGION");
  return !(v && std::strcmp(v, "0") == 0);
}()};

bool set_region(bool on) { return g_region.exchange(on); }

// Steps that took the region since the op was loaded (so that tests and benchmarks can tell which path ran).
std::atomic<int64_t> g_region_steps{0};

int64_t region_steps() { return g_region_steps.load(); }

#if defined(__AVX512BF16__)
// Up to here the region measured a few per cent faster than one op a linear (bench/RESULTS.md, 2026-12-08: 8-64
// rows, and a 40-token prefill); more rows (a longer prefill) run one op a linear, as before (not measured).
constexpr int64_t kRegionRows = 64;
constexpr int64_t kAheadBytes = 512 * 1024;       // the most of its next run a thread prefetches during the glue
// One context this short runs its attention in the region, on the first thread. The attention op cuts a context
// into parts of at least MIN_PART_POSITIONS (256, cpu_paged_decode.cpp), so up to here it runs one part on one
// thread anyway and loses nothing by running inside.
constexpr int64_t kInlineAttentionPositions = 256;

// y [rows, out] = x [rows, 2 * pairs] times a packed weight [blocks, pairs, 32, 2]; x may be set by the glue
// that runs before it (the attention's output).
struct RegionLinear {
  const bf16* x;
  const bf16* w;
  bf16* y;
  int64_t rows, pairs, blocks, out;

  void block(int64_t b) const {
    etr_gemm::rows(x, rows, 2 * pairs, pairs, w + b * pairs * 2 * etr_gemm::kBlock, nullptr,
                   y + b * etr_gemm::kBlock, out, std::min(etr_gemm::kBlock, out - b * etr_gemm::kBlock),
                   etr_gemm::g_prefetch.load(std::memory_order_relaxed));
  }
  // Thread t's run's first bytes into L2 (prefetch hints: nothing waits on them) until `done` says the glue is.
  void fetch_ahead(int64_t t, int64_t threads, const std::atomic<int64_t>& phase, int64_t done) const {
    const int64_t block_bytes = pairs * 2 * etr_gemm::kBlock * static_cast<int64_t>(sizeof(bf16));
    const int64_t first = blocks * t / threads, last = blocks * (t + 1) / threads;
    const char* p = reinterpret_cast<const char*>(w) + first * block_bytes;
    const int64_t bytes = std::min(kAheadBytes, (last - first) * block_bytes);
    for (int64_t at = 0; at < bytes; at += 64) {
      if (at % 2048 == 0 && phase.load(std::memory_order_acquire) >= done) return;
      _mm_prefetch(p + at, _MM_HINT_T1);
    }
  }
};

// A spinning wait's turn: a pause, and after many of them the core to another thread (more threads than cores, or
// a thread of the team descheduled, would otherwise spin through whole time slices).
inline void wait_a_little(int64_t& spins) {
  if (++spins < (int64_t{1} << 14)) {
    _mm_pause();
  } else {
    std::this_thread::yield();
  }
}

// The threads of one region: a phase counter the first thread advances after each glue, a barrier after each
// linear (the next glue reads its output), and the first error the glue threw (the others stop at the next phase).
struct Team {
  alignas(64) std::atomic<int64_t> phase{0};
  alignas(64) std::atomic<int64_t> arrived{0};
  alignas(64) std::atomic<int64_t> generation{0};
  alignas(64) std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::vector<etr_gemm::Run> runs;

  explicit Team(int64_t threads) : runs(threads) {}

  void barrier(int64_t threads) {
    const int64_t g = generation.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == threads - 1) {
      arrived.store(0, std::memory_order_relaxed);
      generation.fetch_add(1, std::memory_order_release);
    } else {
      for (int64_t spins = 0; generation.load(std::memory_order_acquire) == g;) wait_a_little(spins);
    }
  }
};

// A phase: glue over rows [first, last) (none where empty), then a linear on all threads (none where `linear` is
// null).
struct Phase {
  std::function<void(int64_t, int64_t)> glue;
  RegionLinear* linear;
};

// Threads run a phase's glue on their share of the rows (then meet) from this many rows up; below, the first thread
// runs it all while the others prefetch their next weights.
constexpr int64_t kSplitGlueRows = 5;

// The phases in order in one parallel region over `rows` rows; rethrows what a glue threw, after every thread has
// stopped.
void run_region(const std::vector<Phase>& phases, int64_t rows) {
  Team team(omp_get_max_threads());  // the team's size at most (ATen's regions take the default team, too)
  const bool split = rows >= kSplitGlueRows;
#pragma omp parallel
  {
    const int64_t t = omp_get_thread_num(), threads = std::min<int64_t>(omp_get_num_threads(), team.runs.size());
    for (int64_t k = 0; t < threads && k < static_cast<int64_t>(phases.size()); ++k) {
      const Phase& ph = phases[k];
      if (split) {
        // The runs are free: every thread left the last linear at its barrier.
        if (t == 0 && ph.linear) etr_gemm::split_runs(team.runs.data(), ph.linear->blocks, threads);
        try {
          if (ph.glue) ph.glue(rows * t / threads, rows * (t + 1) / threads);
        } catch (...) {
          if (!team.failed.exchange(true)) team.error = std::current_exception();
        }
        team.barrier(threads);
      } else if (t == 0) {
        try {
          if (ph.glue) ph.glue(0, rows);
        } catch (...) {
          team.error = std::current_exception();
          team.failed.store(true, std::memory_order_relaxed);
        }
        if (ph.linear) etr_gemm::split_runs(team.runs.data(), ph.linear->blocks, threads);
        team.phase.store(k + 1, std::memory_order_release);
      } else {
        if (ph.linear) ph.linear->fetch_ahead(t, threads, team.phase, k + 1);
        for (int64_t spins = 0; team.phase.load(std::memory_order_acquire) < k + 1;) wait_a_little(spins);
      }
      if (team.failed.load(std::memory_order_relaxed)) break;
      if (ph.linear) {
        etr_gemm::own_then_others(team.runs.data(), t, threads, [&](int64_t b) { ph.linear->block(b); });
        team.barrier(threads);
      }
    }
  }
  if (team.error) std::rethrow_exception(team.error);
}

RegionLinear region_linear(const at::Tensor& packed, const bf16* x, at::Tensor& y) {
  return {x, packed.data_ptr<bf16>(), y.data_ptr<bf16>(), y.size(0), packed.size(1), packed.size(0), y.size(1)};
}

// Whether packed [blocks, pairs, 32, 2] weight `w` takes `in` inputs to `out` outputs, as the linear op checks.
bool packed_for(const at::Tensor& w, int64_t in, int64_t out) {
  return w.dim() == 4 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(2) == etr_gemm::kBlock &&
         w.size(3) == 2 && 2 * w.size(1) == in && out > (w.size(0) - 1) * etr_gemm::kBlock &&
         out <= w.size(0) * etr_gemm::kBlock;
}

// Whether a step takes region_layers: see the comment above g_region. Whatever it turns down runs one op a linear,
// whose checks name what is wrong.
bool region_fits(const Step& s, int64_t rows, at::TensorList weights, const std::vector<std::optional<at::Tensor>>& b) {
  const int64_t q_size = s.heads * s.head_dim, width = q_size + 2 * s.kv_heads * s.head_dim;
  if (!g_region.load(std::memory_order_relaxed) || s.kind != kEtr || rows > kRegionRows || at::in_parallel_region() ||
      at::get_num_threads() < 2 || s.hidden % 2 || s.intermediate % 2 || q_size % 2 || s.lens.numel() != rows)
    return false;
  for (const auto& bias : b)
    if (bias) return false;
  for (size_t i = 0; i + kWeightsPerLayer <= weights.size(); i += kWeightsPerLayer) {
    const at::Tensor* w = weights.data() + i;
    if (!packed_for(w[1], s.hidden, width) || !packed_for(w[2], q_size, s.hidden) ||
        !packed_for(w[4], s.hidden, 2 * s.intermediate) || !packed_for(w[5], s.intermediate, s.hidden))
      return false;
  }
  return true;
}

// raw_layer for every layer, as region phases: the same glue functions and the linear op's tiles.
at::Tensor region_layers(const Step& s, at::Tensor& residual, at::TensorList weights, at::TensorList k_pages,
                         at::TensorList v_pages) {
  const int64_t B = residual.size(0), n = s.hidden, q_size = s.heads * s.head_dim;
  const int64_t width = q_size + 2 * s.kv_heads * s.head_dim;
  const at::TensorOptions opt = residual.options();
  at::Tensor h = at::empty({B, n}, opt), qkv = at::empty({B, width}, opt), o = at::empty({B, n}, opt);
  at::Tensor gate_up = at::empty({B, 2 * s.intermediate}, opt), act = at::empty({B, s.intermediate}, opt);
  at::Tensor x = at::empty({B, n}, opt), attn;
  static_assert(kSplitGlueRows > 1, "the inline attention's glue (one row) must run on the first thread alone");
  const bool inline_attention = B == 1 && s.lens.scalar_type() == at::kInt &&
                                s.lens.data_ptr<int32_t>()[0] <= kInlineAttentionPositions;
  const float eps = static_cast<float>(s.eps);
  bf16 *res = residual.data_ptr<bf16>(), *hp = h.data_ptr<bf16>(), *xp = x.data_ptr<bf16>();
  for (int64_t i = 0; i < static_cast<int64_t>(k_pages.size()); ++i) {
    const at::Tensor* w = weights.data() + kWeightsPerLayer * i;
    const at::Tensor &kp = k_pages[i], &vp = v_pages[i];
    RegionLinear qkv_l = region_linear(w[1], hp, qkv), o_l = region_linear(w[2], nullptr, o);
    RegionLinear gate_up_l = region_linear(w[4], hp, gate_up), down_l = region_linear(w[5], act.data_ptr<bf16>(), x);
    auto norm1 = [&, i](int64_t r0, int64_t r1) {
      add_rms_norm(i ? xp + r0 * n : nullptr, res + r0 * n, w[0].data_ptr<bf16>(), hp + r0 * n, r1 - r0, n, eps);
    };
    auto attend = [&](int64_t, int64_t) {  // one row (inline_attention)
      attn = rope_write_attend(s, qkv, kp, vp);
      o_l.x = attn.data_ptr<bf16>();
    };
    bf16* op = o.data_ptr<bf16>();
    auto norm2 = [&](int64_t r0, int64_t r1) {
      add_rms_norm(op + r0 * n, res + r0 * n, w[3].data_ptr<bf16>(), hp + r0 * n, r1 - r0, n, eps);
    };
    auto silu = [&](int64_t r0, int64_t r1) {
      silu_mul(gate_up.data_ptr<bf16>() + r0 * 2 * s.intermediate, act.data_ptr<bf16>() + r0 * s.intermediate,
               r1 - r0, s.intermediate);
    };
    if (inline_attention) {
      run_region({{norm1, &qkv_l}, {attend, &o_l}, {norm2, &gate_up_l}, {silu, &down_l}}, B);
    } else {
      run_region({{norm1, &qkv_l}, {[&](int64_t r0, int64_t r1) { rope_write(s, qkv, kp, vp, r0, r1); }, nullptr}},
                 B);
      attn = paged_decode(qkv.view({B, s.heads + 2 * s.kv_heads, s.head_dim}).narrow(1, 0, s.heads), kp, vp,
                          s.tables, s.lens, s.scale);
      o_l.x = attn.data_ptr<bf16>();
      run_region({{nullptr, &o_l}, {norm2, &gate_up_l}, {silu, &down_l}}, B);
    }
  }
  return x;
}
#else
bool region_fits(const Step&, int64_t, at::TensorList, const std::vector<std::optional<at::Tensor>>&) {
  return false;
}
at::Tensor region_layers(const Step&, at::Tensor&, at::TensorList, at::TensorList, at::TensorList) {
  TORCH_CHECK(false, "decode_layers: the step's region needs a build with the bf16 dot instruction");
}
#endif

// Everything the raw loops index, checked before anything is written (the ATen path gets these checks from its
// ops; the loops would read or write out of bounds instead).
void check_raw(const Step& s, const at::Tensor& input_ids, at::TensorList weights, at::TensorList k_pages,
               at::TensorList v_pages, const at::Tensor& final_norm) {
  const int64_t B = input_ids.numel(), kv_size = s.kv_heads * s.head_dim;
  TORCH_CHECK(input_ids.dim() == 1 && s.cos.size(0) == B && s.sin.size(0) == B && s.cos.size(1) == s.head_dim &&
                  s.sin.size(1) == s.head_dim,
              "decode_layers: one position per input id and rotary tables of head size ", s.head_dim, " expected");
  TORCH_CHECK(s.slots.scalar_type() == at::kLong && s.slots.is_contiguous() && s.slots.numel() == B,
              "decode_layers: one int64 slot per input id expected, got ", s.slots.numel(), " for ", B);
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& t = weights[i];
    TORCH_CHECK(t.is_mkldnn() || t.is_contiguous(), "decode_layers: weight ", i, " is not contiguous");
    const int64_t j = static_cast<int64_t>(i) % kWeightsPerLayer;
    if (j == 0 || j == 3)
      TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.numel() == s.hidden, "decode_layers: norm weight ", i,
                  " of ", s.hidden, " bf16 values expected, got ", t.numel(), " ", t.scalar_type());
  }
  TORCH_CHECK(final_norm.scalar_type() == at::kBFloat16 && final_norm.is_contiguous() &&
                  final_norm.numel() == s.hidden,
              "decode_layers: a contiguous final norm of ", s.hidden, " bf16 values expected");
  const int64_t capacity = v_pages[0].numel() / kv_size;
  for (size_t i = 0; i < k_pages.size(); ++i)
    TORCH_CHECK(k_pages[i].scalar_type() == at::kBFloat16 && k_pages[i].is_contiguous() &&
                    v_pages[i].is_contiguous() && v_pages[i].numel() == k_pages[i].numel() &&
                    v_pages[i].scalar_type() == at::kBFloat16 && v_pages[i].numel() == capacity * kv_size &&
                    v_pages[i].size(-1) == s.head_dim && (k_pages[i].dim() == 4 || k_pages[i].dim() == 5),
                "decode_layers: layer ", i, "'s K and V pages must be contiguous bf16 pools of one size (K may be ",
                "packed), head size ", s.head_dim);
  const int64_t* slots = s.slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < B; ++r)
    TORCH_CHECK(slots[r] >= 0 && slots[r] < capacity, "decode_layers: slot ", slots[r], " of row ", r,
                " is outside the KV pool of ", capacity, " slots");
}

at::Tensor raw_layers(const Step& s, const at::Tensor& input_ids, const at::Tensor& embed, at::TensorList weights,
                      const std::vector<std::optional<at::Tensor>>& b, at::TensorList k_pages,
                      at::TensorList v_pages, const at::Tensor& final_norm) {
  check_raw(s, input_ids, weights, k_pages, v_pages, final_norm);
  at::Tensor residual = at::embedding(embed, input_ids).contiguous(), x;
  if (region_fits(s, residual.size(0), weights, b)) {
    x = region_layers(s, residual, weights, k_pages, v_pages);
    g_region_steps.fetch_add(1);
  } else {
    at::Tensor h = at::empty_like(residual), act = at::empty({residual.size(0), s.intermediate}, residual.options());
    for (int64_t i = 0; i < static_cast<int64_t>(k_pages.size()); ++i) {
      x = raw_layer(s, i ? &x : nullptr, residual, h, act, weights.data() + kWeightsPerLayer * i,
                    b.data() + kBiasesPerLayer * i, k_pages[i], v_pages[i]);
    }
  }
  at::Tensor out = at::empty_like(residual);
  add_rms_norm(x.data_ptr<bf16>(), residual.data_ptr<bf16>(), final_norm.data_ptr<bf16>(), out.data_ptr<bf16>(),
               residual.size(0), s.hidden, static_cast<float>(s.eps));
  return out;
}
#else
at::Tensor raw_layers(const Step&, const at::Tensor&, const at::Tensor&, at::TensorList,
                      const std::vector<std::optional<at::Tensor>>&, at::TensorList, at::TensorList,
                      const at::Tensor&) {
  TORCH_CHECK(false, "decode_layers: the raw glue needs a build with AVX-512 (F, BW, VL)");
}
#endif

// Packed K pools (5-d) must be [blocks, kv_heads, head_dim/2, block_size, 2] beside their V pools, contiguous
// bf16, every layer checked before anything is written: write_packed_k takes the layout from the pool.
void check_packed_pools(at::TensorList k_pages, at::TensorList v_pages, int64_t kv_heads, int64_t head_dim) {
  for (size_t i = 0; i < k_pages.size(); ++i) {
    const at::Tensor &k = k_pages[i], &v = v_pages[i];
    if (k.dim() != 5) continue;
    TORCH_CHECK(v.dim() == 4 && v.size(2) == kv_heads && v.size(3) == head_dim && head_dim % 2 == 0 &&
                    k.sizes() == at::IntArrayRef({v.size(0), kv_heads, head_dim / 2, v.size(1), 2}) &&
                    k.is_contiguous() && k.scalar_type() == at::kBFloat16,
                "decode_layers: layer ", i, "'s packed K pages [", v.size(0), ", ", kv_heads, ", ", head_dim / 2,
                ", ", v.size(1), ", 2] expected beside V pages ", v.sizes(), " (contiguous bf16); got ", k.sizes(),
                " ", k.scalar_type());
  }
}

at::Tensor decode_layers(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& embed,
                         const at::Tensor& cos_table, const at::Tensor& sin_table, at::TensorList weights,
                         const c10::List<std::optional<at::Tensor>>& biases, at::TensorList k_pages,
                         at::TensorList v_pages, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                         const at::Tensor& context_lens, const at::Tensor& final_norm, int64_t heads,
                         int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps, double scale,
                         int64_t linear_kind, int64_t glue) {
  const int64_t layers = static_cast<int64_t>(k_pages.size());
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(v_pages.size()) == layers &&
                  static_cast<int64_t>(weights.size()) == kWeightsPerLayer * layers &&
                  static_cast<int64_t>(biases.size()) == kBiasesPerLayer * layers,
              "decode_layers: ", kWeightsPerLayer, " weights, ", kBiasesPerLayer,
              " biases and one K and V page pool per layer expected; got ", weights.size(), " weights, ",
              biases.size(), " biases, ", k_pages.size(), " K and ", v_pages.size(), " V pools");
  TORCH_CHECK(linear_kind >= kPlain && linear_kind <= kEtr, "decode_layers: linear_kind ", linear_kind,
              " is none of 0 (plain), 1 (oneDNN), 2 (etr)");
  check_packed_pools(k_pages, v_pages, kv_heads, head_dim);
  const at::ScalarType dtype = embed.scalar_type();
  const at::Tensor cos = cos_table.index({positions}).to(dtype).unsqueeze(1);
  const at::Tensor sin = sin_table.index({positions}).to(dtype).unsqueeze(1);
  const Step s{heads, kv_heads, head_dim, intermediate, embed.size(1), eps, scale, linear_kind, cos, sin,
               slot_mapping, block_tables, context_lens};
  std::vector<std::optional<at::Tensor>> b(biases.begin(), biases.end());
  TORCH_CHECK(glue == 0 || glue == 1, "decode_layers: glue ", glue, " is neither 0 (ATen) nor 1 (raw)");
  if (glue == 1) {
    TORCH_CHECK(dtype == at::kBFloat16, "decode_layers: the raw glue is for bf16 models, not ", dtype);
    const at::Tensor cos2 = cos.squeeze(1).contiguous(), sin2 = sin.squeeze(1).contiguous();
    const Step raw{heads, kv_heads, head_dim, intermediate, embed.size(1), eps, scale, linear_kind, cos2, sin2,
                   slot_mapping, block_tables, context_lens};
    return raw_layers(raw, input_ids, embed, weights, b, k_pages, v_pages, final_norm);
  }
  at::Tensor x = at::embedding(embed, input_ids), residual;
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* w = weights.data() + kWeightsPerLayer * i;
    const std::optional<at::Tensor>* bi = b.data() + kBiasesPerLayer * i;
    at::Tensor h;
    if (i == 0) {
      residual = x;
      h = rms_norm(x, w[0], eps);
    } else {
      residual = x + residual;
      h = rms_norm(residual, w[0], eps);
    }
    residual = attention(s, h, w, bi, k_pages[i], v_pages[i]) + residual;
    x = mlp(s, rms_norm(residual, w[3], eps), w, bi);
  }
  return rms_norm(x + residual, final_norm, eps);
}

}  // namespace

TORCH_LIBRARY(etr_cpu_step, m) {
  m.def("decode_layers(Tensor input_ids, Tensor positions, Tensor embed, Tensor cos_table, Tensor sin_table, "
        "Tensor[] weights, Tensor?[] biases, Tensor(a!)[] k_pages, Tensor(b!)[] v_pages, Tensor slot_mapping, "
        "Tensor block_tables, Tensor context_lens, Tensor final_norm, int heads, int kv_heads, int head_dim, "
        "int intermediate, float eps, float scale, int linear_kind, int glue) -> Tensor");
  m.def("raw_glue() -> bool", &raw_glue);
  m.def("set_region(bool on) -> bool", &set_region);
  m.def("region_steps() -> int", &region_steps);
  m.def("set_stream_hint(bool on) -> bool", &etr_gemm::set_stream_hint);
  m.def("set_prefetch(bool on) -> bool", &etr_gemm::set_prefetch);
  m.def("set_one_walk(bool on) -> bool", &etr_gemm::set_one_walk);
}

// Every backend: prepacked oneDNN weights are MkldnnCPU tensors, and the dispatcher keys on them too.
TORCH_LIBRARY_IMPL(etr_cpu_step, CompositeExplicitAutograd, m) { m.impl("decode_layers", &decode_layers); }
