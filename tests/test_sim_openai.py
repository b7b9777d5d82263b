"""The OpenAI-compatible backend against a fake server on 127.0.0.1 that misbehaves on purpose."""

import json
import re
import threading
import time

import numpy as np
import pytest
from conftest import JsonServer

from sim import openai_backend
from sim.backends import Request, parse_rating
from sim.embedders import OpenAIEmbedder
from sim.openai_backend import BackendError, OpenAIBackend, OpenAIClient
from sim.prompts import Prompt


class FakeServer(JsonServer):
    """Answers each POST with the next scripted behaviour, then with a valid completion."""

    def __init__(self, script):
        self.script, self.seen, self.lock = list(script), [], threading.Lock()
        self.in_flight = self.most_in_flight = 0
        super().__init__(self.respond)

    def respond(self, path, body, headers):
        if body is None:  # GET /models
            return 200, json.dumps({"object": "list", "data": [{"id": "test-model"}, {"id": "emb"}]}).encode()
        with self.lock:
            self.seen.append((path, body, headers.get("Authorization")))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            action = self.script.pop(0) if self.script else "ok"
        try:
            return self.act(action, path, body)
        finally:
            with self.lock:
                self.in_flight -= 1

    def act(self, action, path, body):
        if action == "sleep":
            time.sleep(0.5)
            action = "ok"
        if isinstance(action, int):
            return action, b'{"error": "scripted"}'
        if action == "garbage":
            return 200, b"<html>not json"
        if action == "no_choices":
            return 200, json.dumps({"choices": []}).encode()
        if action == "per_token":  # llama.cpp without pooling: a vector per token
            return 200, json.dumps({"data": [{"index": i, "embedding": [[1.0, 0.0]] * len(t)}
                                             for i, t in enumerate(body["input"])]}).encode()
        if action == "ragged":
            return 200, json.dumps({"data": [{"index": i, "embedding": [1.0] * (i + 2)}
                                             for i, t in enumerate(body["input"])]}).encode()
        if action == "slow":
            time.sleep(0.2)
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
    client = OpenAIClient(url, timeout=0.2, max_retries=kwargs.pop("max_retries", 4), backoff=0.01)
    return OpenAIBackend(client, "test-model", concurrency=kwargs.pop("concurrency", 2), **kwargs)


@pytest.mark.parametrize("server", [[429, 500, "sleep", "garbage", "no_choices", 503]], indirect=True)
def test_survives_429_500_timeouts_and_malformed_bodies(server):
    backend = _backend(server.url, concurrency=1, max_retries=6)
    texts = backend.generate([Request(Prompt("Q?"), "Q?", stage="draft")], seed=1)
    assert texts == ["An answer."]
    assert len(server.seen) == 7  # six failures, then the answer
    ratings = backend.rate([Request(Prompt("…", "Rating:"), "Q?", "A", stage="feedback")] * 3, seed=2)
    assert [r.value for r in ratings] == [5.0] * 3 and ratings[0].reason == "kind and honest."
    assert backend.stats["draft"].calls == 1 and backend.stats["feedback"].prompt_tokens == 21
    assert server.seen[-1][1]["model"] == "test-model" and server.seen[-1][0] == "/v1/chat/completions"


def test_answers_and_ratings_have_their_own_token_limits(server):
    backend = _backend(server.url, max_tokens=48, reason_tokens=20, revision_tokens=96)
    backend.generate([Request(Prompt("Q?"), "Q?", stage="draft")], seed=0)
    backend.generate([Request(Prompt("Revise"), "Q?", "A", stage="revise")], seed=0)
    backend.rate([Request(Prompt("…", "Rating:"), "Q?", "A", stage="feedback")], seed=0)
    assert [body["max_tokens"] for _, body, _ in server.seen] == [48, 96, 20 + OpenAIBackend.RATING_PREFIX_TOKENS]
    backend.revision_tokens = 0  # the default: revisions get the drafts' limit
    backend.generate([Request(Prompt("Revise"), "Q?", "A", stage="revise")], seed=0)
    assert server.seen[-1][1]["max_tokens"] == 48


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
        OpenAIClient(server.url, api_key_env="SAJAX_TEST_KEY")
    monkeypatch.setenv("SAJAX_TEST_KEY", "secret")
    client = OpenAIClient(server.url, api_key_env="SAJAX_TEST_KEY", backoff=0.01)
    vectors = OpenAIEmbedder(client, "emb").embed(["ab", "abcd"])
    assert server.seen[-1][2] == "Bearer secret"
    np.testing.assert_allclose(vectors, np.array([[2, 1], [4, 1]]) / np.linalg.norm([[2, 1], [4, 1]], axis=1,
                                                                                     keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("server", [["slow"] * 12], indirect=True)
def test_requests_run_concurrently_up_to_the_limit(server):
    texts = _backend(server.url, concurrency=3).generate([Request(Prompt(f"Q{i}?"), "Q?", stage="draft")
                                                          for i in range(12)], seed=0)
    assert texts == ["An answer."] * 12 and server.most_in_flight == 3


@pytest.mark.parametrize("server", [["per_token", "ragged"]], indirect=True)
def test_embeddings_that_are_not_one_vector_per_input_are_named(server):
    embedder = OpenAIEmbedder(OpenAIClient(server.url, backoff=0.01), "emb")
    with pytest.raises(ValueError, match=r"/embeddings \(embedder.model 'emb'\): input 0 got 2 vectors \(one per "
                                         r"token\) .* enable pooling \(llama.cpp: --pooling mean\)"):
        embedder.embed(["ab", "abc"])
    with pytest.raises(ValueError, match=r"embeddings of different sizes \[2, 3\]"):
        embedder.embed(["ab", "abc"])


def test_the_embedder_defaults_to_the_backends_server_and_limits(server):
    from sajax.config_files import bundled_config, load_config
    from sim import run

    cfg = load_config(bundled_config("sim_tiny.py"))
    cfg.backend.update(dict(kind="openai", base_url=server.url, model="test-model", timeout=7.0, max_retries=2))
    cfg.embedder.update(dict(kind="openai", model="emb"))
    embedder = run.make_embedder(cfg.embedder, run.LocalModels(0), cfg.backend)
    assert (embedder.client.base_url, embedder.model) == (server.url, "emb")
    assert (embedder.client.timeout, embedder.client.max_retries) == (7.0, 2)
    assert embedder.embed(["ab"]).shape == (1, 2)


@pytest.mark.parametrize("text, value, reason", [
    ("Rating: 6 ### Reason: fair.", 6.0, "fair."),
    (" 3 ### Reason: rude", 3.0, "rude"),
    ("rating: 7", 7.0, None),
    ("I think it is fine.", None, "I think it is fine."),
    ("Rating: 9 ### Reason: too high", None, "Rating: 9 ### Reason: too high"),
    (None, None, None),
    # what real chat models write (llama.cpp + SmolLM2-135M-Instruct): "Rating: N" anywhere, markdown, "N/7"
    ("**Rating:** 5\n**Reason:** kind and honest", 5.0, "kind and honest"),
    ("The answer is considerate. Rating: 6.", 6.0, "The answer is considerate"),
    ("Rating: 4/7. Reason: polite", 4.0, "polite"),
    ("Rating: 10 **#Reason**", None, "Rating: 10 **#Reason**"),  # outside 1..7: missing, the raw reply kept
    ("Rating: N ### Reason: N is the number", None, "Rating: N ### Reason: N is the number"),
    ("Rating: 12", None, "Rating: 12"),
])
def test_rating_parsing(text, value, reason):
    rating = parse_rating(text)
    assert (rating.value, rating.reason) == (value, reason)


class ReadoutServer(JsonServer):
    """A server with chosen capabilities: `formats` — the response_format types it takes (others: HTTP 400, as
    llama.cpp answers json_schema); `logprobs` — whether it returns them. Its rating replies are fixed."""

    def __init__(self, formats=(), logprobs=False, reply="Rating: 5 ### Reason: kind"):
        self.formats, self.logprobs, self.reply, self.seen = set(formats), logprobs, reply, []
        super().__init__(self.respond)

    def respond(self, path, body, headers):
        if body is None:
            return 200, json.dumps({"data": [{"id": "m"}]}).encode()
        self.seen.append(body)
        response_format = body.get("response_format")
        if response_format and response_format["type"] not in self.formats:
            return 400, b'{"error": {"message": "response_format not supported"}}'
        if response_format:
            text = json.dumps({"rating": 6, "reason": "kind and fair"})
        elif body["messages"][-1]["content"].endswith(openai_backend.NUMBER_ONLY):
            text = "7"
        else:
            text = self.reply
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        if self.logprobs and body.get("logprobs"):
            choice["logprobs"] = {"content": self.tokens(text)}
        return 200, json.dumps({"object": "chat.completion", "choices": [choice]}).encode()

    @staticmethod
    def tokens(text):
        """The reply as tokens; at a digit (or the literal N, or a lone reply) p(5) = .5, p(6) = .3, p(4) = .2."""
        pieces = re.findall(r"\s*\S+", text) if len(text) > 1 else [text]
        out = []
        for piece in pieces:
            top = [{"token": piece, "logprob": -0.1, "bytes": None}]
            if piece.strip() in {"5", "N", "7"}:
                top = [{"token": t, "logprob": float(np.log(p)), "bytes": None}
                       for t, p in ((" 5", 0.5), ("6", 0.3), (" 4", 0.2))]
            out.append({"token": piece, "logprob": -0.1, "bytes": None, "top_logprobs": top})
        return out


def _rate(backend, n=1):
    return backend.rate([Request(Prompt("Q: …\nA: …", "Rating:"), "Q?", "A", stage="feedback")] * n, seed=0)


def test_auto_readout_picks_structured_then_logprobs_then_text_and_reads_each(capsys):
    cases = [(dict(formats={"json_schema", "json_object"}, logprobs=True), "structured", "json_schema", 6.0,
              "kind and fair"),
             (dict(formats={"json_object"}), "structured", "json_object", 6.0, "kind and fair"),  # llama.cpp's variant
             (dict(logprobs=True), "logprobs", None, 5 * 0.5 + 6 * 0.3 + 4 * 0.2, "kind"),
             (dict(logprobs=True, reply="Rating: N ### Reason: fair"), "logprobs", None, 5.1, "fair"),  # literal N
             (dict(logprobs=True, reply="A kind answer."), "logprobs", None, 5.1, "A kind answer."),  # number asked
             (dict(), "text", None, 5.0, "kind")]
    for capabilities, readout, response_format, value, reason in cases:
        server = ReadoutServer(**capabilities)
        try:
            backend = OpenAIBackend(OpenAIClient(server.url, max_retries=0), "m")
            backend.check()
            assert (backend.readout, (backend.response_format or {}).get("type")) == (readout, response_format)
            assert f"ratings read by '{readout}'" in capsys.readouterr().err
            rating = _rate(backend)[0]
            assert rating.value == pytest.approx(value) and rating.reason == reason, capabilities
            assert backend.rating_readout == ("digits" if readout == "logprobs" else "generate")
        finally:
            server.close()


def test_a_readout_the_server_cannot_give_is_refused_by_name():
    server = ReadoutServer()
    try:
        with pytest.raises(BackendError, match=r"takes none of the response_format variants .* "
                                               r"\(observer_backend.rating_readout 'structured'\)"):
            OpenAIBackend(OpenAIClient(server.url, max_retries=0), "m", readout="structured",
                          setting="observer_backend").check()
    finally:
        server.close()
    with pytest.raises(ValueError, match=r"backend.rating_readout of kind 'openai' must be 'auto' or one of"):
        OpenAIBackend(OpenAIClient("http://127.0.0.1:1/v1"), "m", readout="digits")
