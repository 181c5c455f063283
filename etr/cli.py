"""The ``etr`` command line: import-gguf, generate, serve, demo, collect, train, router, eval, miniexpert, smolexpert,
bench."""

from __future__ import annotations

import argparse
import sys
import time

from etr.errors import ConfigError, ETRError

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
    experts = dict(_name_dir(e) for e in args.expert or [])
    devices = dict(_name_dir(e, "--expert-device", "NAME=DEVICE") for e in args.expert_device or [])
    llm = LLM(args.model, dtype=args.dtype, device=args.device, attention_backend=args.attention_backend,
              fused_ops=args.fused_ops, experts=experts or None, expert_head=args.expert_head,
              expert_devices=devices or None, **placement_options(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outs = llm.generate(args.prompt, params)
    for prompt, out in zip(args.prompt, outs):
        routed = f", expert {out.expert} from token {out.switch_index}" if out.expert else ""
        print(f"### {prompt}\n{out.text}\n[{len(out.token_ids)} tokens, {out.finish_reason}{routed}]")


def _serve(args) -> None:
    from etr import AsyncLLM
    from etr.server import run_server
    experts = dict(_name_dir(e) for e in args.expert or [])
    llm = AsyncLLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                   max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting, num_kv_blocks=args.num_kv_blocks,
                   mixed_batches={"auto": None, "on": True, "off": False}[args.mixed_batches], experts=experts or None, expert_head=args.expert_head, **placement_options(args))
    print(f"etr: serving {args.served_model_name or args.model} on http://{args.host}:{args.port}", flush=True)
    run_server(llm, args.host, args.port, args.served_model_name, args.log_level)


def _demo(args) -> None:
    _demo_routing(args.per_domain)
    _demo_chat(args)


def _demo_routing(per_domain: int) -> None:
    """Expert Token Routing on the MiniExpert quick library: who answered each held-out question, from which
    token, and what the switch cost."""
    import json
    from etr import LLM, SamplingParams
    from etr.default_model import miniexpert_demo_dir
    print("Expert Token Routing on MiniExpert (a meta and five experts trained here; built once, then cached)")
    lib = miniexpert_demo_dir()
    results = json.loads((lib / "results.json").read_text())
    experts = results["skill_domains"] + results["fact_domains"]
    llm = LLM(str(lib / "meta"), dtype="float32", experts={e: str(lib / "experts" / e) for e in experts},
              expert_head=str(lib / "head.safetensors"))
    rows = [json.loads(line) for line in (lib / "data" / "test.jsonl").read_text().splitlines()]
    picked = [r for d in [*experts, "echo"] for r in [r for r in rows if r["domain"] == d][:per_domain]]
    outs = llm.generate([r["query"] for r in picked], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    print(f"\n{'domain':<15}{'question':<28}{'answered by':<16}{'from token':<12}{'answer':<14}{'right':<7}"
          f"{'switch prefill':>14}")
    for r, o in zip(picked, outs):
        who = o.expert or "meta"
        at = "-" if o.switch_index is None else str(o.switch_index)
        cost = f"{o.metrics.switch_prefill_s * 1e3:.1f} ms" if o.expert else "-"
        ok = "yes" if o.text.strip() == r["answer"] else "no"
        print(f"{r['domain']:<15}{r['query']:<28}{who:<16}{at:<12}{o.text.strip():<14}{ok:<7}{cost:>14}")
    etr = results["summary"]["etr"]
    print(f"\nbuild seed 0, all {etr['questions']} held-out questions: routing accuracy "
          f"{100 * etr['routing_accuracy']:.1f}%, false routing on echo {100 * etr['false_routing']:.1f}%, "
          f"accuracy {100 * etr['accuracy']:.1f}% (meta alone {100 * results['summary']['meta']['accuracy']:.1f}%)")


def _demo_chat(args) -> None:
    from etr import LLM, SamplingParams
    from etr.default_model import default_model_dir
    from etr.options import parse_dtype
    import torch
    print("\nSmolLM2-135M-Instruct chat (the embedded model)")
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
    from etr.engine.config import META
    from etr.models.tokenizer import load_tokenizer
    from etr.options import parse_device, parse_dtype
    from etr.routing import collect
    device = parse_device(args.device)
    experts = dict(_name_dir(x) for x in args.expert)
    pairs = collect.load_pairs(args.data, load_tokenizer(args.meta), args.chat_template)
    losses = collect.checkpoint_losses({META: args.meta, **experts}, pairs, parse_dtype(args.dtype, device), device,
                                       args.batch_size, args.max_len)
    sets, negative = collect.collect_sets(losses, args.tau, args.ties, args.per_expert, args.seed)
    collect.write_sets(args.out, sets, losses, META, pairs, negative)
    print(collect.summary(sets, losses, META, negative))
    print(f"wrote {args.out}")


def _train(args) -> None:
    import json
    from pathlib import Path
    import torch
    from etr.models import load_model
    from etr.models.expert_head import load_expert_head, save_expert_head
    from etr.routing.collect import read_sets
    from etr.routing.report import pct
    from etr.routing.train import TrainConfig, train_head
    rows = read_sets(args.sets)
    old = load_expert_head(args.extend) if args.extend else None
    model = load_model(args.meta, torch.float32, "cpu", max_positions=args.max_len)
    cfg = TrainConfig(lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size, epochs=args.epochs,
                      seed=args.seed)
    head, held = train_head(model, rows, args.expert or [], old, args.negatives, args.holdout, cfg)
    save_expert_head(args.out, head)
    Path(str(args.out) + ".log.json").write_text(json.dumps({"steps": cfg.log, "held_out": held}, indent=1))
    new = head.names[len(old.names) if old else 0:]
    n_neg = sum(r["expert"] is None for r in rows) if args.negatives else 0
    print(f"trained rows {new} ({n_neg} negatives); final loss {cfg.log[-1]['loss']:.4f}; wrote {args.out}")
    if held:
        print(f"held out {held['positives']} + {held['negatives']} negatives: routing accuracy "
              f"{pct(held['routing_accuracy'])}%, false routing {pct(held['false_routing'])}%")


def _router(args) -> None:
    import torch
    from etr.models import load_model
    from etr.routing.classifier import save_classifier, train_router
    from etr.routing.collect import read_sets
    rows = read_sets(args.sets)
    if not rows:
        raise SystemExit(f"etr: {args.sets} holds no query sets")
    model = load_model(args.meta, torch.float32, "cpu", max_positions=args.max_len)
    clf = train_router(model, rows, args.seed)
    save_classifier(args.out, clf)
    print(f"router classifier over {clf.classes} trained on {len(rows)} queries; wrote {args.out}")


def _eval(args) -> None:
    from pathlib import Path
    from etr.routing import report
    from etr.routing.eval_data import first_per_domain, load_questions
    from etr.routing.evaluate import EvalSetup, available_methods, evaluate, records_json, summarize
    experts = dict(_name_dir(x) for x in args.expert or [])
    domain_map = {d: e for d, e in (_name_dir(x) for x in args.domain_map or [])}
    questions = load_questions(args.data)
    if args.limit:
        questions = first_per_domain(questions, args.limit)
    domains = sorted({q.domain for q in questions})
    domain_map = domain_map or {d: d for d in domains if d in experts}
    setup = EvalSetup(args.meta, experts, args.head, domain_map, args.max_tokens, args.chat_template, args.seed,
                      args.dtype, args.device)
    classifier = None
    if args.router:
        import torch
        from etr.models import load_model
        from etr.routing.classifier import load_classifier
        classifier = load_classifier(args.router)
        classifier.model = load_model(args.meta, torch.float32, "cpu")
    methods = args.methods.split(",") if args.methods else available_methods(setup, classifier)
    records = evaluate(setup, questions, methods, classifier)
    summary = summarize(records, setup)
    print(report.markdown(summary))
    setup_json = {"meta": setup.meta, "experts": experts, "head": setup.head, "domain_expert": domain_map,
                  "data": args.data}
    wrote = report.write_eval(Path(args.out), summary, {"setup": setup_json, "summary": summary,
                                                         "records": records_json(records)})
    print(f"wrote {', '.join(str(w) for w in wrote)}")


def _miniexpert(args) -> int:
    from etr.routing.miniexpert.build import build
    return _report_build(args, build(args.dir, args.profile, args.seed, progress=not args.no_progress))


def _smolexpert(args) -> int:
    from etr.routing.smolexpert.build import build
    return _report_build(args, build(args.dir, args.profile, args.seed, progress=not args.no_progress))


def _report_build(args, results: dict) -> int:
    """Print a library build's outcome; exit status 1 when a bar failed."""
    failed = [b for b in results["bars"] if not b["holds"]]
    print(f"wrote {args.dir} in {results['timings_s']['total']:.0f} s; bars held: "
          f"{len(results['bars']) - len(failed)}/{len(results['bars'])}")
    for b in failed:
        print(f"etr: bar failed: {b['bar']} (measured {b['value']})", file=sys.stderr)
    return 1 if failed else 0


def placement_options(args) -> dict:
    """expert_placement / ray_address options from --expert-placement NAME=local|ray and --ray-address."""
    placement = dict(_name_dir(e, "--expert-placement", "NAME=local|ray") for e in args.expert_placement or [])
    return {"expert_placement": placement, "ray_address": args.ray_address}


def _add_placement_options(parser) -> None:
    parser.add_argument("--expert-placement", action="append", metavar="NAME=local|ray",
                        help="run that expert in a Ray actor (ray) or in this process (local, the default)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: a running one, "
                                                            "else a local one)")


def _name_dir(text: str, flag: str = "--expert", form: str = "NAME=DIR") -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"etr: {flag} {text!r}: use {form}")
    return name, path


BENCH_SCRIPTS = {"switch": "switch_cost.py", "decode": "decode.py"}


def _bench_script(args) -> int:
    """Run the bench/ script of ``etr bench NAME`` (benchmarks live in bench/, which only a source checkout has)
    with these options."""
    import subprocess
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "bench" / BENCH_SCRIPTS[args.bench]
    if not script.exists():
        raise ConfigError(f"etr bench {args.bench} runs {script}, which this installation lacks: benchmarks live "
                          "in bench/ of a source checkout (pip install -e .)")
    return subprocess.call([sys.executable, str(script), *_forward(args.parser, args)])


def _forward(parser: argparse.ArgumentParser, args) -> list[str]:
    """The command line that gives ``parser`` the values in ``args`` (options only)."""
    argv = []
    for action in parser._actions:
        value = getattr(args, action.dest, None) if action.option_strings else None
        if value is None or action.dest == "help":
            continue
        for v in (value if isinstance(value, list) else [value]):
            argv += [action.option_strings[0], str(v)]
    return argv


DTYPE_HELP = "float32, bfloat16 (bf16), float16 or auto (bfloat16 on CUDA, float32 on the CPU)"


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that names an option's default where it has a real one (not None, not an off flag)."""
    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if action.option_strings and not action.required and not (default is None or default is False
                                                                  or default is argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """Subcommand parsers: ``--help`` shows each option's default."""
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``etr`` argument parser with every subcommand."""
    p = argparse.ArgumentParser(prog="etr", description="Expert Token Routing engine")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("import-gguf", help="write an HF checkpoint directory from a GGUF file")
    g.add_argument("src", help="GGUF file")
    g.add_argument("dest", help="checkpoint directory to write")
    g.add_argument("--dtype", default="float32", help="float32 or bf16")
    g.set_defaults(func=_import_gguf)
    gen = sub.add_parser("generate", help="generate from text prompts")
    gen.add_argument("--model", required=True, help="meta checkpoint directory")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    gen.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    gen.add_argument("--attention-backend", default="auto", choices=["auto", "flash", "triton", "torch"],
                     help="auto: flash if importable on CUDA, else triton on CUDA, else torch")
    gen.add_argument("--fused-ops", action="store_true", help="Triton add+RMSNorm, rotary and SiLU-mul")
    gen.add_argument("--expert", action="append", help="NAME=DIR, repeat per expert")
    gen.add_argument("--expert-head", action="append", help="expert head file(s) (rows for the experts)")
    gen.add_argument("--expert-device", action="append", help="NAME=DEVICE: put that expert on another device")
    _add_placement_options(gen)
    gen.set_defaults(func=_generate)
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the serve extra)")
    sv.add_argument("--model", required=True, help="meta checkpoint directory (also the model id by default)")
    sv.add_argument("--expert", action="append", help="NAME=DIR, repeat per expert")
    sv.add_argument("--expert-head", action="append", help="expert head file(s) (rows for the experts)")
    sv.add_argument("--served-model-name", default=None, help="model id clients use (default: --model as given)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind")
    sv.add_argument("--port", type=int, default=8000, help="port to bind")
    sv.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    sv.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    sv.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: the "
                                                                    "model's, capped at 4096)")
    sv.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together per model")
    sv.add_argument("--max-waiting", type=int, default=1024, help="requests queued beyond those; more get 503")
    sv.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks per model "
                                                                    "(default: sized from free memory)")
    sv.add_argument("--mixed-batches", choices=["auto", "on", "off"], default="auto",
                    help="on: arrivals are prefilled in the running requests' decode step; off: a step either "
                         "prefills or decodes; auto: on for CUDA, off for the CPU")
    sv.add_argument("--log-level", default="warning", help="uvicorn's log level")
    _add_placement_options(sv)
    sv.set_defaults(func=_serve)
    d = sub.add_parser("demo", help="Expert Token Routing on the MiniExpert quick library (built on first use), "
                                    "then a chat with the embedded SmolLM2-135M-Instruct (imported on first use)")
    d.add_argument("--per-domain", type=int, default=2, help="held-out questions shown per domain")
    d.add_argument("--max-tokens", type=int, default=48, help="new tokens per answer at most")
    d.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    d.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    d.set_defaults(func=_demo)
    c = sub.add_parser("collect", help="expert query sets by loss gap (Eq. 2-3)")
    c.add_argument("--meta", required=True, help="meta checkpoint directory")
    c.add_argument("--expert", action="append", required=True, help="NAME=DIR, repeat per expert")
    c.add_argument("--data", required=True, help="JSONL of query/response, conversations, or token ids")
    c.add_argument("--tau", type=float, default=0.0, help="margin: L_meta - L_expert must exceed it")
    c.add_argument("--ties", choices=["all", "best"], default="all",
                   help="all: a pair joins every qualifying expert; best: only the largest gap")
    c.add_argument("--per-expert", type=int, default=None, help="down-sample each set to this many pairs")
    c.add_argument("--seed", type=int, default=0, help="for --per-expert down-sampling")
    c.add_argument("--chat-template", action="store_true", help="render queries with the meta's chat template")
    c.add_argument("--batch-size", type=int, default=16, help="pairs per loss forward")
    c.add_argument("--max-len", type=int, default=4096, help="longer query+response pairs are skipped")
    c.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    c.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    c.add_argument("--out", required=True, help="query-set JSONL to write")
    c.set_defaults(func=_collect)
    t = sub.add_parser("train", help="train expert-token rows on query sets (Eq. 4)")
    t.add_argument("--meta", required=True, help="meta checkpoint directory")
    t.add_argument("--sets", required=True, help="JSONL written by etr collect")
    t.add_argument("--out", required=True, help="head file to write (a training log goes beside it)")
    t.add_argument("--extend", default=None, help="existing head: its rows stay frozen, new experts are added")
    t.add_argument("--expert", action="append", metavar="NAME",
                   help="give NAME a row even when the sets hold no query for it (it learns to stay unpicked)")
    t.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    t.add_argument("--weight-decay", type=float, default=1.0, help="AdamW weight decay")
    t.add_argument("--batch-size", type=int, default=16, help="queries per step")
    t.add_argument("--epochs", type=int, default=5, help="passes over the query sets")
    t.add_argument("--seed", type=int, default=0, help="shuffling, holdout and row initialisation")
    t.add_argument("--max-len", type=int, default=4096, help="longer queries are skipped")
    t.add_argument("--negatives", action=argparse.BooleanOptionalAction, default=True,
                   help="train pairs no expert qualified for with the meta's own first token")
    t.add_argument("--holdout", type=float, default=0.1,
                   help="share of each expert's (and the negatives') queries held out to report routing")
    t.set_defaults(func=_train)
    r = sub.add_parser("router", help="train the router-classifier baseline on query sets")
    r.add_argument("--meta", required=True, help="meta checkpoint directory (its features feed the classifier)")
    r.add_argument("--sets", required=True, help="JSONL written by etr collect (negatives become class 'meta')")
    r.add_argument("--out", required=True, help="classifier file to write")
    r.add_argument("--seed", type=int, default=0, help="shuffling and initialisation")
    r.add_argument("--max-len", type=int, default=4096, help="longer queries are skipped")
    r.set_defaults(func=_router)
    e = sub.add_parser("eval", help="accuracy and routing accuracy of ETR and baselines")
    e.add_argument("--meta", required=True, help="meta checkpoint directory")
    e.add_argument("--expert", action="append", help="NAME=DIR, repeat per expert")
    e.add_argument("--head", default=None, help="expert head file (enables method etr)")
    e.add_argument("--router", default=None, help="classifier file from etr router (enables method router)")
    e.add_argument("--data", required=True,
                   help="directory of MMLU-style CSVs (question,A,B,C,D,answer), one CSV, or exact-answer JSONL")
    e.add_argument("--domain-map", action="append", help="DOMAIN=EXPERT for the oracle (default: same names)")
    e.add_argument("--methods", default=None, help="comma list of meta,oracle,random,router,etr (default: all "
                                                   "that the given files allow)")
    e.add_argument("--limit", type=int, default=None, help="first N questions of each domain")
    e.add_argument("--max-tokens", type=int, default=16, help="new tokens per answer at most")
    e.add_argument("--chat-template", action="store_true", help="render questions with the meta's chat template")
    e.add_argument("--seed", type=int, default=0, help="for random routing")
    e.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    e.add_argument("--out", required=True, help="directory for eval.md, eval.json and routing.png")
    e.set_defaults(func=_eval)
    mx = sub.add_parser("miniexpert", help="the MiniExpert library").add_subparsers(dest="action", required=True,
                                                                                  parser_class=_Parser)
    mb = mx.add_parser("build", help="train a meta and domain experts here, then collect, train, extend, evaluate")
    mb.add_argument("dir", help="output directory (must not exist or be empty)")
    mb.add_argument("--profile", choices=["quick", "default"], default="default",
                    help="quick: <= 3 min, for tests; default: <= 15 min, the bars' profile")
    mb.add_argument("--seed", type=int, default=0, help="data, initialisation and training order")
    mb.add_argument("--no-progress", action="store_true", help="no progress bars")
    mb.set_defaults(func=_miniexpert)
    sx = sub.add_parser("smolexpert", help="the SmolExpert library (SmolLM2-135M-Instruct and real-data "
                                           "experts)").add_subparsers(dest="action", required=True, parser_class=_Parser)
    sb = sx.add_parser("build", help="fine-tune SmolLM2 experts on real facts here, then collect, train, extend, "
                                     "evaluate with the chat template")
    sb.add_argument("dir", help="output directory (must not exist or be empty)")
    sb.add_argument("--profile", choices=["quick", "default"], default="default",
                    help="quick: 2 domains, a few facts and steps, for tests (checks only that the experts learned "
                         "what they were taught); default: 3 domains, the bars' profile")
    sb.add_argument("--seed", type=int, default=0, help="fact splits, sampling and training order")
    sb.add_argument("--no-progress", action="store_true", help="no progress bars")
    sb.set_defaults(func=_smolexpert)
    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True, parser_class=_Parser)
    sw = b.add_parser("switch", help="switching cost, paper Table 5 protocol (runs bench/switch_cost.py)")
    sw.add_argument("--model", default=None, help="meta checkpoint (default: embedded SmolLM2-135M)")
    sw.add_argument("--expert", default=None, help="expert checkpoint (default: the meta's)")
    sw.add_argument("--queries", type=int, default=8, help="prompts, each run in both conditions")
    sw.add_argument("--new-tokens", type=int, default=128, help="tokens generated per query")
    sw.add_argument("--dtype", default="bfloat16", help=DTYPE_HELP)
    sw.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    sw.add_argument("--repeats", type=int, default=2, help="each query keeps its best time of this many runs")
    sw.add_argument("--trace", default=None, help="write a Chrome trace of one switched request here")
    sw.add_argument("--json", default=None, help="also write the figures here as JSON")
    _add_placement_options(sw)
    sw.set_defaults(func=_bench_script, parser=sw)
    de = b.add_parser("decode", help="time decode steps of one model; --profile writes a Chrome trace with the "
                                     "engine's phases named (runs bench/decode.py)")
    de.add_argument("--model", default=None, help="checkpoint (default: embedded SmolLM2-135M)")
    de.add_argument("--batch", type=int, default=1, help="requests decoded together")
    de.add_argument("--context", type=int, default=32, help="prompt tokens per request")
    de.add_argument("--steps", type=int, default=16, help="decode steps timed (and profiled)")
    de.add_argument("--dtype", default="bfloat16", help=DTYPE_HELP)
    de.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    de.add_argument("--profile", default=None, help="write a Chrome trace of the steps here; print the top ops "
                                                    "by self time and the time per engine phase")
    de.add_argument("--top", type=int, default=15, help="ops printed by self time (with --profile)")
    de.set_defaults(func=_bench_script, parser=de)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; named errors print one line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0  # a subcommand may return its own exit status (1: a bar failed)
    except ETRError as e:
        print(f"etr: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
