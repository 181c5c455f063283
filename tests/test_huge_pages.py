"""kernels/huge_pages.py: packed weights copied into one huge-page mapping keep their bits, shapes and order,
and the kernel backs them with huge pages; off by the environment, they stay where they were."""

import gc

import pytest
import torch

from etr.kernels import huge_pages

needs_thp = pytest.mark.skipif(not huge_pages.supported(),
                               reason="no transparent huge pages on this host (or ETR_CPU_HUGE_PAGES=0)")


def awkward_tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 1000, 7, generator=g).bfloat16(),  # not a multiple of the 4 KB alignment
            torch.randn(1, generator=g),
            torch.randint(0, 9, (2 << 20,), generator=g, dtype=torch.int16),  # 4 MB: past a huge page
            torch.randn(33, 17, generator=g).bfloat16()]


@needs_thp
def test_copies_keep_bits_shapes_and_order_in_one_mapping():
    tensors = awkward_tensors()
    copies = huge_pages.together(tensors)
    assert len(copies) == len(tensors)
    for t, c in zip(tensors, copies):
        assert c.shape == t.shape and c.dtype == t.dtype and c.is_contiguous()
        assert torch.equal(c, t) and c.data_ptr() != t.data_ptr()
    ptrs = [c.data_ptr() for c in copies]
    assert ptrs[0] % huge_pages.HUGE_PAGE == 0 and all(p % huge_pages.ALIGN == 0 for p in ptrs)
    assert ptrs == sorted(ptrs)  # the order given: a step's stream in one run
    for a, b in zip(copies, copies[1:]):  # no overlap, no more than a 4 KB page between two
        end = a.data_ptr() + a.numel() * a.element_size()
        assert end <= b.data_ptr() < end + huge_pages.ALIGN
    assert len({c.untyped_storage().data_ptr() for c in copies}) == 1


@needs_thp
def test_the_kernel_backs_the_mapping_with_huge_pages():
    copy = huge_pages.together([torch.ones(3 << 20, dtype=torch.bfloat16)])[0]  # 6 MB
    assert huge_pages.huge_bytes(copy) >= huge_pages.HUGE_PAGE, "the advised mapping got no huge page"
    assert huge_pages.huge_bytes(torch.ones(10)) == 0  # torch's own small allocation


@needs_thp
def test_the_mapping_lives_as_long_as_any_copy():
    copies = huge_pages.together(awkward_tensors())
    last, want = copies[-1], copies[-1].clone()
    del copies
    gc.collect()
    torch.ones(1 << 22).sum()  # other allocations meanwhile
    assert torch.equal(last, want) and huge_pages.huge_bytes(last) > 0


def test_off_by_the_environment_leaves_the_tensors(monkeypatch):
    monkeypatch.setenv("ETR_CPU_HUGE_PAGES", "0")
    tensors = awkward_tensors()
    assert not huge_pages.supported()
    assert huge_pages.together(tensors) is tensors
    assert huge_pages.together([]) == []


@needs_thp
def test_a_non_contiguous_tensor_is_refused_by_name():
    with pytest.raises(ValueError, match=r"contiguous CPU tensors, got one of shape \(4, 3\)"):
        huge_pages.together([torch.ones(3, 4).t()])


@needs_thp
def test_a_packed_model_reads_its_weights_from_huge_pages(tiny_dir):
    """use_packed_bf16 moves every packed linear (the head last) into one mapping, in the step's read order,
    and the logits keep their bits."""
    from etr.kernels import cpu_bf16_linear, cpu_gemm
    from etr.models import load_model
    if not cpu_gemm.packed_bf16_available() or not cpu_bf16_linear.available():
        pytest.skip("the package's bf16 GEMM is not the one used here")
    model = load_model(tiny_dir("llama_tied_gqa"), torch.bfloat16, "cpu")
    hidden = torch.randn(3, model.config.hidden_size).bfloat16()
    want = cpu_bf16_linear.linear(hidden, cpu_bf16_linear.pack(model.lm_head_weight), None,
                                  model.config.vocab_size)
    cpu_gemm.use_packed_bf16(model)
    packed = [m.packed for m in model.modules() if isinstance(m, cpu_gemm.PackedBf16Linear)]
    layer0 = model.layers[0]
    assert packed[:4] == [layer0.self_attn.qkv_proj.packed, layer0.self_attn.o_proj.packed,
                          layer0.mlp.gate_up_proj.packed, layer0.mlp.down_proj.packed]
    assert packed[-1] is model.head_proj.packed
    ptrs = [p.data_ptr() for p in packed]
    assert ptrs == sorted(ptrs) and len({p.untyped_storage().data_ptr() for p in packed}) == 1
    assert huge_pages.huge_bytes(packed[0]) > 0
    assert torch.equal(model.compute_logits(hidden), want)


@needs_thp
def test_empty_is_zeros_on_huge_pages_once_touched():
    t = huge_pages.empty((5, 3 << 18), torch.bfloat16)  # 7.5 MB
    assert t.shape == (5, 3 << 18) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % huge_pages.HUGE_PAGE == 0 and not t.any()
    t.fill_(1)
    assert huge_pages.huge_bytes(t) >= 3 * huge_pages.HUGE_PAGE


def test_empty_off_by_the_environment_is_torchs(monkeypatch):
    monkeypatch.setenv("ETR_CPU_HUGE_PAGES", "0")
    t = huge_pages.empty((4, 3), torch.float32)
    assert t.shape == (4, 3) and t.untyped_storage().nbytes() == 48


@needs_thp
def test_a_cpu_kv_pool_lies_on_huge_pages(tiny_dir):
    from etr import LLM, SamplingParams
    llm = LLM(str(tiny_dir("llama_tied_gqa")), dtype="bfloat16", num_kv_blocks=64)
    pool = llm.engine.runner.kv_pool
    assert pool.data_ptr() % huge_pages.HUGE_PAGE == 0
    llm.generate([list(range(5, 40))], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert huge_pages.huge_bytes(pool) > 0
