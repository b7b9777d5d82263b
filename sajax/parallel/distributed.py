"""Multi-process runs: joining the job, checking that every process runs the same thing, gathering to one host.

Every CLI calls `initialize()` first. With `SAJAX_DISTRIBUTED=1` it joins the job with `jax.distributed`:
- on clusters jax recognises by itself (Cloud TPU pods, SLURM, Open MPI, Kubernetes) nothing more is needed;
- anywhere else (one machine, plain SSH hosts) also set
    JAX_COORDINATOR_ADDRESS   host:port where process 0 listens
    SAJAX_NUM_PROCESSES       how many processes join
    SAJAX_PROCESS_ID          this process's index, 0 … N-1
Launch scripts (launch/) also set SAJAX_EXPECTED_PROCESSES: a process that finds another process count stops.

`check_same_job(job)` then compares, across processes, a sha256 of the sajax and sim sources and of the job
(the CLI's resolved config and arguments): a host with another checkout or another command line stops every
process with a message naming it, before anything is written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

ENABLE = "SAJAX_DISTRIBUTED"
NUM_PROCESSES = "SAJAX_NUM_PROCESSES"
PROCESS_ID = "SAJAX_PROCESS_ID"
COORDINATOR = "JAX_COORDINATOR_ADDRESS"
EXPECTED_PROCESSES = "SAJAX_EXPECTED_PROCESSES"


class HostMismatch(RuntimeError):
    """The processes of one job do not run the same code, the same job, or as many processes as launched."""


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "")
    if value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def initialize() -> None:
    """Joins the job when SAJAX_DISTRIBUTED=1 (see the module docstring); a no-op when it is unset or 0."""
    enabled = os.environ.get(ENABLE, "")
    if enabled not in ("", "0", "1"):
        raise ValueError(f"{ENABLE}={enabled!r}: expected 1 (join a multi-process job) or 0")
    if enabled != "1":
        return
    count, index = _int_env(NUM_PROCESSES), _int_env(PROCESS_ID)
    if count is None and index is None:
        jax.distributed.initialize()  # the cluster (TPU metadata, SLURM, ...) says who is who
    else:
        if count is None or index is None:
            missing = NUM_PROCESSES if count is None else PROCESS_ID
            raise ValueError(f"{missing} is not set: set both {NUM_PROCESSES} and {PROCESS_ID}, or neither")
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"{PROCESS_ID}={index} must be in 0..{NUM_PROCESSES}-1 ({count - 1})")
        address = os.environ.get(COORDINATOR, "")
        if not address or ":" not in address:
            raise ValueError(f"{COORDINATOR}={address!r}: set it to host:port of process 0 (with {NUM_PROCESSES} and "
                             f"{PROCESS_ID})")
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
    expected = _int_env(EXPECTED_PROCESSES)
    if expected is not None and expected != jax.process_count():
        raise HostMismatch(f"the launch expected {expected} processes ({EXPECTED_PROCESSES}) but "
                           f"{jax.process_count()} joined the job; check the host list and the launch command")


def source_digest() -> str:
    """sha256 over the sajax and sim packages' Python files (relative path and bytes, in sorted order): the code
    this process runs, whatever its version string or checkout path."""
    digest = hashlib.sha256()
    for package in ("sajax", "sim"):
        spec = importlib.util.find_spec(package)  # located, not imported (sajax never imports sim)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def job_digest(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()


def check_same_job(job: dict) -> None:
    """HostMismatch naming every process whose sources or job differ from process 0's (all processes raise)."""
    if jax.process_count() == 1:
        return
    code, work = source_digest(), job_digest(job)
    mine = np.frombuffer(bytes.fromhex(code) + bytes.fromhex(work), np.uint32)  # 16 words
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 16]
    problems = []
    for what, words, fix in (("sajax/sim sources", slice(0, 8), "install the same checkout on every host"),
                             ("job (config and arguments)", slice(8, 16), "run the same command on every host")):
        other = [p for p in range(len(every)) if not np.array_equal(every[p, words], every[0, words])]
        if other:
            problems.append(f"process(es) {other} run another {what} than process 0 "
                            f"(sha256 {_hex(every[other[0], words])[:12]} vs {_hex(every[0, words])[:12]}): {fix}")
    if problems:
        raise HostMismatch("; ".join(problems))


def _hex(words: np.ndarray) -> str:
    return np.ascontiguousarray(words, np.uint32).tobytes().hex()


def is_main() -> bool:
    """Whether this process writes the files every process would otherwise write alike (metrics, exports)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def max_over_processes(value: int) -> int:
    """The largest of every process's `value` (itself in a single-process run)."""
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def gather(tree):
    """A tree of (possibly cross-process sharded) jax.Arrays → the same tree of whole numpy arrays, on every
    process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
