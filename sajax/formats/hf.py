"""Hugging Face checkpoint folders ⇄ sajax parameters, through safetensors (no torch).

`load_pretrained(dir)` reads `config.json` and `model.safetensors` or the shards listed in
`model.safetensors.index.json` (fp32/bf16/fp16); `save_pretrained(config, params, dir)` writes a directory that
transformers' `from_pretrained` loads. Both accept either layer layout (unrolled or scanned). Tensor names and
layouts: `sajax.formats.layout`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from sajax import fileutil
from sajax.formats import layout
from sajax.model.config import ModelConfig

class _LazyTensors:
    """HF name → array, read on access from one or several safetensors files (keeps peak memory at one tensor)."""

    def __init__(self, files_by_name: dict[str, Path]):
        self._files_by_name = files_by_name
        self._handles: dict[Path, object] = {}

    def keys(self):
        return self._files_by_name.keys()

    def _handle(self, name):
        path = self._files_by_name[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="numpy")
        return self._handles[path]

    def __getitem__(self, name):
        return self._handle(name).get_tensor(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the files' headers (no data read)."""
        return {name: tuple(self._handle(name).get_slice(name).get_shape()) for name in self.keys()}


def load_config(path: str | os.PathLike, param_dtype: str = "float32", **runtime) -> ModelConfig:
    """The ModelConfig of a HF LLaMA directory: `config.json`, plus the end-of-sequence ids of
    `generation_config.json`; ValueError / FileNotFoundError naming the file that is missing or broken."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; a HF checkpoint directory holds config.json")
    hf_config = fileutil.read_json(config_file)
    if not isinstance(hf_config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(hf_config).__name__}")
    config = ModelConfig.from_hf_dict(hf_config, source=str(config_file), param_dtype=param_dtype, **runtime)
    return _with_generation_eos(config, path / "generation_config.json")


def open_tensors(path: str | os.PathLike, config: ModelConfig) -> _LazyTensors:
    """The safetensors of a HF directory (`model.safetensors` or the shards of `model.safetensors.index.json`),
    checked without reading their data: every file present with a complete header, and every tensor `config`
    needs with the right shape. Errors name the file or the tensor."""
    path = Path(path)
    index_file, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index_file.is_file():
        index = fileutil.read_json(index_file)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{index_file}: expected JSON with a 'weight_map' object")
        files_by_name = {name: path / shard for name, shard in index["weight_map"].items()}
        for shard in sorted(set(files_by_name.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: listed in {index_file.name} but missing")
            _safetensors_names(shard)  # a complete header
    elif single.is_file():
        files_by_name = {name: single for name in _safetensors_names(single)}
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                "(PyTorch .bin checkpoints are not read: convert them to safetensors)")
    tensors = _LazyTensors(files_by_name)
    layout.check_tensors(config, tensors.shapes(), str(path))
    return tensors


def load_pretrained(path: str | os.PathLike, param_dtype: str = "float32", **runtime) -> tuple[ModelConfig, dict]:
    """(config, params) from a HF LLaMA directory or a GGUF file (dequantized tensor by tensor), parameters cast
    to `param_dtype`. `runtime` sets the other run-time options of `ModelConfig` (dtype of compute, remat_policy,
    scan_layers)."""
    config = load_config(path, param_dtype, **runtime)
    return config, layout.params_from_hf_state(config, open_tensors(path, config), source=str(path))


def _safetensors_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="numpy") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError for a corrupt or truncated file
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def _with_generation_eos(config: ModelConfig, generation_file: Path) -> ModelConfig:
    """Adds the end-of-sequence ids of `generation_config.json` (e.g. LLaMA-3 Instruct's <|eot_id|>) to the
    config's, as transformers' generate stops at any of them."""
    if not generation_file.is_file():
        return config
    generation = fileutil.read_json(generation_file)
    if not isinstance(generation, dict):
        raise ValueError(f"{generation_file}: expected a JSON object, got {type(generation).__name__}")
    eos = generation.get("eos_token_id")
    extra = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    merged = tuple(dict.fromkeys(list(config.eos_token_ids) + extra))
    if not merged:
        return config
    return config.replace(eos_token_id=merged[0] if len(merged) == 1 else merged)


def save_pretrained(config: ModelConfig, params, path: str | os.PathLike, tokenizer=None,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Writes `config.json`, `generation_config.json`, safetensors weights (sharded with an index above
    `max_shard_bytes`) and, if given, the tokenizer. Written to a temporary directory and renamed at the end, so
    an existing checkpoint at `path` is replaced (as a whole) only by a complete one; a non-empty directory that
    is not a checkpoint is refused."""
    path = Path(path).resolve()
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise ValueError(f"{path}: exists and is not a HF checkpoint directory; refusing to replace it")
    state = layout.hf_state_from_params(config, params, dtype=layout.SAFE_DTYPES[config.param_dtype])
    with fileutil.replace_directory(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.to_hf_dict()["eos_token_id"],
                      "pad_token_id": config.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _write_safetensors(state, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return path


def _write_safetensors(state: dict[str, np.ndarray], directory: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in state.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / filename), metadata=metadata)
        weight_map.update({name: filename for name in shard})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in state.values()))}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
