"""The public entry point: ``LLM`` generates, streams and chats over a paged KV-cache engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence as Seq

import torch

from etr.engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams, StreamDelta
from etr.engine.kv_cache import size_kv_pools
from etr.engine.router import Router
from etr.errors import ConfigError, InvalidPromptError, TokenizerMissingError
from etr.experts import build_router
from etr.models.config import load_model_config
from etr.options import parse_device, parse_dtype

Prompt = str | list[int]


class LLM:
    """A model loaded for generation.

    Args:
        model: an HF checkpoint directory (Llama or Qwen2 family, safetensors weights).
        dtype: "auto" (bfloat16 on CUDA, float32 on the CPU), "float32", "bfloat16" or "float16".
        device: "cpu", "cuda" or "cuda:N".
        block_size: tokens per KV block; None picks the backend's (16, or 256 for flash-attn, whose paged KV
            needs multiples of 256).
        max_model_len: longest prompt + output; defaults to the model's max_position_embeddings, capped at 4096.
        max_num_seqs: most requests decoded together.
        num_kv_blocks: size of the KV pool in blocks; None sizes it from free memory.
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes across requests.
        attention_backend: "auto" (flash-attn on CUDA when it imports, else the Triton kernels on CUDA, else
            torch), "flash", "triton" or "torch".
        experts: expert name -> checkpoint directory. Experts must share the meta's vocabulary and tokenizer;
            two names on one directory load it once.
        expert_head: head file(s) with one trained row per expert (several files: rows concatenated).
            Without a head the meta never switches, and experts are reached only through
            ``generate(route=...)``.
        expert_devices: expert name -> device; experts not named follow ``device``.
        cuda_graphs: decode through CUDA graphs captured per batch size (every model its own). None: on for
            CUDA with the "triton" or "flash" backend; True on the CPU runs the same padded static-buffer path
            eagerly (a testing aid); False: off.
        fused_ops: run residual add + RMSNorm, rotary and SiLU-mul as Triton kernels instead of torch's
            elementwise ops (CUDA; on the CPU only under TRITON_INTERPRET=1, for tests). Off by default until a
            GPU run of ``bench/gpu_suite.py`` shows it pays (its decode rows measure both).
    """

    def __init__(self, model: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
                 block_size: int | None = None, max_model_len: int | None = None, max_num_seqs: int = 64,
                 num_kv_blocks: int | None = None, enable_prefix_caching: bool = True,
                 attention_backend: str = "auto", max_num_batched_tokens: int = 8192,
                 experts: dict[str, str] | None = None, expert_head: str | list[str] | None = None,
                 expert_devices: dict[str, str] | None = None, cuda_graphs: bool | None = None,
                 fused_ops: bool = False):
        dev = parse_device(device)
        model_cfg = load_model_config(model)
        if (block_size is not None and block_size < 1) or max_num_seqs < 1:
            raise ConfigError(f"block_size={block_size} and max_num_seqs={max_num_seqs} must be >= 1")
        max_model_len = max_model_len or min(model_cfg.max_position_embeddings, 4096)
        torch_dtype = parse_dtype(dtype, dev)

        def make_engine(path: str, on_device) -> LLMEngine:
            return LLMEngine(EngineConfig(
                model=str(path), dtype=torch_dtype, device=parse_device(on_device), block_size=block_size,
                max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, num_kv_blocks=num_kv_blocks,
                enable_prefix_caching=enable_prefix_caching, attention_backend=attention_backend,
                cuda_graphs=cuda_graphs, fused_ops=fused_ops))

        self.engine = make_engine(model, dev)
        self.router = Router(self.engine, {}, [])
        if experts or expert_head is not None:
            self.router = build_router(self.engine, dict(experts or {}), expert_head, expert_devices, make_engine)
        size_kv_pools(self.router.engines)

    @property
    def tokenizer(self):
        """The checkpoint's HF tokenizer, or None when it ships none (then prompts must be token ids)."""
        return self.engine.tokenizer

    def _encode(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TokenizerMissingError(f"text prompt {prompt[:40]!r} given, but {self.engine.config.model} "
                                            "has no tokenizer files: pass token-id lists instead")
            return self.tokenizer(prompt).input_ids, prompt
        if isinstance(prompt, (list, tuple)):
            return list(prompt), None
        raise InvalidPromptError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")

    @staticmethod
    def _as_batch(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]
        return list(prompts)

    def _add_all(self, prompts: list[Prompt], params, route=None) -> list:
        """Validate every request first, so a bad one leaves nothing queued or allocated."""
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        routes = self._routes(route, len(prompts))
        encoded = [self._encode(p) for p in prompts]
        for (ids, _), p in zip(encoded, plist):
            for engine in self.router.engines:  # a request may end on any model: it must fit every pool
                engine.validate_prompt(ids, p)
        seqs = []
        for (ids, text), p, name in zip(encoded, plist, routes):
            engine = self.engine if name is None else self.router.experts[name]
            seqs.append(engine.add_request(ids, p, text))
            if name is not None:
                seqs[-1].expert, seqs[-1].switch_index = name, 0
        return seqs

    def _routes(self, route, n: int) -> list[str | None]:
        routes = [route] * n if route is None or isinstance(route, str) else list(route)
        if len(routes) != n:
            raise ValueError(f"{len(routes)} routes for {n} prompts")
        unknown = sorted({r for r in routes if r is not None and r not in self.router.experts})
        if unknown:
            raise ConfigError(f"route names unknown expert(s) {unknown} (have {sorted(self.router.experts)})")
        return routes

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, route: str | Seq[str | None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.

        ``route`` pins requests to an expert (one name, or one name or None per prompt): a pinned request
        starts on that expert, which decodes it alone, as if the meta had chosen it before the first token
        (its output reports ``expert=name, switch_index=0``). None leaves the choice to the meta.
        """
        seqs = self._add_all(self._as_batch(prompts), params, route)
        bar = _progress(len(seqs), use_tqdm)
        try:
            while any(not s.is_finished for s in seqs):
                done = sum(s.is_finished for s in self.router.step())
                if bar is not None and done:
                    bar.update(done)
        finally:
            self.router.abort(seqs)
            if bar is not None:
                bar.close()
        return [self.engine.output_of(s) for s in seqs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield what each step adds to one request; closing the iterator early frees the request."""
        (seq,) = self._add_all([prompt], params)
        try:
            while not seq.is_finished:
                before = seq.num_output_tokens
                self.router.step(track_text=True)
                delta = self._delta(seq, before)
                if delta is not None:
                    yield delta
        finally:
            self.router.abort([seq])

    def _delta(self, seq, tokens_before: int) -> StreamDelta | None:
        new_ids = seq.output_token_ids[tokens_before:]
        if seq.is_finished:
            text = seq.text[seq.num_streamed_chars:]
            return StreamDelta(seq.seq_id, new_ids, text, True, seq.finish_reason, self.engine.output_of(seq))
        # Hold back a trailing partial character and anything a stop string could still cut off.
        hold = max((len(s) for s in seq.params.stop), default=1) - 1
        safe = len(seq.text.rstrip("\ufffd")) - hold
        text = seq.text[seq.num_streamed_chars:max(safe, seq.num_streamed_chars)]
        seq.num_streamed_chars += len(text)
        return StreamDelta(seq.seq_id, new_ids, text) if new_ids or text else None

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate replies."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise TokenizerMissingError(f"{self.engine.config.model} has no tokenizer with a chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.chat_prompt_ids(c) for c in conversations]
        return self.generate(prompts, params, use_tqdm=use_tqdm)

    def chat_prompt_ids(self, conversation: list[dict]) -> list[int]:
        """Token ids of a conversation rendered by the chat template, ready for the assistant's turn."""
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids


def _progress(total: int, enabled: bool):
    if not enabled or total < 2:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="generate", unit="req", leave=False)
