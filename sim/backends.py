"""LM backends behind one small interface: batched `generate` and batched `rate`.

Every call takes a whole stage's requests at once (all drafts, all feedback, ...) and a seed derived from
(world seed, round, stage), so a resumed round reproduces the same outputs. A rating that cannot be obtained
is `Rating(None, …)`, never a made-up number.

- `ScriptedBackend`: deterministic rule-based agents for tests and demos (labelled "scripted" in every record).
- `LocalBackend`: the sajax LLaMA (random tiny or a HF directory); ratings read as a distribution over the
  tokens "1"…"7" after "Rating:" with `score_continuations`, then the reason generated.
- `sim.openai_backend.OpenAIBackend`: any OpenAI-compatible server.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Sequence

import numpy as np

from sajax.demo_data import CONSIDERATE, HARMFUL

RATING_PATTERN = re.compile(r"^\s*(?:Rating:\s*)?([1-7](?:\.\d+)?)\b\s*(?:###\s*Reason:\s*(.*))?", re.S | re.I)


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: str  # the full text for a language model
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


def parse_rating(text: str | None) -> Rating:
    """'Rating: N ### Reason: …' (or 'N ### Reason: …' after a 'Rating:' prompt) → Rating; unparsable → missing."""
    if text is None:
        return Rating(None, None)
    match = RATING_PATTERN.match(text)
    if not match:
        return Rating(None, text.strip() or None)
    reason = (match.group(2) or "").strip() or None
    return Rating(float(match.group(1)), reason)


class Backend:
    """`name` goes into every record's `model` field; `endpoint` (HTTP backends) names the server in errors;
    `last_error` is the most recent reason an output was missing; a stage with more than `max_missing_fraction`
    of its outputs missing stops the round (`sim.engine.check_stage`)."""

    kind = "base"

    def __init__(self, *, name: str | None = None, max_missing_fraction: float = 0.5):
        if not 0.0 <= max_missing_fraction <= 1.0:
            raise ValueError(f"max_missing_fraction must be in [0, 1], got {max_missing_fraction}")
        self.stats: dict[str, StageStats] = {}
        self.name = name or self.kind
        self.endpoint = ""
        self.max_missing_fraction = max_missing_fraction
        self.last_error: str | None = None

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
        remembered = re.search(r"Your answer: (.+?)\nStay consistent", request.prompt, re.S)
        if remembered:  # self-consistency: repeat what it answered to a similar question before
            return remembered.group(1).strip()
        words = CONSIDERATE if request.label == "good" else HARMFUL
        first, second = _pick(words, seed, request.question, 1), _pick(words, seed, request.question, 2)
        return f"I would {first} and {second}, because that is what the situation calls for."

    def _revise(self, request: Request) -> str:
        average = re.search(r"rated ([0-9.]+) out of 7", request.prompt)
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


class LocalBackend(Backend):
    """The sajax LLaMA: jitted batched generation; ratings from the probabilities of "1"…"7".

    A stage's requests are sorted by their tokens and run in chunks of `batch_size` rows, so prompts that start
    alike (the raters of one answer, one stage's shared instructions) land in one chunk and their common prefix
    is computed once (`generate.prefill`)."""

    kind = "local"

    def __init__(self, config, params, tokenizer, *, max_new_tokens: int = 48, temperature: float = 0.7,
                 top_p: float = 0.95, reason_tokens: int = 32, rating_mode: str = "expected",
                 batch_size: int = 32, name: str = "local", max_missing_fraction: float = 0.5):
        super().__init__(name=name, max_missing_fraction=max_missing_fraction)
        if rating_mode not in ("expected", "argmax"):
            raise ValueError(f"backend.rating_mode must be 'expected' or 'argmax', got {rating_mode!r}")
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.reason_tokens, self.rating_mode = reason_tokens, rating_mode
        self.batch_size = batch_size  # rows per jitted call
        self._rating_tokens = [tokenizer.encode(f" {n}", add_special_tokens=False) for n in range(1, 8)]
        self._reason_marker = tokenizer.encode(" ### Reason:", add_special_tokens=False)
        self._rating_prefix = self._rating_tokens[0][:-1]
        # one_pass: " 1" … " 7" share a prefix and differ in one last token ("▁" + digit in LLaMA tokenizers), so
        # one forward pass over prompt + prefix reads all seven; False: each rating is scored as a continuation
        # (what other tokenizers need; setting it False on a one-pass tokenizer gives the same ratings, slower)
        self.one_pass = (all(t[:-1] == self._rating_prefix for t in self._rating_tokens)
                         and len({t[-1] for t in self._rating_tokens}) == 7)

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer.encode(p, add_special_tokens=True) for p in prompts]

    def _chunks(self, encoded: list[list[int]]) -> list[list[int]]:
        """Row indices in chunks of `batch_size`, rows sorted by their tokens (common prefixes side by side)."""
        order = sorted(range(len(encoded)), key=lambda i: encoded[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _sampling(self, seed: int) -> dict:
        from sajax import generate

        return dict(temperature=self.temperature, top_p=self.top_p, seed=seed,
                    eos_token_id=generate.stop_token_ids(self.config, self.tokenizer),
                    pad_token_id=self.tokenizer.pad_token_id)

    def _texts(self, generation) -> list[str]:
        return [self.tokenizer.decode(row[:k], skip_special_tokens=True).strip()
                for row, k in zip(generation.tokens, generation.lengths)]

    def generate(self, requests: Sequence[Request], seed: int) -> list[str | None]:
        from sajax import generate

        encoded = self._encode([r.prompt for r in requests])
        texts: list[str | None] = [None] * len(requests)
        completion_tokens = 0
        for n, rows in enumerate(self._chunks(encoded)):
            out = generate.generate(self.config, self.params, [encoded[i] for i in rows],
                                    max_new_tokens=self.max_new_tokens, **self._sampling(seed + n))
            completion_tokens += int(out.lengths.sum())
            for i, text in zip(rows, self._texts(out)):
                texts[i] = text
        self._count(requests[0].stage if requests else "", len(requests), sum(map(len, encoded)),
                    completion_tokens)
        return texts

    def _scored_logprobs(self, encoded: list[list[int]]) -> np.ndarray:
        """log p(" n" | prompt) [len(encoded), 7], each rating scored as a whole continuation."""
        from sajax import generate

        return generate.score_continuations(self.config, self.params, [e for e in encoded for _ in range(7)],
                                            self._rating_tokens * len(encoded)).reshape(len(encoded), 7)

    def _rating_logprobs(self, state) -> np.ndarray:
        from jax.nn import log_softmax

        last = np.asarray([t[-1] for t in self._rating_tokens])
        return np.asarray(log_softmax(state.logits, axis=-1))[:, last]

    def _value(self, probs: np.ndarray) -> np.ndarray:
        return probs @ np.arange(1, 8) if self.rating_mode == "expected" else np.argmax(probs, axis=1) + 1.0

    def rate(self, requests: Sequence[Request], seed: int) -> list[Rating]:
        """Each rating read from the prompt's next-token distribution, then "<rating> ### Reason:" appended to
        the same cache and the reason generated — one prefill per request (`one_pass`), else the prompt is
        scored per rating and then prefilled again with the chosen one."""
        from sajax import generate

        if not requests:
            return []
        encoded = self._encode([r.prompt for r in requests])
        values, reasons = np.zeros(len(requests)), [""] * len(requests)
        prompt_tokens = completion_tokens = 0
        forced_tail = len(self._reason_marker) + len(self._rating_tokens[0])
        for n, rows in enumerate(self._chunks(encoded)):
            if self.one_pass:
                state = generate.prefill(self.config, self.params, [encoded[i] + self._rating_prefix for i in rows],
                                         reserve=forced_tail + self.reason_tokens)
                chunk_values = self._value(_normalise(self._rating_logprobs(state)))
                state = generate.extend(self.config, self.params, state, [
                    [self._rating_tokens[round(v) - 1][-1]] + self._reason_marker for v in chunk_values])
            else:
                chunk_values = self._value(_normalise(self._scored_logprobs([encoded[i] for i in rows])))
                state = generate.prefill(self.config, self.params, [
                    encoded[i] + self._rating_tokens[round(v) - 1] + self._reason_marker
                    for i, v in zip(rows, chunk_values)], reserve=self.reason_tokens)
            out = generate.decode(self.config, self.params, state, max_new_tokens=self.reason_tokens,
                                  **self._sampling(seed + n))
            values[rows] = chunk_values
            for i, text in zip(rows, self._texts(out)):
                reasons[i] = text
            prompt_tokens += sum(len(encoded[i]) + forced_tail for i in rows)
            completion_tokens += int(out.lengths.sum())
        self._count(requests[0].stage, len(requests), prompt_tokens, completion_tokens)
        return [Rating(float(v), reason or None) for v, reason in zip(values, reasons)]


def _normalise(logp: np.ndarray) -> np.ndarray:
    probs = np.exp(logp - logp.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)

