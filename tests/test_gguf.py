"""GGUF import: files written here the way llama.cpp's converter writes them (tensor names, reversed dimensions,
q/k rows permuted for its RoPE, norms kept in F32), in every type the gguf package can quantize, loaded back."""

import math

import gguf
import jax
import numpy as np
import pytest

from conftest import make_reference, with_overrides
from sajax.config_files import DEFAULT_CONFIG, load_config
from sajax.formats import layout, loading, tokenizer
from sajax.formats import gguf as sajax_gguf
from sajax.model import decoder
from sajax.model.config import Llama3RopeScaling, ModelConfig
from sajax.train import export, loop

GGUF_NAMES = {hf_name: gguf_name for gguf_name, hf_name in
              (("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"),
               ("output.weight", "lm_head.weight"))}
LAYER = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
         "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj.bias": "attn_q.bias",
         "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
         "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}


def gguf_name(name: str) -> str:
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{LAYER[rest]}"


def write_gguf(path, config: ModelConfig, state: dict, qtype=gguf.GGMLQuantizationType.F32, tokenizer=None,
               rope_freqs=None, raw: dict | None = None):
    """A GGUF file of a HF state dict as llama.cpp's converter writes one (architecture: the config's
    model_type; q/k rows permuted for `llama` only); `raw` maps GGUF names to (bytes array, type) written as they
    are."""
    writer = gguf.GGUFWriter(str(path), arch=config.model_type)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if tokenizer is not None:
        writer.add_tokenizer_model(tokenizer["model"])
        writer.add_token_list(tokenizer["tokens"])
        writer.add_token_types(tokenizer["types"])
        if tokenizer.get("scores"):
            writer.add_token_scores(tokenizer["scores"])
        if tokenizer.get("merges"):
            writer.add_token_merges(tokenizer["merges"])
        writer.add_chat_template(tokenizer["chat_template"])
    for name, array in state.items():
        target = gguf_name(name)
        if raw and target in raw:
            data, kind = raw[target]
            writer.add_tensor(target, data, raw_dtype=kind)
            continue
        array = np.asarray(array, np.float32)
        permuted = config.model_type == "llama"
        if permuted and name.endswith("q_proj.weight"):
            array = sajax_gguf.permute_rows(array, config.num_attention_heads)
        elif permuted and name.endswith("k_proj.weight"):
            array = sajax_gguf.permute_rows(array, config.num_key_value_heads)
        kind = qtype if array.ndim == 2 else gguf.GGMLQuantizationType.F32  # llama.cpp keeps norms in F32
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, array)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(target, array.astype(np.float16))
        else:
            writer.add_tensor(target, gguf.quants.quantize(array, kind), raw_dtype=kind)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def small():
    """A random LLaMA (GQA, untied, widths divisible by the 32-wide quantization blocks) and its HF state."""
    config = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    params = jax.device_get(decoder.init_params(config, 7))
    return config, layout.hf_state_from_params(config, params)


# Quantization error bound per type, relative to the largest |weight|: a block of 32 values quantized to b bits
# moves each value by at most one step, range / (2^b − 1) (8 bits with one scale: max / 127).
BOUNDS = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1 / 127, "Q5_1": 2 / 31, "Q5_0": 2 / 31, "Q4_1": 2 / 15,
          "Q4_0": 2 / 15}


@pytest.mark.parametrize("kind", list(BOUNDS))
def test_every_quantized_type_loads_back(tmp_path, small, kind):
    config, state = small
    path = write_gguf(tmp_path / f"m.{kind}.gguf", config, state, gguf.GGMLQuantizationType[kind])
    loaded_config, params = loading.load_pretrained(path)
    assert loaded_config == config.replace(pad_token_id=None, initializer_range=0.02)  # not in GGUF files
    back = layout.hf_state_from_params(loaded_config, params)
    assert back.keys() == state.keys()
    for name, weight in state.items():
        error = np.abs(back[name] - weight).max()
        bound = BOUNDS[kind] * np.abs(weight).max()
        assert error <= bound + 1e-7, (name, error, bound)  # q/k rows unpermuted, or the error would be O(1)
    if kind == "F32":
        logits = decoder.forward(config, layout.params_from_hf_state(config, state), np.array([[1, 5, 9, 3]]),
                               np.ones((1, 4), np.int32))
        np.testing.assert_array_equal(decoder.forward(loaded_config, params, np.array([[1, 5, 9, 3]]),
                                                    np.ones((1, 4), np.int32)), logits)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_architectures_load_unpermuted_with_biases_and_qk_norms(tmp_path, family):
    torch_model, config, params = make_reference(seed=2, family=family, tie_word_embeddings=family == "qwen3",
                                                 max_position_embeddings=256)
    state = layout.hf_state_from_params(config, params)
    loaded_config, loaded = loading.load_pretrained(write_gguf(tmp_path / f"{family}.gguf", config, state))
    assert loaded_config == config.replace(pad_token_id=None, initializer_range=0.02)  # not in GGUF files
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))


def test_k_quant_tensors_take_the_shape_of_the_file(tmp_path):
    """The gguf package dequantizes Q2_K…Q6_K but cannot quantize them; bytes of each type stand in for a tensor."""
    config = ModelConfig(vocab_size=8, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    state = layout.hf_state_from_params(config, jax.device_get(decoder.init_params(config, 0)))
    rng = np.random.default_rng(0)
    for kind in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        qtype = gguf.GGMLQuantizationType[kind]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, (8, 256 // block * size), dtype=np.uint8)
        data[:, :4] = np.frombuffer(np.float16([0.01, 0.001]).tobytes(), np.uint8)  # finite scales where they sit
        path = write_gguf(tmp_path / f"{kind}.gguf", config, state, raw={"token_embd.weight": (data, qtype)})
        _, params = loading.load_pretrained(path)
        expected = gguf.quants.dequantize(data, qtype)
        assert expected.shape == (8, 256)
        np.testing.assert_array_equal(np.asarray(params["embed_tokens"]), expected)


def test_llama3_rope_factors_and_bad_files_are_named(tmp_path, small):
    config, state = small
    scaling = Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    base = decoder.rope_inverse_frequencies(config.head_dim, config.rope_theta, None)
    factors = base / decoder.rope_inverse_frequencies(config.head_dim, config.rope_theta, scaling)
    assert factors.max() > 1.5  # the scaling changes some frequencies at this head size
    path = write_gguf(tmp_path / "llama3.gguf", config, state, rope_freqs=factors)
    assert loading.load_config(path).rope_scaling == scaling
    odd = write_gguf(tmp_path / "odd.gguf", config, state, rope_freqs=factors * 1.1)
    with pytest.raises(ValueError, match="rope_freqs factors .* match no llama3 RoPE scaling"):
        loading.load_config(odd)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{truncated}: not a readable GGUF file"):
        loading.load_pretrained(truncated)
    wrong = write_gguf(tmp_path / "wrong.gguf", config.replace(hidden_size=32, num_attention_heads=2,
                                                              num_key_value_heads=1, head_dim=32), state)
    with pytest.raises(ValueError, match=r"wrong.gguf: tensor .* has shape"):
        loading.load_pretrained(wrong)


def sentencepiece_vocabulary(model_file) -> dict:
    """The tokenizer metadata llama.cpp writes for a SentencePiece model: pieces, scores and token types."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(sp.get_piece_size())]
    return {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
            "scores": [sp.get_score(i) for i in range(sp.get_piece_size())], "types": kinds,
            "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"}


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_run_initialised_from_a_gguf_exports_a_hf_folder(tmp_path, small, lora_rank):
    """Full fine-tuning, or LoRA adapters on the GGUF's weights (merged into them on export)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(tokenizer.demo_corpus()), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=512, model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, minloglevel=2, num_threads=1)
    reference = tokenizer.load_tokenizer(_folder_with(tmp_path / "sp.model", tmp_path / "reference"))
    config = ModelConfig.from_dict(load_config(DEFAULT_CONFIG).model)
    state = layout.hf_state_from_params(config, jax.device_get(decoder.init_params(config, 3)))
    path = write_gguf(tmp_path / "tiny.gguf", config, state, tokenizer=sentencepiece_vocabulary(tmp_path / "sp.model"))
    from_gguf = tokenizer.load_tokenizer(path)
    for text in ("kindly help a neighbour", "Rating: 7 ### Reason: fair.", "  two  spaces, digits 2026\n"):
        assert from_gguf.encode(text) == reference.encode(text)  # the same SentencePiece model, BOS added
    cfg = with_overrides(load_config(DEFAULT_CONFIG), **{"init_from": str(path), "train.steps": 1, "eval_every": 0,
                                                         "optimizer.learning_rate": 0.0, "optimizer.weight_decay": 0.0,
                                                         "checkpoint.every": 1, "lora.rank": lora_rank})
    loop.run(cfg, tmp_path / "wd")
    out, _ = export.export(str(tmp_path / "wd"), str(tmp_path / "hf"))
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".json" and "token" not in p.name) == [
        "config.json", "generation_config.json"]
    exported_config, params = loading.load_pretrained(out)
    assert math.isclose(exported_config.rope_theta, config.rope_theta)
    for name, weight in layout.hf_state_from_params(exported_config, params).items():
        np.testing.assert_array_equal(weight, state[name])  # F32 file, learning rate 0 (LoRA: B = 0): the same
    assert tokenizer.load_tokenizer(out).encode("kindly help") == reference.encode("kindly help")


def _folder_with(model_file, folder):
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model_file.read_bytes())
    return folder
