"""Real multi-process jobs on this machine: N CLI processes joined by `jax.distributed` on 127.0.0.1 (gloo CPU
collectives), one or two CPU devices each, against one process holding as many devices. The global batches are the same
(`input_pipeline.train_dataset`), the compiled program is the same SPMD program, and a cross-process all-reduce
of two operands adds them in the one order there is: so two processes must equal one bit for bit."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, with_overrides
from sajax.config_files import load_config
from sajax.data import alignment
from sim import dataset, run, store

BIN = os.path.dirname(sys.executable)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BASE_ENV = cli_env(without=("SAJAX_DISTRIBUTED",))
TIMING = ("tokens_per_second", "mfu")  # wall-clock fields: the only ones allowed to differ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """`count` processes of one CLI command joined into a job; each process's output in logs/<name>-<index>.log."""

    def __init__(self, logs: Path, name: str, count: int, command: str, *args, per_process=None, env=None):
        logs.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.logs = [logs / f"{name}-{i}.log" for i in range(count)]
        self.processes = []
        for i in range(count):
            process_env = {**BASE_ENV, "SAJAX_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                           "SAJAX_NUM_PROCESSES": str(count), "SAJAX_PROCESS_ID": str(i), **(env or {})}
            extra = per_process(i) if per_process else []
            with open(self.logs[i], "w") as log:
                self.processes.append(subprocess.Popen([os.path.join(BIN, command), *args, *extra],
                                                       stdout=log, stderr=subprocess.STDOUT, env=process_env))

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.time())) for p in self.processes]
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()

    def log(self, i: int) -> str:
        return self.logs[i].read_text()


def _single(command: str, *args, devices: int) -> subprocess.CompletedProcess:
    env = cli_env(devices, without=("SAJAX_DISTRIBUTED",))
    return subprocess.run([os.path.join(BIN, command), *args], capture_output=True, text=True, env=env, timeout=600)


def _metrics(workdir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.endswith(TIMING)}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _files(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _records(path: Path) -> dict:
    """Every record of both splits, arrays as lists (comparable with ==)."""
    plain = lambda value: value.tolist() if hasattr(value, "tolist") else value  # noqa: E731
    sources = {split: alignment.GroupSource(path, split) for split in ("train", "validation")}
    return {split: [{k: plain(v) for k, v in source[i].items()} for i in range(len(source))]
            for split, source in sources.items()}


@pytest.fixture(scope="module")
def society(tmp_path_factory):
    """A simulation's committed rounds (the scripted 3×3 society, 2 rounds)."""
    workdir = tmp_path_factory.mktemp("society") / "sim"
    run.simulate(with_overrides(load_config(CONFIGS / "sim_tiny.py")), workdir)
    return workdir


TRAIN = ["--config.train.steps=40", "--config.train.batch_size=4", "--config.checkpoint.every=10",
         "--config.checkpoint.keep=10", "--config.log_every=5", "--config.eval_every=20",
         "--config.mesh.data=1", "--config.mesh.fsdp=-1"]  # parameters split over the processes' devices


def test_two_processes_build_the_dataset_train_resume_after_a_kill_and_export_like_one(society, tmp_path):
    started = time.time()
    # the simulator's dataset, written by process 0 of a 2-process job, holds the records of a 1-process build
    job = Job(tmp_path / "logs", "dataset", 2, "sajax-sim-dataset", f"--workdir={society}",
              f"--out={tmp_path / 'data'}")
    assert job.wait() == [0, 0], job.log(0) + job.log(1)
    assert "wrote" in job.log(0) and "wrote" not in job.log(1)
    dataset.build(store.read_records(society), tmp_path / "data1")
    assert _records(tmp_path / "data") == _records(tmp_path / "data1")
    flags = [f"--config.data.path={tmp_path / 'data'}", *TRAIN]

    # one process with two devices: the reference
    reference = _single("sajax-train", f"--workdir={tmp_path / 'one'}", *flags, devices=2)
    assert reference.returncode == 0, reference.stderr
    exported = _single("sajax-export", f"--workdir={tmp_path / 'one'}", f"--out={tmp_path / 'one_hf'}", devices=2)
    assert exported.returncode == 0, exported.stderr

    # two processes; process 1 is killed after the first checkpoint
    workdir = tmp_path / "two"
    job = Job(tmp_path / "logs", "killed", 2, "sajax-train", f"--workdir={workdir}", *flags)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "10").is_dir() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into the steps after it
    job.processes[1].send_signal(signal.SIGKILL)
    job.processes[1].wait()
    assert job.processes[0].wait(timeout=60) == 1  # its next collective fails: it stops at once, and says why
    assert "process 0: a collective with the other processes failed (did one stop?)" in job.log(0)
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 40, f"the job was not killed mid-way: {saved}"

    job = Job(tmp_path / "logs", "resumed", 2, "sajax-train", f"--workdir={workdir}", *flags)
    assert job.wait() == [0, 0], job.log(0) + job.log(1)
    assert "final evaluation" in job.log(0) and "train:" in job.log(0)
    assert "final evaluation" not in job.log(1) and "train:" not in job.log(1)  # process 0 reports, alone
    # metrics: written once (process 0), every step once across the kill, equal to one process's
    assert _metrics(workdir) == _metrics(tmp_path / "one")
    assert json.loads((workdir / "eval.json").read_text()) == json.loads((tmp_path / "one" / "eval.json").read_text())

    # the parameters, split over both processes, gathered into one HF folder: the same bytes as one process's
    job = Job(tmp_path / "logs", "export", 2, "sajax-export", f"--workdir={workdir}", f"--out={tmp_path / 'two_hf'}")
    assert job.wait() == [0, 0], job.log(0) + job.log(1)
    assert "exported step 40" in job.log(0) and "exported" not in job.log(1)
    assert _files(tmp_path / "two_hf") == _files(tmp_path / "one_hf")
    sys.stderr.write(f"2-process dataset, kill, resume, export vs 1 process: {time.time() - started:.0f} s\n")


def test_two_processes_of_two_devices_train_like_one_process_on_four_devices(society, tmp_path):
    # data × fsdp = 2 × 2 over two processes of two devices each: the batch and the parameters split across and
    # within processes
    dataset.build(store.read_records(society), tmp_path / "data")
    flags = [f"--config.data.path={tmp_path / 'data'}", "--config.train.steps=10", "--config.train.batch_size=4",
             "--config.checkpoint.every=10", "--config.log_every=2", "--config.eval_every=0",
             "--config.mesh.data=2", "--config.mesh.fsdp=2",
             "--config.data.packing=true"]  # packed rows: each shard's groups in its own rows, on any process count
    reference = _single("sajax-train", f"--workdir={tmp_path / 'one'}", *flags, devices=4)
    assert reference.returncode == 0, reference.stderr
    job = Job(tmp_path / "logs", "four", 2, "sajax-train", f"--workdir={tmp_path / 'four'}", *flags,
              env={"XLA_FLAGS": cli_env(2)["XLA_FLAGS"]})
    assert job.wait() == [0, 0], "\n".join(job.log(i) for i in range(2))
    # Not bit-identical: the loss and metric sums (over each device's rows) are all-reduced by gloo across
    # processes and by XLA within one, adding the 4 partial sums in other orders. A 4-term fp32 sum of positive
    # terms is exact to 3ε ≈ 3.6e-7 relative, a ratio of two such sums (penalty, sft) to about twice that, and 10
    # Adam steps from parameters that differ by such roundings stay within it (measured: ≤ 6e-7).
    four, one = _metrics(tmp_path / "four"), _metrics(tmp_path / "one")
    assert [sorted(m) for m in four] == [sorted(m) for m in one]
    for a, b in zip(four, one):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=2e-6, abs=1e-9), (a["step"], key)
    assert [json.loads(line)["step"] for line in (tmp_path / "four" / "metrics.jsonl").read_text().splitlines()] == [
        2, 4, 6, 8, 10, 10]  # the last: the final evaluation


def test_processes_that_differ_stop_before_writing_with_a_named_cause(tmp_path):
    workdir = tmp_path / "wd"
    other_steps = lambda i: ["--config.train.steps=7"] if i == 1 else []  # noqa: E731
    job = Job(tmp_path / "logs", "config", 2, "sajax-train", f"--workdir={workdir}", per_process=other_steps)
    assert job.wait() == [1, 1]
    for i in range(2):
        assert ("process(es) [1] run another job (config and arguments) than process 0" in job.log(i)
                and "run the same command on every host" in job.log(i)), job.log(i)
    assert not workdir.exists()

    job = Job(tmp_path / "logs", "count", 2, "sajax-train", f"--workdir={workdir}",
              env={"SAJAX_EXPECTED_PROCESSES": "3"})
    assert job.wait() == [1, 1]
    assert "the launch expected 3 processes (SAJAX_EXPECTED_PROCESSES) but 2 joined the job" in job.log(0)

    env = {**BASE_ENV, "SAJAX_DISTRIBUTED": "1", "SAJAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "x:1"}
    alone = subprocess.run([os.path.join(BIN, "sajax-train"), f"--workdir={workdir}"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert alone.returncode == 1
    assert alone.stderr.strip().endswith("SAJAX_PROCESS_ID is not set: set both SAJAX_NUM_PROCESSES and "
                                         "SAJAX_PROCESS_ID, or neither")
    env["SAJAX_PROCESS_ID"] = "0"
    sim = subprocess.run([os.path.join(BIN, "sajax-sim"), f"--workdir={workdir}"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert sim.returncode == 1 and "sajax-sim runs as one process" in sim.stderr
    assert not workdir.exists()

