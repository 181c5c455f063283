"""Paged prefill kernel (interpreted on the CPU) against its torch reference: prefix hits, GQA, awkward sizes."""

import pytest
import torch

pytest.importorskip("triton")

from etr.kernels.paged_prefill import paged_prefill, paged_prefill_reference  # noqa: E402

# float32: summation order only. bf16: inputs exact, output rounded once to bf16.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def case(query_lens, context_lens, heads, kv_heads, head_dim, page, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // page) for c in context_lens) + 2
    k_pages = torch.randn(num_blocks, page, kv_heads, head_dim, generator=g).to(dtype)
    v_pages = torch.randn(num_blocks, page, kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-c // page) for c in context_lens)
    tables = []
    for c in context_lens:
        n = -(-c // page)
        tables.append([perm.pop() for _ in range(n)] + [0] * (width - n))
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    return q, k_pages, v_pages, torch.tensor(tables, dtype=torch.int32), cu, torch.tensor(context_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_lens,context_lens,heads,kv_heads,head_dim,page", [
    ([1], [1], 2, 2, 16, 16),                       # one token
    ([7, 33, 1], [7, 50, 40], 6, 2, 24, 5),         # prefix hits (17 and 39 cached), GQA 3, odd page and head_dim
    ([40, 3], [40, 67], 9, 3, 64, 16),              # SmolLM2's heads, a query tile boundary
])
def test_paged_prefill_matches_reference(query_lens, context_lens, heads, kv_heads, head_dim, page, dtype):
    q, k_pages, v_pages, tables, cu, ctx = case(query_lens, context_lens, heads, kv_heads, head_dim, page, dtype)
    scale = head_dim ** -0.5
    got = paged_prefill(q, k_pages, v_pages, tables, cu, ctx, max(query_lens), scale, block_m=16, block_n=16)
    want = paged_prefill_reference(q.float(), k_pages.float(), v_pages.float(), tables, query_lens, context_lens,
                                   scale)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])
