"""jax's persistent compilation cache for every sajax process: a program (a model call at one shape, a train step)
is compiled once per machine, not again in every process that runs it (the simulator, the trainer, the evaluations
and the server of one pipeline each compile the same generation programs).

The cache key is jax's own — the program's HLO, compile options, XLA flags, jax/jaxlib and the backend with its
devices' kind — under a directory named for this host's processor (its model and instruction-set flags, which
jax's key does not cover for CPU executables): a home directory shared by different machines never hands one an
executable built for another's instruction set. Where: `$JAX_COMPILATION_CACHE_DIR` when set (the tests' per-session
cache), else `$SAJAX_CACHE/xla/<host>` (`$SAJAX_CACHE` defaults to ~/.cache/sajax). `SAJAX_COMPILATION_CACHE=0`
turns it off. Programs that compile in under `MIN_COMPILE_SECONDS` are not stored.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import jax

from sajax import fileutil

MIN_COMPILE_SECONDS = 0.2
MAX_BYTES = 4 << 30  # jax evicts the least recently used entries beyond this


def host_key() -> str:
    """The processor this process compiles for: machine, model name and instruction-set flags, hashed."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            lines = sorted({line.strip() for line in f if line.startswith(("model name", "flags", "Features"))})
    except OSError:
        pass
    digest = hashlib.sha256("\n".join([platform.machine(), platform.processor(), *lines]).encode()).hexdigest()
    return f"{platform.machine() or 'cpu'}-{digest[:16]}"


def enable() -> str | None:
    """Points jax at the persistent cache (see the module docstring); returns its directory, None when off."""
    if os.environ.get("SAJAX_COMPILATION_CACHE") == "0":
        return None
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(fileutil.cache_dir() / "xla" / host_key())
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
