"""KV-cache decoding, sampling and continuation scoring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import torch_logits
from sajax.infer import generate
from sajax.model import decoder


def _prompts(vocab_size, lengths=(5, 11, 2), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, n).tolist() for n in lengths]


def test_cached_decoding_logits_equal_full_forward(gqa_reference):
    _, config, params = gqa_reference
    prompts = _prompts(config.vocab_size)
    continuation = np.random.default_rng(1).integers(3, config.vocab_size, (3, 6)).astype(np.int32)
    ids, mask = generate.left_pad(prompts, pad_id=0, length_bucket=16)
    full_ids = np.concatenate([ids, continuation], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(continuation)], axis=1)
    expected = np.asarray(decoder.forward(config, params, full_ids, full_mask))

    llama = decoder.CausalLM(config)
    prompt_len, total = ids.shape[1], full_ids.shape[1]
    cache = decoder.init_cache(config, 3, total)
    key_mask = np.zeros((3, total), np.int32)
    key_mask[:, :prompt_len] = mask
    positions = np.asarray(decoder.positions_from_mask(full_mask))
    logits, cache = llama.apply({"params": params}, ids, positions[:, :prompt_len], key_mask, cache, 0)
    valid = mask.astype(bool)
    assert np.abs(np.asarray(logits) - expected[:, :prompt_len])[valid].max() <= 1e-5
    step = jax.jit(lambda cache, token, pos, key_mask, index: llama.apply(
        {"params": params}, token, pos, key_mask, cache, index))
    for t in range(continuation.shape[1]):
        slot = prompt_len + t
        key_mask[:, slot] = 1
        logits, cache = step(cache, continuation[:, t:t + 1], positions[:, slot:slot + 1], key_mask, slot)
        assert np.abs(np.asarray(logits[:, 0]) - expected[:, slot]).max() <= 1e-5, f"decode step {t}"


def test_greedy_equals_transformers_generate_with_per_row_eos(gqa_reference):
    torch_model, config, params = gqa_reference
    prompts = _prompts(config.vocab_size, lengths=(5, 11, 2, 7))
    free = generate.generate(config, params, prompts, max_new_tokens=10, eos_token_id=[])
    eos = int(free.tokens[0, 3])  # row 0 ends at step 3; others end where this token appears, if ever
    ours = generate.generate(config, params, prompts, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    ids, mask = generate.left_pad(prompts, pad_id=0, length_bucket=1)
    with torch.no_grad():
        reference = torch_model.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                                         attention_mask=torch.as_tensor(mask, dtype=torch.long), do_sample=False,
                                         max_new_tokens=10, eos_token_id=eos, pad_token_id=0).numpy()
    reference = reference[:, ids.shape[1]:]
    assert ours.lengths[0] == 4 and ours.tokens[0, 3] == eos and (ours.tokens[0, 4:] == 0).all()
    np.testing.assert_array_equal(ours.tokens[:, :reference.shape[1]], reference)
    for row, n in enumerate(ours.lengths):
        assert (ours.tokens[row, n:] == 0).all()
        assert eos not in ours.tokens[row, :n - 1]


def _prompts_sharing_prefixes(vocab_size):
    rng = np.random.default_rng(3)
    base, other = rng.integers(3, vocab_size, 20).tolist(), rng.integers(3, vocab_size, 25).tolist()
    return [base + [7], other, base + [7], base + [8, 9, 10], base[:17] + [11, 12], [1], base + [7, 5], other[:24]]


def test_shared_prefixes_groups_prompts_that_start_alike():
    prompts = [[1] * 30 + [2], [1] * 30 + [2], [1] * 30 + [3, 4], [5] * 20, [1] * 16 + [9] * 3, [6]]
    prefixes, owner, suffixes = generate.shared_prefixes(prompts, min_shared=16)
    for prompt, g, suffix in zip(prompts, owner, suffixes):
        assert prefixes[g] + suffix == prompt and len(suffix) >= 1
    assert owner[0] == owner[1] == owner[2] and len(prefixes[owner[0]]) == 30  # the three share 30 tokens
    assert owner[4] != owner[0]  # joining would cut the shared 30 to 16: more tokens to prefill, so it does not
    assert len({owner[3], owner[4], owner[5], owner[0]}) == 4


def test_prefix_sharing_and_extend_change_no_logit_or_token(gqa_reference):
    torch_model, config, params = gqa_reference
    prompts = _prompts_sharing_prefixes(config.vocab_size)
    assert len(generate.shared_prefixes(prompts)[0]) < len(prompts)  # something is shared
    alone = generate.prefill(config, params, prompts, reserve=8, share_prefixes=False)
    shared = generate.prefill(config, params, prompts, reserve=8)
    assert shared.slot == alone.slot + 8  # the shared layout ran: prefixes, then an 8-slot block of suffixes
    assert np.abs(np.asarray(shared.logits) - np.asarray(alone.logits)).max() <= 1e-5
    split = [max(len(p) - 3, 1) for p in prompts]  # prefill the start, extend with the rest (or nothing)
    extended = generate.extend(config, params, generate.prefill(config, params, [p[:k] for p, k in
                                                                  zip(prompts, split)], reserve=16),
                               [p[k:] for p, k in zip(prompts, split)])
    assert np.abs(np.asarray(extended.logits) - np.asarray(alone.logits)).max() <= 1e-5
    ours = generate.generate(config, params, prompts, max_new_tokens=6, eos_token_id=[])
    ids, mask = generate.left_pad(prompts, pad_id=0, length_bucket=1)
    with torch.no_grad():
        reference = torch_model.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                                         attention_mask=torch.as_tensor(mask, dtype=torch.long), do_sample=False,
                                         max_new_tokens=6, eos_token_id=None, pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours.tokens, reference[:, ids.shape[1]:])
    after_extend = generate.decode(config, params, generate.extend(config, params, generate.prefill(
        config, params, [p[:k] for p, k in zip(prompts, split)], reserve=16), [p[k:] for p, k in zip(prompts, split)]),
        max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(after_extend.tokens, ours.tokens)
    scanned = config.replace(scan_layers=True)  # the stacked cache repeats its rows along axis 1
    stacked = decoder.stack_layers(params, config.num_hidden_layers)
    shared_scanned = generate.prefill(scanned, stacked, prompts, reserve=8)
    assert np.abs(np.asarray(shared_scanned.logits) - np.asarray(alone.logits)).max() <= 1e-5
    # scanned layers read the stacked cache and write each step's keys/values into it once, after the layers
    scanned_extend = generate.extend(scanned, stacked, generate.prefill(
        scanned, stacked, [p[:k] for p, k in zip(prompts, split)], reserve=16), [p[k:] for p, k in zip(prompts, split)])
    assert np.abs(np.asarray(scanned_extend.logits) - np.asarray(alone.logits)).max() <= 1e-5
    assert len(prompts) >= generate.UNROLLED_DECODE_MIN_BATCH  # so the scanned model's decoding loop is unrolled
    scanned_tokens = generate.decode(scanned, stacked, scanned_extend, max_new_tokens=6, eos_token_id=[]).tokens
    np.testing.assert_array_equal(scanned_tokens, ours.tokens)


def test_sampling_is_deterministic_and_respects_limits(gqa_reference):
    _, config, params = gqa_reference
    prompts = _prompts(config.vocab_size)
    kwargs = dict(max_new_tokens=8, eos_token_id=[])
    a = generate.generate(config, params, prompts, temperature=1.0, seed=5, **kwargs)
    b = generate.generate(config, params, prompts, temperature=1.0, seed=5, **kwargs)
    c = generate.generate(config, params, prompts, temperature=1.0, seed=6, **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    greedy = generate.generate(config, params, prompts, **kwargs).tokens
    for limits in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-5)):
        sampled = generate.generate(config, params, prompts, seed=7, **{"temperature": 1.0, **limits}, **kwargs)
        np.testing.assert_array_equal(sampled.tokens, greedy, err_msg=str(limits))


def test_sample_logits_distribution_and_truncation():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    rngs = jax.random.key(0)
    draw = jax.jit(generate.sample_logits)
    counts = np.bincount(np.asarray(draw(logits, rngs, 1.0, 0, 1.0)), minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top2 = np.bincount(np.asarray(draw(logits, rngs, 1.0, 2, 1.0)), minlength=4) / 4000
    assert top2[2:].sum() == 0 and abs(top2[0] - 0.625) < 0.03
    nucleus = np.bincount(np.asarray(draw(logits, rngs, 1.0, 0, 0.9)), minlength=4) / 4000
    assert nucleus[3] == 0 and nucleus[2] > 0  # 0.5 + 0.3 < 0.9: the third token is still needed


def test_score_continuations_matches_reference_logprobs(gqa_reference):
    torch_model, config, params = gqa_reference
    prompts = _prompts(config.vocab_size, lengths=(4, 9, 1))
    continuations = [[5], [7, 8, 9], [10, 11]]
    scores = generate.score_continuations(config, params, prompts, continuations)
    for prompt, continuation, score in zip(prompts, continuations, scores):
        ids = np.asarray([prompt + continuation])
        logprobs = torch.log_softmax(torch.as_tensor(torch_logits(torch_model, ids, np.ones_like(ids))), -1)[0]
        expected = sum(float(logprobs[len(prompt) + j - 1, tok]) for j, tok in enumerate(continuation))
        assert abs(score - expected) <= 1e-4
    # a 1–7 rating read as a distribution over the rating tokens
    ratings = generate.score_continuations(config, params, [prompts[0]] * 7, [[t] for t in range(20, 27)])
    probs = np.exp(ratings) / np.exp(ratings).sum()
    assert probs.shape == (7,) and abs(probs.sum() - 1) < 1e-6


@pytest.mark.parametrize("call, message", [
    (lambda c, p: generate.generate(c, p, [[1], []], max_new_tokens=2), "prompt 1 is empty"),
    (lambda c, p: generate.generate(c, p, [[1]], max_new_tokens=0), "max_new_tokens must be >= 1"),
    (lambda c, p: generate.generate(c, p, [[1] * 2000], max_new_tokens=100), "exceeds max_position_embeddings"),
    (lambda c, p: generate.score_continuations(c, p, [[1]], [[2], [3]]), "1 prompts but 2 continuations"),
])
def test_bad_generation_requests_are_named(gqa_reference, call, message):
    _, config, params = gqa_reference
    with pytest.raises(ValueError, match=message):
        call(config, params)


def _kept_by_sorting(scaled, top_k, top_p):
    """Reference truncation with a sort and cumulative sums: top-k, then top-p on the renormalised rest."""
    kept = np.ones(scaled.shape, bool)
    for row, values in enumerate(scaled):
        if top_k > 0:
            kept[row] &= values >= np.sort(values)[::-1][min(top_k, len(values)) - 1]
        probs = np.where(kept[row], np.exp(values - values.max()), 0.0)
        probs /= probs.sum()
        if top_p < 1:
            kept[row] &= np.array([probs[probs > p].sum() < top_p for p in probs])
    return kept


def test_truncation_matches_sorting_and_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(0)
    truncate = jax.jit(generate.truncate_logits)
    for case in range(60):
        top_k, top_p = int(rng.integers(0, 45)), float(rng.choice([0.05, 0.3, 0.6, 0.9, 0.99, 1.0]))
        tied = np.round(rng.normal(size=(6, 40)) * 2, 1).astype(np.float32)  # many equal values
        kept = np.isfinite(np.asarray(truncate(tied, top_k, top_p)))
        np.testing.assert_array_equal(kept, _kept_by_sorting(tied, top_k, top_p), err_msg=f"{top_k} {top_p}")
        scores = rng.normal(size=(6, 40)).astype(np.float32) * 3  # distinct values: no tie to break
        warped = torch.as_tensor(scores)
        for warper in ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + ([TopPLogitsWarper(top_p)]
                                                                            if top_p < 1 else []):
            warped = warper(None, warped)
        np.testing.assert_array_equal(np.isfinite(np.asarray(truncate(scores, top_k, top_p))),
                                      np.isfinite(warped.numpy()), err_msg=f"{top_k} {top_p}")


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]] * 2000))
    draws = np.asarray(jax.jit(generate.sample_logits)(logits, jax.random.key(1), 1.0, 2, 0.5))
    assert set(draws.tolist()) == {0}  # top-2 renormalised: [4/7, 3/7]; 4/7 ≥ 0.5 keeps token 0 only


def test_pad_id_outside_the_vocabulary_changes_nothing(gqa_reference):
    _, config, params = gqa_reference
    prompts = _prompts(config.vocab_size)
    inside = generate.generate(config, params, prompts, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    outside = generate.generate(config, params, prompts, max_new_tokens=6, eos_token_id=[],
                                pad_token_id=config.vocab_size + 5)
    np.testing.assert_array_equal(inside.tokens, outside.tokens)
    with pytest.raises(ValueError, match=r"prompt 1 has token ids outside the vocabulary \[0, 101\)"):
        generate.generate(config, params, [[1], [5, 101]], max_new_tokens=2)


def test_generate_text_stops_at_every_end_of_sequence_id(gqa_reference):
    _, config, params = gqa_reference

    class Tokenizer:  # ids ↔ text "i j k"; EOS 2
        eos_token_id, pad_token_id = 2, 0

        def encode(self, text, add_special_tokens=True):
            return [int(t) for t in text.split()]

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(i) for i in ids)

    free = generate.generate(config, params, [[5, 6, 7]], max_new_tokens=8, eos_token_id=[])
    stop = int(free.tokens[0, 2])
    text = generate.generate_text(config.replace(eos_token_id=(2, stop)), params, Tokenizer(), ["5 6 7"],
                                  max_new_tokens=8)
    assert text == [" ".join(str(t) for t in free.tokens[0, :3])]


def test_profile_records_every_model_call_with_its_tokens_and_compiles(gqa_reference):
    """`sajax.infer.profile`: the calls of a generation under their label, with real and padded tokens, decode steps
    and the compiles a new shape costs (none the second time); nothing is recorded without a recorder."""
    from sajax.infer import profile

    _, config, params = gqa_reference
    prompts = _prompts(config.vocab_size, lengths=(5, 11, 2), seed=7)
    with profile.Recorder() as recorder:
        for label in ("first", "again"):
            with recorder.labelled(label):
                state = generate.prefill(config, params, prompts, reserve=8, length_bucket=16, share_prefixes=False)
                state = generate.extend(config, params, state, [[3], [4, 5], []])
                out = generate.decode(config, params, state, max_new_tokens=5, eos_token_id=[])
    assert [(c.label, c.kind, c.rows) for c in recorder.calls] == [
        (label, kind, 3) for label in ("first", "again") for kind in ("prefill", "extend", "decode")]
    first, again = recorder.calls[:3], recorder.calls[3:]
    assert [(c.tokens, c.padded_tokens, c.steps) for c in first] == [(18, 48, 1), (3, 6, 1), (15, 15, 5)]
    assert out.lengths.tolist() == [5, 5, 5]
    assert all(c.compiles >= 1 and 0 < c.compile_seconds < c.seconds for c in first)
    assert all(c.compiles == 0 and c.compile_seconds == 0 and c.seconds > 0 for c in again)
    assert profile.active() is None
    generate.decode(config, params, generate.prefill(config, params, prompts, reserve=2), max_new_tokens=2)
    assert len(recorder.calls) == 6  # inactive: not recorded
