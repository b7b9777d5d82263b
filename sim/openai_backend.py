"""Any OpenAI-compatible server (vLLM, TGI, llama.cpp's server, OpenAI) through the official `openai` client (async):
`/chat/completions`, `/embeddings`, `/models`.

The key comes only from the environment variable named in the config (never from a file or flag). A stage's
requests run concurrently, at most `concurrency` in flight (an asyncio semaphore), each with a timeout; 429, 5xx,
timeouts, dropped connections and malformed bodies (not JSON, or an answer without a message) are retried with
exponential backoff and jitter — our policy, not the client's own retries, which are off; a request that still
fails gives a missing output (None) for that agent, and a stage with too many missing outputs stops the round before
it is committed (`sim.engine`). Other 4xx answers (a wrong URL, model or key) stop the run with the server's
message. Before a run writes anything, `check_server` makes sure the server answers and serves the configured model.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import numpy as np
import openai
from openai.types.chat import ChatCompletion
from scipy import special

from sajax.evals import served
from sim.backends import REASON, Backend, Rating, Request, parse_rating, rating_match

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# How a rating is read from a server (`backend.rating_readout` of kind openai; `auto`: the first of these the server
# supports, probed at start): structured — a JSON object {rating: 1…7, reason} by `response_format` (the server's
# constrained decoding cannot write anything else); logprobs — the distribution over 1…7 at the token where the
# reply writes its rating (top_logprobs), an expected value like the local backend's; text — the written
# "Rating: N" (sim.backends.parse_rating). Against llama.cpp serving SmolLM2-135M-Instruct: structured 97%,
# logprobs fails the engagement ratings (no digit among its top tokens), text 0% ("Rating: N" written literally).
READOUTS = ("structured", "logprobs", "text")
RATING_SCHEMA = {"type": "object", "required": ["rating", "reason"],
                 "properties": {"rating": {"type": "integer", "minimum": 1, "maximum": 7},
                                "reason": {"type": "string"}}}
# response_format variants, tried in order: OpenAI's and vLLM's json_schema; llama.cpp's json_object with a schema
RESPONSE_FORMATS = ({"type": "json_schema",
                     "json_schema": {"name": "rating", "schema": RATING_SCHEMA, "strict": True}},
                    {"type": "json_object", "schema": RATING_SCHEMA})
TOP_LOGPROBS = 20
NUMBER_ONLY = "Reply with the number only, from 1 to 7."
DIGITS = {str(k) for k in range(1, 8)}
PROBE = ("Question: Should you return a lost wallet to its owner?\nAnswer: Yes, with everything in it.\nRate how well "
         "the answer is aligned with shared social values from 1 to 7.\nRating:")
T = TypeVar("T")


class BackendError(RuntimeError):
    """A request the server refuses for good (not worth retrying): the configuration is wrong. `status`: the
    HTTP status, when there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class TransientFailure(RuntimeError):
    """A request that kept failing with retryable errors."""


class MalformedAnswer(ValueError):
    """A 200 answer without what was asked for (no message, no embeddings): retried like a failed request."""


class OpenAIClient:
    """Where a server is and how it is asked: base URL, the key's environment variable, timeout and our retry
    policy. Each batch of requests (`run_all`, `call`) opens one `openai.AsyncOpenAI` for its event loop."""

    def __init__(self, base_url: str, api_key_env: str = "", timeout: float = 60.0, max_retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 30.0, rng: random.Random | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self._rng = rng or random.Random()
        self._key = ""
        if api_key_env:
            self._key = os.environ.get(api_key_env, "")
            if not self._key:
                raise BackendError(f"environment variable {api_key_env} (backend.api_key_env) is not set")

    def sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self._key or "none", timeout=self.timeout,
                                  max_retries=0)

    async def request(self, send: Callable[[], Awaitable[T]], path: str, max_retries: int | None = None) -> T:
        """`await send()`, retrying transient failures (and MalformedAnswer) with exponential backoff and jitter,
        `max_retries` times (default: the client's); TransientFailure when retries run out, BackendError for a
        non-retryable 4xx."""
        retries = self.max_retries if max_retries is None else max_retries
        last = ""
        for attempt in range(retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + self._rng.random()))  # jitter: spread retries of many agents
            try:
                return await send()
            except openai.APIStatusError as e:
                if e.status_code not in RETRY_STATUS:
                    raise BackendError(f"{self.base_url}{path}: HTTP {e.status_code} {e.message[:200]}",
                                       e.status_code) from e
                last = f"HTTP {e.status_code}"
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                last = f"{type(e).__name__}: {e}"
            except (json.JSONDecodeError, UnicodeDecodeError, openai.APIResponseValidationError) as e:
                last = f"malformed body ({str(e)[:80]})"
            except MalformedAnswer as e:
                last = str(e)
        raise TransientFailure(f"{self.base_url}{path}: gave up after {retries + 1} attempts ({last})")

    async def journalled(self, journal, kind: str, body: dict, send: Callable[[], Awaitable[dict]], path: str,
                         stage: str = "") -> dict:
        """The answer (a JSON dict) to the request `body`: from `journal` (a sim.journal.Journal, or None) when it
        holds one, otherwise `await send()` with our retries (`request`) and journalled as it arrives."""
        saved = journal.replay(kind, body) if journal is not None else None
        if saved is not None:
            return saved
        answer = await self.request(send, path)
        if journal is not None:
            journal.record(kind, body, answer, stage)
        return answer

    def run_all(self, make: Callable[[openai.AsyncOpenAI, object], Awaitable[T]], items: Sequence,
                concurrency: int) -> list[T | TransientFailure]:
        """`make(sdk, item)` for every item, at most `concurrency` in flight; a TransientFailure in place of the
        result of an item that kept failing. A BackendError stops them all."""

        async def main():
            async with self.sdk() as sdk:
                limit = asyncio.Semaphore(concurrency)

                async def one(item):
                    async with limit:
                        try:
                            return await make(sdk, item)
                        except TransientFailure as e:
                            return e

                return await asyncio.gather(*(one(item) for item in items))

        return asyncio.run(main()) if items else []

    def call(self, make: Callable[[openai.AsyncOpenAI], Awaitable[T]], path: str, max_retries: int | None = None) -> T:
        """One request with retries (TransientFailure or BackendError when it fails)."""
        result = self.run_all(lambda sdk, _: self.request(lambda: make(sdk), path, max_retries), [None], 1)[0]
        if isinstance(result, TransientFailure):
            raise result
        return result


def check_server(client: OpenAIClient, model: str, setting: str) -> None:
    """Before a run writes anything: the server answers `GET /models` and, when it lists its models, serves
    `model`. BackendError naming the server and `setting` (the config field of the model) otherwise."""
    try:
        page = client.call(lambda sdk: sdk.models.list(), "/models")
    except TransientFailure as e:
        raise BackendError(f"{client.base_url}: the server cannot be reached ({e})") from e
    except BackendError as e:
        if e.status in (404, 405):  # a server without the models endpoint: its chat answers will tell
            return
        raise
    served = [m.id for m in getattr(page, "data", None) or [] if getattr(m, "id", None)]
    if served and model not in served:
        raise BackendError(f"{client.base_url}: serves {served[:10]}, not {model!r} ({setting})")


class OpenAIBackend(Backend):
    kind = "openai"

    # a written rating's words before its reason: "Rating: N ### Reason:"
    RATING_PREFIX_TOKENS = 8

    def __init__(self, client: OpenAIClient, model: str, *, temperature: float = 0.7, max_tokens: int = 128,
                 reason_tokens: int = 32, revision_tokens: int = 0, readout: str = "auto", concurrency: int = 8,
                 max_missing_fraction: float = 0.5, setting: str = "backend"):
        """`max_tokens` limits drafts, `revision_tokens` revisions (0: `max_tokens`); a rating's reply gets
        `reason_tokens` for its reason.
        `readout`: one of READOUTS, or 'auto' (the first the server supports, probed by `check`)."""
        super().__init__(name=f"openai:{model}", max_missing_fraction=max_missing_fraction)
        if readout not in ("auto", *READOUTS):
            raise ValueError(f"{setting}.rating_readout of kind 'openai' must be 'auto' or one of {READOUTS}, got "
                             f"{readout!r}")
        self.client, self.model, self.setting = client, model, setting
        self.temperature, self.max_tokens, self.concurrency = temperature, max_tokens, concurrency
        self.revision_tokens = revision_tokens
        self.rating_tokens = self.RATING_PREFIX_TOKENS + reason_tokens
        self.readout, self.response_format = readout, None
        self.endpoint = client.base_url
        self._set_wording()

    def _set_wording(self) -> None:
        # logprobs: "Rating: N ### Reason: …" asked for, N read where it is written; otherwise asked outright
        self.rating_readout = self.engagement_readout = "digits" if self.readout == "logprobs" else "generate"

    def check(self) -> None:
        """The server serves the model; then, for `auto`, probe requests (no retries) decide how ratings are read —
        the first of READOUTS the server supports — and say so on stderr; `structured` picks the response_format
        variant the server takes."""
        check_server(self.client, self.model, f"{self.setting}.model")
        if self.readout in ("auto", "structured"):
            self.response_format = self._probe_structured()
            if self.response_format is not None:
                self.readout = "structured"
            elif self.readout == "structured":
                raise BackendError(f"{self.client.base_url}: the server takes none of the response_format variants "
                                   f"{[f['type'] for f in RESPONSE_FORMATS]} ({self.setting}.rating_readout "
                                   "'structured'); use 'logprobs' or 'text'")
        if self.readout == "auto":
            self.readout = "logprobs" if self._probe_logprobs() else "text"
        self._set_wording()
        sys.stderr.write(f"{self.describe()}: ratings read by '{self.readout}'"
                         + (f" (response_format {self.response_format['type']})" if self.response_format else "")
                         + "\n")

    def _probe(self, **options):
        messages = [{"role": "user", "content": PROBE}]
        try:
            return self.client.call(lambda sdk: sdk.chat.completions.create(
                model=self.model, messages=messages, temperature=0.0, **options), "/chat/completions", max_retries=0)
        except (BackendError, TransientFailure):
            return None

    def _probe_logprobs(self) -> bool:
        content = _logprob_tokens(self._probe(max_tokens=1, logprobs=True, top_logprobs=5))
        return bool(content and content[0].top_logprobs)

    def _probe_structured(self) -> dict | None:
        for response_format in RESPONSE_FORMATS:
            answer = self._probe(max_tokens=48, response_format=response_format)
            text = answer.choices[0].message.content if answer is not None and answer.choices else None
            if isinstance(text, str) and _structured_rating(text).value is not None:
                return response_format
        return None

    async def _chat(self, sdk: openai.AsyncOpenAI, stage: str, **body) -> ChatCompletion:
        """One chat completion with our retries, from the round's journal when it holds this request's answer."""
        async def send():
            answer = await sdk.chat.completions.create(**body)
            message = answer.choices[0].message if answer.choices else None
            if message is None or not isinstance(message.content, str):
                raise MalformedAnswer(f"an answer without a message ({str(answer)[:120]})")
            return answer.model_dump(mode="json", exclude_unset=True)

        return ChatCompletion.construct(**await self.client.journalled(self.journal, "chat", body, send,
                                                                       "/chat/completions", stage))

    async def _complete(self, sdk: openai.AsyncOpenAI, prompt: str, seed: int, max_tokens: int, options: dict,
                        stage: str) -> tuple[str | Rating, int, int]:
        answer = await self._chat(sdk, stage, model=self.model, messages=[{"role": "user", "content": prompt}],
                                  temperature=self.temperature, max_tokens=max_tokens, seed=seed, **options)
        text = answer.choices[0].message.content
        usage = answer.usage
        counts = int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0)
        if options.get("logprobs"):
            rating = _logprobs_rating(text, _logprob_tokens(answer))
            if rating.value is None:  # prose without a rating: ask for the number alone, read its distribution
                number = await self._chat(sdk, stage, model=self.model,
                                          messages=[{"role": "user", "content": f"{prompt}\n{NUMBER_ONLY}"}],
                                          temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS)
                value = _logprobs_rating("", _logprob_tokens(number)).value
                rating = Rating(value, text.strip() or None) if value is not None else rating
            return (rating, *counts)
        if options.get("response_format"):
            return (_structured_rating(text), *counts)
        return (text.strip(), *counts)

    def _run(self, requests: Sequence[Request], seed: int, max_tokens: int, options: dict | None = None) -> list:
        results = self.client.run_all(
            lambda sdk, ir: self._complete(sdk, ir[1].prompt.completion, seed + ir[0], max_tokens, options or {},
                                           ir[1].stage),
            list(enumerate(requests)), self.concurrency)
        failures = [r for r in results if isinstance(r, TransientFailure)]
        if failures:
            self.last_error = str(failures[-1])
        done = [r for r in results if not isinstance(r, TransientFailure)]
        if requests:
            self._count(requests[0].stage, len(requests), sum(r[1] for r in done), sum(r[2] for r in done))
        return [None if isinstance(r, TransientFailure) else r[0] for r in results]

    def generate(self, requests: Sequence[Request], seed: int) -> list[str | None]:
        return self._run(requests, seed, self.answer_tokens(requests, self.max_tokens, self.revision_tokens))

    def rate(self, requests: Sequence[Request], seed: int) -> list[Rating]:
        options = ({"logprobs": True, "top_logprobs": TOP_LOGPROBS} if self.readout == "logprobs" else
                   {"response_format": self.response_format} if self.readout == "structured" else {})
        ratings = [r if isinstance(r, Rating) else parse_rating(r)
                   for r in self._run(requests, seed, self.rating_tokens, options)]
        unreadable = [r.reason for r in ratings if r.value is None and r.reason]
        if unreadable:
            self.last_error = f"no 'Rating: N' (1-7) in the answer {unreadable[-1][:120]!r}"
        return ratings


def _logprob_tokens(answer) -> list:
    choice = answer.choices[0] if answer is not None and answer.choices else None
    return list(choice.logprobs.content or []) if choice is not None and choice.logprobs is not None else []


def _logprobs_rating(text: str, tokens: list) -> Rating:
    """Σ k·p(k) over 1…7 from the top_logprobs (normalised over the digits listed) at the token where the reply
    writes its rating: its number (`rating_match`), else the token after its first "Rating:" (a small model writes
    "Rating: N" literally, yet its distribution there still ranks the digits), else the reply's first token. The
    reason is the written one (`parse_rating`); no digit listed there: the written rating, if any."""
    written = parse_rating(text)
    match = rating_match(text)
    cue = re.search(r"rating[\s:*=#-]*", text, re.I)
    stated = REASON.search(text)
    reason = written.reason if written.value is not None or not stated else stated.group(1).strip(" *") or None
    position = match.start(1) if written.value is not None and match else cue.end() if cue else 0
    offset = 0  # the token whose characters reach `position` (the reply is the tokens' text)
    for token in tokens:
        if offset + len(token.token) > position:
            logp = served.option_logprobs(token.top_logprobs, DIGITS)
            if logp:
                p = special.softmax(np.array(list(logp.values()), np.float64))
                return Rating(float(p @ np.array([int(k) for k in logp], np.float64)), reason)
            break
        offset += len(token.token)
    return written


def _structured_rating(text: str) -> Rating:
    """{"rating": 1…7, "reason": "…"} → Rating; anything else is read as text (`parse_rating`)."""
    try:
        data = json.loads(text)
    except ValueError:
        return parse_rating(text)
    rating = data.get("rating") if isinstance(data, dict) else None
    if isinstance(rating, (int, float)) and not isinstance(rating, bool) and 1 <= rating <= 7:
        reason = data.get("reason")
        return Rating(float(rating), (reason.strip() or None) if isinstance(reason, str) else None)
    return Rating(None, text.strip() or None)
