"""One decoder for the Llama and Qwen2 families, on flattened (varlen) token batches.

Every forward takes all tokens of a step as one ``[num_tokens]`` batch plus an attention-metadata
object that tells the attention backend where each sequence starts and where its KV pages are.
q/k/v and gate/up projections are fused into one matmul each; the loader splits HF tensors into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from etr.kernels.fused_norm import fused_add_rms_norm
from etr.kernels.rotary import rotary_
from etr.kernels.silu_mul import silu_mul
from etr.models.config import ModelConfig
from etr.models.rope import apply_rotary, cos_sin_table


class RMSNorm(nn.Module):
    """RMSNorm in transformers' op order in every dtype (float32 bit for bit; in bf16 it rounds where
    transformers rounds, which keeps log-probs closer to HF's than torch's fused rms_norm, whose one rounding
    moved SmolLM2-135M's first chat token from "The" to "L": 0.25 nats off HF's log-prob instead of 0.09).

    Called with a residual, it adds it first and returns ``(normed, sum)`` (the residual stream), so the
    Triton path (``fused``, see kernels/fused_norm.py) does the add and the norm in one pass."""
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.fused:
            normed, total = fused_add_rms_norm(x, residual, self.weight, self.eps)
            return normed if residual is None else (normed, total)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    """Self-attention with fused q/k/v, rotary embeddings and a pluggable paged backend."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.scale = self.head_dim ** -0.5
        self.fused = False

    def forward(self, x, rope, meta, kv_cache, backend):
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads rotate together: one rotation instead of two per layer (fewer small CPU ops).
        qk = qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        qk = rotary_(qk, *rope) if self.fused else apply_rotary(qk, *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    """SwiGLU MLP with fused gate/up."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused:
            return self.down_proj(silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residuals."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, rope, meta, kv_cache, backend):
        """``(mlp output, residual stream)``: the next norm adds the two (vLLM's layout, so that a fused
        kernel can); the first layer gets ``residual=None``."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rope, meta, kv_cache, backend), residual)
        return self.mlp(h), residual


class DecoderLM(nn.Module):
    """Llama/Qwen2 decoder. ``forward`` returns final hidden states; ``compute_logits`` applies the LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head_proj: nn.Module | None = None  # an alternative LM-head matmul (see kernels/cpu_gemm.py)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``[vocab, hidden]``; the embedding matrix itself when the head is tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def init_rope(self, max_positions: int) -> None:
        """Build the cos/sin tables; call after the weights are on their final device."""
        device = self.embed_tokens.weight.device
        self.rope_cos, self.rope_sin = cos_sin_table(self.config, max_positions, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, kv_caches=None, backend=None):
        """Hidden states ``[num_tokens, hidden]`` for a flattened batch.

        ``meta`` is the step's attention metadata, ``kv_caches`` a per-layer list of ``(k_pages, v_pages)``
        or None (no cache: plain causal attention within each sequence), ``backend`` the attention backend.
        """
        if self.fused:  # the rotary kernel reads the float32 tables at each position itself
            rope = (positions, self.rope_cos, self.rope_sin)
        else:
            dtype = self.embed_tokens.weight.dtype
            rope = (self.rope_cos[positions].to(dtype), self.rope_sin[positions].to(dtype))
        x, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rope, meta, None if kv_caches is None else kv_caches[i], backend)
        return self.norm(x, residual)[0]

    @property
    def fused(self) -> bool:
        return self.norm.fused

    def use_fused_ops(self, on: bool = True) -> None:
        """Run residual add + RMSNorm, rotary and SiLU-mul as Triton kernels (kernels/fused_norm.py,
        rotary.py, silu_mul.py) instead of torch's separate elementwise ops."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, MLP)):
                m.fused = on

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head_proj is not None:
            return self.head_proj(hidden)
        return F.linear(hidden, self.lm_head_weight)
