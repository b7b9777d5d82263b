"""LoRA: adapters beside frozen weights compute PEFT's function (y = x·W + α/r·(x·A)·B) with PEFT's gradients,
start as the base (B = 0), merge into the base for export, load into `peft` from sajax's adapter folder, are
sharded along their base weight's axes, and train alone under every objective."""

import jax
import numpy as np
import peft
import pytest
import torch

from conftest import make_reference, right_padded_batch, torch_logits, with_overrides
from sajax.config_files import DEFAULT_CONFIG, load_config
from sajax.data import demo, pipeline
from sajax.formats import peft as sajax_peft, tokenizer
from sajax.model import decoder, lora
from sajax.model.config import ModelConfig
from sajax.parallel import sharding
from sajax.train import losses
from sajax.train import step as ts

TOLERANCE = 1e-5  # fp32, logits O(1) (as the family parity tests)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def adapted(request):
    """A random transformers model, the same as a sajax LoRA model (rank 4, α 8) with random A and B, and the
    PEFT model built on the transformers one from sajax's adapter folder."""
    torch_model, config, base = make_reference(seed=5, family=request.param)
    lora_config = config.replace(lora_rank=4, lora_alpha=8.0)
    adapters = jax.tree.map(lambda a: a + 0.05 * np.random.default_rng(a.size).standard_normal(a.shape, np.float32),
                            jax.device_get(decoder.init_adapters(lora_config, 1)))
    return torch_model, lora_config, base, adapters


def test_zero_b_is_the_base_and_a_random_b_matches_peft(adapted, tmp_path):
    torch_model, config, base, adapters = adapted
    ids, mask = right_padded_batch(config.vocab_size)
    valid = mask.astype(bool)
    base_logits = np.asarray(decoder.forward(config.replace(lora_rank=0), base, ids, mask))
    fresh = lora.combine(base, jax.device_get(decoder.init_adapters(config, 1)))
    assert all(not b.any() for path, parent, name in lora.adapter_pairs(fresh) for b in [parent[name + "_lora_b"]])
    # B = 0 contributes exactly 0 to each projection; XLA fuses the extra product differently, hence not bit-equal
    assert np.abs(np.asarray(decoder.forward(config, fresh, ids, mask)) - base_logits)[valid].max() <= 1e-6

    params = lora.combine(base, adapters)
    ours = np.asarray(decoder.forward(config, params, ids, mask))
    assert np.abs(ours - base_logits)[valid].max() > 0.1  # the adapters matter
    folder = sajax_peft.save_adapter(config, params, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(torch_model, folder).eval()
    assert np.abs(ours - torch_logits(peft_model, ids, mask))[valid].max() <= TOLERANCE
    merged_config, merged = lora.merged(config, params)
    assert merged_config == config.replace(lora_rank=0) and not lora.split(merged)[1]
    assert np.abs(np.asarray(decoder.forward(merged_config, merged, ids, mask)) - ours)[valid].max() <= TOLERANCE
    stacked = decoder.stack_layers(params, config.num_hidden_layers)  # scanned layers: the same function
    scanned = config.replace(scan_layers=True)
    assert np.abs(np.asarray(decoder.forward(scanned, stacked, ids, mask)) - ours)[valid].max() <= TOLERANCE
    np.testing.assert_allclose(decoder.forward(*lora.merged(scanned, jax.device_get(stacked)), ids, mask), ours,
                               atol=TOLERANCE)
    peft_model.unload()


def test_adapter_gradients_equal_peft(adapted, tmp_path):
    """∂(mean token NLL)/∂(A, B) against PEFT's autograd, every adapter of every layer."""
    torch_model, config, base, adapters = adapted
    ids, mask = right_padded_batch(config.vocab_size)
    folder = sajax_peft.save_adapter(config, lora.combine(base, adapters), tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(torch_model, folder, is_trainable=True)
    labels = torch.as_tensor(np.where(mask == 1, ids, -100), dtype=torch.long)
    loss = peft_model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                      attention_mask=torch.as_tensor(mask, dtype=torch.long), labels=labels).loss
    loss.backward()
    theirs = {name.removeprefix("base_model.model.").replace(".default", ""): p.grad.numpy()
              for name, p in peft_model.named_parameters() if p.grad is not None}

    def mean_nll(trainable):
        logits = decoder.forward(config, lora.combine(base, trainable), ids, mask)[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jax.numpy.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        weights = mask[:, 1:]
        return -(picked * weights).sum() / weights.sum()

    ours = sajax_peft.adapter_state(config, jax.grad(mean_nll)(adapters))
    assert set(ours) == {f"base_model.model.{k}" for k in theirs}
    for name, grad in ours.items():
        expected = theirs[name.removeprefix("base_model.model.")]
        np.testing.assert_allclose(grad, expected, rtol=0, atol=2e-6 * np.abs(expected).max() + 1e-9, err_msg=name)
    peft_model.unload()


def test_regexes_pick_layers_the_output_layer_and_full_modules_and_peft_follows(tmp_path):
    """targets: q/v of layers 0 and 2 and the output layer; modules_to_save: the final norm, trained in full."""
    torch_model, config, base = make_reference(seed=6, num_hidden_layers=3)
    config = config.replace(lora_rank=2, lora_targets=r"layers_(0|2)/self_attn/(q|v)_proj$|lm_head$",
                            lora_modules_to_save=r"^norm/weight$")
    adapters = jax.tree.map(lambda a: a + 0.05, jax.device_get(decoder.init_adapters(config, 0)))
    assert sorted("/".join(p) for p, _, _ in lora.adapter_pairs(adapters)) == [
        "layers_0/self_attn/q_proj", "layers_0/self_attn/v_proj", "layers_2/self_attn/q_proj",
        "layers_2/self_attn/v_proj", "lm_head"]
    assert config.num_params() == sum(x.size for x in jax.tree.leaves(lora.combine(base, adapters)))
    params = lora.combine({**base, "norm": {"weight": base["norm"]["weight"] * 1.2}}, adapters)
    trained, frozen = ts.split_trainable(config, params)
    assert trained["norm"]["weight"] is params["norm"]["weight"] and "norm" not in frozen
    folder = sajax_peft.save_adapter(config, params, tmp_path / "adapter")
    ids, mask = right_padded_batch(config.vocab_size)
    peft_model = peft.PeftModel.from_pretrained(torch_model, folder).eval()
    assert sorted(n for n, _ in peft_model.named_modules() if n.endswith("lora_A")) == [
        "base_model.model.lm_head.lora_A"] + [
        f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_A" for i in (0, 2) for p in ("q", "v")]
    ours = np.asarray(decoder.forward(config, params, ids, mask))[mask == 1]
    np.testing.assert_allclose(ours, torch_logits(peft_model, ids, mask)[mask == 1], atol=TOLERANCE)
    hidden = decoder.hidden_states(config, params, ids, mask)  # the trainer's path: the adapter in the head
    np.testing.assert_allclose(np.asarray(hidden @ decoder.output_weights(config, params))[mask == 1], ours,
                               atol=TOLERANCE)
    merged_config, merged = lora.merged(config, params)
    np.testing.assert_allclose(np.asarray(decoder.forward(merged_config, merged, ids, mask))[mask == 1], ours,
                               atol=TOLERANCE)
    with pytest.raises(ValueError, match="lora.modules_to_save 'nothing' matches no parameter path"):
        decoder.check_lora(config.replace(lora_modules_to_save="nothing"))
    with pytest.raises(ValueError, match="lm_head is both a LoRA target .* and trained in full"):
        decoder.check_lora(config.replace(lora_modules_to_save="lm_head$"))
    with pytest.raises(ValueError, match="adapts lm_head, which takes no lora.dropout"):
        decoder.check_lora(config.replace(lora_dropout=0.1))
    with pytest.raises(ValueError, match=r"lora.targets 'attn/qq_proj' matches no projection of the model"):
        decoder.check_lora(config.replace(lora_targets="attn/qq_proj"))
    with pytest.raises(ValueError, match="lora.rank must be an integer >= 0"):
        config.replace(lora_rank=-1)
    with pytest.raises(ValueError, match="lora.dropout must be in"):
        config.replace(lora_dropout=1.0)


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
def test_every_objective_trains_the_adapters_alone_sharded_along_the_base(objective):
    config = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, lora_rank=4, lora_dropout=0.1,
                         lora_modules_to_save=r"^norm/weight$")
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    specs = decoder.param_shardings(config, mesh)["layers_0"]
    assert specs["self_attn"]["q_proj_lora_a"].spec == jax.sharding.PartitionSpec("fsdp", None)
    assert specs["self_attn"]["q_proj_lora_b"].spec == jax.sharding.PartitionSpec(None, "tensor", None)
    assert specs["mlp"]["down_proj_lora_a"].spec == jax.sharding.PartitionSpec("tensor", None)
    cfg = with_overrides(load_config(DEFAULT_CONFIG), **{"train.objective": objective, "train.batch_size": 4,
                                                         "optimizer.warmup_steps": 0})
    tok = tokenizer.demo_tokenizer(512)
    encoder = pipeline.GroupEncoder(tok, 32, 16, 3)
    rng = np.random.default_rng(0)
    batch = pipeline.stack([encoder.encode(g, [0, 1, 2], rng.normal(-30, 5, 3)) for g in demo.synthetic_groups(4, 2)])
    tx = ts.make_optimizer(cfg.optimizer, 10, config)
    specs = lambda tree: jax.tree.map(lambda s: s.spec, tree)  # noqa: E731
    assert specs(ts.state_shardings(config, tx, mesh).params) == specs(
        lora.split(decoder.param_shardings(config, mesh), config.lora_modules_to_save)[1])
    mesh = sharding.make_mesh(devices=jax.devices()[:1])  # one device: the step itself (a faster compile)
    shardings = ts.state_shardings(config, tx, mesh)
    trainable, frozen = ts.split_trainable(config, jax.device_put(decoder.init_params(config, 0),
                                                                  decoder.param_shardings(config, mesh)))
    frozen_before = jax.device_get(frozen)
    with sharding.activation_rules(mesh):
        state = ts.init_state(trainable, tx, shardings)
        step = ts.make_train_step(config, cfg.train, tx, ts.learning_rate_schedule(cfg.optimizer, 10), mesh,
                                  shardings)
        before = jax.device_get(state.params)
        state, metrics = step(state, pipeline.to_global(batch, mesh), frozen)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    after = jax.device_get(state.params)
    assert jax.tree.structure(after) == jax.tree.structure(before)  # the state holds the adapters only
    # B starts at 0, so the first step moves every B (A's gradient is ∝ B: 0 at step 0)
    assert all(not np.array_equal(parent_after[name + "_lora_b"], parent_before[name + "_lora_b"])
               for (_, parent_after, name), (_, parent_before, _) in zip(lora.adapter_pairs(after),
                                                                         lora.adapter_pairs(before)))
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(frozen), frozen_before))
    assert len(jax.tree.leaves(after)) == 2 * 7 * 2 + 1  # A and B of 7 projections in 2 layers, the final norm
    assert not np.array_equal(after["norm"]["weight"], before["norm"]["weight"])
