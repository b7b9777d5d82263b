"""The training run: checks, set-up, auto-resume, the step loop, checkpoints, metrics and evaluation.

`run(cfg, workdir)` is what `sajax-train` calls. It first checks everything the run needs — the config, an
existing workdir's configuration, the model (`init_from`: config and every tensor's shape), the tokenizer against
the vocabulary, the mesh, every data record, DPO's stored reference log-probs — and writes nothing until all of
that passes: a rejected start leaves the workdir as it was, so the corrected command can use it.

A workdir holds everything a run needs to continue after a crash and to be exported, even once `init_from` or
the tokenizer's folder has moved: `config.json`, `model_config.json` (the architecture), `tokenizer/`,
`checkpoints/<step>/` (train state + data-iterator state + metadata), `reference_logp.npz` (DPO),
`metrics.jsonl`, `tensorboard/` and `eval.json`. Starting again with the same workdir resumes from the newest
readable checkpoint and reproduces the uninterrupted run exactly, metrics included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from sajax import config_files, fileutil
from sajax.data import alignment, demo, pipeline
from sajax.formats import known_models, loading
from sajax.formats import tokenizer as tokenizer_lib
from sajax.model import decoder, lora
from sajax.model.config import ModelConfig
from sajax.parallel import distributed, sharding
from sajax.train import checkpoint
from sajax.train import metrics as metrics_lib
from sajax.train import reference as reference_lib
from sajax.train import step as ts
from sajax.train.losses import OBJECTIVES

# Config sections that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = ("log_every", "eval_every", "eval_max_batches", "checkpoint", "peak_flops", "mesh", "generate",
                     "data.read_threads")
MODEL_CONFIG = "model_config.json"  # the architecture, as a HF config.json, kept in the workdir
DEMO_DATASET = "demo_dataset"


class TrainingError(RuntimeError):
    """The run cannot continue (diverged, no readable checkpoint, or the workdir belongs to another
    configuration)."""


def check_config(cfg) -> None:
    """Clear errors for settings that cannot work, before anything is written."""
    train = cfg.train
    if train.objective not in OBJECTIVES:
        raise ValueError(f"train.objective must be one of {OBJECTIVES}, got {train.objective!r}")
    for name in ("batch_size", "grad_accum_steps", "loss_chunk_size"):
        if train[name] < 1:
            raise ValueError(f"train.{name} must be >= 1, got {train[name]}")
    if train.epochs < 0 or (train.epochs == 0 and train.steps < 1):
        raise ValueError(f"set train.steps >= 1 (got {train.steps}) or train.epochs > 0 (got {train.epochs})")
    if not 0 <= cfg.optimizer.warmup_ratio < 1:
        raise ValueError(f"optimizer.warmup_ratio must be in [0, 1), got {cfg.optimizer.warmup_ratio}")
    if train.batch_size % (train.grad_accum_steps * jax.process_count()):
        raise ValueError(f"train.batch_size ({train.batch_size}) must be divisible by train.grad_accum_steps "
                         f"({train.grad_accum_steps}) × processes ({jax.process_count()})")
    if train.rating_scale <= 0:
        raise ValueError(f"train.rating_scale must be > 0, got {train.rating_scale}")
    if cfg.data.pack_len and cfg.data.pack_len < cfg.data.max_len:
        raise ValueError(f"data.pack_len must be 0 or >= data.max_len ({cfg.data.max_len}), got {cfg.data.pack_len}")
    if cfg.checkpoint.every < 1 or cfg.checkpoint.keep < 1:
        raise ValueError(f"checkpoint.every and checkpoint.keep must be >= 1, got {cfg.checkpoint.every}, "
                         f"{cfg.checkpoint.keep}")


def _config_dict(cfg) -> dict:
    return json.loads(cfg.to_json())


def check_same_run(cfg, workdir: Path) -> None:
    """TrainingError when `workdir` holds a run made with another configuration (beyond RESUMABLE_CHANGES). A
    field the saved config lacks (added by a later sajax) counts as unchanged at the embedded default's value."""
    config_file = workdir / "config.json"
    if not config_file.exists():
        return
    saved = fileutil.read_json(config_file)
    if not isinstance(saved, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(saved).__name__}")
    changed = config_files.changed_fields(saved, _config_dict(cfg),
                                          _config_dict(config_files.load_config(config_files.DEFAULT_CONFIG)),
                                          RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{k}: {old!r} → {new!r}" for k, old, new in changed[:5])
        raise TrainingError(f"{config_file} was written by a run with another configuration ({details}); use a "
                            "new --workdir, or the same config to resume")


def init_from(cfg) -> str:
    """`cfg.init_from`: a HF folder, a GGUF file or a known model's name (fetched once, `formats.known_models`)."""
    return known_models.resolve(cfg.init_from)


def lora_options(cfg) -> dict:
    """The `lora` config section as ModelConfig run-time options (rank 0 when the section is absent: a config
    written before sajax had LoRA)."""
    section = cfg.get("lora") or {}
    return {f"lora_{k}": section[k] for k in ("rank", "alpha", "targets", "dropout", "modules_to_save")
            if k in section}


def model_config(cfg, workdir: Path | None = None) -> ModelConfig:
    """The architecture: the workdir's `model_config.json` once a run has started there; else `init_from`'s
    config (and generation config), else `cfg.model`. Run-time options always come from `cfg.model` and the
    `lora` section."""
    runtime = {k: cfg.model[k] for k in ("dtype", "param_dtype", "remat_policy", "scan_layers")}
    runtime.update(lora_options(cfg))
    saved = None if workdir is None else workdir / MODEL_CONFIG
    if saved is not None and saved.is_file():
        hf_config = fileutil.read_json(saved)
        if not isinstance(hf_config, dict):
            raise ValueError(f"{saved}: expected a JSON object, got {type(hf_config).__name__}")
        return ModelConfig.from_hf_dict(hf_config, source=str(saved), **runtime)
    if cfg.init_from:
        return loading.load_config(init_from(cfg), **runtime)
    return ModelConfig.from_dict({**cfg.model.to_dict(), **runtime})


def _has_checkpoints(workdir: Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


@dataclasses.dataclass
class Setup:
    """Everything a run needs, checked; `commit` then writes what the workdir lacks."""

    cfg: object
    workdir: Path
    config: ModelConfig
    tokenizer: object
    mesh: jax.sharding.Mesh
    steps: int  # optimizer steps of the whole run (train.steps, or from train.epochs and the data)
    tx: object
    schedule: object
    shardings: ts.TrainState
    encoder: pipeline.GroupEncoder
    sources: list  # [train, validation or None]; empty until `commit` while the demo dataset is unwritten
    demo_records: dict | None  # the synthetic demo dataset to write into the workdir
    reference: list | None  # DPO reference log-probs found in the workdir (checked), else None


def prepare(cfg, workdir: Path) -> Setup:
    """Every check of a start, in the order a user would fix them; reads, never writes."""
    check_config(cfg)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"{workdir}: exists and is not a directory")
    check_same_run(cfg, workdir)
    config = model_config(cfg, workdir)
    tok = _tokenizer(cfg, workdir, config)
    loading.check_vocabulary(tok, config)
    encoder = pipeline.GroupEncoder(tok, cfg.data.max_len, cfg.data.max_prompt_len, cfg.data.num_comp,
                                          chat=prompt_format(cfg, tok) == "chat")

    decoder.check_lora(config)
    base_dtype(cfg)
    mesh = sharding.make_mesh(**cfg.mesh)
    sharding.check_micro_batch(cfg.train.batch_size // cfg.train.grad_accum_steps, mesh)
    decoder.param_shardings(config, mesh)  # every parameter divisible by its mesh axes

    sources, demo = _data(cfg, workdir)
    steps = total_steps(cfg, len(sources[0]) if sources else len(demo["train"]))
    schedule = ts.learning_rate_schedule(cfg.optimizer, steps)
    tx = ts.make_optimizer(cfg.optimizer, steps, config)
    shardings = ts.state_shardings(config, tx, mesh)
    if cfg.init_from and not _has_checkpoints(workdir):
        loading.open_tensors(init_from(cfg), config)  # files complete, every tensor there with its shape
    reference = None
    reference_file = workdir / reference_lib.FILE
    if cfg.train.objective == "dpo" and reference_file.exists():
        reference = reference_lib.load(reference_file, [s for s in sources if s is not None])
    return Setup(cfg, workdir, config, tok, mesh, steps, tx, schedule, shardings, encoder, sources, demo,
                 reference)


def pack_len(cfg) -> int:
    """Tokens per packed row: `data.pack_len`, or num_comp × max_len when 0 (a whole group always fits a row)."""
    return cfg.data.pack_len or cfg.data.num_comp * cfg.data.max_len


PROMPT_FORMATS = ("auto", "query", "chat")


def prompt_format(cfg, tok) -> str:
    """`data.prompt_format`: 'query' (the dataset's filled template as plain text, as the original project trains),
    'chat' (instruction and input as a user turn of the tokenizer's chat template) or 'auto' (chat when the
    tokenizer has a template)."""
    chosen = cfg.data.prompt_format
    if chosen not in PROMPT_FORMATS:
        raise ValueError(f"data.prompt_format must be one of {PROMPT_FORMATS}, got {chosen!r}")
    if chosen == "auto":
        return "chat" if tokenizer_lib.has_chat_template(tok) else "query"
    return chosen


def total_steps(cfg, train_groups: int) -> int:
    """`train.steps`, or with `train.epochs` > 0, ⌈epochs · groups / batch_size⌉ (at least 1)."""
    if cfg.train.epochs > 0:
        return max(1, math.ceil(cfg.train.epochs * train_groups / cfg.train.batch_size))
    return cfg.train.steps


def _tokenizer(cfg, workdir: Path, config: ModelConfig):
    """The workdir's copy once a run has started there; else `cfg.tokenizer`, `init_from`'s, or the demo one."""
    if (workdir / "tokenizer").is_dir():
        return tokenizer_lib.load_tokenizer(workdir / "tokenizer")
    if cfg.tokenizer or cfg.init_from:
        return tokenizer_lib.load_tokenizer(cfg.tokenizer or init_from(cfg))
    return tokenizer_lib.demo_tokenizer(config.vocab_size)


def _data(cfg, workdir: Path) -> tuple[list, dict | None]:
    """([train source, validation source or None], None), every record checked; or ([], records) for the
    synthetic demo dataset when `data.path` is empty and the workdir has none yet."""
    path = cfg.data.path
    if not path:
        path = workdir / DEMO_DATASET
        if not path.exists():
            records = {"train": demo.synthetic_groups(512, seed=0),
                       "validation": demo.synthetic_groups(64, seed=1)}
            for split, groups in records.items():
                for i, group in enumerate(groups):
                    alignment.validate_group(group, f"demo {split} record {i}", (1.0, cfg.train.rating_scale))
            return [], records
    train = _checked_source(cfg, path, cfg.data.train_split)
    if not cfg.data.validation_path and not alignment.has_split(path, cfg.data.validation_split):
        return [train, None], None  # no held-out data: no evaluation
    return [train, _checked_source(cfg, cfg.data.validation_path or path, cfg.data.validation_split)], None


def _checked_source(cfg, path, split) -> alignment.GroupSource:
    source = alignment.GroupSource(path, split, preference_scores=(float(cfg.train.rating_scale), 1.0))
    dropped = source.validate((1.0, float(cfg.train.rating_scale)), cfg.data.drop_invalid_scores)
    if dropped.responses:
        if distributed.is_main():
            sys.stderr.write(f"warning: {path} [{split}]: dropped {dropped} (data.drop_invalid_scores)\n")
    return source


def commit(setup: Setup) -> None:
    """Writes what the workdir lacks — config.json (always refreshed: resumable fields may change),
    model_config.json, tokenizer/, the demo dataset — then reopens the tokenizer (and demo data) from there, so
    a first run and its resumption read the same files."""
    workdir, cfg = setup.workdir, setup.cfg
    if distributed.is_main():
        workdir.mkdir(parents=True, exist_ok=True)
        fileutil.write_text(workdir / "config.json", json.dumps(_config_dict(cfg), indent=2) + "\n")
        if not (workdir / MODEL_CONFIG).exists():
            fileutil.write_text(workdir / MODEL_CONFIG, json.dumps(setup.config.to_hf_dict(), indent=2) + "\n")
        if not (workdir / "tokenizer").exists():
            with fileutil.replace_directory(workdir / "tokenizer") as tmp:
                setup.tokenizer.save_pretrained(str(tmp))
        if setup.demo_records is not None:
            alignment.write_tfds(setup.demo_records, workdir / DEMO_DATASET)
    distributed.barrier("sajax: workdir committed")
    setup.tokenizer = tokenizer_lib.load_tokenizer(workdir / "tokenizer")
    setup.encoder = dataclasses.replace(setup.encoder, tokenizer=setup.tokenizer)
    if setup.demo_records is not None:
        setup.sources, _ = _data(cfg, workdir)
        setup.demo_records = None


def base_dtype(cfg) -> str | None:
    """`lora.base_dtype`: the dtype the frozen base weights are held in during LoRA training ("" or absent: the
    model's param_dtype)."""
    chosen = (cfg.get("lora") or {}).get("base_dtype", "")
    if chosen not in ("", "float32", "bfloat16", "float16"):
        raise ValueError(f"lora.base_dtype must be '', 'float32', 'bfloat16' or 'float16', got {chosen!r}")
    return chosen or None


def initial_params(cfg, config: ModelConfig, params_sharding):
    """The model a run starts from, laid out as `params_sharding` (all parameters): `init_from`'s weights or the
    seeded random initialisation, plus — with LoRA — adapters seeded by `cfg.seed` (B = 0: the base's function)."""
    if cfg.init_from:
        _, params = loading.load_pretrained(init_from(cfg), param_dtype=config.param_dtype,
                                            scan_layers=config.scan_layers)
        if config.lora_rank:
            params = lora.combine(params, jax.device_get(decoder.init_adapters(config, cfg.seed)))
        return jax.device_put(params, params_sharding)
    init = jax.jit(lambda rng: decoder.init_params(config, rng), out_shardings=params_sharding)
    return init(jax.random.key(cfg.seed))


def frozen_params(cfg, config: ModelConfig, frozen: dict) -> dict:
    """The frozen part of the initial params, in `lora.base_dtype` when set."""
    dtype = base_dtype(cfg)
    if dtype is None or not frozen:
        return frozen
    return jax.jit(lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree), donate_argnums=0)(frozen)


def run(cfg, workdir: str | os.PathLike) -> dict:
    """Trains (or resumes) and returns the final evaluation metrics (empty without a validation split). In a
    multi-process job every process calls it with the same arguments (checked first)."""
    distributed.check_same_job({"sajax-train": _config_dict(cfg), "workdir": str(Path(workdir).absolute())})
    setup = prepare(cfg, Path(workdir).absolute())
    commit(setup)
    return _train(setup)


def _train(setup: Setup) -> dict:
    cfg, workdir, config, mesh, tx, shardings = (setup.cfg, setup.workdir, setup.config, setup.mesh, setup.tx,
                                                 setup.shardings)
    train_source, validation_source = setup.sources
    micro_batch = cfg.train.batch_size // cfg.train.grad_accum_steps
    with contextlib.ExitStack() as stack:
        stack.enter_context(sharding.activation_rules(mesh))
        ckpt = stack.enter_context(checkpoint.Checkpointer(workdir, keep=cfg.checkpoint.keep,
                                                           every=cfg.checkpoint.every))
        packed = cfg.data.packing
        step_fn = ts.make_train_step(config, cfg.train, tx, setup.schedule, mesh, shardings, packed=packed,
                                     seed=cfg.seed)
        eval_step = ts.make_eval_step(config, cfg.train.loss_chunk_size, mesh, decoder.param_shardings(config, mesh),
                                      packed=packed)
        try:
            restored = ckpt.restore_latest(ts.abstract_state(config, tx, shardings))
        except checkpoint.CheckpointError as e:
            raise TrainingError(f"{e}; move the broken checkpoints out of {ckpt.directory} to start again from "
                                "the last readable one (or from scratch)") from e
        reference = setup.reference
        needs_reference = cfg.train.objective == "dpo" and reference is None
        trainable, frozen = None, {}
        if restored is None or config.lora_rank or needs_reference:  # the initial model, loaded once
            trainable, frozen = ts.split_trainable(
                config, initial_params(cfg, config, decoder.param_shardings(config, mesh)))
            frozen = frozen_params(cfg, config, frozen)
        if needs_reference:  # log-probs of the *initial* model (LoRA: the frozen base, as trained), once
            reference = reference_lib.compute_and_save(
                workdir / reference_lib.FILE, ts.with_frozen(config, trainable, frozen), config,
                setup.encoder, [s for s in setup.sources if s is not None], mesh, batch_size=micro_batch,
                chunk_size=cfg.train.loss_chunk_size, pack_len=pack_len(cfg) if packed else 0)
        data = pipeline.train_dataset(
            train_source, setup.encoder, batch_size=cfg.train.batch_size, seed=cfg.seed,
            process_index=pipeline.process_block(mesh, cfg.train.batch_size),
            process_count=jax.process_count(), reference=None if reference is None else reference[0],
            read_threads=cfg.data.read_threads,
            packer=pipeline.make_packer(setup.encoder, mesh, cfg.train.batch_size, cfg.train.grad_accum_steps,
                                        pack_len(cfg)) if packed else None)
        iterator = iter(data)
        log_window = []
        if restored is None:
            state = ts.init_state(trainable, tx, shardings)
        else:
            _, state, data_state, meta = restored
            iterator.set_state(data_state)
            log_window = meta.get("log_window", [])
        del trainable  # the state holds it now (or the checkpoint's)
        start = int(state.step)
        writer = stack.enter_context(metrics_lib.MetricsWriter(workdir, start_step=start))
        evaluate = _evaluator(eval_step, validation_source, setup.encoder, cfg, mesh, micro_batch,
                              None if reference is None else reference[1])
        return _loop(setup, state, iterator, lambda state, batch: step_fn(state, batch, frozen),
                     lambda trained: evaluate(ts.with_frozen(config, trained, frozen)), ckpt, writer, start,
                     log_window)


def _evaluator(eval_step, source, encoder, cfg, mesh, batch_size, reference):
    packer = None
    if cfg.data.packing and source is not None:
        packer = pipeline.make_packer(encoder, mesh, batch_size, 1, pack_len(cfg))

    def evaluate(params) -> dict:
        if source is None:
            return {}
        sums = None
        batches = pipeline.eval_batches(
            source, encoder, batch_size=batch_size, seed=cfg.seed,
            process_index=pipeline.process_block(mesh, batch_size), process_count=jax.process_count(),
            reference=reference, packer=packer)
        for i, batch in enumerate(batches):
            if cfg.eval_max_batches and i >= cfg.eval_max_batches:
                break
            out = eval_step(params, pipeline.to_global(batch, mesh))
            sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
        sums = jax.device_get(sums)
        return {"ranking_accuracy": float(sums["ranking_accuracy"].value),
                "best_response_nll": float(sums["best_response_nll"].value),
                "groups": float(sums["best_response_nll"].count)}
    return evaluate


def _loop(setup: Setup, state, iterator, train_step, evaluate, ckpt, writer, start, log_window):
    """Steps start+1 … setup.steps. `log_window`: the metrics of the steps since the last log line (saved with
    each checkpoint, so a run resumed between two log steps logs the same means as an uninterrupted one)."""
    cfg, config, mesh, workdir, steps = setup.cfg, setup.config, setup.mesh, setup.workdir, setup.steps
    # tokens/s and MFU count the positions a step computes: B·K·max_len padded, rows · pack_len packed
    flops_per_token = metrics_lib.train_flops_per_token(config, pack_len(cfg) if cfg.data.packing
                                                        else cfg.data.max_len)
    positions = 0
    peak = metrics_lib.peak_flops_per_device(cfg.peak_flops)
    peak_total = None if peak is None else peak * jax.device_count()
    finite = jax.numpy.bool_(True)
    pending, last_time = list(log_window), time.perf_counter()
    meta = {"model": config.to_hf_dict(), "seed": cfg.seed}
    bar = tqdm(total=steps, initial=start, desc="train", disable=not distributed.is_main(), dynamic_ncols=True)

    def guard(step):
        if not bool(finite):
            good = ckpt.latest_step()
            raise TrainingError(f"non-finite loss or gradient at or before step {step}; stopped without saving. "
                                f"Last good checkpoint: {good if good is not None else 'none'} in {workdir}")

    def window() -> list[dict[str, float]]:
        return [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]

    for step in range(start + 1, steps + 1):
        batch = pipeline.to_global(next(iterator), mesh)
        positions += batch["tokens"].size
        state, step_metrics = train_step(state, batch)
        finite = finite & jax.numpy.isfinite(step_metrics["loss"]) & jax.numpy.isfinite(step_metrics["grad_norm"])
        pending.append(step_metrics)
        if step % cfg.log_every == 0 or step == steps:
            guard(step)
            now = time.perf_counter()
            logged = window()
            scalars = {k: float(np.mean([m[k] for m in logged], dtype=np.float64)) for k in logged[-1]}
            rate = positions / (now - last_time)
            scalars["tokens_per_second"] = rate
            if peak_total:
                scalars["mfu"] = flops_per_token * rate / peak_total
            writer.write(step, scalars)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", rank_acc=f"{scalars['ranking_accuracy']:.3f}",
                            tok_s=f"{rate:.0f}", refresh=False)
            pending, last_time, positions = [], time.perf_counter(), 0
        if cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
            writer.write(step, evaluate(state.params), prefix="eval")
            last_time, positions = time.perf_counter(), 0  # the rate of the steps after the evaluation
        if step % cfg.checkpoint.every == 0 or step == steps:
            guard(step)
            ckpt.save(step, state, iterator.get_state(), {**meta, "step": step, "log_window": window()},
                      force=step == steps)
        bar.update(1)
    bar.close()
    final = evaluate(state.params)
    if final:
        writer.write(steps, final, prefix="eval")
    if distributed.is_main() and final:
        fileutil.write_text(workdir / "eval.json", json.dumps({"step": steps, **final}, indent=2) + "\n")
    return final
