"""sajax-serve, driven by the official openai client, serving SmolLM2-135M-Instruct (a real chat template)."""

import asyncio
import json

import numpy as np
import openai
import pytest

from conftest import with_overrides
from sajax.config_files import bundled_config, load_config
from sajax.infer import generate, lm, serve
from sim import run, store
from sim.embedders import LocalModelEmbedder, OpenAIEmbedder
from sim.openai_backend import OpenAIClient

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model(smollm2):
    _, config, params, tok = smollm2
    return lm.LanguageModel(config, params, tok)


@pytest.fixture(scope="module")
def server(model):
    running = serve.Running(serve.Engine(model, "smollm2", max_batch=4, max_wait_ms=300))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)


def test_chat_in_the_template_with_logprobs_equals_the_model_in_process(model, server, client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    answer = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=16,
                                            logprobs=True, top_logprobs=5)
    text = answer.choices[0].message.content
    assert text == model.generate([[("user", QUESTION[0]["content"])]], max_new_tokens=16)[0]
    content = answer.choices[0].logprobs.content
    assert "".join(t.token for t in content) == text and answer.choices[0].finish_reason == "stop"
    for token in content:  # greedy: the chosen token is the most likely one, its log p the top one's
        assert len(token.top_logprobs) == 5 and token.top_logprobs[0].token == token.token
        assert token.logprob == token.top_logprobs[0].logprob
    assert answer.usage.completion_tokens == len(content) + 1  # and the end-of-turn token
    # the log-probabilities are the model's: Σ log p equals scoring the generated tokens in one forward pass
    prompt = server.engine.model.context_ids([("user", QUESTION[0]["content"])])
    [done] = server.engine.generate([serve.Job(prompt, 16, temperature=0.0, top_logprobs=5)])
    assert done.text == text
    scored = generate.score_continuations(model.config, model.params, [prompt], [done.tokens[:len(done.logprobs)]])
    np.testing.assert_allclose(sum(done.logprobs), scored[0], rtol=0, atol=1e-4)


def test_concurrent_requests_are_batched_and_each_keeps_its_own_seed(server, client):
    async def ask():
        sdk = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0)
        settings = [dict(temperature=0.0), dict(temperature=1.0, seed=7), dict(temperature=1.0, seed=7),
                    dict(temperature=1.0, seed=8, top_p=0.9)]
        async with sdk:
            return await asyncio.gather(*(sdk.chat.completions.create(model="smollm2", messages=QUESTION,
                                                                      max_tokens=16, **s) for s in settings))

    before = len(server.engine.batches)
    greedy, seeded, again, other = [a.choices[0].message.content for a in asyncio.run(ask())]
    assert max(server.engine.batches[before:]) > 1  # one jitted call served several requests
    assert greedy == "The capital of France is Paris." and seeded == again
    assert other != seeded  # another seed (and top_p) samples another reply, in the same batch


def test_completions_stop_strings_and_embeddings(model, server, client):
    prompts = ["The capital of France is", "One, two,"]
    full = client.completions.create(model="smollm2", prompt=prompts, max_tokens=12, temperature=0)
    answer = client.completions.create(model="smollm2", prompt=prompts, max_tokens=12, temperature=0, logprobs=2,
                                       stop=[","])
    assert any("," in choice.text for choice in full.choices)
    for choice, unstopped in zip(answer.choices, full.choices):
        assert choice.text == unstopped.text.split(",")[0]  # the text ends before the stop string
        assert choice.finish_reason == ("stop" if "," in unstopped.text else unstopped.finish_reason)
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == len(choice.logprobs.top_logprobs)
    texts = ["Should you return a lost wallet?", "Is it fine to lie to a friend?"]
    served = OpenAIEmbedder(OpenAIClient(server.url, backoff=0.01), "smollm2").embed(texts)
    local = LocalModelEmbedder(model.config, model.params, model.tokenizer).embed(texts)
    np.testing.assert_allclose(served, local, rtol=0, atol=1e-5)
    base64 = client.embeddings.create(model="smollm2", input=texts)  # the client's default encoding
    np.testing.assert_allclose(np.array([d.embedding for d in base64.data]), local, rtol=0, atol=1e-5)


def test_bad_requests_get_clean_4xx_in_openais_format(model, server, client):
    def refused(error, **changes):
        request = {**dict(model="smollm2", messages=QUESTION, max_tokens=4), **changes}
        with pytest.raises(error) as caught:
            client.chat.completions.create(**request)
        return caught.value.status_code, caught.value.body

    assert refused(openai.NotFoundError, model="gpt-9")[1]["message"] == ("model 'gpt-9' is not served here; this "
                                                                          "server serves 'smollm2'")
    status, body = refused(openai.BadRequestError, temperature=5)
    assert status == 400 and body["param"] == "temperature" and "less than or equal to 2" in body["message"]
    assert "streaming is not supported" in refused(openai.BadRequestError, stream=True)[1]["message"]
    assert refused(openai.BadRequestError, response_format={"type": "json_object"})[1]["param"] == "response_format"
    assert "exceeds the model's context of 8192" in refused(openai.BadRequestError, max_tokens=9000)[1]["message"]
    assert refused(openai.BadRequestError, messages=[])[1]["param"] == "messages"
    assert refused(openai.BadRequestError, top_logprobs=30, logprobs=True)[1]["param"] == "top_logprobs"
    full = serve.Running(serve.Engine(model, "smollm2", max_queue=0))  # a queue that is always full
    try:
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            openai.OpenAI(base_url=full.url, api_key="none", max_retries=0).chat.completions.create(
                model="smollm2", messages=QUESTION, max_tokens=4)
    finally:
        full.close()


def test_a_society_runs_against_sajax_serve(tmp_path, server):
    cfg = with_overrides(load_config(bundled_config("sim_tiny.py")), rounds=1, **{
        "world.grid_size": 2, "world.tgt_agent_count": 2, "embedder.kind": "openai",
        # the agents on the server; the observers scripted: SmolLM2-135M writes no digit where an observer's rating
        # goes (not among its 20 most likely tokens even after a prefilled "Rating:"), so every one is missing
        **{f"backend.{key}": value for key, value in dict(
            kind="openai", base_url=server.url, model="smollm2", max_new_tokens=16, reason_tokens=8,
            max_missing_fraction=1.0).items()}, "observer_backend.max_missing_fraction": 1.0})
    metrics = run.simulate(cfg, tmp_path / "society")
    records = store.read_records(tmp_path / "society")
    assert len(records) == 4 and all(r["draft_answer"] and r["model"] == "openai:smollm2" for r in records)
    journal = [json.loads(line) for line in (tmp_path / "society/rounds/000001/journal.jsonl").open()]
    assert metrics[0]["journal"]["sent"] == len(journal) and {e["kind"] for e in journal} == {"chat", "embeddings"}
    ratings = [f["rating"] for r in records for f in r["feedback"]]
    print(f"sajax-serve society: {sum(x is not None for x in ratings)} of {len(ratings)} peer ratings read")
    assert all(x is None or 1 <= x <= 7 for x in ratings)
