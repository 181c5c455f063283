"""Plain-torch paged attention: gather each sequence's pages, then scaled_dot_product_attention.

Runs anywhere torch runs; the reference the Triton and flash-attn backends are tested against. Built for a
CPU device (``TorchAttentionBackend("cpu")``, as engines build it), its decode reads the pages in place with
the C++ op of ``kernels/cpu_paged_decode.py`` where that op builds; built without a device, it is the gather
reference throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from etr.engine.attention.base import KVCache
from etr.engine.attention.metadata import AttentionMetadata
from etr.kernels import cpu_paged_decode


def page_slots(block_tables: torch.Tensor, lengths: torch.Tensor, max_len: int, block_size: int):
    """Flat slot of every position < max_len of every sequence, and the validity mask.

    Invalid positions point at the sequence's first slot (always written), so a gather never reads
    uninitialised memory that could be NaN.
    """
    pos = torch.arange(max_len, device=block_tables.device)
    slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size
    valid = pos[None, :] < lengths[:, None]
    return torch.where(valid, slots, slots[:, :1]), valid


def gather_slots(pages: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The K or V rows at ``slots`` (any shape) of ``[num_blocks, block_size, kv_heads, head_dim]`` pages (or
    packed K pages), as ``[*slots.shape, kv_heads, head_dim]``. index_select on a 2-D view: several times faster on the CPU than
    indexing the pages with the slot tensor (bench/RESULTS.md). Packed K pages (5-d, ``cpu_paged_decode.pack_k``)
    are read through their layout."""
    if pages.dim() == 5:
        block_size = pages.shape[3]
        rows = pages[slots.reshape(-1) // block_size, :, :, slots.reshape(-1) % block_size]
        return rows.reshape(*slots.shape, pages.shape[1], 2 * pages.shape[2])
    rows = pages.view(-1, pages.shape[2] * pages.shape[3]).index_select(0, slots.reshape(-1))
    return rows.view(*slots.shape, pages.shape[2], pages.shape[3])


def write_slots(pages: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """``rows`` ``[N, kv_heads, head_dim]`` into ``slots`` ``[N]`` of K or V pages, packed K pages included."""
    if pages.dim() == 5:
        block_size = pages.shape[3]
        pages[slots // block_size, :, :, slots % block_size] = rows.reshape(len(slots), *pages.shape[1:3], 2)
    else:
        pages.view(-1, *pages.shape[2:]).index_copy_(0, slots, rows)


def write_kv(kv_cache: KVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             keep: torch.Tensor | None = None) -> None:
    """Scatter new tokens' k/v into their pages; ``keep`` (when given) drops padding tokens (slot -1)."""
    k_pages, v_pages = kv_cache
    if keep is not None:
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    write_slots(k_pages, slot_mapping, k)
    write_slots(v_pages, slot_mapping, v)


class TorchAttentionBackend:
    """Attention by gathering pages and calling SDPA; runs on any device and is the reference."""
    name = "torch"

    def __init__(self, device: torch.device | str | None = None):
        # Asked here, so that a first build of the op happens while the engine starts, not in a request.
        self.in_place = device is not None and torch.device(device).type == "cpu" and cpu_paged_decode.available()

    def packs_k(self, dtype: torch.dtype, head_dim: int, block_size: int) -> bool:
        """Whether this backend's KV pools store K packed (``cpu_paged_decode.packs_k``): on the CPU with the op,
        for the sizes its bf16 path reads. Every read and write of this backend handles both layouts."""
        return self.in_place and cpu_paged_decode.packs_k(dtype, head_dim, block_size)

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.block_tables is None:
            return
        # Known on the host: asking the device whether any slot is -1 would wait for it every step.
        meta.extra["keep"] = meta.slot_mapping >= 0 if meta.has_padding else None
        if not meta.is_prefill and self.in_place and meta.dtype in IN_PLACE_DTYPES and not meta.has_padding:
            meta.extra["in_place"] = True
        elif not meta.is_prefill:
            slots, valid = page_slots(meta.block_tables, meta.context_lens, max(meta.context_lens_list), meta.block_size)
            # An additive float mask, built once per step in the dtype each layer adds it in: the activations'
            # for SDPA, float32 for the CPU's grouped matmuls.
            dtype = torch.float32 if valid.device.type == "cpu" else meta.dtype
            mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
            meta.extra["slots"], meta.extra["mask"] = slots, mask.masked_fill_(~valid, float("-inf"))[:, None, None, :]
        elif meta.has_cached_prefix:
            meta.extra["prefix_slots"] = [
                page_slots(meta.block_tables[i:i + 1], meta.context_lens[i:i + 1], n, meta.block_size)[0][0]
                for i, n in enumerate(meta.context_lens_list)]

    def forward(self, q, k, v, kv_cache: KVCache | None, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if kv_cache is not None:
            write_kv(kv_cache, k, v, meta.slot_mapping, meta.extra.get("keep"))
        if meta.is_prefill:
            return self._prefill(q, k, v, kv_cache, meta, scale)
        return self._decode(q, kv_cache, meta, scale)

    def _prefill(self, q, k, v, kv_cache, meta, scale):
        out = torch.empty_like(q)
        prefix_slots = meta.extra.get("prefix_slots")
        start = 0
        for i, n in enumerate(meta.query_lens):
            qi = q[start:start + n].transpose(0, 1)
            if prefix_slots is not None and meta.context_lens_list[i] > n:
                ki, vi = (gather_slots(pages, prefix_slots[i]) for pages in kv_cache)
                mask = _offset_causal_mask(n, meta.context_lens_list[i], q.device)
                oi = F.scaled_dot_product_attention(qi[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None],
                                                    attn_mask=mask, scale=scale, enable_gqa=True)
            else:
                ki, vi = k[start:start + n].transpose(0, 1), v[start:start + n].transpose(0, 1)
                # With a batch dimension, as transformers calls it: the 3-D call takes another CPU kernel path
                # whose bf16 output differs (by up to 1/128 on SmolLM2's first layer); the 4-D one is HF's, bit
                # for bit.
                oi = F.scaled_dot_product_attention(qi[None], ki[None], vi[None], is_causal=True, scale=scale,
                                                    enable_gqa=True)
            out[start:start + n] = oi[0].transpose(0, 1)
            start += n
        return out

    def _decode(self, q, kv_cache, meta, scale):
        if meta.extra.get("in_place"):
            return cpu_paged_decode.paged_decode(q, *kv_cache, meta.block_tables, meta.context_lens, scale)
        slots, mask = meta.extra["slots"], meta.extra["mask"]
        keys, values = (gather_slots(pages, slots).transpose(1, 2) for pages in kv_cache)  # [B, kv_heads, L, D]
        batch, length = slots.shape
        if q.device.type == "cpu" and (batch > 1 or length > SDPA_MAX_LEN_CPU):
            return grouped_decode_attention(q, keys, values, mask, scale)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=None if batch == 1 else mask,
                                             scale=scale, enable_gqa=True)
        return out.squeeze(2)


IN_PLACE_DTYPES = (torch.float32, torch.bfloat16)

# For one decode query per sequence, SDPA's CPU flash kernel is slower than two float32 matmuls except for
# one sequence of few keys (bench/RESULTS.md, "Measurements behind code choices").
SDPA_MAX_LEN_CPU = 128


def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """One query token per sequence, ``q`` ``[B, H, D]``, against ``[B, kv_heads, L, D]`` keys and values (any
    strides), in float32 batched matmuls with the query heads grouped by KV head (no repeated K/V); ``mask``
    ``[B, 1, 1, L]`` float32. K and V are converted and laid out contiguously in one pass each, so both
    products are flat bmm calls: matmul on the gathered (transposed) views copied them again inside (slower,
    same bits; bench/RESULTS.md)."""
    batch, heads, dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    rows = batch * kv_heads
    k32 = keys.to(torch.float32, memory_format=torch.contiguous_format).reshape(rows, length, dim)
    v32 = values.to(torch.float32, memory_format=torch.contiguous_format).reshape(rows, length, dim)
    scores = torch.bmm(q.reshape(rows, heads // kv_heads, dim).float(), k32.transpose(1, 2))
    probs = scores.view(batch, kv_heads, -1, length).mul_(scale).add_(mask).softmax(-1)
    return torch.bmm(probs.view(rows, -1, length), v32).view(batch, heads, dim).to(q.dtype)


def _offset_causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """Query i (absolute position k_len - q_len + i) sees keys 0..that position."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q_pos
