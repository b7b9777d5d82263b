"""A model from any of the files sajax reads — a Hugging Face folder or a GGUF file (`load_config`,
`open_tensors`, `load_pretrained` pick the reader by the path) — and a model with its tokenizer, ready for
inference: such a file, a known model's name (`sajax.formats.known_models`), or a random model of a config's size
with the offline demo tokenizer (a smoke test of the whole stack). Used by the trainer, `sajax-generate` and the
simulator's local backends and embedder."""

from __future__ import annotations

import os

import jax

from sajax.formats import gguf, hf, known_models, tokenizer
from sajax.model import decoder
from sajax.model.config import ModelConfig


def load_config(path: str | os.PathLike, param_dtype: str = "float32", **runtime) -> ModelConfig:
    """The config of a HF folder (`config.json` + `generation_config.json`) or of a GGUF file (its metadata);
    `runtime` sets the run-time options (dtype, remat_policy, scan_layers, …)."""
    reader = gguf if gguf.is_gguf(path) else hf
    return reader.load_config(path, param_dtype, **runtime)


def open_tensors(path: str | os.PathLike, config: ModelConfig):
    """The tensors of a HF folder or GGUF file, checked against `config` (every file complete, every tensor
    present with its shape) without reading their data; errors name the file or the tensor."""
    reader = gguf if gguf.is_gguf(path) else hf
    return reader.open_tensors(path, config)


def load_pretrained(path: str | os.PathLike, param_dtype: str = "float32", **runtime) -> tuple[ModelConfig, dict]:
    """(config, params) of a HF folder or GGUF file, parameters cast to `param_dtype` tensor by tensor."""
    reader = gguf if gguf.is_gguf(path) else hf
    return reader.load_pretrained(path, param_dtype, **runtime)


def load_model_and_tokenizer(cfg, model_path: str | None):
    """(config, params, tokenizer). With `model_path`, the checkpoint there (run-time options `dtype`,
    `param_dtype`, `remat_policy`, `scan_layers` from `cfg.model`); without, random params of `cfg.model`
    (seeded by `cfg.seed`) and `cfg.tokenizer` or the demo tokenizer. The parameters come on the default device
    (`to_device`): this is the single-device inference path (training shards its parameters itself). Writes
    nothing."""
    model_path = known_models.resolve(model_path) if model_path else model_path
    if model_path:
        runtime = {k: cfg.model[k] for k in ("dtype", "remat_policy", "scan_layers")}
        config, params = load_pretrained(model_path, param_dtype=cfg.model.param_dtype, **runtime)
        tok = tokenizer.load_tokenizer(model_path)
    else:
        config = ModelConfig.from_dict(cfg.model)
        params = decoder.init_params(config, cfg.seed)
        tok = tokenizer.load_tokenizer(cfg.tokenizer) if cfg.tokenizer else tokenizer.demo_tokenizer(config.vocab_size)
    check_vocabulary(tok, config)
    return config, to_device(params), tok


def to_device(params: dict) -> dict:
    """The parameter tree (nested dicts) on the default device, moved leaf by leaf: each host array is dropped as
    soon as its copy is made (peak: the parameters plus one tensor), and jitted calls then take them as they are
    instead of transferring host arrays at every call. Mutates and returns `params`."""
    for key, value in params.items():
        params[key] = to_device(value) if isinstance(value, dict) else jax.device_put(value)
    return params


def check_vocabulary(tok, config: ModelConfig) -> None:
    """ValueError when the tokenizer can produce ids the model has no embedding for."""
    if len(tok) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {config.vocab_size}")
