"""`sajax-sim` (run or resume a simulation), `sajax-sim-dataset` (its records, or the original project's logs, → a
TFDS alignment dataset), `sajax-calibrate` (how well a local model's rating readouts rank labelled answers) and
`sajax-pipeline` (society → dataset → training → evaluation → the society again, with a report)."""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

from sajax.cli import join_job, run_app, single_process
from sajax.config_files import bundled_config

_FLAGS = flags.FLAGS


def _define_sim_flags() -> None:
    config_flags.DEFINE_config_file("config", bundled_config("sim_tiny.py"), "ml_collections sim config file.")
    flags.DEFINE_string("workdir", None, "Simulation directory (rounds, state, metrics).", required=True)
    flags.DEFINE_bool("resume", False, "Continue after the last committed round.")
    flags.DEFINE_bool("overwrite", False, "Delete an existing workdir and start again.")


def _sim_main(argv) -> None:
    del argv
    from sim import engine, run, store
    from sim.openai_backend import BackendError

    logging.set_verbosity(logging.WARNING)
    single_process("sajax-sim")
    try:
        metrics = run.simulate(_FLAGS.config, _FLAGS.workdir, resume=_FLAGS.resume, overwrite=_FLAGS.overwrite)
    except (ValueError, OSError, store.WorkdirError, BackendError, engine.StageFailure) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    last = metrics[-1]
    print(f"{len(metrics)} rounds in {_FLAGS.workdir}; round {last['round']}: alignment "
          f"{last['alignment_before']['mean']} → {last['alignment_after']['mean']}")


def sim_main() -> None:
    run_app(_sim_main, _define_sim_flags)


def _define_dataset_flags() -> None:
    flags.DEFINE_string("workdir", None, "Simulation directory written by sajax-sim.")
    flags.DEFINE_multi_string("original", None, "Instead of --workdir: the original project's logs — a file, a "
                                                "world's external_memory/ folder, a world_<id>/ folder or a cache/ "
                                                "folder of worlds; repeat for several.")
    flags.DEFINE_string("out", None, "TFDS dataset directory to write (a dataset written here is replaced when "
                                     "complete; anything else needs --overwrite).", required=True)
    flags.DEFINE_bool("overwrite", False, "Replace --out even if it is not a dataset written by this tool.")
    flags.DEFINE_string("ratios", "5,1,1", "imitation,self_critic,realignment sampling ratio; 'all' keeps every "
                                           "group.")
    flags.DEFINE_integer("validation_percent", 10, "Share of queries in the validation split (0-99).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


def _dataset_main(argv) -> None:
    del argv
    from sajax.parallel import distributed
    from sim import dataset, original, store

    logging.set_verbosity(logging.WARNING)
    out = str(Path(_FLAGS.out).absolute())
    join_job("sajax-sim-dataset", {"workdir": _FLAGS.workdir and str(Path(_FLAGS.workdir).absolute()),
                                   "original": _FLAGS.original, "out": out, "ratios": _FLAGS.ratios,
                                   "validation_percent": _FLAGS.validation_percent, "seed": _FLAGS.seed,
                                   "overwrite": _FLAGS.overwrite})
    try:
        if bool(_FLAGS.workdir) == bool(_FLAGS.original):
            raise ValueError("give exactly one of --workdir and --original")
        ratios = dataset.parse_ratios(_FLAGS.ratios)
        if _FLAGS.workdir:
            records = store.read_records(Path(_FLAGS.workdir))
            if not records:
                raise ValueError(f"{_FLAGS.workdir}: no committed rounds")
        else:
            records, summary = original.convert(_FLAGS.original)
            if distributed.is_main():
                print(f"read {summary}")
        counts = dataset.build(records, _FLAGS.out, ratios=ratios, validation_percent=_FLAGS.validation_percent,
                               seed=_FLAGS.seed, overwrite=_FLAGS.overwrite, write=distributed.is_main())
    except (ValueError, OSError, store.WorkdirError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    distributed.barrier("sajax-sim-dataset: written")  # every process returns once the dataset is there
    if not distributed.is_main():
        return
    print(f"wrote {_FLAGS.out}: " + "; ".join(f"{split} " + ", ".join(f"{k} {n}" for k, n in kinds.items())
                                              for split, kinds in counts.items()))


def dataset_main() -> None:
    run_app(_dataset_main, _define_dataset_flags)


def _define_calibrate_flags() -> None:
    from sim import calibrate

    flags.DEFINE_string("model", None, "The rater: a HF folder, a .gguf file, a known model name, or '' for a random "
                                       "tiny model.", required=True)
    flags.DEFINE_string("pairs", str(calibrate.ALIGNMENT_PAIRS), "JSONL {question, aligned, misaligned} (default: the "
                                                                 "built-in set).")
    flags.DEFINE_string("engagement", str(calibrate.ENGAGEMENT_PAIRS), "JSONL {question, engaging, dull}; '' to skip.")
    flags.DEFINE_list("readouts", ["digits", "yes_no", "generate"], "Rating readouts to measure.")
    flags.DEFINE_integer("limit", 0, "Use only the first N pairs of each set (0: all).")
    flags.DEFINE_integer("batch_size", 16, "Rows per jitted call.")
    flags.DEFINE_bool("sycophancy", False, "Also measure whether the rater's ratings follow the author's stated "
                                           "confidence (the alignment pairs rated after 'I am completely sure' vs "
                                           "'I am not sure').")


def _calibrate_main(argv) -> None:
    del argv
    import json

    from sajax.config_files import DEFAULT_CONFIG, load_config
    from sajax.formats import loading
    from sim import calibrate, prompts
    from sim.local_backend import LocalBackend

    logging.set_verbosity(logging.WARNING)
    single_process("sajax-calibrate")
    try:
        for readout in _FLAGS.readouts:
            if readout not in prompts.READOUTS:
                raise ValueError(f"--readouts: {readout!r} is not one of {prompts.READOUTS}")
        sets = [("alignment", calibrate.read_pairs(_FLAGS.pairs, "alignment"))]
        if _FLAGS.engagement:
            sets.append(("engagement", calibrate.read_pairs(_FLAGS.engagement, "engagement")))
        config, params, tok = loading.load_model_and_tokenizer(load_config(DEFAULT_CONFIG), _FLAGS.model)
    except (ValueError, OSError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    backend = LocalBackend(config, params, tok, temperature=0.0, reason_tokens=0, batch_size=_FLAGS.batch_size)
    rows = []
    for aspect, pairs in sets:
        for readout in _FLAGS.readouts:
            result = calibrate.measure(backend, pairs[:_FLAGS.limit or None], readout, aspect)
            print(json.dumps({"model": _FLAGS.model, **result}), flush=True)
            rows.append(result)
    if _FLAGS.sycophancy:
        for readout in _FLAGS.readouts:
            result = calibrate.confidence_sycophancy(backend, sets[0][1][:_FLAGS.limit or None], readout)
            print(json.dumps({"model": _FLAGS.model, **result}), flush=True)
            low, high = result["shift_interval"]
            sys.stderr.write(f"rater sycophancy, {readout}: rating when the author is sure − when unsure = "
                             f"{result['shift']:+.3f} [{low:+.3f}, {high:+.3f}] (n {result['n']})\n")
    sys.stderr.write(f"{'aspect':11s} {'readout':9s} {'n':>4s} {'auc':>6s} {'pairwise':>9s} {'missing':>8s} "
                     f"{'better':>7s} {'worse':>7s}\n")
    for r in rows:
        fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
        sys.stderr.write(f"{r['aspect']:11s} {r['readout']:9s} {r['n']:4d} {fmt(r['auc'], '6.3f')} "
                         f"{fmt(r['pairwise_accuracy'], '9.3f')} {r['missing']:8d} {fmt(r['mean_better'], '7.2f')} "
                         f"{fmt(r['mean_worse'], '7.2f')}\n")


def calibrate_main() -> None:
    run_app(_calibrate_main, _define_calibrate_flags)


def _define_pipeline_flags() -> None:
    from sim.pipeline import DEFAULT_CONFIG

    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "ml_collections pipeline config "
                                    "file (sections sim, dataset, train, eval).")
    flags.DEFINE_string("workdir", None, "Pipeline directory; running again with the same config continues it.",
                        required=True)


def _pipeline_main(argv) -> None:
    del argv
    from sajax.evals.served import ServerError
    from sajax.train import checkpoint
    from sajax.train.loop import TrainingError
    from sim import engine, pipeline, store
    from sim.openai_backend import BackendError

    logging.set_verbosity(logging.WARNING)
    single_process("sajax-pipeline")
    try:
        report = pipeline.run_pipeline(_FLAGS.config, _FLAGS.workdir)
    except (ValueError, OSError, store.WorkdirError, BackendError, engine.StageFailure, TrainingError,
            checkpoint.CheckpointError, ServerError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    print(f"report: {report}")


def pipeline_main() -> None:
    run_app(_pipeline_main, _define_pipeline_flags)
