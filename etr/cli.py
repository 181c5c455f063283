"""The ``etr`` command line: ``etr import-gguf``, ``etr generate``, ``etr demo``."""

from __future__ import annotations

import argparse
import sys
import time

from etr.errors import ETRError

DEMO_CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one sentence.",
    "List three prime numbers.",
]


def _import_gguf(args) -> None:
    from etr.models.gguf_import import import_gguf
    from etr.options import parse_dtype
    import torch
    dest = import_gguf(args.src, args.dest, parse_dtype(args.dtype, torch.device("cpu")))
    print(f"wrote {dest}")


def _generate(args) -> None:
    from etr import LLM, SamplingParams
    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outs = llm.generate(args.prompt, params)
    for prompt, out in zip(args.prompt, outs):
        print(f"### {prompt}\n{out.text}\n[{len(out.token_ids)} tokens, {out.finish_reason}]")


def _demo(args) -> None:
    from etr import LLM, SamplingParams
    from etr.default_model import default_model_dir
    from etr.options import parse_dtype
    import torch
    model_dir = default_model_dir(parse_dtype(args.dtype, torch.device("cpu")))
    print(f"model: {model_dir}")
    llm = LLM(str(model_dir), dtype=args.dtype, device=args.device, max_model_len=1024)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": q}] for q in DEMO_CHATS], params)
    seconds = time.perf_counter() - start
    for q, out in zip(DEMO_CHATS, outs):
        print(f"\n### user: {q}\n### assistant: {out.text.strip()}")
    total = sum(len(o.token_ids) for o in outs)
    print(f"\n{total} tokens for {len(outs)} chats in {seconds:.2f} s ({total / seconds:.1f} tok/s)")


def _collect(args) -> None:
    import torch
    from etr.models import load_model
    from etr.models.tokenizer import load_tokenizer
    from etr.options import parse_device, parse_dtype
    from etr.routing import collect
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    experts = dict(_name_dir(x) for x in args.expert)
    pairs = collect.load_pairs(args.data, load_tokenizer(args.meta), args.chat_template)
    models = {"meta": args.meta, **experts}
    losses = {}
    for name, path in models.items():  # one model in memory at a time
        model = load_model(path, dtype, device, max_positions=args.max_len)
        losses.update(collect.compute_losses({name: model}, pairs, args.batch_size))
        del model
    sets = collect.downsample(collect.query_sets(losses, "meta", args.tau, args.ties), args.per_expert, args.seed)
    collect.write_sets(args.out, sets, losses, "meta", pairs)
    print(collect.summary(sets, losses, "meta"))
    print(f"wrote {args.out}")


def _train(args) -> None:
    import json
    from pathlib import Path
    import torch
    from etr.models import load_model
    from etr.models.expert_head import ExpertHead, load_expert_head, meta_fingerprint, save_expert_head
    from etr.routing.train import TrainConfig, query_features, train_rows
    rows = [json.loads(x) for x in Path(args.sets).read_text().splitlines() if x.strip()]
    old = load_expert_head(args.extend) if args.extend else None
    names = sorted({r["expert"] for r in rows} - set(old.names if old else []))
    if not names:
        raise SystemExit(f"etr: {args.sets} holds no expert that is not already in the head")
    order = (old.names if old else []) + names
    model = load_model(args.meta, torch.float32, "cpu", max_positions=args.max_len)
    keep = [r for r in rows if r["expert"] in names]
    features = query_features(model, [r["query_ids"] for r in keep], [order.index(r["expert"]) for r in keep])
    init = model.lm_head_weight.float().mean(0, keepdim=True).repeat(len(names), 1)
    cfg = TrainConfig(lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size, epochs=args.epochs,
                      seed=args.seed)
    new = train_rows(features, init, None if old is None else old.embeddings.float(), cfg)
    weights = new if old is None else torch.cat([old.embeddings.float(), new])
    save_expert_head(args.out, ExpertHead(order, weights, vocab_size=model.config.vocab_size,
                                          meta_fingerprint=meta_fingerprint(model.lm_head_weight)))
    Path(str(args.out) + ".log.json").write_text(json.dumps(cfg.log, indent=1))
    print(f"trained rows {names} on {len(keep)} queries; final loss {cfg.log[-1]['loss']:.4f}; wrote {args.out}")


def _name_dir(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"etr: --expert {text!r}: use NAME=DIR")
    return name, path


def _bench_switch(args) -> None:
    from etr.switch_cost import main as run
    run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="etr", description="Expert Token Routing engine")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("import-gguf", help="write an HF checkpoint directory from a GGUF file")
    g.add_argument("src")
    g.add_argument("dest")
    g.add_argument("--dtype", default="float32", help="float32 (default) or bf16")
    g.set_defaults(func=_import_gguf)
    gen = sub.add_parser("generate", help="generate from text prompts")
    gen.add_argument("--model", required=True)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(func=_generate)
    d = sub.add_parser("demo", help="chat with the embedded SmolLM2-135M-Instruct (imported on first use)")
    d.add_argument("--max-tokens", type=int, default=48)
    d.add_argument("--dtype", default="float32")
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=_demo)
    c = sub.add_parser("collect", help="expert query sets by loss gap (Eq. 2-3)")
    c.add_argument("--meta", required=True, help="meta checkpoint directory")
    c.add_argument("--expert", action="append", required=True, help="NAME=DIR, repeat per expert")
    c.add_argument("--data", required=True, help="JSONL of query/response, conversations, or token ids")
    c.add_argument("--tau", type=float, default=0.0, help="margin: L_meta - L_expert must exceed it")
    c.add_argument("--ties", choices=["all", "best"], default="all",
                   help="all: a pair joins every qualifying expert; best: only the largest gap")
    c.add_argument("--per-expert", type=int, default=None, help="down-sample each set to this many pairs")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--chat-template", action="store_true", help="render queries with the meta's chat template")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--max-len", type=int, default=4096)
    c.add_argument("--dtype", default="float32")
    c.add_argument("--device", default="cpu")
    c.add_argument("--out", required=True)
    c.set_defaults(func=_collect)
    t = sub.add_parser("train", help="train expert-token rows on query sets (Eq. 4)")
    t.add_argument("--meta", required=True)
    t.add_argument("--sets", required=True, help="JSONL written by etr collect")
    t.add_argument("--out", required=True, help="head file to write (a training log goes beside it)")
    t.add_argument("--extend", default=None, help="existing head: its rows stay frozen, new experts are added")
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--weight-decay", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-len", type=int, default=4096)
    t.set_defaults(func=_train)
    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    sw = b.add_parser("switch", help="switching cost, paper Table 5 protocol")
    sw.add_argument("--model", default=None, help="meta checkpoint (default: embedded SmolLM2-135M)")
    sw.add_argument("--expert", default=None, help="expert checkpoint (default: the meta's)")
    sw.add_argument("--queries", type=int, default=8)
    sw.add_argument("--new-tokens", type=int, default=128)
    sw.add_argument("--dtype", default="bfloat16")
    sw.add_argument("--device", default="cpu")
    sw.add_argument("--repeats", type=int, default=2, help="each query keeps its best time of this many runs")
    sw.add_argument("--trace", default=None, help="write a Chrome trace of one switched request here")
    sw.add_argument("--json", default=None)
    sw.set_defaults(func=_bench_switch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ETRError as e:
        print(f"etr: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
