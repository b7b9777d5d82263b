"""`sajax-sim` (run or resume a simulation) and `sajax-sim-dataset` (its records, or the original project's
logs, → a TFDS alignment dataset)."""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

from sajax.cli import run_app
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
    from sim import dataset, original, store

    logging.set_verbosity(logging.WARNING)
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
            print(f"read {summary}")
        counts = dataset.build(records, _FLAGS.out, ratios=ratios, validation_percent=_FLAGS.validation_percent,
                               seed=_FLAGS.seed, overwrite=_FLAGS.overwrite)
    except (ValueError, OSError, store.WorkdirError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    print(f"wrote {_FLAGS.out}: " + "; ".join(f"{split} " + ", ".join(f"{k} {n}" for k, n in kinds.items())
                                              for split, kinds in counts.items()))


def dataset_main() -> None:
    run_app(_dataset_main, _define_dataset_flags)
