"""Expert Token Routing in the engine: switch parity with HF, batches, head files, and every mismatch error."""

import json
import math
import shutil

import pytest
import torch

from conftest import hf_greedy, make_tiny_checkpoint
from etr import LLM, SamplingParams
from etr.engine.attention import TorchAttentionBackend, causal_metadata
from etr.errors import ConfigError, ExpertHeadError, VocabularyMismatchError
from etr.models import load_model
from etr.models.expert_head import ExpertHead, load_expert_head, meta_fingerprint, save_expert_head

N = 24  # new tokens per request
PROMPTS = [[10, 20, 30, 40, 50], [7] * 3 + list(range(60, 80)), [200, 100, 150]]
LLAMA = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    return {
        "meta": make_tiny_checkpoint(root / "meta", "llama", seed=11, **LLAMA),
        # Experts of other shapes: another family, width, depth and head layout.
        "astro": make_tiny_checkpoint(root / "astro", "qwen2", seed=12, num_layers=3, hidden_size=96,
                                      num_attention_heads=6, num_key_value_heads=3),
        "law": make_tiny_checkpoint(root / "law", "llama", seed=13, num_layers=1, hidden_size=48,
                                    num_attention_heads=2, num_key_value_heads=1),
    }


def greedy(n=N):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def meta_trace(meta_dir, prompt, n):
    """The meta's greedy tokens and final hidden states at each generated position."""
    model = load_model(meta_dir, torch.float32, "cpu", max_positions=128)
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.tensor(tokens)
            hidden = model(ids, torch.arange(len(ids)), causal_metadata([len(ids)], "cpu"), None, TorchAttentionBackend())
            tokens.append(int(model.compute_logits(hidden[-1]).argmax()))
        logits = model.compute_logits(hidden)
    positions = range(len(prompt) - 1, len(prompt) - 1 + n)
    return tokens[len(prompt):], hidden[list(positions)], logits[list(positions)].max(-1).values


def switch_row(hidden, max_logits, k, margin=5.0):
    """A row orthogonal to the hidden states before step k (logit 0 there) whose logit at step k beats
    the best vocabulary logit by ``margin``."""
    assert (max_logits[:k] > 1.0).all(), "the construction needs positive vocabulary maxima before step k"
    h = hidden[k]
    if k:
        q, _ = torch.linalg.qr(hidden[:k].T)
        h = h - q @ (q.T @ h)
    return h * (max_logits[k] + margin) / (h @ hidden[k])


def write_head(path, names, rows, **meta):
    return save_expert_head(path, ExpertHead(list(names), torch.stack(rows), **meta))


@pytest.mark.parametrize("k", [0, 1, 6])
def test_switch_parity_with_hf(k, dirs, hf_model_of, tmp_path):
    prompt = PROMPTS[0]
    tokens, hidden, max_logits = meta_trace(dirs["meta"], prompt, N)
    head = write_head(tmp_path / "head.safetensors", ["law", "astro"],
                      [torch.zeros(64), switch_row(hidden, max_logits, k)])
    llm = LLM(str(dirs["meta"]), dtype="float32", num_kv_blocks=64,
              experts={"astro": str(dirs["astro"]), "law": str(dirs["law"])}, expert_head=str(head))
    out = llm.generate([prompt], greedy(), use_tqdm=False)[0]
    expected = tokens[:k] + hf_greedy(hf_model_of(dirs["astro"]), prompt + tokens[:k], N - k)
    assert out.expert == "astro" and out.switch_index == k
    assert out.token_ids == expected and len(out.token_ids) == N and out.finish_reason == "length"
    assert out.metrics.switch_prefill_s > 0
    assert llm.switcher.all_free()


@pytest.mark.parametrize("greedy_kernel", [False, True])
def test_engine_with_triton_head_matches(greedy_kernel, dirs, tmp_path):
    """The engine's extended head through the Triton kernel (interpreted here) gives the torch path's outputs."""
    pytest.importorskip("triton")
    tokens, hidden, max_logits = meta_trace(dirs["meta"], PROMPTS[0], N)
    head = write_head(tmp_path / "h.safetensors", ["astro", "law"], [switch_row(hidden, max_logits, 3), torch.zeros(64)])
    outs = []
    for use_kernel in (False, True):
        llm = build(dirs, str(head))
        llm.engine.runner.use_triton_head = use_kernel
        params = greedy() if greedy_kernel else SamplingParams(temperature=0.7, seed=5, max_tokens=N, ignore_eos=True)
        outs.append(llm.generate([PROMPTS[0]], params, use_tqdm=False)[0])
    assert llm.engine.runner.greedy_kernel
    assert (outs[0].expert, outs[0].switch_index, outs[0].token_ids) == \
           (outs[1].expert, outs[1].switch_index, outs[1].token_ids)
    assert outs[1].expert == "astro"


def test_batch_switches_match_requests_alone(dirs, tmp_path):
    t0, h0, m0 = meta_trace(dirs["meta"], PROMPTS[0], N)
    t1, h1, m1 = meta_trace(dirs["meta"], PROMPTS[1], N)
    head = write_head(tmp_path / "head.safetensors", ["astro", "law"],
                      [switch_row(h0, m0, 0), switch_row(h1, m1, 4)])
    llm = LLM(str(dirs["meta"]), dtype="float32", num_kv_blocks=128,
              experts={"astro": str(dirs["astro"]), "law": str(dirs["law"])}, expert_head=str(head))
    alone = [llm.generate([p], greedy(), use_tqdm=False)[0] for p in PROMPTS]
    batch = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [(o.expert, o.switch_index, o.token_ids) for o in batch] == \
           [(o.expert, o.switch_index, o.token_ids) for o in alone]
    assert {o.expert for o in batch} >= {"astro", "law"}
    assert len({o.switch_index for o in batch if o.expert}) >= 2
    assert llm.switcher.all_free()


def test_steps_launched_together_finish_in_any_order(dirs, tmp_path):
    """The switcher launches every engine's step before it waits for any (on CUDA the models then run side by
    side); finishing the launched steps in reverse order gives the same outputs."""
    t0, h0, m0 = meta_trace(dirs["meta"], PROMPTS[0], N)
    t1, h1, m1 = meta_trace(dirs["meta"], PROMPTS[1], N)
    head = write_head(tmp_path / "head.safetensors", ["astro", "law"],
                      [switch_row(h0, m0, 1), switch_row(h1, m1, 4)])
    llm = build(dirs, str(head))
    want = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    seqs, router, side_by_side = [llm.submit(r) for r in llm.prepare(PROMPTS, greedy())], llm.switcher, 0
    while any(not s.is_finished for s in seqs):
        launched = [(e, e.launch()) for e in router.engines if e.has_unfinished()]
        launched = [(e, p) for e, p in launched if p is not None]
        side_by_side += len(launched) > 1
        for engine, pending in reversed(launched):
            engine.finish(pending)
        router._hand_over()
    got = [llm.engine.output_of(s) for s in seqs]
    assert side_by_side >= 4  # meta decoding while an expert prefills, and two models decoding
    assert [(o.expert, o.switch_index, o.token_ids) for o in got] == \
           [(o.expert, o.switch_index, o.token_ids) for o in want]
    assert all(0 < o.metrics.switch_prefill_s for o in got if o.expert)
    assert router.all_free()


def test_no_experts_means_no_routing(dirs, hf_model_of):
    llm = LLM(str(dirs["meta"]), dtype="float32", num_kv_blocks=64)
    out = llm.generate([PROMPTS[0]], greedy(), use_tqdm=False)[0]
    assert out.expert is None and out.switch_index is None
    assert out.token_ids == hf_greedy(hf_model_of(dirs["meta"]), PROMPTS[0], N)


def test_merged_head_files_equal_one_file(dirs, tmp_path):
    t0, h0, m0 = meta_trace(dirs["meta"], PROMPTS[0], N)
    row_a, row_b = switch_row(h0, m0, 2), torch.zeros(64)
    first = write_head(tmp_path / "a.safetensors", ["astro"], [row_a])
    second = write_head(tmp_path / "b.safetensors", ["law"], [row_b])
    both = write_head(tmp_path / "ab.safetensors", ["astro", "law"], [row_a, row_b])
    merged = load_expert_head([first, second])
    assert merged.names == ["astro", "law"] and torch.equal(merged.embeddings, torch.stack([row_a, row_b]))
    experts = {"astro": str(dirs["astro"]), "law": str(dirs["law"])}
    outs = [LLM(str(dirs["meta"]), dtype="float32", num_kv_blocks=64, experts=experts, expert_head=h)
            .generate([PROMPTS[0]], greedy(), use_tqdm=False)[0] for h in ([str(first), str(second)], str(both))]
    assert outs[0].token_ids == outs[1].token_ids and outs[0].expert == "astro" and outs[0].switch_index == 2


def test_two_names_one_directory_load_once(dirs, tmp_path):
    head = write_head(tmp_path / "h.safetensors", ["x", "y"], [torch.zeros(64), torch.zeros(64)])
    llm = LLM(str(dirs["meta"]), dtype="float32", num_kv_blocks=64,
              experts={"x": str(dirs["law"]), "y": str(dirs["law"])}, expert_head=str(head))
    assert len(llm.switcher.engines) == 2 and llm.switcher.experts["x"] is llm.switcher.experts["y"]


def build(dirs, head, experts=None, **kw):
    experts = experts or {"astro": str(dirs["astro"]), "law": str(dirs["law"])}
    return LLM(str(dirs["meta"]), dtype="float32", num_kv_blocks=64, experts=experts, expert_head=head, **kw)


def test_head_errors(dirs, tmp_path):
    z = torch.zeros(64)
    a = write_head(tmp_path / "a.safetensors", ["astro"], [z])
    with pytest.raises(ExpertHeadError, match="duplicate expert name.*astro"):
        load_expert_head([a, a])
    with pytest.raises(ExpertHeadError, match=r"\['law'\] have no row"):
        build(dirs, str(a))
    extra = write_head(tmp_path / "x.safetensors", ["astro", "law", "chem"], [z, z, z])
    with pytest.raises(ExpertHeadError, match=r"\['chem'\] name no model"):
        build(dirs, str(extra))
    narrow = write_head(tmp_path / "n.safetensors", ["astro", "law"], [torch.zeros(32), torch.zeros(32)])
    with pytest.raises(ExpertHeadError, match="hidden size 32.*64"):
        build(dirs, str(narrow))
    wrong_vocab = write_head(tmp_path / "v.safetensors", ["astro", "law"], [z, z], vocab_size=999)
    with pytest.raises(ExpertHeadError, match="vocab_size 999"):
        build(dirs, str(wrong_vocab))
    other_meta = write_head(tmp_path / "f.safetensors", ["astro", "law"], [z, z], meta_fingerprint="0123456789abcdef")
    with pytest.raises(ExpertHeadError, match="fingerprint 0123456789abcdef"):
        build(dirs, str(other_meta))
    with pytest.raises(ExpertHeadError, match="without experts"):
        LLM(str(dirs["meta"]), dtype="float32", expert_head=str(a))
    with pytest.raises(ExpertHeadError, match="does not exist"):
        build(dirs, str(tmp_path / "missing.safetensors"))


def test_matching_fingerprint_is_accepted(dirs, tmp_path):
    meta = load_model(dirs["meta"], torch.bfloat16, "cpu")  # dtype-independent fingerprint
    head = write_head(tmp_path / "h.safetensors", ["astro", "law"], [torch.zeros(64)] * 2,
                      meta_fingerprint=meta_fingerprint(meta.lm_head_weight), vocab_size=260)
    assert build(dirs, str(head)).switcher.row_names == ["astro", "law"]


def test_vocabulary_mismatch_refused(dirs, tmp_path):
    head = write_head(tmp_path / "h.safetensors", ["astro", "law"], [torch.zeros(64)] * 2)
    wide = make_tiny_checkpoint(tmp_path / "wide", "llama", vocab_size=300, **LLAMA)
    with pytest.raises(VocabularyMismatchError, match=r"vocab_size differs: 260 vs 300.*'law'"):
        build(dirs, str(head), experts={"astro": str(dirs["astro"]), "law": str(wide)})


def test_tokenizer_mismatch_refused(tmp_path):
    meta = make_tiny_checkpoint(tmp_path / "meta", "llama", seed=1, tokenizer=True, **LLAMA)
    expert = make_tiny_checkpoint(tmp_path / "expert", "llama", seed=2, tokenizer=True, **LLAMA)
    cfg_path = expert / "tokenizer.json"
    tok = json.loads(cfg_path.read_text())
    vocab = tok["model"]["vocab"]
    vocab["A"], vocab["B"] = vocab["B"], vocab["A"]  # same size, different meaning of two ids
    cfg_path.write_text(json.dumps(tok))
    head = write_head(tmp_path / "h.safetensors", ["e"], [torch.zeros(64)])
    with pytest.raises(VocabularyMismatchError, match="tokenizer.*'e'"):
        LLM(str(meta), dtype="float32", num_kv_blocks=32, experts={"e": str(expert)}, expert_head=str(head))
    shutil.rmtree(expert)


def test_sampling_reaches_experts_and_frees_everything(dirs, tmp_path):
    t0, h0, m0 = meta_trace(dirs["meta"], PROMPTS[0], N)
    head = write_head(tmp_path / "h.safetensors", ["astro", "law"], [switch_row(h0, m0, 0), torch.zeros(64)])
    llm = build(dirs, str(head))
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=N, ignore_eos=True)
    first = llm.generate([PROMPTS[0]] * 4, params, use_tqdm=False)
    assert all(o.expert == "astro" for o in first)  # the expert row wins by a wide margin at step 0
    again = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    assert again.token_ids == first[0].token_ids and len(again.token_ids) == N
    assert llm.switcher.all_free()


@pytest.mark.parametrize("tokenizer", [True, False])  # False: random-weight checkpoints (the GPU suite's)
def test_switch_cost_protocol_routes_every_query(tokenizer, tmp_path):
    """The benchmark's head construction makes every query switch at token 0 (and none in the baseline)."""
    from conftest import load_bench
    measure, report = (getattr(load_bench("switch_cost"), n) for n in ("measure", "report"))
    meta = make_tiny_checkpoint(tmp_path / "meta", "llama", seed=21, tokenizer=tokenizer, **LLAMA)
    cost = measure(str(meta), n_queries=3, new_tokens=4, dtype="float32", repeats=1)
    assert cost.queries == 3 and cost.expert_prefill_s_per_query > 0
    low, high = cost.paired_quartiles_pct
    assert low <= cost.paired_median_pct <= high
    low, high = cost.paired_median_interval_pct
    assert low <= cost.paired_median_pct <= high and 0 < cost.interval_coverage < 1
    assert "overhead" in report(cost) and "quartiles" in report(cost) and "interval for the median" in report(cost)
    assert "not judged: 3 queries" in report(cost)  # 3 pairs: (min, max) covers the median 75% of the time


def test_pools_sized_after_all_models_load(dirs, tmp_path, monkeypatch):
    """num_kv_blocks=None: models on one device split its free memory by what each wants."""
    import etr.engine.kv_cache as kv
    from etr.errors import KVCacheError
    head = write_head(tmp_path / "h.safetensors", ["astro", "law"], [torch.zeros(64)] * 2)
    experts = {"astro": str(dirs["astro"]), "law": str(dirs["law"])}
    roomy = LLM(str(dirs["meta"]), dtype="float32", max_model_len=64, max_num_seqs=4, experts=experts,
                expert_head=str(head))
    assert [e.block_manager.num_blocks for e in roomy.switcher.engines] == [16, 16, 16]  # all they want: 4 x 64/16
    budget = sum(16 * kv.bytes_per_block(e.model_config, 16, torch.float32) for e in roomy.switcher.engines) / 2
    monkeypatch.setattr(kv, "free_memory_bytes", lambda device: budget / kv.CPU_MEMORY_FRACTION)
    half = LLM(str(dirs["meta"]), dtype="float32", max_model_len=64, max_num_seqs=4, experts=experts,
               expert_head=str(head))
    assert [e.block_manager.num_blocks for e in half.switcher.engines] == [8, 8, 8]
    monkeypatch.setattr(kv, "free_memory_bytes", lambda device: budget / 8 / kv.CPU_MEMORY_FRACTION)
    with pytest.raises(KVCacheError, match="max_model_len=64 needs 4"):
        LLM(str(dirs["meta"]), dtype="float32", max_model_len=64, max_num_seqs=4, experts=experts,
            expert_head=str(head))


def test_route_pins_requests_to_experts(dirs, hf_model_of):
    """Experts without a head are reachable only by pinning; a pinned request is the expert's own generation."""
    llm = LLM(str(dirs["meta"]), dtype="float32", num_kv_blocks=64,
              experts={"astro": str(dirs["astro"]), "law": str(dirs["law"])})
    outs = llm.generate(PROMPTS, greedy(), route=["astro", None, "law"], use_tqdm=False)
    for prompt, out, name in zip(PROMPTS, outs, ["astro", None, "law"]):
        own = hf_greedy(hf_model_of(dirs[name or "meta"]), prompt, N)
        assert out.token_ids == own and out.expert == name and out.switch_index == (0 if name else None)
    assert llm.switcher.all_free()
    with pytest.raises(ConfigError, match=r"unknown expert\(s\) \['chem'\]"):
        llm.generate(PROMPTS, greedy(), route="chem")
    with pytest.raises(ValueError, match="2 routes for 3 prompts"):
        llm.generate(PROMPTS, greedy(), route=["astro", "law"])
    assert llm.switcher.all_free()


def test_generate_cli_routes_to_an_expert(tmp_path, capsys):
    from etr.cli import main
    meta = make_tiny_checkpoint(tmp_path / "meta", "llama", seed=41, tokenizer=True, **LLAMA)
    expert = make_tiny_checkpoint(tmp_path / "expert", "llama", seed=42, tokenizer=True, **LLAMA)
    ids = LLM(str(meta), dtype="float32", num_kv_blocks=8).tokenizer("hello there").input_ids
    _, hidden, max_logits = meta_trace(meta, ids, 4)
    head = write_head(tmp_path / "h.safetensors", ["e"], [switch_row(hidden, max_logits, 0)])
    args = ["generate", "--model", str(meta), "--prompt", "hello there", "--max-tokens", "4", "--dtype", "float32",
            "--expert", f"e={expert}", "--expert-head", str(head)]
    main(args + ["--expert-device", "e=cpu"])
    assert "expert e from token 0" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--expert-device 'cpu'.*NAME=DEVICE"):
        main(args + ["--expert-device", "cpu"])


def test_etr_bench_switch_runs_the_bench_script(tmp_path, capsys):
    """`etr bench switch` runs bench/switch_cost.py with its options and writes the JSON it was asked for; a
    placement naming another expert than the protocol's is refused."""
    import subprocess
    import sys
    from etr.cli import main
    meta = make_tiny_checkpoint(tmp_path / "meta", "llama", seed=21, **LLAMA)
    out = tmp_path / "cost.json"
    assert main(["bench", "switch", "--model", str(meta), "--queries", "2", "--new-tokens", "3", "--dtype",
                 "float32", "--repeats", "1", "--json", str(out)]) == 0
    cost = json.loads(out.read_text())
    assert cost["queries"] == 2 and cost["new_tokens"] == 3 and cost["placement"] == "local"
    bad = subprocess.run([sys.executable, "-m", "etr", "bench", "switch", "--model", str(meta), "--expert-placement",
                          "law=ray"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "the protocol's one expert is called 'expert'" in bad.stderr


def test_median_interval_uses_the_binomial_order_statistics():
    """16 pairs: x_(4) .. x_(13), coverage 1 - 2 P(Bin(16, 1/2) <= 3) = 0.979; too few values: (min, max)."""
    from conftest import load_bench
    median_interval = load_bench("switch_cost").median_interval
    low, high, coverage = median_interval([float(v) for v in range(16, 0, -1)])
    assert (low, high) == (4.0, 13.0) and coverage == pytest.approx(1 - 2 * 697 / 65536)
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0, pytest.approx(1 - 2 / 32))
    assert median_interval([7.0]) == (7.0, 7.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        median_interval([])


def test_median_interval_covers_a_skewed_median_as_often_as_it_says():
    """Samples of 16 from an exponential (median ln 2): the interval holds it in ~97.9% of 4,000 draws."""
    from conftest import load_bench
    median_interval = load_bench("switch_cost").median_interval
    g = torch.Generator().manual_seed(0)
    draws = torch.empty(4000, 16).exponential_(generator=g).tolist()
    hits = sum(low <= math.log(2) <= high for low, high, _ in map(median_interval, draws))
    assert 0.965 <= hits / len(draws) <= 0.99


def test_switch_verdict_reads_the_whole_interval():
    from conftest import load_bench
    verdict = load_bench("switch_cost").verdict
    assert verdict(-3.0, 1.9, 0.98) == "holds" and verdict(2.0, 5.0, 0.98) == "fails"
    assert verdict(-1.0, 4.0, 0.98) == "undecided" and verdict(3.0, 4.0, 0.5) == "too few pairs"
