"""The trainer end to end: learning signal, resume after SIGKILL, sharded step, guards, export, configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import with_overrides
from sajax import alignment_data, demo_data, export, hf, input_pipeline, model, sharding, tokenizer
from sajax import train, train_step as ts
from sajax.config import LlamaConfig
from sajax.config_files import load_module

BIN = os.path.dirname(sys.executable)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
tiny, llama3_8b = load_module(CONFIGS / "tiny.py"), load_module(CONFIGS / "llama3_8b.py")
ENV_ONE_DEVICE = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def tiny_config(**overrides):
    return with_overrides(tiny.get_config(), **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default tiny run (stable_alignment on the synthetic demo data), here on 8 fake devices."""
    workdir = tmp_path_factory.mktemp("run") / "wd"
    final = train.run(tiny.get_config(), workdir)
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
    config, params = hf.load_pretrained(path)
    state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "200" / "state")
    np.testing.assert_array_equal(params["layers_1"]["mlp"]["up_proj"],
                                  np.asarray(state["params"]["layers_1"]["mlp"]["up_proj"]))
    assert tokenizer.load_tokenizer(path).encode("kindly") == tokenizer.load_tokenizer(workdir / "tokenizer").encode(
        "kindly")
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
        export.export(str(workdir), str(tmp_path / "x"), step=7)


def _train_cli(workdir, *overrides, wait=True):
    args = [os.path.join(BIN, "sajax-train"), f"--workdir={workdir}", *overrides]
    if wait:
        return subprocess.run(args, capture_output=True, text=True, env=ENV_ONE_DEVICE, timeout=600)
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV_ONE_DEVICE)


def _final_params(workdir: Path, step: int):
    return jax.device_get(ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state"))


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    flags = ["--config.train.steps=150", "--config.train.batch_size=4", "--config.checkpoint.every=10",
             "--config.log_every=5", "--config.eval_every=0", "--config.checkpoint.keep=20"]
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
    assert saved and saved[-1] < 150, f"the run was not killed mid-way: {saved}"

    resumed = _train_cli(killed_dir, *flags)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _final_params(tmp_path / "straight", 150), _final_params(killed_dir, 150)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    strip = lambda line: {k: v for k, v in json.loads(line).items() if "tokens_per" not in k and "mfu" not in k}  # noqa
    lines = lambda d: [strip(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines(killed_dir) == lines(tmp_path / "straight")  # no step lost or duplicated in the metrics


def _step_on(mesh, cfg, config, params, batch):
    tx = ts.make_optimizer(cfg.optimizer, cfg.train.steps, config)
    schedule = ts.learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    shardings = ts.state_shardings(config, tx, mesh)
    with sharding.activation_rules(mesh):
        state = jax.jit(lambda p: ts.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=p,
                                                opt_state=tx.init(p)), out_shardings=shardings)(params)
        step = ts.make_train_step(config, cfg.train, tx, schedule, mesh, shardings)
        state, metrics = step(state, input_pipeline.to_global(batch, mesh))
    return jax.device_get(state.params), jax.device_get(metrics), state


@pytest.fixture(scope="module")
def step_inputs(tmp_path_factory):
    cfg = tiny_config(**{"train.batch_size": 8, "optimizer.warmup_steps": 0, "model.vocab_size": 512})
    config = LlamaConfig.from_dict(cfg.model)
    tok = tokenizer.train_tokenizer(tokenizer.demo_corpus(), tmp_path_factory.mktemp("t") / "tok", vocab_size=512)
    encoder = input_pipeline.GroupEncoder(tok, cfg.data.max_len, cfg.data.max_prompt_len, cfg.data.num_comp)
    groups = demo_data.synthetic_groups(8, seed=5)
    batch = input_pipeline.stack([encoder.encode(g, [0, 1, 2]) for g in groups])
    params = jax.device_get(model.init_params(config, 3))
    return cfg, config, params, batch


def _gradients_on(mesh, cfg, config, params, batch):
    with sharding.activation_rules(mesh):
        grad = jax.jit(jax.grad(lambda p, b: ts.batch_loss(p, b, config=config, train_cfg=cfg.train)[0]))
        return jax.device_get(grad(jax.device_put(params, sharding.param_shardings(config, mesh)),
                                   input_pipeline.to_global(batch, mesh)))


def test_eight_device_gradients_equal_one_device(step_inputs):
    cfg, config, params, batch = step_inputs
    g1 = _gradients_on(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), cfg, config, params, batch)
    g8 = _gradients_on(sharding.make_mesh(data=2, fsdp=2, tensor=2), cfg, config, params, batch)
    assert max(jax.tree.leaves(jax.tree.map(lambda a: float(np.abs(a).max()), g1))) > 1e-3
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), g1, g8))) <= 1e-7


def test_eight_device_train_step_equals_one_device(step_inputs):
    cfg, config, params, batch = step_inputs
    # Adam's first update is lr·g/(|g| + eps): for |g| near eps (1e-8) it turns the ~1e-9 reduction-order noise of
    # any two summation orders into ~1e-5 differences. eps = 1e-3 keeps the update continuous in g, so the
    # comparison tests the sharded step (loss, clipping, schedule, AdamW, donation), not Adam's conditioning.
    cfg = tiny_config(**{"train.batch_size": 8, "optimizer.warmup_steps": 0, "optimizer.eps": 1e-3})
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    eight = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    p1, m1, _ = _step_on(one, cfg, config, params, batch)
    p8, m8, state8 = _step_on(eight, cfg, config, params, batch)
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p1, p8))) <= 1e-5
    assert abs(m1["loss"] - m8["loss"]) <= 1e-5 and m1["loss"] > 0
    assert abs(m1["grad_norm"] - m8["grad_norm"]) <= 1e-5
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p1, params))) > 1e-4
    assert state8.params["layers_0"]["self_attn"]["q_proj"].sharding.spec == jax.sharding.PartitionSpec(
        "fsdp", "tensor", None)
    adam = state8.opt_state[1][0]
    assert adam.mu["lm_head"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_gradient_accumulation_equals_one_big_batch(step_inputs):
    cfg, config, params, batch = step_inputs
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    p1, m1, _ = _step_on(mesh, cfg, config, params, batch)
    cfg4 = tiny_config(**{"train.batch_size": 8, "train.grad_accum_steps": 4, "optimizer.warmup_steps": 0})
    p4, m4, _ = _step_on(mesh, cfg4, config, params, batch)
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p1, p4))) <= 1e-5
    assert abs(m1["loss"] - m4["loss"]) <= 1e-5


def test_bad_data_and_other_configs_never_touch_checkpoints(tmp_path):
    data = tmp_path / "data.json"
    groups = [{"query": g["query"], "responses": g["responses"], "scores": g["scores"]}
              for g in demo_data.synthetic_groups(16, seed=0)]
    data.write_text(json.dumps(groups))
    cfg = tiny_config(**{"data.path": str(data), "train.steps": 4, "checkpoint.every": 2, "log_every": 2})
    train.run(cfg, tmp_path / "wd")
    snapshot = lambda: {p: p.read_bytes() for p in (tmp_path / "wd" / "checkpoints").rglob("*")  # noqa: E731
                        if p.is_file()}
    before = snapshot()
    groups[11]["scores"][2] = 9.0
    data.write_text(json.dumps(groups))
    with pytest.raises(alignment_data.DataError, match=rf"{data} record 11: field 'scores\[2\]' is 9, outside"):
        train.run(tiny_config(**{"data.path": str(data), "train.steps": 4, "checkpoint.every": 2, "log_every": 2}),
                  tmp_path / "wd")
    data.write_text(json.dumps([{**g, "scores": [min(s, 7.0) for s in g["scores"]]} for g in groups]))
    with pytest.raises(train.TrainingError, match=r"another configuration \(train.objective: "
                                                  r"'stable_alignment' → 'sft'"):
        train.run(tiny_config(**{"data.path": str(data), "train.steps": 4, "checkpoint.every": 2, "log_every": 2,
                                 "train.objective": "sft"}), tmp_path / "wd")
    with pytest.raises(ValueError, match="train.objective must be one of"):
        train.run(tiny_config(**{"train.objective": "ppo"}), tmp_path / "other")
    with pytest.raises(ValueError, match=r"train.batch_size / grad_accum_steps = 6 groups must be divisible by"):
        train.run(tiny_config(**{"train.batch_size": 6}), tmp_path / "other2")
    assert snapshot() == before


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(**{"train.steps": 6, "checkpoint.every": 1, "log_every": 1, "optimizer.learning_rate": 1e30,
                         "optimizer.warmup_steps": 0, "optimizer.clip_norm": 1e30})
    with pytest.raises(train.TrainingError, match=r"non-finite loss or gradient at or before step \d; stopped "
                                                  r"without saving. Last good checkpoint: \d"):
        train.run(cfg, tmp_path / "wd")
    ckpts = sorted(int(p.name) for p in (tmp_path / "wd" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts and max(ckpts) < 6
    state = _final_params(tmp_path / "wd", max(ckpts))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_dpo_reference_logprobs_come_from_the_initial_model_once(tmp_path):
    cfg = tiny_config(**{"train.objective": "dpo", "train.steps": 3, "eval_every": 0, "checkpoint.every": 3})
    train.run(cfg, tmp_path / "wd")
    path = tmp_path / "wd" / "reference_logp.npz"
    stamp = path.stat().st_mtime_ns
    config = LlamaConfig.from_dict(cfg.model)
    tok = tokenizer.load_tokenizer(tmp_path / "wd" / "tokenizer")
    encoder = input_pipeline.GroupEncoder(tok, cfg.data.max_len, cfg.data.max_prompt_len, cfg.data.num_comp)
    source = alignment_data.GroupSource(tmp_path / "wd" / "demo_dataset", "validation")
    mesh = sharding.make_mesh()
    initial = jax.device_put(model.init_params(config, cfg.seed), sharding.param_shardings(config, mesh))
    with np.load(path) as stored:
        offsets, values = stored["offsets_1"], stored["values_1"]
    group = source[2]
    prompt = tok.encode(group["query"], add_special_tokens=False)
    for k, response in enumerate(group["responses"]):
        tokens, start = encoder.pack(prompt, tok.encode(response, add_special_tokens=False) + [tok.eos_token_id])
        logits = model.forward(config, initial, np.asarray([tokens]), np.ones((1, len(tokens)), np.int32))
        logprobs = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
        expected = sum(float(logprobs[j - 1, tokens[j]]) for j in range(start, len(tokens)))
        assert abs(values[offsets[2] + k] - expected) <= 1e-4
    cfg_resume = tiny_config(**{"train.objective": "dpo", "train.steps": 3, "eval_every": 0, "checkpoint.every": 3})
    train.run(cfg_resume, tmp_path / "wd")
    assert path.stat().st_mtime_ns == stamp  # not recomputed on resume


def test_llama3_8b_config_train_step_shapes():
    cfg = llama3_8b.get_config()
    config = LlamaConfig.from_dict(cfg.model)
    assert 8.0e9 < config.num_params() < 8.1e9
    tx = ts.make_optimizer(cfg.optimizer, cfg.train.steps, config)
    schedule = ts.learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    params = model.param_shapes(config)
    state = ts.TrainState(step=jax.ShapeDtypeStruct((), np.int32), params=params,
                          opt_state=jax.eval_shape(tx.init, params))
    b, k, t = cfg.train.batch_size, cfg.data.num_comp, cfg.data.max_len
    batch = {"tokens": jax.ShapeDtypeStruct((b, k, t), np.int32),
             "loss_mask": jax.ShapeDtypeStruct((b, k, t), np.int32),
             "attention_mask": jax.ShapeDtypeStruct((b, k, t), np.int32),
             "scores": jax.ShapeDtypeStruct((b, k), np.float32), "valid": jax.ShapeDtypeStruct((b, k), bool),
             "reference_logp": jax.ShapeDtypeStruct((b, k), np.float32)}
    new_state, metrics = jax.eval_shape(
        lambda s, x: ts.train_step(s, x, config=config, train_cfg=cfg.train, tx=tx, schedule=schedule), state, batch)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state.params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params)
    assert new_state.params["layers"]["self_attn"]["k_proj"].shape == (32, 4096, 8, 128)
    assert metrics["loss"].shape == () and metrics["grad_norm"].dtype == np.float32
    shardings = sharding.param_shardings(config, sharding.make_mesh(data=1, fsdp=4, tensor=2))
    assert shardings["layers"]["mlp"]["up_proj"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_train_cli_reports_bad_input_without_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"query": "q", "responses": ["a", "b"], "scores": [1]}]))
    result = _train_cli(tmp_path / "wd", f"--config.data.path={bad}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {bad} record 0: 2 responses but 1 scores"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "wd" / "checkpoints").exists() or not any((tmp_path / "wd" / "checkpoints").iterdir())
    missing = _train_cli(tmp_path / "wd2", "--config.train.stepz=3")
    assert missing.returncode == 2 and "stepz" in missing.stderr


def test_init_from_a_hf_checkpoint(trained, tmp_path):
    workdir, _ = trained
    hf_dir, _ = export.export(str(workdir), str(tmp_path / "hf"))
    cfg = tiny_config(**{"init_from": str(hf_dir), "train.steps": 1, "optimizer.learning_rate": 0.0,
                         "optimizer.weight_decay": 0.0, "eval_every": 0, "checkpoint.every": 1})
    train.run(cfg, tmp_path / "wd")
    _, loaded = hf.load_pretrained(hf_dir)
    state = _final_params(tmp_path / "wd", 1)
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(state["params"]), loaded))
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        train.run(tiny_config(**{"init_from": str(tmp_path / "nothing")}), tmp_path / "wd2")
