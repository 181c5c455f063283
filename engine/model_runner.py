"""One model, its KV pool and its attention backend: turns scheduled sequences into last-position logits."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from etr.engine.attention import AttentionMetadata, get_backend
from etr.engine.attention.mixed import MixedAttention, MixedMetadata
from etr.engine.config import EngineConfig
from etr.engine.cuda_graph import CAPTURABLE_BACKENDS, DecodeGraphs
from etr.engine.kv_cache import allocate_kv_cache, copy_kv_block
from etr.engine.pending_step import DeviceStream, host_to_device
from etr.engine.sequence import Sequence
from etr.kernels import cpu_decode_step, fused_norm, interpreted, lm_head
from etr.kernels.cpu_gemm import use_fp32_gemm, use_packed_bf16, wants_fp32_gemm, wants_packed_bf16
from etr.errors import ConfigError
from etr.models.loader import load_model


# A sequence whose prefill rows read at most this many positions of context a layer runs through the CPU's
# decode-step op, one row per prompt token (``ModelRunner._token_rows``). Each row reads its whole prefix, so
# the reads grow with the square of the new tokens (131,072: a prompt of ~511 tokens); on SmolLM2 the rows took
# 0.73-0.84 of the forward's time from 40 to 900 tokens (bench/RESULTS.md), the forward's Python and small ops
# outweighing them, and the budget stays well inside that. Decided per sequence, so that a sequence's path does
# not depend on what it was batched with.
SHORT_PREFILL_POSITIONS = 131072


def check_fused_ops(device: torch.device) -> None:
    """The fused Triton ops need Triton, and on the CPU its interpreter."""
    if fused_norm.triton is None:
        raise ConfigError("fused_ops=True needs triton, which does not import here")
    if device.type == "cpu" and not interpreted():
        raise ConfigError("fused_ops=True on the CPU runs only under TRITON_INTERPRET=1 (a testing aid); "
                          "use it on CUDA")


class ModelRunner:
    """One model on its device with its KV pool, attention backend and decode graphs."""
    def __init__(self, config: EngineConfig, model_dir: str, device: torch.device):
        dtype = config.dtype
        self.device, self.dtype, self.block_size = device, dtype, config.block_size_for(device)
        self.max_model_len, self.max_num_seqs = config.max_model_len, config.max_num_seqs
        self.model = load_model(model_dir, dtype, device, max_positions=config.max_model_len)
        if wants_fp32_gemm(device, dtype):
            use_fp32_gemm(self.model)
        elif wants_packed_bf16(device, dtype):
            use_packed_bf16(self.model)
        self.config = self.model.config
        if config.fused_ops:
            check_fused_ops(device)
            self.model.use_fused_ops()
        self.backend = get_backend(config.backend_for(device), device)
        self.native_step = self._native_step()
        self.mixed = MixedAttention(self.backend)
        self.num_blocks = 0
        self.kv_pool: torch.Tensor | None = None
        self.pool_layers: list = []
        self.kv_caches: list = []
        self.cuda_graphs = self._wants_graphs(config.cuda_graphs)
        self.graphs: DecodeGraphs | None = None  # built with the KV pool
        self.expert_weight: torch.Tensor | None = None  # W_E: expert-token rows after the vocabulary
        # The Triton extended head runs on CUDA; tests switch it on for the CPU under TRITON_INTERPRET=1.
        self.use_triton_head = device.type == "cuda" and lm_head.triton is not None
        self.stream = DeviceStream(device)  # every step runs here (see engine/pending_step.py)

    def _native_step(self) -> cpu_decode_step.DecodeStep | None:
        """The CPU's decode step as one C++ op, where the backend reads KV pages in place and the op builds."""
        if not getattr(self.backend, "in_place", False) or not cpu_decode_step.available():
            return None
        return cpu_decode_step.DecodeStep.for_model(self.model)

    def _wants_graphs(self, requested: bool | None) -> bool:
        capturable = self.backend.name in CAPTURABLE_BACKENDS
        if requested and not capturable:
            raise ConfigError(f"cuda_graphs=True needs a capturable attention backend {CAPTURABLE_BACKENDS}, "
                              f"not {self.backend.name!r}")
        return capturable and self.device.type == "cuda" if requested is None else requested

    def allocate_kv(self, num_blocks: int) -> None:
        """Create the KV pool, then capture the decode graphs over it; done after every model sharing the
        device has loaded its weights."""
        self.num_blocks = num_blocks
        packs = getattr(self.backend, "packs_k", None)
        packed = packs is not None and packs(self.dtype, self.config.head_dim, self.block_size)
        self.kv_pool, self.kv_caches = allocate_kv_cache(self.config, num_blocks, self.block_size, self.dtype,
                                                         self.device, packed)
        self.pool_layers = self.kv_caches  # the pool's own views (a bench may put other tensors in kv_caches)
        if self.cuda_graphs:  # on the CPU: the same padded static-buffer path, run eagerly (tests)
            # Capture on the model's own device: torch.cuda.graph's capture stream is the current device's.
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                self.graphs = DecodeGraphs(self, self.max_num_seqs, self.max_model_len,
                                           capture=self.device.type == "cuda")

    def copy_block(self, src: int, dst: int) -> None:
        """Copy KV block ``src`` to ``dst`` in every layer, on the model's stream (the block manager moves a
        cached prefix out of a growing sequence's way with it)."""
        with self.stream.active():
            copy_kv_block(self.kv_pool if self.kv_caches is self.pool_layers else None, self.kv_caches, src, dst)

    def set_expert_rows(self, weight: torch.Tensor | None) -> None:
        """Extend the LM head by expert rows ``[E, hidden]`` (None removes them)."""
        self.expert_weight = None if weight is None else weight.to(self.device, self.dtype).contiguous()
        if self.expert_weight is not None and self.use_triton_head and self.device.type == "cuda":
            with torch.cuda.device(self.device):
                lm_head.warm_up(self.model.lm_head_weight, self.expert_weight, self.max_num_seqs)

    def _tensor(self, data, dtype=torch.long) -> torch.Tensor:
        return host_to_device(data, dtype, self.device)

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    def prepare_prefill(self, seqs: list[Sequence]):
        input_ids, positions, slots, query_lens = [], [], [], []
        for seq in seqs:
            start = seq.num_cached_tokens
            input_ids += seq.token_ids[start:]
            positions += range(start, len(seq))
            slots += [self._slot(seq, p) for p in range(start, len(seq))]
            query_lens.append(len(seq) - start)
        context_lens = [len(s) for s in seqs]
        meta = AttentionMetadata(
            is_prefill=True, query_lens=query_lens, context_lens_list=context_lens,
            cu_seqlens_q=self._tensor([0] + query_lens, torch.int32).cumsum(0, dtype=torch.int32),
            slot_mapping=self._tensor(slots), context_lens=self._tensor(context_lens, torch.int32),
            block_tables=self._block_tables(seqs), block_size=self.block_size, dtype=self.dtype)
        return self._tensor(input_ids), self._tensor(positions), meta

    def prepare_decode(self, seqs: list[Sequence]):
        context_lens = [len(s) for s in seqs]
        meta = AttentionMetadata(
            is_prefill=False, query_lens=[1] * len(seqs), context_lens_list=context_lens,
            cu_seqlens_q=self._tensor(list(range(len(seqs) + 1)), torch.int32),
            slot_mapping=self._tensor([self._slot(s, len(s) - 1) for s in seqs]),
            context_lens=self._tensor(context_lens, torch.int32),
            block_tables=self._block_tables(seqs), block_size=self.block_size, dtype=self.dtype)
        positions = self._tensor([len(s) - 1 for s in seqs])
        return self._tensor([s.last_token for s in seqs]), positions, meta

    @torch.inference_mode()
    def hidden_states(self, seqs: list[Sequence], num_decodes: int) -> torch.Tensor:
        """Final hidden state at the last position of every sequence, ``[len(seqs), hidden]``; the first
        ``num_decodes`` sequences decode one token, the rest prefill (see ``Scheduler.schedule``)."""
        if num_decodes == len(seqs):
            return self._decode(seqs)
        if num_decodes == 0:
            return self._prefill(seqs)
        return self._mixed(seqs, num_decodes)

    def _prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Last hidden states of prefilling ``seqs``: the short ones (``SHORT_PREFILL_POSITIONS``) as token rows
        of the CPU's decode-step op where it runs, the others through the model's forward, rows first. A prompt
        may hit the prefix cache on pages another prompt of this step is filling (the block manager registers a
        full page when it hands it out); such a prompt goes with the forward, which writes every prompt's K and V
        of a layer before it reads, so that the rows never read a page this step has yet to write."""
        filling = {b for s in seqs for b in s.block_table[s.num_cached_tokens // self.block_size:]}
        short = [self.native_step is not None and self._row_reads(s) <= SHORT_PREFILL_POSITIONS
                 and not filling.intersection(s.block_table[:s.num_cached_tokens // self.block_size]) for s in seqs]
        out = None
        for rows in (True, False):
            index = [i for i, x in enumerate(short) if x == rows]
            if not index:
                continue
            hidden = self._prefill_group([seqs[i] for i in index], rows)
            if len(index) == len(seqs):
                return hidden
            out = hidden.new_empty(len(seqs), hidden.shape[-1]) if out is None else out
            out[index] = hidden
        return out

    @staticmethod
    def _row_reads(seq: Sequence) -> int:
        """Positions of context the rows of ``seq``'s prefill read a layer: 1 + 2 + ... past its cached prefix."""
        cached, new = seq.num_cached_tokens, len(seq) - seq.num_cached_tokens
        return new * cached + new * (new + 1) // 2

    def _prefill_group(self, seqs: list[Sequence], as_rows: bool) -> torch.Tensor:
        input_ids, positions, meta = self.prepare_prefill(seqs)
        last = meta.cu_seqlens_q[1:].long() - 1
        rows = self._token_rows(meta) if as_rows else None
        if rows is not None:
            return self.native_step(input_ids, positions, rows, self.kv_caches)[last]
        return self._forward(input_ids, positions, meta, self.backend)[last]

    def _token_rows(self, meta: AttentionMetadata) -> AttentionMetadata | None:
        """A prefill as decode rows for the CPU's decode-step op, or None where the backend would not read the
        pages in place: one row per prompt token, with its sequence's block table and its position + 1 as its
        context. The op writes every row's K and V of a layer before that layer's attention, so each row attends
        to its own prefix: causal attention, prefix-cache hits included."""
        lens = [c - q + i + 1 for q, c in zip(meta.query_lens, meta.context_lens_list) for i in range(q)]
        rows = AttentionMetadata(
            is_prefill=False, query_lens=[1] * len(lens), context_lens_list=lens,
            cu_seqlens_q=torch.arange(len(lens) + 1, dtype=torch.int32, device=self.device),
            slot_mapping=meta.slot_mapping, context_lens=self._tensor(lens, torch.int32),
            block_tables=meta.block_tables.repeat_interleave(self._tensor(meta.query_lens), dim=0),
            block_size=meta.block_size, dtype=meta.dtype)
        self.backend.prepare(rows)
        return rows if rows.extra.get("in_place") else None

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        if self.graphs is not None and self.graphs.size_for(len(seqs)) is not None:
            return self.graphs.run([s.last_token for s in seqs], [len(s) - 1 for s in seqs],
                                   [self._slot(s, len(s) - 1) for s in seqs], [len(s) for s in seqs],
                                   [s.block_table for s in seqs])
        input_ids, positions, meta = self.prepare_decode(seqs)
        self.backend.prepare(meta)
        if self.native_step is not None and meta.extra.get("in_place"):
            return self.native_step(input_ids, positions, meta, self.kv_caches)
        return self.model(input_ids, positions, meta, self.kv_caches, self.backend)

    def _mixed(self, seqs: list[Sequence], d: int) -> torch.Tensor:
        ids_d, pos_d, meta_d = self.prepare_decode(seqs[:d])
        ids_p, pos_p, meta_p = self.prepare_prefill(seqs[d:])
        meta = MixedMetadata(meta_d, meta_p, d)
        hidden = self._forward(torch.cat([ids_d, ids_p]), torch.cat([pos_d, pos_p]), meta, self.mixed)
        return torch.cat([hidden[:d], hidden[d + meta_p.cu_seqlens_q[1:].long() - 1]])

    def _forward(self, input_ids, positions, meta, backend) -> torch.Tensor:
        backend.prepare(meta)
        return self.model(input_ids, positions, meta, self.kv_caches, backend)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM-head step: ``[B, V]``, or ``[B, V+E]`` float32 when expert rows are set (Eq. 1)."""
        if self.expert_weight is None:
            return self.model.compute_logits(hidden)
        if self.use_triton_head:
            return lm_head.extended_logits(hidden, self.model.lm_head_weight, self.expert_weight)
        # CPU: the model's own head matmul (see kernels/cpu_gemm.py) plus the few expert rows.
        return torch.cat([self.model.compute_logits(hidden).float(),
                          F.linear(hidden, self.expert_weight).float()], dim=-1)

    def run(self, seqs: list[Sequence], num_decodes: int) -> torch.Tensor:
        return self.compute_logits(self.hidden_states(seqs, num_decodes))

    @property
    def greedy_kernel(self) -> bool:
        """Whether greedy steps can take the argmax straight from the kernel (no logits written)."""
        return self.use_triton_head and self.expert_weight is not None

    @torch.inference_mode()
    def run_greedy(self, seqs: list[Sequence], num_decodes: int) -> torch.Tensor:
        """Greedy next tokens ``[B]`` on the device, straight from the extended-head kernel."""
        hidden = self.hidden_states(seqs, num_decodes)
        return lm_head.extended_argmax(hidden, self.model.lm_head_weight, self.expert_weight)
