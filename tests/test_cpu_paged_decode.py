"""The CPU decode-attention op that reads KV pages in place (kernels/cpu_paged_decode.cpp) against its
plain-torch reference on awkward sizes, and the torch backend's decode with it against the gather path.

Tolerances: float32 within 1e-5 (absolute and relative); bfloat16 outputs within 1e-2 absolute and relative
(the op and the reference both accumulate in float32 and round the output to bf16, whose step is 2^-8
relative; the op's bf16 path also rounds the softmax weights to bf16 before the values pass, as torch's CPU
flash attention does, an error of at most 2^-9 relative per weight: they may differ by a rounding step)."""

import os

import pytest
import torch
from conftest import require_cpp_op

from etr.engine.attention import AttentionMetadata, TorchAttentionBackend, get_backend
from etr.kernels import cpu_paged_decode as K

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture(scope="module")
def op():
    require_cpp_op(K, "CPU decode-attention op")


def pages(num_blocks, block_size, kv_heads, dim, dtype, g):
    return tuple(torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype) for _ in range(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,block_size", [(9, 3, 64, 16), (4, 4, 48, 5), (8, 1, 80, 7),
                                                           (2, 2, 32, 1), (8, 1, 128, 16), (14, 2, 96, 3)])
def test_op_matches_reference(op, dtype, heads, kv_heads, dim, block_size):
    g = torch.Generator().manual_seed(heads * 100 + dim)
    lens = torch.tensor([1, 17, 33, 100, 5, 2 * block_size], dtype=torch.int32)
    blocks_per_seq = -(-int(lens.max()) // block_size) + 1
    num_blocks = len(lens) * blocks_per_seq + 3
    k_pages, v_pages = pages(num_blocks, block_size, kv_heads, dim, dtype, g)
    # Scattered, shuffled blocks, with garbage (NaN) in every slot past each sequence's end.
    tables = torch.randperm(num_blocks, generator=g)[:len(lens) * blocks_per_seq].view(len(lens), -1).to(torch.int32)
    for b, n in enumerate(lens.tolist()):
        for pos in range(n, blocks_per_seq * block_size):
            k_pages[tables[b, pos // block_size], pos % block_size] = float("nan")
            v_pages[tables[b, pos // block_size], pos % block_size] = float("nan")
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    got = K.paged_decode(q, k_pages, v_pages, tables, lens, dim ** -0.5)
    want = K.reference(q, k_pages, v_pages, tables, lens, dim ** -0.5)
    assert got.dtype == dtype and got.shape == q.shape and not got.isnan().any()
    torch.testing.assert_close(got, want, **TOL[dtype])
    # A non-contiguous q (a view out of a fused projection) gives the same.
    wide = torch.cat([q, q], dim=2)[:, :, :dim]
    torch.testing.assert_close(K.paged_decode(wide, k_pages, v_pages, tables, lens, dim ** -0.5), got, atol=0, rtol=0)


def test_bf16_head_sizes_take_the_dot_instruction_path_where_the_cpu_has_it(op):
    """The sizes of test_op_matches_reference that the bf16 path takes (so that test checks that path, not only
    the generic loop): on a CPU with AVX512-BF16 every multiple of 32 up to 128, else none."""
    from etr.kernels.cpu_gemm import cpu_flags
    native = "avx512_bf16" in cpu_flags()
    assert [d for d in (0, 16, 32, 48, 64, 80, 96, 128, 160) if K.bf16_path(d)] == ([32, 64, 96, 128] if native else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_op_splits_long_sequences(op, dtype, threads):
    """Few long sequences are cut into runs of pages whose partial softmaxes are combined (split-K): the
    result is the reference's whatever the cut (it depends on the thread count)."""
    g = torch.Generator().manual_seed(threads)
    block_size, heads, kv_heads, dim = 7, 6, 2, 40
    lens = torch.tensor([1500, 3, 701], dtype=torch.int32)
    per_seq = -(-1500 // block_size)
    k_pages, v_pages = pages(len(lens) * per_seq + 1, block_size, kv_heads, dim, dtype, g)
    tables = (torch.randperm(len(lens) * per_seq, generator=g).view(len(lens), -1) + 1).to(torch.int32)
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype) * 3  # peaked softmaxes: parts' maxima differ
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = K.paged_decode(q, k_pages, v_pages, tables, lens, dim ** -0.5)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, K.reference(q, k_pages, v_pages, tables, lens, dim ** -0.5), **TOL[dtype])


def test_op_refuses_bad_shapes(op):
    k, v = pages(4, 16, 3, 64, torch.float32, torch.Generator().manual_seed(0))
    tables, lens = torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="head grouping"):
        K.paged_decode(torch.randn(1, 4, 64), k, v, tables, lens, 1.0)
    with pytest.raises(RuntimeError, match="int32"):
        K.paged_decode(torch.randn(1, 9, 64), k, v, tables.long(), lens, 1.0)
    with pytest.raises(RuntimeError, match="one row per query"):
        K.paged_decode(torch.randn(2, 9, 64), k, v, tables, lens, 1.0)
    with pytest.raises(RuntimeError, match=r"context_lens\[0\] = 0"):
        K.paged_decode(torch.randn(1, 9, 64), k, v, tables, torch.zeros(1, dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="needs 3 pages; block_tables has 2 columns"):
        K.paged_decode(torch.randn(1, 9, 64), k, v, tables, torch.tensor([33], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match=r"block_tables\[0, 1\] = 4 is not a page of the 4"):
        K.paged_decode(torch.randn(1, 9, 64), k, v, torch.tensor([[0, 4]], dtype=torch.int32),
                       torch.tensor([20], dtype=torch.int32), 1.0)


def test_backend_keeps_the_gather_path_where_the_op_does_not_apply(op):
    """Padded batches (CUDA-graph rows with slot -1) and float16 keep the gather path."""
    backend = get_backend("torch", "cpu")
    for dtype, padded in [(torch.float16, False), (torch.float32, True)]:
        meta = AttentionMetadata(is_prefill=False, query_lens=[1], context_lens_list=[3],
                                 cu_seqlens_q=torch.arange(2, dtype=torch.int32), slot_mapping=torch.tensor([2]),
                                 context_lens=torch.tensor([3], dtype=torch.int32),
                                 block_tables=torch.zeros(1, 1, dtype=torch.int32), block_size=16, dtype=dtype,
                                 has_padding=padded)
        backend.prepare(meta)
        assert "in_place" not in meta.extra and "slots" in meta.extra


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_decode_in_place_equals_gather(op, dtype):
    """The engine's torch backend on the CPU decodes in place; the gather path (no device) agrees."""
    g = torch.Generator().manual_seed(3)
    block_size, heads, kv_heads, dim = 16, 9, 3, 64
    k_pages, v_pages = pages(20, block_size, kv_heads, dim, dtype, g)
    lens = [3, 40, 129]
    tables = torch.tensor([[5, 0, 0, 0, 0, 0, 0, 0, 0], [7, 2, 9, 0, 0, 0, 0, 0, 0],
                           [1, 3, 4, 6, 8, 10, 11, 12, 13]], dtype=torch.int32)
    slots = torch.tensor([tables[i, (n - 1) // block_size] * block_size + (n - 1) % block_size
                          for i, n in enumerate(lens)], dtype=torch.long)

    def meta():
        return AttentionMetadata(is_prefill=False, query_lens=[1] * 3, context_lens_list=lens,
                                 cu_seqlens_q=torch.arange(4, dtype=torch.int32), slot_mapping=slots,
                                 context_lens=torch.tensor(lens, dtype=torch.int32), block_tables=tables,
                                 block_size=block_size, dtype=dtype)
    q, k, v = (torch.randn(3, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
    outs = []
    for backend in (get_backend("torch", "cpu"), TorchAttentionBackend()):
        m = meta()
        backend.prepare(m)
        outs.append(backend.forward(q, k, v, (k_pages.clone(), v_pages.clone()), m, dim ** -0.5))
    assert get_backend("torch", "cpu").in_place and not TorchAttentionBackend().in_place
    torch.testing.assert_close(outs[0], outs[1], **TOL[dtype])


def test_backend_keeps_the_gather_path_without_the_op(monkeypatch):
    monkeypatch.setattr(K, "available", lambda: False)
    assert not TorchAttentionBackend("cpu").in_place


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load(op, tmp_path):
    """torch's build lock, as a builder killed mid-build leaves it: the next process loads the op anyway (it
    used to wait for the file to go, forever)."""
    import subprocess
    import sys
    from pathlib import Path

    from torch.utils import cpp_extension
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    build = Path(root) / "etr" / K.OP.name()
    assert (build / f"{K.OP.name()}.so").exists()  # the fixture's load built it there
    (build / "lock").touch()
    code = "from etr.kernels import cpu_paged_decode as K; print(K.available(), K.load_error())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["True", "None"], out.stderr[-2000:]
    assert not (build / "lock").exists()


@pytest.fixture(scope="module")
def packing(op):
    if not K.bf16_path(64):
        pytest.skip("packed K pages are read by the bf16 path, which needs a build for a CPU with AVX512-BF16")


def test_pack_k_round_trip_and_layout():
    """A packed page holds one dimension pair of 16 consecutive positions in 64 bytes."""
    k = torch.randn(3, 32, 2, 64).to(torch.bfloat16)
    packed = K.pack_k(k)
    assert packed.shape == (3, 2, 32, 32, 2) and packed.is_contiguous()
    assert torch.equal(K.unpack_k(packed), k) and K.unpack_k(k) is k
    assert torch.equal(packed[1, 0, 5, :16], k[1, :16, 0, 10:12])


@pytest.mark.parametrize("heads,kv_heads,dim,block_size", [(9, 3, 64, 16), (8, 1, 128, 32), (14, 2, 96, 16),
                                                           (2, 2, 32, 48), (15, 3, 64, 16), (12, 2, 64, 16)])
def test_packed_k_matches_the_reference(packing, heads, kv_heads, dim, block_size):
    """Shuffled pages, NaN past every sequence's end, lengths off the 16 positions of a load, groups of 1 to 8
    heads (the scores pass takes up to 4 at once: every remainder of 1 to 4 occurs), and sequences long enough
    to be cut into parts.
    Against the row layout the only difference is the order of each score's float32 sums: at least 99 % of the
    outputs are the same bf16 values."""
    g = torch.Generator().manual_seed(heads + dim)
    lens = torch.tensor([1, 17, 33, 100, 5, 2 * block_size, 700], dtype=torch.int32)
    per_seq = -(-int(lens.max()) // block_size) + 1
    num_blocks = len(lens) * per_seq + 3
    k_pages, v_pages = pages(num_blocks, block_size, kv_heads, dim, torch.bfloat16, g)
    tables = torch.randperm(num_blocks, generator=g)[:len(lens) * per_seq].view(len(lens), -1).to(torch.int32)
    for b, n in enumerate(lens.tolist()):
        for pos in range(n, per_seq * block_size):
            k_pages[tables[b, pos // block_size], pos % block_size] = float("nan")
            v_pages[tables[b, pos // block_size], pos % block_size] = float("nan")
    q = torch.randn(len(lens), heads, dim, generator=g).to(torch.bfloat16) * 2
    packed = K.pack_k(k_pages)
    got = K.paged_decode(q, packed, v_pages, tables, lens, dim ** -0.5)
    assert not got.isnan().any()
    torch.testing.assert_close(got, K.reference(q, packed, v_pages, tables, lens, dim ** -0.5), **TOL[torch.bfloat16])
    rows = K.paged_decode(q, k_pages, v_pages, tables, lens, dim ** -0.5)
    torch.testing.assert_close(got, rows, **TOL[torch.bfloat16])
    assert (got == rows).float().mean() >= 0.99


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("stream", [True, False])
def test_packed_k_on_contexts_cut_into_many_parts(packing, threads, stream):
    """Over 8,192 positions in all: parts reach their cap (1,024 positions), and the passes prefetch K pages and
    V rows ahead up to each part's end, the values pass its own or the scores pass the V pages (``stream``;
    shuffled pages, the last one partly filled). The threads split the parts of these mixed lengths by work, not
    by count: every part must still be run once."""
    g = torch.Generator().manual_seed(threads)
    heads, kv_heads, dim, block_size = 9, 3, 64, 16
    lens = torch.tensor([3000, 2903, 17, 3100], dtype=torch.int32)
    per_seq = -(-int(lens.max()) // block_size)
    k_pages, v_pages = pages(len(lens) * per_seq + 1, block_size, kv_heads, dim, torch.bfloat16, g)
    tables = (torch.randperm(len(lens) * per_seq, generator=g).view(len(lens), -1) + 1).to(torch.int32)
    q = torch.randn(len(lens), heads, dim, generator=g).to(torch.bfloat16) * 3
    before, was = torch.get_num_threads(), K.set_values_stream(stream)
    torch.set_num_threads(threads)
    try:
        got = K.paged_decode(q, K.pack_k(k_pages), v_pages, tables, lens, dim ** -0.5)
    finally:
        torch.set_num_threads(before)
        K.set_values_stream(was)
    torch.testing.assert_close(got, K.reference(q, k_pages, v_pages, tables, lens, dim ** -0.5), **TOL[torch.bfloat16])


@pytest.mark.parametrize("packed", [True, False])
def test_the_values_stream_changes_no_bit(packing, packed):
    """The values pass streaming its own V rows, or the old fetches, give the same bits (one thread, so that
    parts reach their cap of 1,024 positions; shuffled pages; K packed or in rows); set_values_stream returns the
    previous setting."""
    g = torch.Generator().manual_seed(7)
    lens = torch.tensor([2500, 70, 3100], dtype=torch.int32)
    per_seq = -(-int(lens.max()) // 16)
    k_pages, v_pages = pages(len(lens) * per_seq, 16, 3, 64, torch.bfloat16, g)
    tables = torch.randperm(len(lens) * per_seq, generator=g).view(len(lens), -1).to(torch.int32)
    q = torch.randn(len(lens), 9, 64, generator=g).to(torch.bfloat16) * 3
    k = K.pack_k(k_pages) if packed else k_pages
    before, threads = K.set_values_stream(True), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        on = K.paged_decode(q, k, v_pages, tables, lens, 0.125)
        assert K.set_values_stream(False) is True
        off = K.paged_decode(q, k, v_pages, tables, lens, 0.125)
        assert K.set_values_stream(True) is False
    finally:
        K.set_values_stream(before)
        torch.set_num_threads(threads)
    assert torch.equal(on, off)
    torch.testing.assert_close(on, K.reference(q, k_pages, v_pages, tables, lens, 0.125), **TOL[torch.bfloat16])


def test_packed_k_is_refused_where_the_bf16_path_does_not_read_it(packing):
    g = torch.Generator().manual_seed(0)
    tables, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    k, v = pages(2, 16, 3, 64, torch.float32, g)
    with pytest.raises(RuntimeError, match="packed K pages need bf16.*got Float, head size 64, pages of 16"):
        K.paged_decode(torch.randn(1, 9, 64), K.pack_k(k), v, tables, lens, 1.0)
    k, v = pages(2, 8, 3, 64, torch.bfloat16, g)
    with pytest.raises(RuntimeError, match="pages of a multiple of 16 positions; got BFloat16, head size 64, pages of 8"):
        K.paged_decode(torch.randn(1, 9, 64).bfloat16(), K.pack_k(k), v, tables, lens, 1.0)
    k, v = pages(2, 16, 3, 64, torch.bfloat16, g)
    with pytest.raises(RuntimeError, match=r"packed K pages \[2, 3, 32, 16, 2\] expected"):
        K.paged_decode(torch.randn(1, 9, 64).bfloat16(), K.pack_k(k)[:, :2], v, tables, lens, 1.0)


def test_slots_are_written_and_read_through_either_layout():
    """The torch backend's writes and gathers on packed K pages are the row layout's, through pack_k."""
    from etr.engine.attention.torch_backend import gather_slots, write_slots
    g = torch.Generator().manual_seed(1)
    rows_layout = torch.zeros(6, 16, 3, 64, dtype=torch.bfloat16)
    packed = K.pack_k(rows_layout)
    slots = torch.tensor([0, 17, 95, 40, 41])
    rows = torch.randn(5, 3, 64, generator=g).to(torch.bfloat16)
    write_slots(rows_layout, slots, rows)
    write_slots(packed, slots, rows)
    assert torch.equal(K.unpack_k(packed), rows_layout)
    some = torch.tensor([[95, 0], [41, 17]])
    assert torch.equal(gather_slots(packed, some), gather_slots(rows_layout, some))
    assert torch.equal(gather_slots(packed, some)[0, 0], rows[2])
    write_slots(packed, slots[:0], rows[:0])  # a step whose rows are all padding writes nothing
    assert torch.equal(K.unpack_k(packed), rows_layout)


def test_engine_pools_pack_k_where_the_op_reads_it(packing, tiny_dir):
    """A bf16 model on the CPU gets packed K pages (head size 32, pages of 16); float32 keeps the row layout;
    the packed engine's greedy tokens are the row layout's."""
    from etr import LLM
    from etr.engine.sampling_params import SamplingParams
    path = str(tiny_dir("qwen2_tied_hd32"))
    prompts = [[5, 6, 7], list(range(10, 50)), [9] * 20]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    tokens = {}
    for packs in (True, False):
        llm = LLM(path, dtype="bfloat16")
        runner = llm.engine.runner
        if not packs:
            runner.backend.packs_k = lambda *a: False
            runner.allocate_kv(runner.num_blocks)
        k_pages, v_pages = runner.kv_caches[0]
        assert k_pages.dim() == (5 if packs else 4) and v_pages.dim() == 4
        tokens[packs] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens[True] == tokens[False]
    fp32 = LLM(path, dtype="float32").engine.runner
    assert fp32.kv_caches[0][0].dim() == 4


def test_packing_is_switched_off_by_its_variable(packing, monkeypatch):
    assert K.packs_k(torch.bfloat16, 64, 16) and K.packs_k(torch.bfloat16, 128, 32)
    assert not K.packs_k(torch.float32, 64, 16) and not K.packs_k(torch.bfloat16, 48, 16)
    assert not K.packs_k(torch.bfloat16, 64, 8)
    monkeypatch.setenv("ETR_CPU_PACK_K", "0")
    assert not K.packs_k(torch.bfloat16, 64, 16)
