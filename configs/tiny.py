"""Tiny LLaMA on CPU: the embedded default of the CLIs (tests and demos, seconds to run)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # LlamaConfig fields (Hugging Face names) plus run-time options.
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
        tie_word_embeddings=False, initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        dtype="float32", param_dtype="float32", remat_policy="none", scan_layers=False))
    # Mesh axis sizes; -1 = all remaining devices.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Tokenizer directory; "" trains the offline demo tokenizer (SentencePiece BPE, vocab_size pieces).
    config.tokenizer = ""
    config.generate = ml_collections.ConfigDict(dict(
        prompts=("Is it acceptable to lie to protect a friend's feelings?",
                 "What should you do if you find a lost wallet?"),
        max_new_tokens=32, temperature=0.8, top_k=0, top_p=0.95))
    return config
