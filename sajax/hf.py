"""Hugging Face LLaMA checkpoints ⇄ sajax parameters, through safetensors (no torch).

`load_pretrained(dir)` reads `config.json` and `model.safetensors` or the shards listed in
`model.safetensors.index.json` (fp32/bf16/fp16); `save_pretrained(config, params, dir)` writes a directory that
`transformers.LlamaForCausalLM.from_pretrained` loads. Both accept either layer layout (unrolled or scanned).

Name and layout map (HF `nn.Linear.weight` is [out, in]; ours are [in, ...out]):
  model.embed_tokens.weight [V,D]                      → embed_tokens [V,D]
  model.layers.i.self_attn.{q,k,v}_proj.weight [N·E,D] → layers_i/self_attn/{q,k,v}_proj [D,N,E]
  model.layers.i.self_attn.o_proj.weight [D,H·E]       → layers_i/self_attn/o_proj [H,E,D]
  model.layers.i.mlp.{gate,up}_proj.weight [F,D]       → layers_i/mlp/{gate,up}_proj [D,F]
  model.layers.i.mlp.down_proj.weight [D,F]            → layers_i/mlp/down_proj [F,D]
  model.layers.i.{input,post_attention}_layernorm.weight, model.norm.weight → …/weight [D]
  lm_head.weight [V,D]                                 → lm_head [D,V] (absent when embeddings are tied)
HF checkpoints already store q/k rows in the half-split RoPE layout our model uses, so no row permutation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from sajax import fileutil, gguf
from sajax.config import LlamaConfig
from sajax.model import stack_layers, unstack_layers

_SAFE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def _layer_entries(config: LlamaConfig, i: int):
    """(HF name, our path, HF→ours, ours→HF) for the tensors of layer i."""
    d, h, k, e = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    pre = f"model.layers.{i}."
    heads = lambda n: (lambda w: w.T.reshape(d, n, e), lambda p: p.reshape(d, n * e).T)  # noqa: E731
    transpose = (lambda w: w.T, lambda p: p.T)
    same = (lambda w: w, lambda p: p)
    return [
        (pre + "self_attn.q_proj.weight", ("self_attn", "q_proj"), *heads(h)),
        (pre + "self_attn.k_proj.weight", ("self_attn", "k_proj"), *heads(k)),
        (pre + "self_attn.v_proj.weight", ("self_attn", "v_proj"), *heads(k)),
        (pre + "self_attn.o_proj.weight", ("self_attn", "o_proj"),
         lambda w: w.T.reshape(h, e, d), lambda p: p.reshape(h * e, d).T),
        (pre + "mlp.gate_proj.weight", ("mlp", "gate_proj"), *transpose),
        (pre + "mlp.up_proj.weight", ("mlp", "up_proj"), *transpose),
        (pre + "mlp.down_proj.weight", ("mlp", "down_proj"), *transpose),
        (pre + "input_layernorm.weight", ("input_layernorm", "weight"), *same),
        (pre + "post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), *same),
    ]


def _entries(config: LlamaConfig):
    same = (lambda w: w, lambda p: p)
    out = [("model.embed_tokens.weight", ("embed_tokens",), *same), ("model.norm.weight", ("norm", "weight"), *same)]
    if not config.tie_word_embeddings:
        out.append(("lm_head.weight", ("lm_head",), lambda w: w.T, lambda p: p.T))
    for i in range(config.num_hidden_layers):
        out += [(name, (f"layers_{i}",) + path, a, b) for name, path, a, b in _layer_entries(config, i)]
    return out


def check_tensors(config: LlamaConfig, shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> None:
    """Raises ValueError naming the tensor when one that `config` needs is missing, one is unexpected or one has
    the wrong shape; `shapes` maps HF names to shapes."""
    expected = _expected_hf_shapes(config)
    names = {n for n in shapes if not n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        names.discard("lm_head.weight")  # some tied checkpoints store the (identical) head anyway
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match the config: missing {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' …' if len(unexpected) > 5 else ''}")
    for name in sorted(names):
        if tuple(shapes[name]) != expected[name]:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, the config implies "
                             f"{expected[name]}")


def params_from_hf_state(config: LlamaConfig, tensors, source: str = "checkpoint", dtype=None):
    """Our param tree from a mapping HF name → array (numpy or anything `np.asarray` takes).

    Raises ValueError naming the tensor when one is missing, unexpected or of the wrong shape."""
    if hasattr(tensors, "shapes"):  # lazy sources (safetensors files, GGUF) know shapes without reading data
        check_tensors(config, tensors.shapes(), source)
    else:
        check_tensors(config, {name: np.shape(tensors[name]) for name in tensors.keys()}, source)
    target = np.dtype(dtype or _SAFE_DTYPES[config.param_dtype])
    params: dict = {}
    for name, path, to_ours, _ in _entries(config):
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(to_ours(np.asarray(tensors[name]).astype(target)))
    if config.scan_layers:
        params = stack_layers(params, config.num_hidden_layers)
    return params


def hf_state_from_params(config: LlamaConfig, params, dtype=None) -> dict[str, np.ndarray]:
    """HF name → numpy array (the inverse of `params_from_hf_state`)."""
    params = jax.device_get(params)
    if config.scan_layers:
        params = unstack_layers(params, config.num_hidden_layers)
    out = {}
    for name, path, _, to_hf in _entries(config):
        node = params
        for key in path:
            node = node[key]
        array = np.asarray(node)
        out[name] = np.ascontiguousarray(to_hf(array.astype(dtype) if dtype is not None else array))
    return out


def _expected_hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, k, e = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    per_layer = {"self_attn.q_proj.weight": (h * e, d), "self_attn.k_proj.weight": (k * e, d),
                 "self_attn.v_proj.weight": (k * e, d), "self_attn.o_proj.weight": (d, h * e),
                 "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
                 "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{n}": s for n, s in per_layer.items()})
    return shapes


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


def load_config(path: str | os.PathLike, param_dtype: str = "float32", **runtime) -> LlamaConfig:
    """The LlamaConfig of a HF LLaMA directory: `config.json`, plus the end-of-sequence ids of
    `generation_config.json`; ValueError / FileNotFoundError naming the file that is missing or broken. A `.gguf`
    file: its metadata (`sajax.gguf`)."""
    if gguf.is_gguf(path):
        return gguf.load_config(path, param_dtype, **runtime)
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; a HF checkpoint directory holds config.json")
    hf_config = fileutil.read_json(config_file)
    if not isinstance(hf_config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(hf_config).__name__}")
    config = LlamaConfig.from_hf_dict(hf_config, source=str(config_file), param_dtype=param_dtype, **runtime)
    return _with_generation_eos(config, path / "generation_config.json")


def open_tensors(path: str | os.PathLike, config: LlamaConfig) -> _LazyTensors:
    """The safetensors of a HF directory (`model.safetensors` or the shards of `model.safetensors.index.json`),
    checked without reading their data: every file present with a complete header, and every tensor `config`
    needs with the right shape. Errors name the file or the tensor. A `.gguf` file: its tensor table."""
    if gguf.is_gguf(path):
        return gguf.open_tensors(path, config)
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
    check_tensors(config, tensors.shapes(), str(path))
    return tensors


def load_pretrained(path: str | os.PathLike, param_dtype: str = "float32", **runtime) -> tuple[LlamaConfig, dict]:
    """(config, params) from a HF LLaMA directory or a GGUF file (dequantized tensor by tensor), parameters cast
    to `param_dtype`. `runtime` sets the other run-time options of `LlamaConfig` (dtype of compute, remat_policy,
    scan_layers)."""
    if gguf.is_gguf(path):
        return gguf.load_pretrained(path, param_dtype, **runtime)
    config = load_config(path, param_dtype, **runtime)
    return config, params_from_hf_state(config, open_tensors(path, config), source=str(path))


def _safetensors_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="numpy") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError for a corrupt or truncated file
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def _with_generation_eos(config: LlamaConfig, generation_file: Path) -> LlamaConfig:
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


def save_pretrained(config: LlamaConfig, params, path: str | os.PathLike, tokenizer=None,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Writes `config.json`, `generation_config.json`, safetensors weights (sharded with an index above
    `max_shard_bytes`) and, if given, the tokenizer. Written to a temporary directory and renamed at the end, so
    an existing checkpoint at `path` is replaced (as a whole) only by a complete one; a non-empty directory that
    is not a checkpoint is refused."""
    path = Path(path).resolve()
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise ValueError(f"{path}: exists and is not a HF checkpoint directory; refusing to replace it")
    state = hf_state_from_params(config, params, dtype=_SAFE_DTYPES[config.param_dtype])
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
