"""A training checkpoint → a Hugging Face LLaMA directory (safetensors + config + tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections

from sajax import checkpoint, hf, sharding, tokenizer
from sajax import train as train_lib
from sajax import train_step as ts


def export(workdir: str, out: str, step: int | None = None) -> tuple[Path, int]:
    """Writes the params of checkpoint `step` (default: latest) of the run in `workdir` to `out`."""
    workdir = Path(workdir).absolute()
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; is {workdir} a sajax-train workdir?")
    cfg = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    config = train_lib.model_config(cfg)
    ckpt = checkpoint.Checkpointer(workdir, keep=cfg.checkpoint.keep, every=cfg.checkpoint.every, owner=False)
    available = list(ckpt.manager.all_steps())
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in available:
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint for step {step} (available: {available})")
    tx = ts.make_optimizer(cfg.optimizer, cfg.train.steps, config)
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)  # spread over this host's devices, no replication
    abstract = checkpoint.abstract_like(jax.eval_shape(lambda: train_lib._abstract_state(config, tx)),
                                        ts.state_shardings(config, tx, mesh))
    state, _, _ = ckpt.restore(step, abstract)
    ckpt.close()
    tok_dir = cfg.tokenizer or cfg.init_from or str(workdir / "tokenizer")
    tok = tokenizer.load_tokenizer(tok_dir)
    path = hf.save_pretrained(config, state.params, out, tokenizer=tok)
    return path, step
