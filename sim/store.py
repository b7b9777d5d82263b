"""Durable simulation state: each completed round is committed atomically, no pickle.

    <workdir>/config.json
    <workdir>/rounds/000001/records.jsonl   one record per agent (JSON)
                            metrics.json
                            journal.jsonl           every HTTP response of the round (sim.journal), if any
                            state/agents.json       labels, locations, memories (questions, answers)
                            state/embeddings.npz    memory embeddings per agent
                            state/rng.json          the society's generator state
A round is written into `rounds/.tmp-<n>` and renamed to `rounds/<n>` when complete, so a directory named by
a number is always whole; SIGKILL at any moment loses at most the round in progress. The two newest rounds keep
their `state/` (what a resume needs: if the newest one is damaged later, moving its round out of `rounds/`
redoes it from the one before); every round keeps its records. Reading checks every file and names the one
that is damaged. The round in progress journals its HTTP responses in `rounds/.journal-<n>.jsonl`, which outlives
a crash (a resumed round replays it) and moves into the round's directory when it is committed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from sajax import config_files, fileutil
from sim.engine import Agent
from sim.journal import Journal
from sim.memory import Memory

KEPT_STATES = 2
# Settings a resumed run may change: how the backends are reached, not what they compute.
RESUMABLE = ("rounds",) + tuple(f"{section}.{field}" for section in ("backend", "observer_backend", "embedder")
                                for field in ("base_url", "api_key_env", "timeout", "max_retries", "concurrency",
                                              "max_missing_fraction"))


class WorkdirError(RuntimeError):
    pass


def rounds_dir(workdir: Path) -> Path:
    return workdir / "rounds"


def round_dir(workdir: Path, round_index: int) -> Path:
    return rounds_dir(workdir) / f"{round_index:06d}"


def committed_rounds(workdir: Path) -> list[int]:
    directory = rounds_dir(workdir)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def journal_path(workdir: Path, round_index: int) -> Path:
    return rounds_dir(workdir) / f".journal-{round_index:06d}.jsonl"


def open_journal(workdir: Path, round_index: int) -> Journal:
    """The journal of the round in progress: what an interrupted attempt at it already received."""
    return Journal(journal_path(workdir, round_index))


def check(workdir: Path, config_json: dict, *, resume: bool, overwrite: bool) -> int:
    """What a start may do with `workdir`, without changing it: the last committed round to continue after
    (0: a fresh run, or `overwrite`). WorkdirError when the workdir holds another run or a run without
    --resume / --overwrite."""
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"{workdir}: exists and is not a directory")
    exists = workdir.exists() and any(workdir.iterdir())
    if exists and not (resume or overwrite):
        raise WorkdirError(f"{workdir} exists and is not empty: pass --resume to continue it or --overwrite to "
                           "start again")
    if not exists or overwrite:
        return 0
    config_file = workdir / "config.json"
    if config_file.exists():
        saved = fileutil.read_json(config_file)
        if not isinstance(saved, dict):
            raise WorkdirError(f"{config_file}: expected a JSON object, got {type(saved).__name__}")
        defaults = json.loads(config_files.load_config(config_files.bundled_config("sim_tiny.py")).to_json())
        changed = [key for key, _, _ in config_files.changed_fields(saved, config_json, defaults, RESUMABLE)]
        if changed:
            raise WorkdirError(f"{config_file}: the run was made with another configuration (changed: "
                               f"{', '.join(changed)}); use a new --workdir or --overwrite")
    done = committed_rounds(workdir)
    return done[-1] if done else 0


def prepare(workdir: Path, config_json: dict, *, overwrite: bool) -> None:
    """The writes of a start, once every check has passed: clears the workdir for `overwrite`, writes
    config.json, removes a round that was being written when a previous process died (its journal stays: the
    redone round replays it)."""
    if overwrite and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fileutil.write_text(workdir / "config.json", json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    for leftover in rounds_dir(workdir).glob(".tmp-*") if rounds_dir(workdir).exists() else []:
        shutil.rmtree(leftover)
    for round_index in committed_rounds(workdir):  # a journal whose round was committed just before a crash
        journal_path(workdir, round_index).unlink(missing_ok=True)


def commit_round(workdir: Path, round_index: int, records: list[dict], metrics: dict, agents: list[Agent],
                 rng_state: dict) -> None:
    directory = rounds_dir(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{round_index:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "state").mkdir(parents=True)
    with open(tmp / "records.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    agents_json = [{"index": a.index, "label": a.label, "location": list(a.location), **a.memory.to_json()}
                   for a in agents]
    (tmp / "state" / "agents.json").write_text(json.dumps(agents_json, ensure_ascii=False) + "\n")
    np.savez(tmp / "state" / "embeddings.npz", **{f"agent_{a.index}": a.memory.embeddings for a in agents})
    (tmp / "state" / "rng.json").write_text(json.dumps(rng_state) + "\n")
    journal = journal_path(workdir, round_index)
    if journal.exists():  # copied: a crash before the rename below still has it for the redone round
        shutil.copyfile(journal, tmp / "journal.jsonl")
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    os.replace(tmp, round_dir(workdir, round_index))
    journal.unlink(missing_ok=True)
    stale = round_dir(workdir, round_index - KEPT_STATES) / "state"
    if stale.exists():
        shutil.rmtree(stale)


def _damaged(file: Path, error: Exception, round_index: int, workdir: Path) -> WorkdirError:
    previous = round_dir(workdir, round_index - 1) / "state"
    if round_index == 1:
        hint = "start again with --overwrite"
    elif previous.is_dir():
        hint = (f"move {round_dir(workdir, round_index)} out of {rounds_dir(workdir)} to redo round {round_index} "
                f"from round {round_index - 1}")
    else:
        hint = "the state to redo it is gone; start again with --overwrite or a new --workdir"
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    detail = detail[len(str(file)):].lstrip(": ") if detail.startswith(str(file)) else detail
    return WorkdirError(f"{file}: damaged ({detail}); {hint}")


def load_state(workdir: Path, round_index: int) -> tuple[list[Agent], dict]:
    """The agents and the generator state after round `round_index`; WorkdirError naming a damaged file."""
    state = round_dir(workdir, round_index) / "state"
    agents_file, embeddings_file, rng_file = state / "agents.json", state / "embeddings.npz", state / "rng.json"
    try:
        agents_json = fileutil.read_json(agents_file)
        if not isinstance(agents_json, list):
            raise ValueError(f"expected a JSON list, got {type(agents_json).__name__}")
    except (OSError, ValueError) as e:
        raise _damaged(agents_file, e, round_index, workdir) from e
    try:
        with np.load(embeddings_file, allow_pickle=False) as embeddings:
            vectors = {name: embeddings[name] for name in embeddings.files}
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, OSError: a truncated or damaged archive
        raise _damaged(embeddings_file, e, round_index, workdir) from e
    agents = []
    for a in agents_json:
        try:
            memory = Memory(a["questions"], a["answers"], np.zeros((0, 0), np.float32))
            agent = Agent(a["index"], a["label"], tuple(a["location"]), memory)
        except (KeyError, TypeError) as e:
            raise _damaged(agents_file, ValueError(f"an agent lacks {e}"), round_index, workdir) from e
        vectors_of_agent = vectors.get(f"agent_{agent.index}")
        if vectors_of_agent is None or (memory.questions and len(vectors_of_agent) != len(memory.questions)):
            raise _damaged(embeddings_file, ValueError(f"no embedding for each memory of agent {agent.index}"),
                           round_index, workdir)
        memory.embeddings = vectors_of_agent
        agents.append(agent)
    try:
        rng_state = fileutil.read_json(rng_file)
    except (OSError, ValueError) as e:
        raise _damaged(rng_file, e, round_index, workdir) from e
    return agents, rng_state


def read_round_records(workdir: Path, round_index: int, expected: int | None = None) -> list[dict]:
    """The records of one committed round; WorkdirError naming the file and line when it is damaged (or holds
    other than `expected` records)."""
    file = round_dir(workdir, round_index) / "records.jsonl"
    try:
        records = [record for _, record in fileutil.read_jsonl(file)]
        for n, record in enumerate(records, 1):
            if not isinstance(record, dict) or "question" not in record:
                raise ValueError(f"line {n} is not an interaction record")
        if expected is not None and len(records) != expected:
            raise ValueError(f"{len(records)} records, the world has {expected} agents")
    except (OSError, ValueError) as e:
        raise _damaged(file, e, round_index, workdir) from e
    return records


def read_records(workdir: Path) -> list[dict]:
    return [r for n in committed_rounds(workdir) for r in read_round_records(workdir, n)]


def read_metrics(workdir: Path) -> list[dict]:
    out = []
    for n in committed_rounds(workdir):
        file = round_dir(workdir, n) / "metrics.json"
        try:
            out.append(fileutil.read_json(file))
        except (OSError, ValueError) as e:
            raise _damaged(file, e, n, workdir) from e
    return out
