"""llama.cpp (through llama-cpp-python) as a batch-1 decode peer, run by bench/throughput.py in a virtualenv of
its own. Two commands:

    VENV/bin/python bench/llamacpp_peer.py bf16 SRC.gguf OUT.gguf
        write OUT.gguf: SRC's tensors dequantized and stored as BF16 (llama.cpp's own requantization), i.e.
        the values our engine runs when it imports SRC (`etr import-gguf`)
    VENV/bin/python bench/llamacpp_peer.py run MODEL.gguf PROMPT_LEN NEW_TOKENS [REPEATS [VOCAB [THREADS]]]
        greedy decode of throughput.py's prompts (batch 1: one warm-up prompt, then a new one per timed
        repeat); prints one JSON line {"tok_s": ...}: NEW_TOKENS over the best repeat's time, prefill included,
        as throughput.py times every peer.
"""

import ctypes
import json
import os
import random
import sys
import time


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """throughput.make_prompts, repeated here: this script runs in another virtualenv."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(prompt_len)] for _ in range(batch)]


def to_bf16(src: str, out: str) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_BF16
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not requantize {src} to BF16")


def decode(llm, prompt: list[int], new_tokens: int) -> float:
    """Seconds to prefill ``prompt`` and decode ``new_tokens`` greedy tokens (EOS does not stop it)."""
    llm.reset()
    start = time.perf_counter()
    count = 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        count += 1
        if count == new_tokens:
            break
    return time.perf_counter() - start


def run(model: str, prompt_len: int, new_tokens: int, repeats: int, vocab: int | None, threads: int) -> float:
    from llama_cpp import Llama
    llm = Llama(model_path=model, n_ctx=prompt_len + new_tokens + 16, n_batch=max(prompt_len, 32),
                n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = vocab or llm.n_vocab()
    rounds = [make_prompts(1, prompt_len, vocab, 1000 + r)[0] for r in range(repeats + 1)]
    decode(llm, rounds[0], 4)  # warm-up
    return new_tokens / min(decode(llm, prompt, new_tokens) for prompt in rounds[1:])


def main() -> None:
    if sys.argv[1:2] == ["bf16"] and len(sys.argv) == 4:
        to_bf16(sys.argv[2], sys.argv[3])
        return
    if sys.argv[1:2] != ["run"] or len(sys.argv) < 5:
        raise SystemExit(__doc__)
    model, prompt_len, new_tokens = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    repeats = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    vocab = int(sys.argv[6]) if len(sys.argv) > 6 else None
    threads = int(sys.argv[7]) if len(sys.argv) > 7 else (os.cpu_count() or 1)
    print(json.dumps({"tok_s": run(model, prompt_len, new_tokens, repeats, vocab, threads)}))


if __name__ == "__main__":
    main()
