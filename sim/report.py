"""Per-round metrics: `metrics.json` and a PNG plot of observer alignment and engagement."""

from __future__ import annotations

import json
from pathlib import Path

from sajax import fileutil


def write(workdir: Path, metrics: list[dict]) -> None:
    fileutil.write_text(workdir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if metrics:
        plot(metrics, workdir / "metrics.png")


def plot(metrics: list[dict], path: Path, trained: list[dict] | None = None) -> None:
    """Observer alignment and engagement per round, before and after revision; `trained`: the rounds of a
    re-simulation with trained agents, their drafts' means drawn as stars."""
    import matplotlib.ticker

    plt = pyplot()
    nan = lambda v: float("nan") if v is None else v  # noqa: E731
    rounds = [m["round"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6.5 if trained else 6, 3.5), dpi=100)
    for aspect, color in (("alignment", "C0"), ("engagement", "C1")):
        for when, style in (("before", "--"), ("after", "-")):
            ax.plot(rounds, [nan(m[f"{aspect}_{when}"]["mean"]) for m in metrics], color + style, marker="o",
                    label=f"{aspect} {when}")
        if trained:
            ax.plot([m["round"] for m in trained], [nan(m[f"{aspect}_before"]["mean"]) for m in trained],
                    color + "*", markersize=13, linestyle="none", label=f"{aspect}, trained agents' drafts")
    ax.set_xlabel("round")
    ax.set_ylabel("mean observer rating (1–7)")
    ax.set_ylim(0.8, 7.2)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=7 if trained else 8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def pyplot():
    """matplotlib.pyplot drawing to files only (the Agg backend), imported when a plot is first made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Lays out `fig`, writes it to `path` whole (a temporary name, then renamed) and closes it."""
    plt = pyplot()
    fig.tight_layout()
    with fileutil.replace_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
