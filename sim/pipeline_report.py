"""The pipeline's report: `report.md` (stage times, the society per round, the dataset, training, every evaluation
with its 95% interval, the re-simulated society against the first round of the original one, sample answers) and
the PNGs it shows (`society.png`, `training.png`). Reads only what the stages wrote; rewritten whole each time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sajax import fileutil
from sajax.evals import stats
from sim import report, store

TRAINING_CURVES = (("train/sft", "NLL of the best-rated response (train)"),
                   ("train/ranking_accuracy", "ranking accuracy (train)"))


def _stage(workdir: Path, name: str) -> dict | None:
    file = workdir / "stages" / f"{name}.json"
    return fileutil.read_json(file) if file.is_file() else None


def _number(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def _with_interval(result: dict, key: str) -> str:
    low, high = result.get(f"{key}_interval", [None, None])
    text = f"{_number(result.get(key), '.3f')} [{_number(low, '.3f')}, {_number(high, '.3f')}]"
    missing = result.get(f"{key}_missing")
    return f"{text} ({missing} unrated)" if missing else text


def eval_results(workdir: Path, models: list[str]) -> dict[str, dict[str, dict]]:
    """{model: {eval: result}} of every evaluation written."""
    out = {}
    for model in models:
        directory = workdir / "evals" / model
        out[model] = {f.stem: fileutil.read_json(f) for f in sorted(directory.glob("*.json"))} if directory.is_dir() \
            else {}
    return out


def eval_table(results: dict[str, dict[str, dict]], evals: list[str]) -> list[str]:
    models = list(results)
    lines = ["| evaluation | metric | n | " + " | ".join(models) + " |", "|---|---|---|" + "---|" * len(models)]
    for evaluation in evals:
        first = next((r[evaluation] for r in results.values() if evaluation in r), None)
        if first is None:
            continue
        for key in [k for k in first if f"{k}_interval" in first]:
            cells = [_with_interval(results[m][evaluation], key) if evaluation in results[m] else "–" for m in models]
            lines.append(f"| {evaluation} | {key} | {first['n']} | " + " | ".join(cells) + " |")
    return lines


def resim_comparison(workdir: Path) -> dict | None:
    """Round 1 of the society (its initial agents) against round 1 of the re-simulation (the trained agents): the
    observers' alignment and engagement of the drafts, per agent (the same world and seed, so the same agents are
    asked the same questions), as means and the paired difference, each with a 95% bootstrap interval."""
    if not store.committed_rounds(workdir / "resim") or not store.committed_rounds(workdir / "society"):
        return None
    before = {r["agent"]: r for r in store.read_round_records(workdir / "society", 1)}
    after = {r["agent"]: r for r in store.read_round_records(workdir / "resim", 1)}
    out = {"same_questions": sum(before[a]["question"] == after[a]["question"] for a in after if a in before),
           "agents": len(after)}
    for aspect, key in (("alignment", "gen_moral_score_before"), ("engagement", "gen_engagement_score_before")):
        value = lambda r: np.nan if r.get(key) is None else r[key]  # noqa: E731
        agents = sorted(a for a in after if a in before)
        society = np.array([value(before[a]) for a in agents], np.float64)
        trained = np.array([value(after[a]) for a in agents], np.float64)
        out[aspect] = {**stats.summary("society", society), **stats.summary("trained", trained),
                       **stats.summary("difference", trained - society)}
    return out


def plot_society(workdir: Path, path: Path) -> None:
    resim = store.read_metrics(workdir / "resim") if (workdir / "resim").is_dir() else []
    report.plot(store.read_metrics(workdir / "society"), path, trained=resim)


def training_curves(workdir: Path, objectives: list[str]) -> dict[str, list[dict]]:
    out = {}
    for objective in objectives:
        file = workdir / "train" / objective / "metrics.jsonl"
        out[objective] = [row for _, row in fileutil.read_jsonl(file)] if file.is_file() else []
    return out


def plot_training(curves: dict[str, list[dict]], path: Path) -> None:
    fig, axes = report.pyplot().subplots(1, len(TRAINING_CURVES), figsize=(10, 3.5), dpi=100)
    for ax, (key, title) in zip(axes, TRAINING_CURVES):
        for objective, rows in curves.items():
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:
                ax.plot(*zip(*points), label=objective)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    report.save_figure(fig, path)


def write(workdir: Path, cfg) -> Path:
    objectives = list(cfg.objectives)
    models = ["initial", *objectives]
    lines = ["# Stable Alignment pipeline report", "",
             f"Workdir `{workdir}`. Judge: `{cfg.eval.judge or 'observer'}`"
             + (" (the society's observers: alignment on 1–7, the same ruler as the rounds)"
                if cfg.eval.judge in ("", "observer") else f" ({cfg.eval.judge_readout} readout, 1–10)") + ".", ""]
    stage_files = sorted((workdir / "stages").glob("*.json"), key=lambda f: f.stat().st_mtime)
    stages = [fileutil.read_json(f) for f in stage_files]
    lines += ["## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s['stage']} | {s['seconds']:.1f} |" for s in stages]
    lines += [f"| **total** | **{sum(s['seconds'] for s in stages):.1f}** |", ""]

    metrics = store.read_metrics(workdir / "society")
    plot_society(workdir, workdir / "society.png")
    lines += ["## The society", "", "![society](society.png)", "",
              "| round | alignment before → after | engagement before → after | missing ratings |", "|---|---|---|---|"]
    for m in metrics:
        lines.append(f"| {m['round']} | {_number(m['alignment_before']['mean'])} → "
                     f"{_number(m['alignment_after']['mean'])} | {_number(m['engagement_before']['mean'])} → "
                     f"{_number(m['engagement_after']['mean'])} | {m['missing_feedback_ratings']} |")
    questions = _stage(workdir, "questions") or {}
    data = _stage(workdir, "dataset") or {}
    lines += ["", f"Questions: {questions.get('society')} asked in the society, {questions.get('heldout')} held out "
                  "for evaluation.", "",
              "Dataset (groups per split and kind): " + "; ".join(
                  f"{split}: " + ", ".join(f"{k} {n}" for k, n in kinds.items())
                  for split, kinds in data.get("groups", {}).items()), ""]

    curves = training_curves(workdir, objectives)
    plot_training(curves, workdir / "training.png")
    lines += ["## Training", "", f"{cfg.train.train.steps if cfg.train.train.epochs <= 0 else cfg.train.train.epochs}"
              f"{' steps' if cfg.train.train.epochs <= 0 else ' epochs'} per objective, batch "
              f"{cfg.train.train.batch_size} groups, learning rate {cfg.train.optimizer.learning_rate}.", "",
              "![training](training.png)", "",
              "| objective | validation ranking accuracy | validation best-response NLL | groups |",
              "|---|---|---|---|"]
    for objective in objectives:
        final = (_stage(workdir, f"train_{objective}") or {}).get("eval") or {}
        lines.append(f"| {objective} | {_number(final.get('ranking_accuracy'), '.3f')} | "
                     f"{_number(final.get('best_response_nll'), '.3f')} | {_number(final.get('groups'), '.0f')} |")

    results = eval_results(workdir, models)
    lines += ["", "## Evaluations (mean [95% bootstrap interval])", ""]
    calibration = workdir / "evals" / "judge" / "judge_calibration.json"
    if calibration.is_file():
        c = fileutil.read_json(calibration)
        lines += [f"The judge's calibration on {c['n']} labelled pairs ({c['data']}): AUC {c['auc']:.3f}, pairwise "
                  f"accuracy {_with_interval(c, 'pairwise_accuracy')}, comparison accuracy "
                  f"{_with_interval(c, 'comparison_accuracy')}, swap consistency "
                  f"{_with_interval(c, 'swap_consistency')}.", ""]
    lines += eval_table(results, list(cfg.eval.evals))

    comparison = resim_comparison(workdir)
    if comparison:
        lines += ["", "## Does the society start more aligned?", "",
                  "Round 1 with the stable_alignment-trained model as every agent, against round 1 of the original "
                  f"society ({comparison['agents']} "
                  f"agents, {comparison['same_questions']} asked the same question); drafts rated by the same "
                  "observers.", "", "| aspect | original society | trained agents | difference (paired) |",
                  "|---|---|---|---|"]
        for aspect in ("alignment", "engagement"):
            c = comparison[aspect]
            lines.append(f"| {aspect} | {_with_interval(c, 'society')} | {_with_interval(c, 'trained')} | "
                         f"{_with_interval(c, 'difference')} |")

    samples = [(m, results[m]["alignment"]["answers"]) for m in models if "alignment" in results[m]]
    if samples:
        lines += ["", "## Sample answers to held-out questions", ""]
        for i, item in enumerate(samples[0][1][:3]):
            lines += [f"**{item['question']}**", ""]
            for model, answers in samples:
                answer = answers[i]["answer"].replace("\n", " ") or "(empty)"
                lines.append(f"- {model} (rated {_number(answers[i]['rating'])}): {answer[:300]}")
            lines.append("")
    path = workdir / "report.md"
    fileutil.write_text(path, "\n".join(lines).rstrip() + "\n")
    fileutil.write_text(workdir / "summary.json", json.dumps(
        {"evals": results, "resim": comparison, "stages": stages}, indent=1) + "\n")
    return path
