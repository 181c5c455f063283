"""The CUDA-graph decode path's padded static buffers, run eagerly on the CPU (``cuda_graphs=True``): same
tokens as HF for batches that need padding, independent graphs per model, and the backend check."""

import pytest
import torch

from conftest import hf_greedy, make_tiny_checkpoint
from etr import LLM, SamplingParams
from etr.errors import ConfigError
from etr.models.expert_head import ExpertHead, save_expert_head

pytest.importorskip("triton")
SPEC = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)


def greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def test_padded_graph_batches_match_hf(tiny_dir, hf_model_of):
    path = tiny_dir("qwen2_untied")
    llm = LLM(str(path), dtype="float32", attention_backend="triton", cuda_graphs=True, block_size=8,
              num_kv_blocks=64, max_num_seqs=6, max_model_len=96)
    graphs = llm.engine.runner.graphs
    assert graphs.sizes == [1, 2, 4, 6] and graphs.buffers[4].meta.extra["num_splits"] == 1
    hf = hf_model_of(path)
    g = torch.Generator().manual_seed(7)
    for lengths in [(5,), (3, 20, 9), (1, 2, 3, 4, 30)]:  # batches of 1, 3 (in the 4-graph), 5 (in the 6-graph)
        prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
        outs = llm.generate(prompts, greedy(8), use_tqdm=False)
        assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 8) for p in prompts]
    assert graphs.buffers[4].meta.slot_mapping[3].item() == -1  # the padding row writes nothing
    assert llm.engine.block_manager.all_free()


def test_every_model_has_its_own_graphs(tmp_path):
    meta = make_tiny_checkpoint(tmp_path / "meta", "llama", seed=31, **SPEC)
    expert = make_tiny_checkpoint(tmp_path / "expert", "llama", seed=32, **SPEC)
    head = tmp_path / "head.safetensors"
    rows = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    save_expert_head(head, ExpertHead(["x"], rows, vocab_size=260))
    prompts = [[10, 20, 30], [5] * 11, [200, 7]]
    kw = dict(dtype="float32", num_kv_blocks=64, block_size=8, max_num_seqs=4, experts={"x": str(expert)},
              expert_head=str(head))
    graphed = LLM(str(meta), attention_backend="triton", cuda_graphs=True, **kw)
    eager = LLM(str(meta), **kw)
    a, b = (llm.generate(prompts, greedy(10), use_tqdm=False) for llm in (graphed, eager))
    assert [(o.token_ids, o.expert) for o in a] == [(o.token_ids, o.expert) for o in b]
    assert [o.switch_index for o in a] == [0, 0, 3]  # switches before and after the meta's graph decodes
    g_meta, g_expert = graphed.engine.runner.graphs, graphed.switcher.experts["x"].runner.graphs
    assert g_meta is not None and g_expert is not None and g_meta is not g_expert
    assert g_meta.buffers[1].input_ids.data_ptr() != g_expert.buffers[1].input_ids.data_ptr()


def test_graphs_need_a_capturable_backend(tiny_dir):
    with pytest.raises(ConfigError, match="cuda_graphs=True needs a capturable attention backend"):
        LLM(str(tiny_dir("qwen2_untied")), dtype="float32", attention_backend="torch", cuda_graphs=True)
    assert LLM(str(tiny_dir("qwen2_untied")), dtype="float32", num_kv_blocks=8).engine.runner.graphs is None


def test_graph_grid_with_many_splits_matches_hf(tiny_dir, hf_model_of, monkeypatch):
    """The GPU's split plan (many splits, most of them past a short context) on the padded graph path."""
    import etr.engine.cuda_graph as cg
    import etr.kernels.paged_attention as pa
    monkeypatch.setattr(pa, "MIN_SPLIT_TOKENS", 16)
    monkeypatch.setattr(cg, "split_plan", lambda b, kvh, pages, bs, on_gpu: pa.split_plan(b, kvh, pages, bs, True))
    path = tiny_dir("qwen2_untied")
    llm = LLM(str(path), dtype="float32", attention_backend="triton", cuda_graphs=True, block_size=8,
              num_kv_blocks=64, max_num_seqs=4, max_model_len=96)
    assert llm.engine.runner.graphs.buffers[2].meta.extra["num_splits"] == 6  # 12 pages, 2 per split
    prompts = [[3, 1, 4], list(range(50, 75))]
    outs = llm.generate(prompts, greedy(8), use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy(hf_model_of(path), p, 8) for p in prompts]
