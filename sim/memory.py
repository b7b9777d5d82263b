"""Agent memories: (question, answer) pairs with question embeddings, and similarity search over them.

`VectorIndex.search` returns the top-k rows by cosine similarity. Below `scann_min_size` rows it is exact (one
matrix product); above, a ScaNN tree + asymmetric-hashing index tuned from the size (√n leaves, a twentieth of
them searched, exact re-ranking of the best candidates) — same interface, same result type.
`Memory.recall` keeps the hits within the cosine-distance threshold (1 − cos < 0.3 in the original).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def share_within(vectors: np.ndarray, threshold: float) -> float:
    """The share of pairs of different rows (unit vectors [N, D]) within cosine distance `threshold` (1 − cos <
    threshold): near 1 for questions on unrelated topics means the embedder cannot tell them apart, so recall
    would bring back unrelated memories."""
    n = len(vectors)
    if n < 2:
        return 0.0
    distance = 1.0 - vectors @ vectors.T  # [N, N]
    pairs = np.triu_indices(n, k=1)
    return float(np.mean(distance[pairs] < threshold))


@dataclasses.dataclass(frozen=True)
class ScannTuning:
    num_leaves: int
    leaves_to_search: int
    reorder: int
    training_sample_size: int


def scann_tuning(size: int, k: int) -> ScannTuning:
    """Partitioning and re-ranking sized from the corpus: √n leaves (at least 10), 1/20 of them searched (at
    least 5), the best max(100, 20·k) candidates re-ranked exactly; training on at most 250k rows."""
    leaves = max(10, int(math.sqrt(size)))
    return ScannTuning(num_leaves=leaves, leaves_to_search=max(5, leaves // 20), reorder=max(100, 20 * k),
                       training_sample_size=min(size, 250_000))


class VectorIndex:
    """Top-k cosine search over unit vectors [n, d]; exact below `scann_min_size` rows, ScaNN above."""

    def __init__(self, vectors: np.ndarray, k: int, scann_min_size: int = 4096):
        self.vectors = normalize(vectors)
        self.k = min(k, len(self.vectors))
        self.uses_scann = len(self.vectors) >= scann_min_size
        self._searcher = None
        if self.uses_scann and self.k > 0:
            import scann

            tuning = scann_tuning(len(self.vectors), self.k)
            self._searcher = (scann.scann_ops_pybind.builder(self.vectors, self.k, "dot_product")
                              .tree(num_leaves=tuning.num_leaves, num_leaves_to_search=tuning.leaves_to_search,
                                    training_sample_size=tuning.training_sample_size)
                              .score_ah(2, anisotropic_quantization_threshold=0.2)
                              .reorder(tuning.reorder).build())

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices [m, k] int64, cosine similarities [m, k] float32), best first."""
        queries = normalize(np.atleast_2d(queries))
        if self.k == 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        if self._searcher is not None:
            indices, scores = self._searcher.search_batched(queries)
            return indices.astype(np.int64), scores.astype(np.float32)
        similarity = queries @ self.vectors.T  # [m, n]
        top = np.argpartition(-similarity, self.k - 1, axis=1)[:, : self.k]
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1, kind="stable")
        indices = np.take_along_axis(top, order, axis=1)
        return indices.astype(np.int64), np.take_along_axis(similarity, indices, axis=1).astype(np.float32)


@dataclasses.dataclass
class Memory:
    """One agent's internal memory."""

    questions: list[str] = dataclasses.field(default_factory=list)
    answers: list[str] = dataclasses.field(default_factory=list)
    embeddings: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def add(self, question: str, answer: str, embedding: np.ndarray) -> None:
        embedding = normalize(embedding)[None]
        self.embeddings = embedding if len(self.questions) == 0 else np.concatenate([self.embeddings, embedding])
        self.questions.append(question)
        self.answers.append(answer)

    def recall(self, query_embedding: np.ndarray, k: int, threshold: float, scann_min_size: int = 4096
               ) -> list[tuple[str, str]]:
        """Up to k remembered (question, answer) pairs whose question lies within cosine distance `threshold`
        of the query (1 − cos < threshold), most similar first."""
        if not self.questions:
            return []
        indices, similarity = VectorIndex(self.embeddings, k, scann_min_size).search(query_embedding)
        return [(self.questions[i], self.answers[i]) for i, s in zip(indices[0], similarity[0])
                if 1.0 - s < threshold]

    def to_json(self) -> dict:
        return {"questions": self.questions, "answers": self.answers}
