"""The trainer end to end: learning signal, resume after SIGKILL, sharded step, guards, export, configs."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch
import transformers

from conftest import cli_env, right_padded_batch, torch_logits, with_overrides
from sajax.config_files import load_module
from sajax.data import alignment, demo, pipeline
from sajax.data import batch as batch_lib
from sajax.formats import hf, loading, tokenizer
from sajax.model import decoder
from sajax.model.config import ModelConfig
from sajax.parallel import sharding
from sajax.train import checkpoint, export, loop, losses
from sajax.train import step as ts
from sajax.train.losses import OBJECTIVES

BIN = os.path.dirname(sys.executable)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
tiny = load_module(CONFIGS / "tiny.py")
ENV_ONE_DEVICE = cli_env()


def tiny_config(**overrides):
    return with_overrides(tiny.get_config(), **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default tiny run (stable_alignment on the synthetic demo data), here on 8 fake devices."""
    workdir = tmp_path_factory.mktemp("run") / "wd"
    final = loop.run(tiny.get_config(), workdir)
    return workdir, final


def test_default_run_learns_and_records_everything(trained):
    workdir, final = trained
    assert final["ranking_accuracy"] >= 0.7  # chance is 0.5; the ratings depend on the words used
    assert json.loads((workdir / "eval.json").read_text())["ranking_accuracy"] == final["ranking_accuracy"]
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train_lines] == list(range(10, 201, 10))
    assert train_lines[-1]["train/loss"] < train_lines[0]["train/loss"]
    for key in ("sft", "penalty", "violated_margin_fraction", "ranking_accuracy", "grad_norm", "learning_rate",
                "tokens_per_second", "mfu"):
        assert np.isfinite(train_lines[-1][f"train/{key}"]), key
    assert any("eval/ranking_accuracy" in line and line["step"] == 100 for line in lines)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [150, 200]
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"train/loss" in events[0].read_bytes()


def test_export_writes_a_transformers_checkpoint(trained, tmp_path):
    workdir, _ = trained
    path, step = export.export(str(workdir), str(tmp_path / "hf"))
    assert step == 200
    config, params = loading.load_pretrained(path)
    state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "200" / "state")
    np.testing.assert_array_equal(params["layers_1"]["mlp"]["up_proj"],
                                  np.asarray(state["params"]["layers_1"]["mlp"]["up_proj"]))
    assert tokenizer.load_tokenizer(path).encode("kindly") == tokenizer.load_tokenizer(workdir / "tokenizer").encode(
        "kindly")
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
        export.export(str(workdir), str(tmp_path / "x"), step=7)
    # sajax-eval takes the workdir itself: the same model as the export (a base model: HH-style text prompts)
    from sajax.evals import multiple_choice
    from sajax.infer import lm
    questions = multiple_choice.read(multiple_choice.BUILT_IN)
    questions.items[4:] = []
    from_workdir, from_export = lm.load(str(workdir), batch_size=8), lm.load(str(path), batch_size=8)
    assert not from_workdir.chat
    assert multiple_choice.evaluate(from_workdir, questions) == multiple_choice.evaluate(from_export, questions)
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "sajax-eval"), f"--model={workdir}",
                             "--eval=multiple_choice", "--eval=are_you_sure", "--limit=4", f"--out={tmp_path / 'ev'}"],
                            capture_output=True, text=True, env=ENV_ONE_DEVICE, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["eval"] for line in lines] == ["multiple_choice", "are_you_sure"] and lines[0]["n"] == 4
    assert json.loads((tmp_path / "ev" / "are_you_sure.json").read_text()) == lines[1]
    assert "flip_rate" in result.stderr  # the table
    bad = subprocess.run([os.path.join(os.path.dirname(sys.executable), "sajax-eval"), f"--model={workdir}",
                          "--eval=truthfulness"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "--eval: ['truthfulness'] not among" in bad.stderr


def _train_cli(workdir, *overrides, wait=True):
    args = [os.path.join(BIN, "sajax-train"), f"--workdir={workdir}", *overrides]
    if wait:
        return subprocess.run(args, capture_output=True, text=True, env=ENV_ONE_DEVICE, timeout=600)
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV_ONE_DEVICE)


def _final_params(workdir: Path, step: int):
    return jax.device_get(ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state"))


def test_sigkill_then_resume_is_bit_identical_with_lora_then_exports_merged_and_for_peft(tmp_path, tiny_hf_dir):
    """A LoRA run (adapters with dropout on a base from a HF folder) killed after its first checkpoint: resumed, it
    gives the uninterrupted run's adapters bit for bit (the base is reloaded, dropout masks come from the step) and
    its metrics; `sajax-export --peft` then writes the merged model and a PEFT adapter that compute it."""
    # checkpoints every 10 steps, log lines every 4: a run resumed from a checkpoint between two log steps must
    # log the same means over the same steps as the uninterrupted run
    flags = ["--config.train.steps=80", "--config.train.batch_size=4", "--config.checkpoint.every=10",
             "--config.log_every=4", "--config.eval_every=0", "--config.checkpoint.keep=20",
             f"--config.init_from={tiny_hf_dir}", "--config.lora.rank=4", "--config.lora.dropout=0.1",
             "--config.optimizer.learning_rate=0.01"]
    straight = _train_cli(tmp_path / "straight", *flags)
    assert straight.returncode == 0, straight.stderr

    killed_dir = tmp_path / "killed"
    process = _train_cli(killed_dir, *flags, wait=False)
    deadline = time.time() + 300
    while not any(p.name.isdigit() for p in (killed_dir / "checkpoints").glob("*")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into the steps after the first checkpoint
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = sorted(int(p.name) for p in (killed_dir / "checkpoints").glob("*") if p.name.isdigit())
    assert saved and saved[-1] < 80, f"the run was not killed mid-way: {saved}"

    resumed = _train_cli(killed_dir, *flags)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _final_params(tmp_path / "straight", 80), _final_params(killed_dir, 80)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    assert all(name.endswith(("_lora_a", "_lora_b")) for name in _leaf_names(a["params"]))  # adapters only
    strip = lambda line: {k: v for k, v in json.loads(line).items() if "tokens_per" not in k and "mfu" not in k}  # noqa
    lines = lambda d: [strip(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines(killed_dir) == lines(tmp_path / "straight")  # no step lost or duplicated in the metrics

    exported = subprocess.run([os.path.join(BIN, "sajax-export"), f"--workdir={killed_dir}", f"--out={tmp_path / 'hf'}",
                               f"--peft={tmp_path / 'peft'}"], capture_output=True, text=True, env=ENV_ONE_DEVICE)
    assert exported.returncode == 0, exported.stderr
    config, adapted, _, _ = export.restore(killed_dir, merge=False)
    ids, mask = right_padded_batch(config.vocab_size)
    expected = np.asarray(decoder.forward(config, adapted, ids, mask))[mask == 1]
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    assert np.abs(torch_logits(base, ids, mask)[mask == 1] - expected).max() > 1e-3  # the adapters learned
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()  # adapters into `base`
    for model in (merged, with_adapter):
        np.testing.assert_allclose(torch_logits(model, ids, mask)[mask == 1], expected, atol=1e-5)


def _leaf_names(tree) -> list[str]:
    return [str(getattr(path[-1], "key", path[-1])) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _steps_on(mesh, cfg, config, params, batch, steps: int = 2):
    """`steps` full train steps (clip, schedule, AdamW, donation) on `mesh`, the same batch each time: the final
    state and every step's metrics."""
    tx = ts.make_optimizer(cfg.optimizer, cfg.train.steps, config)
    schedule = ts.learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    shardings = ts.state_shardings(config, tx, mesh)
    metrics = []
    with sharding.activation_rules(mesh):
        state = ts.init_state(jax.device_put(params, shardings.params), tx, shardings)
        step = ts.make_train_step(config, cfg.train, tx, schedule, mesh, shardings)
        for _ in range(steps):
            state, m = step(state, pipeline.to_global(batch, mesh), {})
            metrics.append(jax.device_get(m))
    return state, metrics


@pytest.fixture(scope="module")
def step_inputs(tmp_path_factory):
    cfg = tiny_config(**{"train.batch_size": 8, "optimizer.warmup_steps": 0, "model.vocab_size": 512})
    config = ModelConfig.from_dict(cfg.model)
    tok = tokenizer.train_tokenizer(tokenizer.demo_corpus(), tmp_path_factory.mktemp("t") / "tok", vocab_size=512)
    encoder = pipeline.GroupEncoder(tok, cfg.data.max_len, cfg.data.max_prompt_len, cfg.data.num_comp)
    groups = demo.synthetic_groups(8, seed=5)
    batch = pipeline.stack([encoder.encode(g, [0, 1, 2]) for g in groups])
    params = jax.device_get(decoder.init_params(config, 3))
    return cfg, config, params, batch, encoder


def _gradient_fn(cfg, config, mesh=None, accum: int = 1):
    """batch → (gradients, loss, metrics) over `accum` micro-batches, jitted once on `mesh` (default: 1 device)."""
    mesh = mesh or sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    train_cfg = with_overrides(ml_collections.ConfigDict(cfg.train.to_dict()), grad_accum_steps=accum)
    fn = jax.jit(functools.partial(ts.accumulated_gradients, config=config, train_cfg=train_cfg))

    def gradients(params, batch):
        with sharding.activation_rules(mesh):
            grads, sums = fn(jax.device_put(params, decoder.param_shardings(config, mesh)),
                             pipeline.to_global(batch, mesh))
        loss, metrics = losses.reduce(sums)
        return jax.device_get(grads), float(loss), {k: float(v) for k, v in metrics.items()}
    return gradients


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


def _minus(a, b):
    return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


def test_eight_device_gradients_equal_one_device(step_inputs):
    cfg, config, params, batch, _ = step_inputs
    g1, loss1, _ = _gradient_fn(cfg, config)(params, batch)
    g8, loss8, _ = _gradient_fn(cfg, config, sharding.make_mesh(data=2, fsdp=2, tensor=2))(params, batch)
    assert _norm(g1) > 1e-2
    assert _norm(_minus(g8, g1)) <= 1e-6 * _norm(g1)
    assert abs(loss8 - loss1) <= 1e-6 * loss1


def test_eight_device_train_steps_equal_one_device(step_inputs):
    # Parameters after an AdamW step are not compared across devices: Adam's first update lr·g/(|g| + eps) turns
    # the ~1e-9 reduction-order noise of two summation orders into ~1e-5 parameter differences where |g| ≈ eps.
    # The loss after that update is well-conditioned (those parameters have gradients ≈ 0): it checks the whole
    # sharded step (loss, clipping, schedule, AdamW, donation) on 8 devices against 1.
    cfg, config, params, batch, _ = step_inputs
    state1, m1 = _steps_on(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), cfg, config, params, batch)
    state8, m8 = _steps_on(sharding.make_mesh(data=2, fsdp=2, tensor=2), cfg, config, params, batch)
    for one, eight in zip(m1, m8):
        for key in ("loss", "grad_norm", "sft", "penalty"):
            assert abs(one[key] - eight[key]) <= 1e-5 * abs(one[key]), key
    assert m1[1]["loss"] < m1[0]["loss"] - 1e-3  # the first update changed the model
    assert state8.params["layers_0"]["self_attn"]["q_proj"].sharding.spec == jax.sharding.PartitionSpec(
        "fsdp", "tensor", None)
    adam = state8.opt_state[1][0]
    assert adam.mu["lm_head"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


@pytest.fixture(scope="module")
def ragged_batch(step_inputs):
    """8 groups whose 4 micro-batches (rows a and a + 4, as `_split_microbatches` takes them) differ in groups
    (two rows are batch padding), valid responses (K = 1–3), ties and DPO pairs (2, 1, 1, 2)."""
    _, _, _, _, encoder = step_inputs
    groups = demo.synthetic_groups(8, seed=11)
    ratings = [[7, 2, 4], [5, 5, 1], [3, 3, 3], [6], None, None, [2, 6], [4, 1, 1]]
    rng = np.random.default_rng(0)
    rows = []
    for group, scores in zip(groups, ratings):
        if scores is None:
            rows.append(encoder.empty())
            continue
        group = {**group, "responses": group["responses"][:len(scores)], "scores": scores}
        rows.append(encoder.encode(group, list(range(len(scores))), rng.normal(-30, 5, len(scores))))
    return pipeline.stack(rows)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradient_accumulation_equals_one_big_batch(step_inputs, ragged_batch, objective):
    cfg, config, params, _, _ = step_inputs
    cfg = tiny_config(**{"train.objective": objective})
    one_batch = _gradient_fn(cfg, config)
    big, loss, metrics = one_batch(params, ragged_batch)
    accumulated, loss4, metrics4 = _gradient_fn(cfg, config, accum=4)(params, ragged_batch)
    assert _norm(big) > 1e-3
    assert _norm(_minus(accumulated, big)) <= 1e-5 * _norm(big)
    assert loss4 == pytest.approx(loss, rel=1e-6)
    assert metrics4 == pytest.approx(metrics, rel=1e-6)
    # averaging the 4 micro-batches' mean gradients (each divided by its own groups or pairs) is not this batch's
    # gradient: the comparison above can fail
    micro = [jax.tree.map(lambda x, a=a: x[a::4], ragged_batch) for a in range(4)]
    naive = jax.tree.map(lambda *g: sum(g) / 4, *[one_batch(params, m)[0] for m in micro])
    assert _norm(_minus(naive, big)) > 1e-3 * _norm(big)


def test_bad_data_and_other_configs_never_touch_checkpoints(tmp_path):
    data = tmp_path / "data.json"
    groups = [{"query": g["query"], "responses": g["responses"], "scores": g["scores"]}
              for g in demo.synthetic_groups(16, seed=0)]
    data.write_text(json.dumps(groups))
    cfg = tiny_config(**{"data.path": str(data), "train.steps": 4, "checkpoint.every": 2, "log_every": 2})
    loop.run(cfg, tmp_path / "wd")
    snapshot = lambda: {p: p.read_bytes() for p in (tmp_path / "wd" / "checkpoints").rglob("*")  # noqa: E731
                        if p.is_file()}
    before = snapshot()
    groups[11]["scores"][2] = 9.0
    data.write_text(json.dumps(groups))
    with pytest.raises(alignment.DataError, match=rf"{data} record 11: field 'scores\[2\]' is 9, outside"):
        loop.run(tiny_config(**{"data.path": str(data), "train.steps": 4, "checkpoint.every": 2, "log_every": 2}),
                  tmp_path / "wd")
    data.write_text(json.dumps([{**g, "scores": [min(s, 7.0) for s in g["scores"]]} for g in groups]))
    with pytest.raises(loop.TrainingError, match=r"another configuration \(train.objective: "
                                                  r"'stable_alignment' → 'sft'"):
        loop.run(tiny_config(**{"data.path": str(data), "train.steps": 4, "checkpoint.every": 2, "log_every": 2,
                                 "train.objective": "sft"}), tmp_path / "wd")
    with pytest.raises(ValueError, match="train.objective must be one of"):
        loop.run(tiny_config(**{"train.objective": "ppo"}), tmp_path / "other")
    with pytest.raises(ValueError, match=r"train.batch_size / grad_accum_steps = 6 groups must be divisible by"):
        loop.run(tiny_config(**{"train.batch_size": 6}), tmp_path / "other2")
    assert snapshot() == before


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(**{"train.steps": 6, "checkpoint.every": 1, "log_every": 1, "optimizer.learning_rate": 1e30,
                         "optimizer.warmup_steps": 0, "optimizer.clip_norm": 1e30})
    with pytest.raises(loop.TrainingError, match=r"non-finite loss or gradient at or before step \d; stopped "
                                                  r"without saving. Last good checkpoint: \d"):
        loop.run(cfg, tmp_path / "wd")
    ckpts = sorted(int(p.name) for p in (tmp_path / "wd" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts and max(ckpts) < 6
    state = _final_params(tmp_path / "wd", max(ckpts))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_dpo_reference_logprobs_come_from_the_initial_model_once(tmp_path):
    """With shared-prompt packing (data.packing): reference log-probs, train and eval steps on packed rows."""
    overrides = {"train.objective": "dpo", "train.steps": 3, "eval_every": 0, "checkpoint.every": 3,
                 "data.packing": True}
    cfg = tiny_config(**overrides)
    final = loop.run(cfg, tmp_path / "wd")
    assert 0 <= final["ranking_accuracy"] <= 1 and final["groups"] == 64  # the packed evaluation saw every group
    path = tmp_path / "wd" / "reference_logp.npz"
    stamp = path.stat().st_mtime_ns
    config = ModelConfig.from_dict(cfg.model)
    tok = tokenizer.load_tokenizer(tmp_path / "wd" / "tokenizer")
    encoder = pipeline.GroupEncoder(tok, cfg.data.max_len, cfg.data.max_prompt_len, cfg.data.num_comp)
    source = alignment.GroupSource(tmp_path / "wd" / "demo_dataset", "validation")
    mesh = sharding.make_mesh()
    initial = jax.device_put(decoder.init_params(config, cfg.seed), decoder.param_shardings(config, mesh))
    with np.load(path) as stored:
        offsets, values = stored["offsets_1"], stored["values_1"]
    group = source[2]
    prompt = tok.encode(group["query"], add_special_tokens=False)
    for k, response in enumerate(group["responses"]):
        tokens, start = encoder.pack(prompt, tok.encode(response, add_special_tokens=False) + [tok.eos_token_id])
        logits = decoder.forward(config, initial, np.asarray([tokens]), np.ones((1, len(tokens)), np.int32))
        logprobs = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
        expected = sum(float(logprobs[j - 1, tokens[j]]) for j in range(start, len(tokens)))
        assert abs(values[offsets[2] + k] - expected) <= 1e-4
    cfg_resume = tiny_config(**overrides)
    loop.run(cfg_resume, tmp_path / "wd")
    assert path.stat().st_mtime_ns == stamp  # not recomputed on resume


@pytest.mark.parametrize("name, params_range, k_proj", [
    ("llama3_8b", (8.0e9, 8.1e9), (32, 4096, 8, 128)),  # Llama-3.1-8B: 8.03B
    ("qwen2_5_7b", (7.6e9, 7.7e9), (28, 3584, 4, 128)),  # Qwen2.5-7B: 7.62B
])
def test_pod_configs_train_step_shapes(name, params_range, k_proj):
    cfg = load_module(CONFIGS / f"{name}.py").get_config()
    config = ModelConfig.from_dict(cfg.model)
    assert params_range[0] < config.num_params() < params_range[1]
    tx = ts.make_optimizer(cfg.optimizer, cfg.train.steps, config)
    schedule = ts.learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    params = decoder.param_shapes(config)
    state = ts.abstract_state(config, tx)
    batch = batch_lib.abstract(cfg.train.batch_size, cfg.data.num_comp, cfg.data.max_len)
    new_state, metrics = jax.eval_shape(
        lambda s, x: ts.train_step(s, x, config=config, train_cfg=cfg.train, tx=tx, schedule=schedule), state, batch)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state.params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params)
    assert new_state.params["layers"]["self_attn"]["k_proj"].shape == k_proj
    assert config.num_params() == sum(x.size for x in jax.tree.leaves(params))
    assert metrics["loss"].shape == () and metrics["grad_norm"].dtype == np.float32
    shardings = decoder.param_shardings(config, sharding.make_mesh(data=1, fsdp=4, tensor=2))
    assert shardings["layers"]["mlp"]["up_proj"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def _snapshot(directory: Path) -> dict:
    """Every file under `directory` with its bytes (empty when it does not exist)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A HF checkpoint with the tiny config's architecture (random weights) and the demo tokenizer."""
    config = ModelConfig.from_dict(tiny.get_config().model)
    path = tmp_path_factory.mktemp("hf") / "tiny"
    return hf.save_pretrained(config, decoder.init_params(config, 0), path, tokenizer=tokenizer.demo_tokenizer(512))


def test_a_rejected_start_leaves_the_workdir_as_it_was(tmp_path, tiny_hf_dir):
    groups = [{"query": g["query"], "responses": g["responses"], "scores": g["scores"]}
              for g in demo.synthetic_groups(16, seed=0)]
    data = tmp_path / "data.json"
    good = dict(**{"data.path": str(data), "init_from": str(tiny_hf_dir), "train.steps": 2, "eval_every": 0,
                   "log_every": 1, "mesh.data": 4, "mesh.tensor": 2})
    damaged = {}
    for name, damage in (("truncated", lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:5000])),
                         ("config", lambda d: (d / "config.json").write_text('{"vocab_size": 512,')),
                         ("tokenizer", lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "trunc'))):
        damaged[name] = tmp_path / f"hf_{name}"
        shutil.copytree(tiny_hf_dir, damaged[name])
        damage(damaged[name])
    workdir = tmp_path / "wd"
    nan_scores = [dict(g) for g in groups]
    nan_scores[3] = {**groups[3], "scores": [groups[3]["scores"][0], float("nan"), *groups[3]["scores"][2:]]}
    cases = [
        (nan_scores, {}, alignment.DataError, rf"{data} record 3: field 'scores\[1\]' is nan, not a finite"),
        (groups, {"train.batch_size": 6}, ValueError, r"= 6 groups must be divisible by mesh data × fsdp = 4"),
        (groups, {"init_from": str(damaged["truncated"])}, ValueError,
         rf"{damaged['truncated'] / 'model.safetensors'}: not a readable safetensors file"),
        (groups, {"init_from": str(damaged["config"])}, ValueError,
         rf"{damaged['config'] / 'config.json'} line 1 column \d+: not valid JSON"),
        (groups, {"init_from": str(damaged["tokenizer"])}, ValueError,
         rf"{damaged['tokenizer'] / 'tokenizer.json'} line 1 column \d+: not valid JSON"),
    ]
    for records, overrides, error, message in cases:
        data.write_text(json.dumps(records))
        with pytest.raises(error, match=message):
            loop.run(tiny_config(**{**good, **overrides}), workdir)
        assert not workdir.exists()
    data.write_text(json.dumps(groups))
    loop.run(tiny_config(**good), workdir)  # the corrected command, same workdir
    assert (workdir / "checkpoints" / "2").is_dir()
    before = _snapshot(workdir)
    data.write_text(json.dumps(nan_scores))
    with pytest.raises(alignment.DataError, match="is nan"):  # a rejected resume changes nothing either
        loop.run(tiny_config(**good), workdir)
    assert _snapshot(workdir) == before


def test_train_cli_reports_bad_input_without_traceback(tmp_path, tiny_hf_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"query": "q", "responses": ["a", "b"], "scores": [1]}]))
    result = _train_cli(tmp_path / "wd", f"--config.data.path={bad}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {bad} record 0: 2 responses but 1 scores"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "wd").exists()
    truncated = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, truncated)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:5000])
    broken = _train_cli(tmp_path / "wd", f"--config.init_from={truncated}")
    assert broken.returncode == 1 and "Traceback" not in broken.stderr and "Event loop" not in broken.stderr
    assert broken.stderr.strip().splitlines()[-1].startswith(f"error: {truncated / 'model.safetensors'}: not a "
                                                             "readable safetensors file")
    assert not (tmp_path / "wd").exists()
    missing = _train_cli(tmp_path / "wd2", "--config.train.stepz=3")
    assert missing.returncode == 2 and "stepz" in missing.stderr


def test_init_from_a_hf_checkpoint_then_export_from_the_workdir_alone(trained, tmp_path):
    workdir, _ = trained
    hf_dir, _ = export.export(str(workdir), str(tmp_path / "hf"))
    cfg = tiny_config(**{"init_from": str(hf_dir), "train.steps": 1, "optimizer.learning_rate": 0.0,
                         "optimizer.weight_decay": 0.0, "eval_every": 0, "checkpoint.every": 1})
    loop.run(cfg, tmp_path / "wd")
    _, loaded = loading.load_pretrained(hf_dir)
    state = _final_params(tmp_path / "wd", 1)
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(state["params"]), loaded))
    shutil.move(hf_dir, tmp_path / "moved")  # export needs nothing outside the workdir
    out, step = export.export(str(tmp_path / "wd"), str(tmp_path / "exported"))
    assert step == 1 and jax.tree.all(jax.tree.map(np.array_equal, loading.load_pretrained(out)[1], loaded))
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        loop.run(tiny_config(**{"init_from": str(tmp_path / "nothing")}), tmp_path / "wd2")


def test_export_refuses_a_workdir_without_checkpoints(trained, tmp_path):
    workdir, _ = trained
    shutil.copytree(workdir, tmp_path / "wd", ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(FileNotFoundError, match="checkpoints: not found; the run has saved no checkpoint yet"):
        export.export(str(tmp_path / "wd"), str(tmp_path / "out"))
    (tmp_path / "wd" / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoints: no checkpoint; the run has saved none yet"):
        export.export(str(tmp_path / "wd"), str(tmp_path / "out"))
    assert not any((tmp_path / "wd" / "checkpoints").iterdir()) and not (tmp_path / "out").exists()


def _damage_largest_file(checkpoint_dir: Path) -> Path:
    largest = max((p for p in checkpoint_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    return largest


def test_a_damaged_latest_checkpoint_is_named_and_skipped(trained, tmp_path, capfd):
    workdir, _ = trained
    copy = tmp_path / "wd"
    shutil.copytree(workdir, copy)
    intact = _final_params(copy, 200)
    metrics = (copy / "metrics.jsonl").read_text()
    _damage_largest_file(copy / "checkpoints" / "200" / "state")
    path, step = export.export(str(copy), str(tmp_path / "hf"))  # export: the newest readable one, with a warning
    assert step == 150 and f"warning: {copy / 'checkpoints' / '200'}: cannot be restored" in capfd.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match=rf"{copy / 'checkpoints' / '200'}: cannot be restored"):
        export.export(str(copy), str(tmp_path / "hf200"), step=200)
    loop.run(tiny.get_config(), copy)  # resumes from 150, moves 200 aside, trains 151–200 again
    assert f"warning: {copy / 'checkpoints' / '200'}: cannot be restored" in capfd.readouterr().err
    assert (copy / "broken_checkpoints" / "200" / "state").is_dir()
    assert jax.tree.all(jax.tree.map(np.array_equal, _final_params(copy, 200), intact))
    assert (copy / "metrics.jsonl").read_text().count("\n") == metrics.count("\n")
    for step in (150, 200):  # no readable checkpoint at all: named, stopped, nothing moved
        _damage_largest_file(copy / "checkpoints" / str(step) / "state")
    with pytest.raises(loop.TrainingError, match=r"no checkpoint can be restored: .*/200: cannot .*/150: cannot"):
        loop.run(tiny.get_config(), copy)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["150", "200"]
