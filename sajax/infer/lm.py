"""A language model as evaluations see it: conversations in, log-likelihoods of continuations out.

A conversation is a list of (role, text) turns, roles "user" and "assistant", ending with a user turn; the
continuation is the assistant's next reply. A model with a chat template is scored inside it (the reply's tokens
follow the template's assistant header); one without is given the dialogue as "\\n\\nHuman: …\\n\\nAssistant:" text
(the HH-RLHF form) and the reply after a space.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from sajax.formats import tokenizer as tokenizer_lib
from sajax.infer import generate
from sajax.model.config import ModelConfig

Conversation = Sequence[tuple[str, str]]
ROLES = ("user", "assistant")


def check_conversation(conversation: Conversation) -> None:
    if not conversation or conversation[-1][0] != "user":
        raise ValueError(f"a conversation must end with a user turn, got {list(conversation)[-1:]}")
    for role, _ in conversation:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {ROLES}")


def as_text(conversation: Conversation) -> str:
    """The HH-RLHF rendering: "\\n\\nHuman: …\\n\\nAssistant: …" turns, ending with "\\n\\nAssistant:"."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[role]}: {text}" for role, text in conversation) + "\n\nAssistant:"


@dataclasses.dataclass
class LanguageModel:
    config: ModelConfig
    params: object
    tokenizer: object
    batch_size: int = 16

    @property
    def chat(self) -> bool:
        return tokenizer_lib.has_chat_template(self.tokenizer)

    def context_ids(self, conversation: Conversation) -> list[int]:
        """The conversation's tokens up to where the assistant's reply starts."""
        check_conversation(conversation)
        if self.chat:
            return tokenizer_lib.encode_chat(self.tokenizer, conversation)
        return self.tokenizer.encode(as_text(conversation), add_special_tokens=True)

    def reply_ids(self, text: str) -> list[int]:
        """A reply's tokens, as they follow `context_ids`."""
        return self.tokenizer.encode(text if self.chat else " " + text, add_special_tokens=False)

    def encode(self, conversation: Conversation, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids)."""
        return self.context_ids(conversation), self.reply_ids(continuation)

    def loglikelihoods(self, conversations: Sequence[Conversation], continuations: Sequence[str]) -> np.ndarray:
        """log p(continuation_i | conversation_i), summed over the continuation's tokens; float64 [N]. Rows are scored
        `batch_size` at a time, sorted by length (fewer padded shapes to compile)."""
        if len(conversations) != len(continuations):
            raise ValueError(f"{len(conversations)} conversations but {len(continuations)} continuations")
        pairs = [self.encode(c, t) for c, t in zip(conversations, continuations)]
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        out = np.zeros(len(pairs), np.float64)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            rows_padded = rows + rows[-1:] * (self.batch_size - len(rows))  # one batch shape per length bucket
            scores = generate.score_continuations(self.config, self.params, [pairs[i][0] for i in rows_padded],
                                                  [pairs[i][1] for i in rows_padded])
            out[rows] = scores[:len(rows)]
        return out

    def option_loglikelihoods(self, conversations: Sequence[Conversation], options: Sequence[str]) -> np.ndarray:
        """log p(option_k | conversation_n) [N, K]. When every option is a single token (letters, Yes / No,
        digits) one prefill per conversation reads them all from its next-token distribution; otherwise every
        (conversation, option) row is scored in full (`loglikelihoods`)."""
        option_ids = [self.reply_ids(o) for o in options]
        if not conversations or not all(len(ids) == 1 for ids in option_ids):
            return _flat_options(self, conversations, options)
        columns = np.array([ids[0] for ids in option_ids])
        contexts = [self.context_ids(c) for c in conversations]
        out = np.zeros((len(contexts), len(options)), np.float64)
        for start in range(0, len(contexts), self.batch_size):
            rows = contexts[start:start + self.batch_size]
            rows += rows[-1:] * (self.batch_size - len(rows))  # one batch shape per length bucket
            state = generate.prefill(self.config, self.params, rows, reserve=1)
            logp = np.asarray(jax.nn.log_softmax(state.logits, axis=-1), np.float64)
            n = min(self.batch_size, len(contexts) - start)
            out[start:start + n] = logp[:n][:, columns]
        return out

    def generate(self, conversations: Sequence[Conversation], max_new_tokens: int = 96) -> list[str]:
        """Greedy replies, stopping at an end of sequence or of turn (or, without a chat template, where the
        text starts a new "Human:" turn)."""
        contexts = [self.context_ids(c) for c in conversations]
        texts = []
        for start in range(0, len(contexts), self.batch_size):
            out = generate.generate(self.config, self.params, contexts[start:start + self.batch_size],
                                    max_new_tokens=max_new_tokens, temperature=0.0,
                                    eos_token_id=generate.stop_token_ids(self.config, self.tokenizer),
                                    pad_token_id=self.tokenizer.pad_token_id)
            texts += [self.tokenizer.decode(row[:n], skip_special_tokens=True).split("\n\nHuman:")[0].strip()
                      for row, n in zip(out.tokens, out.lengths)]
        return texts


def _flat_options(model, conversations, options) -> np.ndarray:
    scores = model.loglikelihoods([c for c in conversations for _ in options], [o for _ in conversations
                                                                                for o in options])
    return np.asarray(scores, np.float64).reshape(len(conversations), len(options))


def option_loglikelihoods(model, conversations: Sequence[Conversation], options: Sequence[str]) -> np.ndarray:
    """log p(option_k | conversation_n) [N, K] from any model with `loglikelihoods` (one pass per conversation
    when it has `option_loglikelihoods`, as `LanguageModel` does)."""
    if hasattr(model, "option_loglikelihoods"):
        return model.option_loglikelihoods(conversations, options)
    return _flat_options(model, conversations, options)


def load(path: str, batch_size: int = 16) -> LanguageModel:
    """The model at `path`: a sajax-train workdir (its newest checkpoint), a HF folder, a GGUF file or a known
    model's name (`sajax.formats.known_models`)."""
    from sajax.config_files import DEFAULT_CONFIG, load_config
    from sajax.formats import loading
    from sajax.train import export

    if export.is_workdir(path):
        config, params, tok, _ = export.restore(path)
    else:
        config, params, tok = loading.load_model_and_tokenizer(load_config(DEFAULT_CONFIG), path)
    return LanguageModel(config, params, tok, batch_size)
