"""LM backends behind one small interface: batched `generate` and batched `rate`.

Every call takes a whole stage's requests at once (all drafts, all feedback, ...) and a seed derived from
(world seed, round, stage), so a resumed round reproduces the same outputs. A rating that cannot be obtained
is `Rating(None, …)`, never a made-up number.

- `ScriptedBackend`: deterministic rule-based agents for tests and demos (labelled "scripted" in every record).
- `sim.local_backend.LocalBackend`: a sajax LLaMA in this process (chat templates, rating readouts).
- `sim.openai_backend.OpenAIBackend`: any OpenAI-compatible server.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Sequence

from sajax.data.demo import CONSIDERATE, HARMFUL
from sim.prompts import Prompt

# "N ### Reason: …" right after a "Rating:" cue, or "Rating: N" anywhere (markdown bold and "N/7" allowed)
LEADING_RATING = re.compile(r"^\s*(\d+(?:\.\d+)?)(?!\.?\d)")
RATING_ANYWHERE = re.compile(r"rating\W{0,4}?\s*(\d+(?:\.\d+)?)(?!\.?\d)", re.I)
REASON = re.compile(r"reason\W{0,6}(.*)", re.S | re.I)


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: Prompt  # what a language model is asked (chat turn or completion text)
    question: str  # structured fields for the scripted agents
    answer: str | None = None
    label: str | None = None  # the asking agent's stance ('good' / 'bad'), None for observers
    stage: str = ""


@dataclasses.dataclass(frozen=True)
class Rating:
    value: float | None  # 1..7, None = missing
    reason: str | None


@dataclasses.dataclass
class StageStats:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def rating_match(text: str) -> re.Match | None:
    """Where a written rating's number is: right at the start (after a "Rating:" cue), else after "Rating"."""
    return LEADING_RATING.match(text) or RATING_ANYWHERE.search(text)


def parse_rating(text: str | None) -> Rating:
    """A written rating → Rating: "N ### Reason: …" (after a "Rating:" cue) or "Rating: N" anywhere in the reply,
    the reason after "Reason:" (else the whole reply); a number outside 1…7, or none, is missing, with the raw reply
    kept as the reason."""
    if text is None:
        return Rating(None, None)
    match = rating_match(text)
    if not match or not 1.0 <= float(match.group(1)) <= 7.0:
        return Rating(None, text.strip() or None)
    reason = REASON.search(text, match.end())
    if reason:
        return Rating(float(match.group(1)), reason.group(1).strip().strip("*").strip() or None)
    rest = (text[:match.start()] + text[match.end():]).strip(" \n*#:.-/7")
    return Rating(float(match.group(1)), rest or None)


class Backend:
    """`name` goes into every record's `model` field; `endpoint` (HTTP backends) names the server in errors;
    `last_error` is the most recent reason an output was missing; a stage with more than `max_missing_fraction`
    of its outputs missing stops the round (`sim.engine.check_stage`). `journal` (`sim.journal.Journal`, set for
    each round by `sim.run`): where a backend whose calls are paid for records its responses and replays them."""

    kind = "base"
    # how ratings are asked for (sim.prompts.READOUTS): by default written out as "Rating: N ### Reason: …"
    rating_readout = "generate"  # alignment (peer feedback, observers)
    engagement_readout = "generate"  # the observers' engagement ratings

    def __init__(self, *, name: str | None = None, max_missing_fraction: float = 0.5):
        if not 0.0 <= max_missing_fraction <= 1.0:
            raise ValueError(f"max_missing_fraction must be in [0, 1], got {max_missing_fraction}")
        self.stats: dict[str, StageStats] = {}
        self.name = name or self.kind
        self.endpoint = ""
        self.max_missing_fraction = max_missing_fraction
        self.last_error: str | None = None
        self.journal = None

    def check(self) -> None:
        """Raises when the backend cannot work (a server that cannot be reached); called before a run writes
        anything."""

    def describe(self) -> str:
        return f"{self.name} at {self.endpoint}" if self.endpoint else self.name

    def _count(self, stage: str, calls: int, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        s = self.stats.setdefault(stage, StageStats())
        s.calls += calls
        s.prompt_tokens += prompt_tokens
        s.completion_tokens += completion_tokens

    def generate(self, requests: Sequence[Request], seed: int) -> list[str | None]:
        raise NotImplementedError

    @staticmethod
    def answer_tokens(requests: Sequence[Request], max_new_tokens: int, revision_tokens: int) -> int:
        """The token limit of a stage's answers: `revision_tokens` for revisions when set (> 0), else
        `max_new_tokens`."""
        revising = bool(requests) and requests[0].stage == "revise"
        return revision_tokens if revising and revision_tokens > 0 else max_new_tokens

    def rate(self, requests: Sequence[Request], seed: int) -> list[Rating]:
        raise NotImplementedError


def _pick(options: Sequence[str], *keys: object) -> str:
    return options[zlib.crc32("|".join(map(str, keys)).encode()) % len(options)]


def _considerate_share(text: str) -> float | None:
    words = re.findall(r"[a-z]+", text.lower())
    good = sum(w in CONSIDERATE for w in words)
    bad = sum(w in HARMFUL for w in words)
    return None if good + bad == 0 else good / (good + bad)


class ScriptedBackend(Backend):
    """Rule-based agents: an agent repeats its remembered answer to a similar question (when the draft prompt
    holds one); otherwise 'good' agents answer with considerate actions, 'bad' ones with harmful actions; a
    rating is 1 + 6 × the share of considerate words (missing if the answer uses none of the listed words);
    engagement grows with the answer's length; a revision swaps harmful actions for considerate ones when the
    average rating was below 4. Deterministic: the same requests and seed give the same outputs."""

    kind = "scripted"

    def generate(self, requests: Sequence[Request], seed: int) -> list[str | None]:
        self._count(requests[0].stage if requests else "", len(requests))
        return [self._revise(r) if r.answer is not None else self._draft(r, seed) for r in requests]

    def _draft(self, request: Request, seed: int) -> str:
        remembered = re.search(r"Your answer: (.+?)\nStay consistent", request.prompt.instruction, re.S)
        if remembered:  # self-consistency: repeat what it answered to a similar question before
            return remembered.group(1).strip()
        words = CONSIDERATE if request.label == "good" else HARMFUL
        first, second = _pick(words, seed, request.question, 1), _pick(words, seed, request.question, 2)
        return f"I would {first} and {second}, because that is what the situation calls for."

    def _revise(self, request: Request) -> str:
        average = re.search(r"rated ([0-9.]+) out of 7", request.prompt.instruction)
        if average and float(average.group(1)) >= 4:
            return request.answer + " I would also explain my reasons."
        text = request.answer
        for i, bad in enumerate(HARMFUL):
            text = re.sub(rf"\b{bad}\b", CONSIDERATE[i % len(CONSIDERATE)], text)
        return text

    def rate(self, requests: Sequence[Request], seed: int) -> list[Rating]:
        self._count(requests[0].stage if requests else "", len(requests))
        out = []
        for r in requests:
            if r.stage.endswith("engagement"):
                words = len(r.answer.split())
                out.append(Rating(float(min(7, max(1, words // 4))), f"The answer has {words} words."))
                continue
            share = _considerate_share(r.answer)
            if share is None:
                out.append(Rating(None, "The answer names no action I can judge."))
            else:
                out.append(Rating(float(round(1 + 6 * share)), f"{round(100 * share)}% of the actions named are "
                                                                 "considerate."))
        return out
