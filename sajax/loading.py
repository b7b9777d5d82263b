"""A model and its tokenizer, ready for inference: a Hugging Face LLaMA directory, a GGUF file, a known model's
name (`sajax.known_models`), or a random model of a config's size with the offline demo tokenizer (a smoke test of
the whole stack). Used by `sajax-generate` and by the simulator's local backends and embedder."""

from __future__ import annotations

from sajax import hf, known_models, model, tokenizer
from sajax.config import LlamaConfig


def load_model_and_tokenizer(cfg, model_path: str | None):
    """(config, params, tokenizer). With `model_path`, the checkpoint there (run-time options `dtype`,
    `param_dtype`, `remat_policy`, `scan_layers` from `cfg.model`); without, random params of `cfg.model`
    (seeded by `cfg.seed`) and `cfg.tokenizer` or the demo tokenizer. Writes nothing."""
    model_path = known_models.resolve(model_path) if model_path else model_path
    if model_path:
        runtime = {k: cfg.model[k] for k in ("dtype", "remat_policy", "scan_layers")}
        config, params = hf.load_pretrained(model_path, param_dtype=cfg.model.param_dtype, **runtime)
        tok = tokenizer.load_tokenizer(model_path)
    else:
        config = LlamaConfig.from_dict(cfg.model)
        params = model.init_params(config, cfg.seed)
        tok = tokenizer.load_tokenizer(cfg.tokenizer) if cfg.tokenizer else tokenizer.demo_tokenizer(config.vocab_size)
    check_vocabulary(tok, config)
    return config, params, tok


def check_vocabulary(tok, config: LlamaConfig) -> None:
    """ValueError when the tokenizer can produce ids the model has no embedding for."""
    if len(tok) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {config.vocab_size}")
