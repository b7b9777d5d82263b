"""Command-line entry points.

  sajax-train --config FILE --workdir DIR [--config.key=value ...]   train, or resume the run in DIR
  sajax-export --workdir DIR --out HF_DIR                            latest checkpoint → HF directory
  sajax-generate [--config FILE] [--model HF_DIR|FILE.gguf|NAME] [--chat] [--prompt TEXT ...] [--config.key=value ...]
  sajax-eval --model WORKDIR|HF_DIR|FILE.gguf|NAME --eval NAME [--eval ...] [--data FILE] [--judge MODEL] [--out DIR]
  sajax-serve --model WORKDIR|HF_DIR|FILE.gguf|NAME [--host 127.0.0.1] [--port 8000]   OpenAI-compatible server
  sajax-compile --config FILE --topology v5p:4x4x4 [--config.key=value ...]   compile for a TPU slice, on a CPU

Without `--model`, generates with a randomly initialised model of the config's size and the offline demo
tokenizer: a smoke test of the whole stack on CPU. With `--model`, loads a HF LLaMA directory (safetensors and
tokenizer files) and generates with it, sharded over the config's mesh.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sajax import compilation_cache
from sajax.config_files import DEFAULT_CONFIG
from sajax.formats import loading
from sajax.infer import generate
from sajax.model import decoder
from sajax.parallel import distributed, sharding
from sajax.train import checkpoint


def join_job(command: str, job: dict | None = None) -> None:
    """With SAJAX_DISTRIBUTED=1 (`sajax.parallel.distributed`): joins the multi-process job and, given the command's
    `job` (its resolved config and arguments), checks that every process runs the same code and job. A one-line error
    and exit status 1 when it cannot."""
    try:
        distributed.initialize()
        if job is not None:
            distributed.check_same_job({command: job})
    except (ValueError, RuntimeError) as e:  # HostMismatch, and jax's errors when the coordinator is unreachable
        sys.stderr.write(f"error: {command}: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
        sys.exit(1)


@contextlib.contextmanager
def peer_failures(command: str):
    """In a multi-process job, a collective that fails (another process died or was killed) ends this process at
    once with a one-line error and status 1 — rather than a traceback and jax's shutdown barrier, which waits
    for the dead process's heartbeat to time out."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        detail = str(e).splitlines()[0].split("Error dispatching computation: ")[-1]
        sys.stderr.write(f"error: {command}: process {jax.process_index()}: a collective with the other processes "
                         f"failed (did one stop?): {detail}\n")
        sys.stderr.flush()
        os._exit(1)


def single_process(command: str) -> None:
    """Commands that run as one process (their model uses every device of the host) refuse SAJAX_DISTRIBUTED=1
    with a one-line error rather than running N copies of the same work."""
    if os.environ.get(distributed.ENABLE) == "1":
        sys.stderr.write(f"error: {command} runs as one process on one host (its model uses all of that host's "
                         f"devices); unset {distributed.ENABLE}\n")
        sys.exit(1)


_FLAGS = flags.FLAGS


def _generate_main(argv) -> None:
    del argv
    try:
        _generate()
    except (ValueError, OSError) as e:  # bad input: a clear message, no traceback
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)


def _generate() -> None:
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the output
    cfg = _FLAGS.config
    join_job("sajax-generate", {"config": cfg.to_dict(), "model": _FLAGS.model, "prompt": _FLAGS.prompt,
                                "chat": _FLAGS.chat})
    config, params, tok = loading.load_model_and_tokenizer(cfg, _FLAGS.model)
    mesh = sharding.make_mesh(**cfg.mesh)
    params = jax.device_put(params, decoder.param_shardings(config, mesh))
    prompts = list(_FLAGS.prompt or cfg.generate.prompts)
    outputs = generate.generate_text(config, params, tok, prompts, chat=_FLAGS.chat,
                                     max_new_tokens=cfg.generate.max_new_tokens,
                                     temperature=cfg.generate.temperature, top_k=cfg.generate.top_k,
                                     top_p=cfg.generate.top_p, seed=cfg.seed)
    if distributed.is_main():
        source = _FLAGS.model or f"random tiny model ({config.num_params():,} params)"
        print(f"# {source} on {len(jax.devices())} {jax.devices()[0].platform} device(s)")
        for prompt, output in zip(prompts, outputs):
            print(f"### Prompt: {prompt}\n### Output: {output}\n")


def generate_main() -> None:
    run_app(_generate_main, _define_generate_flags)


def _define_train_flags() -> None:
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "ml_collections config file (get_config()).")
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config; resumed if it exists.",
                        required=True)


def train_main() -> None:
    run_app(_train_main, _define_train_flags)


def _train_main(argv) -> None:
    del argv
    from sajax.train import loop

    logging.set_verbosity(logging.WARNING)
    join_job("sajax-train")  # loop.run checks that every process runs the same config and workdir
    try:
        with peer_failures("sajax-train"):
            final = loop.run(_FLAGS.config, _FLAGS.workdir)
    except (ValueError, OSError, loop.TrainingError, checkpoint.CheckpointError, distributed.HostMismatch) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    if distributed.is_main() and final:
        print("final evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))


def _define_export_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory written by sajax-train.", required=True)
    flags.DEFINE_string("out", None, "HF directory to write (replaced when complete).", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
    flags.DEFINE_string("peft", None, "A LoRA run: also write its adapters here in PEFT's format "
                                      "(adapter_config.json + adapter_model.safetensors).")


def export_main() -> None:
    run_app(_export_main, _define_export_flags)


def _export_main(argv) -> None:
    del argv
    from sajax.train import export

    logging.set_verbosity(logging.WARNING)
    join_job("sajax-export")  # export.export checks that every process exports the same
    try:
        with peer_failures("sajax-export"):
            path, step = export.export(_FLAGS.workdir, _FLAGS.out, step=_FLAGS.step, peft_out=_FLAGS.peft)
    except (ValueError, OSError, checkpoint.CheckpointError, distributed.HostMismatch) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    if distributed.is_main():
        print(f"exported step {step} of {_FLAGS.workdir} to {path}"
              + (f" (LoRA adapters in PEFT's format: {Path(_FLAGS.peft).resolve()})" if _FLAGS.peft else ""))


def _define_generate_flags() -> None:
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "ml_collections config file (get_config()).")
    flags.DEFINE_string("model", None, "HF LLaMA directory (config.json, *.safetensors, tokenizer files), a .gguf "
                                       "file, or a known model name (SmolLM2-135M-Instruct, fetched once).")
    flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch. Default: config.generate.prompts.")
    flags.DEFINE_bool("chat", False, "Send each prompt as a user turn of the model's chat template (stops at its end "
                                     "of turn).")


_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)


def run_app(main, define_flags) -> None:
    """absl app.run with bad flags / `--config.key=value` overrides reported in one line, exit status 2, and jax's
    persistent compilation cache on (`sajax.compilation_cache`).
    (config_flags applies overrides already when the flag is defined, hence the guard around `define_flags`.)"""
    try:
        define_flags()
    except _FLAG_ERRORS as e:
        _flag_error(e)
    compilation_cache.enable()
    app.run(main, argv=sys.argv, flags_parser=_parse_flags)


def _parse_flags(argv):
    try:
        rest = _FLAGS(argv)
    except _FLAG_ERRORS as e:
        _flag_error(e)
    if len(rest) > 1:  # every input is a flag: a stray word is a mistake (e.g. a second path after --original)
        _flag_error(ValueError(f"unexpected arguments {rest[1:]} (every input is a --flag)"))
    return rest


def _flag_error(error: BaseException) -> None:
    message = error
    while isinstance(message, BaseException) and message.args:  # unwrap AttributeError(KeyError('...'))
        message = message.args[0]
    sys.stderr.write(f"error: bad flag: {message}\nPass --help for usage.\n")
    sys.exit(2)


EVALS = ("multiple_choice", "are_you_sure", "answer_sycophancy", "feedback_sycophancy", "judge_calibration",
         "hhh_adversarial")


def _define_eval_flags() -> None:
    flags.DEFINE_string("model", None, "The model to evaluate: a sajax-train workdir (its newest checkpoint), a HF "
                                       "folder, a .gguf file or a known model name.", required=True)
    flags.DEFINE_multi_string("eval", None, f"Evaluation(s) to run: {', '.join(EVALS)}; repeat for several.",
                              required=True)
    flags.DEFINE_string("data", None, "Questions: BIG-bench task JSON or HH-RLHF JSONL (default: the built-in "
                                      "sajax_social_choices set).")
    flags.DEFINE_string("judge", None, "The judge (hhh_adversarial; judge_calibration calibrates it, or --model "
                                       "without it): a workdir, HF folder, .gguf file, known model name, or the base "
                                       "URL of an OpenAI-compatible server (http://host:port/v1).")
    flags.DEFINE_string("judge_model", "", "A served judge: the model name the server serves.")
    flags.DEFINE_string("judge_api_key_env", "", "A served judge: the environment variable holding the API key.")
    flags.DEFINE_enum("judge_readout", "yes_no", ["yes_no", "digits"], "How the judge's 1-10 rating is read.")
    flags.DEFINE_integer("max_new_tokens", 96, "Answer length for evaluations that generate (hhh_adversarial).")
    flags.DEFINE_string("out", None, "Directory for <eval>.json results (each written whole, replacing the last).")
    flags.DEFINE_integer("limit", 0, "Use only the first N questions (0: all).")
    flags.DEFINE_integer("batch_size", 16, "Rows per jitted scoring call.")
    flags.DEFINE_integer("seed", 0, "Seed of option orders and bootstrap resamples.")


def eval_main() -> None:
    run_app(_eval_main, _define_eval_flags)


def _eval_main(argv) -> None:
    del argv
    import dataclasses
    import json
    from pathlib import Path

    from sajax import fileutil
    from sajax.evals import adversarial, judge, multiple_choice, served, sycophancy
    from sajax.infer import lm

    logging.set_verbosity(logging.WARNING)
    single_process("sajax-eval")
    try:
        unknown = [e for e in _FLAGS.eval if e not in EVALS]
        if unknown:
            raise ValueError(f"--eval: {unknown} not among {EVALS}")
        questions = multiple_choice.read(_FLAGS.data or multiple_choice.BUILT_IN)
        if _FLAGS.limit:
            questions = dataclasses.replace(questions, items=questions.items[:_FLAGS.limit])
        if "hhh_adversarial" in _FLAGS.eval and not _FLAGS.judge:
            raise ValueError("--eval=hhh_adversarial needs --judge (a model to rate the answers)")
        model = lm.load(_FLAGS.model, _FLAGS.batch_size)
        if _FLAGS.judge and _FLAGS.judge != _FLAGS.model:
            rater = judge.load(_FLAGS.judge, _FLAGS.judge_readout, batch_size=_FLAGS.batch_size,
                               served_model=_FLAGS.judge_model, api_key_env=_FLAGS.judge_api_key_env)
        else:
            rater = judge.Judge(model, _FLAGS.judge_readout)
    except (ValueError, OSError, checkpoint.CheckpointError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    runs = {"multiple_choice": lambda: multiple_choice.evaluate(model, questions),
            "are_you_sure": lambda: sycophancy.are_you_sure(model, questions, seed=_FLAGS.seed),
            "answer_sycophancy": lambda: sycophancy.answer(model, questions, seed=_FLAGS.seed),
            "feedback_sycophancy": lambda: sycophancy.feedback(judge.Judge(model, _FLAGS.judge_readout), questions),
            "judge_calibration": lambda: judge.calibration(rater, questions),
            "hhh_adversarial": lambda: adversarial.evaluate(model, rater, questions, _FLAGS.max_new_tokens)}
    rows = []
    for name in _FLAGS.eval:
        try:
            result = runs[name]()
        except (ValueError, served.ServerError) as e:
            sys.stderr.write(f"error: --eval={name}: {e}\n")
            sys.exit(1)
        result = {"model": _FLAGS.model, **result}
        if name in ("judge_calibration", "hhh_adversarial"):
            result["judge"] = _FLAGS.judge or _FLAGS.model
        print(json.dumps(result), flush=True)
        if _FLAGS.out:
            Path(_FLAGS.out).mkdir(parents=True, exist_ok=True)
            fileutil.write_text(Path(_FLAGS.out) / f"{name}.json", json.dumps(result, indent=1) + "\n")
        rows.extend((name, key, value, result[f"{key}_interval"], result["n"]) for key, value in result.items()
                    if f"{key}_interval" in result)
    sys.stderr.write(f"{'eval':20s} {'metric':21s} {'value':>6s} {'95% interval':>15s} {'n':>5s}\n")
    number = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731 (no rated item: no mean, no interval)
    for name, key, value, (low, high), n in rows:
        sys.stderr.write(f"{name:20s} {key:21s} {number(value):>6s} {f'[{number(low)}, {number(high)}]':>15s} "
                         f"{n:5d}\n")


def _define_serve_flags() -> None:
    flags.DEFINE_string("model", None, "What to serve: a sajax-train workdir (its newest checkpoint), a HF LLaMA "
                                       "directory, a .gguf file or a known model name.", required=True)
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_string("served_model_name", "", "The model's name in the API (default: --model as given).")
    flags.DEFINE_integer("max_batch", 16, "Most requests (rows) run in one jitted call.")
    flags.DEFINE_float("max_wait_ms", 5.0, "How long the first queued request waits for others to share its batch.")
    flags.DEFINE_integer("max_queue", 256, "Requests waiting beyond this are refused with 429 (clients retry).")


def serve_main() -> None:
    run_app(_serve_main, _define_serve_flags)


def _serve_main(argv) -> None:
    del argv
    from sajax.infer import serve

    logging.set_verbosity(logging.WARNING)
    single_process("sajax-serve")
    if _FLAGS.max_batch < 1 or _FLAGS.max_queue < 1 or _FLAGS.max_wait_ms < 0:
        sys.stderr.write("error: --max_batch and --max_queue must be >= 1 and --max_wait_ms >= 0\n")
        sys.exit(1)
    try:
        serve.serve(_FLAGS.model, _FLAGS.host, _FLAGS.port, name=_FLAGS.served_model_name,
                    max_batch=_FLAGS.max_batch, max_wait_ms=_FLAGS.max_wait_ms, max_queue=_FLAGS.max_queue)
    except (ValueError, OSError, checkpoint.CheckpointError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)


def _define_compile_flags() -> None:
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "ml_collections config file (get_config()).")
    flags.DEFINE_string("topology", None, "The target: a Cloud TPU slice as GENERATION:AxB[xC] (v4, v5e, v5p, v6e), "
                                          "e.g. v5e:2x2, v5p:4x4x4.", required=True)
    flags.DEFINE_bool("generation", True, "Also compile the generation programs (prefill and decode).")
    flags.DEFINE_integer("generation_batch", 0, "Prompts per generation call (0: one per data × fsdp shard).")
    flags.DEFINE_integer("prompt_len", 0, "Prompt tokens for generation (0: data.max_prompt_len).")
    flags.DEFINE_integer("new_tokens", 0, "Tokens to generate (0: generate.max_new_tokens).")
    flags.DEFINE_bool("costs", True, "Predict step time and MFU (two more compiles: 1 and 2 layers, loops unrolled).")
    flags.DEFINE_string("json", None, "Also write the report to this JSON file.")


def compile_main() -> None:
    run_app(_compile_main, _define_compile_flags)


def _compile_main(argv) -> None:
    del argv
    import json
    from pathlib import Path

    from tqdm import tqdm

    from sajax import aot, fileutil

    logging.set_verbosity(logging.WARNING)
    single_process("sajax-compile")
    cfg = _FLAGS.config
    bar = tqdm(total=1 + 2 * _FLAGS.costs + _FLAGS.generation, desc="compile", unit="program")
    done = lambda name: bar.set_postfix_str(name, refresh=False) or bar.update(1)  # noqa: E731
    try:
        chip, devices = aot.topology_devices(_FLAGS.topology)
        results = [aot.compile_train_step(cfg, chip, devices, costs=_FLAGS.costs, progress=done)]
        if _FLAGS.generation:
            mesh = results[0]["mesh"]
            results += aot.compile_generation(
                cfg, chip, devices, batch=_FLAGS.generation_batch or mesh["data"] * mesh["fsdp"],
                prompt_len=_FLAGS.prompt_len or cfg.data.max_prompt_len,
                new_tokens=_FLAGS.new_tokens or cfg.generate.max_new_tokens)
            done("generation")
        bar.close()
        print(aot.format_report(_FLAGS.topology, chip, devices, results), flush=True)
        if _FLAGS.json:
            report = {"topology": _FLAGS.topology, "chips": len(devices), "chip": chip.device_kind,
                      "results": aot.to_json(results)}
            fileutil.write_text(Path(_FLAGS.json), json.dumps(report, indent=1) + "\n")
        aot.check_fits(results)
    except (ValueError, OSError, aot.DoesNotFit) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
