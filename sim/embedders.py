"""Text → unit vectors for memory search: a hashing n-gram embedder (offline default), the local sajax
model's mean-pooled hidden states, or any OpenAI-compatible `/v1/embeddings` endpoint."""

from __future__ import annotations

import re
import zlib

import numpy as np

from sim.memory import normalize

_WORD = re.compile(r"[a-z0-9']+")


class HashingEmbedder:
    """Deterministic bag of word unigrams, word bigrams and character trigrams, each hashed (CRC32) to one of
    `dim` buckets with a hashed sign, then L2-normalised. No model, no network, identical on every machine."""

    def __init__(self, dim: int = 256):
        self.dim = dim

    def _features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        grams = [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
        joined = " ".join(words)
        return grams + [f"c:{joined[i:i + 3]}" for i in range(max(len(joined) - 2, 0))]

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for feature in self._features(text):
                h = zlib.crc32(feature.encode("utf-8"))
                out[row, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        return normalize(out)


class LocalModelEmbedder:
    """Mean over real tokens of the final (normed) hidden states of the local sajax LLaMA."""

    def __init__(self, config, params, tokenizer, max_len: int = 128, length_bucket: int = 32):
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.max_len, self.length_bucket = max_len, length_bucket

    def embed(self, texts: list[str]) -> np.ndarray:
        from sajax.infer.generate import mean_hidden_states

        encoded = [self.tokenizer.encode(t, add_special_tokens=True)[: self.max_len] or [0] for t in texts]
        return normalize(mean_hidden_states(self.config, self.params, encoded, self.length_bucket))


class OpenAIEmbedder:
    """Embeddings from an OpenAI-compatible server (`sim.openai_backend.OpenAIClient`: the official client, our
    retries), `batch_size` texts per request. The answer is checked: one vector per input, all of one dimension —
    a server that does not pool (llama.cpp without --pooling) returns one vector per token, which is named."""

    def __init__(self, client, model: str, batch_size: int = 64, concurrency: int = 4):
        self.client, self.model, self.batch_size, self.concurrency = client, model, batch_size, concurrency
        self.journal = None  # the round's sim.journal.Journal: answers recorded, replayed on a resumed round

    def embed(self, texts: list[str]) -> np.ndarray:
        from sim.openai_backend import BackendError, MalformedAnswer, TransientFailure

        where = f"{self.client.base_url}/embeddings (embedder.model {self.model!r})"

        async def one(sdk, chunk):
            body = {"model": self.model, "input": chunk, "encoding_format": "float"}

            async def send():
                answer = (await sdk.embeddings.create(**body)).model_dump(mode="json", exclude_unset=True)
                if not answer.get("data"):
                    raise MalformedAnswer(f"an answer without embeddings ({str(answer)[:120]})")
                return answer

            return vectors_of(await self.client.journalled(self.journal, "embeddings", body, send, "/embeddings",
                                                           "embed"))

        chunks = [texts[start:start + self.batch_size] for start in range(0, len(texts), self.batch_size)]
        rows = []
        for chunk, vectors in zip(chunks, self.client.run_all(one, chunks, self.concurrency)):
            if isinstance(vectors, TransientFailure):
                raise BackendError(f"{where}: {vectors}")
            rows += check_vectors(vectors, len(chunk), where)
        return normalize(np.asarray(rows, np.float32))


def vectors_of(answer: dict) -> list:
    """The vectors of an `/embeddings` answer, in the order of its inputs."""
    return [d.get("embedding") for d in sorted(answer["data"], key=lambda d: d.get("index", 0))]


def check_vectors(vectors: list, inputs: int, where: str) -> list[list[float]]:
    """ValueError naming `where` unless `vectors` holds one flat vector of numbers per input, all of one size."""
    if len(vectors) != inputs:
        raise ValueError(f"{where}: {len(vectors)} embeddings for {inputs} inputs")
    for i, vector in enumerate(vectors):
        if isinstance(vector, list) and vector and isinstance(vector[0], list):
            raise ValueError(f"{where}: input {i} got {len(vector)} vectors (one per token) instead of one; the "
                             "server does not pool its embeddings — enable pooling (llama.cpp: --pooling mean) or "
                             "serve an embedding model")
        if not isinstance(vector, list) or not vector or not all(isinstance(x, (int, float)) for x in vector):
            raise ValueError(f"{where}: input {i} got {str(vector)[:80]!r}, not a vector of numbers")
    sizes = sorted({len(v) for v in vectors})
    if len(sizes) > 1:
        raise ValueError(f"{where}: embeddings of different sizes {sizes}")
    return vectors
