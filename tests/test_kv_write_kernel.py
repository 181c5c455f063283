"""The Triton KV-cache write (interpreted on the CPU) against the torch reference, padding slots included."""

import pytest
import torch

pytest.importorskip("triton")

from etr.kernels.kv_write import write_kv, write_kv_reference  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # a copy: exact in every dtype
@pytest.mark.parametrize("tokens,kv_heads,head_dim,block_size", [(1, 1, 8, 16), (7, 3, 12, 5), (13, 2, 96, 16)])
def test_write_matches_reference(tokens, kv_heads, head_dim, block_size, dtype):
    g = torch.Generator().manual_seed(tokens)
    num_blocks = 6
    shape = (num_blocks, block_size, kv_heads, head_dim)
    pages = [torch.randn(shape, generator=g).to(dtype) for _ in range(2)]
    want = [p.clone() for p in pages]
    k = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[::3] = -1  # padding tokens are skipped
    write_kv(tuple(pages), k, v, slots)
    keep = slots >= 0
    write_kv_reference(tuple(want), k, v, slots, keep if not keep.all() else None)
    assert torch.equal(pages[0], want[0]) and torch.equal(pages[1], want[1])
