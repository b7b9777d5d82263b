"""LoRA (Hu et al., 2021): low-rank adapters beside frozen base weights, as PEFT defines them.

For a base projection W [in..., out...] whose path (`layers_3/self_attn/q_proj`; scanned layers: `layers/…`; the
untied output layer: `lm_head`) matches the regex `ModelConfig.lora_targets`, the decoder adds two parameters next
to it,

    A = <name>_lora_a [in..., r]   (PEFT's lora_A: Kaiming-uniform, bound 1/√fan_in)
    B = <name>_lora_b [r, out...]  (PEFT's lora_B: zeros, so the adapted model starts as the base)

and computes y = x·W + (α/r)·(dropout(x)·A)·B. A and B carry the base weight's logical axes on its in / out side
and `lora_rank` (replicated) on the other, so they are sharded along the base weight's axes. Training
differentiates A and B only (`split` / `combine`) — and, as PEFT's `modules_to_save`, the parameters whose path
the regex `lora_modules_to_save` matches, in full; `merged` folds the adapters into W for export.

Trees here are nested dicts keyed like the params (params, their shapes, shardings or logical axes alike).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from sajax.model.config import ModelConfig

SUFFIXES = ("_lora_a", "_lora_b")
RANK_AXIS = "lora_rank"


def targeted(config: ModelConfig, path: str) -> bool:
    """Whether the base weight at `path` ('/'-joined) gets an adapter."""
    return config.lora_rank > 0 and re.search(config.lora_targets, path) is not None


def scaling(config: ModelConfig) -> float:
    """PEFT's scaling α / r."""
    return config.lora_alpha / config.lora_rank


def is_adapter(name: str) -> bool:
    return name.endswith(SUFFIXES)


def split(tree: dict, saved: str = "", prefix: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(base, adapters): the tree without its adapter leaves, and a tree of the adapter leaves alone — plus, with
    `saved` (`lora_modules_to_save`), the leaves whose path that regex matches, moved to the second tree."""
    base, adapters = {}, {}
    for key, value in tree.items():
        if isinstance(value, dict):
            b, a = split(value, saved, prefix + (key,))
            if b:
                base[key] = b
            if a:
                adapters[key] = a
        elif is_adapter(key) or (saved and re.search(saved, "/".join(prefix + (key,)))):
            adapters[key] = value
        else:
            base[key] = value
    return base, adapters


def combine(base: dict, adapters: dict) -> dict:
    """The union of two trees with disjoint leaves (the inverse of `split`); shares the leaves, copies nothing."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = combine(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def adapter_pairs(tree: dict, prefix: tuple[str, ...] = ()):
    """Yields (path of the base weight, its parent dict, base name) for every adapted weight in `tree`."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from adapter_pairs(value, prefix + (key,))
        elif key.endswith(SUFFIXES[0]):
            name = key[:-len(SUFFIXES[0])]
            yield prefix + (name,), tree, name


def delta(a: Any, b: Any, stacked: bool) -> np.ndarray:
    """(α/r-less) A·B as a weight: A [(L,) in..., r] · B [(L,) r, out...] → [(L,) in..., out...], float32."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    lead = a.shape[:1] if stacked else ()
    rank = a.shape[-1]
    flat = np.matmul(a.reshape(*lead, -1, rank), b.reshape(*lead, rank, -1))
    return flat.reshape(*a.shape[:-1], *b.shape[1 + len(lead):])


def merged(config: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """(the base config, params with W + (α/r)·A·B in place of each adapted W and no adapters): the function the
    adapted model computes, as a plain model for export. Merged weights are host arrays in `param_dtype` (summed
    in float32), whatever dtype the frozen W was held in."""
    base_config = config.replace(lora_rank=0)
    out = _copy_dicts(params)
    s = scaling(config)
    for path, parent, name in list(adapter_pairs(out)):
        weight = np.asarray(parent[name])
        update = s * delta(parent.pop(name + SUFFIXES[0]), parent.pop(name + SUFFIXES[1]), stacked=path[0] == "layers")
        parent[name] = (weight.astype(np.float32) + update).astype(config.param_dtype)
    return base_config, out


def _copy_dicts(tree: dict) -> dict:
    return {k: _copy_dicts(v) if isinstance(v, dict) else v for k, v in tree.items()}
