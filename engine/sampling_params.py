"""Per-request decoding settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from etr.errors import InvalidSamplingParamsError


@dataclass(slots=True)
class SamplingParams:
    """How to decode one request (the vLLM field names).

    temperature: 0 is greedy; top_k: 0 or -1 disables; top_p in (0, 1]; min_p in [0, 1];
    seed: same seed, same output whatever else is in the batch; stop: strings that end the text (trimmed at
    the match); stop_token_ids: extra ids that end it (the id is kept in ``token_ids``, not in the text);
    ignore_eos: keep going past EOS; min_tokens: EOS and stop ids are suppressed until this many tokens.
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            (self.temperature >= 0, "temperature", self.temperature, "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]"),
            (self.top_k >= -1, "top_k", self.top_k, "must be -1, 0 (off) or a positive count"),
            (0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]"),
            (self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be >= 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens, "must be in [0, max_tokens]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "must be non-empty strings"),
            # Bounds a value must keep to reach the sampler at all (a torch seed, an int32 count, token ids).
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2 ** 63), "seed", self.seed,
             "must be an int in [0, 2**63)"),
            (isinstance(self.top_k, int) and self.top_k < 2 ** 31, "top_k", self.top_k, "must be an int < 2**31"),
            (all(isinstance(t, int) and 0 <= t < 2 ** 31 for t in self.stop_token_ids), "stop_token_ids",
             self.stop_token_ids, "must be token ids (ints >= 0)"),
        ]
        for ok, name, value, rule in checks:
            if not ok:
                raise InvalidSamplingParamsError(f"{name}={value!r} {rule}")

    @property
    def greedy(self) -> bool:
        """Whether this request decodes greedily (``temperature == 0``)."""
        return self.temperature == 0.0
