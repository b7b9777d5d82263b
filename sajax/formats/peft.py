"""LoRA adapters ⇄ PEFT's adapter folder (`adapter_config.json` + `adapter_model.safetensors`), which
`peft.PeftModel.from_pretrained(base_model, folder)` loads onto the transformers model of the base.

Names and layouts (PEFT's `nn.Linear` weights are [out, in]; ours keep the base weight's axes):
  <name>_lora_a [in..., r]  → base_model.model.<HF module>.lora_A.weight [r, in]
  <name>_lora_b [r, out...] → base_model.model.<HF module>.lora_B.weight [out, r]
with <HF module> the base weight's HF name without `.weight` (`model.layers.3.self_attn.q_proj`), and in / out
flattened in HF's order (q_proj's out is heads-major H·E, o_proj's in likewise). `target_modules` lists every
adapted module by its full name, so PEFT adapts exactly those (a regex over our paths can pick layers).
Parameters trained in full (`lora_modules_to_save`) are stored as PEFT stores its `modules_to_save`:
`base_model.model.<HF name>` in HF's layout, their modules listed in `modules_to_save`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from sajax import fileutil
from sajax.formats import layout
from sajax.model import decoder, lora
from sajax.model.config import ModelConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def adapter_state(config: ModelConfig, params) -> dict[str, np.ndarray]:
    """PEFT name → array of every adapter in `params` (either layer layout) and every `lora_modules_to_save`
    parameter, float32."""
    params = jax.device_get(params)
    if config.scan_layers:
        params = decoder.unstack_layers(params, config.num_hidden_layers)
    entries = layout.entries(config.replace(lora_rank=0, scan_layers=False))
    hf_names = {entry.path: entry.hf_name for entry in entries}
    out = {}
    if config.lora_modules_to_save:
        _, saved = lora.split(lora.split(params)[0], config.lora_modules_to_save)
        for entry in entries:
            node = saved
            for key in entry.path:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            if not isinstance(node, dict):
                out[f"base_model.model.{entry.hf_name}"] = np.ascontiguousarray(
                    entry.to_hf(np.asarray(node, np.float32)))
    for path, parent, name in lora.adapter_pairs(params):
        module = hf_names[path].removesuffix(".weight")
        a = np.asarray(parent[name + lora.SUFFIXES[0]], np.float32)
        b = np.asarray(parent[name + lora.SUFFIXES[1]], np.float32)
        rank = a.shape[-1]
        out[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
        out[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)
    return out


def save_adapter(config: ModelConfig, params, path: str | os.PathLike, base_model: str = "") -> Path:
    """Writes the adapters of `params` as a PEFT LoRA folder at `path` (written aside, then renamed; an existing
    folder that is not a PEFT adapter is refused). `base_model`: recorded as `base_model_name_or_path`."""
    if config.lora_rank == 0:
        raise ValueError("the run has no LoRA adapters (lora.rank is 0); export the model itself instead")
    path = Path(path).resolve()
    if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{path}: exists and is not a PEFT adapter folder; refusing to replace it")
    state = adapter_state(config, params)
    modules = sorted({name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for name in state
                      if ".lora_" in name})
    saved = sorted({name.removeprefix("base_model.model.").rsplit(".", 1)[0] for name in state if ".lora_" not in name})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": config.lora_rank, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": saved or None, "inference_mode": True,
    }
    with fileutil.replace_directory(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return path
