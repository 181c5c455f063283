"""The extended LM head: logits of ``[W_V; W_E] · h`` without concatenating the weight matrices.

Two modes: ``extended_logits`` writes ``[B, V+E]`` float32 logits for the sampler; ``extended_argmax``
returns the greedy token per row (vocabulary or expert row) without writing the logits — each program
reduces its tile to a (max, argmax) pair and a tiny second pass picks the best tile. Ties resolve to the
lowest index, as ``torch.argmax``.

The Triton kernel runs compiled on CUDA and under ``TRITON_INTERPRET=1`` on the CPU (tests). The
interpreter multiplies bf16 raw bits, so the ``UPCAST`` flag converts loaded tiles to float32 before any
arithmetic there. ``*_reference`` are the plain-torch definitions the kernel is tested against; the CPU
engine uses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from etr.kernels import interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on platforms without wheels
    triton = None


def extended_logits_reference(h: torch.Tensor, w_vocab: torch.Tensor, w_expert: torch.Tensor) -> torch.Tensor:
    """``[B, V+E]`` float32 logits (vocabulary first, then expert rows)."""
    return torch.cat([F.linear(h, w_vocab), F.linear(h.to(w_expert.dtype), w_expert)], dim=-1).float()


def extended_argmax_reference(h: torch.Tensor, w_vocab: torch.Tensor, w_expert: torch.Tensor) -> torch.Tensor:
    """Plain torch: argmax of ``[W_V; W_E] h`` per row (lowest index on ties)."""
    return extended_logits_reference(h, w_vocab, w_expert).argmax(dim=-1)


if triton is not None:
    @triton.jit
    def _extended_head_kernel(h_ptr, wv_ptr, we_ptr, out_ptr, pmax_ptr, pidx_ptr,
                              B, V, E, D, stride_h, stride_wv, stride_we, stride_out,
                              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              WRITE_LOGITS: tl.constexpr, UPCAST: tl.constexpr):
        pid_b = tl.program_id(0)  # fastest: the programs that share a weight tile run together (L2 reuse)
        pid_n = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        bs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        in_v = rows < V
        in_e = (rows >= V) & (rows < V + E)
        b_ok = bs < B
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        # Two masked loads per tile, one per matrix: a row reads from exactly one of them (the other load is
        # masked off, moves no bytes and reads 0, so the sum is exact in any dtype). Selecting each row's
        # pointer instead (one load) compiles to scalar 2-byte loads on sm_90: the compiler loses the
        # pointers' alignment through the select.
        wv_rows = wv_ptr + tl.where(in_v, rows, 0).to(tl.int64) * stride_wv
        we_rows = we_ptr + tl.where(in_e, rows - V, 0).to(tl.int64) * stride_we
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            h = tl.load(h_ptr + bs[:, None] * stride_h + ds[None, :], mask=b_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(wv_rows[:, None] + ds[None, :], mask=in_v[:, None] & d_ok[None, :], other=0.0) + \
                tl.load(we_rows[:, None] + ds[None, :], mask=in_e[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:  # float32 models get float32 products (tl.dot would round them to tf32 on the GPU)
                acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(h, tl.trans(w))
        if WRITE_LOGITS:
            ok = b_ok[:, None] & (in_v | in_e)[None, :]
            tl.store(out_ptr + bs[:, None] * stride_out + rows[None, :], acc, mask=ok)
        else:
            acc = tl.where((in_v | in_e)[None, :], acc, float("-inf"))
            best = tl.max(acc, axis=1)
            idx = tl.argmax(acc, axis=1) + pid_n * BLOCK_N
            tl.store(pmax_ptr + pid_n * B + bs, best, mask=b_ok)
            tl.store(pidx_ptr + pid_n * B + bs, idx, mask=b_ok)


if triton is not None:
    # On the GPU the depth of each weight-tile load and the pipelining are tuned once per shape (the head
    # streams 1.2 GB per call at a 7B shape, so these decide the bandwidth reached); the interpreter runs
    # the plain kernel with BLOCK_D=64. Compiled for sm_90 in bf16 (tests/sm90_compile.py reads the cubins)
    # none of these spills and every weight load is a vectorized asynchronous copy.
    _tuned_head_kernel = triton.autotune(
        configs=[triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=s)
                 for bd, w, s in [(64, 4, 3), (64, 8, 4), (128, 4, 3), (128, 8, 3), (128, 8, 4)]],
        key=["V", "E", "D", "BLOCK_B", "WRITE_LOGITS"])(_extended_head_kernel)


def _launch(h, w_vocab, w_expert, write_logits: bool, block_n: int = 64, block_d: int = 64):
    if triton is None:
        raise RuntimeError("triton is not installed")
    B, D = h.shape
    V, E = w_vocab.shape[0], w_expert.shape[0]
    # One pointer type for both matrices (the kernel picks each row's); h in the weights' dtype for tl.dot.
    h, w_vocab = h.to(w_vocab.dtype).contiguous(), w_vocab.contiguous()
    w_expert = w_expert.to(w_vocab.dtype).contiguous()
    # One row block up to 64 rows, so the weights stream from memory once for every decode batch up to 64
    # (16 is tl.dot's smallest M).
    n_tiles, block_b = triton.cdiv(V + E, block_n), min(64, max(16, triton.next_power_of_2(B)))
    grid = (triton.cdiv(B, block_b), n_tiles)
    out = torch.empty((B, V + E), device=h.device, dtype=torch.float32) if write_logits else h.new_empty(1)
    pmax = torch.empty((n_tiles, B), device=h.device, dtype=torch.float32)
    pidx = torch.empty((n_tiles, B), device=h.device, dtype=torch.int32)
    args = (h, w_vocab, w_expert, out, pmax, pidx, B, V, E, D,
            h.stride(0), w_vocab.stride(0), w_expert.stride(0), out.stride(0) if write_logits else 0)
    flags = dict(BLOCK_B=block_b, BLOCK_N=block_n, WRITE_LOGITS=write_logits,
                 UPCAST=interpreted() or h.dtype == torch.float32)
    if h.is_cuda and not interpreted():
        _tuned_head_kernel[grid](*args, **flags)
    else:
        _extended_head_kernel[grid](*args, BLOCK_D=block_d, **flags)
    return out, pmax, pidx


def warm_up(w_vocab: torch.Tensor, w_expert: torch.Tensor, max_rows: int) -> None:
    """Run both modes once for every row block a batch of up to ``max_rows`` uses, so that on the GPU the
    autotuner has picked its configurations before the first request rather than during it."""
    for rows in [n for n in (1, 17, 33) if n <= max(max_rows, 1)]:  # row blocks of 16, 32 and 64
        h = torch.zeros(rows, w_vocab.shape[1], device=w_vocab.device, dtype=w_vocab.dtype)
        extended_argmax(h, w_vocab, w_expert)
        extended_logits(h, w_vocab, w_expert)


def extended_logits(h: torch.Tensor, w_vocab: torch.Tensor, w_expert: torch.Tensor) -> torch.Tensor:
    """Triton: ``[B, V+E]`` float32 logits of ``h`` against the vocabulary and expert rows."""
    return _launch(h, w_vocab, w_expert, write_logits=True)[0]


def extended_argmax(h: torch.Tensor, w_vocab: torch.Tensor, w_expert: torch.Tensor) -> torch.Tensor:
    """Triton: greedy token over vocabulary + expert rows, ``[B]`` int64, without writing the logits."""
    _, pmax, pidx = _launch(h, w_vocab, w_expert, write_logits=False)
    best_tile = pmax.argmax(dim=0)  # first maximal tile: lowest index wins ties, as torch.argmax
    return pidx.gather(0, best_tile[None]).squeeze(0).long()
