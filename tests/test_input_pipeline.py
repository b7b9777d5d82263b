"""Alignment data sources, validation, tokenization/truncation, sampling and the resumable grain stream."""

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sajax.data import alignment, demo, pipeline
from sajax.data.alignment import DataError, GroupSource
from sajax.formats import tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer.train_tokenizer(tokenizer.demo_corpus(), tmp_path_factory.mktemp("tok") / "t", vocab_size=400)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ds"
    return alignment.write_tfds({"train": demo.synthetic_groups(20, seed=0),
                                      "validation": demo.synthetic_groups(5, seed=1)}, out)


def test_tfds_dataset_opens_with_plain_tfds_in_a_clean_process(tfds_dir):
    code = ("import sys, tensorflow_datasets as tfds\n"
            "src = tfds.builder_from_directory(sys.argv[1]).as_data_source('train')\n"
            "r = src[0]\n"
            "print(len(src), sorted(r), r['scores'].dtype, type(r['responses']).__name__)\n"
            "assert 'sajax' not in sys.modules and 'sim' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code, str(tfds_dir)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ("20 ['input', 'instruction', 'kind', 'model', 'query', 'responses', 'scores', "
                                  "'world_id'] float32 list")


def test_json_and_tfds_sources_give_the_same_groups(tfds_dir, tmp_path):
    tfds_source = GroupSource(tfds_dir, "validation")
    release = [{"query": g["query"], "responses": g["responses"], "scores": g["scores"].tolist()}
               for g in (tfds_source[i] for i in range(len(tfds_source)))]
    (tmp_path / "release.json").write_text(json.dumps(release))
    (tmp_path / "release.jsonl").write_text("\n".join(json.dumps(r) for r in release))
    for name in ("release.json", "release.jsonl"):
        source = GroupSource(tmp_path / name)
        assert len(source) == 5
        for i in range(5):
            assert source[i]["query"] == tfds_source[i]["query"]
            assert source[i]["responses"] == tfds_source[i]["responses"]
            np.testing.assert_array_equal(np.float32(source[i]["scores"]), tfds_source[i]["scores"])
        source.validate((1.0, 7.0))


@pytest.mark.parametrize("record, message", [
    ({"responses": ["a"], "scores": [1]}, "record 1: missing field 'query'"),
    ({"query": "q", "responses": [], "scores": []}, "record 1: field 'responses' must be a non-empty list"),
    ({"query": "q", "responses": ["a", ""], "scores": [1, 2]}, r"record 1: field 'responses\[1\]' must be a non-empty"),
    ({"query": "q", "responses": ["a", "b"], "scores": [1]}, "record 1: 2 responses but 1 scores"),
    ({"query": "q", "responses": ["a"], "scores": [float("nan")]}, r"record 1: field 'scores\[0\]' is nan"),
    ({"query": "q", "responses": ["a", "b"], "scores": [3, 9]}, r"record 1: field 'scores\[1\]' is 9, outside"),
    ({"query": "q", "responses": ["a"], "scores": ["7"]}, "record 1: field 'scores' must be a list of numbers"),
])
def test_bad_records_are_named(tmp_path, record, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"query": "fine", "responses": ["ok"], "scores": [4]}, record]))
    with pytest.raises(DataError, match=f"{path} {message}"):
        GroupSource(path).validate((1.0, 7.0))


def test_bad_files_are_named(tmp_path, tfds_dir):
    (tmp_path / "x.json").write_text("[{oops")
    with pytest.raises(DataError, match="x.json line 1 column 3: not valid JSON"):
        GroupSource(tmp_path / "x.json")
    good = json.dumps({"query": "q", "responses": ["a"], "scores": [4]})
    (tmp_path / "x.jsonl").write_text(f"{good}\n{good[:-5]}\n{good}\n")
    with pytest.raises(DataError, match="x.jsonl line 2: not valid JSON"):
        GroupSource(tmp_path / "x.jsonl")
    (tmp_path / "y.jsonl").write_bytes(f"{good}\n{good}\n".encode() + b'{"query": "caf\xe9"}\n')
    with pytest.raises(DataError, match="y.jsonl line 3: not UTF-8 text"):
        GroupSource(tmp_path / "y.jsonl")
    for damage in ("truncate", "flip"):  # a damaged ArrayRecord file is named, whichever record it breaks
        copy = tmp_path / f"ds_{damage}"
        shutil.copytree(tfds_dir, copy)
        shard = next(copy.glob("*-train.array_record-*"))
        data = bytearray(shard.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:  # one bit flipped in the middle of the written bytes (not in the zero padding of a block)
            written = [i for i, byte in enumerate(data) if byte]
            data[written[len(written) // 2]] ^= 0x10
        shard.write_bytes(bytes(data))
        with pytest.raises(DataError, match=rf"{shard}: cannot read record \d+ of split 'train': the file is "
                                            "damaged or truncated"):
            source = GroupSource(copy, "train")
            source.validate((1.0, 7.0))
    (tmp_path / "ds_info").mkdir()
    (tmp_path / "ds_info" / "dataset_info.json").write_text('{"name": ')
    with pytest.raises(DataError, match="ds_info/dataset_info.json: not a readable TFDS dataset description"):
        GroupSource(tmp_path / "ds_info")
    with pytest.raises(FileNotFoundError, match="missing.json: dataset not found"):
        GroupSource(tmp_path / "missing.json")
    with pytest.raises(DataError, match="not a TFDS dataset directory"):
        GroupSource(tmp_path)


def test_truncation_keeps_prompt_end_and_response_start(tok):
    enc = pipeline.GroupEncoder(tok, max_len=10, max_prompt_len=4, num_comp=2)
    prompt, response = list(range(100, 110)), list(range(200, 210))
    tokens, start = enc.pack(prompt, response)
    assert tokens == [tok.bos_token_id, 106, 107, 108, 109, 200, 201, 202, 203, 204] and start == 5
    tokens, start = enc.pack(prompt, [200, 201])  # short response: the prompt takes the room left
    assert tokens == [tok.bos_token_id, 103, 104, 105, 106, 107, 108, 109, 200, 201] and start == 8
    tokens, start = enc.pack([100], list(range(200, 220)))  # short prompt: the response takes the rest
    assert tokens == [tok.bos_token_id, 100] + list(range(200, 208)) and start == 2


def test_encoded_group_masks_prompt_and_pads(tok):
    enc = pipeline.GroupEncoder(tok, max_len=48, max_prompt_len=24, num_comp=3)
    group = {"query": "### Instruction:\nBe kind?\n\n### Response:", "responses": ["Yes, always.", "No."],
             "scores": [6.0, 2.0]}
    out = enc.encode(group, [0, 1])
    assert out["tokens"].shape == (3, 48) and out["valid"].tolist() == [True, True, False]
    prompt_len = len(tok.encode(group["query"]))  # with BOS
    for row, response in enumerate(group["responses"]):
        ids = tok.encode(response, add_special_tokens=False) + [tok.eos_token_id]
        n = prompt_len + len(ids)
        assert out["tokens"][row, prompt_len:n].tolist() == ids
        assert out["loss_mask"][row].tolist() == [0] * prompt_len + [1] * len(ids) + [0] * (48 - n)
        assert out["attention_mask"][row].sum() == n
    assert out["scores"].tolist() == [6.0, 2.0, 0.0] and out["loss_mask"][2].sum() == 0
    with pytest.raises(ValueError, match="data.max_prompt_len must be in 1..max_len-2"):
        pipeline.GroupEncoder(tok, max_len=8, max_prompt_len=8, num_comp=1)


def test_chat_format_puts_instruction_and_input_in_the_template_and_ends_with_end_of_turn(tok):
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == "
                              "'assistant' %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}<s>[assistant] "
                              "{% endif %}")
    enc = pipeline.GroupEncoder(chat_tok, max_len=64, max_prompt_len=40, num_comp=2, chat=True)
    group = {"query": "### Instruction:\nBe kind?\n\n### Input:\nA draft.\n\n### Response:",
             "instruction": "Be kind?", "input": "A draft.", "responses": ["Yes, always."], "scores": [6.0]}
    prompt = tokenizer.encode_chat(chat_tok, "Be kind?\n\nA draft.")
    assert prompt[0] == chat_tok.bos_token_id  # the template's own BOS; none is added before it
    end_of_turn = tokenizer.end_of_turn_ids(chat_tok)
    assert end_of_turn == [chat_tok.eos_token_id]  # "</s>" after an assistant message
    response = chat_tok.encode("Yes, always.", add_special_tokens=False) + end_of_turn
    out = enc.encode(group, [0])
    n = len(prompt) + len(response)
    assert out["tokens"][0, :n].tolist() == prompt + response
    assert out["loss_mask"][0, :n].tolist() == [0] * len(prompt) + [1] * len(response)
    release = {"query": "Be kind?", "responses": ["Yes."], "scores": [6.0]}  # release format: no instruction
    assert enc.prompt_ids(release) == tokenizer.encode_chat(chat_tok, "Be kind?")
    with pytest.raises(ValueError, match="prompt_format is 'chat' but the tokenizer has no chat template"):
        pipeline.GroupEncoder(tok, max_len=64, max_prompt_len=40, num_comp=2, chat=True)


def test_stream_is_deterministic_resumable_and_resamples_each_epoch(tok, tfds_dir):
    source = GroupSource(tfds_dir, "train")
    enc = pipeline.GroupEncoder(tok, max_len=32, max_prompt_len=16, num_comp=2)
    make = lambda: iter(pipeline.train_dataset(source, enc, batch_size=4, seed=3))  # noqa: E731
    a, b = make(), make()
    first = [next(a) for _ in range(12)]  # 12 batches × 4 = 48 groups: more than two epochs of 20
    for x, y in zip(first, [next(b) for _ in range(12)]):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    c = make()
    for _ in range(5):
        next(c)
    state = c.get_state()
    d = make()
    d.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip (orbax JsonSave)
    for x in first[5:]:
        np.testing.assert_array_equal(next(d)["tokens"], x["tokens"])
    epoch1 = np.concatenate([b["tokens"] for b in first[:5]])
    epoch2 = np.concatenate([b["tokens"] for b in first[5:10]])
    assert not np.array_equal(epoch1, epoch2)  # another order and other samples in the next epoch


def test_processes_split_each_global_batch_into_the_batches_of_one_process(tok, tfds_dir):
    # P processes each yield their block of rows of every global batch; side by side they are the batches of one
    # process, so a run's batches do not depend on how many processes read them
    enc = pipeline.GroupEncoder(tok, max_len=32, max_prompt_len=16, num_comp=3)
    source = GroupSource(tfds_dir, "validation")  # 5 groups → global batches of 4: 4, then 1 + 3 padding
    one = list(pipeline.eval_batches(source, enc, batch_size=4, seed=0))
    for count in (2, 4):
        per_process = [list(pipeline.eval_batches(source, enc, batch_size=4, seed=0, process_index=p,
                                                        process_count=count)) for p in range(count)]
        assert [len(b) for b in per_process] == [2] * count
        for g, whole in enumerate(one):
            for key in whole:
                np.testing.assert_array_equal(np.concatenate([b[g][key] for b in per_process]), whole[key])
    assert int(one[1]["valid"].any(axis=1).sum()) == 1
    train_source = GroupSource(tfds_dir, "train")  # 20 groups: 6 batches of 8 cover two epochs and a half
    single = iter(pipeline.train_dataset(train_source, enc, batch_size=8, seed=0))
    streams = [iter(pipeline.train_dataset(train_source, enc, batch_size=8, seed=0, process_index=p,
                                                 process_count=2)) for p in range(2)]
    for _ in range(6):
        whole, parts = next(single), [next(s) for s in streams]
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])
    with pytest.raises(ValueError, match="batch size 8 is not divisible by 3 processes"):
        pipeline.train_dataset(train_source, enc, batch_size=8, seed=0, process_count=3)


def test_write_tfds_replaces_only_when_complete(tmp_path):
    out = alignment.write_tfds({"train": demo.synthetic_groups(3, seed=0)}, tmp_path / "ds")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(DataError, match="train record 1: 2 responses but 1 scores"):
        alignment.write_tfds({"train": [demo.synthetic_groups(1, 0)[0],
                                             {"query": "q", "responses": ["a", "b"], "scores": [1.0]}]}, out)
    assert sorted(p.name for p in out.iterdir()) == before and len(GroupSource(out)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_reference_logps_follow_their_records_across_epochs(tok, tfds_dir):
    source = GroupSource(tfds_dir, "train")  # 20 groups
    scores = [np.asarray(source[i]["scores"], np.float32) for i in range(len(source))]
    reference = pipeline.ReferenceLogps(np.concatenate([[0], np.cumsum([len(s) for s in scores])]),
                                              np.concatenate(scores))  # reference value = the response's score
    enc = pipeline.GroupEncoder(tok, max_len=32, max_prompt_len=16, num_comp=2)
    stream = iter(pipeline.train_dataset(source, enc, batch_size=4, seed=1, reference=reference))
    for _ in range(15):  # three epochs
        batch = next(stream)
        np.testing.assert_array_equal(batch["reference_logp"][batch["valid"]], batch["scores"][batch["valid"]])
