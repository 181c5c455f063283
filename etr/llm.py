"""The public entry point: ``LLM`` generates, streams and chats over a paged KV-cache engine."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass

from etr.engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams, StreamDelta
from etr.engine.kv_cache import size_kv_pools
from etr.engine.sequence import Sequence
from etr.errors import ConfigError, InvalidPromptError, TokenizerMissingError
from etr.experts import build_switcher

Prompt = str | list[int]


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request encoded and validated against every model, not yet queued."""
    prompt_token_ids: list[int]
    prompt: str | None
    params: SamplingParams
    route: str | None = None  # the expert it is pinned to, or None (the meta starts)


class LLM:
    """A model loaded for generation: ``LLM(model, **options)`` or ``LLM(config=EngineConfig(...))``.

    Options (the fields of ``etr.engine.EngineConfig``, built once from them and passed to every engine):
        model: an HF checkpoint directory (Llama or Qwen2 family, safetensors weights).
        dtype: "auto" (bfloat16 on CUDA, float32 on the CPU), "float32", "bfloat16" or "float16".
        device: "cpu", "cuda" or "cuda:N".
        block_size: tokens per KV block; None picks the backend's (16, or 256 for flash-attn, whose paged KV
            needs multiples of 256).
        max_model_len: longest prompt + output; defaults to the model's max_position_embeddings, capped at 4096.
        max_num_seqs: most requests decoded together (per model).
        max_num_batched_tokens: most prompt tokens prefilled in one step (at least max_model_len).
        num_kv_blocks: size of each model's KV pool in blocks; None sizes it from free memory.
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes across requests.
        mixed_batches: True: prefill arriving requests in the same step (one forward) that decodes the running
            ones, so an arrival does not stall them (lower inter-token latency tails); False: a step either
            prefills or decodes, prefills first (sooner first tokens); None (default): True on CUDA, False on
            the CPU, where mixing measured slower (bench/RESULTS.md).
        attention_backend: "auto" (flash-attn on CUDA when it imports, else the Triton kernels on CUDA, else
            torch), "flash", "triton" or "torch".
        experts: expert name -> checkpoint directory. Experts must share the meta's vocabulary and tokenizer;
            two names on one directory load it once.
        expert_head: head file(s) with one trained row per expert (several files: rows concatenated).
            Without a head the meta never switches, and experts are reached only through
            ``generate(route=...)``.
        expert_devices: expert name -> device; experts not named follow ``device`` (a Ray expert's names a
            device of its actor's node).
        expert_placement: expert name -> "local" (in this process, the default) or "ray" (a Ray actor; see the
            README's "Experts on other hosts").
        expert_resources: expert name -> the Ray resources of its actor (default {"CPU": 1}, plus {"GPU": 1}
            on CUDA); only for experts placed on Ray.
        ray_address: the Ray cluster to join; None joins a running one, else starts a local one.
        ray_timeout_s: placing a Ray expert's actor and loading its weights must finish within this many
            seconds (``ExpertUnavailableError`` otherwise).
        cuda_graphs: decode through CUDA graphs captured per batch size (every model its own). None: on for
            CUDA with the "triton" or "flash" backend; True on the CPU runs the same padded static-buffer path
            eagerly (a testing aid); False: off.
        fused_ops: run residual add + RMSNorm, rotary and SiLU-mul as Triton kernels instead of torch's
            elementwise ops (CUDA; on the CPU only under TRITON_INTERPRET=1, for tests). Off by default until a
            GPU run of ``bench/gpu_suite.py`` shows it pays (its decode rows measure both).
    Bad options raise ``ConfigError`` (or the dtype/device errors) naming the value, before any weight loads.
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **options):
        if (model is None) == (config is None):
            raise ConfigError("give either model= (with options) or config=, not both and not neither")
        if config is not None and options:
            raise ConfigError(f"options {sorted(options)} given beside config=: put them in the config")
        self.config = config if config is not None else EngineConfig(model=model, **options)
        self.engine = LLMEngine(self.config)
        self.switcher = build_switcher(self.engine)
        size_kv_pools([e for e in self.switcher.engines if not e.remote])  # an actor sizes its own
        self.lock = threading.RLock()  # whoever holds it may step the engines, or add and abort requests

    @property
    def tokenizer(self):
        """The checkpoint's HF tokenizer, or None when it ships none (then prompts must be token ids)."""
        return self.engine.tokenizer

    def _encode(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TokenizerMissingError(f"text prompt {prompt[:40]!r} given, but {self.engine.model_dir} "
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

    def prepare(self, prompts: list[Prompt], params, route=None) -> list[PreparedRequest]:
        """Encode and validate every request without touching the engines (safe from any thread), so a bad
        one fails before anything is queued or allocated."""
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        routes = self._routes(route, len(prompts))
        for name in set(routes) - {None}:
            self.switcher.experts[name].check_available()
        encoded = [self._encode(p) for p in prompts]
        for (ids, _), p in zip(encoded, plist):
            for engine in self.switcher.engines:  # a request may end on any model: it must fit every pool
                engine.validate_prompt(ids, p)
        return [PreparedRequest(ids, text, p, name) for (ids, text), p, name in zip(encoded, plist, routes)]

    def submit(self, request: PreparedRequest, stream: bool = False) -> Sequence:
        """Queue a prepared request on the model it starts on; the caller must hold ``self.lock``."""
        engine = self.engine if request.route is None else self.switcher.experts[request.route]
        seq = engine.add_request(request.prompt_token_ids, request.params, request.prompt)
        seq.stream = stream
        if request.route is not None:
            seq.expert, seq.switch_index = request.route, 0
        return seq

    def _routes(self, route, n: int) -> list[str | None]:
        routes = [route] * n if route is None or isinstance(route, str) else list(route)
        if len(routes) != n:
            raise ValueError(f"{len(routes)} routes for {n} prompts")
        unknown = sorted({r for r in routes if r is not None and r not in self.switcher.experts})
        if unknown:
            raise ConfigError(f"route names unknown expert(s) {unknown} (have {sorted(self.switcher.experts)})")
        return routes

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, route: str | Seq[str | None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.

        ``route`` pins requests to an expert (one name, or one name or None per prompt): a pinned request
        starts on that expert, which decodes it alone, as if the meta had chosen it before the first token
        (its output reports ``expert=name, switch_index=0``). None leaves the choice to the meta.

        Safe to call from several threads at once: the calls' requests share one continuous batch (each step
        any caller runs advances every caller's requests), and each call returns exactly its own outputs.
        """
        prepared = self.prepare(self._as_batch(prompts), params, route)
        with self.lock:
            seqs = []
            try:
                for r in prepared:
                    seqs.append(self.submit(r))
            except BaseException:  # e.g. a remote expert died since prepare: nothing of this call stays queued
                self.switcher.abort(seqs)
                raise
        bar, done = _progress(len(seqs), use_tqdm), 0
        try:
            while done < len(seqs):
                self._step_unless_finished(seqs)
                now = sum(s.is_finished for s in seqs)
                if bar is not None and now > done:
                    bar.update(now - done)
                done = now
        finally:
            with self.lock:
                self.switcher.abort(seqs)
            if bar is not None:
                bar.close()
        outputs = [self.engine.output_of(s) for s in seqs]
        failed = [s.error for s in seqs if s.error is not None]
        if failed:  # e.g. a remote expert died: the call fails, after its other requests completed
            error = type(failed[0])(str(failed[0]))
            error.outputs = outputs
            raise error from failed[0]
        return outputs

    def _step_unless_finished(self, seqs: list[Sequence]) -> None:
        with self.lock:  # another caller's step may have finished ours while we waited for the lock
            if not all(s.is_finished for s in seqs):
                self.switcher.step()

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield what each step adds to one request; closing the iterator early frees the request."""
        (request,) = self.prepare([prompt], params)
        with self.lock:
            seq = self.submit(request, stream=True)
        try:
            while True:
                self._step_unless_finished([seq])
                with self.lock:
                    delta = self.engine.take_delta(seq)
                if seq.error is not None:
                    raise seq.error
                if delta is not None:
                    yield delta
                    if delta.finished:
                        return
        finally:
            with self.lock:
                self.switcher.abort([seq])

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate replies."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise TokenizerMissingError(f"{self.engine.model_dir} has no tokenizer with a chat template")
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
