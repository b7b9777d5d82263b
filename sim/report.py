"""Per-round metrics: `metrics.json` and a PNG plot of observer alignment and engagement."""

from __future__ import annotations

import json
from pathlib import Path

from sajax import fileutil


def write(workdir: Path, metrics: list[dict]) -> None:
    fileutil.write_text(workdir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if metrics:
        plot(metrics, workdir / "metrics.png")


def plot(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rounds = [m["round"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, style in (("alignment_before", "C0--"), ("alignment_after", "C0-"), ("engagement_before", "C1--"),
                       ("engagement_after", "C1-")):
        values = [m[key]["mean"] for m in metrics]
        ax.plot(rounds, [float("nan") if v is None else v for v in values], style, marker="o",
                label=key.replace("_", " "))
    ax.set_xlabel("round")
    ax.set_ylabel("mean observer rating (1–7)")
    ax.set_ylim(0.8, 7.2)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with fileutil.replace_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
