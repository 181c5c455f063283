"""The torch backend's CPU decode attention (grouped float32 matmuls) against float64 SDPA."""

import pytest
import torch

from etr.engine.attention.torch_backend import grouped_decode_attention


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 8e-3)])  # bf16: output rounding
@pytest.mark.parametrize("batch,heads,kv_heads,length", [(1, 4, 4, 5), (5, 6, 2, 37), (3, 9, 3, 130)])
def test_grouped_decode_attention_matches_sdpa(dtype, atol, batch, heads, kv_heads, length):
    torch.manual_seed(length)
    dim = 24
    q = torch.randn(batch, heads, dim).to(dtype)
    # As the backend gathers them: [B, L, kv_heads, D] rows, viewed [B, kv_heads, L, D] (not contiguous).
    keys, values = (torch.randn(batch, length, kv_heads, dim).to(dtype).transpose(1, 2) for _ in range(2))
    mask = torch.zeros(batch, 1, 1, length)
    mask[0, ..., length // 2 + 1:] = float("-inf")  # a shorter sequence in the batch
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double()[:, :, None], keys.double(), values.double(), attn_mask=mask.double(), scale=0.3,
        enable_gqa=True)[:, :, 0]
    out = grouped_decode_attention(q, keys, values, mask, 0.3)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
