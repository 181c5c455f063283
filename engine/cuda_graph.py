"""CUDA graphs for the decode step: one captured forward per batch size over static buffers.

A decode step of a small model is a few hundred kernel launches of microseconds each; replaying a graph
launches them all at once. A batch of B sequences runs in the graph of the smallest captured size >= B:
its rows are copied into the static buffers and the rest are padding (token 0, KV slot -1 so nothing is
written, context length 0 so attention reads nothing). The attention grid is fixed too: the split count
covers ``max_model_len``, and splits past a sequence's context weigh 0. Batches above the largest size run
eagerly. Each ModelRunner owns its DecodeGraphs and its own graph memory pool, so the meta and every expert
capture and replay independently in one process.

``capture=False`` runs the very same padded static-buffer path eagerly: that is how the CPU tests check the
padding and buffer reuse that the GPU replays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from etr.engine.attention import AttentionMetadata
from etr.kernels.paged_attention import split_plan

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
CAPTURABLE_BACKENDS = ("triton", "flash")  # the torch backend sizes its gathers on the host every step


@dataclass(slots=True)
class GraphBuffers:
    """The static inputs, metadata and output of one batch size's graph. The inputs are views of two device
    tensors (int64: token ids, positions, KV slots; int32: context lengths, block tables), each filled from
    a host staging copy (pinned on CUDA) by one copy per step."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    long_inputs: torch.Tensor
    int_inputs: torch.Tensor
    long_stage: torch.Tensor
    int_stage: torch.Tensor
    hidden: torch.Tensor | None = None
    graph: object = None  # torch.cuda.CUDAGraph once captured


class DecodeGraphs:
    """One model's decode graphs, one per batch size in ``sizes`` (see the module docstring)."""
    def __init__(self, runner, max_num_seqs: int, max_model_len: int, capture: bool):
        self.runner, self.capture = runner, capture
        self.sizes = sorted({b for b in BATCH_SIZES if b < max_num_seqs} | {max_num_seqs})
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // runner.block_size)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.buffers = {b: self._buffers(b) for b in self.sizes}
        if capture:
            for b in reversed(self.sizes):  # largest first: smaller graphs reuse its pool memory
                self._capture(self.buffers[b])

    def _buffers(self, b: int) -> GraphBuffers:
        dev = self.runner.device
        pin = dev.type == "cuda"
        long_stage = torch.zeros(3, b, dtype=torch.long, pin_memory=pin)
        long_stage[2] = -1  # padding rows write no KV
        int_stage = torch.zeros(b * (1 + self.max_blocks), dtype=torch.int32, pin_memory=pin)
        long_inputs, int_inputs = long_stage.to(dev, copy=True), int_stage.to(dev, copy=True)
        meta = AttentionMetadata(
            is_prefill=False, query_lens=[1] * b, context_lens_list=[self.max_model_len] * b,
            cu_seqlens_q=torch.arange(b + 1, dtype=torch.int32, device=dev),
            slot_mapping=long_inputs[2], context_lens=int_inputs[:b],
            block_tables=int_inputs[b:].view(b, self.max_blocks),
            block_size=self.runner.block_size, dtype=self.runner.dtype, has_padding=True)
        # The attention grid of this batch size, fixed to cover max_model_len (see kernels/paged_attention.py).
        meta.extra["pages_per_split"], meta.extra["num_splits"] = split_plan(
            b, self.runner.config.num_key_value_heads, self.max_blocks, self.runner.block_size, dev.type == "cuda")
        return GraphBuffers(long_inputs[0], long_inputs[1], meta, long_inputs, int_inputs, long_stage, int_stage)

    def _forward(self, buf: GraphBuffers) -> torch.Tensor:
        runner = self.runner
        runner.backend.prepare(buf.meta)
        return runner.model(buf.input_ids, buf.positions, buf.meta, runner.kv_caches, runner.backend)

    @torch.inference_mode()  # as the eager steps run: no autograd state recorded into the graph
    def _capture(self, buf: GraphBuffers) -> None:
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):  # warm-up outside capture: Triton compiles, allocators settle
            self._forward(buf)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        buf.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(buf.graph, pool=self.pool):
            buf.hidden = self._forward(buf)

    def size_for(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """Hidden states ``[n, hidden]`` of a decode batch of n <= the largest size (see ``size_for``), from
        the host-side inputs: staged on the host, then two copies into the graph's buffers. The staging
        copy is reused only after the previous step's tokens arrived (the engine waits for them), so its
        last copy has completed."""
        n = len(token_ids)
        b = self.size_for(n)
        buf = self.buffers[b]
        longs, ints = buf.long_stage.numpy(), buf.int_stage.numpy()
        longs[0, :n], longs[1, :n], longs[2, :n], longs[2, n:] = token_ids, positions, slots, -1
        ints[:n], ints[n:b] = context_lens, 0
        tables = ints[b:].reshape(b, self.max_blocks)
        for row, table in zip(tables, block_tables):
            row[:len(table)] = table
        buf.long_inputs.copy_(buf.long_stage, non_blocking=True)
        buf.int_inputs.copy_(buf.int_stage, non_blocking=True)
        if buf.graph is not None:
            buf.graph.replay()
        else:
            buf.hidden = self._forward(buf)
        return buf.hidden[:n]
