"""The training run: set-up from a config, auto-resume, the step loop, checkpoints, metrics and evaluation.

`run(cfg, workdir)` is what `sajax-train` calls. A workdir holds everything a run needs to continue after a
crash: `config.json`, `tokenizer/`, `checkpoints/<step>/` (train state + data-iterator state + metadata),
`reference_logp.npz` (DPO), `metrics.jsonl` and `tensorboard/`. Starting again with the same workdir resumes
from the latest checkpoint and reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from sajax import alignment_data, checkpoint, demo_data, fileutil, hf, input_pipeline, model, sharding, tokenizer
from sajax import metrics as metrics_lib
from sajax import reference as reference_lib
from sajax import train_step as ts
from sajax.config import LlamaConfig
from sajax.losses import OBJECTIVES

# Config sections that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = ("log_every", "eval_every", "eval_max_batches", "checkpoint", "peak_flops", "mesh", "generate",
                     "data.read_threads")


class TrainingError(RuntimeError):
    """The run cannot continue (diverged, or the workdir belongs to another configuration)."""


def check_config(cfg) -> None:
    """Clear errors for settings that cannot work, before anything is written."""
    train = cfg.train
    if train.objective not in OBJECTIVES:
        raise ValueError(f"train.objective must be one of {OBJECTIVES}, got {train.objective!r}")
    for name in ("steps", "batch_size", "grad_accum_steps", "loss_chunk_size"):
        if train[name] < 1:
            raise ValueError(f"train.{name} must be >= 1, got {train[name]}")
    if train.batch_size % (train.grad_accum_steps * jax.process_count()):
        raise ValueError(f"train.batch_size ({train.batch_size}) must be divisible by train.grad_accum_steps "
                         f"({train.grad_accum_steps}) × processes ({jax.process_count()})")
    if train.rating_scale <= 0:
        raise ValueError(f"train.rating_scale must be > 0, got {train.rating_scale}")
    if cfg.checkpoint.every < 1 or cfg.checkpoint.keep < 1:
        raise ValueError(f"checkpoint.every and checkpoint.keep must be >= 1, got {cfg.checkpoint.every}, "
                         f"{cfg.checkpoint.keep}")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _config_dict(cfg) -> dict:
    return json.loads(cfg.to_json())


def _check_same_run(saved: dict, current: dict, path: Path) -> None:
    saved, current = _flatten(saved), _flatten(current)
    changed = [key for key in sorted(set(saved) | set(current))
               if not key.startswith(RESUMABLE_CHANGES) and saved.get(key) != current.get(key)]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} → {current.get(k)!r}" for k in changed[:5])
        raise TrainingError(f"{path} was written by a run with another configuration ({details}); use a new "
                            "--workdir, or the same config to resume")


def prepare_workdir(cfg, workdir: Path) -> None:
    """Creates the workdir with config.json, or checks that an existing one was made with this config."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "config.json"
    current = _config_dict(cfg)
    if config_file.exists():
        _check_same_run(json.loads(config_file.read_text()), current, config_file)
    if jax.process_index() == 0:
        fileutil.write_text(config_file, json.dumps(current, indent=2) + "\n")


def data_sources(cfg, workdir: Path):
    """(train, validation or None) GroupSources, validated; '' = the synthetic demo dataset in the workdir."""
    path = cfg.data.path
    if not path:
        path = workdir / "demo_dataset"
        if not path.exists():
            alignment_data.write_tfds({"train": demo_data.synthetic_groups(512, seed=0),
                                       "validation": demo_data.synthetic_groups(64, seed=1)}, path)
    rating_range = (1.0, float(cfg.train.rating_scale))
    train = alignment_data.GroupSource(path, cfg.data.train_split)
    train.validate(rating_range)
    if not cfg.data.validation_path and not alignment_data.has_split(path, cfg.data.validation_split):
        return train, None  # no held-out data: no evaluation
    validation = alignment_data.GroupSource(cfg.data.validation_path or path, cfg.data.validation_split)
    validation.validate(rating_range)
    return train, validation


def model_config(cfg) -> LlamaConfig:
    if not cfg.init_from:
        return LlamaConfig.from_dict(cfg.model)
    config_file = Path(cfg.init_from) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; init_from must be a HF LLaMA directory")
    hf_config = json.loads(config_file.read_text())
    runtime = {k: cfg.model[k] for k in ("dtype", "param_dtype", "remat_policy", "scan_layers")}
    return LlamaConfig.from_hf_dict(hf_config, source=f"{cfg.init_from}/config.json", **runtime)


def initial_params(cfg, config: LlamaConfig, params_sharding):
    if cfg.init_from:
        _, params = hf.load_pretrained(cfg.init_from, param_dtype=config.param_dtype,
                                       scan_layers=config.scan_layers)
        return jax.device_put(params, params_sharding)
    init = jax.jit(lambda rng: model.init_params(config, rng), out_shardings=params_sharding)
    return init(jax.random.key(cfg.seed))


def run(cfg, workdir: str | os.PathLike) -> dict:
    """Trains (or resumes) and returns the final evaluation metrics (empty without a validation split)."""
    check_config(cfg)
    workdir = Path(workdir).absolute()
    config = model_config(cfg)
    prepare_workdir(cfg, workdir)
    tok = tokenizer.load_or_train_demo(cfg.tokenizer or cfg.init_from, workdir / "tokenizer", config.vocab_size)
    if len(tok) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but model.vocab_size is {config.vocab_size}")
    train_source, validation_source = data_sources(cfg, workdir)
    encoder = input_pipeline.GroupEncoder(tok, cfg.data.max_len, cfg.data.max_prompt_len, cfg.data.num_comp)

    mesh = sharding.make_mesh(**cfg.mesh)
    micro_batch = cfg.train.batch_size // cfg.train.grad_accum_steps
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro_batch % batch_ways:
        raise ValueError(f"train.batch_size / grad_accum_steps = {micro_batch} groups must be divisible by "
                         f"mesh data × fsdp = {batch_ways}")
    schedule = ts.learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    tx = ts.make_optimizer(cfg.optimizer, cfg.train.steps, config)
    shardings = ts.state_shardings(config, tx, mesh)
    ckpt = checkpoint.Checkpointer(workdir, keep=cfg.checkpoint.keep, every=cfg.checkpoint.every)
    latest = ckpt.latest_step()

    with sharding.activation_rules(mesh):
        train_step = ts.make_train_step(config, cfg.train, tx, schedule, mesh, shardings)
        eval_step = ts.make_eval_step(config, cfg.train.loss_chunk_size, mesh, shardings.params)
        reference = None
        if cfg.train.objective == "dpo":  # log-probs of the *initial* model, computed once and kept on disk
            reference = reference_lib.load_or_compute(
                workdir / "reference_logp.npz", lambda: initial_params(cfg, config, shardings.params), config,
                encoder, [train_source] + ([validation_source] if validation_source else []), mesh,
                batch_size=micro_batch, chunk_size=cfg.train.loss_chunk_size)
        data = input_pipeline.train_dataset(
            train_source, encoder, batch_size=cfg.train.batch_size // jax.process_count(), seed=cfg.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            reference=None if reference is None else reference[0], read_threads=cfg.data.read_threads)
        iterator = iter(data)
        if latest is None:
            params = initial_params(cfg, config, shardings.params)
            state = jax.jit(lambda p: ts.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=p,
                                                    opt_state=tx.init(p)), out_shardings=shardings)(params)
            del params
        else:
            abstract = checkpoint.abstract_like(jax.eval_shape(lambda: _abstract_state(config, tx)), shardings)
            state, data_state, _ = ckpt.restore(latest, abstract)
            iterator.set_state(data_state)
        start = int(state.step)
        writer = metrics_lib.MetricsWriter(workdir, start_step=start)
        evaluate = _evaluator(eval_step, validation_source, encoder, cfg, mesh, micro_batch,
                              None if reference is None else reference[1])
        try:
            final = _loop(cfg, state, iterator, train_step, evaluate, ckpt, writer, start, config, mesh, workdir)
        finally:
            ckpt.wait()
            ckpt.close()
            writer.close()
    return final


def _abstract_state(config, tx):
    params = model.param_shapes(config)
    return ts.TrainState(step=jax.ShapeDtypeStruct((), jax.numpy.int32), params=params,
                         opt_state=jax.eval_shape(tx.init, params))


def _evaluator(eval_step, source, encoder, cfg, mesh, batch_size, reference):
    def evaluate(params) -> dict:
        if source is None:
            return {}
        sums = None
        batches = input_pipeline.eval_batches(
            source, encoder, batch_size=batch_size // jax.process_count(), seed=cfg.seed,
            process_index=jax.process_index(), process_count=jax.process_count(), reference=reference)
        for i, batch in enumerate(batches):
            if cfg.eval_max_batches and i >= cfg.eval_max_batches:
                break
            out = eval_step(params, input_pipeline.to_global(batch, mesh))
            sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
        sums = jax.device_get(sums)
        return {"ranking_accuracy": float(sums["correct_pairs"] / max(sums["ranked_pairs"], 1)),
                "best_response_nll": float(sums["best_nll_sum"] / max(sums["groups"], 1)),
                "groups": float(sums["groups"])}
    return evaluate


def _loop(cfg, state, iterator, train_step, evaluate, ckpt, writer, start, config, mesh, workdir):
    steps = cfg.train.steps
    tokens_per_step = cfg.train.batch_size * cfg.data.num_comp * cfg.data.max_len
    flops_per_step = metrics_lib.train_flops_per_token(config, cfg.data.max_len) * tokens_per_step
    peak = metrics_lib.peak_flops_per_device(cfg.peak_flops)
    peak_total = None if peak is None else peak * jax.device_count()
    finite = jax.numpy.bool_(True)
    pending, last_time, last_step = [], time.perf_counter(), start
    meta = {"model": config.to_hf_dict(), "seed": cfg.seed}
    bar = tqdm(total=steps, initial=start, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)

    def guard(step):
        if not bool(finite):
            good = ckpt.latest_step()
            raise TrainingError(f"non-finite loss or gradient at or before step {step}; stopped without saving. "
                                f"Last good checkpoint: {good if good is not None else 'none'} in {workdir}")

    for step in range(start + 1, steps + 1):
        batch = input_pipeline.to_global(next(iterator), mesh)
        state, step_metrics = train_step(state, batch)
        finite = finite & jax.numpy.isfinite(step_metrics["loss"]) & jax.numpy.isfinite(step_metrics["grad_norm"])
        pending.append(step_metrics)
        if step % cfg.log_every == 0 or step == steps:
            guard(step)
            now = time.perf_counter()
            scalars = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
            rate = tokens_per_step * (step - last_step) / (now - last_time)
            scalars["tokens_per_second"] = rate
            if peak_total:
                scalars["mfu"] = flops_per_step / tokens_per_step * rate / peak_total
            writer.write(step, scalars)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", rank_acc=f"{scalars['ranking_accuracy']:.3f}",
                            tok_s=f"{rate:.0f}", refresh=False)
            pending, last_time, last_step = [], time.perf_counter(), step
        if cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
            writer.write(step, evaluate(state.params), prefix="eval")
            last_time = time.perf_counter()
        if step % cfg.checkpoint.every == 0 or step == steps:
            guard(step)
            ckpt.save(step, state, iterator.get_state(), {**meta, "step": step}, force=step == steps)
        bar.update(1)
    bar.close()
    final = evaluate(state.params)
    if final:
        writer.write(steps, final, prefix="eval")
    if jax.process_index() == 0 and final:
        fileutil.write_text(workdir / "eval.json", json.dumps({"step": steps, **final}, indent=2) + "\n")
    return final
