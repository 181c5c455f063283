"""SmolExpert's domains: real facts with exact answers, asked in natural language.

Each expert domain is a few relations; a relation is a table of (subject, answer) facts from an installed
package or the standard library, and several paraphrased question templates. ``split`` holds facts and
phrasings out: the expert tokens are trained on some facts asked with some templates, and routing is measured
on the other facts asked with the other templates. The general domain (everyday requests no expert covers)
supplies negatives and the false-routing measurement; its answers are whatever the meta says.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass

from etr.errors import ConfigError

ANSWER_ONLY = " Answer with the {what} only."


@dataclass(slots=True)
class Relation:
    """One kind of question: its facts and its phrasings (``{x}`` is the subject)."""
    name: str
    templates: list[str]
    facts: list[tuple[str, str]]
    what: str  # what the answer is, for the "answer only" instruction

    def ask(self, template: str, subject: str) -> str:
        return template.format(x=subject) + ANSWER_ONLY.format(what=self.what)


@dataclass(slots=True)
class Split:
    """One relation's facts and templates, split: ``train`` (the experts' data and the expert tokens'
    collection), ``test`` (routing and accuracy: unseen facts asked in unseen phrasings)."""
    relation: Relation
    train_facts: list[tuple[str, str]]
    test_facts: list[tuple[str, str]]
    train_templates: list[str]
    test_templates: list[str]


def _extra(module: str):
    """A data package of the smolexpert extra, or a named error saying how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"SmolExpert's data needs {module}: pip install 'expert-token-routing[smolexpert]'") from None


def _elements() -> list[tuple[str, str, int]]:
    periodictable = _extra("periodictable")
    return [(e.name.capitalize(), e.symbol, e.number) for e in periodictable.elements if 0 < e.number <= 103]


def chemistry() -> list[Relation]:
    els = _elements()
    return [
        Relation("symbol", ["What is the chemical symbol of {x}?", "Which symbol stands for the element {x}?",
                            "Give the chemical symbol for {x}.", "In the periodic table, what symbol does {x} have?"],
                 [(n, s) for n, s, _ in els], "symbol"),
        Relation("number", ["What is the atomic number of {x}?", "How many protons does an atom of {x} have?",
                            "Which atomic number does {x} have?", "Tell me the atomic number of {x}."],
                 [(n, str(z)) for n, _, z in els], "number"),
        Relation("element", ["Which element has the chemical symbol {x}?", "What element does the symbol {x} "
                             "stand for?", "Name the element whose symbol is {x}.", "The symbol {x} denotes which "
                             "element?"],
                 [(s, n) for n, s, _ in els], "element name"),
    ]


def _countries() -> list[tuple[str, str, str]]:
    pycountry = _extra("pycountry")
    rows = [(getattr(c, "common_name", None) or c.name, c.alpha_2, c.alpha_3) for c in pycountry.countries]
    return [r for r in rows if "," not in r[0] and "(" not in r[0]]


def countries() -> list[Relation]:
    rows = _countries()
    return [
        Relation("alpha3", ["What is the three-letter ISO code of {x}?", "Which ISO 3166 alpha-3 code belongs to "
                            "{x}?", "Give the alpha-3 country code of {x}.", "What three-letter code does ISO "
                            "assign to {x}?"], [(n, a3) for n, _, a3 in rows], "code"),
        Relation("alpha2", ["What is the two-letter ISO code of {x}?", "Which ISO 3166 alpha-2 code belongs to {x}?",
                            "Give the alpha-2 country code of {x}.", "What two-letter code does ISO assign to {x}?"],
                 [(n, a2) for n, a2, _ in rows], "code"),
        Relation("country", ["Which country has the ISO code {x}?", "What country does the ISO 3166 code {x} "
                             "stand for?", "Name the country whose alpha-3 code is {x}.", "The country code {x} "
                             "belongs to which country?"], [(a3, n) for n, _, a3 in rows], "country name"),
    ]


PYTHON_MODULES = ("math", "json", "random", "statistics", "shutil", "itertools", "functools", "textwrap", "heapq",
                  "bisect", "glob", "fnmatch", "base64", "hashlib", "zlib", "calendar", "difflib", "secrets",
                  "uuid", "struct", "copy", "pprint", "operator", "string", "keyword", "colorsys", "html")


def _python_functions() -> list[tuple[str, str]]:
    """(function, module) for the public functions of PYTHON_MODULES whose name only one of them defines."""
    import importlib
    seen: dict[str, set[str]] = {}
    for module in PYTHON_MODULES:
        mod = importlib.import_module(module)
        for name, obj in vars(mod).items():
            if not name.startswith("_") and callable(obj) and not inspect.isclass(obj) and len(name) > 2:
                seen.setdefault(name, set()).add(module)
    return sorted((name, mods.pop()) for name, mods in seen.items() if len(mods) == 1)


def python() -> list[Relation]:
    return [Relation("module", ["Which Python standard-library module defines the function {x}?", "In Python, "
                                "which module do you import to call {x}()?", "Name the standard-library module "
                                "that provides {x}().", "{x}() comes from which Python module?"],
                     _python_functions(), "module name")]


GENERAL = ["Give me a tip for {x}.", "Write one friendly sentence about {x}.", "Why do people enjoy {x}?",
           "Suggest a first step for {x}."]
GENERAL_TOPICS = ["sleeping better", "cooking pasta", "learning to swim", "morning walks", "reading novels",
                  "gardening", "saving money", "painting a room", "baking bread", "planning a trip", "drinking water",
                  "writing a letter", "cleaning a kitchen", "riding a bike", "making tea", "studying for exams",
                  "meeting new people", "watching sunsets", "keeping a journal", "organizing a desk",
                  "taking photos", "hiking in the hills", "playing chess", "feeding birds", "learning a song",
                  "folding laundry", "visiting a museum", "camping", "stretching", "caring for a cat",
                  "packing a lunch", "decorating a cake"]

DOMAINS = {"chemistry": chemistry, "countries": countries, "python": python}


def split_relation(rel: Relation, rng: random.Random, test_templates: int = 1,
                   max_facts: int | None = None) -> Split:
    """Shuffle and halve the facts (``max_facts`` first keeps that many); the last ``test_templates`` phrasings
    are held out."""
    if len(rel.templates) <= test_templates:
        raise ConfigError(f"relation {rel.name!r} has {len(rel.templates)} templates; {test_templates} held out "
                          f"leaves none to train on")
    facts = list(rel.facts)
    rng.shuffle(facts)
    facts = facts[:max_facts] if max_facts else facts
    half = len(facts) // 2
    return Split(rel, facts[:half], facts[half:], rel.templates[:-test_templates], rel.templates[-test_templates:])


def general_split(rng: random.Random, max_topics: int | None = None) -> tuple[list[str], list[str]]:
    """General requests for collection (training phrasings, half the topics) and for testing (the rest)."""
    topics = list(GENERAL_TOPICS)
    rng.shuffle(topics)
    topics = topics[:max_topics] if max_topics else topics
    half = len(topics) // 2
    train = [t.format(x=x) for t in GENERAL[:-1] for x in topics[:half]]
    test = [GENERAL[-1].format(x=x) for x in topics[half:]]
    return train, test
