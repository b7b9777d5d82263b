"""TRL / Hugging Face hub preference data (prompt / chosen / rejected; standard or conversational; JSONL, JSON or
Parquet) read as 2-response groups, checked row by row, and trained on."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import with_overrides
from sajax.config_files import DEFAULT_CONFIG, load_config
from sajax.data import alignment, pipeline, preference
from sajax.formats import tokenizer
from sajax.train import loop

STANDARD = [{"prompt": "How do I greet a new neighbour?", "chosen": "Say hello and offer help.",
             "rejected": "Ignore them."},
            {"prompt": "Can I read my partner's messages?", "chosen": "Ask them instead; privacy matters.",
             "rejected": "Sure, secretly.", "score_chosen": 9.0, "score_rejected": 2.5}]
CONVERSATIONAL = [{"prompt": [{"role": "system", "content": "Be kind."},
                              {"role": "user", "content": "My friend lied to me."},
                              {"role": "assistant", "content": "That hurts. What happened?"},
                              {"role": "user", "content": "Should I forgive her?"}],
                   "chosen": [{"role": "assistant", "content": "Talk with her first, then decide."}],
                   "rejected": [{"role": "assistant", "content": "Never speak to her again."}]}]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_every_form_reads_as_rated_pairs(tmp_path):
    standard = alignment.GroupSource(_jsonl(tmp_path / "standard.jsonl", STANDARD), preference_scores=(5.0, 1.0))
    assert len(standard) == 2
    assert standard[0]["responses"] == ["Say hello and offer help.", "Ignore them."]
    assert standard[0]["query"] == STANDARD[0]["prompt"]  # as TRL puts a standard prompt: the text itself
    np.testing.assert_array_equal(standard[0]["scores"], [5.0, 1.0])  # chosen above rejected
    np.testing.assert_array_equal(standard[1]["scores"], [9.0, 2.5])  # the row's own scores
    (tmp_path / "list.json").write_text(json.dumps(STANDARD))
    assert alignment.GroupSource(tmp_path / "list.json")[1]["responses"] == standard[1]["responses"]

    parquet = tmp_path / "conversational.parquet"
    pd.DataFrame(CONVERSATIONAL * 3).to_parquet(parquet)  # as `datasets` / the hub store them
    source = alignment.GroupSource(parquet)
    assert len(source) == 3 and source.where(2) == f"{parquet} row 2"
    group = source[0]
    assert group["responses"] == ["Talk with her first, then decide.", "Never speak to her again."]
    prompt = CONVERSATIONAL[0]["prompt"]
    assert [tuple(turn) for turn in group["messages"]] == [(m["role"], m["content"]) for m in prompt]
    assert source.validate((1.0, 7.0)).responses == 0

    tok = tokenizer.demo_tokenizer(512)
    tok.chat_template = TEMPLATE
    encoder = pipeline.GroupEncoder(tok, 96, 64, num_comp=2, chat=True)
    expected = tok.apply_chat_template(CONVERSATIONAL[0]["prompt"], add_generation_prompt=True, tokenize=False)
    assert encoder.prompt_ids(group) == tok.encode(expected, add_special_tokens=False)  # system + every turn
    text = pipeline.GroupEncoder(tok, 96, 64, num_comp=2, chat=False)
    assert tok.decode(text.prompt_ids(group)).startswith("system: Be kind.")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": "Hello"}, r"bad.jsonl line 2: missing field 'rejected'"),
    ({"prompt": "Hi", "chosen": "", "rejected": "x"}, r"line 2: field 'chosen' must be a non-empty string"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "bot", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, r"line 2: field 'chosen\[0\].role' must be one of"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}],
      "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     r"line 2: field 'prompt\[1\].role' is 'assistant'; a prompt ends with the user's turn"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "a"}] * 2,
      "rejected": [{"role": "assistant", "content": "b"}]}, r"field 'chosen' must hold one assistant message"),
    ({"prompt": "Hi", "chosen": "a", "rejected": "b", "score_chosen": 2, "score_rejected": 3},
     r"line 2: field 'score_chosen' \(2\) must be above 'score_rejected' \(3\)"),
])
def test_a_bad_row_is_named_by_file_row_and_field(tmp_path, row, message):
    with pytest.raises(alignment.DataError, match=message):
        alignment.GroupSource(_jsonl(tmp_path / "bad.jsonl", [STANDARD[0], row]))


def test_a_parquet_file_without_the_columns_is_named(tmp_path):
    path = tmp_path / "other.parquet"
    pd.DataFrame({"question": ["q"], "answer": ["a"]}).to_parquet(path)
    with pytest.raises(alignment.DataError, match=r"other.parquet: no column 'prompt' \(a preference file has "
                                                   r"columns prompt, chosen, rejected; this one has question, answer"):
        alignment.GroupSource(path)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(alignment.DataError, match="broken.parquet: not a readable Parquet file"):
        alignment.GroupSource(tmp_path / "broken.parquet")
    assert not preference.is_preference_file(tmp_path / "missing.jsonl")


def test_dpo_trains_on_a_preference_parquet_file(tmp_path):
    rows = [{"prompt": f"Question {i}: is it fine to {verb} a friend?", "chosen": f"No, {verb}ing hurts trust.",
             "rejected": f"Yes, {verb} them."} for i, verb in enumerate(["lie to", "help", "mock", "thank"] * 4)]
    path = tmp_path / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    cfg = with_overrides(load_config(DEFAULT_CONFIG), **{
        "data.path": str(path), "data.validation_path": str(path), "train.objective": "dpo", "train.steps": 2,
        "train.batch_size": 8, "eval_every": 0, "checkpoint.every": 2, "data.num_comp": 2})
    final = loop.run(cfg, tmp_path / "wd")
    assert final["groups"] == 16 and 0.0 <= final["ranking_accuracy"] <= 1.0
    assert (tmp_path / "wd" / "reference_logp.npz").is_file()
