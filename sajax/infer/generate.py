"""Batched generation with a KV cache, and scoring of given continuations.

`generate` = `prefill` + `decode`. `prefill` left-pads the prompts (length rounded up to `length_bucket` so that
similar batches share one compile) and fills the cache in one pass — prompts that share a prefix compute it once
and append the rest with `extend`; `decode` samples one token per step inside a jitted `lax.while_loop` that
stops when every row has produced an end-of-sequence token or `max_new_tokens` are out. In between, `extend` can
append chosen tokens (the simulator reads a rating from the prefill's logits, appends it, then decodes the
reason). Sampling settings are traced values: changing temperature/top-k/top-p does not recompile.

`score_continuations` returns log p(continuation | prompt) for each pair in one forward pass; the simulator reads
a 1–7 rating as a distribution over the rating tokens with it, never by parsing free text.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sajax.infer import profile
from sajax.model.config import ModelConfig
from sajax.model.decoder import CausalLM, init_cache, output_weights, positions_from_mask
from sajax.train.losses import token_nll


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # [B, N] int32: new tokens, `pad_token_id` after a row's end
    lengths: np.ndarray  # [B] int32: new tokens per row, its end-of-sequence token included
    # with `top_logprobs` asked (decode): log p of each new token under the model (log_softmax of its logits,
    # before temperature and truncation) [B, N], and the most likely tokens there [B, N, k] with theirs
    logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


def _round_up(n: int, multiple: int) -> int:
    """Padded length for n tokens: at least `multiple`, then rounded up to a step of 1/8 of n's power of two
    (≤ 12.5% padding; the number of distinct shapes, hence compiles, grows only logarithmically)."""
    if n <= multiple:
        return multiple
    step = max(multiple, 1 << max((n - 1).bit_length() - 3, 0))
    return -(-n // step) * step


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length_bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists → (ids [B,P], mask [B,P]) aligned to the right; P = longest rounded up to `length_bucket`;
    padding positions hold `pad_id` (masked out: any id inside the vocabulary will do)."""
    _check_nonempty(sequences)
    return _left_align(sequences, pad_id, _round_up(max(len(s) for s in sequences), length_bucket))


def _check_nonempty(prompts: Sequence[Sequence[int]]) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token (e.g. BOS)")


def _left_align(sequences, pad_id: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """`left_pad` to a given width, without its checks: a sequence may be empty (an all-padding row)."""
    ids = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq):] = seq
            mask[i, width - len(seq):] = 1
    return ids, mask


def right_pad(sequences: Sequence[Sequence[int]], length_bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists → (ids [B,T], mask [B,T]) aligned to the left, zero-padded; T = longest rounded up with
    `_round_up`. Every sequence needs at least one token."""
    for i, seq in enumerate(sequences):
        if len(seq) == 0:
            raise ValueError(f"sequence {i} is empty")
    width = _round_up(max(len(s) for s in sequences), length_bucket)
    ids = np.zeros((len(sequences), width), np.int32)
    mask = np.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
    return ids, mask


def stop_token_ids(config: ModelConfig, tokenizer) -> list[int]:
    """Every end-of-sequence id of the model (config and generation_config.json), of the tokenizer, and the end-of-
    turn token of its chat template."""
    from sajax.formats.tokenizer import end_of_turn_ids

    eos = list(config.eos_token_ids) + ([] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id])
    return list(dict.fromkeys(eos + end_of_turn_ids(tokenizer)))


def _order_key(x: jax.Array) -> jax.Array:
    """float32 → uint32 with the same order (negative floats: all bits flipped; others: the sign bit set)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _from_order_key(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32((1 << 31) - 1), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _smallest_where(values: jax.Array, predicate) -> jax.Array:
    """Per row of values [B,V]: the smallest float32 x ≥ -inf with predicate(x) true, as [B,1]. `predicate` maps
    x [B,1] → bool [B,1], must be monotone (false below the answer, true from it on) and true at the row's
    maximum. Bisection over the 2^32 float bit patterns in their numeric order: exact, 32 passes of
    elementwise work over [B,V] and no sort (XLA's CPU sort made sampling the slowest part of decoding)."""
    lo = _order_key(jnp.full((values.shape[0], 1), -jnp.inf, jnp.float32)) - 1  # answer in (lo, hi]
    hi = _order_key(jnp.max(values, axis=-1, keepdims=True).astype(jnp.float32))

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        active, holds = hi - lo > 1, predicate(_from_order_key(mid))
        return jnp.where(active & ~holds, mid, lo), jnp.where(active & holds, mid, hi)

    return _from_order_key(jax.lax.fori_loop(0, 32, halve, (lo, hi))[1])


def _per_row(value) -> jax.Array:
    """A sampling setting, one for all rows (scalar) or one per row ([B]), as a column: [1,1] or [B,1]."""
    return jnp.reshape(jnp.asarray(value), (-1, 1))


def truncate_logits(scaled: jax.Array, top_k, top_p) -> jax.Array:
    """scaled [B,V] with every token outside the top-k, then outside the top-p nucleus, set to -inf — the order
    transformers applies them in. Top-k (top_k <= 0: no limit) keeps the tokens ≥ the k-th largest value u_k,
    the smallest x with #{v > x} < k. Top-p (top_p >= 1: no limit) renormalises what is left, p = softmax, and
    keeps the tokens whose more likely tokens hold less than top_p: p_i ≥ the smallest x with Σ_{p_j > x} p_j <
    top_p. Ties are kept or dropped together, as a sort with cumulative sums would. top_k and top_p are scalars
    or one per row ([B])."""
    rows = (scaled.shape[0], 1)
    top_k, top_p = _per_row(top_k), _per_row(top_p)
    kth = jax.lax.cond(jnp.any(top_k > 0),
                       lambda: _smallest_where(scaled, lambda x: jnp.sum(scaled > x, -1, keepdims=True) < top_k),
                       lambda: jnp.full(rows, -jnp.inf, jnp.float32))
    scaled = jnp.where((top_k <= 0) | (scaled >= kth), scaled, -jnp.inf)
    probs = jax.nn.softmax(scaled, axis=-1)
    pth = jax.lax.cond(jnp.any(top_p < 1), lambda: _smallest_where(
        probs, lambda x: jnp.sum(jnp.where(probs > x, probs, 0.0), -1, keepdims=True) < top_p),
        lambda: jnp.full(rows, -jnp.inf, jnp.float32))
    return jnp.where((top_p >= 1) | (probs >= pth), scaled, -jnp.inf)


def sample_logits(logits: jax.Array, rng: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Next tokens [B] from logits [B,V]: temperature == 0 gives the argmax; otherwise a draw from
    p = softmax(logits / temperature) restricted by `truncate_logits` (top-k, then top-p), by inverting its
    cumulative sum: token = #{i : Σ_{j≤i} p_j ≤ u}, u ~ U[0, Σ p) — one uniform per row instead of Gumbel noise
    for every vocabulary entry (2-8× faster on CPU). Tokens with p = 0 are never drawn. The settings are scalars
    or one per row ([B]); `rng` is one key, or one per row ([B] keys: a row's draw depends on its key alone, not
    on the rows batched with it)."""
    logits = logits.astype(jnp.float32)
    temperature = _per_row(temperature)
    probs = jax.nn.softmax(truncate_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)  # [B,V]
    if rng.ndim:
        u = jax.vmap(lambda key: jax.random.uniform(key, (1,)))(rng) * cdf[:, -1:]
    else:
        u = jax.random.uniform(rng, (logits.shape[0], 1)) * cdf[:, -1:]
    last_kept = logits.shape[-1] - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)  # guards u rounding up to Σ p
    sampled = jnp.minimum(jnp.sum(cdf <= u, axis=-1), last_kept)
    return jnp.where(temperature[:, 0] > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@dataclasses.dataclass
class Prefilled:
    """Token sequences already run through the model, on device: their KV cache with free slots after them, and
    the next-token logits. Made by `prefill`; `extend` appends tokens, `decode` samples continuations.

    Slot layout: every row's real tokens end at `slot` (blocks are left-padded); padding slots are masked out of
    attention and may sit between blocks (positions come from the real tokens, not the slots)."""
    cache: object  # per layer {"k" [B,K,E,S], "v" [B,K,S,E]} (scanned: stacked [L,…])
    key_mask: jax.Array  # [B,S] int32: 1 where a slot holds a real token
    position: jax.Array  # [B] int32: the next token's position (= real tokens so far)
    logits: jax.Array  # [B,V] float32: next-token logits
    slot: int  # next free slot, the same for every row

    @property
    def free(self) -> int:
        return self.key_mask.shape[1] - self.slot


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill(config: ModelConfig, reserve: int, params, ids, mask):
    batch, length = ids.shape
    cache = init_cache(config, batch, length + reserve)
    key_mask = jnp.zeros((batch, length + reserve), jnp.int32).at[:, :length].set(mask)
    hidden, cache = CausalLM(config).apply({"params": params}, ids, positions_from_mask(mask), key_mask, cache, 0,
                                        return_hidden=True)
    logits = (hidden[:, -1] @ output_weights(config, params)).astype(jnp.float32)  # no [B,P,V] logits
    return cache, key_mask, jnp.sum(mask, axis=1), logits


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(3,))
def _extend(config: ModelConfig, slot, params, cache, key_mask, position, logits, ids, mask):
    """slot: a traced int32 (one program for every slot)."""
    key_mask = jax.lax.dynamic_update_slice(key_mask, mask, (0, slot))
    positions = position[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [B,F]
    hidden, cache = CausalLM(config).apply({"params": params}, ids, positions, key_mask, cache, slot,
                                        return_hidden=True)
    appended = jnp.sum(mask, axis=1)
    new_logits = (hidden[:, -1] @ output_weights(config, params)).astype(jnp.float32)
    return cache, key_mask, position + appended, jnp.where(appended[:, None] > 0, new_logits, logits)


# From this many rows a scanned model decodes unrolled (`unrolled_for_decoding`). SmolLM2-135M-Instruct, 2 CPU cores,
# ~300 cached slots, min of 5 calls of 24 steps, scanned vs unrolled: batch 32 170 vs 132 ms per step, batch 8 61 vs
# 60, batch 4 52 vs 53, batch 1 32 vs 37 (why the scan is the faster one there was not looked into). Greedy tokens
# equal.
UNROLLED_DECODE_MIN_BATCH = 8


def unrolled_for_decoding(config: ModelConfig, params, cache):
    """A scanned model's (config, params, cache) in the unrolled layout, for a decoding loop.

    Inside a scan over layers every step slices each layer's weights out of the stacked [L,…] arrays, and XLA's
    CPU backend writes each slice to a new buffer before its dot reads it (seen in the compiled `_decode`: a
    `dynamic-slice` fusion per weight): a decoding step then moves every weight three times instead of once.
    Sliced here, before the loop, the copy happens once per `decode` call; the loop body holds the L layers one
    after another (a longer compile: 2.6 → 7.6 s for SmolLM2 at batch 1)."""
    from sajax.model.decoder import unstack_layers

    layers = config.num_hidden_layers
    unrolled_cache = [{name: cache[name][i] for name in cache} for i in range(layers)]
    return config.replace(scan_layers=False), unstack_layers(params, layers), unrolled_cache


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode(config: ModelConfig, max_new_tokens: int, num_logprobs: int, slot, params, cache, key_mask,
            position, logits, rng, temperature, top_k, top_p, eos_ids, pad_id):
    """num_logprobs < 0: tokens only; ≥ 0: also each token's log p and the top `num_logprobs` alternatives. slot: a
    traced int32 (one program for every slot)."""
    if config.scan_layers and logits.shape[0] >= UNROLLED_DECODE_MIN_BATCH:
        config, params, cache = unrolled_for_decoding(config, params, cache)
    model = CausalLM(config)
    batch = logits.shape[0]
    step_key = jax.vmap(jax.random.fold_in, (0, None)) if rng.ndim else jax.random.fold_in

    def pick(step, logits, done):
        token = sample_logits(logits, step_key(rng, step), temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token)
        if num_logprobs < 0:
            return token, done | jnp.isin(token, eos_ids), ()
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B,V]
        top_logp, top_ids = jax.lax.top_k(logp, max(num_logprobs, 1))  # [B,k]
        chosen = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        return token, done | jnp.isin(token, eos_ids), (chosen, top_ids, top_logp)

    def write(extras, step, new):
        return tuple(e.at[:, step].set(n) for e, n in zip(extras, new))

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    extras = () if num_logprobs < 0 else (
        jnp.zeros((batch, max_new_tokens), jnp.float32), jnp.zeros((batch, max_new_tokens, max(num_logprobs, 1)),
                                                                   jnp.int32),
        jnp.zeros((batch, max_new_tokens, max(num_logprobs, 1)), jnp.float32))
    token, done, new = pick(0, logits, jnp.zeros((batch,), bool))
    state = (1, tokens.at[:, 0].set(token), token, done, position, key_mask, cache, write(extras, 0, new))

    def cond(state):
        step, _, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tokens, token, done, position, key_mask, cache, extras = state
        at = slot + step - 1  # where the previous token's key/value goes
        key_mask = key_mask.at[:, at].set(1)
        logits, cache = model.apply({"params": params}, token[:, None], position[:, None], key_mask, cache, at)
        token, done, new = pick(step, logits[:, 0], done)
        return (step + 1, tokens.at[:, step].set(token), token, done, position + 1, key_mask, cache,
                write(extras, step, new))

    final = jax.lax.while_loop(cond, body, state)
    tokens = final[1]
    ended = jnp.isin(tokens, eos_ids)
    first_end = jnp.where(ended.any(axis=1), jnp.argmax(ended, axis=1) + 1, max_new_tokens)
    return tokens, first_end.astype(jnp.int32), final[-1]


@functools.partial(jax.jit, static_argnums=0)
def _take_rows(config: ModelConfig, cache, key_mask, position, logits, rows):
    axis = 1 if config.scan_layers else 0
    return (jax.tree.map(lambda x: jnp.take(x, rows, axis=axis), cache), key_mask[rows], position[rows],
            logits[rows])


def _check_tokens(config: ModelConfig, sequences: Sequence[Sequence[int]], what: str) -> None:
    for i, seq in enumerate(sequences):
        if len(seq) and not 0 <= min(seq) <= max(seq) < config.vocab_size:
            raise ValueError(f"{what} {i} has token ids outside the vocabulary [0, {config.vocab_size})")


def shared_prefixes(prompts: Sequence[Sequence[int]], min_shared: int = 16):
    """Groups prompts that start alike, to run each group's common prefix through the model once.

    Returns (prefixes, owner, suffixes): prompt i = prefixes[owner[i]] + suffixes[i], every suffix at least one
    token long. Prompts are visited in sorted order (so a common prefix is shared by neighbours); a prompt joins
    the current group when that lowers the tokens to prefill — with k members sharing l tokens, a newcomer
    sharing l' ≤ l joins iff k·l' > (k−1)·l — and l' ≥ `min_shared`; otherwise it starts a group of its own."""
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    groups: list[list] = []  # [shared length, members]
    for i in order:
        prompt = list(prompts[i])
        if groups:
            shared, members = groups[-1]
            lead = prompts[members[0]]
            common = next((n for n, (a, b) in enumerate(zip(lead, prompt)) if a != b), min(len(lead), len(prompt)))
            joined = min(shared, common, len(prompt) - 1)
            if joined >= min_shared and len(members) * joined > (len(members) - 1) * shared:
                groups[-1] = [joined, members + [i]]
                continue
        groups.append([len(prompt) - 1, [i]])
    owner, prefixes, suffixes = [0] * len(prompts), [], [None] * len(prompts)
    for g, (shared, members) in enumerate(groups):
        prefixes.append(list(prompts[members[0]][:shared]))
        for i in members:
            owner[i], suffixes[i] = g, list(prompts[i][shared:])
    return prefixes, owner, suffixes


def prefill(config: ModelConfig, params, prompts: Sequence[Sequence[int]], *, reserve: int,
            length_bucket: int = 32, share_prefixes: bool = True) -> Prefilled:
    """Runs `prompts` (token lists) through the model into a KV cache with `reserve` free slots after each.

    With `share_prefixes`, prompts that start with the same tokens (e.g. several raters of one answer) have that
    prefix computed once (`shared_prefixes`): the prefixes are prefilled, their cache rows repeated per prompt,
    and the rest appended with `extend` — the same result as prefilling every prompt in full. Used when the
    padded prefixes and suffixes hold fewer tokens than the padded prompts."""
    _check_nonempty(prompts)
    _check_tokens(config, prompts, "prompt")
    longest = max(len(p) for p in prompts)
    if longest + reserve > config.max_position_embeddings:
        raise ValueError(f"longest prompt ({longest} tokens) + {reserve} more tokens exceeds "
                         f"max_position_embeddings ({config.max_position_embeddings})")
    if share_prefixes and len(prompts) > 1:
        prefixes, owner, suffixes = shared_prefixes(prompts)
        width = _round_up(max(len(s) for s in suffixes), 8)
        padded = lambda rows, length: rows * _round_up(max(length, 1), length_bucket)  # noqa: E731
        # worth it when the padded prefix rows + suffix rows hold fewer tokens than the padded prompts
        if padded(len(prefixes), max(map(len, prefixes))) + len(prompts) * width < padded(len(prompts), longest):
            state = _prefill_padded(config, params, prefixes, width + reserve, length_bucket)
            rows = jnp.asarray(owner, jnp.int32)
            state = Prefilled(*_take_rows(config, state.cache, state.key_mask, state.position, state.logits, rows),
                              state.slot)
            return extend(config, params, state, suffixes, length_bucket=8)
    return _prefill_padded(config, params, prompts, reserve, length_bucket)


def _prefill_padded(config, params, prompts, reserve, length_bucket) -> Prefilled:
    ids, mask = _left_align(prompts, 0, _round_up(max(len(p) for p in prompts), length_bucket))
    with profile.call("prefill", len(prompts), int(mask.sum()), ids.size) as timed:
        cache, key_mask, position, logits = timed.result = _prefill(config, reserve, params, ids, mask)
    return Prefilled(cache, key_mask, position, logits, ids.shape[1])


def extend(config: ModelConfig, params, state: Prefilled, tokens: Sequence[Sequence[int]],
           length_bucket: int = 1) -> Prefilled:
    """Appends tokens[i] to row i (rows may get none) in one pass; `state` is consumed (its cache is updated in
    place) and the extended state returned. The appended block is the longest list rounded up to
    `length_bucket` (capped by the free slots) wide: 1 uses exactly the slots needed."""
    if len(tokens) != state.logits.shape[0]:
        raise ValueError(f"{len(tokens)} token lists for {state.logits.shape[0]} rows")
    _check_tokens(config, tokens, "row")
    longest = max(max(len(t) for t in tokens), 1)
    if longest > state.free:
        raise ValueError(f"{longest} tokens do not fit in the {state.free} free cache slots")
    ids, mask = _left_align(tokens, 0, min(_round_up(longest, length_bucket), state.free))
    with profile.call("extend", len(tokens), int(mask.sum()), ids.size) as timed:
        cache, key_mask, position, logits = timed.result = _extend(
            config, np.int32(state.slot), params, state.cache, state.key_mask, state.position, state.logits, ids, mask)
    return Prefilled(cache, key_mask, position, logits, state.slot + ids.shape[1])


def decode(config: ModelConfig, params, state: Prefilled, *, max_new_tokens: int,
           temperature: float | Sequence[float] = 0.0, top_k: int = 0, top_p: float | Sequence[float] = 1.0,
           seed: int | Sequence[int] = 0, eos_token_id: int | Sequence[int] | None = None,
           pad_token_id: int | None = None, top_logprobs: int | None = None) -> Generation:
    """Samples up to `max_new_tokens` per row after `state` (consumed), one token per step in a jitted
    `lax.while_loop` that ends when every row has produced an end-of-sequence token. temperature, top_p and seed
    may be given per row (a served batch of requests with their own settings; a row's draws then depend on its
    own seed only). `top_logprobs` (0…20): also return each token's log-probability and the top alternatives."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if np.any(np.asarray(temperature) < 0) or not np.all((0 < np.asarray(top_p)) & (np.asarray(top_p) <= 1)):
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if max_new_tokens - 1 > state.free:
        raise ValueError(f"{max_new_tokens} new tokens do not fit in the {state.free} free cache slots")
    eos = config.eos_token_ids if eos_token_id is None else (
        (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (config.pad_token_id or 0)
    rng = jax.random.key(seed) if np.ndim(seed) == 0 else jax.vmap(jax.random.key)(np.asarray(seed, np.uint32))
    rows = state.logits.shape[0]
    with profile.call("decode", rows) as timed:
        tokens, lengths, extras = timed.result = _decode(
            config, max_new_tokens, -1 if top_logprobs is None else top_logprobs, np.int32(state.slot), params,
            state.cache, state.key_mask, state.position, state.logits, rng, np.asarray(temperature, np.float32),
            np.int32(top_k), np.asarray(top_p, np.float32), np.asarray(eos or (-1,), np.int32), np.int32(pad))
        lengths = np.asarray(lengths)
        timed.tokens, timed.steps = int(lengths.sum()), int(lengths.max())
        timed.padded_tokens = rows * timed.steps
    logprobs, top_ids, top_logp = (np.asarray(e) for e in extras) if extras else (None, None, None)
    if top_ids is not None and top_logprobs == 0:
        top_ids, top_logp = top_ids[..., :0], top_logp[..., :0]
    return Generation(np.asarray(tokens), np.asarray(lengths), logprobs, top_ids, top_logp)


def compile_generation(config: ModelConfig, params, *, batch: int, prompt_len: int, new_tokens: int,
                       input_sharding) -> tuple:
    """Ahead-of-time (`sajax.aot`): the two programs `generate` runs for `batch` prompts of `prompt_len` tokens
    and `new_tokens` more — the prefill, then the decode loop — lowered for abstract `params` (ShapeDtypeStructs
    with shardings; the mesh's devices may be a described TPU slice) and compiled. The prompts and sampling
    settings get `input_sharding`; the decode loop's KV cache and logits the shardings the prefill gives them."""
    ids = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=input_sharding)
    prefill = _prefill.lower(config, new_tokens, params, ids, ids).compile()
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         jax.eval_shape(functools.partial(_prefill, config, new_tokens), params, ids, ids),
                         prefill.output_shardings)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=input_sharding)  # noqa: E731
    rng = jax.eval_shape(jax.random.key, 0)
    rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=input_sharding)
    eos = jax.ShapeDtypeStruct((max(len(config.eos_token_ids), 1),), jnp.int32, sharding=input_sharding)
    decode = _decode.lower(config, new_tokens, -1, scalar(jnp.int32), params, *state, rng, scalar(jnp.float32),
                           scalar(jnp.int32), scalar(jnp.float32), eos, scalar(jnp.int32)).compile()
    return prefill, decode


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             length_bucket: int = 32, share_prefixes: bool = True) -> Generation:
    """Continues each token list in `prompts`; deterministic for a given seed. `eos_token_id` defaults to the
    config's (a row stops at the first one), `pad_token_id` to the config's (else 0). `prefill`, then
    `decode`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({config.max_position_embeddings})")
    state = prefill(config, params, prompts, reserve=max_new_tokens, length_bucket=length_bucket,
                    share_prefixes=share_prefixes)
    return decode(config, params, state, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, seed=seed, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


SCORE_BLOCK = 512  # positions projected onto the vocabulary at a time: [512, V] float32 logits, never [B, T, V]


@functools.partial(jax.jit, static_argnums=0)
def _continuation_logprobs(config: ModelConfig, params, ids, mask, continuation_mask):
    hidden, _ = CausalLM(config).apply({"params": params}, ids, positions_from_mask(mask), mask, return_hidden=True)
    token_logprobs = -token_nll(hidden, output_weights(config, params), ids, SCORE_BLOCK)  # [B,T-1]: of ids[:, 1:]
    return jnp.sum(token_logprobs * continuation_mask[:, 1:], axis=-1)


def score_continuations(config: ModelConfig, params, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], length_bucket: int = 32) -> np.ndarray:
    """log p(continuations[i] | prompts[i]) = Σ_j log softmax(logits at the token before j)[token j], summed over
    the continuation's tokens; float32 [N], one forward pass over right-padded prompt+continuation rows, projected
    onto the vocabulary `SCORE_BLOCK` positions at a time (a 152k-token vocabulary would otherwise need
    B·T·V·4 bytes at once)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        if not prompt or not continuation:
            raise ValueError(f"pair {i}: prompt and continuation need at least one token each")
    ids, mask = right_pad([list(p) + list(c) for p, c in zip(prompts, continuations)], length_bucket)
    continuation_mask = np.zeros(ids.shape, np.float32)
    for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        continuation_mask[i, len(prompt):len(prompt) + len(continuation)] = 1
    with profile.call("score", len(prompts), int(mask.sum()), ids.size) as timed:
        timed.result = scores = _continuation_logprobs(config, params, ids, mask, continuation_mask)
    return np.asarray(scores)


@functools.partial(jax.jit, static_argnums=0)
def _mean_hidden(config: ModelConfig, params, ids, mask):
    from sajax.model import decoder

    hidden = decoder.hidden_states(config, params, ids, mask).astype(jnp.float32)  # [B,T,D]
    weights = mask[..., None].astype(jnp.float32)
    return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def mean_hidden_states(config: ModelConfig, params, sequences: Sequence[Sequence[int]],
                       length_bucket: int = 32) -> np.ndarray:
    """Σ_t h_t / T over each token list's final (normed) hidden states: float32 [N, D], one pass over right-padded
    rows (sentence embeddings of a decoder LM)."""
    _check_nonempty(sequences)
    _check_tokens(config, sequences, "input")
    ids, mask = right_pad(sequences, length_bucket)
    with profile.call("embed", len(sequences), int(mask.sum()), ids.size) as timed:
        timed.result = vectors = _mean_hidden(config, params, ids, mask)
    return np.asarray(vectors)


def generate_text(config: ModelConfig, params, tokenizer, prompts: Sequence[str], chat: bool = False,
                  **kwargs) -> list[str]:
    """Text in, text out: encodes with the tokenizer's special tokens (BOS) — or, with `chat`, each prompt as a
    user turn of the tokenizer's chat template — and decodes without them; stops at any end-of-sequence id of the
    config (and generation_config.json), of the tokenizer, or the template's end of turn."""
    from sajax.formats.tokenizer import encode_chat, has_chat_template

    if chat and not has_chat_template(tokenizer):
        raise ValueError("chat: the tokenizer has no chat template")
    encoded = [encode_chat(tokenizer, p) if chat else tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    kwargs.setdefault("eos_token_id", stop_token_ids(config, tokenizer))
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    out = generate(config, params, encoded, **kwargs)
    return [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(out.tokens, out.lengths)]
