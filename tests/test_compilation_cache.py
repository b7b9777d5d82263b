"""The persistent compilation cache every sajax command turns on (`sajax.compilation_cache`)."""

import os
import subprocess
import sys

import jax

from sajax import compilation_cache

PROGRAM = """
import jax, jax.numpy as jnp
from sajax import compilation_cache
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event))
print(compilation_cache.enable())
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print(hits.count("/jax/compilation_cache/cache_hits"))
"""


def _run(env) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_a_second_process_reuses_the_first_ones_programs_from_a_directory_named_for_the_host(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(SAJAX_CACHE=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    directory = str(tmp_path / "xla" / compilation_cache.host_key())
    assert _run(env) == [directory, "0"]
    assert os.listdir(directory)  # the program was stored
    again = _run(env)
    assert again[0] == directory and int(again[1]) >= 1  # and loaded instead of compiled (jnp.ones is one too)
    assert _run({**env, "SAJAX_COMPILATION_CACHE": "0"}) == ["None", "0"]


def test_host_key_names_the_machine_and_is_stable():
    key = compilation_cache.host_key()
    assert key == compilation_cache.host_key() and key.split("-")[0] and len(key.split("-")[1]) == 16


def test_an_explicit_jax_cache_directory_wins(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    try:
        assert compilation_cache.enable() == str(tmp_path / "mine")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
