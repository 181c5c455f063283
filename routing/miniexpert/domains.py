"""Synthetic domains with exact answers, generated from a seed.

Each domain maps a random generator to one (query, answer) pair. Two are skills (word reversal, sorting
letters), three are tables to learn: multiplication (a 2-digit number by a digit) and two fictional fact
tables (an atlas of capitals, a register of inventors); the meta is shown only a tenth of each table.
``echo`` is the general domain: no expert is trained for it, so it supplies the negatives and the
false-routing measurement.

Tried and dropped (default profile, seed 0): 2-digit addition as a skill (the expert reached 97% from one
meta and 12-19% from another after 400-700 steps: too fickle for a library that must build the same way
every time), counting a letter (an expert fine-tuned from a meta that saw little of it reached only 41% in
400 steps) and a Caesar shift (the meta learned it from its light mixture alone, 100%: a copy task like echo).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
SYLLABLES = ["ka", "lo", "mi", "ru", "ve", "sa", "to", "ne", "qui", "zor", "bel", "dan", "fy", "gor", "hal",
             "jin", "pe", "wu", "tri", "os"]
Sample = Callable[[random.Random], tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Domain:
    """A named generator of (query, answer) pairs, and what the meta's mixture shows of it.

    A fact table's facts are split in two: ``collect_sample`` asks about one part (the queries the expert
    tokens and the router baseline train on), ``test_sample`` about the other, so routing is measured on
    questions no trained routing part has seen; the expert learns every fact (``sample``: its knowledge). A
    skill has no such split: its test queries are kept out of every training and collection draw instead.
    """
    name: str
    sample: Sample           # a random (query, answer) pair: what the expert is fine-tuned on
    meta_sample: Sample      # what the meta's light mixture shows of this domain
    expert: bool = True      # False: a general domain that no expert covers
    finite: bool = False     # True: a fixed set of facts, split between collection and test
    collect_sample: Sample | None = None  # None: ``sample``
    test_sample: Sample | None = None     # None: ``sample``

    def for_collection(self) -> Sample:
        return self.collect_sample or self.sample

    def for_test(self) -> Sample:
        return self.test_sample or self.sample


def _word(r: random.Random, low: int, high: int, letters: str = LETTERS) -> str:
    return "".join(r.choice(letters) for _ in range(r.randint(low, high)))


def times_table(low: int = 11, high: int = 29) -> dict[str, str]:
    """Products of a 2-digit number in [low, high] by a digit 2-9: arithmetic facts to learn."""
    return {f"{a}*{b}": str(a * b) for a in range(low, high + 1) for b in range(2, 10)}


def reversal(r: random.Random) -> tuple[str, str]:
    """Reverse a word of 4-8 letters."""
    w = _word(r, 4, 8)
    return f"reverse {w}=", w[::-1]


def sorting(r: random.Random) -> tuple[str, str]:
    """Sort the letters of a word of 4-8 letters."""
    w = _word(r, 4, 8)
    return f"sort {w}=", "".join(sorted(w))


def echo(r: random.Random) -> tuple[str, str]:
    """Repeat a word (the general domain)."""
    w = _word(r, 3, 8)
    return f"echo {w}=", w


def make_table(seed: int, size: int, key_syllables: int = 3, value_syllables: int = 2) -> dict[str, str]:
    """``size`` fictional names and their values, e.g. countries and capitals (distinct keys, deterministic)."""
    r = random.Random(seed)
    table: dict[str, str] = {}
    while len(table) < size:
        key = "".join(r.choice(SYLLABLES) for _ in range(key_syllables)).capitalize()
        if key not in table:
            table[key] = "".join(r.choice(SYLLABLES) for _ in range(value_syllables)).capitalize()
    return table


def fact_domain(name: str, question: str, table: dict[str, str], seed: int, known_share: float = 0.1,
                test_share: float = 0.5) -> Domain:
    """Questions ``question.format(key)`` about a fact table; the meta's mixture shows only ``known_share``
    of it (the few "well-known" facts). A seeded ``test_share`` of the keys is asked only at test time."""
    keys = sorted(table)
    known = keys[: max(1, int(len(keys) * known_share))]
    shuffled = random.Random(seed).sample(keys, len(keys))
    cut = int(len(keys) * test_share)
    test, collect = sorted(shuffled[:cut]), sorted(shuffled[cut:])

    def ask(pool: list[str]) -> Sample:
        return lambda r: (lambda k: (question.format(k), table[k]))(r.choice(pool))
    return Domain(name, ask(keys), ask(known), finite=True, collect_sample=ask(collect), test_sample=ask(test))


def make_domains(seed: int = 0, facts: int = 120) -> dict[str, Domain]:
    """The MiniExpert domains, expert domains first in a fixed order, then the general one."""
    skills = [Domain(n, f, f) for n, f in (("reversal", reversal), ("sorting", sorting))]
    knowledge = [fact_domain("multiplication", "mul {}=", times_table(), seed),
                 fact_domain("atlas", "capital of {}?", make_table(seed, facts), seed + 1),
                 fact_domain("inventors", "who made the {}?", make_table(seed + 1000, facts, 2, 3), seed + 2)]
    domains = [*skills, *knowledge, Domain("echo", echo, echo, expert=False)]
    return {d.name: d for d in domains}


def alphabet() -> str:
    """Every character a MiniExpert query or answer can contain."""
    return "".join(sorted(set(LETTERS + LETTERS.upper() + string.digits + " *=?")))


def unique_pairs(sample: Sample, n: int, r: random.Random, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """``n`` pairs of ``sample`` with distinct queries not in ``exclude`` (fewer when it runs out)."""
    seen, pairs = set(exclude), []
    for _ in range(50 * n):
        q, a = sample(r)
        if q not in seen:
            seen.add(q)
            pairs.append((q, a))
            if len(pairs) == n:
                break
    return pairs
