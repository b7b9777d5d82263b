"""Every family is one decoder with switches, computing the same function as transformers' own class for it:
Qwen2 (q/k/v biases, untied output, sliding-window layers), Qwen3 (q/k RMSNorm, explicit head_dim), Mistral (a
sliding window on every layer), LLaMA with attention biases — logits past the window, both directions of HF I/O,
scanned layers, and cached decoding across the window."""

import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import make_reference, right_padded_batch, torch_logits
from sajax.formats import hf
from sajax.infer import generate
from sajax.model import decoder
from sajax.model.config import ModelConfig

# Windows shorter than the longest rows (24 tokens), so that every sliding layer masks real keys.
FAMILIES = {
    "qwen2": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1, tie_word_embeddings=False),
    "qwen3": dict(head_dim=24, attention_bias=True, use_sliding_window=True, sliding_window=5,
                  layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True),
    "mistral": dict(sliding_window=7, head_dim=12),
    "llama": dict(attention_bias=True, num_key_value_heads=1),
}
# fp32 throughout, logits O(1): what is left is summation order (measured 1.8e-6 to 2.9e-6 here).
TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def reference(request):
    family = request.param
    torch_model, config, params = make_reference(seed=7, family=family, **FAMILIES[family])
    return family, torch_model, config, params


def _max_logit_diff(config, params, torch_model) -> float:
    ids, mask = right_padded_batch(config.vocab_size)
    ours = np.asarray(decoder.forward(config, params, ids, mask))
    return float(np.abs(ours - torch_logits(torch_model, ids, mask))[mask.astype(bool)].max())


def test_the_config_holds_the_family_switches(reference):
    family, _, config, params = reference
    expected = {"qwen2": (True, False, False, (None, "sliding")), "qwen3": (True, True, True, ("sliding", None)),
                "mistral": (False, False, False, ("sliding", "sliding")), "llama": (True, True, False, (None, None))}
    qkv_bias, o_bias, qk_norm, windows = expected[family]
    assert (config.model_type, config.qkv_bias, config.o_bias, config.qk_norm) == (family, qkv_bias, o_bias, qk_norm)
    assert tuple("sliding" if config.is_sliding(i) else None for i in range(2)) == windows
    attention = params["layers_0"]["self_attn"]
    assert ("q_bias" in attention, "o_bias" in attention, "q_norm" in attention) == (qkv_bias, o_bias, qk_norm)
    assert config.num_params() == sum(x.size for x in jax.tree.leaves(params))


def test_logits_equal_transformers_past_the_window(reference):
    _, torch_model, config, params = reference
    assert _max_logit_diff(config, params, torch_model) <= TOLERANCE
    scanned = config.replace(scan_layers=True)  # one layer body: the window is picked per layer at run time
    stacked = decoder.stack_layers(params, config.num_hidden_layers)
    assert _max_logit_diff(scanned, stacked, torch_model) <= TOLERANCE


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_a_window_longer_than_the_rows_changes_nothing(family):
    _, config, params = make_reference(seed=7, family=family, **FAMILIES[family])
    ids, mask = right_padded_batch(config.vocab_size)
    wide = config.replace(sliding_window=ids.shape[1])
    full = ModelConfig.from_hf_dict({**config.to_hf_dict(), "sliding_window": None, "use_sliding_window": False,
                                     "layer_types": None})
    np.testing.assert_array_equal(decoder.forward(wide, params, ids, mask), decoder.forward(full, params, ids, mask))
    assert not np.array_equal(decoder.forward(config, params, ids, mask), decoder.forward(full, params, ids, mask))


def test_hf_folders_round_trip_in_both_directions(reference, tmp_path):
    family, torch_model, config, params = reference
    torch_model.save_pretrained(tmp_path / "theirs")
    loaded_config, loaded = hf.load_pretrained(tmp_path / "theirs")
    assert loaded_config == config
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))
    ours = hf.save_pretrained(config, params, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
    assert type(reloaded) is type(torch_model)
    assert _max_logit_diff(config, params, reloaded) <= TOLERANCE


def test_cached_greedy_decoding_equals_transformers_across_the_window(reference):
    family, torch_model, config, params = reference
    prompts = [[1, 17, 40, 33, 9, 81, 5, 12, 60, 71, 3], [1, 50, 22, 8]]  # left-padded: the rows' slots differ
    ours = generate.generate(config, params, prompts, max_new_tokens=10, temperature=0.0, length_bucket=8)
    stacked = decoder.stack_layers(params, config.num_hidden_layers)
    scanned = generate.generate(config.replace(scan_layers=True), stacked, prompts, max_new_tokens=10,
                                temperature=0.0, length_bucket=8)
    np.testing.assert_array_equal(scanned.tokens, ours.tokens)  # the stacked cache: written once per step
    rows = generate.UNROLLED_DECODE_MIN_BATCH // len(prompts)  # a batch the scanned model decodes unrolled
    unrolled = generate.generate(config.replace(scan_layers=True), stacked, prompts * rows, max_new_tokens=10,
                                 temperature=0.0, length_bucket=8)
    np.testing.assert_array_equal(unrolled.tokens, np.tile(ours.tokens, (rows, 1)))  # each layer's window kept
    for prompt, tokens, length in zip(prompts, ours.tokens, ours.lengths):
        expected = torch_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                        eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens[:length].tolist() == expected[:length]
