"""The simulator's failures are named and clean: a rejected start writes nothing, a failing server stops the round
before it is committed, damaged files are named, the dataset tool validates its flags and its output folder."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import JsonServer, cli_env, with_overrides
from sajax.config_files import load_config
from sajax.data import alignment
from sim import dataset, engine, openai_backend, run, store
from sim.openai_backend import BackendError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BIN = os.path.dirname(sys.executable)
ENV = cli_env()


def sim_config(**overrides):
    return with_overrides(load_config(CONFIGS / "sim_tiny.py"), **overrides)


def snapshot(directory: Path) -> dict:
    """Every file under `directory` with its bytes (empty if it does not exist)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


class ChatServer(JsonServer):
    """An OpenAI-compatible server serving the model "fake" whose chat answers come from `self.mode`: 'ok' (a
    draft, or a rating after a "Rating:" prompt), 'fail' (HTTP 500), 'no_rating' (text without a rating)."""

    def __init__(self, mode="ok"):
        self.mode = mode
        super().__init__(self.respond)

    def respond(self, path, body, headers):
        if body is None:
            return 200, json.dumps({"data": [{"id": "fake", "object": "model"}]}).encode()
        if self.mode == "fail":
            return 500, b'{"error": "overloaded"}'
        prompt = body["messages"][0]["content"]
        reply = "I would help and listen." if not prompt.endswith("Rating:") or self.mode == "no_rating" else \
            "Rating: 6 ### Reason: considerate."
        return 200, json.dumps({"choices": [{"message": {"content": reply}}]}).encode()


def openai_config(server, **overrides):
    return sim_config(**{"backend.kind": "openai", "backend.base_url": server.url, "backend.model": "fake",
                         "backend.max_retries": 1, "backend.timeout": 5.0, "observer_backend.kind": "openai",
                         "observer_backend.base_url": server.url, "observer_backend.model": "fake",
                         "observer_backend.max_retries": 1, **overrides})


@pytest.fixture
def server():
    fake = ChatServer()
    yield fake
    fake.close()


def test_a_rejected_start_writes_nothing_and_the_corrected_one_runs(tmp_path, server):
    workdir = tmp_path / "w"
    (tmp_path / "prior.jsonl").write_text('{"question": "q?", "answer": "a", "label": "neutral"}\n')
    (tmp_path / "broken.jsonl").write_text('{"question": "q?", "answer": "a", "label": "good"}\n{"question": \n')
    (tmp_path / "questions.txt").write_bytes(b"Is it kind?\nIs it caf\xe9 time?\n")
    closed = JsonServer(lambda *a: (200, b"{}"))
    closed.close()  # nothing listens on its port any more
    cases = [
        (sim_config(prior_file=str(tmp_path / "prior.jsonl")), ValueError, "prior.jsonl line 1: label must be"),
        (sim_config(prior_file=str(tmp_path / "broken.jsonl")), ValueError, "broken.jsonl line 2: not valid JSON"),
        (sim_config(questions_file=str(tmp_path / "questions.txt")), ValueError,
         r"questions.txt line 2: not UTF-8 text \(byte 21"),
        (sim_config(**{"backend.kind": "lokal"}), ValueError, "backend.kind must be one of"),
        (sim_config(**{"observer_backend.max_missing_fraction": 1.5}), ValueError,
         "observer_backend.max_missing_fraction must be in"),
        (openai_config(closed), BackendError, f"{closed.url}: the server cannot be reached"),
        (openai_config(server, **{"backend.model": "other"}), BackendError,
         r"serves \['fake'\], not 'other' \(backend.model\)"),
    ]
    for cfg, error, message in cases:
        with pytest.raises(error, match=message):
            run.simulate(cfg, workdir)
        assert not workdir.exists()
    assert len(run.simulate(openai_config(server, rounds=1), workdir)) == 1  # the corrected command, same workdir
    before = snapshot(workdir)
    with pytest.raises(ValueError, match="prior.jsonl line 1: label must be"):  # a rejected resume changes nothing
        run.simulate(openai_config(server, rounds=1, prior_file=str(tmp_path / "prior.jsonl")), workdir, resume=True)
    assert snapshot(workdir) == before


def test_a_failing_server_stops_the_round_before_it_is_committed(tmp_path, server):
    workdir = tmp_path / "w"
    server.mode = "fail"
    with pytest.raises(engine.StageFailure, match=rf"round 1, stage draft: 9 of 9 requests to openai:fake at "
                                                  rf"{server.url} gave no usable output .*last error: .*HTTP 500"):
        run.simulate(openai_config(server), workdir)
    assert store.committed_rounds(workdir) == []
    server.mode = "no_rating"  # drafts come back, ratings cannot be read
    with pytest.raises(engine.StageFailure, match=r"stage feedback: 36 of 36 .*no 'Rating: N' \(1-7\) in the answer"):
        run.simulate(openai_config(server), workdir, resume=True)
    assert store.committed_rounds(workdir) == []
    server.mode = "ok"
    result = subprocess.run([os.path.join(BIN, "sajax-sim"), f"--workdir={workdir}", "--resume",
                             "--config.backend.kind=openai", f"--config.backend.base_url={server.url}",
                             "--config.backend.model=fake", "--config.backend.max_retries=1",
                             "--config.observer_backend.kind=openai",
                             f"--config.observer_backend.base_url={server.url}",
                             "--config.observer_backend.model=fake", "--config.observer_backend.max_retries=1"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert store.committed_rounds(workdir) == [1, 2]
    assert all(r["draft_answer"] and r["gen_moral_score_before"] == 6.0 for r in store.read_records(workdir))
    server.mode = "fail"
    failed = subprocess.run([os.path.join(BIN, "sajax-sim"), f"--workdir={tmp_path / 'w2'}",
                             "--config.backend.kind=openai", f"--config.backend.base_url={server.url}",
                             "--config.backend.model=fake", "--config.backend.max_retries=0"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("error: round 1, stage draft: 9 of 9 requests")


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def test_damaged_round_files_are_named(tmp_path):
    workdir = tmp_path / "w"
    run.simulate(sim_config(), workdir)
    straight = snapshot(workdir / "rounds")
    resume = lambda: run.simulate(sim_config(), workdir, resume=True)  # noqa: E731
    for name in ("embeddings.npz", "agents.json"):
        damaged = workdir / "rounds" / "000002" / "state" / name
        original = damaged.read_bytes()
        _truncate(damaged)
        with pytest.raises(store.WorkdirError, match=rf"{damaged}: damaged \(.*\); move {workdir / 'rounds'}/000002 "
                                                     rf"out of {workdir / 'rounds'} to redo round 2 from round 1"):
            resume()
        damaged.write_bytes(original)
    records = workdir / "rounds" / "000001" / "records.jsonl"
    _truncate(records)
    with pytest.raises(store.WorkdirError, match=rf"{records}: damaged \(line \d+: not valid JSON"):
        resume()
    with pytest.raises(store.WorkdirError, match=rf"{records}: damaged"):
        store.read_records(workdir)  # what sajax-sim-dataset reads
    records.write_bytes(straight["000001/records.jsonl"])
    # the hint works: moving the newest round out redoes it from the round before, identically
    shutil.move(workdir / "rounds" / "000002", tmp_path / "round2")
    resume()
    assert snapshot(workdir / "rounds")["000002/records.jsonl"] == straight["000002/records.jsonl"]


def test_dataset_flags_and_output_folder_are_checked(tmp_path):
    for bad in ("5,1", "a,b,c", "5,1,1,1", "-1,1,1", "", "0,0,0", "1.5,1,1"):
        with pytest.raises(ValueError, match="--ratios must be three whole numbers"):
            dataset.parse_ratios(bad)
    assert dataset.parse_ratios("5, 1, 1") == (5, 1, 1) and dataset.parse_ratios("all") is None
    run.simulate(sim_config(rounds=1), tmp_path / "w")
    records = store.read_records(tmp_path / "w")
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"\xff\xd8")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for out in (unrelated, a_file):
        with pytest.raises(alignment.DataError, match=f"{out}: exists and is .*refusing to replace it"):
            dataset.build(records, out, validation_percent=0)
    assert (unrelated / "cat.jpg").read_bytes() == b"\xff\xd8" and a_file.read_text() == "keep me"
    dataset.build(records, tmp_path / "ds", validation_percent=0)
    dataset.build(records, tmp_path / "ds", validation_percent=0, seed=1)  # a dataset written here: replaced
    dataset.build(records, unrelated, validation_percent=0, overwrite=True)
    assert (unrelated / "dataset_info.json").is_file() and not (unrelated / "cat.jpg").exists()
    result = subprocess.run([os.path.join(BIN, "sajax-sim-dataset"), f"--workdir={tmp_path / 'w'}",
                             f"--out={tmp_path / 'ds2'}", "--ratios=5,1"], capture_output=True, text=True, env=ENV,
                            timeout=120)
    assert result.returncode == 1 and result.stderr.startswith("error: --ratios must be three whole numbers")
    assert not (tmp_path / "ds2").exists()


def test_the_missing_share_that_stops_a_stage():
    from sim.backends import ScriptedBackend

    half = ScriptedBackend(max_missing_fraction=0.5)
    engine.check_stage(1, "draft", half, missing=4, total=9)  # 44%: the round goes on, those records hold None
    with pytest.raises(engine.StageFailure, match=r"5 of 9 requests to scripted .*\(more than max_missing_"
                                                  r"fraction 0.5\)"):
        engine.check_stage(1, "draft", half, missing=5, total=9)
    tolerant = ScriptedBackend(max_missing_fraction=1.0)
    engine.check_stage(1, "draft", tolerant, missing=8, total=9)
    with pytest.raises(engine.StageFailure, match=r"9 of 9 requests to scripted gave no usable output \(all of them"):
        engine.check_stage(1, "draft", tolerant, missing=9, total=9)
    engine.check_stage(1, "feedback", half, missing=0, total=0)  # an empty stage is no failure


class ChangingServer(JsonServer):
    """Answers differently on every call (the call's number is in the answer and in the embedding), as a sampling
    server under concurrent load does; call number `refuse_at` is refused once with HTTP 401 (the run stops, as
    if killed) without counting. The readout probes of each start (`check`) are counted apart."""

    def __init__(self, refuse_at=None):
        self.calls, self.probes, self.refuse_at = 0, 0, refuse_at
        super().__init__(self.respond)

    def respond(self, path, body, headers):
        if body is None:
            return 200, json.dumps({"data": [{"id": "fake", "object": "model"}]}).encode()
        if self.calls == self.refuse_at:
            self.refuse_at = None
            return 401, b'{"error": "crash"}'
        if body.get("messages") == [{"role": "user", "content": openai_backend.PROBE}]:
            self.probes += 1
            return 200, json.dumps({"choices": [{"message": {"content": '{"rating": 7, "reason": "ok"}'}}]}).encode()
        n = self.calls = self.calls + 1
        if path.endswith("/embeddings"):
            return 200, json.dumps({"data": [{"index": i, "embedding": [len(t) % 5 + 1.0, 1.0, n / 100]}
                                             for i, t in enumerate(body["input"])]}).encode()
        prompt = body["messages"][0]["content"]
        reply = f"Rating: {1 + n % 7} ### Reason: call {n}." if prompt.endswith("Rating:") else \
            f"I would help and listen (call {n})."
        return 200, json.dumps({"choices": [{"message": {"content": reply}}],
                                "usage": {"prompt_tokens": 10, "completion_tokens": n}}).encode()


def test_a_resumed_round_replays_its_journal_and_equals_the_uninterrupted_one(tmp_path):
    def config(server):
        return openai_config(server, **{"backend.concurrency": 1, "observer_backend.concurrency": 1,
                                        "embedder.kind": "openai", "prior_per_agent": 1,
                                        "prior_file": str(tmp_path / "prior.jsonl")})

    (tmp_path / "prior.jsonl").write_text('{"question": "Is it kind?", "answer": "Yes.", "label": "good"}\n'
                                          '{"question": "Is it cruel?", "answer": "Yes.", "label": "bad"}\n')
    straight = ChangingServer()
    metrics = run.simulate(config(straight), tmp_path / "straight")
    straight.close()
    sent_in_round_2 = metrics[1]["journal"]["sent"]
    assert metrics[1]["journal"]["replayed"] == 0 and sent_in_round_2 > 40
    before_round_2 = straight.calls - sent_in_round_2

    crashing = ChangingServer(refuse_at=before_round_2 + 25)  # round 2, in its feedback stage
    workdir = tmp_path / "crashed"
    with pytest.raises(BackendError, match="HTTP 401"):
        run.simulate(config(crashing), workdir)
    assert store.committed_rounds(workdir) == [1]
    assert len(store.open_journal(workdir, 2).entries) == 25  # every answer received before the crash
    resumed = run.simulate(config(crashing), workdir, resume=True)
    crashing.close()
    assert crashing.calls == straight.calls  # no call of a round was sent twice
    assert crashing.probes == 2 * straight.probes == 4  # each start probes how the backend and observers rate
    assert resumed[1]["journal"] == {"replayed": 25, "sent": sent_in_round_2 - 25}
    assert store.read_records(workdir) == store.read_records(tmp_path / "straight")
    for name in ("000001/state/embeddings.npz", "000002/state/embeddings.npz", "000002/journal.jsonl"):
        assert (workdir / "rounds" / name).read_bytes() == (tmp_path / "straight" / "rounds" / name).read_bytes()
    assert not list((workdir / "rounds").glob(".journal-*"))


def test_a_journal_torn_by_a_crash_keeps_its_whole_lines(tmp_path):
    from sim.journal import Journal

    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    for n in range(3):
        journal.record("chat", {"seed": n}, {"text": f"answer {n}"})
    journal.close()
    path.write_bytes(path.read_bytes() + b'{"key": "abc", "respo')  # killed while writing the fourth
    journal = Journal(path)
    assert journal.replay("chat", {"seed": 1}) == {"text": "answer 1"} and journal.replay("chat", {"seed": 1}) is None
    journal.record("chat", {"seed": 3}, {"text": "answer 3"})
    journal.close()
    assert [Journal(path).replay("chat", {"seed": n}) for n in range(4)] == [{"text": f"answer {n}"} for n in range(4)]
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], b"{not json", *lines[1:]]))
    with pytest.raises(ValueError, match=rf"{path} line 2: damaged"):
        Journal(path)
