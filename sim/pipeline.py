"""The closed loop in one command (`sajax-pipeline`): does Stable Alignment make a model more aligned, measured?

    split the questions (society / held out) → simulate the society → its alignment dataset → train the policy once
    per objective (Stable Alignment and the SFT baseline by default: same data, steps and learning rate) → evaluate
    the initial model and every trained one → one more round of the society with the Stable-Alignment-trained model
    as every agent (does the society start more aligned?) → report.md and PNGs

    <workdir>/config.json               the pipeline's configuration; a rerun must match it, but for `objectives`
              questions/society.txt     the questions the society is asked; heldout.txt: never asked, for evaluation
              society/                  the simulation (a sajax-sim workdir)
              dataset/                  its alignment dataset (TFDS)
              train/<objective>/        a sajax-train workdir per objective
              models/stable_alignment/  the trained model as a HF folder (the re-simulation's agents)
              evals/<model>/<eval>.json one result per model ("initial" or an objective) and evaluation
              resim/                    the re-simulation (a sajax-sim workdir)
              stages/<stage>.json       written when a stage is complete: what it produced, how long it took, the
                                        process's peak resident memory so far (and its memory then, on Linux)
              report.md, society.png, training.png

Every stage resumes after a crash: the simulations from their last committed round, training from its newest
checkpoint, evaluations per (model, evaluation); the question split, the dataset and the export are written whole
or not at all. A stage whose record exists in stages/ is not run again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from sajax import config_files, fileutil
from sajax.evals import adversarial, multiple_choice, served, stats, sycophancy
from sajax.evals import judge as judge_lib
from sajax.formats import known_models
from sajax.infer import lm
from sajax.train import export
from sajax.train import loop as train_lib
from sim import dataset, pipeline_report, prompts, run, store
from sim.backends import Request

OBJECTIVES = ("stable_alignment", "sft", "rrhf", "dpo")
EVALS = ("alignment", "hhh_adversarial", "multiple_choice", "are_you_sure")
DEFAULT_CONFIG = config_files.bundled_config("pipeline_tiny.py")
POLICY = "stable_alignment"  # the objective whose model becomes the re-simulated society's agents
# May change when a run is continued: each objective's stages stand alone (the report shows those configured).
RESUMABLE = ("objectives", "eval.batch_size")


def memory_gb() -> dict:
    """This process's peak resident memory so far (getrusage: kilobytes on Linux, bytes on macOS) and, where
    /proc/self/statm exists (Linux), its resident memory now; in GB. Linux updates the recorded peak lazily, so it
    may lag the memory now: the peak reported is the larger of the two."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return {"peak_rss_gb": round(peak / 1e9, 2)}
    return {"rss_gb": round(now / 1e9, 2), "peak_rss_gb": round(max(peak, now) / 1e9, 2)}


class ObserverJudge:
    """The society's own observers as the judge: the alignment rating (1–7) a memory-less observer gives an answer
    — the same ruler as the simulation's per-round alignment. NaN where the observer could not rate an answer."""

    readout = "observer"

    def __init__(self, backend, seed: int):
        self.backend, self.seed = backend, seed

    def rate(self, questions, answers) -> np.ndarray:
        requests = [Request(prompts.observe_alignment(q, a, self.backend.rating_readout), q, a,
                            stage="observe_alignment") for q, a in zip(questions, answers)]
        ratings = self.backend.rate(requests, self.seed) if requests else []
        return np.array([np.nan if r.value is None else r.value for r in ratings], np.float64)


def check_config(cfg) -> None:
    if not cfg.objectives or any(o not in OBJECTIVES for o in cfg.objectives):
        raise ValueError(f"objectives must be a non-empty list from {OBJECTIVES}, got {tuple(cfg.objectives)}")
    if POLICY not in cfg.objectives:
        raise ValueError(f"objectives must include {POLICY!r} (its model is the re-simulated society's agents)")
    unknown = [e for e in cfg.eval.evals if e not in EVALS]
    if unknown:
        raise ValueError(f"eval.evals: {unknown} not among {EVALS}")
    if not 0 < cfg.eval.heldout_fraction < 1:
        raise ValueError(f"eval.heldout_fraction must be in (0, 1), got {cfg.eval.heldout_fraction}")
    if cfg.resim_rounds < 1:
        raise ValueError(f"resim_rounds must be >= 1, got {cfg.resim_rounds}")
    if cfg.train.data.path:
        raise ValueError(f"train.data.path must be empty: the pipeline trains on its own dataset, got "
                         f"{cfg.train.data.path!r}")
    dataset.parse_ratios(cfg.dataset.ratios)
    train_lib.check_config(cfg.train)


# The stages in order, and the config fields each first reads (the first matching prefix decides). A field may change
# between runs while no stage from the one that first reads it on is complete: a run stopped by a bad setting can be
# continued with the corrected one, but nothing finished is ever mixed with a different configuration.
STAGE_ORDER = ("questions", "society", "dataset", "train_", "judge_calibration", "evals_", "resim")
FIRST_READ_BY = (("sim.questions_file", "questions"), ("eval.heldout_fraction", "questions"), ("sim.", "society"),
                 ("dataset.", "dataset"), ("train.", "train_"), ("eval.", "judge_calibration"),
                 ("resim_rounds", "resim"))


def _stage_index(stage: str) -> int:
    return next(i for i, prefix in enumerate(STAGE_ORDER) if stage.startswith(prefix))


def _first_reader(key: str) -> str:
    """The first stage that reads config field `key`."""
    return next((stage for prefix, stage in FIRST_READ_BY if key.startswith(prefix)), STAGE_ORDER[0])


def check_workdir(cfg, workdir: Path) -> None:
    """ValueError when `workdir` holds something else, or a pipeline whose completed stages used another
    configuration (a field the saved configuration lacks counts as unchanged at the embedded default's value)."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"{workdir}: exists and is not a directory")
    config_file = workdir / "config.json"
    if not config_file.is_file():
        if workdir.exists() and any(workdir.iterdir()):
            raise ValueError(f"{workdir}: not empty and not a sajax-pipeline workdir (no config.json); use a new "
                             "--workdir")
        return
    saved = fileutil.read_json(config_file)
    if not isinstance(saved, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(saved).__name__}")
    completed = [f.stem for f in (workdir / "stages").glob("*.json")] if (workdir / "stages").is_dir() else []
    last = max((_stage_index(s) for s in completed), default=-1)
    defaults = json.loads(config_files.load_config(DEFAULT_CONFIG).to_json())
    changed = [(key, old, new) for key, old, new in config_files.changed_fields(saved, json.loads(cfg.to_json()),
                                                                                defaults, RESUMABLE)
               if _stage_index(_first_reader(key)) <= last]
    if changed:
        details = ", ".join(f"{k}: {old!r} → {new!r}" for k, old, new in changed[:5])
        raise ValueError(f"{config_file}: its completed stages were run with another configuration ({details}); use "
                         "a new --workdir, or the same config to continue it")


class Pipeline:
    def __init__(self, cfg, workdir, log=None):
        self.cfg, self.workdir = cfg, Path(workdir).absolute()
        self._judge = self._choices = None
        self.log = log or (lambda text: sys.stderr.write(text + "\n"))

    # -- stage bookkeeping ---------------------------------------------------------------------------------------
    def done(self, stage: str) -> dict | None:
        file = self.workdir / "stages" / f"{stage}.json"
        return fileutil.read_json(file) if file.is_file() else None

    def stage(self, stage: str, work) -> dict:
        """Runs `work()` (→ a JSON-able summary) unless the stage is recorded as complete; records it."""
        record = self.done(stage)
        if record is not None:
            self.log(f"[pipeline] {stage}: done before ({record['seconds']:.0f} s)")
            return record
        self.log(f"[pipeline] {stage} …")
        start = time.perf_counter()
        record = {"stage": stage, **work(), "seconds": time.perf_counter() - start, **memory_gb()}
        (self.workdir / "stages").mkdir(exist_ok=True)
        fileutil.write_text(self.workdir / "stages" / f"{stage}.json", json.dumps(record, indent=1) + "\n")
        now = f"resident {record['rss_gb']:.2f} GB, " if "rss_gb" in record else ""
        self.log(f"[pipeline] {stage}: {record['seconds']:.0f} s, {now}peak so far {record['peak_rss_gb']:.2f} GB")
        return record

    # -- the stages ----------------------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        check_config(cfg)
        check_workdir(cfg, self.workdir)
        run.world_config(cfg.sim).validate()
        questions = run.read_questions(cfg.sim.questions_file)
        self.choices()  # a bad questions file stops the run before any write
        if not self.observer_judge and not served.is_url(cfg.eval.judge):
            known_models.resolve(cfg.eval.judge)
        self.workdir.mkdir(parents=True, exist_ok=True)
        fileutil.write_text(self.workdir / "config.json", cfg.to_json(indent=2) + "\n")
        self.stage("questions", lambda: self.split_questions(questions))
        self.stage("society", lambda: self.simulate(self.society_config(), self.workdir / "society"))
        self.stage("dataset", self.build_dataset)
        for objective in cfg.objectives:
            self.stage(f"train_{objective}", lambda o=objective: self.train(o))
        if not self.observer_judge:
            self.stage("judge_calibration", self.calibrate_judge)
        for model in ("initial", *cfg.objectives):
            self.stage(f"evals_{model}", lambda m=model: self.evaluate(m))
        self.stage("resim", self.resimulate)
        return pipeline_report.write(self.workdir, cfg)

    def split_questions(self, questions: list[str]) -> dict:
        """Held out: the `eval.heldout_fraction` of the questions that come first in crc32 order (at least one);
        the society is asked only the others."""
        order = sorted(range(len(questions)), key=lambda i: (zlib.crc32(questions[i].encode()), i))
        n_heldout = max(1, round(self.cfg.eval.heldout_fraction * len(questions)))
        if n_heldout >= len(questions):
            raise ValueError(f"{self.cfg.sim.questions_file or 'the built-in questions'}: {len(questions)} questions "
                             "cannot be split into a society set and a held-out set")
        heldout = sorted(order[:n_heldout])
        society = [questions[i] for i in range(len(questions)) if i not in set(heldout)]
        directory = self.workdir / "questions"
        directory.mkdir(exist_ok=True)
        fileutil.write_text(directory / "heldout.txt", "".join(questions[i] + "\n" for i in heldout))
        fileutil.write_text(directory / "society.txt", "".join(q + "\n" for q in society))
        return {"society": len(society), "heldout": len(heldout)}

    def society_config(self):
        sim = self.cfg.sim.copy_and_resolve_references()
        sim.questions_file = str(self.workdir / "questions" / "society.txt")
        return sim

    def resim_config(self):
        """The society's configuration with the Stable-Alignment-trained model as every agent, for `resim_rounds`
        rounds (observers unchanged: the same ruler)."""
        sim = self.society_config()
        sim.rounds = self.cfg.resim_rounds
        sim.backend.kind = "local"
        sim.backend.model_dir = str(self.workdir / "models" / POLICY)
        return sim

    def resimulate(self) -> dict:
        """Exports the trained policy (once; written whole) as the agents' model, then runs the rounds."""
        model_dir = self.workdir / "models" / POLICY
        if not (model_dir / "config.json").is_file():
            path, step = export.export(str(self.workdir / "train" / POLICY), str(model_dir))
            self.log(f"[pipeline] exported {POLICY} step {step} → {path}")
        return self.simulate(self.resim_config(), self.workdir / "resim")

    def simulate(self, sim_cfg, directory: Path) -> dict:
        metrics = run.simulate(sim_cfg, directory, resume=True)
        return {"rounds": len(metrics), "alignment_before": [m["alignment_before"]["mean"] for m in metrics]}

    def build_dataset(self) -> dict:
        records = store.read_records(self.workdir / "society")
        c = self.cfg.dataset
        counts = dataset.build(records, self.workdir / "dataset", ratios=dataset.parse_ratios(c.ratios),
                               validation_percent=c.validation_percent, seed=c.seed,
                               rating_scale=self.cfg.train.train.rating_scale, overwrite=True)
        if not sum(counts.get("train", {}).values()):
            raise ValueError(f"{self.workdir / 'society'}: its records gave no training groups (are the ratings "
                             "missing?)")
        return {"groups": counts}

    def train_config(self, objective: str):
        t = self.cfg.train.copy_and_resolve_references()
        t.train.objective = objective
        t.data.path = str(self.workdir / "dataset")
        return t

    def train(self, objective: str) -> dict:
        final = train_lib.run(self.train_config(objective), self.workdir / "train" / objective)
        return {"objective": objective, "eval": final}

    def evaluate(self, name: str) -> dict:
        """Every evaluation of `eval.evals` for one model, each written to evals/<name>/<eval>.json as it
        completes (a rerun skips those written with the same `eval` settings)."""
        out_dir = self.workdir / "evals" / name
        settings = {k: v for k, v in json.loads(self.cfg.eval.to_json()).items() if k != "batch_size"}
        pending = [e for e in self.cfg.eval.evals if not (out_dir / f"{e}.json").is_file()
                   or fileutil.read_json(out_dir / f"{e}.json").get("settings") != settings]
        if pending:
            model, judge = self.model(name), self.judge()
            for evaluation in pending:
                self.log(f"[pipeline] evaluate {name}: {evaluation}")
                result = {"model": name, **self.run_eval(evaluation, model, judge), "settings": settings}
                out_dir.mkdir(parents=True, exist_ok=True)
                fileutil.write_text(out_dir / f"{evaluation}.json", json.dumps(result, indent=1) + "\n")
        return {"model": name, "evals": list(self.cfg.eval.evals)}

    def model(self, name: str) -> lm.LanguageModel:
        batch = self.cfg.eval.batch_size
        if name == "initial":
            config, params, tok = export.initial(self.workdir / "train" / self.cfg.objectives[0])
            return lm.LanguageModel(config, params, tok, batch)
        return lm.load(str(self.workdir / "train" / name), batch)

    @property
    def observer_judge(self) -> bool:
        return self.cfg.eval.judge in ("observer", "")

    def judge(self):
        """The judge (loaded once): the society's observers, or a model read by `eval.judge_readout`."""
        if self._judge is None:
            e = self.cfg.eval
            if self.observer_judge:
                backend = run.make_backend(self.cfg.sim.observer_backend, run.LocalModels(self.cfg.sim.seed),
                                           "sim.observer_backend")
                backend.check()  # a server: reachable, and how its ratings are read (probed)
                self._judge = ObserverJudge(backend, self.cfg.sim.seed)
            else:
                self._judge = judge_lib.load(e.judge, e.judge_readout, batch_size=e.batch_size,
                                             served_model=e.judge_model, api_key_env=e.judge_api_key_env)
        return self._judge

    def calibrate_judge(self) -> dict:
        """The judge's calibration on the labelled multiple-choice pairs, before its ratings are trusted."""
        result = {"model": self.cfg.eval.judge, **judge_lib.calibration(self.judge(), self.choices())}
        (self.workdir / "evals" / "judge").mkdir(parents=True, exist_ok=True)
        fileutil.write_text(self.workdir / "evals" / "judge" / "judge_calibration.json",
                            json.dumps(result, indent=1) + "\n")
        return {"auc": result["auc"], "comparison_accuracy": result["comparison_accuracy"]}

    def choices(self) -> multiple_choice.Questions:
        """The multiple-choice questions (`eval.data`, first `eval.limit`), read once."""
        if self._choices is None:
            e = self.cfg.eval
            choices = multiple_choice.read(e.data or multiple_choice.BUILT_IN)
            self._choices = dataclasses.replace(choices, items=choices.items[:e.limit]) if e.limit else choices
        return self._choices

    def run_eval(self, evaluation: str, model, judge) -> dict:
        e, choices = self.cfg.eval, self.choices()
        if evaluation == "alignment":
            asked = fileutil.read_text(self.workdir / "questions" / "heldout.txt").splitlines()
            answers = model.generate([(("user", q),) for q in asked], e.max_new_tokens)
            ratings = judge.rate(asked, answers)
            return {"eval": "alignment", "data": "held-out society questions", "n": len(asked),
                    "judge": e.judge or "observer", "scale": "1-7" if self.observer_judge else "1-10",
                    **stats.summary("alignment", ratings),
                    "answers": [{"question": q, "answer": a, "rating": None if np.isnan(r) else float(r)}
                                for q, a, r in zip(asked, answers, ratings)]}
        if evaluation == "hhh_adversarial":
            return {**adversarial.evaluate(model, judge, choices, e.max_new_tokens), "judge": e.judge or "observer"}
        if evaluation == "multiple_choice":
            return multiple_choice.evaluate(model, choices)
        return sycophancy.are_you_sure(model, choices, seed=self.cfg.sim.seed)


def run_pipeline(cfg, workdir, log=None) -> Path:
    """Runs (or continues) the pipeline in `workdir`; returns the report's path."""
    return Pipeline(cfg, workdir, log).run()
