"""The installed console scripts, run as a user runs them."""

import os
import subprocess
import sys

from conftest import cli_env
from sajax.formats import hf, tokenizer
from sajax.model import decoder

BIN = os.path.dirname(sys.executable)


def _run(*args):
    return subprocess.run([os.path.join(BIN, "sajax-generate"), *args], capture_output=True, text=True, env=cli_env(),
                          timeout=300)


def test_generate_demo_default_runs(tmp_path):
    result = _run("--prompt", "Should you return a lost wallet?", "--config.generate.max_new_tokens=5")
    assert result.returncode == 0, result.stderr
    assert "random tiny model" in result.stdout
    assert "### Prompt: Should you return a lost wallet?\n### Output: " in result.stdout


def test_generate_from_hf_directory(tmp_path, gqa_reference):
    tok = tokenizer.train_tokenizer(tokenizer.demo_corpus(), tmp_path / "tok", vocab_size=400)
    config = gqa_reference[1].replace(vocab_size=400)
    params = decoder.init_params(config, 1)
    hf.save_pretrained(config, params, tmp_path / "model", tokenizer=tok)
    result = _run("--model", str(tmp_path / "model"), "--prompt", "Hello", "--config.generate.temperature=0",
                  "--config.generate.max_new_tokens=4")
    assert result.returncode == 0, result.stderr
    assert f"# {tmp_path / 'model'} on 1 cpu device(s)" in result.stdout


def test_bad_inputs_exit_nonzero_with_named_cause(tmp_path):
    missing = _run("--model", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert f"error: {tmp_path / 'nope' / 'config.json'}: not found" in missing.stderr
    typo = _run("--config.model.hiden_size=8")
    assert typo.returncode == 2 and "hiden_size" in typo.stderr
    no_config = _run(f"--config={tmp_path / 'nope.py'}")
    assert no_config.returncode != 0 and "Traceback" not in no_config.stderr
    assert no_config.stderr.startswith("error: ") and "No such file or directory" in no_config.stderr
    bad_mesh = _run("--config.mesh.data=3")
    assert bad_mesh.returncode == 1 and "error: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices" \
        in bad_mesh.stderr
