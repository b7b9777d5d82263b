"""A model behind an OpenAI-compatible server (vLLM, TGI, llama.cpp's server, a hosted API) as a judge, through the
official `openai` client: each option's probability is read from the `top_logprobs` of the reply's first token, so
a served judge gives the same graded ratings as a local one read by probability (`sajax.evals.judge`).

A chat API returns no log-probabilities of a given continuation, so only one-token options can be read: Yes / No
and A / B are; "10" of the `digits` readout is two tokens for many tokenizers, so a served judge reads `yes_no`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai

from sajax.infer.lm import Conversation, check_conversation


class ServerError(RuntimeError):
    """The server cannot act as a judge (unreachable after retries, an error status, no log-probabilities)."""


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def option_logprobs(top_logprobs, options) -> dict[str, float]:
    """{option: log p} of the `options` among one token's `top_logprobs` (objects with .token and .logprob, as the
    openai client gives them); tokens are compared without surrounding spaces, and " Yes" and "Yes" add up."""
    found: dict[str, float] = {}
    for item in top_logprobs:
        token = item.token.strip()
        if token in options:
            found[token] = float(np.logaddexp(found.get(token, -np.inf), item.logprob))
    return found


class ServedModel:
    """`option_loglikelihoods` of a served chat model. `api_key_env` names the environment variable holding the key
    (never the key itself); `concurrency` requests are in flight at once; the client retries `max_retries` times
    with backoff on connection errors, 408/409/429 and 5xx."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "", timeout: float = 60.0,
                 max_retries: int = 5, top_logprobs: int = 20, concurrency: int = 8):
        if not model:
            raise ValueError(f"a judge served at {base_url} needs the served model's name (--judge_model)")
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key_env and not key:
            raise ValueError(f"the judge's API key: environment variable {api_key_env} is not set")
        self.base_url, self.model, self.top_logprobs, self.concurrency = base_url, model, top_logprobs, concurrency
        self.client = openai.OpenAI(base_url=base_url, api_key=key or "none", timeout=timeout,
                                    max_retries=max_retries)

    def option_loglikelihoods(self, conversations: Sequence[Conversation], options: Sequence[str]) -> np.ndarray:
        """log p(option_k | conversation_n) [N, K] of the reply's first token; an option the server does not list
        among its `top_logprobs` gets −inf (a row with none of them cannot be rated: all −inf)."""
        for conversation in conversations:
            check_conversation(conversation)
        with ThreadPoolExecutor(self.concurrency) as pool:
            rows = list(pool.map(lambda c: self._first_token(c, options), conversations))
        return np.array(rows, np.float64).reshape(len(conversations), len(options))

    def _first_token(self, conversation: Conversation, options: Sequence[str]) -> list[float]:
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[{"role": role, "content": text} for role, text in conversation],
                max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=self.top_logprobs)
        except openai.APIError as e:
            raise ServerError(f"judge {self.model!r} at {self.base_url}: {e}") from e
        choice = response.choices[0] if response.choices else None
        content = choice.logprobs.content if choice is not None and choice.logprobs is not None else None
        if not content:
            raise ServerError(f"judge {self.model!r} at {self.base_url} returned no logprobs; a served judge needs a "
                              "server that returns `logprobs` / `top_logprobs` for chat completions")
        found = option_logprobs(content[0].top_logprobs, options)
        return [found.get(option, -np.inf) for option in options]
