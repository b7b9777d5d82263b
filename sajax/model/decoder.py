"""One Flax (linen) decoder for every supported family — numerically the same function as transformers'
`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` and `Qwen3ForCausalLM` — with the family's
differences as `ModelConfig` switches (q/k/v/o biases, q/k RMSNorm, sliding-window layers, tied output).

Shapes: B batch, T query length, S key length (= T without a cache, the cache length with one), D hidden,
H query heads, K key/value heads (H = K·G, grouped-query attention), E head_dim, F intermediate, V vocab, L layers.

Every parameter carries logical axis names (`vocab, embed, heads, kv_heads, head_dim, mlp, norm, layers`) that
`sajax.parallel.sharding` maps to mesh axes. RoPE uses the half-split ("rotate_half") layout of HF checkpoints, so HF
q/k projection weights are used as they are, with no permutation.

One call serves training, prefill and decoding:
  `CausalLM(config)(input_ids [B,T], positions [B,T], key_mask [B,S], cache=None, cache_index=0)`
A key at slot s is visible to the query at slot `cache_index + t` iff `key_mask[b, s]` and `s <= cache_index + t`
(causal + padding) and, in a sliding-window layer, its position is fewer than `sliding_window` before the query's.
With a cache, the new keys/values are written at slots `[cache_index, cache_index + T)`.
"""

from __future__ import annotations

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sajax.model import lora
from sajax.model.config import Llama3RopeScaling, ModelConfig
from sajax.parallel import sharding

Array = jax.Array
KVCache = object  # unrolled layers: [{"k": [B,K,E,S], "v": [B,K,S,E]}] per layer; scanned: stacked [L,…] (`init_cache`)


def _dtype(name: str):
    return jnp.dtype(name)


def _param(module: nn.Module, name: str, shape, axes, init, config: ModelConfig):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, _dtype(config.param_dtype))


def _projection(module: nn.Module, name: str, x: Array, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                in_axes: tuple[str, ...], out_axes: tuple[str, ...]) -> Array:
    """x [..., *in] · W [*in, *out] → [..., *out]; with a LoRA adapter on W (`sajax.model.lora`), plus
    (α/r)·(dropout(x)·A)·B, A [*in, r], B [r, *out]. Dropout only while a "dropout" rng is given (training)."""
    c = module.config
    dtype = _dtype(c.dtype)
    weight = _param(module, name, (*in_shape, *out_shape), (*in_axes, *out_axes),
                    nn.initializers.normal(c.initializer_range), c)
    y = dense(x, weight.astype(dtype), contract=len(in_shape))
    if not lora.targeted(c, "/".join((*module.path, name))):
        return y
    r, fan_in = c.lora_rank, math.prod(in_shape)
    a_init = nn.initializers.uniform(2 / math.sqrt(fan_in))  # [0, 2/√fan_in), shifted below: ±1/√fan_in
    a = _param(module, name + lora.SUFFIXES[0], (*in_shape, r), (*in_axes, lora.RANK_AXIS),
               lambda key, shape, dt: a_init(key, shape, dt) - 1 / math.sqrt(fan_in), c)
    b = _param(module, name + lora.SUFFIXES[1], (r, *out_shape), (lora.RANK_AXIS, *out_axes), nn.initializers.zeros,
               c)
    if c.lora_dropout > 0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - c.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1 - c.lora_dropout), 0).astype(x.dtype)
    low = dense(x, a.astype(dtype), contract=len(in_shape))  # [..., r]
    return y + dense(low, b.astype(dtype)) * jnp.asarray(lora.scaling(c), dtype)


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    """Sharding hint for activations; a no-op unless a mesh and logical rules are active (sajax.parallel.sharding)."""
    return nn.with_logical_constraint(x, axes)


# ---- RoPE ---------------------------------------------------------------------------------------------------


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: Llama3RopeScaling | None) -> np.ndarray:
    """inv_freq_i = theta^(-2i/E) for i < E/2, then (llama3) for wavelength w_i = 2π / inv_freq_i:
    w > orig/low: inv_freq/factor;  w < orig/high: inv_freq;  otherwise (1-s)·inv_freq/factor + s·inv_freq
    with s = (orig/w − low) / (high − low).  Returns float32 [E/2]."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)
    inv_freq = inv_freq.astype(np.float32)
    if scaling is None:
        return inv_freq
    orig = scaling.original_max_position_embeddings
    low_wavelen = orig / scaling.low_freq_factor
    high_wavelen = orig / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """x [B,T,N,E] rotated by angle positions·inv_freq: x·cos + rotate_half(x)·sin, computed in float32
    (rotate_half([a, b]) = [−b, a], the two halves of E)."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B,T,E/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B,T,1,E]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ---- Layers -------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight, normalised in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = _param(self, "weight", (x.shape[-1],), ("norm",), nn.initializers.ones, self.config)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        dtype = _dtype(self.config.dtype)
        return y.astype(dtype) * weight.astype(dtype)


def attention_mask(key_mask: Array, query_len: int, cache_index: Array | int) -> Array:
    """[B,S] key validity → [B,T,S] boolean: key s visible to query t iff key_mask[b,s] and s <= cache_index + t."""
    query_slot = cache_index + jnp.arange(query_len)[:, None]  # [T,1]
    key_slot = jnp.arange(key_mask.shape[1])[None, :]  # [1,S]
    return key_mask[:, None, :].astype(bool) & (key_slot <= query_slot)[None]


def within_window(query_positions: Array, key_positions: Array, window: int) -> Array:
    """[B,T] and [B,S] positions → [B,T,S] boolean: key s is fewer than `window` positions before query t
    (HF's sliding window, `kv_idx > q_idx − window`). Positions, not slots: with padding between a row's tokens
    (`extend`) or several spans per row (packing), positions still count the tokens a query really sees."""
    return (query_positions[:, :, None] - key_positions[:, None, :]) < window


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; softmax(q·kᵀ/√E + mask)·v in float32, then the output projection.
    Family switches: biases on q/k/v (`qkv_bias`) and o (`o_bias`), RMSNorm over E on every query and key head
    before RoPE (`qk_norm`)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array, layer_cache, cache_index, layer=None):
        """layer_cache: this layer's {"k" [B,K,E,S], "v" [B,K,S,E]} (`init_cache`), updated and returned; or, with
        `layer` (scanned layers: the index into the stacked [L,…] cache), the whole stacked cache, read only (None: a
        fresh one), and this call's keys [B,K,E,T] and values [B,K,T,E] returned for `CausalLM` to write once after
        the scan (slicing and re-stacking the cache in every layer copied it four times per decoding step)."""
        c = self.config
        d, h, k, e = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        dtype = _dtype(c.dtype)
        q = _projection(self, "q_proj", x, (d,), (h, e), ("embed",), ("heads", "head_dim"))  # [B,T,H,E]
        key = _projection(self, "k_proj", x, (d,), (k, e), ("embed",), ("kv_heads", "head_dim"))  # [B,T,K,E]
        value = _projection(self, "v_proj", x, (d,), (k, e), ("embed",), ("kv_heads", "head_dim"))  # [B,T,K,E]
        if c.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", (h, e), ("heads", "head_dim"), zeros, c).astype(dtype)
            key = key + _param(self, "k_bias", (k, e), ("kv_heads", "head_dim"), zeros, c).astype(dtype)
            value = value + _param(self, "v_bias", (k, e), ("kv_heads", "head_dim"), zeros, c).astype(dtype)
        if c.qk_norm:
            q, key = RMSNorm(c, name="q_norm")(q), RMSNorm(c, name="k_norm")(key)
        inv_freq = rope_inverse_frequencies(e, c.rope_theta, c.rope_scaling)
        q, key = apply_rope(q, positions, inv_freq), apply_rope(key, positions, inv_freq)
        q = _constrain(q, ("activation_batch", "activation_length", "activation_heads", None))

        new_cache = None
        if layer is not None:
            t = x.shape[1]
            new_cache = {"k": key.transpose(0, 2, 3, 1), "v": value.transpose(0, 2, 1, 3)}  # [B,K,E,T], [B,K,T,E]
            if layer_cache is None:  # a fresh cache (prefill): nothing before this call's tokens
                out = causal_attention(q, key, value, mask[:, :, :t])
            else:  # the cache's slots before cache_index, and this call's tokens at [cache_index, cache_index + T)
                old = [jax.lax.dynamic_index_in_dim(layer_cache[n], layer, 0, keepdims=False).astype(dtype)
                       for n in ("k", "v")]
                before = jnp.arange(mask.shape[2])[None, None, :] < cache_index  # [1,1,S]
                out = grouped_attention(q, old[0], old[1], mask & before, (
                    new_cache["k"], new_cache["v"], jax.lax.dynamic_slice_in_dim(mask, cache_index, t, axis=2)))
        elif layer_cache is None:  # training / scoring: keys are this call's tokens and the mask is causal
            out = causal_attention(q, key, value, mask)
        else:  # write this step's keys/values at slots [cache_index, cache_index + T) of the cache
            key = jax.lax.dynamic_update_slice(layer_cache["k"], key.transpose(0, 2, 3, 1).astype(
                layer_cache["k"].dtype), (0, 0, 0, cache_index))
            value = jax.lax.dynamic_update_slice(layer_cache["v"], value.transpose(0, 2, 1, 3).astype(
                layer_cache["v"].dtype), (0, 0, cache_index, 0))
            new_cache = {"k": key, "v": value}
            out = grouped_attention(q, key.astype(dtype), value.astype(dtype), mask)  # [B,T,H,E]
        out = _projection(self, "o_proj", out, (h, e), (d,), ("heads", "head_dim"), ("embed",))
        if c.o_bias:
            out = out + _param(self, "o_bias", (d,), ("embed",), nn.initializers.zeros, c).astype(dtype)
        return out, new_cache


def dense(x: Array, w: Array, contract: int = 1) -> Array:
    """x [..., *in] · w [*in, *out] → [..., *out], contracting the last `contract` axes of x, as one 2-D matmul
    over the flattened leading axes (XLA's CPU backward is ~2× faster on 2-D operands than on [B,T,…])."""
    lead, inner = x.shape[:x.ndim - contract], math.prod(x.shape[x.ndim - contract:])
    out = w.shape[contract:]
    y = x.reshape(-1, inner) @ w.reshape(inner, -1)
    return y.reshape(*lead, *out)


def grouped_attention(q: Array, k: Array, v: Array, mask: Array, more=None) -> Array:
    """softmax(q·kᵀ/√E masked)·v with K key/value heads shared by G = H/K query heads each, as HF's repeat_kv:
    query head n uses kv head n // G. q [B,T,H,E], k [B,K,E,S], v [B,K,S,E] (the KV cache's layout: no copy of
    the cache per step; keys with S last make a decoding step's scores 3× faster on CPU than [B,K,S,E]), mask
    [B,T,S] → [B,T,H,E]. `more`: a second block of keys (k2 [B,K,E,S2], v2 [B,K,S2,E], mask2 [B,T,S2]) attended
    to with the first under one softmax, as if concatenated after it. Scores and softmax in float32; the G query
    heads of a kv head are folded into the query axis (one batched matmul per kv head)."""
    b, t, h, e = q.shape
    kv = k.shape[1]
    g = h // kv
    q = q.reshape(b, t, kv, g, e).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, e)  # [B,K,G·T,E]
    blocks = [(k, v, mask)] + ([more] if more is not None else [])
    scores = [jnp.where(m[:, None, None], jnp.einsum("bkqe,bkes->bkqs", q, kb, preferred_element_type=jnp.float32)
                        .reshape(b, kv, g, t, -1) / math.sqrt(e), jnp.finfo(jnp.float32).min)
              for kb, _, m in blocks]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(v.dtype).reshape(b, kv, g * t, -1)
    out, start = 0, 0
    for (_, vb, _), block in zip(blocks, scores):
        size = block.shape[-1]
        out = out + jnp.einsum("bkqs,bkse->bkqe", probs[..., start:start + size], vb)
        start += size
    return out.reshape(b, kv, g, t, e).transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)


def causal_block_size(length: int) -> int:
    """Query block size of `causal_attention`: 32 positions (fastest measured on CPU at T=256), growing so that a
    sequence has at most 16 blocks (each block is a separate program region)."""
    return max(32, -(-length // 16))


def causal_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """`grouped_attention` for a causal mask without a cache (S = T; mask[b, t, s] implies s <= t), skipping the
    key blocks above the diagonal: query block [a, b) attends to keys [0, b) only (≈ half the work of the
    full T×T scores). Forward and backward are block loops (`_blocked_attention`'s custom VJP, the
    FlashAttention recurrence: the backward recomputes each block's probabilities from the saved logsumexp
    instead of keeping [T, S] probabilities). Queries are laid out [B,K,T·G,E] (the G query heads of a kv head
    next to each other), so every product is a plain batched matmul over (B, K). Queries with no visible key
    attend uniformly to their block's keys (their outputs are padding)."""
    b, t, h, e = q.shape
    kv = k.shape[2]
    g = h // kv
    q = (q / math.sqrt(e)).reshape(b, t, kv, g, e).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, e)
    out = _blocked_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, causal_block_size(t))
    return out.reshape(b, kv, t, g, e).transpose(0, 2, 1, 3, 4).reshape(b, t, h, e)


def query_blocks(length: int, block: int) -> list[tuple[int, int]]:
    """[start, end) of each query block of `causal_attention`."""
    return [(start, min(start + block, length)) for start in range(0, length, block)]


def _masked_scores(q: Array, k: Array, mask: Array, start: int, end: int) -> Array:
    """Scores of queries [start, end) (rows [start·G, end·G) of q [B,K,T·G,E]) against keys [0, end):
    [B,K,(end−start)·G,end] float32, masked with float32 min."""
    b, kv, rows, _ = q.shape
    g = rows // mask.shape[1]
    scores = jnp.einsum("bkqe,bkse->bkqs", q[:, :, start * g:end * g], k[:, :, :end],
                        preferred_element_type=jnp.float32).reshape(b, kv, end - start, g, end)
    scores = jnp.where(mask[:, None, start:end, None, :end], scores, jnp.finfo(jnp.float32).min)
    return scores.reshape(b, kv, (end - start) * g, end)


def _blocked_attention_forward(q, k, v, mask, block):
    """q [B,K,T·G,E] (pre-scaled by 1/√E), k/v [B,K,S,E], mask [B,T,S] → out [B,K,T·G,E] and the per-query
    logsumexp of the masked scores [B,K,T·G,1]; per block: m = max s, p = exp(s − m), out = p·v / Σp."""
    outs, lses = [], []
    for start, end in query_blocks(mask.shape[1], block):
        scores = _masked_scores(q, k, mask, start, end)
        peak = jnp.max(scores, axis=-1, keepdims=True)
        probs = jnp.exp(scores - peak)
        total = jnp.sum(probs, axis=-1, keepdims=True)
        out = jnp.einsum("bkqs,bkse->bkqe", probs.astype(v.dtype), v[:, :, :end],
                         preferred_element_type=jnp.float32) / total
        outs.append(out.astype(v.dtype))
        lses.append(peak + jnp.log(total))
    out, lse = jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)
    return out, (q, k, v, mask, out, lse)


def _blocked_attention_backward(block, residuals, d_out):
    """With p = exp(s − lse) recomputed per block and D = Σ_e dout·out per query:
    dv = pᵀ·dout,  dp = dout·vᵀ,  ds = p ⊙ (dp − D),  dq = ds·k,  dk = dsᵀ·q."""
    q, k, v, mask, out, lse = residuals
    g = q.shape[2] // mask.shape[1]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dq = []
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for start, end in query_blocks(mask.shape[1], block):
        rows = slice(start * g, end * g)
        probs = jnp.exp(_masked_scores(q, k, mask, start, end) - lse[:, :, rows])
        d_block = d_out[:, :, rows]
        dv = dv.at[:, :, :end].add(jnp.einsum("bkqs,bkqe->bkse", probs.astype(v.dtype), d_block,
                                              preferred_element_type=jnp.float32))
        d_probs = jnp.einsum("bkqe,bkse->bkqs", d_block, v[:, :, :end], preferred_element_type=jnp.float32)
        d_scores = (probs * (d_probs - delta[:, :, rows])).astype(q.dtype)
        dq.append(jnp.einsum("bkqs,bkse->bkqe", d_scores, k[:, :, :end], preferred_element_type=jnp.float32))
        dk = dk.at[:, :, :end].add(jnp.einsum("bkqs,bkqe->bkse", d_scores, q[:, :, rows],
                                              preferred_element_type=jnp.float32))
    return jnp.concatenate(dq, axis=2).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_attention(q, k, v, mask, block):
    return _blocked_attention_forward(q, k, v, mask, block)[0]


_blocked_attention.defvjp(_blocked_attention_forward, _blocked_attention_backward)


class MLP(nn.Module):
    """SwiGLU: down(silu(x·gate) ⊙ (x·up))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d, f = self.config.hidden_size, self.config.intermediate_size
        gate = _projection(self, "gate_proj", x, (d,), (f,), ("embed",), ("mlp",))
        up = _projection(self, "up_proj", x, (d,), (f,), ("embed",), ("mlp",))
        hidden = jax.nn.silu(gate) * up
        hidden = _constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return _projection(self, "down_proj", hidden, (f,), (d,), ("mlp",), ("embed",))


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(·)). Signature fits `nn.scan`: (carry, per-layer xs..., broadcasts...).
    `sliding` (a Python bool, or a traced one per scanned layer) picks `window_mask` over `mask`."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, layer_cache, sliding, positions: Array, mask: Array, window_mask, cache_index,
                 layer=None):
        if window_mask is not None and sliding is not False:
            mask = window_mask if sliding is True else jnp.where(sliding, window_mask, mask)
        attn_out, new_cache = Attention(self.config, name="self_attn")(
            RMSNorm(self.config, name="input_layernorm")(x), positions, mask, layer_cache, cache_index, layer)
        x = x + attn_out
        x = x + MLP(self.config, name="mlp")(RMSNorm(self.config, name="post_attention_layernorm")(x))
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, new_cache


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the layer in backward
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _layer_class(config: ModelConfig):
    if config.remat_policy == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers)


class CausalLM(nn.Module):
    """The causal LM. Returns (logits [B,T,V] float32, updated cache or None); with `return_hidden`, the final
    normed hidden states [B,T,D] instead of logits (the loss then projects them chunk by chunk with
    `output_weights`)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array, key_mask: Array, cache: KVCache | None = None,
                 cache_index: Array | int = 0, return_hidden: bool = False, mask: Array | None = None):
        c = self.config
        dtype = _dtype(c.dtype)
        embedding = _param(self, "embed_tokens", (c.vocab_size, c.hidden_size), ("vocab", "embed"),
                           nn.initializers.normal(c.initializer_range), c)
        # Gather the fsdp-split embed axis first (as FSDP does for every weight); the vocab axis stays split over
        # `tensor` (vocab-parallel lookup). Gathering straight from the 2-D-split table makes XLA replicate it.
        table = _constrain(embedding, ("vocab", None))
        x = jnp.take(table, input_ids, axis=0).astype(dtype)  # [B,T,D]
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        window_mask = None
        if mask is None:  # else a given [B,T,S] mask (packed rows: `packed_attention_mask`), keys at `positions`
            mask = attention_mask(key_mask, input_ids.shape[1], cache_index)  # [B,T,S]
            key_positions = positions_from_mask(key_mask)
        else:
            key_positions = positions
        if c.sliding_window is not None:
            window_mask = mask & within_window(positions, key_positions, c.sliding_window)
        fresh = isinstance(cache_index, int) and cache_index == 0  # prefill: the cache holds nothing yet
        cache_index = jnp.asarray(cache_index, jnp.int32)

        layer_cls = _layer_class(c)
        if c.scan_layers:
            sliding = jnp.asarray([c.is_sliding(i) for i in range(c.num_hidden_layers)])  # [L]
            # with a cache: the stacked cache is read by every layer (broadcast), each layer's new keys/values come
            # out of the scan [L,B,K,T,E] and are written into it once, in place
            scanned = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                              in_axes=(0 if cache is None else nn.broadcast, 0, nn.broadcast, nn.broadcast,
                                       nn.broadcast, nn.broadcast) + (() if cache is None else (0,)),
                              length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            if cache is None:
                x, new_cache = scanned(c, name="layers")(x, None, sliding, positions, mask, window_mask, cache_index)
            else:
                x, new = scanned(c, name="layers")(x, None if fresh else cache, sliding, positions, mask, window_mask,
                                                   cache_index, jnp.arange(c.num_hidden_layers))
                new_cache = {n: jax.lax.dynamic_update_slice(cache[n], new[n].astype(cache[n].dtype), start)
                             for n, start in (("k", (0, 0, 0, 0, cache_index)), ("v", (0, 0, 0, cache_index, 0)))}
        else:
            new_cache = []  # one buffer per layer, updated in place (re-stacking would copy the cache every step)
            for i in range(c.num_hidden_layers):
                x, layer_cache = layer_cls(c, name=f"layers_{i}")(x, None if cache is None else cache[i],
                                                                  c.is_sliding(i), positions, mask, window_mask,
                                                                  cache_index)
                new_cache.append(layer_cache)
            new_cache = None if cache is None else new_cache

        x = RMSNorm(c, name="norm")(x)
        if return_hidden:
            return x, new_cache
        if c.tie_word_embeddings:
            logits = dense(x, embedding.astype(dtype).T)
        else:
            logits = _projection(self, "lm_head", x, (c.hidden_size,), (c.vocab_size,), ("embed",), ("vocab",))
        logits = _constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return logits.astype(jnp.float32), new_cache


# ---- Functional helpers -------------------------------------------------------------------------------------


def positions_from_mask(attention_mask: Array) -> Array:
    """Position of each token = number of real tokens before it (works for left and right padding) [B,T]."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


@functools.partial(jax.jit, static_argnums=0)
def forward(config: ModelConfig, params, input_ids: Array, attention_mask: Array) -> Array:
    """logits [B,T,V] (float32) for `input_ids` [B,T] with `attention_mask` [B,T] (1 = real token)."""
    logits, _ = CausalLM(config).apply({"params": params}, input_ids, positions_from_mask(attention_mask),
                                    attention_mask)
    return logits


def output_weights(config: ModelConfig, params) -> Array:
    """The output projection [D,V] in the compute dtype: lm_head (with a LoRA adapter: lm_head + α/r·A·B), or the
    transposed embedding when tied."""
    if config.tie_word_embeddings:
        return params["embed_tokens"].T.astype(_dtype(config.dtype))
    weights = params["lm_head"].astype(jnp.float32)
    if "lm_head" + lora.SUFFIXES[0] in params:
        a, b = params["lm_head" + lora.SUFFIXES[0]], params["lm_head" + lora.SUFFIXES[1]]
        weights = weights + lora.scaling(config) * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    return weights.astype(_dtype(config.dtype))


def hidden_states(config: ModelConfig, params, input_ids: Array, attention_mask: Array,
                  dropout_rng: Array | None = None) -> Array:
    """Final normed hidden states [B,T,D] (right padding; positions from the mask). `dropout_rng`: LoRA dropout
    (training)."""
    hidden, _ = CausalLM(config).apply({"params": params}, input_ids, positions_from_mask(attention_mask),
                                       attention_mask, return_hidden=True, rngs=_rngs(dropout_rng))
    return hidden


def _rngs(dropout_rng: Array | None) -> dict:
    return {} if dropout_rng is None else {"dropout": dropout_rng}


def packed_attention_mask(segment_ids: Array, span_ids: Array) -> Array:
    """[B,T] segment and span ids of packed rows (`sajax.data.packing`) → [B,T,T] boolean: key s visible to query t iff
    s <= t, both in the same segment (≠ 0), and s is a prompt token (span 0) or in t's span."""
    t = segment_ids.shape[1]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T(query), S(key)]
    same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    shared = (span_ids[:, None, :] == 0) | (span_ids[:, :, None] == span_ids[:, None, :])
    return causal[None] & same_segment & shared


def packed_hidden_states(config: ModelConfig, params, tokens: Array, positions: Array, segment_ids: Array,
                         span_ids: Array, dropout_rng: Array | None = None) -> Array:
    """Final normed hidden states [B,T,D] of packed rows (`sajax.data.packing`)."""
    hidden, _ = CausalLM(config).apply({"params": params}, tokens, positions, segment_ids > 0, return_hidden=True,
                                       mask=packed_attention_mask(segment_ids, span_ids), rngs=_rngs(dropout_rng))
    return hidden


def _init_boxed(config: ModelConfig, rng: Array):
    ids = jnp.zeros((1, 1), jnp.int32)
    return CausalLM(config).init(rng, ids, ids, jnp.ones((1, 1), jnp.int32))["params"]


def _unbox(tree):
    """Plain values from the logically-partitioned boxes (without applying a sharding constraint, which
    `nn.unbox` does when logical rules are active and which fails outside jit)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def init_params(config: ModelConfig, rng: Array | int = 0):
    """Random parameters (HF's init: normal(initializer_range) for matrices, ones for norms), as plain arrays."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return _unbox(jax.jit(_init_boxed, static_argnums=0)(config, rng))


def param_logical_axes(config: ModelConfig):
    """Tree like the params holding a `PartitionSpec` of logical axis names for every parameter."""
    abstract = jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0)))  # traced key: no device array needed
    return nn.get_partition_spec(abstract)


def param_shardings(config: ModelConfig, mesh, rules=sharding.LOGICAL_AXIS_RULES):
    """NamedSharding of every parameter on `mesh`; ValueError naming the parameter if a dimension does not divide
    evenly over its mesh axes."""
    shardings = sharding.logical_to_sharding(param_logical_axes(config), mesh, rules)
    sharding.check_divisible(param_shapes(config), shardings)
    return shardings


def init_adapters(config: ModelConfig, rng: Array | int = 0):
    """The LoRA adapters alone (A random, B zero), as `init_params` would make them: XLA drops the base
    weights' initialisation, as nothing returns them. Empty without LoRA."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return jax.jit(lambda key: lora.split(_unbox(_init_boxed(config, key)))[1])(rng)


def check_lora(config: ModelConfig) -> None:
    """ValueError naming the regex when LoRA is on and `lora_targets` matches none of the model's projections, or
    when it adapts the output layer with dropout (the loss projects hidden states through `output_weights`, which
    has the adapter merged, so there is no input to drop out)."""
    if config.lora_rank > 0 and config.lora_dropout > 0 and not config.tie_word_embeddings \
            and lora.targeted(config, "lm_head"):
        raise ValueError(f"lora.targets {config.lora_targets!r} adapts lm_head, which takes no lora.dropout "
                         f"(got {config.lora_dropout}): set lora.dropout=0 or leave lm_head out")
    if config.lora_rank > 0 and config.lora_modules_to_save:
        base = lora.split(param_shapes(config))[0]
        saved = lora.split(base, config.lora_modules_to_save)[1]
        if not saved:
            raise ValueError(f"lora.modules_to_save {config.lora_modules_to_save!r} matches no parameter path "
                             f"(paths look like {', '.join(sorted(base)[:4])}, …)")
        both = sorted("/".join(p) for p, _, _ in lora.adapter_pairs(lora.split(param_shapes(config))[1])
                      if re.search(config.lora_modules_to_save, "/".join(p)))
        if both:
            raise ValueError(f"{both[0]} is both a LoRA target (lora.targets) and trained in full "
                             "(lora.modules_to_save): leave it out of one of them")
    if config.lora_rank > 0 and not lora.split(param_shapes(config))[1]:
        paths = sorted("/".join(k) for k in _projection_paths(param_shapes(config.replace(lora_rank=0))))
        raise ValueError(f"lora.targets {config.lora_targets!r} matches no projection of the model (their paths: "
                         f"{', '.join(paths[:4])}, …)")


def _projection_paths(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _projection_paths(value, prefix + (key,))
        elif key.endswith("_proj") or key == "lm_head":
            yield prefix + (key,)


def param_shapes(config: ModelConfig):
    """Tree like the params holding `jax.ShapeDtypeStruct`s (no memory allocated)."""
    return _unbox(jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0))))


def init_cache(config: ModelConfig, batch_size: int, max_length: int) -> KVCache:
    """Zeroed KV cache in the compute dtype: per layer keys "k" [B, K, E, S] and values "v" [B, K, S, E] (each laid
    out as `grouped_attention` reads it fastest); scanned layers: one stacked {"k", "v"} [L, …], read by every
    layer of the scan."""
    b, k, e = batch_size, config.num_key_value_heads, config.head_dim
    shapes = {"k": (b, k, e, max_length), "v": (b, k, max_length, e)}
    dtype = _dtype(config.dtype)
    if config.scan_layers:
        return {n: jnp.zeros((config.num_hidden_layers, *shape), dtype) for n, shape in shapes.items()}
    return [{n: jnp.zeros(shape, dtype) for n, shape in shapes.items()} for _ in range(config.num_hidden_layers)]


def stack_layers(params, num_layers: int):
    """Unrolled layout (`layers_0` … `layers_{L-1}`) → scanned layout (`layers` with a leading [L] axis)."""
    params = dict(params)
    layers = [params.pop(f"layers_{i}") for i in range(num_layers)]
    params["layers"] = jax.tree.map(lambda *a: np.stack(a) if isinstance(a[0], np.ndarray) else jnp.stack(a),
                                    *layers)
    return params


def unstack_layers(params, num_layers: int):
    """Scanned layout → unrolled layout (inverse of `stack_layers`)."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return params
