"""Intervals for per-item scores."""

from __future__ import annotations

import numpy as np


def bootstrap_interval(values, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` [n]: the (1−c)/2 and (1+c)/2 quantiles of the means
    of `resamples` resamples of n items drawn with replacement (seeded, so a result is reproducible)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        raise ValueError("no items to build an interval from")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def summary(name: str, values) -> dict:
    """{name: mean, name_interval: [low, high]} (95% bootstrap) of per-item scores. NaN marks an item without a
    score (a judge that could not rate it): such items are left out and counted in `name_missing` (present only
    when there are some); with none left, the mean and interval are None."""
    values = np.asarray(values, np.float64)
    present = values[~np.isnan(values)]
    out = {name: float(present.mean()) if present.size else None,
           f"{name}_interval": list(bootstrap_interval(present)) if present.size else [None, None]}
    if present.size < values.size:
        out[f"{name}_missing"] = int(values.size - present.size)
    return out


def auc(positives, negatives) -> float:
    """P(a positive scores above a negative) + ½ P(tie): the Mann–Whitney AUC over every (positive, negative)."""
    pos, neg = np.asarray(positives, np.float64)[:, None], np.asarray(negatives, np.float64)[None, :]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("AUC needs at least one positive and one negative")
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))
