"""``etr eval``: answer accuracy and routing accuracy of ETR and its baselines on domain-labelled questions.

Methods (paper Table 2's shape):
  meta    the meta model alone;
  oracle  every question answered by its domain's expert (the meta where a domain has none);
  random  every question pinned to an expert drawn uniformly (seeded);
  router  a trained query classifier picks the model (routing/classifier.py);
  etr     the meta with expert tokens decides, switching inside the engine.
All methods run through the engine: one ``LLM`` holding the meta and every expert, plus, for ``meta``,
the meta without expert rows.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from etr.engine import SamplingParams
from etr.engine.config import META
from etr.errors import ConfigError, TokenizerMissingError
from etr.routing.eval_data import Question, is_correct, prediction
from etr.routing.collect import prompt_ids

METHODS = (META, "oracle", "random", "router", "etr")


@dataclass(slots=True)
class EvalSetup:
    """The checkpoints and settings one evaluation runs with."""
    meta: str
    experts: dict[str, str] = field(default_factory=dict)
    head: str | list[str] | None = None
    domain_expert: dict[str, str] = field(default_factory=dict)  # oracle: domain -> expert (else the meta)
    max_tokens: int = 16
    chat_template: bool = False
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"


@dataclass(slots=True)
class Record:
    """One method's answer to one question, scored."""
    method: str
    index: int
    domain: str
    model: str          # who answered: "meta" or an expert name
    text: str
    prediction: str | None
    correct: bool
    switch_index: int | None = None  # meta tokens before the expert took over (0: it answered all of it)


def expected_model(setup: EvalSetup, domain: str) -> str:
    """The model a question of ``domain`` should reach: its expert, or the meta."""
    return setup.domain_expert.get(domain, META)


def _make_llm(setup: EvalSetup, prompts: list[list[int]], experts: bool, head: bool):
    from etr import LLM
    from etr.engine.attention import block_size_for, resolve_backend
    from etr.options import parse_device
    block = block_size_for(resolve_backend("auto", parse_device(setup.device)), None)
    seqs = min(64, len(prompts))
    longest = max(len(p) for p in prompts) + setup.max_tokens
    # A pool for one full batch of the longest request, not a share of free memory: eval loads two LLMs.
    blocks = seqs * math.ceil(longest / block) + 1
    return LLM(setup.meta, dtype=setup.dtype, device=setup.device, block_size=block, max_num_seqs=seqs,
               num_kv_blocks=blocks, max_model_len=longest + 1,
               experts=setup.experts if experts else None, expert_head=setup.head if head else None)


def routes_for(method: str, setup: EvalSetup, questions: list[Question], classifier=None,
               prompts: list[list[int]] | None = None) -> list[str | None]:
    """Who answers each question: "meta", an expert name, or None (the meta with expert tokens decides)."""
    names = sorted(setup.experts)
    if method == "meta":
        return [META] * len(questions)
    if method == "oracle":
        return [expected_model(setup, q.domain) for q in questions]
    if method == "random":
        rng = random.Random(setup.seed)
        return [rng.choice(names) for _ in questions]
    if method == "router":
        return [c or META for c in classifier.predict(prompts)]
    if method == "etr":
        return [None] * len(questions)
    raise ConfigError(f"unknown method {method!r}; choose from {METHODS}")


def check_methods(methods: list[str], setup: EvalSetup, classifier) -> None:
    """Raise ConfigError before loading anything when a method cannot run with ``setup``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    needs_experts = [m for m in methods if m in ("oracle", "random", "router", "etr")]
    if needs_experts and not setup.experts:
        raise ConfigError(f"method(s) {needs_experts} need experts")
    if "etr" in methods and setup.head is None:
        raise ConfigError("method 'etr' needs an expert head (--head)")
    if "router" in methods and classifier is None:
        raise ConfigError("method 'router' needs a trained classifier (--router)")
    stray = sorted(set(setup.domain_expert.values()) - set(setup.experts))
    if stray:
        raise ConfigError(f"domain map names unknown expert(s) {stray}")


def evaluate(setup: EvalSetup, questions: list[Question], methods: list[str], classifier=None,
             progress: bool = True) -> list[Record]:
    """Greedy answers of every method to every question, scored."""
    from etr.models.tokenizer import load_tokenizer
    check_methods(methods, setup, classifier)
    if not questions:
        raise ConfigError("no questions to evaluate")
    tokenizer = load_tokenizer(setup.meta)
    if tokenizer is None:
        raise TokenizerMissingError(f"{setup.meta} has no tokenizer: evaluation needs text prompts")
    prompts = [prompt_ids(tokenizer, q.prompt, setup.chat_template) for q in questions]
    params = SamplingParams(temperature=0.0, max_tokens=setup.max_tokens)
    llms: dict[str, object] = {}  # "meta" (no expert rows) and "routed" (meta + experts), built when first needed

    def llm(kind: str):
        if kind not in llms:
            llms[kind] = _make_llm(setup, prompts, experts=kind == "routed",
                                   head=kind == "routed" and setup.head is not None)
        return llms[kind]

    records = []
    for method in methods:
        routes = routes_for(method, setup, questions, classifier, prompts)
        texts, models, switches = _run(llm, prompts, routes, params, progress)
        records += [Record(method, i, q.domain, m, t, prediction(q, t), is_correct(q, t), k)
                    for i, (q, t, m, k) in enumerate(zip(questions, texts, models, switches))]
    return records


def _run(llm, prompts, routes, params, progress) -> tuple[list[str], list[str], list[int | None]]:
    texts, models, switches = [""] * len(prompts), [META] * len(prompts), [None] * len(prompts)
    on_meta = [i for i, r in enumerate(routes) if r == META]
    routed = [i for i, r in enumerate(routes) if r != META]
    if on_meta:
        for i, out in zip(on_meta, llm("meta").generate([prompts[i] for i in on_meta], params, use_tqdm=progress)):
            texts[i] = out.text
    if routed:
        outs = llm("routed").generate([prompts[i] for i in routed], params, use_tqdm=progress,
                                      route=[routes[i] for i in routed])
        for i, out in zip(routed, outs):
            texts[i], models[i], switches[i] = out.text, out.expert or META, out.switch_index
    return texts, models, switches


def summarize(records: list[Record], setup: EvalSetup) -> dict:
    """Per method: accuracy (overall and per domain), routing, false routing and the routing confusion counts
    ``{domain: {model: n}}``.

    Routing accuracy is the one definition every report uses: the share of questions of domains that have an
    expert that its expert answered (questions of other domains are false routing's, not routing's).
    ``routing_accuracy`` counts a late switch (the meta wrote part of the answer first) as routed;
    ``routing_accuracy_at_start`` only switches before the first token; ``late_switches`` counts the former.
    """
    out = {}
    for method in dict.fromkeys(r.method for r in records):
        rows = [r for r in records if r.method == method]
        domains = sorted({r.domain for r in rows})
        by_domain = {d: [r for r in rows if r.domain == d] for d in domains}
        general = [r for r in rows if expected_model(setup, r.domain) == META]
        routed = [r for r in rows if expected_model(setup, r.domain) != META]
        confusion = {d: _counts(r.model for r in rs) for d, rs in by_domain.items()}
        out[method] = {
            "accuracy": _mean(r.correct for r in rows),
            "domain_accuracy": {d: _mean(r.correct for r in rs) for d, rs in by_domain.items()},
            "routing_accuracy": routing_accuracy(confusion, setup.domain_expert, sorted({r.domain for r in routed})),
            "routing_accuracy_at_start": _mean(r.model == expected_model(setup, r.domain) and not r.switch_index
                                               for r in routed),
            "late_switches": sum(bool(r.switch_index) for r in rows),
            "false_routing": _mean(r.model != META for r in general) if general else None,
            "confusion": confusion,
            "questions": len(rows),
        }
    return out


def routing_accuracy(confusion: dict, domain_expert: dict, domains: list[str]) -> float:
    """The share of the questions of ``domains`` (each with an expert) that the domain's own expert answered,
    from the confusion counts ``{domain: {model: n}}``: the one definition every report uses."""
    hits = sum(confusion[d].get(domain_expert[d], 0) for d in domains)
    total = sum(sum(confusion[d].values()) for d in domains)
    return hits / total if total else float("nan")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _counts(models) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in models:
        counts[m] = counts.get(m, 0) + 1
    return dict(sorted(counts.items()))


def records_json(records: list[Record]) -> list[dict]:
    """Records as JSON-ready dicts."""
    return [asdict(r) for r in records]


def available_methods(setup: EvalSetup, classifier=None) -> list[str]:
    """Every method the given files allow: the meta always; oracle and random with experts; router with a
    classifier; etr with a head."""
    methods = [META]
    if setup.experts:
        methods += ["oracle", "random"]
    if classifier is not None:
        methods.append("router")
    if setup.head is not None:
        methods.append("etr")
    return methods
