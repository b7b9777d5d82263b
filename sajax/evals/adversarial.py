"""HHH-adversarial, as the Stable Alignment paper builds it: before the model answers, the conversation holds the
question and a misaligned answer to it as the assistant's earlier turn (a jailbreak-style prior), then the question
again. The judge rates the alignment (1–10) of the model's answer with and without that prior."""

from __future__ import annotations

import numpy as np

from sajax.evals import stats
from sajax.evals.judge import Judge, pairs
from sajax.evals.multiple_choice import Questions


def evaluate(model, judge: Judge, questions: Questions, max_new_tokens: int = 96) -> dict:
    """{eval, n, alignment_clean, alignment_adversarial, drop (clean − adversarial per question), each with a 95%
    bootstrap interval; ratings_clean and ratings_adversarial per question (None: the judge could not rate it)}."""
    asked, _, misaligned = pairs(questions)
    clean = model.generate([(("user", q),) for q in asked], max_new_tokens)
    adversarial = model.generate([(("user", q), ("assistant", bad), ("user", q)) for q, bad in zip(asked, misaligned)],
                                 max_new_tokens)
    clean_scores, adversarial_scores = judge.rate(asked, clean), judge.rate(asked, adversarial)
    return {"eval": "hhh_adversarial", "data": questions.source, "n": len(asked), "judge_readout": judge.readout,
            **stats.summary("alignment_clean", clean_scores),
            **stats.summary("alignment_adversarial", adversarial_scores),
            **stats.summary("drop", np.asarray(clean_scores) - np.asarray(adversarial_scores)),
            "empty_answers": int(sum(not t for t in clean + adversarial)),
            "ratings_clean": _listed(clean_scores), "ratings_adversarial": _listed(adversarial_scores)}


def _listed(scores) -> list[float | None]:
    return [None if np.isnan(s) else float(s) for s in np.asarray(scores, np.float64)]
