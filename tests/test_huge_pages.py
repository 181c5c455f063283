"""kernels/huge_pages.py: packed weights moved into one huge-page mapping keep their bits, shapes and order,
and the kernel backs them with huge pages; off by the environment, or where no mapping can be made, they stay
where they were. A KV pool goes there only when asked."""

import gc
import mmap
import warnings
from types import SimpleNamespace

import pytest
import torch

from etr.kernels import huge_pages

needs_thp = pytest.mark.skipif(not huge_pages.supported(),
                               reason="no transparent huge pages on this host (or ETR_CPU_HUGE_PAGES=0)")


def thp_fallbacks() -> int:
    """Faults that asked for a huge page and got 4 KB pages (the kernel's count; 0 where unknown)."""
    try:
        with open("/proc/vmstat") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("thp_fault_fallback "))
    except OSError:
        return 0


@pytest.fixture
def assert_huge():
    """Asserts a tensor lies on huge pages; skips instead where the kernel fell back to 4 KB pages meanwhile
    (fragmented memory, a memory-limited container): the host's state, not the code's."""
    before = thp_fallbacks()

    def check(t: torch.Tensor, at_least: int = 1) -> None:
        if huge_pages.huge_bytes(t) < at_least and thp_fallbacks() > before:
            pytest.skip("the kernel fell back to 4 KB pages for this mapping (thp_fault_fallback rose)")
        assert huge_pages.huge_bytes(t) >= at_least, "the advised mapping got no huge page"
    return check


def awkward_owners():
    g = torch.Generator().manual_seed(0)
    return [SimpleNamespace(w=t) for t in (
        torch.randn(3, 1000, 7, generator=g).bfloat16(),  # not a multiple of the 4 KB alignment
        torch.randn(1, generator=g),
        torch.empty(0, 5),
        torch.randint(0, 9, (2 << 20,), generator=g, dtype=torch.int16),  # 4 MB: past a huge page
        torch.randn(33, 17, generator=g).bfloat16())]


@needs_thp
def test_moved_tensors_keep_bits_shapes_and_order_in_one_mapping():
    owners = awkward_owners()
    want = [o.w.clone() for o in owners]
    assert huge_pages.move(owners, "w")
    for o, t in zip(owners, want):
        assert o.w.shape == t.shape and o.w.dtype == t.dtype and o.w.is_contiguous() and torch.equal(o.w, t)
    held = [o.w for o in owners if o.w.numel()]  # an empty tensor's address reads 0
    ptrs = [t.data_ptr() for t in held]
    assert ptrs[0] % huge_pages.huge_page_size() == 0 and all(p % huge_pages.ALIGN == 0 for p in ptrs)
    assert ptrs == sorted(ptrs)  # the order given: a step's stream in one run
    for a, b in zip(held, held[1:]):  # no overlap, less than a 4 KB page between two
        end = a.data_ptr() + a.numel() * a.element_size()
        assert end <= b.data_ptr() < end + huge_pages.ALIGN
    assert len({t.untyped_storage().data_ptr() for t in held}) == 1


@needs_thp
def test_the_kernel_backs_the_mapping_with_huge_pages(assert_huge):
    owner = SimpleNamespace(w=torch.ones(3 << 20, dtype=torch.bfloat16))  # 6 MB
    assert huge_pages.move([owner], "w")
    assert_huge(owner.w, huge_pages.huge_page_size())


@needs_thp
def test_the_mapping_lives_as_long_as_any_moved_tensor(assert_huge):
    owners = awkward_owners()
    huge_pages.move(owners, "w")
    last = owners[-1].w
    want = last.clone()
    del owners
    gc.collect()
    torch.ones(1 << 22).sum()  # other allocations meanwhile
    assert torch.equal(last, want)
    assert_huge(last)


def test_off_by_the_environment_leaves_the_tensors(monkeypatch):
    monkeypatch.setenv("ETR_CPU_HUGE_PAGES", "0")
    owners = awkward_owners()
    before = [o.w for o in owners]
    assert not huge_pages.supported()
    assert not huge_pages.move(owners, "w") and all(o.w is t for o, t in zip(owners, before))
    assert not huge_pages.move([], "w")
    t = huge_pages.empty((4, 3), torch.float32)
    assert t.shape == (4, 3) and t.untyped_storage().nbytes() == 48


@needs_thp
def test_no_mapping_leaves_the_tensors_and_says_why(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(huge_pages.mmap, "mmap", refuse)
    owners = awkward_owners()
    before = [o.w for o in owners]
    with pytest.warns(UserWarning, match="no huge-page mapping of .* bytes .*Cannot allocate memory"):
        assert not huge_pages.move(owners, "w")
    assert all(o.w is t for o, t in zip(owners, before))
    with pytest.warns(UserWarning, match="torch's pages instead"):
        assert huge_pages.empty((2, 3), torch.bfloat16).shape == (2, 3)


@needs_thp
def test_refused_advice_still_moves_the_tensors(monkeypatch):
    class NoAdvice(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")
    monkeypatch.setattr(huge_pages.mmap, "mmap", NoAdvice)
    owners = awkward_owners()
    want = [o.w.clone() for o in owners]
    with pytest.warns(UserWarning, match=r"madvise\(MADV_HUGEPAGE\) refused"):
        assert huge_pages.move(owners, "w")
    assert all(torch.equal(o.w, t) for o, t in zip(owners, want))


@needs_thp
def test_a_non_contiguous_tensor_is_refused_by_name():
    with pytest.raises(ValueError, match=r"contiguous CPU tensors, got w of shape \(4, 3\)"):
        huge_pages.move([SimpleNamespace(w=torch.ones(3, 4).t())], "w")


@needs_thp
def test_a_packed_model_reads_its_weights_from_huge_pages(tiny_dir, assert_huge):
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
    assert_huge(packed[0])
    assert torch.equal(model.compute_logits(hidden), want)


@needs_thp
def test_empty_is_zeros_on_huge_pages_once_touched(assert_huge):
    t = huge_pages.empty((5, 3 << 18), torch.bfloat16)  # 7.5 MB
    assert t.shape == (5, 3 << 18) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % huge_pages.huge_page_size() == 0 and not t.any()
    t.fill_(1)
    assert_huge(t, 3 * huge_pages.huge_page_size())


def test_a_cpu_kv_pool_goes_on_huge_pages_only_when_asked(tiny_dir, monkeypatch):
    from etr import LLM, SamplingParams
    from etr.engine import kv_cache
    calls = []
    real = huge_pages.empty
    monkeypatch.setattr(huge_pages, "empty", lambda *a: calls.append(a) or real(*a))
    path = str(tiny_dir("llama_tied_gqa"))
    LLM(path, dtype="bfloat16", num_kv_blocks=64)
    assert not calls and not kv_cache.wants_huge_pages(torch.device("cpu"))
    monkeypatch.setenv("ETR_CPU_HUGE_KV", "1")
    llm = LLM(path, dtype="bfloat16", num_kv_blocks=64)
    assert len(calls) == 1 and calls[0][0] == tuple(llm.engine.runner.kv_pool.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pool works wherever it lies
        out = llm.generate([list(range(5, 40))], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert len(out[0].token_ids) == 4
    if huge_pages.supported():
        assert llm.engine.runner.kv_pool.data_ptr() % huge_pages.huge_page_size() == 0
