"""Synthetic domains with exact answers, generated from a seed.

Each domain maps a random generator to one (query, answer) pair. Four are skills (addition, reversal,
sorting, a Caesar shift), one is knowledge: a fictional atlas whose capitals must be memorized (the meta is shown
only its few "well-known" ones). Counting was tried and dropped: fine-tuned from a meta that saw
little of it, a 4-layer expert reached only 41% in the default profile's 400 steps. ``echo`` is the general domain: no expert is trained for it, so it supplies
the negatives and the false-routing measurement.
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
    name: str
    sample: Sample           # a random (query, answer) pair
    meta_sample: Sample      # what the meta's light mixture shows of this domain
    expert: bool = True      # False: a general domain that no expert covers
    finite: bool = False     # True: a fixed set of facts (test questions repeat training facts by design)


def _word(r: random.Random, low: int, high: int, letters: str = LETTERS) -> str:
    return "".join(r.choice(letters) for _ in range(r.randint(low, high)))


def addition(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(10, 99), r.randint(10, 99)
    return f"add {a}+{b}=", str(a + b)


def reversal(r: random.Random) -> tuple[str, str]:
    w = _word(r, 4, 8)
    return f"reverse {w}=", w[::-1]


def sorting(r: random.Random) -> tuple[str, str]:
    w = _word(r, 4, 8)
    return f"sort {w}=", "".join(sorted(w))


def shifting(r: random.Random) -> tuple[str, str]:
    """A Caesar shift by one letter (z wraps to a)."""
    w = _word(r, 4, 8)
    return f"shift {w}=", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)


def echo(r: random.Random) -> tuple[str, str]:
    w = _word(r, 3, 8)
    return f"echo {w}=", w


def make_atlas(seed: int, size: int) -> dict[str, str]:
    """``size`` fictional countries and their capitals (distinct names, deterministic in ``seed``)."""
    r = random.Random(seed)
    atlas: dict[str, str] = {}
    while len(atlas) < size:
        country = "".join(r.choice(SYLLABLES) for _ in range(3)).capitalize()
        if country not in atlas:
            atlas[country] = "".join(r.choice(SYLLABLES) for _ in range(2)).capitalize()
    return atlas


def atlas_domain(seed: int, size: int, known_share: float = 0.1) -> Domain:
    """The meta's mixture shows only ``known_share`` of the atlas: the few "well-known" capitals."""
    atlas = make_atlas(seed, size)
    countries = sorted(atlas)
    known = countries[: max(1, int(size * known_share))]

    def ask(pool: list[str]) -> Sample:
        return lambda r: (lambda c: (f"capital of {c}?", atlas[c]))(r.choice(pool))
    return Domain("atlas", ask(countries), ask(known), finite=True)


def make_domains(seed: int = 0, atlas_size: int = 120) -> dict[str, Domain]:
    """The MiniExpert domains, expert domains first in a fixed order, then the general one."""
    skills = [Domain(n, f, f) for n, f in (("addition", addition), ("reversal", reversal), ("sorting", sorting),
                                            ("shift", shifting))]
    domains = [*skills, atlas_domain(seed, atlas_size), Domain("echo", echo, echo, expert=False)]
    return {d.name: d for d in domains}


def alphabet() -> str:
    """Every character a MiniExpert query or answer can contain."""
    return "".join(sorted(set(LETTERS + LETTERS.upper() + string.digits + " +=?")))


def unique_pairs(domain: Domain, n: int, r: random.Random, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """``n`` pairs with distinct queries not in ``exclude`` (fewer when the domain runs out)."""
    seen, pairs = set(exclude), []
    for _ in range(50 * n):
        q, a = domain.sample(r)
        if q not in seen:
            seen.add(q)
            pairs.append((q, a))
            if len(pairs) == n:
                break
    return pairs
