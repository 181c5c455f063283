"""``etr smolexpert build DIR``: Expert Token Routing on a real pretrained chat model. The meta is the
embedded SmolLM2-135M-Instruct (never trained); each expert is the meta fine-tuned on one domain of real facts
(routing/smolexpert/facts.py); then the same pipeline as MiniExpert: query sets by loss gap, expert tokens
with negatives, one domain added later with its row only, the router-classifier baseline, and evaluation
through the engine with the chat template.

DIR gets ``experts/<domain>/`` (ordinary HF checkpoints sharing the meta's tokenizer and chat template),
``data/`` (expert training data, the collection mixture, test and seen questions), ``sets.jsonl``,
``head.safetensors``, ``head_base.safetensors``, ``head_extended.safetensors``, ``router.safetensors``,
``results.md``, ``results.json`` and ``routing.png``; written to ``DIR.partial`` and renamed when complete.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from etr.engine.config import META
from etr.errors import ConfigError
from etr.routing.library import evaluate_library, finish, run_stages, write_heads, write_report
from etr.routing.smolexpert import facts as F


@dataclass(slots=True)
class Profile:
    """Sizes, steps and settings of one SmolExpert build profile (none tuned on a test result)."""
    domains: tuple[str, ...]     # expert domains; the last is added later with its row only (extension)
    max_entities: int | None     # per domain (None: all), before splitting into train, validation and test
    expert_epochs: float         # passes over the expert's pairs (steps = epochs x pairs / batch, rounded up)
    expert_layers: int | None    # top decoder layers fine-tuned (None: the whole model)
    expert_lr: float = 2e-4
    batch_size: int = 16
    collect_per_relation: int = 40   # train facts x train phrasings drawn per relation for the collection
    val_per_relation: int = 20
    test_per_relation: int = 40
    seen_per_domain: int = 24    # trained facts in trained phrasings: did each expert learn its domain?
    general_topics: int | None = None
    tau: float = 1.0             # Eq. 3 margin, in nats summed over the answer
    # The expert tokens' settings: every combination is trained, the best on the validation split is kept.
    head_lrs: tuple[float, ...] = (2e-2, 5e-3, 5e-2)
    head_weight_decays: tuple[float, ...] = (0.1, 1.0)
    head_epochs: tuple[int, ...] = (5, 10)
    max_tokens: int = 16


PROFILES = {
    # Quick: enough steps at a high rate for the top layers to take in 16 entities' facts (CI checks that).
    "quick": Profile(("chemistry", "countries"), max_entities=16, expert_epochs=3, expert_layers=4, expert_lr=1e-3,
                     batch_size=8, collect_per_relation=8, val_per_relation=4, test_per_relation=6,
                     seen_per_domain=12, general_topics=16, head_lrs=(2e-2,), head_epochs=(5,)),
    # Default: the experts' layers and epochs were chosen on validation data with experts that never saw the
    # validation phrasing (bench/smolexpert_layers.py --on val; bench/RESULTS.md): the whole model for 3
    # epochs, over the top 8 layers for 5 and the whole model for 2.
    "default": Profile(("chemistry", "countries", "python"), max_entities=None, expert_epochs=3, expert_layers=None),
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class Build:
    """One build; each stage is a method timed into ``timings``; the fields set in ``__init__`` are what the
    stages hand on (set by the stage named beside each)."""

    def __init__(self, out: Path, profile: str, seed: int, progress: bool, log):
        if profile not in PROFILES:
            raise ConfigError(f"unknown SmolExpert profile {profile!r}; choose from {sorted(PROFILES)}")
        from etr.default_model import default_model_dir
        self.final, self.out = out, out.with_name(out.name + ".partial")
        self.name, self.p, self.seed, self.progress, self.log = profile, PROFILES[profile], seed, progress, log
        self.meta = str(default_model_dir(torch.float32))
        self.experts = list(self.p.domains)
        self.timings: dict[str, float] = {}
        self.splits: dict[str, list[F.Split]] = {}      # data: every relation's facts and phrasings, split
        self.general = F.GeneralSplit([], [], [])        # data: general requests (collection, validation, test)
        self.expert_loss: dict[str, float] = {}          # experts: final training loss per expert
        self.expert_steps: dict[str, int] = {}           # experts: optimizer steps per expert
        self.set_sizes: dict[str, int] = {}              # query sets: pairs per expert, and negatives
        self.set_purity: dict[str, float | None] = {}    # query sets: share from the expert's own domain
        self.validation: list[dict] = []                 # expert tokens: every candidate setting, validated
        self.extension_validation: list[dict] = []       # expert tokens: the same for the extended head's new row
        self.summary: dict = {}                          # evaluation: per-method figures on the test questions
        self.seen: dict = {}                             # evaluation: meta and oracle on trained questions
        self.records: list = []

    # ---- data --------------------------------------------------------------------------------------------

    def data(self) -> None:
        rng = random.Random(self.seed)
        self.splits = {d: F.split_domain(F.DOMAINS[d](), rng, max_entities=self.p.max_entities) for d in self.experts}
        self.general = F.general_split(rng, self.p.general_topics)
        train, collect, val, test, seen = [], [], [], [], []
        for domain, splits in self.splits.items():
            for s in splits:
                rel = s.relation
                # The expert's knowledge: every fact of its domain, in every phrasing but the test one. The
                # phrasing is kept so that the experts' own settings can be chosen on the validation phrasing
                # with experts that never saw it (bench/smolexpert_layers.py --on val).
                train += [{"domain": domain, "query": rel.ask(t, x), "response": a,
                           "phrasing": "val" if t == s.val_template else "train"}
                          for x, a in s.train_facts + s.val_facts + s.test_facts for t in s.expert_templates]
                asked = [(rel.ask(t, x), a) for x, a in s.train_facts for t in s.train_templates]
                collect += [{"domain": domain, "query": q, "response": a}
                            for q, a in rng.sample(asked, min(len(asked), self.p.collect_per_relation))]
                val += self._questions(domain, rng, rel, s.val_facts, s.val_template, self.p.val_per_relation)
                test += self._questions(domain, rng, rel, s.test_facts, s.test_template, self.p.test_per_relation)
            known = [r for r in collect if r["domain"] == domain]  # every relation's share, drawn at random
            seen += [{"domain": domain, "query": r["query"], "answer": r["response"], "match": "word"}
                     for r in rng.sample(known, min(len(known), self.p.seen_per_domain))]
        val += [{"domain": "general", "query": q, "answer": "", "match": "open"} for q in self.general.val]
        test += [{"domain": "general", "query": q, "answer": "", "match": "open"} for q in self.general.test]
        for name, rows in [("train", train), ("collect_experts", collect), ("val", val), ("test", test),
                           ("seen", seen)]:
            _write_jsonl(self.out / "data" / f"{name}.jsonl", rows)

    @staticmethod
    def _questions(domain: str, rng: random.Random, rel: F.Relation, facts: list, template: str, n: int) -> list:
        drawn = rng.sample(facts, min(len(facts), n))
        return [{"domain": domain, "query": rel.ask(template, x), "answer": a, "match": "word"} for x, a in drawn]

    def general_answers(self) -> None:
        """The meta's own answers to the general collection requests: the negatives' responses."""
        from etr import LLM, SamplingParams
        llm = LLM(self.meta, dtype="float32", max_model_len=512, max_num_seqs=32, num_kv_blocks=32 * 32 + 1)
        outs = llm.chat([[{"role": "user", "content": q}] for q in self.general.collect],
                        SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=self.progress)
        rows = [json.loads(line) for line in (self.out / "data" / "collect_experts.jsonl").read_text().splitlines()]
        rows += [{"domain": "general", "query": q, "response": o.text} for q, o in zip(self.general.collect, outs)]
        _write_jsonl(self.out / "data" / "collect.jsonl", rows)

    # ---- models ------------------------------------------------------------------------------------------

    def expert_models(self) -> None:
        from etr.routing.smolexpert.sft import fine_tune
        rows = [json.loads(line) for line in (self.out / "data" / "train.jsonl").read_text().splitlines()]
        for i, domain in enumerate(self.experts):
            pairs = [(r["query"], r["response"]) for r in rows if r["domain"] == domain]
            self.expert_loss[domain], self.expert_steps[domain] = fine_tune(
                self.meta, self.out / "experts" / domain, pairs, self.p.expert_epochs, self.p.expert_lr,
                self.p.batch_size, self.p.expert_layers, self.seed + 1 + i, f"expert {domain}", self.progress)
            self.log(f"[smolexpert] expert {domain}: {len(pairs)} pairs, {self.expert_steps[domain]} steps, "
                     f"final loss {self.expert_loss[domain]:.3f}")

    def expert_dirs(self) -> dict[str, str]:
        return {d: str(self.out / "experts" / d) for d in self.experts}

    # ---- the ETR pipeline --------------------------------------------------------------------------------

    def query_sets(self) -> None:
        from etr.models.tokenizer import load_tokenizer
        from etr.routing import collect
        path = self.out / "data" / "collect.jsonl"
        pairs = collect.load_pairs(path, load_tokenizer(self.meta), chat_template=True)
        labels = [json.loads(line)["domain"] for line in path.read_text().splitlines()]
        losses = collect.checkpoint_losses({META: self.meta, **self.expert_dirs()}, pairs, torch.float32,
                                           batch_size=16, progress=self.progress)
        sets, negative = collect.collect_sets(losses, self.p.tau, "best")
        collect.write_sets(self.out / "sets.jsonl", sets, losses, META, pairs, negative)
        self.log(collect.summary(sets, losses, META, negative))
        self.set_purity = {e: sum(labels[i] == e for i in idx) / len(idx) if idx else None for e, idx in sets.items()}
        self.set_sizes = {e: len(idx) for e, idx in sets.items()} | {"(negatives)": len(negative)}

    def heads(self) -> None:
        """Choose the expert tokens' settings on the validation split (those of the row added later by its extended
        head), then train every head with them."""
        from dataclasses import replace
        from etr.models import load_model
        from etr.models.tokenizer import load_tokenizer
        from etr.routing import collect
        from etr.routing.train import TrainConfig
        from etr.routing.validation import choose_extension_config, choose_head_config, config_grid
        tok = load_tokenizer(self.meta)
        val = [json.loads(line) for line in (self.out / "data" / "val.jsonl").read_text().splitlines()]
        val_ids = [collect.prompt_ids(tok, r["query"], chat_template=True) for r in val]
        grid = config_grid(TrainConfig(seed=self.seed), self.p.head_lrs, self.p.head_weight_decays, self.p.head_epochs)
        model, sets = load_model(self.meta, torch.float32, "cpu"), collect.read_sets(self.out / "sets.jsonl")
        val_experts = [None if r["domain"] == "general" else r["domain"] for r in val]
        chosen, self.validation = choose_head_config(model, sets, self.experts, val_ids, val_experts, grid)
        base, added = self.experts[:-1], self.experts[-1:]
        extension, self.extension_validation = choose_extension_config(model, sets, base, added, chosen, val_ids,
                                                                       val_experts, grid)
        for what, c in (("expert tokens", chosen), (f"{added[0]}'s row added later", extension)):
            self.log(f"[smolexpert] {what}: lr {c.lr}, weight decay {c.weight_decay}, {c.epochs} epochs "
                     f"(best of {len(grid)} on the validation split)")
        write_heads(self.out, self.meta, self.experts, base, lambda: replace(chosen, log=[]), self.seed,
                    lambda: replace(extension, log=[]))

    def evaluate(self) -> None:
        from etr.routing.eval_data import load_exact_jsonl
        from etr.routing.evaluate import EvalSetup, evaluate, summarize
        setup = EvalSetup(self.meta, self.expert_dirs(), str(self.out / "head.safetensors"),
                          {d: d for d in self.experts}, max_tokens=self.p.max_tokens, chat_template=True,
                          seed=self.seed)
        seen = load_exact_jsonl(self.out / "data" / "seen.jsonl")
        self.seen = summarize(evaluate(setup, seen, [META, "oracle"], progress=self.progress), setup)
        self.records = evaluate_library(self.out, setup, load_exact_jsonl(self.out / "data" / "test.jsonl"),
                                        self.progress)
        self.summary = summarize(self.records, setup)

    # ---- the whole build ---------------------------------------------------------------------------------

    def run(self) -> dict:
        run_stages(self.final, self.out, [("data", self.data), ("general answers", self.general_answers),
                                          ("experts", self.expert_models), ("query sets", self.query_sets),
                                          ("expert tokens", self.heads), ("evaluation", self.evaluate)],
                   self.timings, self.log, "smolexpert")
        results = self.write_results()
        finish(self.final, self.out)
        return results

    def write_results(self) -> dict:
        from etr.routing.smolexpert.results import bars, markdown
        results = {"profile": self.name, "seed": self.seed, "meta": self.meta, "settings": asdict(self.p),
                   "timings_s": self.timings, "expert_loss": self.expert_loss, "expert_steps": self.expert_steps,
                   "validation": self.validation, "extension_validation": self.extension_validation,
                   "set_sizes": self.set_sizes,
                   "set_purity": self.set_purity, "seen": self.seen, "summary": self.summary,
                   "bars": bars(self.summary, self.seen, self.experts, self.name)}
        return write_report(self.out, results, markdown(results, self.experts), self.records, self.log)


def build(out_dir: str | Path, profile: str = "default", seed: int = 0, progress: bool = True, log=print) -> dict:
    """Build the library in ``out_dir`` and return the results (also written as results.json)."""
    return Build(Path(out_dir), profile, seed, progress, log).run()
