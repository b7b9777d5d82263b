"""A training checkpoint → a Hugging Face LLaMA directory (safetensors + config + tokenizer).

Everything it needs is in the workdir (`config.json`, `model_config.json`, `tokenizer/`, `checkpoints/`), so
a run exports the same after `init_from` or the tokenizer's folder has moved.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from sajax import fileutil
from sajax.formats import hf, peft, tokenizer
from sajax.model import decoder, lora
from sajax.parallel import distributed, sharding
from sajax.train import checkpoint
from sajax.train import loop as train_lib
from sajax.train import step as ts


def is_workdir(path: str | Path) -> bool:
    """Whether `path` is a sajax-train workdir (its config and a checkpoints folder), not a HF folder."""
    return (Path(path) / "config.json").is_file() and (Path(path) / "checkpoints").is_dir()


def export(workdir: str, out: str, step: int | None = None, peft_out: str | None = None) -> tuple[Path, int]:
    """Writes the model of checkpoint `step` (default: the newest readable one) of the run in `workdir` to `out`
    as a HF folder — a LoRA run's adapters merged into its base (W + α/r·A·B) — and, with `peft_out`, the adapters
    alone in PEFT's format there. Errors name what is missing or unreadable; nothing is written then. In a
    multi-process job every process restores its shards, they are gathered, and process 0 writes the folders."""
    distributed.check_same_job({"sajax-export": str(Path(workdir).absolute()), "out": str(Path(out).absolute()),
                                "step": step, "peft": peft_out})
    config, params, tok, step = restore(workdir, step, merge=False)
    if peft_out is not None and config.lora_rank == 0:
        raise ValueError(f"--peft: the run in {workdir} trained no LoRA adapters (lora.rank is 0)")
    params = distributed.gather(params)
    path = Path(out).resolve()
    if distributed.is_main():
        merged_config, merged_params = lora.merged(config, params) if config.lora_rank else (config, params)
        path = hf.save_pretrained(merged_config, merged_params, out, tokenizer=tok)
        if peft_out is not None:
            peft.save_adapter(config, params, peft_out, base_model=_run_config(Path(workdir).absolute()).init_from)
    distributed.barrier("sajax: exported")
    return path, step


def _run_config(workdir: Path):
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; is {workdir} a sajax-train workdir?")
    return ml_collections.ConfigDict(fileutil.read_json(config_file))


def _run_tokenizer(workdir: Path, cfg):
    tok_dir = workdir / "tokenizer"
    return tokenizer.load_tokenizer(tok_dir if tok_dir.is_dir() else (cfg.tokenizer or cfg.init_from))


def _host_mesh():
    return sharding.make_mesh(data=1, fsdp=-1, tensor=1)  # spread over every device of the job, no replication


def initial(workdir: str | Path):
    """(model config, params, tokenizer) of the model the run in `workdir` started from — its `init_from`, or the
    seeded random initialisation (a LoRA run: that base, without its zero-effect adapters) — to evaluate beside
    what it became."""
    workdir = Path(workdir).absolute()
    cfg = _run_config(workdir)
    config = train_lib.model_config(cfg, workdir)
    params = train_lib.initial_params(cfg, config, decoder.param_shardings(config, _host_mesh()))
    if config.lora_rank:
        config, params = config.replace(lora_rank=0), lora.split(params)[0]
    return config, params, _run_tokenizer(workdir, cfg)


def restore(workdir: str | Path, step: int | None = None, merge: bool = True):
    """(model config, params, tokenizer, step) of checkpoint `step` (default: the newest readable one) of the run
    in `workdir`. A LoRA run's checkpoint holds its adapters: the frozen base comes from its `init_from` (or
    seeded initialisation), held as it was in training (`lora.base_dtype`); `merge` folds the adapters into it
    (a plain model), else the adapted config and params are returned."""
    workdir = Path(workdir).absolute()
    cfg = _run_config(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{workdir}/checkpoints: not found; the run has saved no checkpoint yet")
    config = train_lib.model_config(cfg, workdir)
    tok = _run_tokenizer(workdir, cfg)
    tx = ts.make_optimizer(cfg.optimizer, 1, config)  # the state's structure; the schedule does not matter
    mesh = _host_mesh()
    abstract = ts.abstract_state(config, tx, ts.state_shardings(config, tx, mesh))
    with checkpoint.Checkpointer(workdir, keep=1, every=1, owner=False) as ckpt:
        available = ckpt.steps()
        if not available:
            raise FileNotFoundError(f"{ckpt.directory}: no checkpoint; the run has saved none yet")
        if step is None:
            step, state, _, _ = ckpt.restore_latest(abstract)
        elif step not in available:
            raise FileNotFoundError(f"{ckpt.directory}: no checkpoint for step {step} (available: {available})")
        else:
            state, _, _ = ckpt.restore(step, abstract)
    if config.lora_rank == 0:
        return config, state.params, tok, step
    _, frozen = ts.split_trainable(config, train_lib.initial_params(cfg, config, decoder.param_shardings(config, mesh)))
    params = ts.with_frozen(config, state.params, train_lib.frozen_params(cfg, config, frozen))
    if merge:
        config, params = lora.merged(config, params)
    return config, params, tok, step
