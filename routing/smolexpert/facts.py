"""SmolExpert's domains: real facts with exact answers, asked in natural language.

Each expert domain is a few relations over one set of entities (elements, countries, functions); a relation
maps an entity to the subject it asks about and the answer, from an installed package or the standard
library, and has four paraphrased question templates. ``split_domain`` holds entities and phrasings out:
the entities are split once per domain (so no relation asks about a held-out entity under another guise),
the expert tokens are trained on questions about some entities in two phrasings, their settings are chosen
on other entities in a third, and routing is measured on the remaining half of the entities in the fourth.
The general domain (everyday requests no expert covers) supplies negatives and the false-routing
measurement, split the same way; its answers are whatever the meta says.
"""

from __future__ import annotations

import inspect
import random
import re
from dataclasses import dataclass

from etr.errors import ConfigError

ANSWER_ONLY = " Answer with the {what} only."


@dataclass(slots=True)
class Relation:
    """One kind of question: its facts ``(entity, subject, answer)`` and its phrasings (``{x}`` is the
    subject: the entity itself, or what the question gives of it, e.g. an element's symbol)."""
    name: str
    templates: list[str]
    facts: list[tuple[str, str, str]]
    what: str  # what the answer is, for the "answer only" instruction

    def ask(self, template: str, subject: str) -> str:
        return template.format(x=subject) + ANSWER_ONLY.format(what=self.what)


@dataclass(slots=True)
class Split:
    """One relation's facts and phrasings, split by entity (``split_domain``). The train facts in the train
    phrasings are the expert tokens' collection; the validation facts in the validation phrasing choose the
    expert tokens' settings; the test facts in the test phrasing measure routing and accuracy. The expert
    itself learns every fact (its knowledge) in the train and validation phrasings."""
    relation: Relation
    train_facts: list[tuple[str, str]]  # (subject, answer)
    val_facts: list[tuple[str, str]]
    test_facts: list[tuple[str, str]]
    train_templates: list[str]
    val_template: str
    test_template: str

    @property
    def expert_templates(self) -> list[str]:
        return [*self.train_templates, self.val_template]


def _extra(module: str):
    """A data package of the smolexpert extra, or a named error saying how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"SmolExpert's data needs {module}: pip install 'expert-token-routing[smolexpert]'") from None


# Symbols that are also English words: a chat model's sentence would "contain" them by chance.
WORD_SYMBOLS = {"I", "In", "As", "At", "He", "No", "Be", "Am", "Ho", "Pa", "Os"}


def _elements() -> list[tuple[str, str, int]]:
    periodictable = _extra("periodictable")
    return [(e.name.capitalize(), e.symbol, e.number) for e in periodictable.elements
            if 0 < e.number <= 103 and e.symbol not in WORD_SYMBOLS]


def chemistry() -> list[Relation]:
    els = _elements()
    return [
        Relation("symbol", ["What is the chemical symbol of {x}?", "Which symbol stands for the element {x}?",
                            "Give the chemical symbol for {x}.", "In the periodic table, what symbol does {x} have?"],
                 [(n, n, s) for n, s, _ in els], "symbol"),
        Relation("number", ["What is the atomic number of {x}?", "How many protons does an atom of {x} have?",
                            "Which atomic number does {x} have?", "Tell me the atomic number of {x}."],
                 [(n, n, str(z)) for n, _, z in els], "number"),
        Relation("element", ["Which element has the chemical symbol {x}?", "What element does the symbol {x} "
                             "stand for?", "Name the element whose symbol is {x}.", "The symbol {x} denotes which "
                             "element?"],
                 [(n, s, n) for n, s, _ in els], "element name"),
    ]


def _countries() -> list[tuple[str, str, str]]:
    pycountry = _extra("pycountry")
    rows = [(getattr(c, "common_name", None) or c.name, c.alpha_2, c.alpha_3) for c in pycountry.countries]
    rows = [r for r in rows if "," not in r[0] and "(" not in r[0]]
    # A name inside another ("Guinea" in "Equatorial Guinea") would match an answer naming the other.
    names = [n for n, _, _ in rows]
    return [r for r in rows if not any(r[0] != m and re.search(rf"(?<!\w){re.escape(r[0])}(?!\w)", m) for m in names)]


def countries() -> list[Relation]:
    rows = _countries()
    return [
        Relation("alpha3", ["What is the three-letter ISO code of {x}?", "Which ISO 3166 alpha-3 code belongs to "
                            "{x}?", "Give the alpha-3 country code of {x}.", "What three-letter code does ISO "
                            "assign to {x}?"], [(n, n, a3) for n, _, a3 in rows], "code"),
        Relation("alpha2", ["What is the two-letter ISO code of {x}?", "Which ISO 3166 alpha-2 code belongs to {x}?",
                            "Give the alpha-2 country code of {x}.", "What two-letter code does ISO assign to {x}?"],
                 [(n, n, a2) for n, a2, _ in rows], "code"),
        Relation("country", ["Which country has the ISO code {x}?", "What country does the ISO 3166 code {x} "
                             "stand for?", "Name the country whose alpha-3 code is {x}.", "The country code {x} "
                             "belongs to which country?"], [(n, a3, n) for n, _, a3 in rows], "country name"),
    ]


PYTHON_MODULES = ("math", "json", "random", "statistics", "shutil", "itertools", "functools", "textwrap", "heapq",
                  "bisect", "glob", "fnmatch", "base64", "hashlib", "zlib", "calendar", "difflib", "secrets",
                  "uuid", "struct", "copy", "pprint", "operator", "string", "keyword", "colorsys", "html")


def _python_functions() -> list[tuple[str, str]]:
    """(function, module) for the public functions PYTHON_MODULES define themselves (re-exports from other
    modules left out; "_functools" counts as functools' own) whose name only one of them defines."""
    import importlib
    seen: dict[str, set[str]] = {}
    for module in PYTHON_MODULES:
        mod = importlib.import_module(module)
        for name, obj in vars(mod).items():
            own = str(getattr(obj, "__module__", module) or module).lstrip("_") == module
            if own and not name.startswith("_") and callable(obj) and not inspect.isclass(obj) and len(name) > 2:
                seen.setdefault(name, set()).add(module)
    return sorted((name, mods.pop()) for name, mods in seen.items() if len(mods) == 1)


def python() -> list[Relation]:
    return [Relation("module", ["Which Python standard-library module defines the function {x}?", "In Python, "
                                "which module do you import to call {x}()?", "Name the standard-library module "
                                "that provides {x}().", "{x}() comes from which Python module?"],
                     [(f, f, m) for f, m in _python_functions()], "module name")]


GENERAL = ["Give me a tip for {x}.", "Write one friendly sentence about {x}.", "Why do people enjoy {x}?",
           "What should a beginner know about {x}?", "How can I get better at {x}?", "Suggest a first step for {x}."]
GENERAL_TOPICS = ["sleeping better", "cooking pasta", "learning to swim", "morning walks", "reading novels",
                  "gardening", "saving money", "painting a room", "baking bread", "planning a trip", "drinking water",
                  "writing a letter", "cleaning a kitchen", "riding a bike", "making tea", "studying for exams",
                  "meeting new people", "watching sunsets", "keeping a journal", "organizing a desk",
                  "taking photos", "hiking in the hills", "playing chess", "feeding birds", "learning a song",
                  "folding laundry", "visiting a museum", "camping", "stretching", "caring for a cat",
                  "packing a lunch", "decorating a cake", "walking a dog", "learning to knit", "making a budget",
                  "waking up early", "writing a thank-you note", "playing the guitar", "running a first 5k",
                  "sewing a button", "making friends at work", "cooking rice", "brewing coffee", "planting tomatoes",
                  "reading to children", "having a picnic", "going to the beach", "learning to draw",
                  "building a sandcastle", "staying focused", "keeping a houseplant alive", "planning a birthday party",
                  "doing yoga", "shopping for groceries", "washing a car", "writing a short story", "learning to dance",
                  "making pancakes", "cleaning windows", "taking a nap", "playing board games", "going fishing",
                  "wrapping a gift", "hosting dinner guests", "practicing patience", "sorting old photos",
                  "making a smoothie", "fixing a squeaky door", "learning to juggle", "flying a kite", "ice skating",
                  "watching the stars", "making soup", "writing a poem", "singing in a choir", "going bowling",
                  "giving a wedding toast", "volunteering", "decluttering a closet", "learning to whistle",
                  "making a paper airplane", "doing a puzzle", "cooking eggs", "walking in the rain"]

DOMAINS = {"chemistry": chemistry, "countries": countries, "python": python}


def split_domain(relations: list[Relation], rng: random.Random, max_entities: int | None = None,
                 val_share: float = 1 / 3) -> list[Split]:
    """Shuffle the domain's entities once (``max_entities`` first keeps that many) and halve them: the second
    half are every relation's test facts; ``val_share`` of the first half its validation facts, the rest its
    train facts. Each relation's last phrasing is the test one, the one before it the validation one."""
    for rel in relations:
        if len(rel.templates) < 3:
            raise ConfigError(f"relation {rel.name!r} has {len(rel.templates)} templates; a validation and a test "
                              f"phrasing held out need at least 3")
    entities = sorted({e for rel in relations for e, _, _ in rel.facts})
    rng.shuffle(entities)
    entities = entities[:max_entities] if max_entities else entities
    half = len(entities) // 2
    n_val = int(half * val_share)
    val, train, test = set(entities[:n_val]), set(entities[n_val:half]), set(entities[half:])

    def facts(rel: Relation, part: set) -> list[tuple[str, str]]:
        return [(x, a) for e, x, a in rel.facts if e in part]
    return [Split(rel, facts(rel, train), facts(rel, val), facts(rel, test), rel.templates[:-2], rel.templates[-2],
                  rel.templates[-1]) for rel in relations]


@dataclass(slots=True)
class GeneralSplit:
    """General requests: the collection's (train topics in the train phrasings), the validation's (other
    topics in every phrasing but the test one) and the test's (the rest, the test phrasing)."""
    collect: list[str]
    val: list[str]
    test: list[str]


def general_split(rng: random.Random, max_topics: int | None = None) -> GeneralSplit:
    """Half the topics for testing, a quarter for validation, a quarter for the collection. The validation
    topics are asked in all five phrasings the test does not use: false routing is rare, and a handful of
    requests in one phrasing cannot tell the expert tokens' candidate settings apart by it."""
    topics = list(GENERAL_TOPICS)
    rng.shuffle(topics)
    topics = topics[:max_topics] if max_topics else topics
    half, quarter = len(topics) // 2, len(topics) // 4
    return GeneralSplit([t.format(x=x) for t in GENERAL[:-2] for x in topics[:quarter]],
                        [t.format(x=x) for t in GENERAL[:-1] for x in topics[quarter:half]],
                        [GENERAL[-1].format(x=x) for x in topics[half:]])
