"""Training objectives on groups of rated responses: pure functions, vectorised over B groups × K responses.

Inputs are [B, K] arrays: `nll` (mean negative log-likelihood of each response's tokens), `scores` (ratings),
`valid` (False for padding responses of groups with fewer than K responses). A group with no valid response
(batch padding) contributes nothing. `response_token_nll` computes the per-response NLL from the model's final
hidden states with a chunked output projection, so the [N, T, V] float32 logits never exist at once.

Every objective returns *sums* (`LossSums`): the loss summed over its units (prompt groups; (best, worse) pairs
for DPO) together with the number of units, and every metric as a numerator and a denominator (`Ratio`). The
sums of any split of a batch add up to the sums of the whole batch, so gradient accumulation divides once, after
the last micro-batch, and equals one big batch exactly — however groups, padding and pairs fall into the
micro-batches. `reduce` turns sums into the reported means.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
OBJECTIVES = ("stable_alignment", "sft", "rrhf", "dpo")


class Ratio(NamedTuple):
    """A mean kept as its parts, so that parts of a batch add up: value = total / max(count, 1)."""

    total: Array
    count: Array

    @property
    def value(self) -> Array:
        return self.total / jnp.maximum(self.count, 1)


UNROLL_LOOPS = contextvars.ContextVar("sajax_unroll_loops", default=False)


@contextlib.contextmanager
def unrolled_loops():
    """While tracing inside it, the step's loops over loss chunks and micro-batches are unrolled (the same
    arithmetic, no while loop): for XLA's cost analysis, which counts a loop body once (`sajax.aot`)."""
    token = UNROLL_LOOPS.set(True)
    try:
        yield
    finally:
        UNROLL_LOOPS.reset(token)


def token_nll(hidden: Array, output_weights: Array, tokens: Array, block: int) -> Array:
    """Next-token NLL at every position: nll[n, t] = logsumexp(h_t·W) − (h_t·W)[token_{t+1}]  [N, T−1].

    hidden [N,T,D] (final, normed), output_weights [D,V], tokens [N,T]. The N·T positions (row by row) are
    projected, log-softmaxed and picked in blocks of `block` positions inside a rematerialised `lax.scan`: the
    forward and the backward hold one [block, V] float32 block of logits at a time (with a single block, its
    logits are kept for the backward instead of recomputed). The target is picked with a one-hot product, whose
    backward is dense (a gather's backward is a scatter, slow on XLA:CPU). The last position of a row predicts
    nothing (its value is dropped)."""
    n, t, d = hidden.shape
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))).reshape(-1)  # [N·T]: position t's target is token t+1
    hidden = hidden.reshape(n * t, d)
    blocks = -(-(n * t) // max(1, block))
    block = -(-(n * t) // blocks)  # the same number of blocks, evened out: at most blocks − 1 padding positions
    pad = blocks * block - n * t
    hidden, targets = jnp.pad(hidden, ((0, pad), (0, 0))), jnp.pad(targets, (0, pad))

    def block_nll(h, target):  # [C,D], [C] → [C]
        logits = (h @ output_weights).astype(jnp.float32)
        picked = jnp.einsum("cv,cv->c", logits, jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype))
        return jax.nn.logsumexp(logits, axis=-1) - picked

    if blocks == 1:  # everything in one block: keep its logits for the backward, nothing to bound
        nll = block_nll(hidden, targets)
    else:
        block_nll = jax.checkpoint(block_nll)  # recompute each block's logits in the backward
        _, nll = jax.lax.scan(lambda carry, xs: (carry, block_nll(*xs)), None,
                              (hidden.reshape(blocks, block, d), targets.reshape(blocks, block)),
                              unroll=UNROLL_LOOPS.get())  # [blocks, C]
    return nll.reshape(-1)[:n * t].reshape(n, t)[:, :-1]


def response_token_nll(hidden: Array, output_weights: Array, tokens: Array, loss_mask: Array,
                       chunk_size: int) -> Ratio:
    """NLL of each sequence's masked tokens: total Σ_t mask_t · (logsumexp(h_{t−1}·W) − (h_{t−1}·W)[token_t]) [N]
    and count Σ_t mask_t [N] (`.value` is the mean per-token NLL); shapes as `token_nll`, whose blocks hold
    `chunk_size` positions of each of the N rows (N · chunk_size positions)."""
    weights = loss_mask[:, 1:].astype(jnp.float32)
    nll = token_nll(hidden, output_weights, tokens, hidden.shape[0] * chunk_size)
    return Ratio(jnp.sum(nll * weights, axis=-1), jnp.sum(weights, axis=-1))


def packed_response_nll(hidden: Array, output_weights: Array, tokens: Array, loss_mask: Array,
                        response_index: Array, num_responses: int, chunk_size: int) -> Ratio:
    """Per-response NLL sums and token counts [num_responses] of packed rows (`sajax.data.packing`): the NLL of token
    t (predicted from t−1) goes to response `response_index[t]` where `loss_mask[t]`.
    hidden [R,L,D], tokens/loss_mask/response_index [R,L]. `token_nll`'s blocks hold num_responses · chunk_size
    positions: the block of the padded layout of the same groups, so `loss_chunk_size` bounds the same memory."""
    weights = loss_mask[:, 1:].astype(jnp.float32).reshape(-1)
    index = response_index[:, 1:].reshape(-1)
    nll = token_nll(hidden, output_weights, tokens, num_responses * chunk_size).reshape(-1)
    total = jax.ops.segment_sum(nll * weights, index, num_segments=num_responses)
    return Ratio(total, jax.ops.segment_sum(weights, index, num_segments=num_responses))


class LossSums(NamedTuple):
    loss: Ratio  # Σ of the per-unit losses, number of units
    metrics: dict[str, Ratio]


def reduce(sums: LossSums) -> tuple[Array, dict[str, Array]]:
    """(mean loss, mean of every metric) from sums."""
    return sums.loss.value, {name: ratio.value for name, ratio in sums.metrics.items()}


def _sum_where(mask: Array, x: Array) -> Array:
    return jnp.sum(jnp.where(mask, x, 0.0))


class Best(NamedTuple):
    """The best-rated response of each group: b = argmax_k r_k over valid k, the first of ties."""

    index: Array  # [B]
    group: Array  # [B] bool: the group has at least one valid response (else batch padding)

    def take(self, x: Array) -> Array:
        """x_b per group: [B, K] → [B]."""
        return jnp.take_along_axis(x, self.index[:, None], axis=-1)[:, 0]


def best_response(scores: Array, valid: Array) -> Best:
    return Best(jnp.argmax(jnp.where(valid, scores, -jnp.inf), axis=-1), jnp.any(valid, axis=-1))


def ranking(nll: Array, scores: Array, valid: Array) -> Ratio:
    """Pairwise ranking accuracy: over pairs (i, j) of valid responses with r_i > r_j, the pairs with
    nll_i < nll_j (the model prefers the better-rated response) out of all such pairs."""
    pair = valid[:, :, None] & valid[:, None, :] & (scores[:, :, None] > scores[:, None, :])  # [B,K,K]
    correct = pair & (nll[:, :, None] < nll[:, None, :])
    return Ratio(jnp.sum(correct).astype(jnp.float32), jnp.sum(pair).astype(jnp.float32))


def base_metrics(nll: Array, scores: Array, valid: Array) -> dict[str, Ratio]:
    """What every objective and the evaluation report: `sft` (mean ℓ_b over groups) and `ranking_accuracy`."""
    best = best_response(scores, valid)
    groups = jnp.sum(best.group).astype(jnp.float32)
    return {"sft": Ratio(_sum_where(best.group, best.take(nll)), groups),
            "ranking_accuracy": ranking(nll, scores, valid)}


def stable_alignment(nll: Array, scores: Array, valid: Array, *, rating_scale: float, margin: float,
                     ratio: float, max_flow: bool) -> LossSums:
    """Score-scaled margin loss (Stable Alignment), per group g:

        b = argmax_k r_k (first of ties, valid k only);   m_k = (r_b − r_k) / rating_scale · margin
        d_k = ℓ_b − ℓ_k + m_k  for valid k ≠ b
        penalty = max(0, mean_k d_k)   (max_flow: max(0, max_k d_k));   0 if the group has one valid response
        L_g = ℓ_b + ratio · penalty

    Units: groups with ≥ 1 valid response (loss = mean of L_g). Metrics: `penalty` (mean over groups),
    `violated_margin_fraction` (pairs (b, k) with d_k > 0 out of all (b, k))."""
    best = best_response(scores, valid)
    best_nll = best.take(nll)
    others = valid & (jnp.arange(nll.shape[1])[None, :] != best.index[:, None])  # [B,K]
    gap = best_nll[:, None] - nll + (best.take(scores)[:, None] - scores) / rating_scale * margin  # d_k [B,K]
    n_others = jnp.sum(others, axis=-1)
    if max_flow:
        pooled = jnp.max(jnp.where(others, gap, -jnp.inf), axis=-1)
    else:
        pooled = jnp.sum(jnp.where(others, gap, 0.0), axis=-1) / jnp.maximum(n_others, 1)
    penalty = jnp.where(n_others > 0, jnp.maximum(pooled, 0.0), 0.0)
    groups = jnp.sum(best.group).astype(jnp.float32)
    return LossSums(Ratio(_sum_where(best.group, best_nll + ratio * penalty), groups), {
        "penalty": Ratio(_sum_where(best.group, penalty), groups),
        "violated_margin_fraction": Ratio(jnp.sum(others & (gap > 0)).astype(jnp.float32),
                                          jnp.sum(others).astype(jnp.float32))})


def sft(nll: Array, scores: Array, valid: Array) -> LossSums:
    """Supervised fine-tuning on the best-rated response only: L_g = ℓ_b; units: groups."""
    return LossSums(base_metrics(nll, scores, valid)["sft"], {})


def rrhf(nll: Array, scores: Array, valid: Array) -> LossSums:
    """RRHF (Yuan et al., 2023), per group, with length-normalised log-probabilities p_k = −ℓ_k:

        L_g = Σ_{r_i < r_j} max(0, p_i − p_j) + ℓ_b

    Units: groups; metric `penalty` is the mean ranking term."""
    logp = -nll
    lower = valid[:, :, None] & valid[:, None, :] & (scores[:, :, None] < scores[:, None, :])  # i worse than j
    rank = jnp.sum(jnp.where(lower, jnp.maximum(logp[:, :, None] - logp[:, None, :], 0.0), 0.0), axis=(1, 2))
    best = best_response(scores, valid)
    groups = jnp.sum(best.group).astype(jnp.float32)
    return LossSums(Ratio(_sum_where(best.group, rank + best.take(nll)), groups),
                    {"penalty": Ratio(_sum_where(best.group, rank), groups)})


def dpo(logp: Array, reference_logp: Array, scores: Array, valid: Array, *, beta: float) -> LossSums:
    """DPO (Rafailov et al., 2023) against the best response of each group. With summed response
    log-probabilities logp_k (policy) and ref_k (the initial model, precomputed), for valid k with r_k < r_b:

        L_{g,k} = −log σ(β · ((logp_b − ref_b) − (logp_k − ref_k)))

    Units: all such pairs (groups without a lower-rated response contribute nothing). Metric
    `reward_accuracy`: pairs with a positive implicit reward margin."""
    best = best_response(scores, valid)
    pair = valid & (scores < best.take(scores)[:, None])
    logits = beta * ((best.take(logp) - best.take(reference_logp))[:, None] - (logp - reference_logp))
    pairs = jnp.sum(pair).astype(jnp.float32)
    return LossSums(Ratio(_sum_where(pair, -jax.nn.log_sigmoid(logits)), pairs),
                    {"reward_accuracy": Ratio(jnp.sum(pair & (logits > 0)).astype(jnp.float32), pairs)})


def objective(name: str, nll: Ratio, scores: Array, valid: Array, reference_logp: Array | None, *,
              rating_scale: float, margin: float, ratio: float, max_flow: bool, dpo_beta: float) -> LossSums:
    """The sums of training objective `name` (one of OBJECTIVES) with the metrics every objective reports
    (`base_metrics` of the mean NLLs)."""
    mean = nll.value  # [B, K] mean per-token NLL of each response
    if name == "stable_alignment":
        sums = stable_alignment(mean, scores, valid, rating_scale=rating_scale, margin=margin, ratio=ratio,
                                max_flow=max_flow)
    elif name == "sft":
        sums = sft(mean, scores, valid)
    elif name == "rrhf":
        sums = rrhf(mean, scores, valid)
    elif name == "dpo":
        if reference_logp is None:
            raise ValueError("the dpo objective needs reference log-probabilities")
        sums = dpo(-nll.total, reference_logp, scores, valid, beta=dpo_beta)
    else:
        raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")
    return LossSums(sums.loss, {**base_metrics(mean, scores, valid), **sums.metrics})
