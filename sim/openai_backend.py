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
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import openai

from sim.backends import Backend, Rating, Request, parse_rating

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
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

    async def request(self, send: Callable[[], Awaitable[T]], path: str) -> T:
        """`await send()`, retrying transient failures (and MalformedAnswer) with exponential backoff and jitter;
        TransientFailure when retries run out, BackendError for a non-retryable 4xx."""
        last = ""
        for attempt in range(self.max_retries + 1):
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
        raise TransientFailure(f"{self.base_url}{path}: gave up after {self.max_retries + 1} attempts ({last})")

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

    def call(self, make: Callable[[openai.AsyncOpenAI], Awaitable[T]], path: str) -> T:
        """One request with retries (TransientFailure or BackendError when it fails)."""
        result = self.run_all(lambda sdk, _: self.request(lambda: make(sdk), path), [None], 1)[0]
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

    def __init__(self, client: OpenAIClient, model: str, *, temperature: float = 0.7, max_tokens: int = 128,
                 concurrency: int = 8, max_missing_fraction: float = 0.5):
        super().__init__(name=f"openai:{model}", max_missing_fraction=max_missing_fraction)
        self.client, self.model = client, model
        self.temperature, self.max_tokens, self.concurrency = temperature, max_tokens, concurrency
        self.endpoint = client.base_url

    def check(self) -> None:
        check_server(self.client, self.model, "backend.model")

    async def _complete(self, sdk: openai.AsyncOpenAI, prompt: str, seed: int) -> tuple[str, int, int]:
        async def send():
            answer = await sdk.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], temperature=self.temperature,
                max_tokens=self.max_tokens, seed=seed)
            text = answer.choices[0].message.content if answer.choices and answer.choices[0].message else None
            if not isinstance(text, str):
                raise MalformedAnswer(f"an answer without a message ({str(answer)[:120]})")
            usage = answer.usage
            return (text.strip(), int(getattr(usage, "prompt_tokens", 0) or 0),
                    int(getattr(usage, "completion_tokens", 0) or 0))

        return await self.client.request(send, "/chat/completions")

    def _run(self, requests: Sequence[Request], seed: int) -> list[str | None]:
        results = self.client.run_all(lambda sdk, ir: self._complete(sdk, ir[1].prompt.completion, seed + ir[0]),
                                      list(enumerate(requests)), self.concurrency)
        failures = [r for r in results if isinstance(r, TransientFailure)]
        if failures:
            self.last_error = str(failures[-1])
        done = [r for r in results if not isinstance(r, TransientFailure)]
        if requests:
            self._count(requests[0].stage, len(requests), sum(r[1] for r in done), sum(r[2] for r in done))
        return [None if isinstance(r, TransientFailure) else r[0] for r in results]

    def generate(self, requests: Sequence[Request], seed: int) -> list[str | None]:
        return self._run(requests, seed)

    def rate(self, requests: Sequence[Request], seed: int) -> list[Rating]:
        ratings = [parse_rating(text) for text in self._run(requests, seed)]
        unreadable = [r.reason for r in ratings if r.value is None and r.reason]
        if unreadable:
            self.last_error = f"no 'Rating: N' (1-7) in the answer {unreadable[-1][:120]!r}"
        return ratings
