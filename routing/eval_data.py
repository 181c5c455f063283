"""Evaluation questions: MMLU-Expert multiple choice (CSV) and exact-answer JSONL, with their scoring.

MMLU-Expert (the paper's benchmark) is one headerless CSV per domain — question, A, B, C, D, answer — as the
MMLU release ships its ``*_test.csv`` files; the domain is the file name without ``_test``. The prompt is
MMLU's zero-shot one, and the prediction is the first standalone A-D letter of the model's answer.
Exact-answer JSONL (``{"domain", "query", "answer"}`` per line) scores the whole stripped answer; with
``"match": "word"`` the answer must appear in the text as a whole word (a chat model's sentence around it is
allowed), and with ``"match": "open"`` the question has no gold answer (only routing is measured on it).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from etr.errors import ConfigError

CHOICES = "ABCD"
HEADER = ["question", "A", "B", "C", "D", "answer"]
_LETTER = re.compile(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])")


@dataclass(slots=True)
class Question:
    """One evaluation question with its domain and gold answer."""
    domain: str
    prompt: str   # what the model is asked (before any chat template)
    answer: str   # gold letter (multiple choice) or gold text (exact, word)
    kind: str     # "choice", "exact", "word" or "open" (see the module docstring)


def mmlu_prompt(domain: str, question: str, options: list[str]) -> str:
    """MMLU's zero-shot multiple-choice prompt for one question."""
    subject = domain.replace("_", " ")
    lines = [f"The following is a multiple choice question about {subject}.", "", question.strip()]
    lines += [f"{letter}. {text.strip()}" for letter, text in zip(CHOICES, options)]
    return "\n".join(lines + ["Answer:"])


def load_mmlu_csv(path: str | Path, domain: str | None = None) -> list[Question]:
    """Questions of one MMLU-style CSV (headerless, or with the header question,A,B,C,D,answer)."""
    path = Path(path)
    domain = domain or path.stem.removesuffix("_test")
    questions = []
    with path.open(newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if n == 1 and row == HEADER:
                continue
            if len(row) != 6 or row[5].strip() not in CHOICES:
                raise ConfigError(f"{path}:{n}: expected question,A,B,C,D,answer with answer in A-D, got {row!r:.120}")
            questions.append(Question(domain, mmlu_prompt(domain, row[0], row[1:5]), row[5].strip(), "choice"))
    return questions


def load_exact_jsonl(path: str | Path) -> list[Question]:
    """Questions of an exact-answer JSONL file (``domain``, ``query``, ``answer`` per line)."""
    questions = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            missing = {"domain", "query", "answer"} - set(row)
            if missing:
                raise ConfigError(f"{path}:{n}: missing key(s) {sorted(missing)}")
            kind = row.get("match", "exact")
            if kind not in ("exact", "word", "open"):
                raise ConfigError(f"{path}:{n}: match {kind!r}: use 'exact', 'word' or 'open'")
            questions.append(Question(row["domain"], row["query"], str(row["answer"]), kind))
    return questions


def load_questions(path: str | Path) -> list[Question]:
    """A directory of MMLU-style CSVs, one CSV file, or an exact-answer JSONL file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files:
            raise ConfigError(f"{path} holds no *.csv files")
        return [q for f in files for q in load_mmlu_csv(f)]
    if not path.exists():
        raise ConfigError(f"no such evaluation data: {path}")
    questions = load_mmlu_csv(path) if path.suffix == ".csv" else load_exact_jsonl(path)
    if not questions:
        raise ConfigError(f"{path} holds no questions")
    return questions


def extract_choice(text: str) -> str | None:
    """The first standalone A-D letter in ``text`` ("B", "(C)", "D." count; the "A" of "Answer" does not)."""
    match = _LETTER.search(text)
    return match.group(1) if match else None


def prediction(question: Question, text: str) -> str | None:
    """What is scored: the extracted letter (multiple choice), the gold answer when the text has it as a whole
    word (word), nothing (open), else the stripped answer."""
    if question.kind == "choice":
        return extract_choice(text)
    if question.kind == "word":
        return question.answer if _has_word(text, question.answer) else text.strip()
    return None if question.kind == "open" else text.strip()


def _has_word(text: str, word: str) -> bool:
    return bool(word) and re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text) is not None


def is_correct(question: Question, text: str) -> bool:
    """Whether ``text`` answers ``question`` correctly (never for an open question)."""
    return question.kind != "open" and prediction(question, text) == question.answer


def first_per_domain(questions: list[Question], limit: int) -> list[Question]:
    """The first ``limit`` questions of each domain, in their order."""
    seen: dict[str, int] = {}
    kept = []
    for q in questions:
        seen[q.domain] = seen.get(q.domain, 0) + 1
        if seen[q.domain] <= limit:
            kept.append(q)
    return kept
