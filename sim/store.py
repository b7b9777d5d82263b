"""Durable simulation state: each completed round is committed atomically, no pickle.

    <workdir>/config.json
    <workdir>/rounds/000001/records.jsonl   one record per agent (JSON)
                            metrics.json
                            state/agents.json       labels, locations, memories (questions, answers)
                            state/embeddings.npz    memory embeddings per agent
                            state/rng.json          the society's generator state
A round is written into `rounds/.tmp-<n>` and renamed to `rounds/<n>` when complete, so a directory named by
a number is always whole; SIGKILL at any moment loses at most the round in progress. Only the newest round
keeps its `state/` (what a resume needs); every round keeps its records.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from sajax import fileutil
from sim.engine import Agent
from sim.memory import Memory


class WorkdirError(RuntimeError):
    pass


def rounds_dir(workdir: Path) -> Path:
    return workdir / "rounds"


def committed_rounds(workdir: Path) -> list[int]:
    directory = rounds_dir(workdir)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def prepare(workdir: Path, config_json: dict, *, resume: bool, overwrite: bool) -> int:
    """Creates or checks the workdir; returns the last committed round (0 for a fresh run)."""
    exists = workdir.exists() and any(workdir.iterdir())
    if exists and not (resume or overwrite):
        raise WorkdirError(f"{workdir} exists and is not empty: pass --resume to continue it or --overwrite to "
                           "start again")
    if exists and overwrite:
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "config.json"
    if config_file.exists():
        saved = json.loads(config_file.read_text())
        changed = sorted(k for k in set(saved) | set(config_json)
                         if k != "rounds" and saved.get(k) != config_json.get(k))
        if changed:
            raise WorkdirError(f"{config_file}: the run was made with another configuration (changed: "
                               f"{', '.join(changed)}); use a new --workdir or --overwrite")
    fileutil.write_text(config_file, json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    for leftover in rounds_dir(workdir).glob(".tmp-*") if rounds_dir(workdir).exists() else []:
        shutil.rmtree(leftover)  # a round that was being written when the process died
    done = committed_rounds(workdir)
    return done[-1] if done else 0


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
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    os.replace(tmp, directory / f"{round_index:06d}")
    previous = directory / f"{round_index - 1:06d}" / "state"
    if previous.exists():
        shutil.rmtree(previous)


def load_state(workdir: Path, round_index: int) -> tuple[list[Agent], dict]:
    state = rounds_dir(workdir) / f"{round_index:06d}" / "state"
    agents_json = json.loads((state / "agents.json").read_text())
    with np.load(state / "embeddings.npz", allow_pickle=False) as embeddings:
        agents = [Agent(a["index"], a["label"], tuple(a["location"]),
                        Memory(a["questions"], a["answers"], embeddings[f"agent_{a['index']}"]))
                  for a in agents_json]
    return agents, json.loads((state / "rng.json").read_text())


def read_records(workdir: Path) -> list[dict]:
    return [json.loads(line) for n in committed_rounds(workdir)
            for line in (rounds_dir(workdir) / f"{n:06d}" / "records.jsonl").read_text(encoding="utf-8").splitlines()]


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads((rounds_dir(workdir) / f"{n:06d}" / "metrics.json").read_text())
            for n in committed_rounds(workdir)]
