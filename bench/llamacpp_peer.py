"""llama.cpp (through llama-cpp-python) as a decode peer, run by bench/throughput.py in a virtualenv of its own.
Two commands:

    VENV/bin/python bench/llamacpp_peer.py bf16 SRC.gguf OUT.gguf
        write OUT.gguf: SRC's tensors dequantized and stored as BF16 (llama.cpp's own requantization), i.e.
        the values our engine runs when it imports SRC (`etr import-gguf`)
    VENV/bin/python bench/llamacpp_peer.py run MODEL.gguf PROMPT_LEN NEW_TOKENS [REPEATS [VOCAB [THREADS [BATCH]]]]
        greedy decode of throughput.py's prompts (one warm-up set, then a new set per timed repeat); prints one
        JSON line {"tok_s": ...}: BATCH x NEW_TOKENS over the best repeat's time, prefill included, as
        throughput.py times every peer.

Batch 1 runs through the library's ``Llama.generate``, as a user of the Python API would. A batch of several runs
as llama.cpp's own ``batched`` example does, through the C API: one context holding every sequence (``n_seq_max``
BATCH, each sequence a KV stream of its own of at least PROMPT_LEN + NEW_TOKENS + 16 cells, llama.cpp padding it
to a multiple of 256: with ``kv_unified`` on, every sequence's attention ran over the whole shared cache, 181
against 711 tok/s at batch 64), every prompt in one ``llama_decode`` with the logits of each prompt's last token,
then one ``llama_decode`` a step of BATCH tokens, one per sequence, each at its own position; greedy is numpy's
argmax over the step's logits (one call for the batch). Its greedy tokens were checked equal to
``Llama.generate``'s, prompt by prompt (4 prompts, 24 tokens, with and without ``kv_unified``).

Both paths run with flash attention on: llama.cpp's own default is "auto" (on for the CPU), the Python class's is
off, and on was the faster at every batch size (batch 1: 117-127 against 113-114 tok/s; 16: 496-554 against
404-477; 64: 772-777 against 506-607). The KV cache's type and the micro-batch are llama.cpp's defaults.
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
                n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)
    vocab = vocab or llm.n_vocab()
    rounds = [make_prompts(1, prompt_len, vocab, 1000 + r)[0] for r in range(repeats + 1)]
    decode(llm, rounds[0], 4)  # warm-up
    return new_tokens / min(decode(llm, prompt, new_tokens) for prompt in rounds[1:])


def run_batched(model_path: str, batch: int, prompt_len: int, new_tokens: int, repeats: int, vocab: int | None,
                threads: int) -> float:
    import llama_cpp as L
    import numpy as np
    L.llama_backend_init()
    model = L.llama_model_load_from_file(model_path.encode(), L.llama_model_default_params())
    if not model:
        raise SystemExit(f"llama.cpp could not load {model_path}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    cp = L.llama_context_default_params()
    cp.n_ctx = batch * (prompt_len + new_tokens + 16)
    cp.n_batch = max(batch * prompt_len, batch)
    cp.n_seq_max, cp.kv_unified = batch, False
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit(f"llama.cpp could not make a context of {cp.n_ctx} cells for {batch} sequences")
    cells = L.llama_batch_init(cp.n_batch, 0, 1)

    def fill(tokens: list[int], positions: list[int], seqs: list[int], wants: list[bool]) -> None:
        for i, (t, p, q, w) in enumerate(zip(tokens, positions, seqs, wants)):
            cells.token[i], cells.pos[i], cells.n_seq_id[i], cells.logits[i] = t, p, 1, w
            cells.seq_id[i][0] = q
        cells.n_tokens = len(tokens)

    def step() -> np.ndarray:
        if L.llama_decode(ctx, cells) != 0:
            raise SystemExit("llama_decode failed")
        return np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(batch, n_vocab)).argmax(axis=1)

    def decode(prompts: list[list[int]], count: int) -> float:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        start = time.perf_counter()
        fill([t for p in prompts for t in p], [i for p in prompts for i in range(len(p))],
             [q for q, p in enumerate(prompts) for _ in p], [i == len(p) - 1 for p in prompts for i in range(len(p))])
        last = step()
        for n in range(1, count):
            fill(last.tolist(), [len(p) + n - 1 for p in prompts], list(range(batch)), [True] * batch)
            last = step()
        return time.perf_counter() - start

    vocab = vocab or n_vocab
    rounds = [make_prompts(batch, prompt_len, vocab, 1000 + r) for r in range(repeats + 1)]
    decode(rounds[0], 4)  # warm-up
    best = min(decode(prompts, new_tokens) for prompts in rounds[1:])
    L.llama_batch_free(cells)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return batch * new_tokens / best


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
    batch = int(sys.argv[8]) if len(sys.argv) > 8 else 1
    if batch < 1:
        raise SystemExit(f"BATCH {batch} must be >= 1")
    tok_s = (run(model, prompt_len, new_tokens, repeats, vocab, threads) if batch == 1 else
             run_batched(model, batch, prompt_len, new_tokens, repeats, vocab, threads))
    print(json.dumps({"tok_s": tok_s}))


if __name__ == "__main__":
    main()
