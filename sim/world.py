"""The grid society: agent labels, locations, social circles and who talks to whom.

An N×N grid of agents (index i ↔ cell (i // N, i % N)). Initial settings label each agent good or bad:
`all_good`, `all_bad`, `half_half` (row ≤ col good, the rest bad) and `mixed_half_half` (a random half good).
An agent's social circle holds the agents within Euclidean distance `radius` (default N // 2) of its cell. For an
interaction it asks `tgt_agent_count` peers: locals from its circle (each kept with probability 1 − `dropout`)
and, in `local_and_global` mode, the remaining places filled with random agents from anywhere; in `global` mode
all peers are random agents from anywhere. Observers are separate, memory-less agents.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SETTINGS = ("all_good", "all_bad", "half_half", "mixed_half_half")
INTERACTIONS = ("local", "global", "local_and_global")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    grid_size: int = 3
    initial_setting: str = "half_half"
    radius: float | None = None  # None: grid_size // 2
    interaction: str = "local_and_global"
    dropout: float = 0.0  # probability of skipping each local peer
    tgt_agent_count: int = 4
    num_observers: int = 1

    @property
    def num_agents(self) -> int:
        return self.grid_size ** 2

    @property
    def social_radius(self) -> float:
        return self.grid_size // 2 if self.radius is None else self.radius

    def validate(self) -> None:
        """Fails at start, with the setting named, for worlds that cannot run."""
        if not isinstance(self.grid_size, int) or self.grid_size < 2:
            raise ValueError(f"world.grid_size must be an integer >= 2, got {self.grid_size!r}")
        if self.initial_setting not in SETTINGS:
            raise ValueError(f"world.initial_setting must be one of {SETTINGS}, got {self.initial_setting!r}")
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"world.interaction must be one of {INTERACTIONS}, got {self.interaction!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"world.dropout must be in [0, 1), got {self.dropout}")
        if self.tgt_agent_count < 1:
            raise ValueError(f"world.tgt_agent_count must be >= 1, got {self.tgt_agent_count}")
        if self.tgt_agent_count > self.num_agents - 1:
            raise ValueError(f"world.tgt_agent_count ({self.tgt_agent_count}) exceeds the other agents in a "
                             f"{self.grid_size}x{self.grid_size} grid ({self.num_agents - 1})")
        if self.num_observers < 1:
            raise ValueError(f"world.num_observers must be >= 1, got {self.num_observers}")
        if self.interaction == "local":
            if self.social_radius < 1:
                raise ValueError(f"world.radius {self.social_radius} reaches no neighbour; local-only interaction "
                                 "needs radius >= 1")
            smallest = min(len(c) for c in social_circles(self))
            if smallest < self.tgt_agent_count:
                raise ValueError(f"world.radius {self.social_radius} gives some agents only {smallest} neighbours, "
                                 f"fewer than tgt_agent_count ({self.tgt_agent_count}) with local-only interaction")


def initial_labels(config: WorldConfig, rng: np.random.Generator) -> list[str]:
    """'good' / 'bad' per agent."""
    n = config.grid_size
    if config.initial_setting == "all_good":
        return ["good"] * n * n
    if config.initial_setting == "all_bad":
        return ["bad"] * n * n
    if config.initial_setting == "half_half":
        return ["good" if i // n <= i % n else "bad" for i in range(n * n)]
    good = set(rng.permutation(n * n)[: n * n // 2].tolist())
    return ["good" if i in good else "bad" for i in range(n * n)]


def social_circles(config: WorldConfig) -> list[list[int]]:
    """For each agent, the other agents within Euclidean distance `radius` of its cell."""
    n = config.grid_size
    rows, cols = np.divmod(np.arange(n * n), n)
    distance = np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])
    within = (distance <= config.social_radius) & ~np.eye(n * n, dtype=bool)
    return [np.flatnonzero(row).tolist() for row in within]


def select_peers(config: WorldConfig, agent: int, circle: list[int], rng: np.random.Generator) -> list[int]:
    """`tgt_agent_count` distinct peers of `agent` (never itself), as the module docstring describes."""
    k = config.tgt_agent_count
    peers: list[int] = []
    if config.interaction in ("local", "local_and_global"):
        kept = [p for p in circle if rng.random() >= config.dropout]
        if config.interaction == "local" and len(kept) < k:  # dropout left too few: fall back to the circle
            kept = circle
        peers = [int(p) for p in rng.permutation(kept)[:k]]
    if len(peers) < k:
        others = [a for a in range(config.num_agents) if a != agent and a not in peers]
        peers += [int(p) for p in rng.permutation(others)[: k - len(peers)]]
    return peers
