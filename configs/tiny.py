"""Tiny LLaMA on CPU: the embedded default of the CLIs (the demo and the tests; about a minute to train).

Without `data.path` the run trains on a synthetic alignment dataset (sajax.data.demo) written into the workdir;
without `tokenizer` and `init_from` it trains the offline demo tokenizer.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # ModelConfig fields (Hugging Face names) plus run-time options. With init_from, only the run-time options
    # (dtype, param_dtype, remat_policy, scan_layers) are used; the architecture comes from the checkpoint.
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
        tie_word_embeddings=False, initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        dtype="float32", param_dtype="float32", remat_policy="none", scan_layers=False))
    config.init_from = ""  # HF LLaMA directory to start from; "" = random init
    config.tokenizer = ""  # tokenizer directory; "" = init_from's, else the offline demo tokenizer
    # Mesh axis sizes; -1 = all remaining devices.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Alignment data: a TFDS directory (splits train/validation) or a JSON/JSONL release-format file.
    config.data = ml_collections.ConfigDict(dict(
        path="", train_split="train", validation_path="", validation_split="validation",
        max_len=64, max_prompt_len=32, num_comp=3, read_threads=2,
        prompt_format="auto",  # query: the dataset's filled template as text; chat: the tokenizer's chat template;
        # auto: chat when the tokenizer has one
        drop_invalid_scores=False,  # True: train without responses whose score is outside 1..rating_scale
        packing=False,  # shared-prompt packing (sajax.data.packing): each prompt once per row, no padding in between
        pack_len=0))  # tokens per packed row (>= max_len); 0: num_comp × max_len
    config.train = ml_collections.ConfigDict(dict(
        objective="stable_alignment",  # stable_alignment | sft | rrhf | dpo
        steps=200, batch_size=8, grad_accum_steps=1,  # batch_size: groups per optimizer step
        epochs=0.0,  # > 0: train this many passes over the data instead of `steps`
        rating_scale=7.0, margin=1.0, ratio=0.2, max_flow=False,  # the score-scaled margin loss
        dpo_beta=0.1,
        loss_chunk_size=64))  # sequence positions per chunk of the output projection + log-softmax
    # LoRA (sajax.model.lora): rank 0 trains every weight; rank > 0 trains adapters of that rank beside the frozen
    # weights whose path (layers_3/self_attn/q_proj; scanned: layers/…; lm_head) the regex `targets` matches, scaled
    # by alpha / rank, with `dropout` on their input, and in full the parameters the regex `modules_to_save`
    # matches (PEFT's; "" = none); base_dtype: the frozen weights' dtype ("" = model.param_dtype).
    config.lora = ml_collections.ConfigDict(dict(
        rank=0, alpha=16.0, targets=r"(q|k|v|o|gate|up|down)_proj$", dropout=0.0, modules_to_save="",
        base_dtype=""))
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8,
        clip_norm=1.0,
        warmup_ratio=0.0))  # > 0: warm up over this share of all steps instead of warmup_steps
    config.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=2))
    config.log_every = 10
    config.eval_every = 100  # 0: only at the end
    config.eval_max_batches = 0  # 0: the whole validation split
    config.peak_flops = 0.0  # per device; 0: known accelerator table, or the measured matmul peak on CPU
    config.generate = ml_collections.ConfigDict(dict(
        prompts=("Is it acceptable to lie to protect a friend's feelings?",
                 "What should you do if you find a lost wallet?"),
        max_new_tokens=32, temperature=0.8, top_k=0, top_p=0.95))
    return config
