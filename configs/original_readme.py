"""The original Stable Alignment run, by name: the hyperparameters of the original project's README
(agi-templar/Stable-Alignment, 2023: `torchrun --nproc_per_node=4 train_alignment.py …`).

    sajax-train --config configs/original_readme.py --workdir /runs/sa-original \\
        --config.init_from=/models/hh-rlhf-sft --config.data.path=/data/sandbox_v1.json

Theirs → here: margin 10, ratio 0.2, rating_scale 7, num_comp 3, max_flow False (the score-scaled margin loss);
7 epochs; learning rate 2e-5 with a cosine schedule to 0 after a 3% warmup; weight decay 0; AdamW (β2 0.999)
with gradient clipping at 1.0 (HF Trainer's defaults); 4 GPUs × 1 group × 8 accumulation steps = 32 groups per
optimizer step (`batch_size` 32, `grad_accum_steps` 8); model_max_length 360; bf16 compute over fp32
weights, parameters sharded over every device (their FSDP). They started from a LLaMA-7B model fine-tuned on
HH-RLHF: pass yours as `init_from` (its config replaces the LLaMA-7B architecture below, which only serves
random-init smoke runs). Differences that remain: their loss used the sorted ratings with an unsorted index for
the margins (sajax computes the formula as written, see `sajax.train.losses`), their prompts were not truncated from
the left and their responses got no end-of-sequence token.
"""

from pathlib import Path

import ml_collections

from sajax.config_files import load_config


def get_config() -> ml_collections.ConfigDict:
    config = load_config(Path(__file__).with_name("tiny.py"))  # the same sections, set below
    config.model = ml_collections.ConfigDict(dict(  # LLaMA-7B (v1)
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
        dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_layers=True))
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    config.data.update(dict(max_len=360, max_prompt_len=256, num_comp=3, read_threads=8,  # ≥ 104 response tokens
                            prompt_format="query",  # the Alpaca-filled query as text, as the original trains
                            packing=True))  # each prompt once per row (sajax.data.packing): the same loss, less compute
    config.train.update(dict(objective="stable_alignment", rating_scale=7.0, margin=10.0, ratio=0.2, max_flow=False,
                             epochs=7.0, batch_size=32, grad_accum_steps=8, loss_chunk_size=120))
    config.optimizer.update(dict(learning_rate=2e-5, warmup_ratio=0.03, min_lr_ratio=0.0, weight_decay=0.0, b1=0.9,
                                 b2=0.999, eps=1e-8, clip_norm=1.0))
    config.checkpoint.update(dict(every=200, keep=1))
    config.update(dict(log_every=1, eval_every=200, eval_max_batches=50))
    return config
