"""The local backend: agents and raters driven by a sajax LLaMA in this process (random tiny, a HF folder, a GGUF
file or a known model).

- Prompts: when the tokenizer has a chat template, every prompt is a user turn of it (and a rating's "Rating:"
  opens the assistant's turn, so the readout position is exact); base models without a template get completion
  prompts. Generation stops at the model's end-of-sequence ids and the template's end of turn.
- Ratings (`rating_readout` for alignment, `engagement_readout`; each prompt says how it is read): `digits` —
  p(" 1"…" 7") after "Rating:"; `yes_no` — p(Yes) against p(No) for a yes/no question about the answer, mapped
  onto 1–7 (1 + 6·p(Yes)); `generate` — the model writes "Rating: N ### Reason: …" and it is parsed (unparsable →
  missing). The value is the expected rating under the read distribution (or
  its argmax, `rating_mode`). Every readout also yields the model's reason, decoded from the same KV cache after
  the chosen rating or word (and " ### Reason:" for completion prompts, ", because" for chat models). `auto`:
  what measured best on the calibration sets (`sim.calibrate`) — `yes_no` for alignment with a chat model
  (`digits` without a template), `digits` for engagement.
- Batching: a stage's requests are sorted by their tokens and run in chunks of `batch_size` rows, so prompts that
  start alike (the raters of one answer) land in one chunk and share their prefill (`sajax.infer.generate.prefill`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import special

from sim import prompts
from sim.backends import Backend, Rating, Request, parse_rating

RATING_MODES = ("expected", "argmax")


class Choices:
    """One choice among options read from a model's next tokens; each option is a list of spellings ("Yes",
    "yes"). When every option's first spelling is a shared token prefix plus one last token, one forward pass over
    the prompt + prefix reads them all (log p of an option = logsumexp over the last tokens of its spellings of that
    form); otherwise each option's first spelling is scored as a whole continuation (`one_pass` False)."""

    def __init__(self, tokenizer, options: Sequence[Sequence[str]]):
        encoded = [[tokenizer.encode(s, add_special_tokens=False) for s in spellings] for spellings in options]
        self.first = [spellings[0] for spellings in encoded]  # what is appended once an option is chosen
        prefix = self.first[0][:-1]
        # spellings that are the prefix plus one token (others, like "YES" split in two, are left out of the read)
        kept = [[e for e in spellings if e and e[:-1] == prefix] for spellings in encoded]
        last = [sorted({e[-1] for e in spellings}) for spellings in kept]
        tokens = [t for option in last for t in option]
        self.one_pass = (all(first and first[:-1] == prefix for first in self.first)
                         and len(tokens) == len(set(tokens)))
        self.prefix = prefix if self.one_pass else []
        self.last = last if self.one_pass else []

    def from_logits(self, logits: np.ndarray) -> np.ndarray:
        """log p(option) [B, options] from next-token logits [B, V] after prompt + prefix."""
        from jax.nn import log_softmax

        logp = np.asarray(log_softmax(np.asarray(logits, np.float32), axis=-1))
        return np.stack([np.logaddexp.reduce(logp[:, tokens], axis=1) for tokens in self.last], axis=1)

    def scored(self, config, params, encoded: list[list[int]]) -> np.ndarray:
        """log p(option's first spelling | prompt) [B, options], each scored as a whole continuation."""
        from sajax.infer import generate

        n = len(self.first)
        return generate.score_continuations(config, params, [e for e in encoded for _ in range(n)],
                                            self.first * len(encoded)).reshape(len(encoded), n)

    def appended(self, option: int) -> list[int]:
        """The tokens to append after the prefix once `option` is chosen."""
        return self.first[option][len(self.prefix):]


class LocalBackend(Backend):
    kind = "local"

    def __init__(self, config, params, tokenizer, *, max_new_tokens: int = 48, temperature: float = 0.7,
                 top_p: float = 0.95, reason_tokens: int = 32, revision_tokens: int = 0, rating_mode: str = "expected",
                 rating_readout: str = "auto", engagement_readout: str = "auto", batch_size: int = 32,
                 name: str = "local", max_missing_fraction: float = 0.5):
        from sajax.formats.tokenizer import has_chat_template
        from sajax.infer import generate

        super().__init__(name=name, max_missing_fraction=max_missing_fraction)
        if rating_mode not in RATING_MODES:
            raise ValueError(f"backend.rating_mode must be one of {RATING_MODES}, got {rating_mode!r}")
        self.chat = has_chat_template(tokenizer)
        # auto: what measured best with SmolLM2-135M-Instruct (sim.calibrate; README): yes/no for alignment,
        # digits for engagement (its yes/no answers ranked dull answers above engaging ones)
        rating_readout = ("yes_no" if self.chat else "digits") if rating_readout == "auto" else rating_readout
        engagement_readout = "digits" if engagement_readout == "auto" else engagement_readout
        for field, value in (("rating_readout", rating_readout), ("engagement_readout", engagement_readout)):
            if value not in prompts.READOUTS:
                raise ValueError(f"backend.{field} must be 'auto' or one of {prompts.READOUTS}, got {value!r}")
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.reason_tokens, self.rating_mode, self.revision_tokens = reason_tokens, rating_mode, revision_tokens
        self.rating_readout, self.engagement_readout = rating_readout, engagement_readout
        self.batch_size = batch_size  # rows per jitted call
        self.stop_ids = generate.stop_token_ids(config, tokenizer)
        self.digits = Choices(tokenizer, [[f" {n}"] for n in range(1, 8)])
        # a chat model's turn starts with the word itself; a completion prompt's "Reply:" is followed by a space
        words = ("{}",) if self.chat else (" {}",)
        self.yes_no = Choices(tokenizer, [[w.format(v) for w in words for v in ("Yes", "yes", "YES")],
                                          [w.format(v) for w in words for v in ("No", "no", "NO")]])
        self._reason_marker = tokenizer.encode(" ### Reason:", add_special_tokens=False)
        self._because = tokenizer.encode(", because", add_special_tokens=False)  # after Yes / No: the reason

    def encode(self, prompt: prompts.Prompt) -> list[int]:
        """The prompt's token ids: a chat turn (its cue opening the reply when `prefill`), else completion text."""
        from sajax.formats.tokenizer import encode_chat

        if self.chat:
            return encode_chat(self.tokenizer, prompt.instruction, prompt.cue if prompt.prefill else "")
        return self.tokenizer.encode(prompt.completion, add_special_tokens=True)

    def _chunks(self, encoded: list[list[int]]) -> list[list[int]]:
        """Row indices in chunks of `batch_size`, rows sorted by their tokens (common prefixes side by side)."""
        order = sorted(range(len(encoded)), key=lambda i: encoded[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _sampling(self, seed: int) -> dict:
        return dict(temperature=self.temperature, top_p=self.top_p, seed=seed, eos_token_id=self.stop_ids,
                    pad_token_id=self.tokenizer.pad_token_id)

    def _texts(self, generation) -> list[str]:
        return [self.tokenizer.decode(row[:k], skip_special_tokens=True).strip()
                for row, k in zip(generation.tokens, generation.lengths)]

    def generate(self, requests: Sequence[Request], seed: int) -> list[str | None]:
        return self._generate(requests, seed, self.answer_tokens(requests, self.max_new_tokens, self.revision_tokens))

    def _generate(self, requests: Sequence[Request], seed: int, max_new_tokens: int) -> list[str | None]:
        from sajax.infer import generate

        encoded = [self.encode(r.prompt) for r in requests]
        texts: list[str | None] = [None] * len(requests)
        completion_tokens = 0
        for n, rows in enumerate(self._chunks(encoded)):
            out = generate.generate(self.config, self.params, [encoded[i] for i in rows],
                                    max_new_tokens=max_new_tokens, **self._sampling(seed + n))
            completion_tokens += int(out.lengths.sum())
            for i, text in zip(rows, self._texts(out)):
                texts[i] = text
        self._count(requests[0].stage if requests else "", len(requests), sum(map(len, encoded)),
                    completion_tokens)
        return texts

    def _values(self, probs: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Ratings from option probabilities [B, options] on the rating `scale` [options]."""
        return probs @ scale if self.rating_mode == "expected" else scale[np.argmax(probs, axis=1)]

    def rate(self, requests: Sequence[Request], seed: int) -> list[Rating]:
        """Ratings read as the prompts say (`Prompt.readout`; all of one call alike), each with the reason the model
        writes after it. With a one-pass readout the rating comes from the prompt's prefill, the chosen rating or
        word (and the marker) is appended to the same cache and the reason decoded: one prefill per request."""
        from sajax.infer import generate

        if not requests:
            return []
        readouts = {r.prompt.readout or self.rating_readout for r in requests}
        if len(readouts) != 1:
            raise ValueError(f"one rate() call reads one way; got prompts for {sorted(readouts)}")
        readout = readouts.pop()
        if readout == "generate":
            return self._generated_ratings(requests, seed)
        choices, scale = ((self.digits, np.arange(1.0, 8.0)) if readout == "digits" else
                          (self.yes_no, np.array([7.0, 1.0])))
        # what joins the rating to its reason: the format's " ### Reason:" for completion prompts; chat models
        # (which tend to end their turn right after it) and yes/no answers continue ", because …"
        marker = self._reason_marker if choices is self.digits and not self.chat else self._because
        encoded = [self.encode(r.prompt) for r in requests]
        values, reasons = np.zeros(len(requests)), [""] * len(requests)
        prompt_tokens = completion_tokens = 0
        for n, rows in enumerate(self._chunks(encoded)):
            if choices.one_pass:
                state = generate.prefill(self.config, self.params, [encoded[i] + choices.prefix for i in rows],
                                         reserve=max(map(len, choices.first)) + len(marker) + self.reason_tokens)
                probs = special.softmax(choices.from_logits(state.logits), axis=1)
            else:
                probs = special.softmax(choices.scored(self.config, self.params, [encoded[i] for i in rows]), axis=1)
            values[rows] = self._values(probs, scale)
            prompt_tokens += sum(len(encoded[i]) for i in rows)
            if self.reason_tokens == 0:  # ratings only (calibration)
                continue
            chosen = [int(c) for c in np.argmax(probs, axis=1)]
            if choices.one_pass:  # the chosen rating or word, then the marker, onto the same cache
                state = generate.extend(self.config, self.params, state,
                                        [choices.appended(c) + marker for c in chosen])
            else:
                state = generate.prefill(self.config, self.params, [
                    encoded[i] + choices.first[c] + marker for i, c in zip(rows, chosen)], reserve=self.reason_tokens)
            out = generate.decode(self.config, self.params, state, max_new_tokens=self.reason_tokens,
                                  **self._sampling(seed + n))
            for i, text in zip(rows, self._texts(out)):
                reasons[i] = f"because {text}" if marker is self._because else text
            completion_tokens += int(out.lengths.sum())
        self._count(requests[0].stage, len(requests), prompt_tokens, completion_tokens)
        return [Rating(float(v), reason or None) for v, reason in zip(values, reasons)]

    def _generated_ratings(self, requests: Sequence[Request], seed: int) -> list[Rating]:
        """The model writes the rating: " N ### Reason: …" after "Rating:", parsed; unparsable → missing."""
        texts = self._generate(requests, seed, self.reason_tokens + 8)  # the rating and the marker, then the reason
        ratings = [parse_rating(text) for text in texts]
        unreadable = [r.reason for r in ratings if r.value is None and r.reason]
        if unreadable:
            self.last_error = f"no 'Rating: N' (1-7) in the answer {unreadable[-1][:120]!r}"
        return ratings

