"""Multiple choice by log-likelihood, as lm-evaluation-harness scores it: each choice's summed log-likelihood as the
reply to the question; `accuracy` when the highest one is the correct choice, `accuracy_norm` when the highest
log-likelihood per character of the choice is (harness's `acc_norm`).

Data, detected from the content:
- BIG-bench task JSON (`hhh_alignment`, or `sajax_social_choices`, our own built-in set): {"examples": [{"input",
  "target_scores": {choice: score}}]}, the correct choice the one of highest score;
- HH-RLHF JSONL: lines {"chosen", "rejected"}, each a "\\n\\nHuman: …\\n\\nAssistant: …" dialogue; the two share
  everything up to their last "\\n\\nAssistant:", the chosen reply is correct. Pairs whose two replies are equal
  carry no choice and are left out (counted).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sajax.evals import stats

BUILT_IN = Path(__file__).resolve().parent.parent / "assets" / "sajax_social_choices.json"


@dataclasses.dataclass(frozen=True)
class Question:
    conversation: tuple[tuple[str, str], ...]  # (role, text) turns ending with the user's
    choices: tuple[str, ...]
    answer: int  # index of the correct choice


@dataclasses.dataclass(frozen=True)
class Questions:
    items: list[Question]
    source: str
    left_out: int = 0  # HH-RLHF pairs with equal replies


def read(path: str | Path) -> Questions:
    """The questions in `path` (BIG-bench task JSON or HH-RLHF JSONL). ValueError naming the file, line and field
    when one is malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{path}: empty file")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and not {"chosen", "rejected"} & set(whole):  # (one HH-RLHF line is JSON too)
        return _big_bench(whole, path)
    return _hh_rlhf(text, path)


def _big_bench(task: dict, path: Path) -> Questions:
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"{path}: a JSON object needs a non-empty 'examples' list (BIG-bench task format)")
    items = []
    for i, example in enumerate(examples):
        where = f"{path}: examples[{i}]"
        if not isinstance(example, dict) or not isinstance(example.get("input"), str):
            raise ValueError(f"{where}: needs a string 'input'")
        scores = example.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2 or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
            raise ValueError(f"{where}: 'target_scores' must map at least two choices to numbers")
        best = max(scores.values())
        if list(scores.values()).count(best) != 1:
            raise ValueError(f"{where}: 'target_scores' has no single best choice")
        choices = tuple(scores)
        items.append(Question((("user", example["input"]),), choices, choices.index(
            next(c for c, v in scores.items() if v == best))))
    return Questions(items, str(path))


_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_dialogue(text: str, where: str) -> list[tuple[str, str]]:
    """ "\\n\\nHuman: a\\n\\nAssistant: b" → [("user", "a"), ("assistant", "b")]."""
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"{where}: expected '\\n\\nHuman: …\\n\\nAssistant: …' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [(roles[name], body.strip()) for name, body in zip(parts[1::2], parts[2::2])]


def _hh_rlhf(text: str, path: Path) -> Questions:
    items, left_out = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg}); expected a BIG-bench task JSON object or HH-RLHF "
                             "JSONL lines") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("chosen", "rejected")):
            raise ValueError(f"{where}: needs string fields 'chosen' and 'rejected' (HH-RLHF)")
        chosen, rejected = (parse_dialogue(row[k], f"{where}: '{k}'") for k in ("chosen", "rejected"))
        for key, turns in (("chosen", chosen), ("rejected", rejected)):
            if turns[-1][0] != "assistant":
                raise ValueError(f"{where}: '{key}' must end with an Assistant turn")
        if chosen[:-1] != rejected[:-1]:
            raise ValueError(f"{where}: 'chosen' and 'rejected' differ before their last Assistant turn")
        if chosen[-1][1] == rejected[-1][1]:
            left_out += 1
            continue
        items.append(Question(tuple(chosen[:-1]), (chosen[-1][1], rejected[-1][1]), 0))
    if not items:
        raise ValueError(f"{path}: no questions")
    return Questions(items, str(path), left_out)


def choice_loglikelihoods(model, questions: Sequence[Question]) -> list[np.ndarray]:
    """Each question's choices' summed log-likelihoods (one model call over every choice of every question)."""
    flat = [(q.conversation, c) for q in questions for c in q.choices]
    scores = model.loglikelihoods([c for c, _ in flat], [t for _, t in flat])
    out, start = [], 0
    for q in questions:
        out.append(scores[start:start + len(q.choices)])
        start += len(q.choices)
    return out


def evaluate(model, questions: Questions) -> dict:
    """{eval, n, left_out, accuracy, accuracy_norm (each with a 95% bootstrap interval)}."""
    scores = choice_loglikelihoods(model, questions.items)
    correct = [float(np.argmax(s) == q.answer) for q, s in zip(questions.items, scores)]
    per_char = [s / np.array([max(len(c), 1) for c in q.choices]) for q, s in zip(questions.items, scores)]
    correct_norm = [float(np.argmax(s) == q.answer) for q, s in zip(questions.items, per_char)]
    return {"eval": "multiple_choice", "data": questions.source, "n": len(questions.items),
            "left_out": questions.left_out, **stats.summary("accuracy", correct),
            **stats.summary("accuracy_norm", correct_norm)}
