"""Preference data in the format of TRL and the Hugging Face hub: rows of `prompt` / `chosen` / `rejected`, in JSON
Lines, a JSON list or Parquet, each read as a 2-response group (chosen rated above rejected).

Both of TRL's forms are read (its "explicit prompt" preference type):
  standard        {"prompt": "text", "chosen": "text", "rejected": "text"}
  conversational  {"prompt": [{"role": "user", "content": "…"}, …], "chosen": [{"role": "assistant",
                   "content": "…"}], "rejected": [{"role": "assistant", "content": "…"}]}
A standard prompt is the group's `query` text as it is (TRL prepends it to the completion, no template) and its
user turn under `data.prompt_format` chat. A conversational prompt may hold a system message and earlier turns and
ends with the user's; it reaches the model through the tokenizer's chat template (chat), or as "role: content"
paragraphs in `query` (query). Ratings: the optional numeric columns `score_chosen` / `score_rejected`
(UltraFeedback's), else `scores` (the top and bottom of the rating scale by default), and chosen must be rated
above rejected. Every row is checked on reading; an error names the file, the row (0-based, as `datasets` counts
them) and the field.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from sajax import fileutil

FIELDS = ("prompt", "chosen", "rejected")
SUFFIXES = (".json", ".jsonl", ".parquet")
ROLES = ("system", "user", "assistant")


class PreferenceError(ValueError):
    """A row cannot be read; the message names the file, row and field (`GroupSource` reports it as DataError)."""


def is_preference_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a preference file: Parquet, or JSON / JSONL whose first object has `chosen` and
    `rejected` (the release format has `responses` instead)."""
    path = Path(path)
    if not path.is_file() or path.suffix not in SUFFIXES:
        return False
    if path.suffix == ".parquet":
        return True
    records = fileutil.read_json_records(path)
    return bool(records) and {"chosen", "rejected"} <= set(records[0][1])


def read_groups(path: str | os.PathLike, scores: tuple[float, float] = (7.0, 1.0)) -> list[tuple[str, dict]]:
    """(where, group) of every row: group = {query, instruction, input, responses: [chosen, rejected],
    scores: [chosen's, rejected's]} plus `messages` (the prompt's (role, content) turns) for conversational rows.
    `scores`: the ratings of rows without score columns. PreferenceError naming the file, row and field."""
    path = Path(path)
    if path.suffix == ".parquet":
        rows = [(f"{path} row {i}", row) for i, row in enumerate(_parquet_rows(path))]
    else:
        try:
            rows = [(where.replace(" record ", " row "), row) for where, row in fileutil.read_json_records(path)]
        except ValueError as e:
            raise PreferenceError(str(e)) from e
    if not rows:
        raise PreferenceError(f"{path}: no rows")
    return [(where, _group(row, where, scores)) for where, row in rows]


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's ArrowInvalid / OSError for a damaged or foreign file
        raise PreferenceError(f"{path}: not a readable Parquet file ({e})") from e
    missing = [f for f in FIELDS if f not in table.column_names]
    if missing:
        raise PreferenceError(f"{path}: no column {missing[0]!r} (a preference file has columns {', '.join(FIELDS)}; "
                              f"this one has {', '.join(table.column_names)})")
    return table.to_pylist()


def _group(row: dict, where: str, default_scores: tuple[float, float]) -> dict:
    for field in FIELDS:
        if field not in row:
            raise PreferenceError(f"{where}: missing field {field!r}")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise PreferenceError(f"{where}: field 'prompt' must be a non-empty string or a list of messages")
        group = {"query": prompt, "instruction": prompt, "input": "",
                 "responses": [_text(row["chosen"], where, "chosen"), _text(row["rejected"], where, "rejected")]}
    else:
        turns = _messages(prompt, where, "prompt")
        if turns[-1][0] != "user":
            raise PreferenceError(f"{where}: field 'prompt[{len(turns) - 1}].role' is {turns[-1][0]!r}; a prompt ends "
                                  "with the user's turn")
        group = {"query": "\n\n".join(f"{role}: {content}" for role, content in turns),
                 "instruction": turns[-1][1], "input": "", "messages": turns,
                 "responses": [_reply(row["chosen"], where, "chosen"), _reply(row["rejected"], where, "rejected")]}
    group["scores"] = _scores(row, where, default_scores)
    return group


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PreferenceError(f"{where}: field {field!r} must be a non-empty string (the prompt is text), got "
                              f"{value!r:.80}")
    return value


def _messages(value, where: str, field: str) -> list[tuple[str, str]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise PreferenceError(f"{where}: field {field!r} must be a non-empty string or list of messages, got "
                              f"{value!r:.80}")
    turns = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise PreferenceError(f"{where}: field '{field}[{i}]' must be an object with 'role' and 'content', "
                                  f"got {message!r:.80}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise PreferenceError(f"{where}: field '{field}[{i}].role' must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise PreferenceError(f"{where}: field '{field}[{i}].content' must be a non-empty string, got "
                                  f"{content!r:.80}")
        turns.append((role, content))
    return turns


def _reply(value, where: str, field: str) -> str:
    """The assistant's reply of a conversational `chosen` / `rejected`: one assistant message."""
    turns = _messages(value, where, field)
    if len(turns) != 1 or turns[0][0] != "assistant":
        raise PreferenceError(f"{where}: field {field!r} must hold one assistant message (the reply to the prompt), "
                              f"got roles {[role for role, _ in turns]}")
    return turns[0][1]


def _scores(row: dict, where: str, default: tuple[float, float]) -> list[float]:
    if "score_chosen" not in row and "score_rejected" not in row:
        return list(default)
    scores = []
    for field in ("score_chosen", "score_rejected"):
        value = row.get(field)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise PreferenceError(f"{where}: field {field!r} must be a finite number, got {value!r:.80}")
        scores.append(float(value))
    if not scores[0] > scores[1]:
        raise PreferenceError(f"{where}: field 'score_chosen' ({scores[0]:g}) must be above 'score_rejected' "
                              f"({scores[1]:g})")
    return scores
