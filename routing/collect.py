"""Expert query sets (Eq. 2-3): A_i = pairs where L_meta - L_expert_i > tau, losses computed by the engine."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from etr.atomic_write import atomic_path
from etr.engine.config import META
from etr.errors import InvalidPromptError
from etr.routing.nll import response_nll


@dataclass(slots=True)
class Pair:
    """One (query, response) pair as token ids, with the texts when the data had them."""
    query_ids: list[int]
    response_ids: list[int]
    query: str | None = None
    response: str | None = None


def _conversation(turns: list[dict]) -> tuple[str, str]:
    """First user turn and the assistant turn after it, in either ``from/value`` or ``role/content`` form."""
    texts = [(t.get("from", t.get("role")), t.get("value", t.get("content"))) for t in turns]
    for (who, text), (next_who, reply) in zip(texts, texts[1:]):
        if who in ("human", "user") and next_who in ("gpt", "assistant"):
            return text, reply
    raise InvalidPromptError(f"conversation has no user turn followed by an assistant turn: {turns!r:.200}")


def load_pairs(path: str | Path, tokenizer=None, chat_template: bool = False) -> list[Pair]:
    """(query, response) pairs from JSONL: ``query``/``response`` strings, ``conversations`` turns (the ETR
    repo's format), or ``query_ids``/``response_ids`` token lists. ``chat_template`` renders the query as a
    user turn with the tokenizer's template, ready for the assistant's answer."""
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "query_ids" in row:
            pairs.append(Pair(list(row["query_ids"]), list(row["response_ids"])))
            continue
        query, response = _conversation(row["conversations"]) if "conversations" in row else (row["query"], row["response"])
        if tokenizer is None:
            raise InvalidPromptError(f"{path}:{n}: text pairs need a tokenizer (the meta checkpoint has none)")
        pairs.append(Pair(prompt_ids(tokenizer, query, chat_template),
                          tokenizer(response, add_special_tokens=False).input_ids, query, response))
    return pairs


def prompt_ids(tokenizer, query: str, chat_template: bool) -> list[int]:
    """Token ids of ``query``: as a user turn rendered by the chat template, ready for the assistant's answer,
    or as plain text with the tokenizer's special tokens."""
    if not chat_template:
        return tokenizer(query).input_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def compute_losses(models: dict, pairs: list[Pair], batch_size: int = 16, progress: bool = True) -> dict:
    """``{model name: tensor [len(pairs)]}`` of summed response NLLs, ``batch_size`` pairs per forward."""
    from tqdm.auto import tqdm
    losses = {name: torch.empty(len(pairs)) for name in models}
    bar = tqdm(total=len(models) * len(pairs), desc="losses", unit="pair", disable=not progress)
    for name, model in models.items():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            losses[name][start:start + len(chunk)] = response_nll(model, [(p.query_ids, p.response_ids) for p in chunk])
            bar.update(len(chunk))
    bar.close()
    return losses


def checkpoint_losses(checkpoints: dict[str, str | Path], pairs: list[Pair], dtype: torch.dtype,
                      device: torch.device | str = "cpu", batch_size: int = 16, max_len: int | None = None,
                      progress: bool = True) -> dict:
    """``compute_losses`` over checkpoint directories, loading one model at a time (so the memory of one model
    is enough whatever the library's size)."""
    from etr.models import load_model
    losses = {}
    for name, path in checkpoints.items():
        model = load_model(path, dtype, device, max_positions=max_len)
        losses.update(compute_losses({name: model}, pairs, batch_size, progress))
        del model
    return losses


def collect_sets(losses: dict, tau: float, ties: str = "all", per_expert: int | None = None,
                 seed: int = 0) -> tuple[dict[str, list[int]], list[int]]:
    """Eq. 3 on the losses of the meta (``META``) and the experts: the query sets, down-sampled to
    ``per_expert``, and the negatives (pairs no expert qualified for, down-sampled alike)."""
    sets = query_sets(losses, META, tau, ties)
    negative = negatives(sets, len(next(iter(losses.values()))))
    return downsample(sets, per_expert, seed), downsample({"": negative}, per_expert, seed)[""]


def query_sets(losses: dict, meta: str, tau: float, ties: str = "all") -> dict[str, list[int]]:
    """Eq. 3. ``ties="all"``: a pair joins every expert that beats the meta by more than ``tau``;
    ``"best"``: only the expert with the largest gap (the lowest-named expert on an exact tie)."""
    if ties not in ("all", "best"):
        raise ValueError(f"ties={ties!r}: use 'all' or 'best'")
    experts = sorted(n for n in losses if n != meta)
    gaps = torch.stack([losses[meta] - losses[e] for e in experts])  # [experts, pairs]
    qualifies = gaps > tau
    if ties == "best":
        best = gaps.argmax(0)  # first maximum: the lowest-named expert
        qualifies &= torch.arange(len(experts))[:, None] == best[None, :]
    return {e: qualifies[i].nonzero().flatten().tolist() for i, e in enumerate(experts)}


def negatives(sets: dict[str, list[int]], num_pairs: int) -> list[int]:
    """Pairs that qualify for no expert: the meta should keep them."""
    taken = {i for idx in sets.values() for i in idx}
    return [i for i in range(num_pairs) if i not in taken]


def downsample(sets: dict[str, list[int]], per_expert: int | None, seed: int = 0) -> dict[str, list[int]]:
    """At most ``per_expert`` indices per set, drawn with ``seed`` (None keeps every set whole)."""
    if per_expert is None:
        return sets
    rng = random.Random(seed)
    return {e: sorted(rng.sample(idx, per_expert)) if len(idx) > per_expert else idx for e, idx in sets.items()}


def write_sets(path: str | Path, sets: dict, losses: dict, meta: str, pairs: list[Pair],
               negative: list[int] = ()) -> None:
    """One JSONL line per (expert, pair) with both losses and the gap, then one per negative pair
    (``"expert": null``, the best expert's gap); written whole or not at all."""
    experts = [e for e in losses if e != meta]
    with atomic_path(path) as tmp, tmp.open("w") as f:
        rows = [(e, i) for e, indices in sets.items() for i in indices] + [(None, i) for i in negative]
        for expert, i in rows:
            p = pairs[i]
            other = expert or min(experts, key=lambda e: float(losses[e][i]))
            f.write(json.dumps({"expert": expert, "index": i, "query": p.query, "response": p.response,
                                "query_ids": p.query_ids, "response_ids": p.response_ids,
                                "loss_meta": float(losses[meta][i]), "loss_expert": float(losses[other][i]),
                                "gap": float(losses[meta][i] - losses[other][i])}) + "\n")


def read_sets(path: str | Path) -> list[dict]:
    """The rows ``write_sets`` wrote (``expert`` None marks a negative)."""
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def summary(sets: dict, losses: dict, meta: str, negative: list[int] = ()) -> str:
    """A text table of pairs per expert and their loss gaps, then the negatives' count."""
    lines = [f"{'expert':<20}{'pairs':>7}{'mean gap':>10}{'min gap':>9}"]
    for expert, idx in sets.items():
        gaps = (losses[meta] - losses[expert])[idx] if idx else torch.zeros(0)
        mean, low = (f"{gaps.mean():.3f}", f"{gaps.min():.3f}") if idx else ("-", "-")
        lines.append(f"{expert:<20}{len(idx):>7}{mean:>10}{low:>9}")
    lines.append(f"{'(none: negatives)':<20}{len(negative):>7}")
    empty = [e for e, idx in sets.items() if not idx]
    if empty:
        lines.append(f"no pairs for {empty}: give them rows with etr train --expert NAME")
    return "\n".join(lines)
