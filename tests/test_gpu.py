"""GPU checks: Triton kernels compiled (not interpreted) and engine parity on CUDA.

Run by bench/gpu_suite.py with TRITON_INTERPRET=0; skipped on machines without CUDA (CI, the CPU machines).
"""

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="needs CUDA with compiled Triton (TRITON_INTERPRET unset or 0)")]

from conftest import hf_greedy  # noqa: E402

DEV = "cuda"


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 5e-2), (torch.float32, 1e-4)])  # fp32: ieee products
@pytest.mark.parametrize("B,E", [(1, 1), (7, 5), (64, 6)])
def test_lm_head_compiled(B, E, dtype, atol):
    from etr.kernels.lm_head import extended_argmax, extended_logits, extended_logits_reference
    g = torch.Generator().manual_seed(B + E)
    h, wv, we = (torch.randn(*s, generator=g).to(DEV, dtype) for s in ((B, 96), (397, 96), (E, 96)))
    want = extended_logits_reference(h.float(), wv.float(), we.float())
    torch.testing.assert_close(extended_logits(h, wv, we), want, atol=atol, rtol=1e-2)
    got = extended_argmax(h, wv, we)
    assert (want.gather(1, got[:, None]).squeeze(1) >= want.max(1).values - 2 * atol).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_and_paged_decode_compiled(dtype):
    from test_paged_attention_kernel import TOL, case, reference
    from etr.kernels.kv_write import write_kv, write_kv_reference
    from etr.kernels.paged_attention import paged_decode
    q, k_pages, v_pages, tables, ctx = case([1, 13, 300], 12, 4, 64, 16, dtype)
    args = [t.to(DEV) for t in (q, k_pages, v_pages, tables, ctx)]
    got = paged_decode(*args, 0.125, 300, pages_per_split=4)
    torch.testing.assert_close(got.float().cpu(), reference(q, k_pages, v_pages, tables, ctx, 16, 0.125).float(),
                               **TOL[dtype])
    k = torch.randn(5, 4, 64, dtype=dtype)
    slots = torch.tensor([3, -1, 40, 41, 7])
    pages = (k_pages.clone().to(DEV), v_pages.clone().to(DEV))
    write_kv(pages, k.to(DEV), k.to(DEV), slots.to(DEV))
    want = (k_pages.clone(), v_pages.clone())
    write_kv_reference(want, k, k, slots, slots >= 0)
    assert torch.equal(pages[0].cpu(), want[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_engine_float32_greedy_parity_on_cuda(backend, tiny_dir, hf_model_of):
    from etr import LLM, SamplingParams
    path = tiny_dir("qwen2_untied")
    llm = LLM(str(path), dtype="float32", device=DEV, num_kv_blocks=128, attention_backend=backend)
    prompts = [[5, 6, 7], list(range(40, 80))]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    hf = hf_model_of(path)
    # tf32 matmuls can move a near-tie; TF32 is off by default for matmuls in torch, so tokens must match.
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 20) for p in prompts]


def test_paged_decode_is_two_launches_and_graph_capturable():
    """Decode attention = split-K kernel + combine kernel, replayable from a CUDA graph with a fixed grid."""
    from test_paged_attention_kernel import case, reference
    from etr.kernels.paged_attention import paged_decode
    q, k_pages, v_pages, tables, ctx = case([5, 40, 77], 8, 2, 64, 16, torch.bfloat16, seed=9)
    q, k_pages, v_pages, tables = (t.to(DEV) for t in (q, k_pages, v_pages, tables))
    lens = torch.tensor([5, 40, 60], dtype=torch.int32, device=DEV)

    def run():
        return paged_decode(q, k_pages, v_pages, tables, lens, 0.125, 80, pages_per_split=2, num_splits=3)
    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) <= 2, [e.name for e in kernels]
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = run()
    lens.copy_(torch.tensor([5, 40, 77], dtype=torch.int32))  # a longer context, same graph
    graph.replay()
    torch.cuda.synchronize()
    want = reference(q.cpu(), k_pages.cpu(), v_pages.cpu(), tables.cpu(), ctx, 16, 0.125)
    torch.testing.assert_close(out.float().cpu(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_engine_bf16_logprobs_close_to_hf_on_cuda(backend, tiny_dir, hf_model_of):
    """bf16 on CUDA: the engine's greedy tokens are ones HF bf16 also rates near-best (log-prob within 0.1 nats
    of HF's best at every step, scored by HF on the engine's own sequence)."""
    from etr import LLM, SamplingParams
    path = tiny_dir("llama_tied_gqa")
    llm = LLM(str(path), dtype="bfloat16", device=DEV, num_kv_blocks=128, attention_backend=backend)
    prompt = list(range(30, 60))
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    hf = hf_model_of(path, torch.bfloat16).to(DEV)
    ids = torch.tensor([prompt + out.token_ids], device=DEV)
    with torch.no_grad():
        logp = hf(ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
    chosen = logp.gather(1, torch.tensor(out.token_ids, device=DEV)[:, None]).squeeze(1)
    assert (logp.max(-1).values - chosen).max().item() < 0.1
    hf.to("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_prefill_compiled(dtype):
    from test_paged_prefill_kernel import TOL, case
    from etr.kernels.paged_prefill import paged_prefill, paged_prefill_reference
    q, k_pages, v_pages, tables, cu, ctx = case([7, 100, 1], [7, 300, 40], 12, 4, 64, 16, dtype, seed=2)
    got = paged_prefill(*(t.to(DEV) for t in (q, k_pages, v_pages, tables, cu, ctx)), 100, 0.125)
    want = paged_prefill_reference(q.float(), k_pages.float(), v_pages.float(), tables, [7, 100, 1], [7, 300, 40],
                                   0.125)
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])


def test_cuda_graphs_replay_like_eager_for_two_models(tiny_dir):
    """Meta and expert capture their own graphs in one process; replayed decodes equal eager ones."""
    from etr import LLM, SamplingParams
    path = tiny_dir("qwen2_untied")
    prompts = [[5, 6, 7], list(range(40, 80)), [9] * 17]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    graphed = LLM(str(path), dtype="float32", device=DEV, num_kv_blocks=128, attention_backend="triton",
                  max_num_seqs=8)
    other = LLM(str(tiny_dir("llama_tied_gqa")), dtype="float32", device=DEV, num_kv_blocks=128,
                attention_backend="triton", max_num_seqs=8)
    eager = LLM(str(path), dtype="float32", device=DEV, num_kv_blocks=128, attention_backend="triton",
                cuda_graphs=False)
    assert graphed.engine.runner.graphs.buffers[1].graph is not None
    assert other.engine.runner.graphs.pool != graphed.engine.runner.graphs.pool
    other.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in graphed.generate(prompts, params, use_tqdm=False)] == \
        [o.token_ids for o in eager.generate(prompts, params, use_tqdm=False)]


def test_routing_on_cuda_runs_each_model_on_its_own_stream(tmp_path):
    """Meta and expert step on their own streams (the expert on a second GPU when there is one), launched
    together by the switcher; the routed outputs equal the CPU's in float32."""
    from conftest import make_tiny_checkpoint
    from test_routing import LLAMA, PROMPTS, meta_trace, switch_row, write_head
    from etr import LLM, SamplingParams
    meta = make_tiny_checkpoint(tmp_path / "meta", "llama", seed=11, **LLAMA)
    expert = make_tiny_checkpoint(tmp_path / "expert", "qwen2", seed=12, num_layers=3, hidden_size=96,
                                  num_attention_heads=6, num_key_value_heads=3)
    _, hidden, max_logits = meta_trace(meta, PROMPTS[0], 24)
    head = write_head(tmp_path / "h.safetensors", ["e"], [switch_row(hidden, max_logits, 2)])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expert_device = "cuda:1" if torch.cuda.device_count() > 1 else DEV
    outs = {}
    for device in ("cpu", DEV):
        llm = LLM(str(meta), dtype="float32", device=device, num_kv_blocks=64, experts={"e": str(expert)},
                  expert_head=str(head), expert_devices={"e": expert_device if device != "cpu" else "cpu"})
        outs[device] = [(o.expert, o.switch_index, o.token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    streams = [e.runner.stream.stream for e in llm.switcher.engines]
    assert len({(s.device, s.stream_id) for s in streams}) == 2
    assert all(s != torch.cuda.default_stream(s.device) for s in streams)
    assert outs[DEV] == outs["cpu"] and outs[DEV][0][:2] == ("e", 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_compiled(dtype):
    """Compiled, the residual stream of the fused add+RMSNorm is torch's add bit for bit (round to nearest
    even), and every fused kernel is within the CPU test's tolerance of its reference."""
    from test_fused_ops_kernels import TOL
    from etr.kernels.fused_norm import fused_add_rms_norm, fused_add_rms_norm_reference
    from etr.kernels.rotary import rotary_, rotary_reference
    from etr.kernels.silu_mul import silu_mul, silu_mul_reference
    g = torch.Generator().manual_seed(3)
    x, r = ((torch.randn(9, 1000, generator=g) * 3).to(DEV, dtype) for _ in range(2))
    w = torch.rand(1000, generator=g).to(DEV, dtype) + 0.5
    got, got_sum = fused_add_rms_norm(x, r, w, 1e-6)
    want, want_sum = fused_add_rms_norm_reference(x, r, w, 1e-6)
    assert torch.equal(got_sum, want_sum)
    torch.testing.assert_close(got, want, **TOL[dtype])
    gu = (torch.randn(9, 3000, generator=g) * 4).to(DEV, dtype)
    torch.testing.assert_close(silu_mul(gu), silu_mul_reference(gu), **TOL[dtype])
    freqs = torch.rand(20, generator=g) * torch.arange(64)[:, None]
    cos, sin = (f(torch.cat([freqs, freqs], -1)).to(DEV) for f in (torch.cos, torch.sin))
    qk = torch.randn(9, 11, 40, generator=g).to(DEV, dtype)
    pos = torch.randint(0, 64, (9,), generator=g).to(DEV)
    want = rotary_reference(qk.clone(), pos, cos, sin)
    torch.testing.assert_close(rotary_(qk, pos, cos, sin), want, **TOL[dtype])


def test_fused_ops_engine_on_cuda(tiny_dir, hf_model_of):
    """fused_ops with the Triton backend and CUDA graphs: float32 greedy tokens equal HF's."""
    from etr import LLM, SamplingParams
    path = tiny_dir("qwen2_untied")
    llm = LLM(str(path), dtype="float32", device=DEV, num_kv_blocks=128, attention_backend="triton",
              fused_ops=True)
    prompts = [[5, 6, 7], list(range(40, 80))]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert llm.engine.runner.graphs is not None and llm.engine.runner.model.fused
    assert [o.token_ids for o in outs] == [hf_greedy(hf_model_of(path), p, 20) for p in prompts]
