"""Whole simulations: record counts, determinism, crash safety, the dataset builder and the trainer reading it."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import JsonServer, cli_env, with_overrides
from sajax.config_files import load_config
from sajax.data import alignment
from sajax.train import loop
from sim import calibrate, dataset, prompts, run, store
from sim.backends import Rating

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BIN = os.path.dirname(sys.executable)
ENV = cli_env()


def sim_config(**overrides):
    return with_overrides(load_config(CONFIGS / "sim_tiny.py"), **overrides)


def _tree_bytes(directory: Path, pattern: str) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob(pattern))}


def test_scripted_world_is_deterministic_and_writes_expected_records(tmp_path):
    for name in ("a", "b"):
        metrics = run.simulate(sim_config(), tmp_path / name)
        assert len(metrics) == 2
    records = store.read_records(tmp_path / "a")
    assert len(records) == 9 * 2 and {r["round"] for r in records} == {1, 2}
    assert all(len(r["feedback"]) == 4 and r["model"] == "scripted" for r in records)
    assert _tree_bytes(tmp_path / "a", "records.jsonl") == _tree_bytes(tmp_path / "b", "records.jsonl")
    summary = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert summary[0]["stages"]["feedback"]["calls"] == 36 and summary[0]["stages"]["draft"]["calls"] == 9
    assert summary[1]["alignment_after"]["mean"] >= summary[0]["alignment_before"]["mean"]
    assert (tmp_path / "a" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    counts = [dataset.build(store.read_records(tmp_path / n), tmp_path / f"ds_{n}") for n in ("a", "b")]
    assert counts[0] == counts[1] and sum(counts[0]["train"].values()) > 0
    assert _tree_bytes(tmp_path / "ds_a", "*.array_record*") == _tree_bytes(tmp_path / "ds_b", "*.array_record*")
    with pytest.raises(store.WorkdirError, match="exists and is not empty: pass --resume"):
        run.simulate(sim_config(), tmp_path / "a")
    with pytest.raises(store.WorkdirError, match=r"another configuration \(changed: seed\)"):
        run.simulate(sim_config(seed=3), tmp_path / "a", resume=True)


def test_dataset_kinds_split_and_plain_tfds(tmp_path):
    run.simulate(sim_config(rounds=3, **{"world.grid_size": 4}), tmp_path / "w")
    out = tmp_path / "ds"
    counts = dataset.build(store.read_records(tmp_path / "w"), out)
    assert all(counts["train"][k] > 0 for k in alignment.KINDS)
    imitation, others = counts["train"]["imitation"], counts["train"]["self_critic"]
    assert imitation >= 3 * others  # sampled towards 5 : 1 : 1
    code = ("import sys, tensorflow_datasets as tfds\n"
            "b = tfds.builder_from_directory(sys.argv[1])\n"
            "assert 'sajax' not in sys.modules and 'sim' not in sys.modules\n"
            "print(sorted(b.info.features.keys()), sorted(b.info.splits.keys()))\n"
            "qs = [set(r['query'] for r in b.as_data_source(s)) for s in ('train', 'validation')]\n"
            "print(len(qs[0] & qs[1]), b.info.features['kind'].names)\n")
    out_text = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    assert out_text[0] == ("['input', 'instruction', 'kind', 'model', 'query', 'responses', 'scores', 'world_id'] "
                           "['train', 'validation']")
    assert out_text[1] == "0 ['imitation', 'self_critic', 'realignment']"


def models_listing(model: str = "fake") -> tuple[int, bytes]:
    """The answer of GET /v1/models on an OpenAI-compatible server that serves `model`."""
    return 200, json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode()


def slow_deterministic_completion(path, body, headers):
    """An OpenAI-compatible answer that depends only on the prompt and takes 20 ms (so a kill lands mid-round)."""
    if body is None:
        return models_listing()
    time.sleep(0.02)
    prompt = body["messages"][0]["content"]
    h = zlib.crc32(prompt.encode())
    reply = (f"Rating: {1 + h % 7} ### Reason: reason {h % 97}." if prompt.endswith("Rating:")
             else f"I would help ({h % 1000}).")
    return 200, json.dumps({"choices": [{"message": {"content": reply}}]}).encode()


def test_sigkill_mid_round_then_resume_gives_identical_records(tmp_path):
    server = JsonServer(slow_deterministic_completion)
    flags = ["--config.rounds=6", f"--config.backend.base_url={server.url}", "--config.backend.kind=openai",
             "--config.backend.model=fake", "--config.backend.concurrency=4"]
    command = lambda wd, *extra: [os.path.join(BIN, "sajax-sim"), f"--workdir={wd}", *flags, *extra]  # noqa
    straight = subprocess.run(command(tmp_path / "straight"), capture_output=True, text=True, env=ENV, timeout=300)
    assert straight.returncode == 0, straight.stderr
    process = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=ENV)
    deadline = time.time() + 120
    while not store.committed_rounds(tmp_path / "killed") and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.25)  # inside the next round
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = store.committed_rounds(tmp_path / "killed")
    assert 1 <= len(done) < 6, done
    refused = subprocess.run(command(tmp_path / "killed"), capture_output=True, text=True, env=ENV, timeout=60)
    assert refused.returncode == 1 and "pass --resume" in refused.stderr
    resumed = subprocess.run(command(tmp_path / "killed", "--resume"), capture_output=True, text=True, env=ENV,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _tree_bytes(tmp_path / "killed", "records.jsonl") == _tree_bytes(tmp_path / "straight", "records.jsonl")
    assert len(store.read_records(tmp_path / "killed")) == 6 * 9
    server.close()


def test_local_backend_world_feeds_the_trainer(tmp_path):
    cfg = sim_config(**{"backend.kind": "local", "observer_backend.kind": "local", "backend.max_new_tokens": 12,
                        "backend.reason_tokens": 6, "observer_backend.max_new_tokens": 12,
                        "observer_backend.reason_tokens": 6, "rounds": 1, "embedder.kind": "local"})
    metrics = run.simulate(cfg, tmp_path / "w")
    records = store.read_records(tmp_path / "w")
    assert len(records) == 9 and records[0]["model"] == "local:random-tiny"
    ratings = [f["rating"] for r in records for f in r["feedback"]]
    assert all(1.0 <= x <= 7.0 for x in ratings)  # expected value of p(1..7)
    assert metrics[0]["stages"]["draft"]["completion_tokens"] > 0
    dataset.build(records, tmp_path / "ds", validation_percent=0)
    train_cfg = load_config(CONFIGS / "tiny.py")
    train_cfg.data.path = str(tmp_path / "ds")
    train_cfg.train.steps = 2
    train_cfg.eval_every = 0
    loop.run(train_cfg, tmp_path / "train")
    assert (tmp_path / "train" / "checkpoints" / "2").is_dir()


def test_bad_sim_settings_fail_at_start(tmp_path):
    with pytest.raises(ValueError, match="tgt_agent_count \\(9\\) exceeds"):
        run.simulate(sim_config(**{"world.tgt_agent_count": 9}), tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="nope.txt: questions_file not found"):
        run.simulate(sim_config(questions_file=str(tmp_path / "nope.txt")), tmp_path / "w")
    (tmp_path / "q.jsonl").write_text('{"question": "fine?"}\n{"q": "wrong field"}\n')
    with pytest.raises(ValueError, match="q.jsonl line 2: expected a JSON object with a 'question' field"):
        run.simulate(sim_config(questions_file=str(tmp_path / "q.jsonl")), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_memories_are_seeded_from_the_prior_by_label(tmp_path):
    prior = [{"question": f"good question {i}?", "answer": f"kind answer {i}", "label": "good"} for i in range(5)]
    prior += [{"question": f"bad question {i}?", "answer": f"cruel answer {i}", "label": "bad"} for i in range(5)]
    (tmp_path / "prior.jsonl").write_text("\n".join(json.dumps(p) for p in prior))
    run.simulate(sim_config(rounds=1, prior_file=str(tmp_path / "prior.jsonl"), prior_per_agent=2), tmp_path / "w")
    agents, _ = store.load_state(tmp_path / "w", 1)
    for agent in agents:
        seeded = agent.memory.answers[:2]
        assert len(seeded) == 2 and all(a.startswith("kind" if agent.label == "good" else "cruel") for a in seeded)
        assert len(agent.memory.questions) == 3 and agent.memory.embeddings.shape == (3, 256)
    (tmp_path / "bad_prior.jsonl").write_text('{"question": "q", "answer": "a", "label": "neutral"}\n')
    with pytest.raises(ValueError, match="bad_prior.jsonl line 1: label must be 'good' or 'bad'"):
        run.simulate(sim_config(prior_file=str(tmp_path / "bad_prior.jsonl")), tmp_path / "w2")


def test_local_ratings_equal_scoring_each_rating(tmp_path):
    from sajax.formats import tokenizer
    from sajax.infer import generate
    from sajax.model import decoder
    from sajax.model.config import ModelConfig
    from sim.backends import Request
    from sim.local_backend import LocalBackend
    from sim.prompts import Prompt

    tok = tokenizer.train_tokenizer(tokenizer.demo_corpus(), tmp_path / "tok", vocab_size=512)
    config = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, initializer_range=0.5)
    params = decoder.init_params(config, 4)
    instructions = ["Question: Is it kind? Answer: yes.", "Question: Lie? Answer: sure.", "Rate it."]
    prompts = [Prompt(text, "Rating:", prefill=True) for text in instructions + instructions[:1]]
    encoded = [tok.encode(p.completion) for p in prompts]  # no chat template: completion prompts
    logp = generate.score_continuations(config, params, [e for e in encoded for _ in range(7)],
                                        [tok.encode(f" {n}", add_special_tokens=False) for n in range(1, 8)] * 4)
    probs = np.exp(logp.reshape(4, 7))
    probs /= probs.sum(axis=1, keepdims=True)  # p(rating = n | prompt), n = 1..7, each rating scored in full
    expected_values = probs @ np.arange(1, 8)
    assert np.ptp(expected_values) > 1e-3  # the prompts get different ratings: the comparisons have teeth
    # rate(): the rating from one prefill (chunks of 2 rows), then "<rating> ### Reason:" appended to that cache
    # and the reason decoded — the same reason as generating from the whole text; identical prompts share their
    # prefill
    greedy = LocalBackend(config, params, tok, batch_size=2, temperature=0.0, reason_tokens=5)
    assert greedy.rating_readout == "digits" and greedy.digits.one_pass
    requests = [Request(p, "q", "a", stage="feedback") for p in prompts]
    ratings = greedy.rate(requests, seed=0)
    np.testing.assert_allclose([r.value for r in ratings], expected_values, atol=1e-5)
    marker = tok.encode(" ### Reason:", add_special_tokens=False)
    full = [e + tok.encode(f" {n}", add_special_tokens=False) + marker
            for e, n in zip(encoded, np.argmax(probs, axis=1) + 1)]
    out = generate.generate(config, params, full, max_new_tokens=5, share_prefixes=False,
                            eos_token_id=generate.stop_token_ids(config, tok), pad_token_id=tok.pad_token_id)
    assert [r.reason for r in ratings] == [tok.decode(row[:n], skip_special_tokens=True).strip() or None
                                           for row, n in zip(out.tokens, out.lengths)]
    assert ratings[0] == ratings[3]
    argmax = LocalBackend(config, params, tok, batch_size=2, temperature=0.0, reason_tokens=5, rating_mode="argmax")
    assert [r.value for r in argmax.rate(requests, seed=0)] == (np.argmax(probs, axis=1) + 1.0).tolist()
    greedy.digits.one_pass = False  # tokenizers whose " 1" … " 7" differ in more than a last token: each scored
    greedy.digits.prefix = []
    scored = greedy.rate(requests, seed=0)
    np.testing.assert_allclose([r.value for r in scored], expected_values, atol=1e-5)
    assert [r.reason for r in scored] == [r.reason for r in ratings]


def test_answers_stop_at_the_prompts_own_labels():
    """A small model sometimes copies its prompt into its answer ('You replied: "…', '\\nA friend asked: …'): the
    answer ends at the first label the prompts use, as a server ends at a request's stop sequences."""
    assert prompts.answer_text('You replied: "Be kind."') is None
    assert prompts.answer_text("Be kind.\n\nA friend asked: Is it ok?\nYou replied:") == "Be kind."
    assert prompts.answer_text("  Be kind, because it helps.  ") == "Be kind, because it helps."
    assert prompts.answer_text("   ") is None and prompts.answer_text(None) is None
    built = [prompts.draft("Q?", [("Old?", "Old answer.")]), prompts.revise("Q?", "A.", 3.0, [(2.0, "Rude.")]),
             *(prompts.feedback("Q?", "A.", [], readout) for readout in prompts.READOUTS),
             *(prompts.observe_engagement("Q?", "A.", readout) for readout in prompts.READOUTS)]
    labels = {m for prompt in built  # "Question:", "A friend asked:", …: capitalised words and a colon
              for m in re.findall(r"(?:^|(?<=\. ))[A-Z][a-z]*(?: [a-z]+)*:", prompt.completion, re.MULTILINE)}
    labels.discard("How engaging is the answer:")  # a question ending in a colon, not a label
    assert {"Question:", "You replied:", "A friend asked:", "Reply:"} <= labels
    for label in labels:  # an answer that goes on to copy any labelled part of a prompt is cut before it
        assert prompts.answer_text(f"Be kind.\n{label} more") == "Be kind.", label
    assert prompts.answer_text("Be kind.\n- (3.2/7) because it is rude.") == "Be kind."  # a copied feedback line


class SwayedByConfidence:
    """A rater by construction: 4 for every answer, 6 when its author says they are completely sure — except for
    questions marked [steady]; one request's rating is missing."""

    rating_readout = "digits"

    def rate(self, requests, seed):
        assert all(r.stage == "feedback" and r.answer in r.prompt.instruction for r in requests)
        out = [Rating(6.0 if r.answer.startswith(calibrate.CONFIDENT) and "[steady]" not in r.question else 4.0,
                      "ok") for r in requests]
        out[-1] = Rating(None, None)
        return out


def test_rater_sycophancy_is_the_rating_shift_the_authors_confidence_buys():
    pairs = [{"question": f"Q{i}{' [steady]' if i < 2 else ''}?", "aligned": "Be kind.", "misaligned": "Be cruel."}
             for i in range(8)]
    result = calibrate.confidence_sycophancy(SwayedByConfidence(), pairs, "digits")
    assert result["n"] == 15 and result["missing"] == 1  # 16 answers, the last one's unsure rating missing
    assert result["shift"] == pytest.approx(2.0 * 11 / 15)  # 12 swayed (4 answers are steady), 1 of them unrated
    assert result["mean_unsure"] == 4.0
