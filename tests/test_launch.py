"""launch/: the dry runs print what every host runs and the environment it gets; the TPU script, with a stand-in
for gcloud that runs each worker's command here, starts a real multi-process job and logs each host apart."""

import os
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

from conftest import cli_env, with_overrides
from sajax.config_files import load_config
from sim import run

ROOT = Path(__file__).resolve().parent.parent
TPU, SLURM = ROOT / "launch" / "tpu_pod.sh", ROOT / "launch" / "gpu_slurm.sbatch"
ENV = cli_env(without=("SAJAX_DISTRIBUTED",))


def _bash(script, *args, env=None, cwd=None):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env={**ENV, **(env or {})},
                          cwd=cwd, timeout=300)


def test_tpu_dry_run_prints_every_hosts_command_and_environment(tmp_path):
    result = _bash(TPU, "run", "my-tpu", "us-east5-a", "--dry-run", "--hosts", "4", "--", "sajax-train",
                   "--workdir", "gs://bucket/run 1", env={"SAJAX_RUN_ID": "r7", "PATH": "/usr/bin:/bin"},
                   cwd=tmp_path)  # no gcloud on PATH: a dry run calls none
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "# run r7: 4 hosts of my-tpu (us-east5-a); logs in logs/r7/"
    environment = "SAJAX_DISTRIBUTED=1 SAJAX_EXPECTED_PROCESSES=4 SAJAX_RUN_ID=r7"
    for i in range(4):
        assert f"host {i} env: {environment}" in lines
        on_host = f"cd sajax && env {environment} sajax-train --workdir gs://bucket/run\\ 1 "
        assert f"host {i} on the host: {on_host}" in lines
        runs = next(line for line in lines if line.startswith(f"host {i} runs: "))[len(f"host {i} runs: "):]
        words = shlex.split(runs)
        assert words[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone"]
        assert words[8] == f"--worker={i}" and words[10] == on_host
        assert words[11:] == [">", f"logs/r7/host-{i}.log", "2>&1"]
    assert not (tmp_path / "logs").exists()  # nothing run, nothing written

    no_hosts = _bash(TPU, "run", "my-tpu", "zone", "--dry-run", "--", "sajax-train")
    assert no_hosts.returncode == 2 and "--dry-run needs --hosts N" in no_hosts.stderr
    setup = _bash(TPU, "setup", "my-tpu", "zone", "--dry-run", env={"SAJAX_RUN_ID": "r7", "TMPDIR": str(tmp_path)})
    assert setup.returncode == 0 and len(setup.stdout.splitlines()) == 3
    assert "--worker=all" in setup.stdout and "pip\\ install" in setup.stdout
    assert not (tmp_path / "sajax-r7.tar.gz").exists()


def test_slurm_dry_run_prints_every_tasks_command_and_environment():
    result = _bash(SLURM, "--nodes", "3", "sajax-train", "--workdir", "/shared/run 1", env={"SAJAX_DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    environment = "SAJAX_DISTRIBUTED=1 SAJAX_EXPECTED_PROCESSES=3 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"
    for t in range(3):
        assert lines[1 + 2 * t].startswith(f"task {t} env: {environment} SLURM_PROCID={t}")
        assert lines[2 + 2 * t] == (f"task {t} runs: env {environment} sajax-train --workdir /shared/run\\ 1 "
                                    f"> logs/sajax-dry-run/host-{t}.log 2>&1")
    assert lines[-1].startswith("launched with: srun --kill-on-bad-exit=1 --output=logs/sajax-dry-run/host-%t.log env ")
    assert _bash(SLURM, env={"SAJAX_DRY_RUN": "1"}).returncode == 2
    unknown = _bash(SLURM, "sajax-train", env={"SAJAX_DRY_RUN": "1"})
    assert unknown.returncode == 2 and "give --nodes N" in unknown.stderr


FAKE_GCLOUD = """#!/usr/bin/env bash
# Stand-in for `gcloud compute tpus tpu-vm ssh TPU --zone Z --worker=I --command CMD`: runs CMD here as worker I,
# with what a TPU VM's metadata would tell jax (the coordinator, the process count and id).
for arg in "$@"; do case "$arg" in --worker=*) worker="${arg#--worker=}" ;; esac; done
command="${@: -1}"
export JAX_COORDINATOR_ADDRESS="$FAKE_COORDINATOR" SAJAX_NUM_PROCESSES="$FAKE_PROCESSES" SAJAX_PROCESS_ID="$worker"
exec bash -c "$command"
"""


def test_tpu_script_runs_a_job_on_every_host_and_logs_each(tmp_path):
    society = tmp_path / "sim"
    run.simulate(with_overrides(load_config(ROOT / "configs" / "sim_tiny.py")), society)
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(FAKE_GCLOUD)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PATH": f"{fake.parent}:{os.path.dirname(sys.executable)}:{ENV['PATH']}", "SAJAX_RUN_ID": "job",
           "SAJAX_REMOTE_DIR": str(tmp_path), "FAKE_COORDINATOR": f"127.0.0.1:{port}", "FAKE_PROCESSES": "2"}
    result = _bash(TPU, "run", "my-tpu", "zone", "--hosts", "2", "--", "sajax-sim-dataset", f"--workdir={society}",
                   "--out=data", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "all 2 hosts finished; logs in logs/job/" in result.stdout
    logs = [(tmp_path / "logs" / "job" / f"host-{i}.log").read_text() for i in range(2)]
    assert "wrote data" in logs[0] and "wrote" not in logs[1]  # process 0 writes and reports
    assert (tmp_path / "data" / "dataset_info.json").is_file()

    # 2 processes joined where 3 were expected (here the command overrides what the launch sets): every host stops
    # and says why, and the script names the failed hosts
    result = _bash(TPU, "run", "my-tpu", "zone", "--hosts", "2", "--", "env", "SAJAX_EXPECTED_PROCESSES=3",
                   "sajax-sim-dataset", f"--workdir={society}", "--out=data4", env={**env, "SAJAX_RUN_ID": "bad"},
                   cwd=tmp_path)
    assert result.returncode == 1 and "hosts 0 1 failed; see logs/bad/host-<i>.log" in result.stderr
    for i in range(2):
        log = (tmp_path / "logs" / "bad" / f"host-{i}.log").read_text()
        assert "the launch expected 3 processes (SAJAX_EXPECTED_PROCESSES) but 2 joined the job" in log
    assert not (tmp_path / "data4").exists()
