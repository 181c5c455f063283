"""Decides after each new token whether a request is done, and keeps its text current where needed."""

from __future__ import annotations

from etr.engine.sequence import Sequence


class StopChecker:
    """Decides when a sequence is finished (EOS, stop ids and strings, length) and its text."""
    def __init__(self, eos_token_ids: tuple[int, ...], max_model_len: int, tokenizer=None):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer

    def text_token_ids(self, seq: Sequence) -> list[int]:
        """Output ids that belong in the text: a final EOS or stop id is left out."""
        ids = seq.output_token_ids
        if seq.finish_reason == "stop" and ids and self._is_stop_token(seq, ids[-1]):
            return ids[:-1]
        return ids

    def final_text(self, seq: Sequence) -> str:
        """The text of a finished request (already trimmed when a stop string ended it)."""
        return seq.text if seq.stop_string_hit else self.decode(seq)

    def decode(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(self.text_token_ids(seq), skip_special_tokens=seq.params.skip_special_tokens)

    def _is_stop_token(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        return (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids

    def check(self, seq: Sequence) -> str | None:
        """The finish reason after ``seq``'s newest token, or None; trims ``seq.text`` at a stop string."""
        p = seq.params
        if self._is_stop_token(seq, seq.last_token) and seq.num_output_tokens >= p.min_tokens:
            seq.finish_reason = "stop"
            return "stop"
        if p.stop or seq.stream:
            previous = len(seq.text)
            seq.text = self.decode(seq)
            if p.stop and seq.num_output_tokens >= p.min_tokens and self._trim_at_stop_string(seq, previous):
                seq.stop_string_hit = True
                return "stop"
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def _trim_at_stop_string(seq: Sequence, previous_len: int) -> bool:
        # A match can only end in the new text, so start the search one stop-length before it.
        start = max(0, previous_len - max(len(s) for s in seq.params.stop) + 1)
        hits = [i for i in (seq.text.find(s, start) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        seq.text = seq.text[:min(hits)]
        return True
