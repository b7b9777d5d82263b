"""Any OpenAI-compatible server (vLLM, TGI, OpenAI) over HTTP: `/chat/completions` and `/embeddings`.

The key comes only from the environment variable named in the config (never from a file or flag). Requests run
with bounded concurrency and a timeout; 429, 5xx, timeouts, dropped connections and malformed bodies are
retried with exponential backoff and jitter; a request that still fails gives a missing output (None) for that
agent. Other 4xx answers (a wrong URL, model or key) stop the run with the server's message.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from sim.backends import Backend, Rating, Request, parse_rating

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class BackendError(RuntimeError):
    """A request the server refuses for good (not worth retrying): the configuration is wrong."""


class TransientFailure(RuntimeError):
    """A request that kept failing with retryable errors."""


class HTTPClient:
    def __init__(self, base_url: str, api_key_env: str = "", timeout: float = 60.0, max_retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 30.0, rng: random.Random | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self._rng = rng or random.Random()
        self._headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise BackendError(f"environment variable {api_key_env} (backend.api_key_env) is not set")
            self._headers["Authorization"] = f"Bearer {key}"

    def post(self, path: str, body: dict) -> dict:
        """The JSON answer of `POST base_url + path`, retrying transient failures; raises TransientFailure when
        retries run out and BackendError for a non-retryable 4xx."""
        url = self.base_url + path
        data = json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                time.sleep(delay * (0.5 + self._rng.random()))  # jitter: spread retries of many agents
            try:
                request = urllib.request.Request(url, data=data, headers=self._headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                try:
                    parsed = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    last = f"malformed body {raw[:80]!r}"
                    continue
                if not isinstance(parsed, dict):
                    last = f"malformed body {raw[:80]!r}"
                    continue
                return parsed
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace")
                if e.code not in RETRY_STATUS:
                    raise BackendError(f"{url}: HTTP {e.code} {detail}") from e
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        raise TransientFailure(f"{url}: gave up after {self.max_retries + 1} attempts ({last})")


class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(self, client: HTTPClient, model: str, *, temperature: float = 0.7, max_tokens: int = 128,
                 concurrency: int = 8):
        super().__init__()
        self.client, self.model = client, model
        self.temperature, self.max_tokens, self.concurrency = temperature, max_tokens, concurrency

    def _complete(self, prompt: str, seed: int) -> tuple[str | None, int, int]:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": self.temperature, "max_tokens": self.max_tokens, "seed": seed}
        for _ in range(self.client.max_retries + 1):  # a 200 answer without a usable message counts as malformed
            try:
                answer = self.client.post("/chat/completions", body)
            except TransientFailure:
                return None, 0, 0
            try:
                text = answer["choices"][0]["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError(type(text).__name__)
            except (KeyError, IndexError, TypeError):
                continue
            usage = answer.get("usage") or {}
            return text.strip(), int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        return None, 0, 0

    def _run(self, requests: Sequence[Request], seed: int) -> list[str | None]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(pool.map(lambda ir: self._complete(ir[1].prompt, seed + ir[0]), enumerate(requests)))
        if requests:
            self._count(requests[0].stage, len(requests), sum(r[1] for r in results), sum(r[2] for r in results))
        return [r[0] for r in results]

    def generate(self, requests: Sequence[Request], seed: int) -> list[str | None]:
        return self._run(requests, seed)

    def rate(self, requests: Sequence[Request], seed: int) -> list[Rating]:
        return [parse_rating(text) for text in self._run(requests, seed)]
