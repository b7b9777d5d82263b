"""Any OpenAI-compatible server (vLLM, TGI, OpenAI) over HTTP: `/chat/completions` and `/embeddings`.

The key comes only from the environment variable named in the config (never from a file or flag). Requests run
with bounded concurrency and a timeout; 429, 5xx, timeouts, dropped connections and malformed bodies are
retried with exponential backoff and jitter; a request that still fails gives a missing output (None) for that
agent, and a stage with too many missing outputs stops the round before it is committed (`sim.engine`). Other
4xx answers (a wrong URL, model or key) stop the run with the server's message. Before a run writes anything,
`check_server` makes sure the server answers and serves the configured model.
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
    """A request the server refuses for good (not worth retrying): the configuration is wrong. `status`: the
    HTTP status, when there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


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
        return self._request("POST", path, json.dumps(body).encode("utf-8"))

    def get(self, path: str) -> dict:
        """The JSON answer of `GET base_url + path`, with the same retries and errors as `post`."""
        return self._request("GET", path, None)

    def _request(self, method: str, path: str, data: bytes | None) -> dict:
        url = self.base_url + path
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                time.sleep(delay * (0.5 + self._rng.random()))  # jitter: spread retries of many agents
            try:
                request = urllib.request.Request(url, data=data, headers=self._headers, method=method)
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
                    raise BackendError(f"{url}: HTTP {e.code} {detail}", e.code) from e
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        raise TransientFailure(f"{url}: gave up after {self.max_retries + 1} attempts ({last})")


def check_server(client: HTTPClient, model: str, setting: str) -> None:
    """Before a run writes anything: the server answers `GET /models` and, when it lists its models, serves
    `model`. BackendError naming the server and `setting` (the config field of the model) otherwise."""
    try:
        body = client.get("/models")
    except TransientFailure as e:
        raise BackendError(f"{client.base_url}: the server cannot be reached ({e})") from e
    except BackendError as e:
        if e.status in (404, 405):  # a server without the models endpoint: its chat answers will tell
            return
        raise
    served = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)] if isinstance(body, dict) else []
    if served and model not in served:
        raise BackendError(f"{client.base_url}: serves {served[:10]}, not {model!r} ({setting})")


class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(self, client: HTTPClient, model: str, *, temperature: float = 0.7, max_tokens: int = 128,
                 concurrency: int = 8, max_missing_fraction: float = 0.5):
        super().__init__(name=f"openai:{model}", max_missing_fraction=max_missing_fraction)
        self.client, self.model = client, model
        self.temperature, self.max_tokens, self.concurrency = temperature, max_tokens, concurrency
        self.endpoint = client.base_url

    def check(self) -> None:
        check_server(self.client, self.model, "backend.model")

    def _complete(self, prompt: str, seed: int) -> tuple[str | None, int, int]:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": self.temperature, "max_tokens": self.max_tokens, "seed": seed}
        for _ in range(self.client.max_retries + 1):  # a 200 answer without a usable message counts as malformed
            try:
                answer = self.client.post("/chat/completions", body)
            except TransientFailure as e:
                self.last_error = str(e)
                return None, 0, 0
            try:
                text = answer["choices"][0]["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError(type(text).__name__)
            except (KeyError, IndexError, TypeError):
                self.last_error = f"{self.endpoint}/chat/completions: an answer without a message ({str(answer)[:120]})"
                continue
            usage = answer.get("usage") or {}
            return text.strip(), int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        return None, 0, 0

    def _run(self, requests: Sequence[Request], seed: int) -> list[str | None]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(pool.map(lambda ir: self._complete(ir[1].prompt.completion, seed + ir[0]),
                                    enumerate(requests)))
        if requests:
            self._count(requests[0].stage, len(requests), sum(r[1] for r in results), sum(r[2] for r in results))
        return [r[0] for r in results]

    def generate(self, requests: Sequence[Request], seed: int) -> list[str | None]:
        return self._run(requests, seed)

    def rate(self, requests: Sequence[Request], seed: int) -> list[Rating]:
        ratings = [parse_rating(text) for text in self._run(requests, seed)]
        unreadable = [r.reason for r in ratings if r.value is None and r.reason]
        if unreadable:
            self.last_error = f"no 'Rating: N' (1-7) in the answer {unreadable[-1][:120]!r}"
        return ratings
