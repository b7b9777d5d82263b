"""Losses against direct per-group Python implementations of the formulas, gradients against finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sajax.train import losses

jax.config.update("jax_enable_x64", False)

DEFAULTS = dict(rating_scale=7.0, margin=1.0, ratio=0.2, max_flow=False, dpo_beta=0.5)


def objective(name, nll, scores, valid, reference_logp=None, **settings):
    """(loss, metrics) of objective `name` on per-response NLLs [B, K] (token counts 1: the totals are the NLLs;
    DPO reads its summed log-probs as −NLL)."""
    nll = jnp.asarray(nll)
    sums = losses.objective(name, losses.Ratio(nll, jnp.ones_like(nll)), jnp.asarray(scores), jnp.asarray(valid),
                            reference_logp, **{**DEFAULTS, **settings})
    return losses.reduce(sums)


def reference_stable_alignment(nll, scores, valid, S, M, lam, max_flow):
    """The formula of `losses.stable_alignment`'s docstring (and the README), one group at a time, in plain
    Python floats."""
    per_group, sft, penalties, violated, others_total = [], [], [], 0, 0
    for g in range(len(nll)):
        ks = [k for k in range(len(nll[g])) if valid[g][k]]
        if not ks:
            continue
        best = max(ks, key=lambda k: (scores[g][k], -k))  # first index among the highest scores
        others = [k for k in ks if k != best]
        d = [nll[g][best] - nll[g][k] + (scores[g][best] - scores[g][k]) / S * M for k in others]
        violated += sum(x > 0 for x in d)
        others_total += len(others)
        pooled = (max(d) if max_flow else sum(d) / len(d)) if d else 0.0
        penalty = max(0.0, pooled)
        per_group.append(nll[g][best] + lam * penalty)
        sft.append(nll[g][best])
        penalties.append(penalty)
    n = max(len(per_group), 1)
    return sum(per_group) / n, sum(sft) / n, sum(penalties) / n, violated / max(others_total, 1)


def reference_ranking_accuracy(nll, scores, valid):
    correct = total = 0
    for g in range(len(nll)):
        for i in range(len(nll[g])):
            for j in range(len(nll[g])):
                if valid[g][i] and valid[g][j] and scores[g][i] > scores[g][j]:
                    total += 1
                    correct += nll[g][i] < nll[g][j]
    return correct / max(total, 1)


SHAPES = [(1, 1), (3, 1), (4, 3), (5, 5), (2, 4)]  # few shapes: few compiles


def random_case(rng, shape=None):
    b, k = shape or SHAPES[rng.integers(len(SHAPES))]
    nll = rng.uniform(0.1, 5.0, (b, k)).astype(np.float32)
    scores = rng.integers(1, 8, (b, k)).astype(np.float32)  # integer ratings: many ties
    if rng.random() < 0.3:
        scores = rng.uniform(1, 7, (b, k)).astype(np.float32)
    valid = rng.random((b, k)) < 0.75
    if rng.random() < 0.2:
        valid[0] = False  # an all-padding group
    return nll, scores, valid


@pytest.mark.parametrize("max_flow", [False, True])
def test_stable_alignment_matches_python_formula(max_flow):
    rng = np.random.default_rng(0)
    loss_fn = jax.jit(lambda n, s, v: objective("stable_alignment", n, s, v, max_flow=max_flow))
    kinds = {"k1": 0, "ties": 0, "padded": 0}
    for _ in range(150):
        nll, scores, valid = random_case(rng)
        loss, aux = loss_fn(nll, scores, valid)
        expected = reference_stable_alignment(nll.tolist(), scores.tolist(), valid.tolist(), 7.0, 1.0, 0.2,
                                              max_flow)
        np.testing.assert_allclose([loss, aux["sft"], aux["penalty"], aux["violated_margin_fraction"]], expected,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(aux["ranking_accuracy"],
                                   reference_ranking_accuracy(nll.tolist(), scores.tolist(), valid.tolist()),
                                   atol=1e-6)
        kinds["k1"] += nll.shape[1] == 1 or bool((valid.sum(1) == 1).any())
        kinds["ties"] += any(len(set(s[v])) < v.sum() for s, v in zip(scores, valid))
        kinds["padded"] += bool((~valid).any())
    assert min(kinds.values()) > 10, kinds  # every edge case was exercised many times


def test_single_response_group_is_plain_sft_and_margin_uses_true_gaps():
    nll = np.array([[2.0, 0.0, 0.0], [1.0, 3.0, 0.1]], np.float32)
    scores = np.array([[5.0, 0.0, 0.0], [7.0, 1.0, 4.0]], np.float32)
    valid = np.array([[True, False, False], [True, True, True]])
    loss, aux = objective("stable_alignment", nll, scores, valid)
    # group 2: best = 0; d = [1 − 3 + 6/7, 1 − 0.1 + 3/7] = [−1.143, 1.329] → mean 0.093 > 0
    group2 = 1.0 + 0.2 * max(0.0, ((1 - 3 + 6 / 7) + (1 - 0.1 + 3 / 7)) / 2)
    np.testing.assert_allclose(loss, (2.0 + group2) / 2, rtol=1e-6)
    np.testing.assert_allclose(aux["violated_margin_fraction"], 0.5)


def reference_rrhf(nll, scores, valid):
    total, groups = 0.0, 0
    for g in range(len(nll)):
        ks = [k for k in range(len(nll[g])) if valid[g][k]]
        if not ks:
            continue
        best = max(ks, key=lambda k: (scores[g][k], -k))
        rank = sum(max(0.0, -nll[g][i] + nll[g][j]) for i in ks for j in ks if scores[g][i] < scores[g][j])
        total += rank + nll[g][best]
        groups += 1
    return total / max(groups, 1)


def reference_dpo(logp, ref, scores, valid, beta):
    total, pairs = 0.0, 0
    for g in range(len(logp)):
        ks = [k for k in range(len(logp[g])) if valid[g][k]]
        if not ks:
            continue
        b = max(ks, key=lambda k: (scores[g][k], -k))
        for k in ks:
            if scores[g][k] < scores[g][b]:
                z = beta * ((logp[g][b] - ref[g][b]) - (logp[g][k] - ref[g][k]))
                total += math.log1p(math.exp(-z))
                pairs += 1
    return total / max(pairs, 1)


def test_baselines_match_python_formulas():
    rng = np.random.default_rng(1)
    for _ in range(60):
        nll, scores, valid = random_case(rng)
        sft, _ = objective("sft", nll, scores, valid)
        expected_sft = reference_stable_alignment(nll.tolist(), scores.tolist(), valid.tolist(), 7, 1, 0.0,
                                                  False)[1]
        np.testing.assert_allclose(sft, expected_sft, rtol=1e-6)
        rrhf, _ = objective("rrhf", nll, scores, valid)
        np.testing.assert_allclose(rrhf, reference_rrhf(nll.tolist(), scores.tolist(), valid.tolist()), rtol=1e-5)
        logp = -nll * 7
        ref = logp + rng.normal(0, 1, logp.shape).astype(np.float32)
        dpo, _ = objective("dpo", -logp, scores, valid, jnp.asarray(ref))
        np.testing.assert_allclose(dpo, reference_dpo(logp.tolist(), ref.tolist(), scores.tolist(),
                                                      valid.tolist(), 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_flow", [False, True])
def test_gradient_is_finite_and_matches_finite_differences(max_flow):
    rng = np.random.default_rng(2)
    nll = rng.uniform(0.5, 3.0, (4, 3))
    scores = np.array([[7, 3, 1], [2, 6, 6], [5, 5, 5], [4, 1, 3]], np.float64)
    valid = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]], bool)
    f = lambda x: objective("stable_alignment", x, scores, valid, max_flow=max_flow)[0]  # noqa: E731
    with jax.enable_x64():
        x = jnp.asarray(nll)
        grad = np.asarray(jax.grad(f)(x))
        assert np.isfinite(grad).all()
        eps = 1e-6
        numeric = np.zeros_like(nll)
        for idx in np.ndindex(nll.shape):
            step = np.zeros_like(nll)
            step[idx] = eps
            numeric[idx] = (f(x + step) - f(x - step)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-6)
    assert grad[3, 0] == pytest.approx(0.25)  # a single-response group: plain SFT, 1 / groups
    assert (grad[~valid] == 0).all()


def test_chunked_response_nll_equals_direct_log_softmax():
    rng = np.random.default_rng(3)
    n, t, d, v = 5, 13, 8, 37
    hidden = jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, (n, t)), jnp.int32)
    mask = jnp.asarray(rng.random((n, t)) < 0.6, jnp.int32)
    logprobs = jax.nn.log_softmax(hidden[:, :-1] @ weights)
    direct = -jnp.sum(jnp.take_along_axis(logprobs, tokens[:, 1:, None], -1)[..., 0] * mask[:, 1:], -1)
    for chunk in (1, 4, 5, 12, 100):
        out = losses.response_token_nll(hidden, weights, tokens, mask, chunk)
        np.testing.assert_allclose(out.total, direct, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.count, np.sum(np.asarray(mask)[:, 1:], -1))
    g_chunked = jax.grad(lambda w: jnp.sum(losses.response_token_nll(hidden, w, tokens, mask, 4).value))(weights)
    g_direct = jax.grad(lambda w: jnp.sum(-jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(hidden[:, :-1] @ w),
                                                                   tokens[:, 1:, None], -1)[..., 0]
                                                   * mask[:, 1:], -1) / jnp.maximum(mask[:, 1:].sum(-1), 1)))(weights)
    np.testing.assert_allclose(g_chunked, g_direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", losses.OBJECTIVES)
def test_sums_of_a_split_add_up_to_the_whole_batch(name):
    """Any split of the groups: the parts' sums add up to the whole batch's (what exact accumulation rests on)."""
    rng = np.random.default_rng(4)
    for _ in range(10):
        nll, scores, valid = random_case(rng, shape=(4, 3))
        ref = jnp.asarray(rng.normal(0, 1, nll.shape).astype(np.float32))
        parts = [slice(0, 1), slice(1, None)]  # one group | three (some all-padding, ties, K = 1)
        whole = losses.objective(name, losses.Ratio(jnp.asarray(nll), jnp.ones(nll.shape)), jnp.asarray(scores),
                                 jnp.asarray(valid), ref, **DEFAULTS)
        split = [losses.objective(name, losses.Ratio(jnp.asarray(nll[p]), jnp.ones(nll[p].shape)),
                                  jnp.asarray(scores[p]), jnp.asarray(valid[p]), ref[p], **DEFAULTS) for p in parts]
        added = jax.tree.map(lambda a, b: a + b, *split)
        for got, want in zip(jax.tree.leaves(added), jax.tree.leaves(whole)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
