"""The OpenAI-compatible backend against a fake server on 127.0.0.1 that misbehaves on purpose."""

import json
import threading
import time

import numpy as np
import pytest

from conftest import JsonServer
from sim.backends import Request, parse_rating
from sim.embedders import OpenAIEmbedder
from sim.openai_backend import BackendError, HTTPClient, OpenAIBackend
from sim.prompts import Prompt


class FakeServer(JsonServer):
    """Answers each POST with the next scripted behaviour, then with a valid completion."""

    def __init__(self, script):
        self.script, self.seen, self.lock = list(script), [], threading.Lock()
        super().__init__(self.respond)

    def respond(self, path, body, headers):
        with self.lock:
            self.seen.append((path, body, headers.get("Authorization")))
            action = self.script.pop(0) if self.script else "ok"
        if action == "sleep":
            time.sleep(0.5)
            action = "ok"
        if isinstance(action, int):
            return action, b'{"error": "scripted"}'
        if action == "garbage":
            return 200, b"<html>not json"
        if action == "no_choices":
            return 200, json.dumps({"choices": []}).encode()
        if path.endswith("/embeddings"):
            return 200, json.dumps({"data": [{"index": i, "embedding": [float(len(t)), 1.0]}
                                             for i, t in enumerate(body["input"])]}).encode()
        content = body["messages"][0]["content"]
        reply = "Rating: 5 ### Reason: kind and honest." if content.endswith("Rating:") else "An answer."
        return 200, json.dumps({"choices": [{"message": {"content": reply}}],
                                "usage": {"prompt_tokens": 7, "completion_tokens": 3}}).encode()


@pytest.fixture
def server(request):
    fake = FakeServer(request.param if hasattr(request, "param") else [])
    yield fake
    fake.close()


def _backend(url, **kwargs):
    client = HTTPClient(url, timeout=0.2, max_retries=kwargs.pop("max_retries", 4), backoff=0.01)
    return OpenAIBackend(client, "test-model", concurrency=kwargs.pop("concurrency", 2), **kwargs)


@pytest.mark.parametrize("server", [[429, 500, "sleep", "garbage", "no_choices", 503]], indirect=True)
def test_survives_429_500_timeouts_and_malformed_bodies(server):
    backend = _backend(server.url, concurrency=1)
    texts = backend.generate([Request(Prompt("Q?"), "Q?", stage="draft")], seed=1)
    assert texts == ["An answer."]
    assert len(server.seen) == 7  # six failures, then the answer
    ratings = backend.rate([Request(Prompt("…", "Rating:"), "Q?", "A", stage="feedback")] * 3, seed=2)
    assert [r.value for r in ratings] == [5.0] * 3 and ratings[0].reason == "kind and honest."
    assert backend.stats["draft"].calls == 1 and backend.stats["feedback"].prompt_tokens == 21
    assert server.seen[-1][1]["model"] == "test-model" and server.seen[-1][0] == "/v1/chat/completions"


@pytest.mark.parametrize("server", [[500] * 10], indirect=True)
def test_a_request_that_keeps_failing_is_missing(server):
    backend = _backend(server.url, max_retries=2)
    assert backend.generate([Request(Prompt("Q?"), "Q?", stage="draft")], seed=0) == [None]
    assert backend.rate([Request(Prompt("", "Rating:"), "Q?", "A", stage="feedback")], seed=0)[0].value is None


@pytest.mark.parametrize("server", [[401]], indirect=True)
def test_non_retryable_errors_stop_with_the_servers_message(server):
    with pytest.raises(BackendError, match=r"/v1/chat/completions: HTTP 401"):
        _backend(server.url).generate([Request(Prompt("Q?"), "Q?", stage="draft")], seed=0)


def test_key_comes_from_the_environment(server, monkeypatch):
    with pytest.raises(BackendError, match="environment variable SAJAX_TEST_KEY"):
        HTTPClient(server.url, api_key_env="SAJAX_TEST_KEY")
    monkeypatch.setenv("SAJAX_TEST_KEY", "secret")
    client = HTTPClient(server.url, api_key_env="SAJAX_TEST_KEY", backoff=0.01)
    vectors = OpenAIEmbedder(client, "emb").embed(["ab", "abcd"])
    assert server.seen[-1][2] == "Bearer secret"
    np.testing.assert_allclose(vectors, np.array([[2, 1], [4, 1]]) / np.linalg.norm([[2, 1], [4, 1]], axis=1,
                                                                                     keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("text, value, reason", [
    ("Rating: 6 ### Reason: fair.", 6.0, "fair."),
    (" 3 ### Reason: rude", 3.0, "rude"),
    ("rating: 7", 7.0, None),
    ("I think it is fine.", None, "I think it is fine."),
    ("Rating: 9 ### Reason: too high", None, "Rating: 9 ### Reason: too high"),
    (None, None, None),
])
def test_rating_parsing(text, value, reason):
    rating = parse_rating(text)
    assert (rating.value, rating.reason) == (value, reason)
