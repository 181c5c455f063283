"""Soak: many requests through ``etr serve`` from concurrent clients, then every completed one checked
against the same request run alone offline.

    python bench/soak.py [--profile short|long] [--json FILE]

long (the recorded one): 1,000 requests from 16 clients; prompts of 1-300 random token ids, max_tokens 1-256;
half greedy, half seeded sampling; a meta and two experts (tiny random Llamas, float32) with a head scaled so
that about half the requests switch, at positions the head decides; 10% of the requests cancelled at a random
moment (the client closes its stream). short (CI): 120 requests from 8 clients, prompts <= 64, max_tokens <= 48.

Checks (exit 1 when one fails): every completed request's token ids equal the offline run's (and its expert
and switch index), no model holds a KV block at the end, server RSS grows < 10% between the 200th and the last
completed request (long profile), no 5xx. The server binds 127.0.0.1 on a free port and is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROFILES = {"short": dict(requests=120, clients=8, max_prompt=64, max_tokens=48, rss_after=None),
            "long": dict(requests=1000, clients=16, max_prompt=300, max_tokens=256, rss_after=200)}
VOCAB, HIDDEN, MAX_MODEL_LEN = 512, 64, 640


@dataclass(slots=True)
class Job:
    index: int
    prompt: list[int]
    params: dict
    cancel_after: int | None  # chunks read before the client gives up (None: read to the end)


def make_checkpoint(path: Path, seed: int) -> Path:
    """A tiny random Llama (no tokenizer: prompts and outputs are token ids)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      initializer_range=0.1, eos_token_id=1, bos_token_id=0)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


def make_jobs(profile: dict, seed: int) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(profile["requests"]):
        params = {"max_tokens": rng.randint(1, profile["max_tokens"]), "temperature": 0.0}
        if rng.random() < 0.5:
            params.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 30))
        prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, profile["max_prompt"]))]
        jobs.append(Job(i, prompt, params, rng.randint(0, 8) if rng.random() < 0.1 else None))
    return jobs


def offline_llm(dirs: dict, head: Path | None):
    from etr import LLM
    experts = {"x": str(dirs["x"]), "y": str(dirs["y"])}
    return LLM(str(dirs["meta"]), dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=2048,
               experts=experts, expert_head=None if head is None else str(head))


def sampling(params: dict):
    from etr import SamplingParams
    return SamplingParams(**params)


def write_head(dirs: dict, jobs: list[Job], root: Path) -> tuple[Path, float]:
    """Random expert rows, scaled so that about half of a sample of the jobs switch; returns the head and
    the sample's switched share."""
    import torch
    from etr.models.expert_head import ExpertHead, save_expert_head
    torch.manual_seed(1)
    rows = torch.randn(2, HIDDEN)
    sample = jobs[:48]
    best = None
    for scale in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0):
        path = root / f"head_{scale}.safetensors"
        save_expert_head(path, ExpertHead(["x", "y"], rows * scale, vocab_size=VOCAB))
        outs = offline_llm(dirs, path).generate([j.prompt for j in sample], [sampling(j.params) for j in sample],
                                                use_tqdm=False)
        share = sum(o.expert is not None for o in outs) / len(outs)
        if best is None or abs(share - 0.5) < abs(best[1] - 0.5):
            best = (path, share)
    return best


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Stop a server this process started, by its PID: terminate, then kill if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def run_client(url: str, queue: asyncio.Queue, results: dict, progress: list, rss: dict, pid: int,
                     rss_after: int | None, deadline: float) -> None:
    import httpx
    async with httpx.AsyncClient(timeout=120) as client:
        while not queue.empty() and time.monotonic() < deadline:
            job = queue.get_nowait()
            body = {"model": "soak", "prompt": job.prompt, "stream": True, "return_token_ids": True, **job.params}
            ids, final, status = [], None, None
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                status = r.status_code
                if status == 200:
                    chunks = 0
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        choice = json.loads(line[6:])["choices"][0]
                        ids += choice.get("token_ids", [])
                        final = choice if choice["finish_reason"] else final
                        chunks += 1
                        if job.cancel_after is not None and chunks > job.cancel_after:
                            break  # leaving the block closes the connection: the server must abort
            results[job.index] = (status, ids, final, job.cancel_after is not None and final is None)
            progress[0] += 1
            if rss_after is not None and progress[0] == rss_after:
                rss["first"] = rss_bytes(pid)


async def drive(url: str, jobs: list[Job], clients: int, pid: int, rss_after: int | None) -> tuple[dict, dict]:
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results, progress, rss = {}, [0], {}
    deadline = time.monotonic() + 3600
    await asyncio.gather(*(run_client(url, queue, results, progress, rss, pid, rss_after, deadline)
                           for _ in range(clients)))
    rss["last"] = rss_bytes(pid)
    return results, rss


def blocks_used(url: str) -> dict[str, float]:
    import httpx
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return {ln.split('"')[1]: float(ln.split()[-1]) for ln in lines if ln.startswith("etr_kv_blocks_used{")}


def wait_until(check, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.2)
    return check()


def healthy(url: str) -> bool:
    import httpx
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def serve(dirs: dict, head: Path, port: int, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "etr", "serve", "--model", str(dirs["meta"]), "--served-model-name", "soak",
            "--expert", f"x={dirs['x']}", "--expert", f"y={dirs['y']}", "--expert-head", str(head),
            "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "2048",
            "--max-num-seqs", "32", "--port", str(port)]
    with open(log, "w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def check(jobs, results, dirs, head) -> dict:
    """Compare every completed request with the same request run alone offline."""
    llm = offline_llm(dirs, head)
    completed = [j for j in jobs if j.index in results and results[j.index][2] is not None]
    mismatches, switched = [], 0
    for job in completed:
        want = llm.generate([job.prompt], sampling(job.params), use_tqdm=False)[0]
        _, ids, final, _ = results[job.index]
        switched += want.expert is not None
        if ids != want.token_ids or final["etr"] != {"expert": want.expert, "switch_index": want.switch_index}:
            mismatches.append(job.index)
    return {"completed": len(completed), "mismatches": mismatches, "switched": switched}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="long", help="request count and sizes")
    ap.add_argument("--seed", type=int, default=0, help="jobs and cancellations")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    profile = PROFILES[args.profile]
    with tempfile.TemporaryDirectory(prefix="etr_soak_") as tmp:
        root = Path(tmp)
        dirs = {name: make_checkpoint(root / name, seed) for name, seed in (("meta", 31), ("x", 32), ("y", 33))}
        jobs = make_jobs(profile, args.seed)
        head, share = write_head(dirs, jobs, root)
        port, log = free_port(), root / "server.log"
        proc = serve(dirs, head, port, log)
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_until(lambda: healthy(url) or proc.poll() is not None, 120) or proc.poll() is not None:
                print(log.read_text(), file=sys.stderr)
                return 1
            start = time.perf_counter()
            results, rss = asyncio.run(drive(url, jobs, profile["clients"], proc.pid, profile["rss_after"]))
            seconds = time.perf_counter() - start
            wait_until(lambda: not any(blocks_used(url).values()), 10)
            used = blocks_used(url)
        finally:
            stop(proc)
        figures = check(jobs, results, dirs, head)
    errors = sum(1 for s, *_ in results.values() if s is None or s >= 500)
    cancelled = sum(1 for *_, c in results.values() if c)
    growth = (rss["last"] - rss["first"]) / rss["first"] if "first" in rss else None
    figures.update(profile=args.profile, requests=len(jobs), answered=len(results), cancelled=cancelled,
                   http_5xx=errors, seconds=round(seconds, 1), head_sample_switch_share=share,
                   kv_blocks_used=used, rss_first=rss.get("first"), rss_last=rss["last"], rss_growth=growth)
    fails = [name for name, bad in (
        ("every request answered", len(results) != len(jobs)),
        ("tokens equal offline", bool(figures["mismatches"])),
        ("no KV block held", any(used.values())),
        ("no 5xx", errors > 0),
        ("RSS growth < 10%", growth is not None and growth >= 0.10)) if bad]
    print(json.dumps(figures, indent=1))
    print(f"soak {args.profile}: {len(jobs)} requests in {seconds:.1f} s, {figures['completed']} completed "
          f"({figures['switched']} switched), {cancelled} cancelled, {errors} 5xx, KV blocks held {used}, "
          f"RSS growth {'n/a' if growth is None else f'{growth:+.1%}'}; "
          + ("all checks hold" if not fails else f"FAILED: {', '.join(fails)}"))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
