"""Interaction records → the alignment dataset (TFDS; the format in sajax.data.alignment).

Three kinds of data, each an Alpaca-style (instruction, input, output) with a score, grouped per query:
- imitation: instruction = the question; outputs = the draft (scored by observer alignment before revision)
  and the revision (observer alignment after); responses without a score are left out;
- self_critic: instruction = the question + a request to comment on the response's alignment; input = the
  draft; outputs = the peers' reasons, scored by their ratings;
- realignment: instruction = the question + the draft + a request to comment and then revise; output = the
  feedback + "### Revised answer:" + the revision; kept only when observer alignment rose and ends above the
  midpoint of the scale; score = alignment after.
Groups with the same query (the same question asked of several agents, in any round) are merged; a response
already in its group is dropped (the first one is kept, as the original project does). Kinds are sampled in the
ratio `ratios` (5 : 1 : 1 by default) and queries split between train and validation by a hash of the query, so
no query is in both.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from sajax.data import alignment

SELF_CRITIC_REQUEST = "Comment on how well the response below is aligned with shared social values."
REALIGNMENT_REQUEST = ("Comment on how well the response is aligned with shared social values, then write a revised "
                       "response.")
REVISION_MARKER = "### Revised answer:"


def _groups(records: Iterable[dict], midpoint: float) -> dict[tuple[str, str, str], dict]:
    groups: dict[tuple[str, str, str], dict] = {}

    def add(kind, instruction, input_text, response, score, record):
        if response is None or score is None or not str(response).strip():
            return
        key = (kind, instruction, input_text)
        group = groups.setdefault(key, {"responses": [], "scores": [], "model": record.get("model", ""),
                                        "world_id": int(record.get("world_id", 0))})
        text = str(response).strip()
        if text not in group["responses"]:
            group["responses"].append(text)
            group["scores"].append(float(score))

    for r in records:
        question, draft, revision = r["question"], r.get("draft_answer"), r.get("revised_answer")
        before, after = r.get("gen_moral_score_before"), r.get("gen_moral_score_after")
        add("imitation", question, "", draft, before, r)
        add("imitation", question, "", revision, after, r)
        if draft is None:
            continue
        for f in r.get("feedback", []):
            add("self_critic", f"{question}\n{SELF_CRITIC_REQUEST}", draft, f.get("reason"), f.get("rating"), r)
        if revision is not None and before is not None and after is not None and after > before and after > midpoint:
            reasons = " ".join(f["reason"] for f in r.get("feedback", []) if f.get("reason"))
            add("realignment", f"{question}\n\nResponse: {draft}\n\n{REALIGNMENT_REQUEST}", "",
                f"{reasons}\n{REVISION_MARKER}\n{revision}", after, r)
    return groups


def parse_ratios(text: str) -> tuple[int, int, int] | None:
    """'5,1,1' → (5, 1, 1) for imitation, self_critic, realignment; 'all' → None (every group). ValueError naming
    --ratios unless three whole numbers >= 0 with at least one > 0."""
    if text.strip() == "all":
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or not any(int(p) for p in parts):
        raise ValueError(f"--ratios must be three whole numbers >= 0 for imitation,self_critic,realignment (not "
                         f"all zero), or 'all'; got {text!r}")
    return tuple(int(p) for p in parts)


def build(records: list[dict], out_dir: str | Path, *, ratios=(5, 1, 1), validation_percent: int = 10,
          seed: int = 0, rating_scale: float = 7.0, overwrite: bool = False,
          write: bool = True) -> dict[str, dict[str, int]]:
    """Writes the dataset; returns the number of groups per split and kind. `ratios=None` keeps every group.
    `out_dir` is replaced only if it holds a dataset written here, or with `overwrite` (checked first).
    `write=False` checks and counts everything but writes nothing (the other processes of a multi-process job)."""
    if ratios is not None and (len(ratios) != 3 or min(ratios) < 0 or not any(ratios)):
        raise ValueError(f"ratios must be 3 numbers >= 0, not all zero; got {ratios!r}")
    if not 0 <= validation_percent < 100:
        raise ValueError(f"validation_percent must be in 0..99, got {validation_percent}")
    alignment.check_output(out_dir, overwrite)
    groups = _groups(records, midpoint=(1.0 + rating_scale) / 2)
    by_kind = {kind: sorted(k for k in groups if k[0] == kind) for kind in alignment.KINDS}
    weights = dict(zip(alignment.KINDS, ratios or (1, 1, 1)))
    present = [kind for kind in alignment.KINDS if weights[kind] > 0 and by_kind[kind]]
    if not present:
        raise ValueError("no usable interaction records: every response lacks a rating")
    unit = min(len(by_kind[kind]) / weights[kind] for kind in present)
    rng = np.random.default_rng(seed)
    chosen = []
    for kind in present:
        keys = by_kind[kind]
        take = len(keys) if ratios is None else min(len(keys), max(1, int(unit * weights[kind])))
        chosen += [keys[i] for i in sorted(rng.choice(len(keys), size=take, replace=False))]
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    counts = {split: {kind: 0 for kind in alignment.KINDS} for split in splits}
    for kind, instruction, input_text in chosen:
        group = groups[(kind, instruction, input_text)]
        query = alignment.alpaca_query(instruction, input_text)
        split = "validation" if zlib.crc32(query.encode("utf-8")) % 100 < validation_percent else "train"
        splits[split].append({"query": query, "instruction": instruction, "input": input_text,
                              "responses": group["responses"], "scores": group["scores"], "kind": kind,
                              "model": group["model"], "world_id": group["world_id"]})
        counts[split][kind] += 1
    if not splits["train"]:
        raise ValueError("every selected query fell into the validation split; lower validation_percent")
    if write:
        alignment.write_tfds({split: groups for split, groups in splits.items() if groups}, out_dir, overwrite)
    return counts
