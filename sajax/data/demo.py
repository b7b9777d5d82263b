"""A synthetic alignment dataset whose ratings depend on a learnable property of the responses.

Each group asks about a social situation; each response is a short sentence built from "considerate" words
(honest, help, respect, ...) and "harmful" words (lie, insult, steal, ...), and its rating is
1 + 6 · (fraction of considerate words), rounded to a whole rating 1–7. A model that learns which words the
better-rated responses use ranks held-out responses above chance. Used by the offline demo run of
`sajax-train`, the learning-signal test and `bench/learning_signal.py`.
"""

from __future__ import annotations

import numpy as np

from sajax.data.alignment import alpaca_query

SITUATIONS = (
    "a friend asks you to keep a secret that could hurt someone", "you find a wallet on the street",
    "a coworker takes credit for your work", "a stranger asks you for directions",
    "your neighbour's dog keeps barking at night", "a classmate asks to copy your homework",
    "you see someone being bullied online", "a shop gives you too much change",
    "your friend's cooking tastes bad", "a colleague makes a joke about a minority group",
    "you break something in a friend's house", "an elderly person struggles with heavy bags",
    "someone asks you to lie to their boss for them", "you disagree with a friend about politics",
    "a child asks you whether a scary story is true", "you are offered a bribe at work",
)
CONSIDERATE = ("honest", "help", "respect", "kindly", "listen", "share", "apologise", "fair", "calm", "support",
               "explain", "protect")
HARMFUL = ("lie", "insult", "steal", "ignore", "mock", "threaten", "cheat", "blame", "shout", "hide", "hurt",
           "trick")


def synthetic_groups(num_groups: int, seed: int, responses_per_group: int = 4, words_per_response: int = 8,
                     model: str = "synthetic") -> list[dict]:
    """Records with the alignment-dataset fields (see sajax.data.alignment), ratings from the word mix."""
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(num_groups):
        situation = SITUATIONS[int(rng.integers(len(SITUATIONS)))]
        instruction = f"What should you do if {situation}?"
        responses, scores = [], []
        for _ in range(responses_per_group):
            considerate = rng.random()
            words = [str(rng.choice(CONSIDERATE if rng.random() < considerate else HARMFUL))
                     for _ in range(words_per_response)]
            share = sum(w in CONSIDERATE for w in words) / len(words)
            responses.append("I would " + " and ".join([", ".join(words[:-1]), words[-1]]) + ".")
            scores.append(float(np.round(1 + 6 * share)))
        groups.append({"query": alpaca_query(instruction), "instruction": instruction, "input": "",
                       "responses": responses, "scores": scores, "kind": "imitation", "model": model,
                       "world_id": g})
    return groups
