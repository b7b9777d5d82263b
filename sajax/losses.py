"""Training objectives on groups of rated responses: pure functions, vectorised over B groups × K responses.

Inputs are [B, K] arrays: `nll` (mean negative log-likelihood of each response's tokens), `scores` (ratings),
`valid` (False for padding responses of groups with fewer than K responses). A group with no valid response
(batch padding) contributes nothing. `response_token_nll` computes the per-response NLL from the model's final
hidden states with a chunked output projection, so the [N, T, V] float32 logits never exist at once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
OBJECTIVES = ("stable_alignment", "sft", "rrhf", "dpo")


class ResponseNLL(NamedTuple):
    total: Array  # [N] Σ_t −log p(token_t | tokens_<t) over the response tokens
    count: Array  # [N] number of response tokens

    @property
    def mean(self) -> Array:
        return self.total / jnp.maximum(self.count, 1)


def response_token_nll(hidden: Array, output_weights: Array, tokens: Array, loss_mask: Array,
                       chunk_size: int) -> ResponseNLL:
    """NLL of each sequence's masked tokens: Σ_t mask_t · (logsumexp(h_{t−1}·W) − (h_{t−1}·W)[token_t]).

    hidden [N,T,D] (final, normed), output_weights [D,V], tokens/loss_mask [N,T]. The projection, log-softmax
    and target pick run over sequence chunks of `chunk_size` positions inside a rematerialised `lax.scan`: the
    forward and the backward hold one [N, chunk, V] float32 block at a time (with a single chunk, its logits
    are kept for the backward instead of recomputed)."""
    n, t, d = hidden.shape
    hidden, targets, weights = hidden[:, :-1], tokens[:, 1:], loss_mask[:, 1:].astype(jnp.float32)
    chunk = max(1, min(chunk_size, t - 1))
    chunks = -(-(t - 1) // chunk)
    pad = chunks * chunk - (t - 1)
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))
    as_chunks = lambda x: jnp.moveaxis(x.reshape(n, chunks, chunk, *x.shape[2:]), 1, 0)  # noqa: E731

    def chunk_nll(h, target):  # [N,C,D], [N,C] → [N,C]
        logits = (h.reshape(-1, d) @ output_weights).astype(jnp.float32).reshape(n, chunk, -1)
        picked = jnp.einsum("ncv,ncv->nc", logits, jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype))
        return jax.nn.logsumexp(logits, axis=-1) - picked

    if chunks == 1:  # the whole sequence in one block: keep its logits for the backward, nothing to bound
        nll = chunk_nll(hidden, targets)
        return ResponseNLL(jnp.sum(nll * weights, axis=-1), jnp.sum(weights, axis=-1))
    chunk_nll = jax.checkpoint(chunk_nll)  # recompute each block's logits in the backward

    def body(total, xs):
        h, target, w = xs
        return total + jnp.sum(chunk_nll(h, target) * w, axis=-1), None

    total, _ = jax.lax.scan(body, jnp.zeros((n,), jnp.float32),
                            (as_chunks(hidden), as_chunks(targets), as_chunks(weights)))
    return ResponseNLL(total, jnp.sum(weights, axis=-1))


def best_index(scores: Array, valid: Array) -> Array:
    """First index of the highest score among valid responses [B]."""
    return jnp.argmax(jnp.where(valid, scores, -jnp.inf), axis=-1)


def ranking_metrics(nll: Array, scores: Array, valid: Array) -> dict[str, Array]:
    """Pairwise ranking accuracy: over pairs (i, j) of valid responses with r_i > r_j, the fraction with
    nll_i < nll_j (the model prefers the better-rated response). Also the number of such pairs."""
    pair = valid[:, :, None] & valid[:, None, :] & (scores[:, :, None] > scores[:, None, :])  # [B,K,K]
    correct = pair & (nll[:, :, None] < nll[:, None, :])
    pairs = jnp.sum(pair)
    return {"ranking_accuracy": jnp.sum(correct) / jnp.maximum(pairs, 1), "ranked_pairs": pairs}


def stable_alignment_loss(nll: Array, scores: Array, valid: Array, *, rating_scale: float, margin: float,
                          ratio: float, max_flow: bool) -> tuple[Array, dict[str, Array]]:
    """Score-scaled margin loss (Stable Alignment), per group g:

        b = argmax_k r_k (first of ties, valid k only);   m_k = (r_b − r_k) / rating_scale · margin
        d_k = ℓ_b − ℓ_k + m_k  for valid k ≠ b
        penalty = max(0, mean_k d_k)   (max_flow: max(0, max_k d_k));   0 if the group has one valid response
        L_g = ℓ_b + ratio · penalty

    loss = mean of L_g over groups with ≥ 1 valid response. aux: `sft` (mean ℓ_b), `penalty` (mean),
    `violated_margin_fraction` (fraction of pairs (b, k) with d_k > 0), `ranking_accuracy`."""
    best = best_index(scores, valid)
    group = jnp.any(valid, axis=-1)  # [B]
    best_nll = jnp.take_along_axis(nll, best[:, None], axis=-1)[:, 0]
    best_score = jnp.take_along_axis(scores, best[:, None], axis=-1)
    others = valid & (jnp.arange(nll.shape[1])[None, :] != best[:, None])  # [B,K]
    gap = best_nll[:, None] - nll + (best_score - scores) / rating_scale * margin  # d_k [B,K]
    n_others = jnp.sum(others, axis=-1)
    if max_flow:
        pooled = jnp.max(jnp.where(others, gap, -jnp.inf), axis=-1)
    else:
        pooled = jnp.sum(jnp.where(others, gap, 0.0), axis=-1) / jnp.maximum(n_others, 1)
    penalty = jnp.where(n_others > 0, jnp.maximum(pooled, 0.0), 0.0)
    per_group = best_nll + ratio * penalty
    groups = jnp.maximum(jnp.sum(group), 1)
    aux = {
        "sft": jnp.sum(jnp.where(group, best_nll, 0.0)) / groups,
        "penalty": jnp.sum(jnp.where(group, penalty, 0.0)) / groups,
        "violated_margin_fraction": jnp.sum(others & (gap > 0)) / jnp.maximum(jnp.sum(others), 1),
        **ranking_metrics(nll, scores, valid),
    }
    return jnp.sum(jnp.where(group, per_group, 0.0)) / groups, aux


def sft_loss(nll: Array, scores: Array, valid: Array) -> tuple[Array, dict[str, Array]]:
    """Supervised fine-tuning on the best-rated response only: loss = mean over groups of ℓ_b."""
    best = best_index(scores, valid)
    group = jnp.any(valid, axis=-1)
    best_nll = jnp.take_along_axis(nll, best[:, None], axis=-1)[:, 0]
    loss = jnp.sum(jnp.where(group, best_nll, 0.0)) / jnp.maximum(jnp.sum(group), 1)
    return loss, {"sft": loss, **ranking_metrics(nll, scores, valid)}


def rrhf_loss(nll: Array, scores: Array, valid: Array) -> tuple[Array, dict[str, Array]]:
    """RRHF (Yuan et al., 2023), per group, with length-normalised log-probabilities p_k = −ℓ_k:

        L_g = Σ_{r_i < r_j} max(0, p_i − p_j) + ℓ_b

    loss = mean over groups; aux `penalty` is the mean ranking term."""
    logp = -nll
    lower = valid[:, :, None] & valid[:, None, :] & (scores[:, :, None] < scores[:, None, :])  # i worse than j
    rank = jnp.sum(jnp.where(lower, jnp.maximum(logp[:, :, None] - logp[:, None, :], 0.0), 0.0), axis=(1, 2))
    sft, aux = sft_loss(nll, scores, valid)
    group = jnp.any(valid, axis=-1)
    penalty = jnp.sum(jnp.where(group, rank, 0.0)) / jnp.maximum(jnp.sum(group), 1)
    return sft + penalty, {**aux, "penalty": penalty}


def dpo_loss(logp: Array, reference_logp: Array, scores: Array, valid: Array, *, beta: float
             ) -> tuple[Array, dict[str, Array]]:
    """DPO (Rafailov et al., 2023) against the best response of each group. With summed response
    log-probabilities logp_k (policy) and ref_k (the initial model, precomputed), for valid k with r_k < r_b:

        L_{g,k} = −log σ(β · ((logp_b − ref_b) − (logp_k − ref_k)))

    loss = mean over all such pairs; groups without a lower-rated response contribute nothing."""
    best = best_index(scores, valid)
    take = lambda x: jnp.take_along_axis(x, best[:, None], axis=-1)  # noqa: E731  [B,1]
    pair = valid & (scores < take(scores))
    logits = beta * ((take(logp) - take(reference_logp)) - (logp - reference_logp))
    pairs = jnp.maximum(jnp.sum(pair), 1)
    loss = jnp.sum(jnp.where(pair, -jax.nn.log_sigmoid(logits), 0.0)) / pairs
    return loss, {"reward_accuracy": jnp.sum(pair & (logits > 0)) / pairs}


def objective_loss(name: str, nll: ResponseNLL, scores: Array, valid: Array, reference_logp: Array | None, *,
                   rating_scale: float, margin: float, ratio: float, max_flow: bool, dpo_beta: float
                   ) -> tuple[Array, dict[str, Array]]:
    """The training objective `name` (one of OBJECTIVES) with the metrics every objective reports: `sft`
    (mean NLL of the best response) and the pairwise `ranking_accuracy` of the mean NLLs."""
    mean = nll.mean
    if name == "stable_alignment":
        loss, aux = stable_alignment_loss(mean, scores, valid, rating_scale=rating_scale, margin=margin,
                                          ratio=ratio, max_flow=max_flow)
    elif name == "sft":
        loss, aux = sft_loss(mean, scores, valid)
    elif name == "rrhf":
        loss, aux = rrhf_loss(mean, scores, valid)
    elif name == "dpo":
        if reference_logp is None:
            raise ValueError("the dpo objective needs reference log-probabilities")
        loss, aux = dpo_loss(-nll.total, reference_logp, scores, valid, beta=dpo_beta)
    else:
        raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")
    _, base = sft_loss(mean, scores, valid)
    return loss, {**base, **aux}
