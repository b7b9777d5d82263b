"""The original Stable Alignment project's real files — its per-agent logs, its prior file, its release data — made
here exactly as its writers make them (pandas `to_json(orient='records', indent=2)`: one JSON array per file,
whatever the name), with its failure values ("8" for a peer rating it could not parse, -1.0 for an observer
score), converted and trained on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import cli_env, with_overrides
from sajax.config_files import load_config
from sajax.data import alignment
from sajax.train import loop
from sim import dataset, original, run, store

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BIN = os.path.dirname(sys.executable)
ENV = cli_env()
QUESTIONS = ["Should I return a lost wallet?", "Is it fine to lie to a friend?", "May I read my partner's messages?"]


def write_like_the_original(path: Path, rows: list[dict]) -> None:
    """What the original's agent does after every interaction: its whole log as a DataFrame, written with
    `to_json(path, orient='records', indent=2)` (no `lines=True`), whatever the file's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_json(path, orient="records", indent=2)


def log_row(agent_id: int, label: str, iteration: int, ratings: list[str], reasons: list[str], before: float,
            after: float, draft: str | None = None, revised: str | None = None) -> dict:
    """One row of an agent's external memory, with the original's fields and types."""
    question = QUESTIONS[(agent_id + iteration) % len(QUESTIONS)]
    draft = draft or f"Agent {agent_id} ({label}) answers round {iteration}: it depends."
    return {"agent_id": agent_id, "label": label, "iteration": iteration, "question": question,
            "draft_answer": draft, "target_id": [(agent_id + k + 1) % 9 for k in range(len(ratings))],
            "feedback": reasons, "rating": ratings,
            "revised_answer": revised or f"Agent {agent_id} revises round {iteration}: be honest and kind.",
            "gen_moral_score_before": before, "gen_moral_reason_before": "Somewhat evasive.",
            "gen_moral_score_after": after, "gen_moral_reason_after": "Honest and considerate.",
            "gen_engagement_score_before": 4.0, "gen_engagement_reason_before": "Short.",
            "gen_engagement_score_after": 5.0, "gen_engagement_reason_after": "Clear.",
            "cls_moral_score_before": 0, "cls_moral_score_after": 0}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """`data/cache/` with two worlds: world_0 (3 agents × 2 rounds), world_1 (1 agent × 2 rounds). Its failure
    values: 3 peer ratings "8", 2 observer scores -1.0, one row with 3 reasons but 2 ratings, one revision equal
    to its draft."""
    root = tmp_path_factory.mktemp("original") / "data" / "cache"
    ok = ["7", "6", "5"]
    reasons = ["Kind and honest.", "Mostly fair.", "Could say more."]
    logs = {
        ("world_0", 0): [log_row(0, "good", 0, ok, reasons, 4.0, 6.0),
                         log_row(0, "good", 1, ["8", "6", "5"], reasons, 5.0, 6.0)],
        ("world_0", 1): [log_row(1, "bad", 0, ["8", "8", "3"], reasons, -1.0, 5.0),
                         log_row(1, "bad", 1, ["4", "2"], reasons, 3.0, 2.0)],  # 3 reasons, 2 ratings
        ("world_0", 2): [log_row(2, "good", 0, ok, reasons, 6.0, -1.0),
                         log_row(2, "good", 1, ok, reasons, 5.0, 5.0, draft="Same text.", revised="Same text.")],
        ("world_1", 0): [log_row(0, "bad", 0, ok, reasons, 2.0, 6.0), log_row(0, "bad", 1, ok, reasons, 3.0, 6.0)],
    }
    for (world, agent), rows in logs.items():
        write_like_the_original(root / world / "external_memory" / f"agent_{agent}.jsonl", rows)
    return root


def test_the_original_logs_convert_with_failure_values_missing(cache):
    text = (cache / "world_0" / "external_memory" / "agent_1.jsonl").read_text()
    assert text.startswith("[") and '"rating":[\n' in text.replace(" ", "")  # a pretty-printed array, not JSONL
    records, summary = original.convert([cache])
    assert (summary.files, summary.records) == (4, 8)
    assert (summary.missing_peer_ratings, summary.missing_observer_scores, summary.unpaired) == (3, 2, 1)
    assert {r["world_id"] for r in records} == {0, 1}
    by_agent = {(r["world_id"], r["agent"], r["round"]): r for r in records}
    assert [f["rating"] for f in by_agent[(0, 1, 0)]["feedback"]] == [None, None, 3.0]
    assert by_agent[(0, 1, 0)]["gen_moral_score_before"] is None
    assert len(by_agent[(0, 1, 1)]["feedback"]) == 2  # paired as far as both lists go
    # the same records from a world's external_memory/ folder, a world folder, and files given one by one
    world0 = original.convert([cache / "world_0" / "external_memory"])[0]
    assert world0 == original.convert([cache / "world_0"])[0] == [r for r in records if r["world_id"] == 0]
    files = sorted((cache / "world_1" / "external_memory").glob("*.jsonl")) + [
        cache / "world_0" / "external_memory" / "agent_2.jsonl"]
    assert len(original.convert(files)[0]) == 4
    with pytest.raises(FileNotFoundError, match="no agent_\\*.jsonl log files"):
        original.convert([cache.parent])


def test_converted_data_holds_only_ratings_and_no_duplicates(cache, tmp_path):
    records, _ = original.convert([cache])
    dataset.build(records, tmp_path / "ds", ratios=None, validation_percent=0)
    source = alignment.GroupSource(tmp_path / "ds", "train")
    groups = [source[i] for i in range(len(source))]
    scores = np.concatenate([g["scores"] for g in groups])
    assert len(scores) and scores.min() >= 1.0 and scores.max() <= 7.0
    assert all(len(set(g["responses"])) == len(g["responses"]) for g in groups)
    same = [g for g in groups if "Same text." in g["responses"] and "### Input:" not in g["query"]]
    assert [g["responses"].count("Same text.") for g in same] == [1]  # the unchanged revision: dropped


def test_the_cli_converts_a_cache_folder_and_the_trainer_trains_on_it(cache, tmp_path):
    result = subprocess.run([os.path.join(BIN, "sajax-sim-dataset"), f"--original={cache}", f"--out={tmp_path / 'ds'}",
                             "--ratios=all"], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "read 8 records from 4 files; missing (not a 1-7 rating): 3 peer ratings, 2 observer scores" in \
        result.stdout
    cfg = with_overrides(load_config(CONFIGS / "tiny.py"), **{"data.path": str(tmp_path / "ds"), "train.steps": 2,
                                                              "eval_every": 0, "log_every": 1})
    loop.run(cfg, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2] and np.isfinite(lines[-1]["train/loss"])


def test_the_original_prior_file_seeds_memories_by_label(tmp_path):
    prior = [{"question": f"good question {i}?", "response": f"kind answer {i}", "morality_label": "good"}
             for i in range(4)]
    prior += [{"question": f"bad question {i}?", "response": f"cruel answer {i}", "morality_label": "bad"}
              for i in range(4)]
    prior += [{"question": "other?", "response": "unsure", "morality_label": "neutral"}]  # never sampled there
    pd.DataFrame(prior).to_json(tmp_path / "labeled_prior.jsonl", orient="records")  # as the original reads it
    cfg = with_overrides(load_config(CONFIGS / "sim_tiny.py"), rounds=1,
                         prior_file=str(tmp_path / "labeled_prior.jsonl"), prior_per_agent=2)
    run.simulate(cfg, tmp_path / "w")
    agents, _ = store.load_state(tmp_path / "w", 1)
    for agent in agents:
        assert all(a.startswith("kind" if agent.label == "good" else "cruel") for a in agent.memory.answers[:2])


def test_release_files_with_failure_scores_are_named_or_dropped(tmp_path):
    release = [{"query": f"### Instruction:\nQuestion {i}?\n\n### Response:", "responses": ["A.", "B.", "C."],
                "scores": [6, 3, 2], "models": ["m", "m", "m"]} for i in range(6)]
    release[1]["scores"] = [8, 5, 2]  # a self-critic score the original kept from its "8"
    release[4]["scores"] = [-1, -1, -1]  # imitation scores from unparsed observers
    path = tmp_path / "sandbox.json"
    pd.DataFrame(release).to_json(path, orient="records", indent=2)  # as collect_data.py writes its release
    source = alignment.GroupSource(path)
    with pytest.raises(alignment.DataError, match=rf"{path} record 1: field 'scores\[0\]' is 8, outside .*; "
                                                       rf"{path} record 4: field 'scores\[0\]' is -1, outside .*2 "
                                                       r"records hold invalid scores; set data.drop_invalid_scores"):
        source.validate((1.0, 7.0))
    dropped = source.validate((1.0, 7.0), drop_invalid_scores=True)
    assert (dropped.responses, dropped.groups) == (4, 1) and len(source) == 5
    assert source[1]["responses"] == ["B.", "C."] and source[1]["scores"].tolist() == [5.0, 2.0]
    cfg = with_overrides(load_config(CONFIGS / "tiny.py"), **{"data.path": str(path)})
    with pytest.raises(alignment.DataError, match="2 records hold invalid scores"):
        loop.prepare(cfg, tmp_path / "wd")
    cfg.data.drop_invalid_scores = True
    assert len(loop.prepare(cfg, tmp_path / "wd").sources[0]) == 5
    assert not (tmp_path / "wd").exists()  # checks only
