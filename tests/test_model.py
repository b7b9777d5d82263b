"""The Flax LLaMA against transformers' PyTorch LlamaForCausalLM, and its layout options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import make_reference, right_padded_batch, torch_logits
from sajax.formats import layout
from sajax.model import decoder
from sajax.model.config import Llama3RopeScaling, ModelConfig

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

PARITY_CONFIGS = {
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "head_dim_llama3_untied": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                   rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
    "mha_theta_3layers": dict(num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=3,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, rms_norm_eps=1e-5),
    "gqa_headdim_llama3_tied": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=12,
                                    rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_match_transformers(name):
    torch_model, config, params = make_reference(seed=7, **PARITY_CONFIGS[name])
    ids, mask = right_padded_batch(config.vocab_size)
    expected = torch_logits(torch_model, ids, mask)
    got = np.asarray(decoder.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert np.abs(expected[valid]).max() > 1.0  # logits are large enough for the bound to mean something
    assert np.abs(got - expected)[valid].max() <= 1e-4


def test_config_kinds_are_covered():
    configs = [make_reference(**kw)[1] for kw in PARITY_CONFIGS.values()]
    assert any(c.num_key_value_heads < c.num_attention_heads for c in configs)
    assert any(c.head_dim != c.hidden_size // c.num_attention_heads for c in configs)
    assert any(c.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 16) for c in configs)
    assert {c.tie_word_embeddings for c in configs} == {True, False}


@pytest.mark.parametrize("options", [dict(scan_layers=True), dict(remat_policy="full"),
                                     dict(scan_layers=True, remat_policy="dots_no_batch")])
def test_scan_and_remat_give_same_logits(gqa_reference, options):
    _, config, params = gqa_reference
    ids, mask = right_padded_batch(config.vocab_size)
    expected = np.asarray(decoder.forward(config, params, ids, mask))
    variant = config.replace(**options)
    variant_params = decoder.stack_layers(params, config.num_hidden_layers) if variant.scan_layers else params
    got = np.asarray(decoder.forward(variant, variant_params, ids, mask))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_scanned_params_have_layer_axis_and_logical_names():
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, scan_layers=True)
    shapes = decoder.param_shapes(config)
    assert shapes["layers"]["self_attn"]["q_proj"].shape == (3, 32, 4, 8)
    axes = decoder.param_logical_axes(config)
    assert tuple(axes["layers"]["self_attn"]["k_proj"]) == ("layers", "embed", "kv_heads", "head_dim")
    assert tuple(axes["embed_tokens"]) == ("vocab", "embed")
    assert tuple(axes["lm_head"]) == ("embed", "vocab")
    assert tuple(axes["layers"]["mlp"]["down_proj"]) == ("layers", "mlp", "embed")
    # every parameter has one logical name per dimension
    specs = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert [len(s) for s in specs] == [x.ndim for x in jax.tree.leaves(shapes)]


def test_init_params_count_and_dtype():
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, param_dtype="bfloat16", dtype="bfloat16")
    params = decoder.init_params(config, 0)
    leaves = jax.tree.leaves(params)
    assert sum(x.size for x in leaves) == config.num_params()
    assert {x.dtype for x in leaves} == {jnp.dtype("bfloat16")}
    logits = decoder.forward(config, params, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_padding_does_not_change_real_positions(gqa_reference):
    _, config, params = gqa_reference
    ids, mask = right_padded_batch(config.vocab_size, lengths=(12, 12))
    short = np.asarray(decoder.forward(config, params, ids[:1, :12], mask[:1, :12]))
    padded_ids = np.concatenate([ids[:1, :12], np.full((1, 20), 5, np.int32)], axis=1)
    padded_mask = np.concatenate([mask[:1, :12], np.zeros((1, 20), np.int32)], axis=1)
    long = np.asarray(decoder.forward(config, params, padded_ids, padded_mask))
    np.testing.assert_allclose(long[:, :12], short, atol=1e-5, rtol=0)


def test_hf_config_layouts_4x_and_5x():
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    legacy = ModelConfig.from_hf_dict({**base, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}, "eos_token_id": [128001, 128009]})
    modern = ModelConfig.from_hf_dict({**base, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, "eos_token_id": [128001, 128009]})
    assert legacy == modern
    assert legacy.rope_theta == 500000.0 and legacy.rope_scaling.factor == 32.0
    assert legacy.eos_token_ids == (128001, 128009)
    assert ModelConfig.from_hf_dict(legacy.to_hf_dict()) == legacy


@pytest.mark.parametrize("hf_dict, message", [
    ({"model_type": "gemma"}, "model_type is 'gemma'; supported: \\['llama', 'mistral', 'qwen2', 'qwen3'\\]"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
      "layer_types": ["sliding_attention", "full_attention"]},
     "layer_types must list .full_attention. or .sliding_attention. for each of the 1 layers"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope scaling type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, "lacks field 'low_freq_factor'"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
])
def test_bad_hf_config_is_named(hf_dict, message):
    base = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2}
    with pytest.raises(ValueError, match=message) as info:
        ModelConfig.from_hf_dict({**base, **hf_dict}, source="ckpt/config.json")
    assert "ckpt/config.json" in str(info.value)


def test_unknown_model_field_is_named():
    with pytest.raises(ValueError, match=r"config.model: unknown field\(s\) \['hiden_size'\]"):
        ModelConfig.from_dict({"hiden_size": 3})


def test_rope_llama3_frequencies_scale_only_long_wavelengths():
    plain = decoder.rope_inverse_frequencies(64, 500000.0, None)
    scaled = decoder.rope_inverse_frequencies(64, 500000.0, Llama3RopeScaling(8.0, 1.0, 4.0, 8192))
    wavelength = 2 * np.pi / plain
    np.testing.assert_array_equal(scaled[wavelength < 8192 / 4], plain[wavelength < 8192 / 4])
    np.testing.assert_allclose(scaled[wavelength > 8192], plain[wavelength > 8192] / 8.0, rtol=1e-6)


def test_hf_state_round_trip_is_exact(gqa_reference):
    _, config, params = gqa_reference
    back = layout.params_from_hf_state(config, layout.hf_state_from_params(config, params))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), params, back))


def test_gradients_match_transformers(gqa_reference):
    """∂(mean next-token NLL)/∂params against torch's autograd, on right-padded rows of 70 tokens: three query
    blocks of the blocked causal attention (its custom VJP), the last one partial, and padding queries."""
    torch_model, config, params = gqa_reference
    ids, mask = right_padded_batch(config.vocab_size, lengths=(70, 53, 33, 1))
    assert len(decoder.query_blocks(70, decoder.causal_block_size(70))) == 3

    def loss(p):
        logits = decoder.forward(config, p, ids, mask)[:, :-1]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    grads = layout.hf_state_from_params(config, jax.grad(loss)(params))
    torch_model.zero_grad(set_to_none=True)
    labels = torch.as_tensor(np.where(mask == 1, ids, -100), dtype=torch.long)
    torch_model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                labels=labels).loss.backward()
    for name, p in torch_model.named_parameters():
        expected = p.grad.numpy()
        np.testing.assert_allclose(grads[name], expected, atol=2e-6 * np.abs(expected).max(), rtol=0, err_msg=name)
