// One decode step of the whole decoder stack on the CPU, from token ids to the final norm's output, as one torch
// op. It runs the very ATen ops, in the same order and dtypes, that models/decoder.py runs for a decode step
// with the torch backend's in-place attention (so its outputs are the same bits); what it removes is the
// Python between those ops: the interpreter, the binding's argument parsing and the module calls, about 1,000
// times a step for a 30-layer model. The plain-torch reference is the model's own forward.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

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

at::Tensor attention(const Step& s, const at::Tensor& h, const at::Tensor* w,
                     const std::optional<at::Tensor>* b, const at::Tensor& k_pages, const at::Tensor& v_pages) {
  const int64_t q_size = s.heads * s.head_dim, kv_size = s.kv_heads * s.head_dim;
  std::vector<at::Tensor> qk_v = linear(h, w[1], b[0], s.kind, q_size + 2 * kv_size).split_with_sizes({q_size + kv_size, kv_size}, -1);
  at::Tensor qk = rotary(qk_v[0].view({-1, s.heads + s.kv_heads, s.head_dim}), s.cos, s.sin);
  std::vector<at::Tensor> q_k = qk.split_with_sizes({s.heads, s.kv_heads}, 1);
  at::Tensor v = qk_v[1].view({-1, s.kv_heads, s.head_dim});
  k_pages.view({-1, s.kv_heads, s.head_dim}).index_copy_(0, s.slots, q_k[1]);
  v_pages.view({-1, s.kv_heads, s.head_dim}).index_copy_(0, s.slots, v);
  at::Tensor out = paged_decode(q_k[0], k_pages, v_pages, s.tables, s.lens, s.scale);
  return linear(out.reshape({-1, q_size}), w[2], b[1], s.kind, s.hidden);
}

at::Tensor mlp(const Step& s, const at::Tensor& h, const at::Tensor* w, const std::optional<at::Tensor>* b) {
  std::vector<at::Tensor> gate_up = linear(h, w[4], b[2], s.kind, 2 * s.intermediate).split(s.intermediate, -1);
  return linear(at::silu(gate_up[0]) * gate_up[1], w[5], b[3], s.kind, s.hidden);
}

at::Tensor decode_layers(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& embed,
                         const at::Tensor& cos_table, const at::Tensor& sin_table, at::TensorList weights,
                         const c10::List<std::optional<at::Tensor>>& biases, at::TensorList k_pages,
                         at::TensorList v_pages, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                         const at::Tensor& context_lens, const at::Tensor& final_norm, int64_t heads,
                         int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps, double scale,
                         int64_t linear_kind) {
  const int64_t layers = static_cast<int64_t>(k_pages.size());
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(v_pages.size()) == layers &&
                  static_cast<int64_t>(weights.size()) == kWeightsPerLayer * layers &&
                  static_cast<int64_t>(biases.size()) == kBiasesPerLayer * layers,
              "decode_layers: ", kWeightsPerLayer, " weights, ", kBiasesPerLayer,
              " biases and one K and V page pool per layer expected; got ", weights.size(), " weights, ",
              biases.size(), " biases, ", k_pages.size(), " K and ", v_pages.size(), " V pools");
  TORCH_CHECK(linear_kind >= kPlain && linear_kind <= kEtr, "decode_layers: linear_kind ", linear_kind,
              " is none of 0 (plain), 1 (oneDNN), 2 (etr)");
  const at::ScalarType dtype = embed.scalar_type();
  const at::Tensor cos = cos_table.index({positions}).to(dtype).unsqueeze(1);
  const at::Tensor sin = sin_table.index({positions}).to(dtype).unsqueeze(1);
  const Step s{heads, kv_heads, head_dim, intermediate, embed.size(1), eps, scale, linear_kind, cos, sin,
               slot_mapping, block_tables, context_lens};
  std::vector<std::optional<at::Tensor>> b(biases.begin(), biases.end());
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
        "int intermediate, float eps, float scale, int linear_kind) -> Tensor");
}

// Every backend: prepacked oneDNN weights are MkldnnCPU tensors, and the dispatcher keys on them too.
TORCH_LIBRARY_IMPL(etr_cpu_step, CompositeExplicitAutograd, m) { m.impl("decode_layers", &decode_layers); }
