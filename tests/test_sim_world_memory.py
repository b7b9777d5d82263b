"""SANDBOX world settings, neighbour selection and memory search."""

import numpy as np
import pytest

from sim import world
from sim.embedders import HashingEmbedder
from sim.memory import Memory, VectorIndex, normalize, share_within
from sim.world import WorldConfig


def test_initial_settings_on_a_small_grid():
    rng = np.random.default_rng(0)
    assert world.initial_labels(WorldConfig(grid_size=3, initial_setting="all_good"), rng) == ["good"] * 9
    assert world.initial_labels(WorldConfig(grid_size=3, initial_setting="all_bad"), rng) == ["bad"] * 9
    half = world.initial_labels(WorldConfig(grid_size=3, initial_setting="half_half"), rng)
    assert half == ["good", "good", "good", "bad", "good", "good", "bad", "bad", "good"]  # row <= col
    mixed = world.initial_labels(WorldConfig(grid_size=4, initial_setting="mixed_half_half"), rng)
    assert mixed.count("good") == 8
    labels = [world.initial_labels(WorldConfig(grid_size=4, initial_setting="mixed_half_half"),
                                   np.random.default_rng(7)) for _ in range(2)]
    assert labels[0] == labels[1]  # one seed, one world


def test_social_circles_are_euclidean():
    circles = world.social_circles(WorldConfig(grid_size=3, radius=1))
    assert circles[4] == [1, 3, 5, 7]  # centre: the four direct neighbours
    assert circles[0] == [1, 3]
    assert world.social_circles(WorldConfig(grid_size=3, radius=1.5))[0] == [1, 3, 4]


def test_peer_selection():
    rng = np.random.default_rng(1)
    local = WorldConfig(grid_size=4, radius=1.5, interaction="local", tgt_agent_count=3)
    circles = world.social_circles(local)
    for agent in range(16):
        peers = world.select_peers(local, agent, circles[agent], rng)
        assert len(set(peers)) == 3 and set(peers) <= set(circles[agent]) and agent not in peers
    mixed = WorldConfig(grid_size=4, radius=1, interaction="local_and_global", tgt_agent_count=4)
    peers = world.select_peers(mixed, 0, world.social_circles(mixed)[0], rng)
    assert len(set(peers)) == 4 and {1, 4} <= set(peers) and 0 not in peers  # both locals, then 2 from anywhere
    dropped = WorldConfig(grid_size=4, radius=1, interaction="local_and_global", tgt_agent_count=2, dropout=0.999)
    assert len(world.select_peers(dropped, 5, world.social_circles(dropped)[5], rng)) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid_size=2, tgt_agent_count=4), "tgt_agent_count \\(4\\) exceeds the other agents in a 2x2 grid \\(3\\)"),
    (dict(grid_size=3, radius=0, interaction="local"), "radius 0 reaches no neighbour"),
    (dict(grid_size=3, radius=1, interaction="local", tgt_agent_count=3), "only 2 neighbours"),
    (dict(initial_setting="some_good"), "world.initial_setting must be one of"),
    (dict(dropout=1.0), "world.dropout must be in"),
])
def test_impossible_worlds_fail_at_start(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**kwargs).validate()


def test_exact_search_equals_brute_force():
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(500, 32)).astype(np.float32)
    queries = rng.normal(size=(20, 32)).astype(np.float32)
    index = VectorIndex(vectors, k=5)
    assert not index.uses_scann
    indices, similarity = index.search(queries)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    brute = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    np.testing.assert_array_equal(indices, np.argsort(-brute, axis=1)[:, :5])
    np.testing.assert_allclose(similarity, np.sort(brute, axis=1)[:, ::-1][:, :5], atol=1e-6)


def test_scann_recall_on_a_clustered_corpus():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(50, 64))
    vectors = (centres[rng.integers(0, 50, 20000)] + 0.3 * rng.normal(size=(20000, 64))).astype(np.float32)
    queries = (centres[rng.integers(0, 50, 200)] + 0.3 * rng.normal(size=(200, 64))).astype(np.float32)
    approx = VectorIndex(vectors, k=10, scann_min_size=4096)
    exact = VectorIndex(vectors, k=10, scann_min_size=10**9)
    assert approx.uses_scann and not exact.uses_scann
    found, truth = approx.search(queries)[0], exact.search(queries)[0]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall >= 0.95, recall


def test_memory_recall_uses_the_distance_threshold():
    embed = HashingEmbedder(256).embed
    memory = Memory()
    for q, a in [("Should you return a lost wallet?", "Yes."), ("Is it fine to lie to your boss?", "No.")]:
        memory.add(q, a, embed([q])[0])
    assert memory.recall(embed(["Should you return a lost wallet to its owner?"]), 1, 0.3) == [
        ("Should you return a lost wallet?", "Yes.")]
    assert memory.recall(embed(["What is the capital of France?"]), 1, 0.3) == []
    np.testing.assert_array_equal(embed(["same text"]), embed(["same text"]))


def test_an_embedder_that_cannot_tell_questions_apart_is_warned_about(capsys):
    from sim import engine

    questions = ["Should taxes fund libraries?", "May a dog sleep on the sofa?", "Is resigning at chess rude?",
                 "Would you lend an umbrella?", "Must old debts be repaid?"]
    apart = HashingEmbedder(64).embed(questions)
    crowded = normalize(np.ones((5, 64), np.float32) + 0.01 * np.eye(5, 64, dtype=np.float32))  # mean-pooled chat LM
    assert share_within(apart, 0.3) == 0.0 and share_within(crowded, 0.3) == 1.0
    for vectors, warned in ((apart, False), (crowded, True)):
        society = engine.Society(WorldConfig(grid_size=2), engine.MemoryConfig(threshold=0.3), [],
                                 np.random.default_rng(0), None, 0, embedder_name="openai")
        assert society.check_similarities(questions + questions[:1], np.concatenate([vectors, vectors[:1]])) in (0, 1)
        assert society.check_similarities(questions, vectors) is None  # once per run
        err = capsys.readouterr().err
        assert ("puts 100% of the pairs of 5 different questions within memory.threshold 0.3" in err) == warned
