"""The offline LLaMA-style tokenizer: trained here, loaded by transformers."""

import shutil

import pytest
import transformers

from sajax.formats import tokenizer

TEXT = "Honesty matters: return the wallet, all 120 dollars of it. Ünïcode → bytes."


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return out, tokenizer.train_tokenizer(tokenizer.demo_corpus(), out, vocab_size=400)


def test_trained_tokenizer_is_llama_style(trained):
    out, tok = trained
    assert len(tok) == 400
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    ids = tok.encode(TEXT)
    assert ids[0] == tokenizer.BOS_ID and tokenizer.UNK_ID not in ids  # BOS added; byte fallback, no <unk>
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert tok.convert_ids_to_tokens(tok.encode("120", add_special_tokens=False)) == ["▁", "1", "2", "0"]


def test_plain_transformers_loads_the_same_tokenizer(trained):
    out, tok = trained
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto.encode(TEXT) == tok.encode(TEXT)
    assert auto.pad_token_id == 3


def test_sentencepiece_model_alone_loads_with_bos(trained, tmp_path):
    out, tok = trained
    shutil.copy(out / "tokenizer.model", tmp_path / "tokenizer.model")
    alone = tokenizer.load_tokenizer(tmp_path)
    assert alone.encode(TEXT) == tok.encode(TEXT)
    assert alone.pad_token == alone.eos_token  # no pad in a bare SentencePiece model: EOS stands in


def test_errors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        tokenizer.load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        tokenizer.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="vocab_size must be >= 320"):
        tokenizer.train_tokenizer(["a b c"], tmp_path / "t", vocab_size=100)
    with pytest.raises(ValueError, match="cannot train a 330-piece tokenizer on this text"):
        tokenizer.train_tokenizer(["abcdefghijklmnopqrstuvwxyz" * 3, "ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖ×ØÙÚÛÜÝÞß"
                                   "àáâãäåæçèéêëìíîïðñòóôõö÷øùúûüýþÿ"], tmp_path / "t", vocab_size=330)
    with pytest.raises(ValueError, match="no text"):
        tokenizer.train_tokenizer(["", "  "], tmp_path / "t")
    assert not (tmp_path / "t").exists()
