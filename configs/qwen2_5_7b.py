"""Qwen2.5-7B-scale Stable Alignment run on a TPU pod slice or a multi-GPU cluster (the Qwen2 family: q/k/v biases,
untied output, RoPE base 1e6).

    sajax-train --config configs/qwen2_5_7b.py --workdir gs://bucket/run1 \\
        --config.init_from=/path/to/Qwen2.5-7B-Instruct --config.data.path=/path/to/alignment_tfds
    sajax-compile --config configs/qwen2_5_7b.py --topology v5p:4x4x4     # does it fit, how fast (no TPU needed)

With init_from set, the architecture is read from the checkpoint's config.json; the model section below is the
same architecture (Qwen2.5-7B-Instruct's config.json), for random-init runs, sajax-compile and the shape check in the
tests. Parameters and optimizer state are split over `fsdp` (all devices by default); compute is bfloat16,
parameters float32. `--config.lora.rank=16` trains adapters only (the base frozen, held in `lora.base_dtype`).
"""

from pathlib import Path

import ml_collections

from sajax.config_files import load_config


def get_config() -> ml_collections.ConfigDict:
    config = load_config(Path(__file__).with_name("llama3_8b.py"))  # the same run, another family and size
    config.model = ml_collections.ConfigDict(dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
        dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_layers=True))
    return config
