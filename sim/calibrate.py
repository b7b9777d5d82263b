"""Calibration of the simulator's raters: do a backend's ratings put aligned answers above misaligned ones?

Pairs are JSONL lines `{"question", "aligned", "misaligned"}` (alignment) or `{"question", "engaging", "dull"}`
(engagement). Every answer is rated by the backend as an observer rates it (`sim.prompts.observe_*`), once per
rating readout. Reported per readout:
- `auc`: P(rating of a better answer > rating of a worse one) over all (better, worse) pairs across questions,
  ties counting one half (the Mann–Whitney statistic); 0.5 is chance;
- `pairwise_accuracy`: the share of questions whose better answer is rated strictly above its worse one;
- `missing`: ratings the readout could not produce (they take no part in the two numbers above).
The built-in sets (`sim/assets/calibration_*.jsonl`) were written for this project.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sajax import fileutil
from sim import prompts
from sim.backends import Request

ASSETS = Path(__file__).with_name("assets")
ALIGNMENT_PAIRS = ASSETS / "calibration_alignment.jsonl"
ENGAGEMENT_PAIRS = ASSETS / "calibration_engagement.jsonl"
ASPECTS = {"alignment": ("aligned", "misaligned"), "engagement": ("engaging", "dull")}


def read_pairs(path: str | Path, aspect: str = "alignment") -> list[dict]:
    """The pairs of a JSONL file; ValueError naming the file and line for a line without the aspect's fields."""
    better, worse = ASPECTS[aspect]
    pairs = []
    for number, row in fileutil.read_jsonl(path):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("question", better, worse)):
            raise ValueError(f"{path} line {number}: expected an object with text fields 'question', '{better}' "
                             f"and '{worse}'")
        pairs.append(row)
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def auc(better: np.ndarray, worse: np.ndarray) -> float:
    """P(b > w) + ½ P(b = w) over all pairs of a better-answer rating b and a worse-answer rating w."""
    b, w = np.asarray(better, np.float64)[:, None], np.asarray(worse, np.float64)[None, :]
    return float(np.mean((b > w) + 0.5 * (b == w)))


def measure(backend, pairs: list[dict], readout: str, aspect: str = "alignment", seed: int = 0) -> dict:
    """Rates both answers of every pair through `readout`; the metrics of the module docstring."""
    better, worse = ASPECTS[aspect]
    build = prompts.observe_alignment if aspect == "alignment" else prompts.observe_engagement
    requests = [Request(build(p["question"], p[side], readout), p["question"], p[side], stage=f"observe_{aspect}")
                for p in pairs for side in (better, worse)]
    start = time.perf_counter()
    ratings = backend.rate(requests, seed)
    seconds = time.perf_counter() - start
    values = np.array([np.nan if r.value is None else r.value for r in ratings]).reshape(len(pairs), 2)
    good, bad = values[:, 0], values[:, 1]
    both = ~np.isnan(good) & ~np.isnan(bad)
    rated_good, rated_bad = good[~np.isnan(good)], bad[~np.isnan(bad)]
    return {"readout": readout, "aspect": aspect, "n": len(pairs),
            "auc": auc(rated_good, rated_bad) if len(rated_good) and len(rated_bad) else None,
            "pairwise_accuracy": float(np.mean(good[both] > bad[both])) if both.any() else None,
            "missing": int(np.isnan(values).sum()),
            "mean_better": float(np.nanmean(good)) if len(rated_good) else None,
            "mean_worse": float(np.nanmean(bad)) if len(rated_bad) else None,
            "seconds": seconds}
