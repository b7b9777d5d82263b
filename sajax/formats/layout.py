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
HF checkpoints store q/k rows in the half-split RoPE layout our model uses, so no row permutation.
"""

from __future__ import annotations

from typing import Mapping

import jax
import ml_dtypes
import numpy as np

from sajax.model.config import LlamaConfig
from sajax.model.decoder import stack_layers, unstack_layers

SAFE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def layer_entries(config: LlamaConfig, i: int):
    """(HF name, our path, HF→ours, ours→HF) for the tensors of layer i."""
    d, h, k, e = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    pre = f"model.layers.{i}."
    heads = lambda n: (lambda w: w.T.reshape(d, n, e), lambda p: p.reshape(d, n * e).T)  # noqa: E731
    transpose = (lambda w: w.T, lambda p: p.T)
    same = (lambda w: w, lambda p: p)
    return [
        (pre + "self_attn.q_proj.weight", ("self_attn", "q_proj"), *heads(h)),
        (pre + "self_attn.k_proj.weight", ("self_attn", "k_proj"), *heads(k)),
        (pre + "self_attn.v_proj.weight", ("self_attn", "v_proj"), *heads(k)),
        (pre + "self_attn.o_proj.weight", ("self_attn", "o_proj"),
         lambda w: w.T.reshape(h, e, d), lambda p: p.reshape(h * e, d).T),
        (pre + "mlp.gate_proj.weight", ("mlp", "gate_proj"), *transpose),
        (pre + "mlp.up_proj.weight", ("mlp", "up_proj"), *transpose),
        (pre + "mlp.down_proj.weight", ("mlp", "down_proj"), *transpose),
        (pre + "input_layernorm.weight", ("input_layernorm", "weight"), *same),
        (pre + "post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), *same),
    ]


def entries(config: LlamaConfig):
    same = (lambda w: w, lambda p: p)
    out = [("model.embed_tokens.weight", ("embed_tokens",), *same), ("model.norm.weight", ("norm", "weight"), *same)]
    if not config.tie_word_embeddings:
        out.append(("lm_head.weight", ("lm_head",), lambda w: w.T, lambda p: p.T))
    for i in range(config.num_hidden_layers):
        out += [(name, (f"layers_{i}",) + path, a, b) for name, path, a, b in layer_entries(config, i)]
    return out


def check_tensors(config: LlamaConfig, shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> None:
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


def params_from_hf_state(config: LlamaConfig, tensors, source: str = "checkpoint", dtype=None):
    """Our param tree from a mapping HF name → array (numpy or anything `np.asarray` takes).

    Raises ValueError naming the tensor when one is missing, unexpected or of the wrong shape."""
    if hasattr(tensors, "shapes"):  # lazy sources (safetensors files, GGUF) know shapes without reading data
        check_tensors(config, tensors.shapes(), source)
    else:
        check_tensors(config, {name: np.shape(tensors[name]) for name in tensors.keys()}, source)
    target = np.dtype(dtype or SAFE_DTYPES[config.param_dtype])
    params: dict = {}
    for name, path, to_ours, _ in entries(config):
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(to_ours(np.asarray(tensors[name]).astype(target)))
    if config.scan_layers:
        params = stack_layers(params, config.num_hidden_layers)
    return params


def hf_state_from_params(config: LlamaConfig, params, dtype=None) -> dict[str, np.ndarray]:
    """HF name → numpy array (the inverse of `params_from_hf_state`)."""
    params = jax.device_get(params)
    if config.scan_layers:
        params = unstack_layers(params, config.num_hidden_layers)
    out = {}
    for name, path, _, to_hf in entries(config):
        node = params
        for key in path:
            node = node[key]
        array = np.asarray(node)
        out[name] = np.ascontiguousarray(to_hf(array.astype(dtype) if dtype is not None else array))
    return out


def expected_hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, k, e = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    per_layer = {"self_attn.q_proj.weight": (h * e, d), "self_attn.k_proj.weight": (k * e, d),
                 "self_attn.v_proj.weight": (k * e, d), "self_attn.o_proj.weight": (d, h * e),
                 "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
                 "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{n}": s for n, s in per_layer.items()})
    return shapes
