"""Tokenizers: load any transformers tokenizer from a local directory, or train a small LLaMA-style one offline.

The trained tokenizer is a SentencePiece BPE model like LLaMA's (unk=0, bos=1, eos=2, byte fallback, digits
split) plus a `<pad>` piece (id 3), saved with transformers' files next to `tokenizer.model`, so both
`AutoTokenizer.from_pretrained(dir)` and `load_tokenizer(dir)` give the same tokenizer, which adds BOS.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

# sajax runs without PyTorch; silence transformers' advice that it is missing (set the variable to override).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
import transformers  # noqa: E402

from sajax import fileutil
from sajax.formats import gguf  # noqa: E402

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_MIN_BYTE_FALLBACK_VOCAB = 320  # 256 byte pieces + special and required pieces


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """A transformers tokenizer from a local directory (no downloads). A directory holding only a SentencePiece
    `tokenizer.model` is read as a LLaMA tokenizer that adds BOS. A tokenizer without a pad token gets EOS as
    its pad token (batches need one; the masks make its value irrelevant). A `.gguf` file: the tokenizer its
    metadata describes, chat template included (`sajax.formats.gguf`)."""
    path = Path(path)
    if gguf.is_gguf(path):
        tokenizer = gguf.load_tokenizer(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: tokenizer directory not found")
    json_files = [path / name for name in ("tokenizer.json", "tokenizer_config.json") if (path / name).is_file()]
    if not json_files and not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json, tokenizer_config.json or tokenizer.model")
    for file in json_files:
        fileutil.read_json(file)  # a broken file is named, not reported as a transformers traceback
    try:
        if json_files:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            tokenizer = transformers.LlamaTokenizer.from_pretrained(str(path), add_bos_token=True,
                                                                    local_files_only=True)
    except Exception as e:  # tokenizers' and sentencepiece's own exception types for a damaged file
        raise ValueError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0] if str(e) else e!r})") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_chat(tokenizer, conversation, assistant_prefix: str = "") -> list[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template, ending where the assistant's reply
    begins (plus `assistant_prefix`, the first words of that reply, when given). `conversation` is one user turn's
    text, or (role, text) turns ending with the user's. The template writes its own special tokens (BOS included),
    so none are added here."""
    turns = [("user", conversation)] if isinstance(conversation, str) else conversation
    text = tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in turns],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text + assistant_prefix, add_special_tokens=False)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token a chat template writes right after an assistant message (<|im_end|>, <|eot_id|>, …), so
    generation can stop there; [] without a template (or when the template ends a turn in plain text)."""
    if not has_chat_template(tokenizer):
        return []
    probe = "sajax-end-of-turn-probe"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                                         tokenize=False)
    after = tokenizer.encode(text.split(probe, 1)[-1], add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return after[:1] if after and after[0] in special else []


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 512,
                    ) -> transformers.PreTrainedTokenizerBase:
    """Trains a LLaMA-style SentencePiece BPE tokenizer of `vocab_size` pieces on `texts` (one sentence or line
    each) and saves it to `out_dir` (replaced as a whole only once complete). Returns the loaded tokenizer."""
    if vocab_size < _MIN_BYTE_FALLBACK_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_BYTE_FALLBACK_VOCAB} for byte fallback, got {vocab_size}")
    lines = [t for t in texts if t and t.strip()]
    if not lines:
        raise ValueError("no text to train a tokenizer on")
    out_dir = Path(out_dir)
    with fileutil.replace_directory(out_dir) as tmp:
        _train_sentencepiece(lines, tmp, vocab_size)
        (tmp / "tokenizer.vocab").unlink()
        tokenizer = transformers.LlamaTokenizer.from_pretrained(str(tmp), add_bos_token=True, local_files_only=True)
        tokenizer.pad_token = "<pad>"
        tokenizer.save_pretrained(str(tmp))
    return load_tokenizer(out_dir)


def demo_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerBase:
    """The offline demo tokenizer (trained on `demo_corpus()`; deterministic, so the same on every call and
    machine), trained in a temporary directory: nothing is written where the caller works."""
    with tempfile.TemporaryDirectory(prefix="sajax-tokenizer-") as scratch:
        return train_tokenizer(demo_corpus(), Path(scratch) / "tokenizer", vocab_size=vocab_size)


def _train_sentencepiece(lines: list[str], directory: Path, vocab_size: int) -> None:
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            hard_vocab_limit=True, num_threads=1, minloglevel=2)
    except RuntimeError as e:  # e.g. a vocab_size too small or too large for the text
        raise ValueError(f"cannot train a {vocab_size}-piece tokenizer on this text: {e}") from e


def demo_corpus() -> list[str]:
    """The built-in English text (written for this project) that trains the offline demo tokenizer."""
    text = resources.files("sajax").joinpath("assets/demo_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]
