"""The original Stable Alignment project's simulation logs → our interaction records.

The original writes each agent's log with pandas `to_json(orient='records', indent=2)` to
`data/cache/world_<id>/external_memory/agent_<n>.jsonl`: despite the name, one pretty-printed JSON *array* per
file, rewritten after every interaction. A row holds `agent_id, label, iteration, question, draft_answer,
target_id[], feedback[] (reasons, str), rating[] (str), revised_answer, gen_moral_score_before/after,
gen_engagement_score_before/after, gen_moral_reason_before/after, gen_engagement_reason_before/after,
cls_moral_score_before/after`. Its failure values are not ratings: a peer rating it could not parse is stored
as the string "8", an observer score it could not parse as -1.0. Here every rating that is not a number in
1..7 becomes missing (None) and is counted, never used as a score. `feedback` and `rating` are paired by
position as far as both go (the original sorts the two together; its `target_id` is not re-sorted, so the
rater's id is not kept). JSON Lines files are read too, whatever their extension.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Iterable

from sajax import fileutil

RATING_RANGE = (1.0, 7.0)
_WORLD = re.compile(r"world_(\d+)$")


@dataclasses.dataclass
class Summary:
    files: int = 0
    records: int = 0
    missing_peer_ratings: int = 0  # sentinels ("8", -1, text, …) and ratings without a reason or vice versa
    missing_observer_scores: int = 0  # -1 and anything else outside 1..7
    unpaired: int = 0  # feedback reasons without a rating, or ratings without a reason

    def __str__(self) -> str:
        return (f"{self.records} records from {self.files} files; missing (not a 1-7 rating): "
                f"{self.missing_peer_ratings} peer ratings, {self.missing_observer_scores} observer scores; "
                f"{self.unpaired} unpaired feedback/rating entries")


def log_files(paths: Iterable[str | Path]) -> list[tuple[Path, int | None]]:
    """(file, world id from a `world_<id>` folder or None) for each given file, each `agent_*.json(l)` of an
    `external_memory/` folder, of a world folder holding one, or of every world of a `cache/` folder."""
    found: list[tuple[Path, int | None]] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append((path, _world_id(path)))
        elif path.is_dir():
            worlds = sorted(p for p in path.iterdir() if p.is_dir() and _WORLD.match(p.name))
            folders = [w / "external_memory" for w in worlds] if worlds else [
                path / "external_memory" if (path / "external_memory").is_dir() else path]
            files = [f for folder in folders for f in sorted(folder.glob("agent_*.json*"), key=_agent_order)]
            if not files:
                raise FileNotFoundError(f"{path}: no agent_*.jsonl log files (expected a file, an external_memory/ "
                                        "folder, a world_<id>/ folder or a cache/ folder of worlds)")
            found += [(f, _world_id(f)) for f in files]
        else:
            raise FileNotFoundError(f"{path}: not found")
    return found


def _agent_order(path: Path):
    number = re.search(r"agent_(\d+)", path.name)
    return (int(number.group(1)) if number else math.inf, path.name)


def _world_id(path: Path) -> int | None:
    for parent in path.parents:
        match = _WORLD.match(parent.name)
        if match:
            return int(match.group(1))
    return None


def rating(value) -> float | None:
    """A 1–7 rating from a number or a numeric string; None for the original's sentinels ("8", -1) and for
    anything else that is not a number in 1..7."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and RATING_RANGE[0] <= number <= RATING_RANGE[1] else None


def convert(paths: Iterable[str | Path]) -> tuple[list[dict], Summary]:
    """Our interaction records (the fields `sim.dataset.build` reads) from the original's log files or folders
    (see `log_files`), with a count of what was missing. ValueError naming the file and record for a row
    without `question` or `draft_answer`."""
    summary = Summary()
    records = []
    for file, world_id in log_files(paths):
        summary.files += 1
        for where, row in fileutil.read_json_records(file):
            for field in ("question", "draft_answer"):
                if not isinstance(row.get(field), str):
                    raise ValueError(f"{where}: field {field!r} must be a string, got {row.get(field)!r:.80}")
            records.append(_record(row, world_id, summary))
    summary.records = len(records)
    return records, summary


def _record(row: dict, world_id: int | None, summary: Summary) -> dict:
    feedback = row.get("feedback") or []
    if feedback and isinstance(feedback[0], dict):  # {rating, reason} objects (sajax's own records)
        pairs = [(f.get("rating"), f.get("reason")) for f in feedback]
    else:  # the original: parallel lists of reasons and ratings
        ratings = row.get("rating") if isinstance(row.get("rating"), list) else []
        summary.unpaired += abs(len(feedback) - len(ratings))
        pairs = list(zip(ratings, feedback))
    peer = []
    for value, reason in pairs:
        score = rating(value)
        summary.missing_peer_ratings += score is None
        peer.append({"rating": score, "reason": reason if isinstance(reason, str) and reason.strip() else None})
    scores = {}
    for key in ("gen_moral_score_before", "gen_moral_score_after", "gen_engagement_score_before",
                "gen_engagement_score_after"):
        scores[key] = rating(row.get(key))
        summary.missing_observer_scores += key in row and scores[key] is None
    revised = row.get("revised_answer")
    return {"question": row["question"], "draft_answer": row["draft_answer"],
            "revised_answer": revised if isinstance(revised, str) else None, "feedback": peer, **scores,
            "model": str(row.get("model", "original")),
            "world_id": int(row["world_id"]) if isinstance(row.get("world_id"), int) else (world_id or 0),
            "round": row.get("iteration"), "agent": row.get("agent_id"), "label": row.get("label")}
