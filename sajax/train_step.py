"""The jitted train and eval steps: state, optimizer, loss on a batch of groups, gradient accumulation.

`make_train_step` returns `jax.jit(step, in_shardings, out_shardings, donate_argnums=0)`: the state never
leaves the devices, the batch arrives split over (data, fsdp), and the updated state keeps the shardings of
`sajax.sharding`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sajax import losses, model, sharding
from sajax.config import LlamaConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_optimizer(opt_cfg, total_steps: int, config: LlamaConfig) -> optax.GradientTransformation:
    """AdamW on a linear-warmup + cosine-decay schedule (peak `learning_rate`, down to
    `learning_rate · min_lr_ratio` at `total_steps`), after clipping the global gradient norm to `clip_norm`.
    Weight decay skips the RMSNorm weights (logical axis `norm`)."""
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    decay_mask = jax.tree.map(lambda spec: "norm" not in tuple(spec), model.param_logical_axes(config),
                              is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return optax.chain(
        optax.clip_by_global_norm(opt_cfg.clip_norm),
        optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay,
                    mask=decay_mask))


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=opt_cfg.learning_rate * opt_cfg.min_lr_ratio)


def state_shardings(config: LlamaConfig, tx, mesh):
    params_sh = sharding.param_shardings(config, mesh)
    return TrainState(step=sharding.replicated(mesh), params=params_sh,
                      opt_state=sharding.opt_state_shardings(tx, model.param_shapes(config), params_sh, mesh))


def response_nll(config: LlamaConfig, params, batch: dict, chunk_size: int) -> losses.ResponseNLL:
    """Per-response NLL [B, K] of a batch whose token arrays are [B, K, T]."""
    b, k, t = batch["tokens"].shape
    flat = lambda x: x.reshape(b * k, t)  # noqa: E731
    hidden = model.hidden_states(config, params, flat(batch["tokens"]), flat(batch["attention_mask"]))
    nll = losses.response_token_nll(hidden, model.output_weights(config, params), flat(batch["tokens"]),
                                    flat(batch["loss_mask"]), chunk_size)
    return losses.ResponseNLL(nll.total.reshape(b, k), nll.count.reshape(b, k))


def batch_loss(params, batch: dict, *, config: LlamaConfig, train_cfg) -> tuple[jax.Array, dict]:
    nll = response_nll(config, params, batch, train_cfg.loss_chunk_size)
    return losses.objective_loss(
        train_cfg.objective, nll, batch["scores"], batch["valid"], batch["reference_logp"],
        rating_scale=train_cfg.rating_scale, margin=train_cfg.margin, ratio=train_cfg.ratio,
        max_flow=train_cfg.max_flow, dpo_beta=train_cfg.dpo_beta)


def _split_microbatches(batch: dict, count: int) -> dict:
    """[B, ...] → [count, B/count, ...] taking rows j·count + a into micro-batch a, so that every device
    keeps contributing its share of each micro-batch (no resharding of the batch axis)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1), batch)


def train_step(state: TrainState, batch: dict, *, config: LlamaConfig, train_cfg, tx, schedule):
    """One optimizer update from `grad_accum_steps` micro-batches (gradients averaged with a scan)."""
    grad_fn = jax.value_and_grad(functools.partial(batch_loss, config=config, train_cfg=train_cfg), has_aux=True)
    micro = _split_microbatches(batch, train_cfg.grad_accum_steps)

    def accumulate(carry, microbatch):
        grads_sum, metrics_sum = carry
        (loss, aux), grads = grad_fn(state.params, microbatch)
        metrics = {"loss": loss, **aux}
        return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, metrics_sum, metrics)), None

    zeros_grads = jax.tree.map(jnp.zeros_like, state.params)
    first = jax.tree.map(lambda x: x[0], micro)
    metric_shapes = jax.eval_shape(lambda: {"loss": 0.0, **grad_fn(state.params, first)[0][1]})
    zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)
    (grads, metrics), _ = jax.lax.scan(accumulate, (zeros_grads, zeros_metrics), micro)
    scale = 1.0 / train_cfg.grad_accum_steps
    grads = jax.tree.map(lambda g: g * scale, grads)
    metrics = jax.tree.map(lambda m: m * scale, metrics)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(config: LlamaConfig, train_cfg, tx, schedule, mesh, shardings: TrainState):
    step = functools.partial(train_step, config=config, train_cfg=train_cfg, tx=tx, schedule=schedule)
    batch_sh = {k: sharding.batch_sharding(mesh, n) for k, n in _BATCH_NDIM.items()}
    return jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, sharding.replicated(mesh)),
                   donate_argnums=0)


_BATCH_NDIM = {"tokens": 3, "loss_mask": 3, "attention_mask": 3, "scores": 2, "valid": 2, "reference_logp": 2}


def eval_step(params, batch: dict, *, config: LlamaConfig, chunk_size: int) -> dict:
    """Sums over a batch: correctly ranked pairs, ranked pairs, best-response NLL and groups."""
    nll = response_nll(config, params, batch, chunk_size).mean
    scores, valid = batch["scores"], batch["valid"]
    ranking = losses.ranking_metrics(nll, scores, valid)
    best = losses.best_index(scores, valid)
    group = jnp.any(valid, axis=-1)
    best_nll = jnp.take_along_axis(nll, best[:, None], axis=-1)[:, 0]
    return {"correct_pairs": ranking["ranking_accuracy"] * ranking["ranked_pairs"],
            "ranked_pairs": ranking["ranked_pairs"].astype(jnp.float32),
            "best_nll_sum": jnp.sum(jnp.where(group, best_nll, 0.0)), "groups": jnp.sum(group).astype(jnp.float32)}


def make_eval_step(config: LlamaConfig, chunk_size: int, mesh, params_sharding):
    batch_sh = {k: sharding.batch_sharding(mesh, n) for k, n in _BATCH_NDIM.items()}
    return jax.jit(functools.partial(eval_step, config=config, chunk_size=chunk_size),
                   in_shardings=(params_sharding, batch_sh), out_shardings=sharding.replicated(mesh))
