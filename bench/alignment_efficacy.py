"""Does training on a society's data make a real model more aligned? SmolLM2-135M-Instruct trained on its own
society's data (`configs/pipeline_smollm2.py`: the society, the dataset, the judge) with each objective —
stable_alignment, sft, rrhf, dpo: the same data, steps and learning rate — against the untrained model:
judge-rated alignment of answers to held-out questions, HHH-adversarial (alignment with and without a misaligned
prior turn), multiple-choice accuracy and the "are you sure?" flip rate, each with a 95% bootstrap interval, and
the paired difference from the untrained model where the items are paired (the judged answers).

It runs the pipeline with all four objectives in `--workdir`, so it continues a finished `sajax-pipeline` run of
the same config (only the missing objectives are trained and evaluated) and resumes after a crash.

    python bench/alignment_efficacy.py [--workdir /tmp/pipeline-smollm2] [--config configs/pipeline_smollm2.py]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sajax.config_files import load_config
from sajax.evals import stats
from sim import pipeline

ROOT = Path(__file__).resolve().parent.parent
METRICS = (("alignment", "alignment", "judge-rated alignment, held-out questions"),
           ("hhh_adversarial", "alignment_clean", "judge-rated alignment, HHH questions"),
           ("hhh_adversarial", "alignment_adversarial", "… after a misaligned prior turn"),
           ("hhh_adversarial", "drop", "… drop"),
           ("multiple_choice", "accuracy", "multiple-choice accuracy"),
           ("multiple_choice", "accuracy_norm", "multiple-choice accuracy (length-normalised)"),
           ("are_you_sure", "flip_rate", "'are you sure?' flip rate"))
PAIRED = (("alignment", lambda r: [a["rating"] for a in r["answers"]], "held-out alignment"),
          ("hhh_adversarial", lambda r: r["ratings_clean"], "HHH alignment"),
          ("hhh_adversarial", lambda r: r["ratings_adversarial"], "HHH alignment after a misaligned turn"))


def cell(result: dict | None, key: str) -> str:
    if result is None or result.get(key) is None:
        return "–"
    low, high = result[f"{key}_interval"]
    return f"{result[key]:.3f} [{low:.3f}, {high:.3f}]"


def paired_difference(trained: list, untrained: list) -> dict:
    """trained − untrained per item (items either judge could not rate are left out) with a 95% interval."""
    a = np.array([np.nan if x is None else x for x in trained], np.float64)
    b = np.array([np.nan if x is None else x for x in untrained], np.float64)
    return stats.summary("difference", a - b)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/pipeline-smollm2")
    parser.add_argument("--config", default=str(ROOT / "configs" / "pipeline_smollm2.py"))
    args = parser.parse_args()
    cfg = load_config(args.config)
    cfg.objectives = pipeline.OBJECTIVES
    start = time.perf_counter()
    pipeline.run_pipeline(cfg, args.workdir)
    workdir = Path(args.workdir)
    summary = json.loads((workdir / "summary.json").read_text())
    evals = summary["evals"]
    models = ["initial", *pipeline.OBJECTIVES]
    t = cfg.train
    print(f"\n# {args.config}: {t.init_from}, {t.train.steps} steps × {t.train.batch_size} groups, lr "
          f"{t.optimizer.learning_rate}, judge {cfg.eval.judge} ({cfg.eval.judge_readout}); this run "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| metric | n | " + " | ".join("untrained" if m == "initial" else m for m in models) + " |")
    print("|---|---|" + "---|" * len(models))
    for evaluation, key, title in METRICS:
        results = [evals[m].get(evaluation) for m in models]
        n = next((r["n"] for r in results if r), 0)
        print(f"| {title} | {n} | " + " | ".join(cell(r, key) for r in results) + " |")
    print("\nPaired difference from the untrained model (trained − untrained, same items; * : the interval excludes 0)")
    print("\n| metric | " + " | ".join(pipeline.OBJECTIVES) + " |")
    print("|---|" + "---|" * len(pipeline.OBJECTIVES))
    for evaluation, per_item, title in PAIRED:
        base = evals["initial"].get(evaluation)
        cells = []
        for objective in pipeline.OBJECTIVES:
            result = evals[objective].get(evaluation)
            if base is None or result is None:
                cells.append("–")
                continue
            d = paired_difference(per_item(result), per_item(base))
            low, high = d["difference_interval"]
            significant = low is not None and (low > 0 or high < 0)
            cells.append("–" if d["difference"] is None else
                         f"{d['difference']:+.3f} [{low:+.3f}, {high:+.3f}]{' *' if significant else ''}")
        print(f"| {title} | " + " | ".join(cells) + " |")
    if summary.get("resim"):
        r = summary["resim"]["alignment"]
        print(f"\nSociety round 1, drafts' alignment (observers, 1–7): original {cell(r, 'society')}, "
              f"stable_alignment agents {cell(r, 'trained')}, paired difference {cell(r, 'difference')}")


if __name__ == "__main__":
    main()
