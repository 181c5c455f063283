"""A whole decode step of the decoder stack on the CPU as one C++ op (``cpu_decode_step.cpp``).

It runs the ATen ops that ``DecoderLM.forward`` runs for a decode step with the torch backend's in-place
attention, in the same order and dtypes, so its hidden states are the same bits (tests/test_cpu_decode_step.py
checks them against the model's forward); what it saves is the Python between them, which at batch 1 costs a
small model more than its arithmetic (bench/RESULTS.md). Built on first use (kernels/cpp_op.py); where it
cannot be built, or ``ETR_CPU_DECODE_STEP=0``, the engine runs the model's forward.

``DecodeStep.for_model`` says whether a model can take it: the Llama/Qwen2 decoder of models/decoder.py
without the Triton ops, its linears either plain ``nn.Linear`` or oneDNN-prepacked (``PackedBf16Linear``), all
of one kind: the op runs each linear as the module does (``F.linear``, oneDNN, or the package's own bf16
GEMM of kernels/cpu_bf16_linear.py).

bf16 models take the op's raw glue where it is built (AVX-512): the elementwise work between the linears as
loops of its own instead of ATen ops (``glue`` "raw"; close to the forward, not its bits: the tests state the
tolerance). ``ETR_CPU_STEP_GLUE=aten`` keeps the ATen ops, which are the forward's bits.

With the raw glue on the package's bf16 GEMM, steps of 1-64 rows run each layer in one parallel region (the op's
``set_region``; ``ETR_CPU_STEP_REGION=0`` off; ``region_steps`` counts the steps that took it): the same bits as
one op a linear, with the memory kept busy during the glue at 1-4 rows and the glue split over the threads from 5
rows up (cpu_decode_step.cpp says how). Their tiles mark the
weights non-temporal as the linear op's do (``set_stream_hint``; ``ETR_CPU_GEMM_NTA=0`` off).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from etr.errors import ConfigError
from etr.kernels import cpu_paged_decode
from etr.kernels.cpp_op import CppOp
from etr.kernels.cpu_gemm import PackedBf16Linear

OP = CppOp("cpu_decode_step.cpp", "CPU decode-step op", "ETR_CPU_DECODE_STEP")


def available() -> bool:
    """Whether the op (and the decode-attention op it calls) is loaded, building them first if needed."""
    return cpu_paged_decode.available() and OP.available()


def load_error() -> str | None:
    """Why the op is not available (None when it is, or before ``available()`` was asked)."""
    return cpu_paged_decode.load_error() or OP.error


KINDS = {"plain": 0, "onednn": 1, "etr": 2}  # the op's linear_kind
GLUES = {"aten": 0, "raw": 1}  # the op's glue


def set_stream_hint(on: bool) -> bool:
    """The decode step's own copy of the GEMM tiles' non-temporal hint at 1-12 rows (see
    ``cpu_bf16_linear.set_stream_hint``, which switches the linear op's); returns the previous setting."""
    return bool(torch.ops.etr_cpu_step.set_stream_hint(bool(on)))


def set_prefetch(on: bool) -> bool:
    """The decode step's own copy of the GEMM tiles' prefetch of the next weight block (13 rows and more; from 5
    with the stream hint or the one walk off; see
    ``cpu_bf16_linear.set_prefetch``, which switches the linear op's); returns the previous setting."""
    return bool(torch.ops.etr_cpu_step.set_prefetch(bool(on)))


def set_one_walk(on: bool) -> bool:
    """The decode step's own copy of the GEMM's one tile for up to 12 rows (see ``cpu_bf16_linear.set_one_walk``,
    which switches the linear op's); returns the previous setting."""
    return bool(torch.ops.etr_cpu_step.set_one_walk(bool(on)))


def glue_for(dtype: torch.dtype) -> str:
    """The glue a model of ``dtype`` takes: "raw" for bf16 where the op has it, unless ``ETR_CPU_STEP_GLUE``
    says "aten"; "aten" otherwise."""
    wanted = os.environ.get("ETR_CPU_STEP_GLUE", "raw")
    if wanted not in GLUES:
        raise ConfigError(f"ETR_CPU_STEP_GLUE={wanted!r}: expected one of {sorted(GLUES)}")
    raw = wanted == "raw" and dtype == torch.bfloat16 and torch.ops.etr_cpu_step.raw_glue()
    return "raw" if raw else "aten"


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, str] | None:
    """(weight, bias, kind) of a linear the op can run, else None."""
    if isinstance(module, PackedBf16Linear):
        return module.packed, module.bias, module.kind
    if type(module) is nn.Linear:
        return module.weight, module.bias, "plain"
    return None


@dataclass(slots=True)
class DecodeStep:
    """The argument lists of one model for the op, gathered once (the weights never move)."""
    model: nn.Module
    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    kind: str  # of every linear: "plain", "onednn" or "etr"
    glue: str  # "raw" or "aten" (see the module doc)

    @classmethod
    def for_model(cls, model: nn.Module) -> DecodeStep | None:
        """The step for ``model`` on the CPU, or None where the model cannot take it (see the module doc)."""
        from etr.models.decoder import DecoderLM
        if not isinstance(model, DecoderLM) or model.fused or model.embed_tokens.weight.device.type != "cpu":
            return None
        weights, biases, kinds = [], [], set()
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = [_linear_weight(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if any(x is None for x in linears):
                return None
            (qkv, o, gate_up, down) = linears
            weights += [layer.input_layernorm.weight, qkv[0], o[0], layer.post_attention_layernorm.weight,
                        gate_up[0], down[0]]
            biases += [x[1] for x in linears]
            kinds |= {x[2] for x in linears}
        if len(kinds) != 1:
            return None
        return cls(model, weights, biases, kinds.pop(), glue_for(model.embed_tokens.weight.dtype))

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, kv_caches) -> torch.Tensor:
        """Final hidden states ``[B, hidden]`` of a decode step (``meta`` prepared by the torch backend)."""
        m, cfg = self.model, self.model.config
        layer = m.layers[0]
        return torch.ops.etr_cpu_step.decode_layers(
            input_ids, positions, m.embed_tokens.weight, m.rope_cos, m.rope_sin, self.weights, self.biases,
            [k for k, _ in kv_caches], [v for _, v in kv_caches], meta.slot_mapping, meta.block_tables,
            meta.context_lens, m.norm.weight, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            layer.mlp.intermediate, layer.input_layernorm.eps, layer.self_attn.scale, KINDS[self.kind],
            GLUES[self.glue])
