"""The jitted train and eval steps: state, optimizer, loss on a batch of groups, gradient accumulation.

`make_train_step` returns `jax.jit(step, in_shardings, out_shardings, donate_argnums=0)`: the state never
leaves the devices, the batch arrives split over (data, fsdp), and the updated state keeps the shardings of
`sajax.parallel.sharding`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sajax.data import packing
from sajax.data import batch as batch_lib
from sajax.model import decoder, lora
from sajax.model.config import ModelConfig
from sajax.parallel import sharding
from sajax.train import losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def split_trainable(config: ModelConfig, tree) -> tuple[Any, dict]:
    """(what training updates, what it holds fixed) of a params-like tree (params, shapes, shardings, logical
    axes): every parameter and nothing; with LoRA (`config.lora_rank` > 0), the adapters with the
    `lora_modules_to_save` parameters, and the rest of the base weights."""
    if config.lora_rank == 0:
        return tree, {}
    base, trained = lora.split(tree, config.lora_modules_to_save)
    return trained, base


def with_frozen(config: ModelConfig, trainable, frozen: dict):
    """The whole model's params from `split_trainable`'s two parts (no copy)."""
    return lora.combine(frozen, trainable) if config.lora_rank else trainable


def make_optimizer(opt_cfg, total_steps: int, config: ModelConfig) -> optax.GradientTransformation:
    """AdamW on a linear-warmup + cosine-decay schedule (peak `learning_rate`, down to
    `learning_rate · min_lr_ratio` at `total_steps`), after clipping the global gradient norm to `clip_norm`, over
    the trainable parameters (`split_trainable`). Weight decay skips the RMSNorm weights (logical axis `norm`)."""
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    axes = split_trainable(config, decoder.param_logical_axes(config))[0]
    decay_mask = jax.tree.map(lambda spec: "norm" not in tuple(spec), axes,
                              is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return optax.chain(
        optax.clip_by_global_norm(opt_cfg.clip_norm),
        optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay,
                    mask=decay_mask))


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_steps` (or ⌈warmup_ratio · total_steps⌉ when warmup_ratio > 0, as in HF
    Trainer), then cosine decay to `learning_rate · min_lr_ratio` at `total_steps`."""
    ratio = opt_cfg.get("warmup_ratio", 0.0)
    warmup = math.ceil(ratio * total_steps) if ratio > 0 else opt_cfg.warmup_steps
    warmup = min(warmup, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=opt_cfg.learning_rate * opt_cfg.min_lr_ratio)


def state_shardings(config: ModelConfig, tx, mesh):
    """The train state's shardings: the trainable parameters' (`split_trainable`) and their optimizer state's."""
    params_sh = split_trainable(config, decoder.param_shardings(config, mesh))[0]
    shapes = split_trainable(config, decoder.param_shapes(config))[0]
    return TrainState(step=sharding.replicated(mesh), params=params_sh,
                      opt_state=sharding.opt_state_shardings(tx, shapes, params_sh, mesh))


def frozen_shardings(config: ModelConfig, mesh) -> dict:
    """The shardings of the parameters training holds fixed (LoRA's base weights; {} otherwise)."""
    return split_trainable(config, decoder.param_shardings(config, mesh))[1]


def init_state(params, tx, shardings: TrainState) -> TrainState:
    """Step 0: the given (trainable) parameters and a fresh optimizer state, laid out as `shardings`."""
    return jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                   out_shardings=shardings)(params)


def abstract_state(config: ModelConfig, tx, shardings: TrainState | None = None) -> TrainState:
    """The train state's shapes and dtypes (with `shardings`, the target of a checkpoint restore)."""
    params = split_trainable(config, decoder.param_shapes(config))[0]
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(tx.init, params))
    if shardings is None:
        return state
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def response_nll(config: ModelConfig, params, batch: dict, chunk_size: int,
                 dropout_rng: jax.Array | None = None) -> losses.Ratio:
    """Per-response NLL sums and token counts [B, K] of a batch whose token arrays are [B, K, T], or of packed
    rows [R, L] (`sajax.data.packing`) with group fields [B, K]. `dropout_rng`: LoRA dropout (training)."""
    if packing.is_packed(batch):
        b, k = batch["scores"].shape
        hidden = decoder.packed_hidden_states(config, params, batch["tokens"], batch["positions"],
                                              batch["segment_ids"], batch["span_ids"], dropout_rng)
        nll = losses.packed_response_nll(hidden, decoder.output_weights(config, params), batch["tokens"],
                                         batch["loss_mask"], batch["response_index"], b * k, chunk_size)
        return losses.Ratio(nll.total.reshape(b, k), nll.count.reshape(b, k))
    b, k, t = batch["tokens"].shape
    flat = lambda x: x.reshape(b * k, t)  # noqa: E731
    hidden = decoder.hidden_states(config, params, flat(batch["tokens"]), flat(batch["attention_mask"]), dropout_rng)
    nll = losses.response_token_nll(hidden, decoder.output_weights(config, params), flat(batch["tokens"]),
                                    flat(batch["loss_mask"]), chunk_size)
    return losses.Ratio(nll.total.reshape(b, k), nll.count.reshape(b, k))


def loss_sums(params, batch: dict, *, config: ModelConfig, train_cfg, frozen: dict | None = None,
              dropout_rng: jax.Array | None = None) -> losses.LossSums:
    """The objective's sums over a batch; `params` are the trainable parameters, `frozen` the rest."""
    nll = response_nll(config, with_frozen(config, params, frozen or {}), batch, train_cfg.loss_chunk_size,
                       dropout_rng)
    return losses.objective(
        train_cfg.objective, nll, batch["scores"], batch["valid"], batch["reference_logp"],
        rating_scale=train_cfg.rating_scale, margin=train_cfg.margin, ratio=train_cfg.ratio,
        max_flow=train_cfg.max_flow, dpo_beta=train_cfg.dpo_beta)


def _split_microbatches(batch: dict, count: int) -> dict:
    """[B, ...] → [count, B/count, ...] taking rows j·count + a into micro-batch a, so that every device
    keeps contributing its share of each micro-batch (no resharding of the batch axis)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1), batch)


def accumulated_gradients(params, batch: dict, *, config: ModelConfig, train_cfg, frozen: dict | None = None,
                          dropout_rng: jax.Array | None = None) -> tuple[Any, losses.LossSums]:
    """The gradient (w.r.t. the trainable `params`) of the whole batch's mean loss, computed over
    `grad_accum_steps` micro-batches m:

        ∇L = Σ_m ∇(Σ_{units u in m} L_u) / Σ_m |units in m|

    (a scan sums the micro-batches' loss totals' gradients and the sums; one division at the end), so any split
    gives the gradient of one big batch, whichever groups, padding and DPO pairs each micro-batch holds. LoRA
    dropout draws micro-batch m's masks from fold_in(`dropout_rng`, m)."""
    def total(p, microbatch, rng):
        sums = loss_sums(p, microbatch, config=config, train_cfg=train_cfg, frozen=frozen, dropout_rng=rng)
        return sums.loss.total, sums

    grad_fn = jax.grad(total, has_aux=True)
    count = train_cfg.grad_accum_steps
    micro = _split_microbatches(batch, count)
    rngs = None if dropout_rng is None else jax.vmap(lambda m: jax.random.fold_in(dropout_rng, m))(jnp.arange(count))

    def accumulate(carry, inputs):
        microbatch, rng = inputs
        return jax.tree.map(jnp.add, carry, grad_fn(params, microbatch, rng)), None

    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro),
                            None if rngs is None else rngs[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, rngs), unroll=losses.UNROLL_LOOPS.get())
    units = jnp.maximum(sums.loss.count, 1)
    return jax.tree.map(lambda g: (g / units).astype(g.dtype), grads), sums


def train_step(state: TrainState, batch: dict, frozen: dict | None = None, *, config: ModelConfig, train_cfg, tx,
               schedule, seed: int = 0):
    """One optimizer update of the trainable parameters from `accumulated_gradients` (`frozen`: the rest of the
    model); metrics: the loss and the objective's metrics over the whole batch, the gradient's global norm and the
    learning rate of this step. LoRA dropout's masks come from fold_in(key(seed), step): a resumed run draws the
    same ones."""
    dropout_rng = None
    if config.lora_rank and config.lora_dropout > 0:
        dropout_rng = jax.random.fold_in(jax.random.key(seed), state.step)
    grads, sums = accumulated_gradients(state.params, batch, config=config, train_cfg=train_cfg, frozen=frozen,
                                        dropout_rng=dropout_rng)
    loss, metrics = losses.reduce(sums)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(config: ModelConfig, train_cfg, tx, schedule, mesh, shardings: TrainState,
                    packed: bool = False, seed: int = 0):
    """The jitted step(state, batch, frozen) for padded batches, or for packed ones (`sajax.data.packing`; one
    compile per row count); `frozen` is `split_trainable`'s second part ({} without LoRA), never donated."""
    step = functools.partial(train_step, config=config, train_cfg=train_cfg, tx=tx, schedule=schedule, seed=seed)
    return jax.jit(step, in_shardings=(shardings, batch_lib.shardings(mesh, packed=packed),
                                       frozen_shardings(config, mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def eval_sums(params, batch: dict, *, config: ModelConfig, chunk_size: int) -> dict[str, losses.Ratio]:
    """Sums over a batch (add them over batches, then take `.value`): `ranking_accuracy` (correctly ranked pairs
    / ranked pairs) and `best_response_nll` (Σ ℓ_b / groups)."""
    nll = response_nll(config, params, batch, chunk_size).value
    metrics = losses.base_metrics(nll, batch["scores"], batch["valid"])
    return {"ranking_accuracy": metrics["ranking_accuracy"], "best_response_nll": metrics["sft"]}


def make_eval_step(config: ModelConfig, chunk_size: int, mesh, params_sharding, packed: bool = False):
    return jax.jit(functools.partial(eval_sums, config=config, chunk_size=chunk_size),
                   in_shardings=(params_sharding, batch_lib.shardings(mesh, packed=packed)),
                   out_shardings=sharding.replicated(mesh))
