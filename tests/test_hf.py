"""HF checkpoint import/export through safetensors, checked against transformers' own loading and saving."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import make_reference, right_padded_batch, torch_logits
from sajax.formats import hf, layout
from sajax.model import decoder
from sajax.model.config import ModelConfig


def _our_logits(config, params, ids, mask):
    return np.asarray(decoder.forward(config, params, ids, mask))


def test_transformers_checkpoint_loads_and_matches(tmp_path, gqa_reference):
    torch_model, _, _ = gqa_reference
    torch_model.save_pretrained(tmp_path)
    config, params = hf.load_pretrained(tmp_path)
    ids, mask = right_padded_batch(config.vocab_size)
    valid = mask.astype(bool)
    diff = np.abs(_our_logits(config, params, ids, mask) - torch_logits(torch_model, ids, mask))[valid]
    assert diff.max() <= 1e-4


def test_sharded_checkpoint_with_index_loads(tmp_path, gqa_reference):
    torch_model, reference_config, reference_params = gqa_reference
    torch_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    config, params = hf.load_pretrained(tmp_path, scan_layers=True)
    assert config == reference_config.replace(scan_layers=True)
    assert params["layers"]["self_attn"]["q_proj"].shape[0] == config.num_hidden_layers
    unrolled = decoder.unstack_layers(params, config.num_hidden_layers)
    assert jax.tree.all(jax.tree.map(np.array_equal, unrolled, reference_params))


@pytest.mark.parametrize("torch_dtype, ours", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_half_precision_checkpoints_load_exactly(tmp_path, gqa_reference, torch_dtype, ours):
    torch_model, _, _ = gqa_reference
    half = transformers.LlamaForCausalLM(torch_model.config).to(torch_dtype)
    half.load_state_dict(torch_model.state_dict())
    half.save_pretrained(tmp_path)
    config, params = hf.load_pretrained(tmp_path)  # upcast to float32
    expected = half.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(params["layers_1"]["mlp"]["down_proj"], expected)
    config16, params16 = hf.load_pretrained(tmp_path, param_dtype=ours)
    assert params16["embed_tokens"].dtype.name == ours and config16.param_dtype == ours
    np.testing.assert_array_equal(params16["embed_tokens"].astype(np.float32), params["embed_tokens"])


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_save_pretrained_loads_in_transformers(tmp_path, layout):
    _, config, params = make_reference(
        seed=3, tie_word_embeddings=True, head_dim=24, num_key_value_heads=1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 20000.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 2.0, "original_max_position_embeddings": 8})
    config = config.replace(scan_layers=True)
    params = decoder.stack_layers(params, config.num_hidden_layers)
    out = hf.save_pretrained(config, params, tmp_path / "export",
                             max_shard_bytes=30_000 if layout == "sharded" else 2**30)
    assert (out / "model.safetensors.index.json").is_file() == (layout == "sharded")
    loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.rope_parameters["rope_type"] == "llama3" and loaded.config.tie_word_embeddings
    ids, mask = right_padded_batch(config.vocab_size)
    valid = mask.astype(bool)
    diff = np.abs(_our_logits(config, params, ids, mask) - torch_logits(loaded, ids, mask))[valid]
    assert diff.max() <= 1e-4
    assert hf.load_pretrained(out)[0] == config.replace(scan_layers=False)


def test_bfloat16_export_round_trips(tmp_path, gqa_reference):
    _, config, params = gqa_reference
    config16 = config.replace(param_dtype="bfloat16")
    params16 = jax.tree.map(lambda a: a.astype("bfloat16"), params)
    hf.save_pretrained(config16, params16, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    _, back = hf.load_pretrained(tmp_path, param_dtype="bfloat16")
    assert jax.tree.all(jax.tree.map(np.array_equal, back, params16))


def test_missing_and_misshapen_tensors_are_named(tmp_path, gqa_reference):
    _, config, params = gqa_reference
    state = layout.hf_state_from_params(config, params)
    broken = dict(state)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.9.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\], "
                                         r"unexpected \['model.layers.9.mlp.up_proj.weight'\]"):
        layout.params_from_hf_state(config, broken)
    misshapen = dict(state, **{"model.norm.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(3,\), the config implies \(64,\)"):
        layout.params_from_hf_state(config, misshapen)


def test_missing_files_are_named(tmp_path, gqa_reference):
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        hf.load_pretrained(tmp_path)
    _, config, _ = gqa_reference
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json line 1 column 2: not valid JSON"):
        hf.load_pretrained(tmp_path)


def test_failed_save_keeps_the_existing_checkpoint(tmp_path, gqa_reference):
    _, config, params = gqa_reference
    hf.save_pretrained(config, params, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    other = {**params, "norm": {"weight": params["norm"]["weight"] * 2}}
    with pytest.raises(OSError, match="disk full"):
        hf.save_pretrained(config, other, tmp_path / "ckpt", tokenizer=BrokenTokenizer())
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind


def test_config_writes_4x_and_5x_rope_keys():
    config = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, rope_theta=5e5,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    d = config.to_hf_dict()
    assert d["rope_theta"] == d["rope_parameters"]["rope_theta"] == 5e5
    assert d["rope_scaling"]["factor"] == d["rope_parameters"]["factor"] == 8.0
    assert ModelConfig.from_hf_dict({k: v for k, v in d.items() if k != "rope_parameters"}) == config


def test_generation_config_eos_ids_are_added(tmp_path, gqa_reference):
    _, config, params = gqa_reference
    hf.save_pretrained(config, params, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9, 10]}))
    assert hf.load_pretrained(tmp_path / "ckpt")[0].eos_token_ids == (2, 9, 10)


def test_save_refuses_a_directory_that_is_not_a_checkpoint_and_keeps_permissions(tmp_path, gqa_reference):
    _, config, params = gqa_reference
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a HF checkpoint directory"):
        hf.save_pretrained(config, params, tmp_path / "notes")
    assert (tmp_path / "notes" / "README.md").read_text() == "mine"
    out = hf.save_pretrained(config, params, tmp_path / "ckpt")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_corrupt_safetensors_is_named(tmp_path, gqa_reference):
    _, config, params = gqa_reference
    hf.save_pretrained(config, params, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        hf.load_pretrained(tmp_path / "ckpt")
