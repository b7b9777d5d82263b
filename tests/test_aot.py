"""sajax-compile: the real train step and generation programs compiled by XLA for a TPU slice that libtpu describes
on this CPU machine (no TPU), with the memory, FLOPs and predicted time of each."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="libtpu has wheels for Linux only")  # CI (Linux) fails on any skip

from conftest import cli_env
from sajax import aot
from sajax.config_files import DEFAULT_CONFIG, load_config  # noqa: E402
from sajax.model.config import ModelConfig  # noqa: E402
from sajax.train import metrics  # noqa: E402

BIN = os.path.dirname(sys.executable)
# as a user runs it: no JAX_PLATFORMS, so jax also tries libtpu as a backend (and must not warn about it)
ENV = cli_env(without=("JAX_PLATFORMS",))


def _compile(tmp_path, *flags):
    out = tmp_path / "report.json"
    result = subprocess.run([os.path.join(BIN, "sajax-compile"), f"--json={out}", *flags], capture_output=True,
                            text=True, env=ENV, timeout=600)
    return result, (json.loads(out.read_text()) if out.exists() else None)


def test_tiny_config_compiles_for_a_v5e_slice_and_reports_memory_flops_and_time(tmp_path):
    result, report = _compile(tmp_path, "--topology=v5e:2x2")
    assert result.returncode == 0, result.stderr
    assert "TPU_ACCELERATOR_TYPE" not in result.stderr and "TPU_WORKER_HOSTNAMES" not in result.stderr, result.stderr
    assert report["chips"] == 4 and report["chip"] == "TPU v5 lite"
    train, prefill, decode = report["results"]
    assert train["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    cfg = load_config(DEFAULT_CONFIG)
    config = ModelConfig.from_dict(cfg.model)
    # data parallel: every chip holds the fp32 parameters and both Adam moments, and the step's new state is
    # written over the donated old one (aliased), the batch being the rest of the arguments. TPU memory holds
    # arrays in (8, 128) tiles, so the tiny model's narrow dimensions (16-wide heads) take up to 8× their bytes:
    # the arguments lie between the state's bytes and twice that, not at them.
    state_bytes = 3 * 4 * config.num_params()
    memory = train["memory"]
    assert state_bytes <= memory["aliased"] <= memory["arguments"] < 2 * state_bytes
    assert memory["total"] == (memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
                               + memory["code"])
    assert 0 < memory["total"] < train["hbm_bytes"] == 16 * 2**30
    tokens = cfg.train.batch_size * cfg.data.num_comp * cfg.data.max_len
    assert train["model_flops_per_chip"] == pytest.approx(
        metrics.train_flops_per_token(config, cfg.data.max_len) * tokens / 4)
    # what XLA counts: the model's FLOPs plus the loss, softmax and optimizer arithmetic (no recomputation here)
    assert 1.0 < train["xla_flops_per_chip"] / train["model_flops_per_chip"] < 1.2
    assert 0 < train["predicted_mfu"] <= 1
    assert train["predicted_seconds"] == pytest.approx(tokens / train["predicted_tokens_per_second"])
    assert prefill["program"] == "generation prefill (4 × 32 tokens)" and prefill["memory"]["arguments"] > 0
    assert decode["program"] == "generation decode (+32 tokens)"
    assert "fits" in result.stdout and "predicted step time" in result.stdout


def test_a_step_that_does_not_fit_exits_nonzero_and_says_what_to_change(tmp_path):
    # 8M-word vocabulary: embeddings and output layer 2 × 2 GiB, with Adam's moments 12 GiB per chip replicated
    # over a data-parallel v5e:2x2 (16 GiB each) — and the logits of a loss chunk on top
    result, report = _compile(tmp_path, "--topology=v5e:2x2", "--config.model.vocab_size=8388608",
                              "--config.train.batch_size=64", "--costs=false", "--generation=false")
    assert result.returncode == 1
    assert ("error: the train step" in result.stderr and "cannot fit" in result.stderr) or (
        "error: train step needs" in result.stderr and "shard more (--config.mesh.fsdp / tensor)" in result.stderr)
    if report is not None:  # XLA compiled it: the report is written, and says it does not fit
        assert report["results"][0]["memory"]["total"] > 16 * 2**30


def test_bad_topologies_are_named():
    for topology, message in [("v5x:2x2", "expected GENERATION:AxB[xC]"), ("v5e-8", "expected GENERATION"),
                              ("v5e:0x2", "every dimension must be >= 1")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            aot.parse_topology(topology)
    chip, dims = aot.parse_topology("v5p:4x4x4")
    assert chip.device_kind == "TPU v5" and dims == (4, 4, 4) and chip.peak_flops == 459e12


LINEARITY = """
import dataclasses, json
from sajax import aot
from sajax.config_files import DEFAULT_CONFIG, load_config
from sajax.parallel import sharding
from sajax.train import loop, losses
cfg = load_config(DEFAULT_CONFIG)
cfg.model.num_hidden_layers, cfg.train.loss_chunk_size, cfg.train.grad_accum_steps = 4, 16, 2  # 3 loops
chip, devices = aot.topology_devices("v5e:2x2")
config = loop.model_config(cfg)
mesh = sharding.make_mesh(**cfg.mesh, devices=devices, arrange=True)
with losses.unrolled_loops():
    unrolled = aot.compile_lowered(aot.lower_train_step(cfg, dataclasses.replace(config, scan_layers=False), mesh))
looped = aot.compile_lowered(aot.lower_train_step(cfg, config, mesh))
print(json.dumps([aot.step_costs(cfg, config, mesh)] + [{k: c.cost_analysis()[k] for k in aot.COSTS}
                                                         for c in (unrolled, looped)]))
"""


def test_costs_from_one_and_two_layers_equal_those_of_all_layers_unrolled():
    # the prediction's premise: XLA counts a loop body once, so the costs come from compiles of the step with its
    # loops unrolled, for 1 and 2 layers, extrapolated; here against the 4-layer step with every loop unrolled
    result = subprocess.run([sys.executable, "-c", LINEARITY], capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr
    extrapolated, unrolled, looped = json.loads(result.stdout.splitlines()[-1])
    # the step as configured loops over 4 layers, 4 loss chunks and 2 micro-batches: XLA counts far less of it
    assert looped["flops"] < 0.5 * unrolled["flops"]
    # the same arithmetic: equal but for a few element-wise operations XLA simplifies differently in programs of
    # other depths (measured: 96 of 6.4e8 FLOPs)
    assert extrapolated["flops"] == pytest.approx(unrolled["flops"], rel=1e-6)
    # memory traffic and XLA's time are not exactly additive: XLA fuses differently at the ends of a 1- or 2-layer
    # step than between the layers of a 4-layer one, which can only add to the extrapolation (measured: +9% with
    # the full T×T attention; equal to 2e-6 with the blocked causal attention), up to the few element-wise
    # operations that also make the FLOPs differ (the 1e-5 below)
    for key in ("bytes accessed", "optimal_seconds"):
        assert (1 - 1e-5) * unrolled[key] <= extrapolated[key] <= 1.15 * unrolled[key], key


def test_an_inconsistent_cost_analysis_predicts_nothing_and_says_why():
    chip, _ = aot.parse_topology("v6e:4x4")
    memory = aot.Memory(arguments=2**30, outputs=2**30, aliased=2**30, temporaries=2**30, code=0)
    result = {"program": "train step", "mesh": {"data": 1, "fsdp": 16, "tensor": 1}, "memory": memory,
              "hbm_bytes": chip.hbm_bytes, "params": 10, "tokens_per_step": 10, "model_flops_per_chip": 2e12,
              "xla_flops_per_chip": 1e12, "bytes_accessed_per_chip": 2**40,
              "no_prediction": "XLA counts fewer FLOPs than the model's own"}
    text = aot.format_report("v6e:4x4", chip, [None] * 16, [result])
    assert "no step time predicted: XLA counts fewer FLOPs" in text and "predicted step time" not in text
    assert "total 2.00 GiB of 32.00 GiB HBM (6.2%): fits" in text
    aot.check_fits([result])  # fits: no error
    with pytest.raises(aot.DoesNotFit, match="train step needs 40.00 GiB per chip, 32.00 GiB available"):
        aot.check_fits([{**result, "memory": aot.Memory(2**30, 0, 0, 39 * 2**30, 0)}])


def test_cost_compiles_that_do_not_fit_leave_the_fit_verdict_and_say_why(monkeypatch):
    """Qwen2.5-7B with LoRA on v5e:2x4: the step fits, but its 2-layer loop-free twin (unrolled loss and micro-batch
    loops keep more temporaries) does not — no time is predicted, the step still fits."""
    def too_big(*args, **kwargs):
        raise aot.DoesNotFit("the train step with 2 layer(s): XLA cannot fit it in the chip's memory: "
                             "RESOURCE_EXHAUSTED")

    monkeypatch.setattr(aot, "step_costs", too_big)
    chip, _ = aot.parse_topology("v5e:2x4")
    prediction = aot.predict(None, None, None, chip, model_flops=1e12, tokens=10)
    assert prediction == {"no_prediction": "the loop-free compiles that predict the time do not fit the chip "
                                           "themselves (the train step with 2 layer(s): XLA cannot fit it in the "
                                           "chip's memory: RESOURCE_EXHAUSTED)"}
    memory = aot.Memory(arguments=2**30, outputs=2**30, aliased=2**30, temporaries=2**30, code=0)
    result = {"program": "train step", "mesh": {"data": 1, "fsdp": 8, "tensor": 1}, "memory": memory,
              "hbm_bytes": chip.hbm_bytes, "params": 10, "tokens_per_step": 10, "model_flops_per_chip": 1e12,
              **prediction}
    text = aot.format_report("v5e:2x4", chip, [None] * 8, [result])
    assert "no step time predicted: the loop-free compiles that predict the time do not fit" in text
    aot.check_fits([result])  # the step itself fits: no error
