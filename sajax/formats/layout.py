"""Hugging Face tensor names and layouts ⇄ sajax parameters: one map per architecture, shared by the HF folder
(`hf`) and GGUF (`gguf`) readers and by the writer.

Name and layout map (HF `nn.Linear.weight` is [out, in]; ours are [in, ...out]):
  model.embed_tokens.weight [V,D]                      → embed_tokens [V,D]
  model.layers.i.self_attn.{q,k,v}_proj.weight [N·E,D] → layers_i/self_attn/{q,k,v}_proj [D,N,E]
  model.layers.i.self_attn.o_proj.weight [D,H·E]       → layers_i/self_attn/o_proj [H,E,D]
  model.layers.i.mlp.{gate,up}_proj.weight [F,D]       → layers_i/mlp/{gate,up}_proj [D,F]
  model.layers.i.mlp.down_proj.weight [D,F]            → layers_i/mlp/down_proj [F,D]
  model.layers.i.{input,post_attention}_layernorm.weight, model.norm.weight → …/weight [D]
  lm_head.weight [V,D]                                 → lm_head [D,V] (absent when embeddings are tied)
  model.layers.i.self_attn.{q,k,v}_proj.bias [N·E]     → layers_i/self_attn/{q,k,v}_bias [N,E]   (qkv_bias)
  model.layers.i.self_attn.o_proj.bias [D]             → layers_i/self_attn/o_bias [D]           (o_bias)
  model.layers.i.self_attn.{q,k}_norm.weight [E]       → layers_i/self_attn/{q,k}_norm/weight [E] (qk_norm)
HF checkpoints store q/k rows in the half-split RoPE layout our model uses, so no row permutation.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import ml_dtypes
import numpy as np

from sajax.model.config import ModelConfig
from sajax.model.decoder import unstack_layers

SAFE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


class Entry(NamedTuple):
    """One tensor: its HF name and shape, its path in our param tree, and the layout maps both ways."""

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def layer_entries(config: ModelConfig, i: int) -> list[Entry]:
    """The tensors of layer i, with the family's optional ones (q/k/v/o biases, q/k norms)."""
    d, f = config.hidden_size, config.intermediate_size
    h, k, e = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    pre = f"model.layers.{i}."
    heads = lambda n: ((n * e, d), lambda w: w.T.reshape(d, n, e), lambda p: p.reshape(d, n * e).T)  # noqa: E731
    bias = lambda n: ((n * e,), lambda w: w.reshape(n, e), lambda p: p.reshape(n * e))  # noqa: E731
    transpose = lambda shape: (shape, lambda w: w.T, lambda p: p.T)  # noqa: E731
    same = lambda shape: (shape, lambda w: w, lambda p: p)  # noqa: E731
    out = [
        Entry(pre + "self_attn.q_proj.weight", ("self_attn", "q_proj"), *heads(h)),
        Entry(pre + "self_attn.k_proj.weight", ("self_attn", "k_proj"), *heads(k)),
        Entry(pre + "self_attn.v_proj.weight", ("self_attn", "v_proj"), *heads(k)),
        Entry(pre + "self_attn.o_proj.weight", ("self_attn", "o_proj"), (d, h * e),
              lambda w: w.T.reshape(h, e, d), lambda p: p.reshape(h * e, d).T),
        Entry(pre + "mlp.gate_proj.weight", ("mlp", "gate_proj"), *transpose((f, d))),
        Entry(pre + "mlp.up_proj.weight", ("mlp", "up_proj"), *transpose((f, d))),
        Entry(pre + "mlp.down_proj.weight", ("mlp", "down_proj"), *transpose((d, f))),
        Entry(pre + "input_layernorm.weight", ("input_layernorm", "weight"), *same((d,))),
        Entry(pre + "post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), *same((d,))),
    ]
    if config.qkv_bias:
        out += [Entry(pre + "self_attn.q_proj.bias", ("self_attn", "q_bias"), *bias(h)),
                Entry(pre + "self_attn.k_proj.bias", ("self_attn", "k_bias"), *bias(k)),
                Entry(pre + "self_attn.v_proj.bias", ("self_attn", "v_bias"), *bias(k))]
    if config.o_bias:
        out.append(Entry(pre + "self_attn.o_proj.bias", ("self_attn", "o_bias"), *same((d,))))
    if config.qk_norm:
        out += [Entry(pre + "self_attn.q_norm.weight", ("self_attn", "q_norm", "weight"), *same((e,))),
                Entry(pre + "self_attn.k_norm.weight", ("self_attn", "k_norm", "weight"), *same((e,)))]
    return out


def entries(config: ModelConfig) -> list[Entry]:
    """Every tensor of the model `config` describes (unrolled layer paths)."""
    d, v = config.hidden_size, config.vocab_size
    out = [Entry("model.embed_tokens.weight", ("embed_tokens",), (v, d), lambda w: w, lambda p: p),
           Entry("model.norm.weight", ("norm", "weight"), (d,), lambda w: w, lambda p: p)]
    if not config.tie_word_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head",), (v, d), lambda w: w.T, lambda p: p.T))
    for i in range(config.num_hidden_layers):
        out += [entry._replace(path=(f"layers_{i}",) + entry.path) for entry in layer_entries(config, i)]
    return out


def check_tensors(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> None:
    """Raises ValueError naming the tensor when one that `config` needs is missing, one is unexpected or one has
    the wrong shape; `shapes` maps HF names to shapes."""
    expected = expected_hf_shapes(config)
    names = {n for n in shapes if not n.endswith(IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        names.discard("lm_head.weight")  # some tied checkpoints store the (identical) head anyway
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match the config: missing {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' …' if len(unexpected) > 5 else ''}")
    for name in sorted(names):
        if tuple(shapes[name]) != expected[name]:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, the config implies "
                             f"{expected[name]}")


def params_from_hf_state(config: ModelConfig, tensors, source: str = "checkpoint", dtype=None):
    """Our param tree from a mapping HF name → array (numpy or anything `np.asarray` takes).

    Raises ValueError naming the tensor when one is missing, unexpected or of the wrong shape."""
    if hasattr(tensors, "shapes"):  # lazy sources (safetensors files, GGUF) know shapes without reading data
        check_tensors(config, tensors.shapes(), source)
    else:
        check_tensors(config, {name: np.shape(tensors[name]) for name in tensors.keys()}, source)
    target = np.dtype(dtype or SAFE_DTYPES[config.param_dtype])
    params: dict = {}
    for entry in entries(config):
        array = entry.to_ours(np.asarray(tensors[entry.hf_name]).astype(target))
        path, layer = entry.path, None
        if config.scan_layers and path[0].startswith("layers_"):  # written straight into the stacked [L, ...] array
            path, layer = ("layers",) + path[1:], int(path[0].removeprefix("layers_"))
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if layer is None:
            node[path[-1]] = np.ascontiguousarray(array)
        else:  # one copy of the parameters in memory, not the unrolled ones and their stack
            if path[-1] not in node:
                node[path[-1]] = np.empty((config.num_hidden_layers, *array.shape), target)
            node[path[-1]][layer] = array
    return params


def hf_state_from_params(config: ModelConfig, params, dtype=None) -> dict[str, np.ndarray]:
    """HF name → numpy array (the inverse of `params_from_hf_state`)."""
    params = jax.device_get(params)
    if config.scan_layers:
        params = unstack_layers(params, config.num_hidden_layers)
    out = {}
    for entry in entries(config):
        node = params
        for key in entry.path:
            node = node[key]
        array = np.asarray(node)
        out[entry.hf_name] = np.ascontiguousarray(entry.to_hf(array.astype(dtype) if dtype is not None else array))
    return out


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {entry.hf_name: entry.hf_shape for entry in entries(config)}
