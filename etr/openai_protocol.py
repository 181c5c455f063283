"""OpenAI's completion and chat request bodies, checked and turned into engine requests, and the response
bodies built from engine outputs. No web framework here: ``etr.server`` does the HTTP."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from etr.engine import RequestOutput, SamplingParams, StreamDelta
from etr.errors import (EngineDeadError, ETRError, ExpertUnavailableError, InvalidSamplingParamsError,
                        QueueFullError)


class OpenAIError(Exception):
    """An error answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""
    TYPES = {400: "invalid_request_error", 404: "not_found_error", 503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


# name -> (types accepted, SamplingParams field); None values mean "not given".
SAMPLING_FIELDS = {
    "max_tokens": ((int,), "max_tokens"), "max_completion_tokens": ((int,), "max_tokens"),
    "temperature": ((int, float), "temperature"), "top_p": ((int, float), "top_p"), "top_k": ((int,), "top_k"),
    "min_p": ((int, float), "min_p"), "seed": ((int,), "seed"), "min_tokens": ((int,), "min_tokens"),
    "ignore_eos": ((bool,), "ignore_eos"), "stop": ((str, list), "stop"), "stop_token_ids": ((list,), "stop_token_ids"),
}
# Parameters we do not implement: refused when set to anything but their neutral value.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "tools": (None, []),
               "frequency_penalty": (None, 0), "response_format": (None, {"type": "text"})}


@dataclass(slots=True)
class ParsedRequest:
    """One checked completion or chat request."""
    kind: str                  # "completion" or "chat"
    prompt: str | list[int]    # the text or ids to encode (chat: ids rendered by the chat template)
    params: dict               # SamplingParams fields given by the client
    stream: bool
    include_usage: bool
    model: str | None
    return_token_ids: bool = False  # vLLM's extra: each choice (and chunk) also carries its token ids


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body (400 for malformed JSON or another JSON type)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise OpenAIError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _is(value, types) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not a number here
    return isinstance(value, types)


def parse_request(body: dict, kind: str) -> ParsedRequest:
    """Check the fields shared by both endpoints and the prompt (``prompt`` or ``messages``)."""
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) not in neutral:
            raise OpenAIError(400, f"{name}={body[name]!r} is not supported", name)
    if body.get("n", 1) != 1:
        raise OpenAIError(400, f"n={body['n']!r} is not supported: only n=1", "n")
    params = {}
    for name, (types, target) in SAMPLING_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        if not _is(value, types):
            raise OpenAIError(400, f"{name}={value!r} must be of type {' or '.join(t.__name__ for t in types)}", name)
        params[target] = value
    if "stop_token_ids" in params and not all(_is(t, (int,)) for t in params["stop_token_ids"]):
        raise OpenAIError(400, f"stop_token_ids={params['stop_token_ids']!r} must be a list of ints", "stop_token_ids")
    stream, options = body.get("stream", False), body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise OpenAIError(400, f"stream={stream!r} / stream_options={options!r}: a bool and an object", "stream")
    prompt = _prompt(body) if kind == "completion" else _messages(body)
    model = body.get("model")
    return ParsedRequest(kind, prompt, params, stream, bool(options.get("include_usage")) and stream,
                         None if model is None else str(model), body.get("return_token_ids") is True)


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(_is(t, (int,)) for t in prompt):
        return prompt
    if prompt in ("", []):
        raise OpenAIError(400, f"prompt={prompt!r} is empty", "prompt")
    raise OpenAIError(400, f"prompt must be one string or one list of token ids, got {str(prompt)[:80]!r}", "prompt")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, f"messages={messages!r} must be a non-empty list", "messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise OpenAIError(400, f"message {str(m)[:80]!r} needs a string role and string content", "messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def sampling_params(fields: dict, default_max_tokens: int) -> SamplingParams:
    """SamplingParams from the client's fields (400 naming the value when one is out of range)."""
    fields = {"max_tokens": default_max_tokens, **fields}
    try:
        return SamplingParams(**fields)
    except InvalidSamplingParamsError as e:
        raise OpenAIError(400, str(e), str(e).split("=", 1)[0]) from None


def error_status(error: ETRError) -> int:
    """The HTTP status of an engine error raised while a request is validated or queued."""
    if isinstance(error, (QueueFullError, ExpertUnavailableError)):
        return 503
    if isinstance(error, EngineDeadError):
        return 500
    return 400 if isinstance(error, ValueError) else 500


class ResponseBuilder:
    """The response bodies of one request (ids, timestamps and model name fixed at creation)."""

    def __init__(self, kind: str, model: str, token_ids: bool = False):
        self.kind, self.model, self.token_ids = kind, model, token_ids
        self.id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sent_role = kind == "completion"  # chat: the first chunk names the role

    def _envelope(self, object_name: str, choices: list, usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    @staticmethod
    def usage(output: RequestOutput) -> dict:
        prompt, completion = len(output.prompt_token_ids), len(output.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def routing(output: RequestOutput) -> dict:
        return {"expert": output.expert, "switch_index": output.switch_index}

    def full(self, output: RequestOutput) -> dict:
        """The non-streamed response."""
        choice = {"index": 0, "finish_reason": output.finish_reason, "logprobs": None, "etr": self.routing(output)}
        if self.token_ids:
            choice["token_ids"] = output.token_ids
        if self.kind == "completion":
            choice["text"] = output.text
            return self._envelope("text_completion", [choice], self.usage(output))
        choice["message"] = {"role": "assistant", "content": output.text}
        return self._envelope("chat.completion", [choice], self.usage(output))

    def chunk(self, delta: StreamDelta) -> dict | None:
        """One streamed chunk (None when the delta adds nothing a client sees); the last carries
        ``finish_reason`` and ``etr``."""
        choice = {"index": 0, "logprobs": None, "finish_reason": delta.finish_reason if delta.finished else None}
        if delta.finished:
            choice["etr"] = self.routing(delta.output)
        elif not delta.text and self.sent_role and not (self.token_ids and delta.token_ids):
            return None
        if self.token_ids:
            choice["token_ids"] = delta.token_ids
        if self.kind == "completion":
            choice["text"] = delta.text
            return self._envelope("text_completion", [choice])
        choice["delta"] = {"content": delta.text}
        if not self.sent_role:
            choice["delta"]["role"], self.sent_role = "assistant", True
        return self._envelope("chat.completion.chunk", [choice])

    def usage_chunk(self, output: RequestOutput) -> dict:
        """The final chunk of ``stream_options.include_usage``: empty choices, the usage."""
        name = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return self._envelope(name, [], self.usage(output))


def sse(body: dict | str) -> bytes:
    """One server-sent event: ``data: {...}`` and a blank line."""
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()
