"""LLaMA-3.1-8B-scale Stable Alignment run on a TPU pod slice or a multi-GPU cluster.

    sajax-train --config configs/llama3_8b.py --workdir gs://bucket/run1 \\
        --config.init_from=/path/to/Llama-3.1-8B-Instruct --config.data.path=/path/to/alignment_tfds

With init_from set, the architecture is read from the checkpoint's config.json; the model section below is the
same architecture, for random-init runs and for the shape check in the tests. Parameters and optimizer state
are split over `fsdp` (all devices by default); compute is bfloat16, parameters float32.
"""

from pathlib import Path

import ml_collections

from sajax.config_files import load_config


def get_config() -> ml_collections.ConfigDict:
    config = load_config(Path(__file__).with_name("tiny.py"))  # the same sections, scaled up below
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=128000, eos_token_id=128009, pad_token_id=None,
        dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_layers=True))
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    config.data.max_len = 1024
    config.data.max_prompt_len = 512
    config.data.num_comp = 3
    config.data.read_threads = 8
    config.train.steps = 2000
    config.train.batch_size = 64
    config.train.grad_accum_steps = 1
    config.train.loss_chunk_size = 256
    config.optimizer.learning_rate = 2e-5
    config.optimizer.warmup_steps = 50
    config.optimizer.weight_decay = 0.0
    config.checkpoint.every = 200
    config.checkpoint.keep = 3
    config.log_every = 10
    config.eval_every = 200
    config.eval_max_batches = 50
    return config
