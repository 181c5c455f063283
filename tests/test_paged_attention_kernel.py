"""Paged decode attention kernel (interpreted on the CPU) against the torch backend's gather + SDPA."""

import pytest
import torch

pytest.importorskip("triton")

from etr.engine.attention import AttentionMetadata, TorchAttentionBackend  # noqa: E402
from etr.kernels.paged_attention import combine_splits, combine_splits_triton, paged_decode  # noqa: E402

# float32: summation order only. bf16 inputs are upcast exactly; the output is rounded once to bf16.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def case(context_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 3
    k_pages = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_pages = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # pages scattered through the pool
    tables, width = [], max(-(-c // block_size) for c in context_lens)
    for c in context_lens:
        n = -(-c // block_size)
        tables.append([perm.pop() for _ in range(n)] + [0] * (width - n))
    q = torch.randn(len(context_lens), heads, head_dim, generator=g).to(dtype)
    return q, k_pages, v_pages, torch.tensor(tables, dtype=torch.int32), torch.tensor(context_lens, dtype=torch.int32)


def reference(q, k_pages, v_pages, tables, ctx, block_size, scale):
    meta = AttentionMetadata(is_prefill=False, query_lens=[1] * len(ctx), context_lens_list=ctx.tolist(),
                             cu_seqlens_q=torch.arange(len(ctx) + 1), context_lens=ctx, block_tables=tables,
                             block_size=block_size, dtype=q.dtype)
    meta.slot_mapping = torch.zeros(len(ctx), dtype=torch.long)  # prepare() inspects it for padding
    backend = TorchAttentionBackend()
    backend.prepare(meta)
    return backend._decode(q, (k_pages, v_pages), meta, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context_lens,heads,kv_heads,head_dim,block_size,pages_per_split", [
    ([1], 4, 4, 8, 16, 32),                 # one token, MHA
    ([1, 13, 37], 6, 2, 24, 5, 2),          # GQA groups of 3, awkward head_dim and page size, split-K
    ([70, 3], 9, 3, 64, 16, 1),             # SmolLM2's head layout, one page per split
    ([150, 9], 8, 2, 40, 16, 32),           # 150 tokens in one split: three 64-token steps, the last partial
    ([130, 64], 4, 1, 16, 5, 100),          # pages of 5 inside 64-token steps, groups of 4
])
def test_paged_decode_matches_torch(context_lens, heads, kv_heads, head_dim, block_size, pages_per_split, dtype):
    q, k_pages, v_pages, tables, ctx = case(context_lens, heads, kv_heads, head_dim, block_size, dtype)
    scale = head_dim ** -0.5
    got = paged_decode(q, k_pages, v_pages, tables, ctx, scale, max(context_lens), pages_per_split)
    want = reference(q, k_pages, v_pages, tables, ctx, block_size, scale)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_splits_match_adaptive_splits(dtype):
    """A grid fixed for CUDA graphs (more splits than the context needs) gives the same attention."""
    q, k_pages, v_pages, tables, ctx = case([1, 9, 30], 6, 2, 24, 5, dtype, seed=3)
    scale = 24 ** -0.5
    adaptive = paged_decode(q, k_pages, v_pages, tables, ctx, scale, 30, pages_per_split=2)
    fixed = paged_decode(q, k_pages, v_pages, tables, ctx, scale, 30, pages_per_split=2, num_splits=7)
    torch.testing.assert_close(fixed.float(), adaptive.float(), **TOL[dtype])
    with pytest.raises(ValueError, match="num_splits=2 cannot cover max_context=30"):
        paged_decode(q, k_pages, v_pages, tables, ctx, scale, 30, pages_per_split=2, num_splits=2)


def test_combine_kernel_matches_reference():
    """Awkward split count and head_dim; one row whose splits are all empty (-inf) gives zeros."""
    g = torch.Generator().manual_seed(4)
    part = torch.randn(3, 5, 7, 24, generator=g)
    lse = torch.randn(3, 5, 7, generator=g) * 3
    lse[0, :, 4:] = float("-inf")
    lse[2, 1] = float("-inf")
    got = combine_splits_triton(part, lse, torch.float32)
    want = combine_splits(part, lse)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2, 1], torch.zeros(24))


def test_split_plan():
    from etr.kernels.paged_attention import split_plan
    assert split_plan(1, 4, 256, 16, on_gpu=False) == (256, 1)  # the interpreter: one split
    assert split_plan(1, 4, 256, 16) == (8, 32)       # batch 1, 7B shape, 4096 tokens: 128-token splits
    assert split_plan(1, 4, 2048, 16) == (16, 128)    # 32k tokens: 512 programs
    assert split_plan(64, 8, 2048, 16) == (2048, 1)   # a big batch fills the GPU by itself
    assert split_plan(8, 8, 32, 16) == (8, 4)         # 512 tokens: never below 128 tokens a split
    assert split_plan(1, 1, 3, 16) == (3, 1)


def test_torch_backend_skips_padding_rows():
    """A padded batch (``has_padding``: slot -1, context 0) writes nothing for its padding rows, and the real
    row attends to its own token."""
    backend = TorchAttentionBackend()
    k_pages, v_pages = torch.zeros(4, 4, 1, 8), torch.zeros(4, 4, 1, 8)
    q, k, v = torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    meta = AttentionMetadata(is_prefill=False, query_lens=[1, 1], context_lens_list=[1, 0],
                             cu_seqlens_q=torch.arange(3), slot_mapping=torch.tensor([4, -1]),
                             context_lens=torch.tensor([1, 0], dtype=torch.int32),
                             block_tables=torch.tensor([[1], [0]], dtype=torch.int32), block_size=4,
                             has_padding=True)
    backend.prepare(meta)
    out = backend.forward(q, k, v, (k_pages, v_pages), meta, 0.3)
    assert torch.equal(k_pages[1, 0], k[0]) and k_pages.count_nonzero() == k[0].count_nonzero()
    torch.testing.assert_close(out[0], v[0].expand(2, 8))
