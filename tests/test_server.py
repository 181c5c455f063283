"""``etr serve`` through the real ``openai`` client: parity with the offline engine (streamed, concurrent,
switched mid-stream), every bad input's status and message, a cancellation storm, corrupt files at start-up
and a fault inside the engine loop. Servers bind to 127.0.0.1 on a free port; every loop is bounded."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import inject_step_fault, load_bench, make_tiny_checkpoint
from etr import LLM, SamplingParams
from test_routing import LLAMA, meta_trace, switch_row, write_head


SOAK = load_bench("soak")  # the server helpers the soak benchmark uses too
free_port, kv_blocks_used = SOAK.free_port, SOAK.blocks_used
SWITCH_PROMPT, SWITCH_AT = "route me!", 3
PROMPTS = [f"prompt {i}: " + "ab" * (i % 5) for i in range(32)]
OPTIONS = dict(dtype="float32", max_model_len=512, num_kv_blocks=512, max_num_seqs=32)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A meta and an expert sharing a byte tokenizer, and a head that switches SWITCH_PROMPT at token 3."""
    root = tmp_path_factory.mktemp("serve")
    meta = make_tiny_checkpoint(root / "meta", "llama", seed=21, tokenizer=True, **LLAMA)
    expert = make_tiny_checkpoint(root / "expert", "qwen2", seed=22, tokenizer=True, hidden_size=96,
                                  num_attention_heads=6, num_key_value_heads=3)
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(meta)(SWITCH_PROMPT).input_ids
    _, hidden, max_logits = meta_trace(meta, ids, SWITCH_AT + 1)
    head = write_head(root / "head.safetensors", ["e"], [switch_row(hidden, max_logits, SWITCH_AT)])
    return {"meta": meta, "expert": expert, "head": head}


def wait_healthy(url: str, proc=None, log: Path | None = None, deadline_s: float = 90.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text() if log else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not healthy within {deadline_s} s")


def serve_args(library, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "etr", "serve", "--model", str(library["meta"]), "--expert",
            f"e={library['expert']}", "--expert-head", str(library["head"]), "--port", str(port),
            "--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "512", "--max-num-seqs", "32",
            *extra]


@pytest.fixture(scope="module")
def server(library, tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("server_log") / "server.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(serve_args(library, port, "--served-model-name", "etr-test"), stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        SOAK.stop(proc)


@pytest.fixture(scope="module")
def offline(library):
    return LLM(str(library["meta"]), experts={"e": str(library["expert"])}, expert_head=str(library["head"]),
               **OPTIONS)


def client(url, **kw):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, **kw)


def alone(offline, prompt, **params):
    return offline.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]


def etr_of(choice) -> dict:
    return choice.model_extra["etr"]


def test_completions_streamed_and_not(server, offline):
    c = client(server)
    full = c.completions.create(model="etr-test", prompt=PROMPTS[3], max_tokens=20, temperature=0)
    chunks = list(c.completions.create(model="etr-test", prompt=PROMPTS[3], max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    want = alone(offline, PROMPTS[3], temperature=0, max_tokens=20)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert full.choices[0].text == text == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
           [full.choices[0].finish_reason] == [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert full.usage.prompt_tokens == len(want.prompt_token_ids) and full.usage.total_tokens == \
           len(want.prompt_token_ids) + len(want.token_ids)
    assert etr_of(full.choices[0]) == {"expert": want.expert, "switch_index": want.switch_index}
    ids = [5, 6, 7, 8]
    by_ids = c.completions.create(model="etr-test", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == alone(offline, ids, temperature=0, max_tokens=8).text
    seeded = c.completions.create(model="etr-test", prompt=PROMPTS[1], max_tokens=12, temperature=0.9, seed=7)
    assert seeded.choices[0].text == alone(offline, PROMPTS[1], temperature=0.9, seed=7, max_tokens=12).text


def test_chat_models_health(server, offline):
    c = client(server)
    messages = [{"role": "user", "content": "hi there"}]
    reply = c.chat.completions.create(model="etr-test", messages=messages, max_tokens=10, temperature=0)
    want = offline.generate([offline.chat_prompt_ids(messages)], SamplingParams(temperature=0, max_tokens=10),
                            use_tqdm=False)[0]
    assert reply.choices[0].message.content == want.text and reply.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="etr-test", messages=messages, max_tokens=10, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert [m.id for m in c.models.list().data] == ["etr-test"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_concurrent_streams_match_requests_run_alone(server, offline):
    async def one(ac, prompt):
        stream = await ac.completions.create(model="etr-test", prompt=prompt, max_tokens=16, temperature=0,
                                             stream=True)
        chunks = [ch async for ch in stream]
        finals = [ch.choices[0] for ch in chunks if ch.choices[0].finish_reason]
        assert len(finals) == 1
        return "".join(ch.choices[0].text for ch in chunks), etr_of(finals[0])

    async def main():
        ac = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
        return await asyncio.wait_for(asyncio.gather(*(one(ac, p) for p in PROMPTS)), 120)
    got = asyncio.run(main())
    for prompt, (text, routing) in zip(PROMPTS, got):
        want = alone(offline, prompt, temperature=0, max_tokens=16)
        assert (text, routing) == (want.text, {"expert": want.expert, "switch_index": want.switch_index})


def test_switch_mid_stream(server, offline):
    want = alone(offline, SWITCH_PROMPT, temperature=0, max_tokens=24)
    assert (want.expert, want.switch_index) == ("e", SWITCH_AT)
    chunks = list(client(server).completions.create(model="etr-test", prompt=SWITCH_PROMPT, max_tokens=24,
                                                    temperature=0, stream=True))
    final = [ch.choices[0] for ch in chunks if ch.choices[0].finish_reason]
    assert len(final) == 1 and etr_of(final[0]) == {"expert": "e", "switch_index": SWITCH_AT}
    assert "".join(ch.choices[0].text for ch in chunks) == want.text
    metrics = httpx.get(f"{server}/metrics").text
    assert 'etr_expert_switches_total{expert="e"}' in metrics and "etr_switch_prefill_seconds_count" in metrics


BAD = [  # (body, status, words the message must contain)
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens=-1"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature=-0.5"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p=0"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p=1.5"),
    ({"prompt": "x", "n": 2}, 400, "n=2"),
    ({"prompt": "x" * 600}, 400, "600 tokens"),
    ({"prompt": ""}, 400, "prompt=''"),
    ({"prompt": []}, 400, "prompt=[]"),
    ({"prompt": [5, 99999]}, 400, "99999"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "gpt-9"),
    ({"prompt": "x", "stream": True, "temperature": "hot"}, 400, "temperature='hot'"),
    ({"prompt": "x", "logprobs": 3}, 400, "logprobs=3"),
]


@pytest.mark.parametrize("body, status, words", BAD, ids=[b[2] for b in BAD])
def test_bad_requests(server, body, status, words):
    r = httpx.post(f"{server}/v1/completions", json={"model": "etr-test", **body}, timeout=10)
    error = r.json()["error"]
    assert r.status_code == status and words in error["message"] and error["code"] == status
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_json_and_bad_chat_then_healthy(server, offline):
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "etr-test", "messages": []}, timeout=10)
    assert r.status_code == 400 and "messages=[]" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens=0"):
        client(server).completions.create(model="etr-test", prompt="x", max_tokens=0)
    ok = client(server).completions.create(model="etr-test", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert ok.choices[0].text == alone(offline, PROMPTS[0], temperature=0, max_tokens=8).text


def test_cancellation_storm(server, offline):
    """200 streams whose client gives up after 0.5 s; then a request completes within 5 s and no model holds
    a KV block."""
    async def doomed(ac, i):
        try:
            stream = await ac.completions.create(model="etr-test", prompt=PROMPTS[i % 32], max_tokens=400,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
            async for _ in stream:
                pass
        except (openai.APITimeoutError, openai.APIConnectionError):
            return True
        return False

    async def main():
        ac = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=0.5)
        return await asyncio.wait_for(asyncio.gather(*(doomed(ac, i) for i in range(200))), 60)
    assert sum(asyncio.run(main())) >= 150  # the rest finished inside 0.5 s or never started
    start = time.monotonic()
    ok = client(server, timeout=5).completions.create(model="etr-test", prompt=PROMPTS[2], max_tokens=8,
                                                      temperature=0)
    assert time.monotonic() - start < 5
    assert ok.choices[0].text == alone(offline, PROMPTS[2], temperature=0, max_tokens=8).text
    end = time.monotonic() + 5
    while time.monotonic() < end and any(kv_blocks_used(server).values()):
        time.sleep(0.1)
    used = kv_blocks_used(server)
    assert set(used) == {"meta", "e"} and not any(used.values())


def test_corrupt_files_at_start_up(library, tmp_path):
    from etr.errors import CorruptCheckpointError, ExpertHeadError
    broken = tmp_path / "broken"
    shutil.copytree(library["meta"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpointError, match=str(weights)):
        LLM(str(broken), dtype="float32", num_kv_blocks=8)
    head = tmp_path / "head.safetensors"
    head.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ExpertHeadError, match=str(head)):
        LLM(str(library["meta"]), experts={"e": str(library["expert"])}, expert_head=str(head), **OPTIONS)
    proc = subprocess.run(serve_args({**library, "meta": broken}, free_port()), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "CorruptCheckpointError" in proc.stderr and str(weights) in proc.stderr


def test_fault_in_engine_loop(library):
    """A step that raises: the in-flight callers get HTTP 500 (or an error event in their stream) naming the
    cause, /health says so, new requests get 500, and nothing hangs."""
    import uvicorn
    from etr import AsyncLLM
    from etr.server import build_app
    llm = AsyncLLM(str(library["meta"]), **OPTIONS)
    inject_step_fault(llm._llm.switcher, 20)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(llm, "m"), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        body = {"model": "m", "prompt": "go", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert "injected fault" in events[-2] and events[-1] == "data: [DONE]"
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 500 and "injected fault" in health.json()["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()
