"""Shared-prompt packing (`sajax.data.packing`) equals the padded layout: the same per-response NLLs, and so the same
losses, metrics and gradients for every objective, with ragged K, truncated prompts and responses, several
groups per row, groups split over rows, gradient accumulation and device blocks."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sajax.config_files import load_module
from sajax.data import alignment, packing, pipeline
from sajax.formats import tokenizer
from sajax.model import decoder
from sajax.model.config import ModelConfig
from sajax.parallel import sharding
from sajax.train import losses, reference
from sajax.train import step as ts

MAX_LEN, MAX_PROMPT = 40, 12
WORDS = "people share the road kindly and help others when they can because trust grows slowly".split()


@pytest.fixture(scope="module")
def encoder():
    tok = tokenizer.demo_tokenizer(400)
    return pipeline.GroupEncoder(tok, MAX_LEN, MAX_PROMPT, num_comp=3)


def _text(rng, words):
    return " ".join(rng.choice(WORDS, size=words))


@pytest.fixture(scope="module")
def groups(encoder):
    """8 groups: 1, 2 or 3 responses; prompts of 3–20 words; responses of 1–30 words, so some rows truncate the
    response and some keep a shorter prompt tail than their group's short responses do."""
    rng = np.random.default_rng(3)
    out = []
    for g in range(8):
        count = (1, 2, 3, 3)[g % 4]
        group = {"query": _text(rng, int(rng.integers(3, 21))),
                 "responses": [_text(rng, int(rng.integers(1, 31))) for _ in range(count)],
                 "scores": rng.integers(1, 8, count).astype(np.float32)}
        encoded = encoder.encode(group, list(range(count)))
        encoded["reference_logp"][:count] = -rng.uniform(5, 40, count)
        out.append(encoded)
    return out


@pytest.fixture(scope="module")
def params():
    config = ModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    return config, decoder.init_params(config, 5)


def _train_cfg(objective, accumulate=1):
    cfg = load_module(Path(__file__).resolve().parent.parent / "configs" / "tiny.py").get_config()
    cfg.train.update(objective=objective, grad_accum_steps=accumulate, loss_chunk_size=8)
    return cfg.train


def _packed(groups, encoder, row_len=96, blocks=1, micro_batches=1):
    packer = packing.Packer(row_len, encoder.num_comp, encoder.pad_id, blocks=blocks, micro_batches=micro_batches)
    out = packer(groups)
    return packing.flatten(out, packing.rows_of(out) + 1)  # one all-padding row more per block: must not matter


def test_the_data_exercises_truncation_and_shared_prompts(groups, encoder):
    units = [packing.units_of(group, i) for i, group in enumerate(groups)]
    assert any(len(u) > 1 for u in units)  # responses of one group kept different prompt tails
    assert any(len(r) > 1 for us in units for u in us for _, r in u.responses if len(u.responses) > 1)
    assert any(group["attention_mask"].sum(-1).max() == MAX_LEN for group in groups)  # truncated rows
    packed = _packed(groups, encoder, row_len=3 * MAX_LEN)  # no unit is split at this length
    padded_tokens = sum(int(g["attention_mask"].sum()) for g in groups)
    # each prompt once per unit: Σ over units of prompt + Σ (1 + response) tokens
    assert packing.non_padding_tokens(packed) == sum(u.length for us in units for u in us) < padded_tokens
    raw = packing.Packer(3 * MAX_LEN, encoder.num_comp, encoder.pad_id)(groups)
    assert packing.rows_of(raw) * 3 * MAX_LEN < pipeline.stack(groups)["tokens"].size  # fewer positions
    assert (packed["segment_ids"].max(axis=1) > 1).any()  # several units share a row


def test_split_unit_repeats_its_prompt_and_bad_row_length_is_named(groups, encoder):
    unit = next(u for i, g in enumerate(groups) for u in packing.units_of(g, i) if len(u.responses) == 3)
    pieces = packing.split_to_fit(unit, max(len(unit.prompt) + len(r) for _, r in unit.responses))
    assert len(pieces) > 1 and all(p.prompt == unit.prompt for p in pieces)
    assert [r for p in pieces for r in p.responses] == list(unit.responses)
    with pytest.raises(ValueError, match="pack_len 8; pack_len must be >= data.max_len"):
        packing.Packer(8, encoder.num_comp, encoder.pad_id)(groups)


@pytest.mark.parametrize("window", [None, 7])
def test_response_nll_equals_padded_layout(groups, encoder, params, window):
    """With a sliding window (7 positions, shorter than most rows) too, in rows of 3 responses: the window counts
    positions, which restart after the prompt in every span of a packed row as they do in its padded row."""
    config, p = params
    row_len = 64
    if window is not None:
        config, row_len = config.replace(model_type="mistral", sliding_window=window), 3 * MAX_LEN
    padded = ts.response_nll(config, p, pipeline.stack(groups), 8)
    packed = ts.response_nll(config, p, _packed(groups, encoder, row_len=row_len), 8)
    np.testing.assert_array_equal(packed.count, padded.count)
    np.testing.assert_allclose(packed.total, padded.total, rtol=1e-5, atol=1e-5)


def _assert_grads_equal(got, expected_tree):
    for (path, g), expected in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(expected_tree)):
        expected = np.asarray(expected)
        np.testing.assert_allclose(g, expected, rtol=0, atol=1e-5 * np.abs(expected).max(),
                                   err_msg=jax.tree_util.keystr(path))


def _assert_sums_equal(packed, padded):
    loss, metrics = losses.reduce(packed)
    loss_padded, metrics_padded = losses.reduce(padded)
    assert float(packed.loss.count) == float(padded.loss.count) > 0
    np.testing.assert_allclose(loss, loss_padded, rtol=1e-5)
    assert metrics.keys() == metrics_padded.keys()
    for name in metrics:
        np.testing.assert_allclose(metrics[name], metrics_padded[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_every_objective_has_the_loss_metrics_and_gradient_of_the_padded_layout(groups, encoder, params):
    """Every objective is a function of the per-response NLL sums, so ∇L = J_nllᵀ · ∂L/∂nll: one compiled VJP
    of the NLLs per layout serves all four objectives (fp32; the NLLs differ only in summation order, ≈1e-7)."""
    config, p = params
    layouts = {"padded": pipeline.stack(groups), "packed": _packed(groups, encoder)}

    @jax.jit
    def nll_and_vjp(params, batch, cotangent):  # (NLL totals, counts) [B, K] and cotangent · ∂totals/∂params
        def nll(q):
            ratio = ts.response_nll(config, q, batch, 8)
            return ratio.total, ratio.count
        total, vjp, count = jax.vjp(nll, params, has_aux=True)
        return total, count, vjp(cotangent)[0]

    zeros = jnp.zeros((len(groups), encoder.num_comp))
    nlls = {name: nll_and_vjp(p, batch, zeros)[:2] for name, batch in layouts.items()}  # the same for every objective
    for objective in losses.OBJECTIVES:
        train_cfg = _train_cfg(objective)
        out = {}
        for name, batch in layouts.items():
            def total(nll_total, count, batch=batch):
                sums = losses.objective(objective, losses.Ratio(nll_total, count), batch["scores"], batch["valid"],
                                        batch["reference_logp"], rating_scale=train_cfg.rating_scale,
                                        margin=train_cfg.margin, ratio=train_cfg.ratio, max_flow=train_cfg.max_flow,
                                        dpo_beta=train_cfg.dpo_beta)
                return sums.loss.total, sums
            d_nll, sums = jax.grad(total, has_aux=True)(*nlls[name])
            out[name] = (sums, nll_and_vjp(p, batch, d_nll)[2])
        _assert_sums_equal(out["packed"][0], out["padded"][0])
        _assert_grads_equal(out["packed"][1], out["padded"][1])


def test_accumulated_step_on_device_blocks_equals_the_padded_layout(groups, encoder, params):
    """The train step's own path: 2 micro-batches, groups packed per device block (2 blocks)."""
    config, p = params
    train_cfg = _train_cfg("stable_alignment", accumulate=2)
    step = jax.jit(lambda params, batch: ts.accumulated_gradients(params, batch, config=config,
                                                                  train_cfg=train_cfg))
    grads_padded, sums_padded = step(p, pipeline.stack(groups))
    grads_packed, sums_packed = step(p, _packed(groups, encoder, blocks=2, micro_batches=2))
    _assert_sums_equal(sums_packed, sums_padded)
    _assert_grads_equal(grads_packed, grads_padded)


def test_eval_sums_equal_padded_layout(groups, encoder, params):
    config, p = params
    padded = ts.eval_sums(p, pipeline.stack(groups), config=config, chunk_size=8)
    packed = ts.eval_sums(p, _packed(groups, encoder), config=config, chunk_size=8)
    for name in padded:
        np.testing.assert_allclose(packed[name].total, padded[name].total, rtol=1e-5)
        assert float(packed[name].count) == float(padded[name].count)


def test_packed_mask_is_causal_within_a_span_and_its_prompt():
    segment = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 0]])
    span = jnp.array([[0, 1, 1, 2, 2, 0, 3, 3, 0]])
    mask = np.asarray(decoder.packed_attention_mask(segment, span))[0].astype(int)
    expected = np.array([[1, 0, 0, 0, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0, 0, 0, 0],
                         [1, 0, 0, 1, 0, 0, 0, 0, 0],
                         [1, 0, 0, 1, 1, 0, 0, 0, 0],
                         [0, 0, 0, 0, 0, 1, 0, 0, 0],
                         [0, 0, 0, 0, 0, 1, 1, 0, 0],
                         [0, 0, 0, 0, 0, 1, 1, 1, 0],
                         [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, expected)


def test_packed_reference_logps_equal_one_response_per_row(params, tmp_path):
    """DPO's reference scoring packed (records split into groups of num_comp = 2 responses, a record of 3
    responses into 2 groups) against one padded row per response."""
    config, p = params
    rng = np.random.default_rng(4)
    records = [{"query": _text(rng, int(rng.integers(3, 21))),
                "responses": [_text(rng, int(rng.integers(1, 31))) for _ in range((1, 3, 2)[i % 3])],
                "scores": [3.0] * (1, 3, 2)[i % 3]} for i in range(7)]
    (tmp_path / "release.json").write_text(json.dumps(records))
    source = alignment.GroupSource(tmp_path / "release.json")
    encoder = pipeline.GroupEncoder(tokenizer.demo_tokenizer(400), MAX_LEN, MAX_PROMPT, num_comp=2)
    mesh = sharding.make_mesh()
    with sharding.activation_rules(mesh):
        padded = reference.compute(p, config, encoder, source, mesh, batch_size=8, chunk_size=8)
        packed = reference.compute(p, config, encoder, source, mesh, batch_size=8, chunk_size=8, pack_len=64)
    np.testing.assert_array_equal(packed.offsets, padded.offsets)
    assert len(padded.values) == 13
    np.testing.assert_allclose(packed.values, padded.values, rtol=1e-5)
