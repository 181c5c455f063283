"""``etr serve``: an OpenAI-compatible HTTP server over ``AsyncLLM`` (FastAPI + uvicorn, the ``serve`` extra;
importing this module needs it).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed or not), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus). Every request is checked before the first byte is sent; a
client that disconnects aborts its request.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from etr.async_llm import AsyncLLM
from etr.errors import ETRError
from etr.openai_protocol import (OpenAIError, ParsedRequest, ResponseBuilder, error_status, parse_body,
                                 parse_request, sampling_params, sse)
from etr.server_metrics import ServerMetrics


def build_app(llm: AsyncLLM, served_model_name: str | None = None):
    """The FastAPI application serving ``llm`` under ``served_model_name`` (default: the model directory as
    given). Shutting the app down shuts the engine down."""
    name = served_model_name or llm.config.model
    metrics = ServerMetrics(llm)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, llm.shutdown)  # joins the engine thread

    app = FastAPI(title="etr", lifespan=lifespan)

    @app.exception_handler(OpenAIError)
    async def openai_error(_request, error: OpenAIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/v1/models")
    async def models():
        card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "etr",
                "root": llm.config.model, "max_model_len": llm.config.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        try:
            llm.check_health()
        except ETRError as e:
            return JSONResponse(OpenAIError(500, str(e)).body(), status_code=500)
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def serve(request: Request, kind: str):
        parsed = parse_request(parse_body(await request.body()), kind)
        if parsed.model is not None and parsed.model != name:
            raise OpenAIError(404, f"The model `{parsed.model}` does not exist (serving `{name}`)", "model")
        stream, builder = _submit(llm, parsed), ResponseBuilder(kind, name, parsed.return_token_ids)
        timing = metrics.request_started()
        if parsed.stream:
            # The background task closes the request even when the body never starts (the client left first).
            return StreamingResponse(_events(stream, builder, parsed.include_usage, timing),
                                     media_type="text/event-stream", background=BackgroundTask(stream.close))
        body = await _until_disconnect(request, _collect(stream, builder, timing))
        return Response(status_code=499) if body is None else JSONResponse(body)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, "chat")

    return app


def _submit(llm: AsyncLLM, parsed: ParsedRequest):
    """Encode, check and queue (400/503/500 with OpenAI's body when the engine refuses)."""
    try:
        if parsed.kind == "chat":
            if llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None):
                raise OpenAIError(400, f"{llm.config.model} has no chat template: use /v1/completions", "messages")
            try:
                prompt = llm.chat_prompt_ids(parsed.prompt)
            except jinja2.TemplateError as e:  # e.g. a template that wants alternating roles
                raise OpenAIError(400, f"the chat template refused these messages: {e}", "messages") from None
        else:
            prompt = parsed.prompt
        budget = llm.config.max_model_len - (len(prompt) if isinstance(prompt, list) else 1)
        params = sampling_params(parsed.params, 16 if parsed.kind == "completion" else max(budget, 1))
        return llm.submit(prompt, params)
    except ETRError as e:
        param = "prompt" if "prompt" in str(e) else None
        raise OpenAIError(error_status(e), str(e), param) from None


async def _collect(stream, builder: ResponseBuilder, timing) -> dict:
    try:
        async for delta in stream:
            timing.observe(delta)
            if delta.finished:
                return builder.full(delta.output)
    except ETRError as e:
        raise OpenAIError(error_status(e), str(e)) from None
    finally:
        stream.close()


async def _events(stream, builder: ResponseBuilder, include_usage: bool, timing):
    """The SSE body; closing it (the client went away) aborts the request."""
    try:
        async for delta in stream:
            timing.observe(delta)
            chunk = builder.chunk(delta)
            if chunk is not None:
                yield sse(chunk)
            if delta.finished and include_usage:
                yield sse(builder.usage_chunk(delta.output))
    except ETRError as e:  # the engine died mid-stream: the status is sent, so say it in the stream
        yield sse(OpenAIError(error_status(e), str(e)).body())
    finally:
        stream.close()
    yield sse("[DONE]")


async def _until_disconnect(request, work):
    """``work``'s result; None if the client disconnected first (``work`` is then cancelled, which aborts
    the request)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.cancelled() or not watcher.done():
            raise  # this handler itself was cancelled
        return None


async def _disconnected(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def run_server(llm: AsyncLLM, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
               log_level: str = "warning") -> None:
    """Serve until interrupted (blocking)."""
    import uvicorn
    uvicorn.run(build_app(llm, served_model_name), host=host, port=port, log_level=log_level)
