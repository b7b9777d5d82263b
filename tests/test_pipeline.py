"""sajax-pipeline, the closed loop, on a small version of its embedded default (a scripted society, a tiny model
trained with LoRA adapters of rank 8 — the embedded default trains every weight): every stage's outputs and the
report; a crash in the middle and the rerun that finishes without redoing finished work; a changed configuration
refused; objectives added to a finished pipeline, or left out."""

import json
import os
import subprocess
import sys

import pytest

from conftest import cli_env
from sajax.config_files import bundled_config, load_config
from sajax.train import loop as train_lib
from sim import pipeline, run, store


def small_config():
    cfg = load_config(bundled_config("pipeline_tiny.py"))
    cfg.sim.rounds = 2
    cfg.sim.backend.update(dict(max_new_tokens=12, reason_tokens=6))  # the re-simulation's agents are the tiny model
    # 20 steps do not teach the tiny model to name the actions the scripted observers rate: let their ratings of its
    # drafts be missing rather than stop the re-simulation
    cfg.sim.observer_backend.max_missing_fraction = 1.0
    cfg.train.train.steps = 20
    cfg.train.lora.rank = 8  # what `--config.train.lora.rank=8` sets: training, export and evaluation of adapters
    cfg.train.log_every = 10
    cfg.train.checkpoint.every = 10
    cfg.eval.update(dict(limit=6, max_new_tokens=12))
    return cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A pipeline that crashed while evaluating the SFT model, then was run again; what each run did."""
    workdir = tmp_path_factory.mktemp("pipeline")
    cfg = small_config()
    real_model, real_eval, real_train, real_simulate = (pipeline.Pipeline.model, pipeline.Pipeline.run_eval,
                                                        train_lib.run, run.simulate)
    calls = {"evals": [], "train": [], "simulate": []}
    loaded = []

    def model(self, name):
        loaded.append(name)
        return real_model(self, name)

    def crashing_eval(self, evaluation, lm, judge):
        if loaded[-1] == "sft" and evaluation == "multiple_choice":
            raise RuntimeError("injected crash")
        return real_eval(self, evaluation, lm, judge)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.Pipeline, "model", model)
        patch.setattr(pipeline.Pipeline, "run_eval", crashing_eval)
        with pytest.raises(RuntimeError, match="injected crash"):
            pipeline.run_pipeline(cfg, workdir, log=lambda _: None)
    first = {f.relative_to(workdir): f.read_bytes() for f in (workdir / "evals").rglob("*.json")}

    def counting_eval(self, evaluation, lm, judge):
        calls["evals"].append((loaded[-1], evaluation))
        return real_eval(self, evaluation, lm, judge)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.Pipeline, "model", model)
        patch.setattr(pipeline.Pipeline, "run_eval", counting_eval)
        patch.setattr(train_lib, "run", lambda c, w: calls["train"].append(w) or real_train(c, w))
        patch.setattr(run, "simulate", lambda c, w, **k: calls["simulate"].append(w) or real_simulate(c, w, **k))
        report = pipeline.run_pipeline(cfg, workdir, log=lambda _: None)
    return workdir, cfg, report, calls, first


def test_rerun_after_a_crash_does_only_the_missing_work(finished):
    workdir, _, report, calls, first = finished
    assert calls["train"] == [] and calls["simulate"] == [workdir / "resim"]
    assert calls["evals"] == [("sft", "multiple_choice"), ("sft", "are_you_sure")]
    for path, content in first.items():  # what the crashed run wrote stays as it was
        assert (workdir / path).read_bytes() == content
    assert report == workdir / "report.md"


def test_every_stage_and_the_report(finished):
    workdir, cfg, report, _, _ = finished
    heldout = (workdir / "questions" / "heldout.txt").read_text().splitlines()
    asked = {r["question"] for r in store.read_records(workdir / "society")}
    assert len(heldout) == 10 and not asked & set(heldout)  # 25% of the 40 built-in questions, never asked
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["evals"]) == {"initial", "stable_alignment", "sft"}
    for model, results in summary["evals"].items():
        assert sorted(results) == sorted(cfg.eval.evals), model
        assert results["alignment"]["n"] == 10 and results["multiple_choice"]["n"] == 6
        assert len(results["alignment"]["answers"]) == 10
    for objective in cfg.objectives:
        record = json.loads((workdir / "stages" / f"train_{objective}.json").read_text())
        assert 0.0 <= record["eval"]["ranking_accuracy"] <= 1.0
        assert 0.05 < record["rss_gb"] <= record["peak_rss_gb"] < 24  # this process's memory, in GB (not KB or B)
        run_config = json.loads((workdir / "train" / objective / "config.json").read_text())
        assert run_config["train"]["objective"] == objective and run_config["lora"]["rank"] == 8
    exported = json.loads((workdir / "models" / "stable_alignment" / "config.json").read_text())
    assert exported["model_type"] == "llama" and "lora_rank" not in exported  # merged: a plain HF model
    resim = store.read_round_records(workdir / "resim", 1)
    assert {r["model"] for r in resim} == {f"local:{workdir / 'models' / 'stable_alignment'}"}
    assert summary["resim"]["agents"] == 9 and summary["resim"]["same_questions"] == 9
    text = report.read_text()
    for heading in ("## Stages", "## The society", "## Training", "## Evaluations", "## Does the society start more"):
        assert heading in text
    assert "| multiple_choice | accuracy | 6 |" in text and "| initial | stable_alignment | sft |" in text
    for png in ("society.png", "training.png"):
        assert (workdir / png).read_bytes()[:4] == b"\x89PNG"


def test_a_changed_config_is_refused_and_objectives_may_be_added_or_left_out(finished, monkeypatch):
    workdir, cfg, _, _, _ = finished
    saved = (workdir / "config.json").read_bytes()
    changed = small_config()
    changed.train.optimizer.learning_rate = 1e-3
    with pytest.raises(ValueError, match=r"train\.optimizer\.learning_rate: 0\.003 → 0\.001"):
        pipeline.run_pipeline(changed, workdir, log=lambda _: None)
    assert (workdir / "config.json").read_bytes() == saved

    more = small_config()
    more.objectives = ("stable_alignment", "sft", "rrhf")
    ran = []
    real_stage = pipeline.Pipeline.stage
    monkeypatch.setattr(pipeline.Pipeline, "stage",
                        lambda self, name, work: real_stage(self, name, lambda: ran.append(name) or work()))
    pipeline.run_pipeline(more, workdir, log=lambda _: None)
    assert ran == ["train_rrhf", "evals_rrhf"]
    assert "| rrhf |" in (workdir / "report.md").read_text()
    ran.clear()
    pipeline.run_pipeline(cfg, workdir, log=lambda _: None)  # back to two objectives: nothing to run
    text = (workdir / "report.md").read_text()
    assert ran == [] and "| initial | stable_alignment | sft |" in text and "| rrhf |" not in text


def test_cli_refuses_a_bad_config_before_writing(tmp_path):
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "sajax-pipeline"), "--workdir",
                             str(tmp_path / "run"), "--config.objectives=('sft',)"], capture_output=True, text=True,
                            env=cli_env(), timeout=300)
    assert result.returncode == 1
    assert "error: objectives must include 'stable_alignment'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_setting_found_bad_mid_run_can_be_corrected_in_the_same_workdir(tmp_path):
    bad = small_config()
    bad.sim.backend.kind = "scriptd"
    with pytest.raises(ValueError, match="backend.kind must be one of"):
        pipeline.run_pipeline(bad, tmp_path, log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["questions.json"]
    assert not (tmp_path / "society").exists()
    pipeline.check_workdir(small_config(), tmp_path)  # the corrected config continues here
    moved = small_config()
    moved.eval.heldout_fraction = 0.5  # but not with another question split than the one already made
    with pytest.raises(ValueError, match=r"eval\.heldout_fraction: 0\.25 → 0\.5"):
        pipeline.check_workdir(moved, tmp_path)
