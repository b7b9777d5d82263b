"""Ahead-of-time compilation for hardware this machine does not have (`sajax-compile`): will a run fit, and how
fast will it be, before paying for a pod.

The real train step (`sajax.train.step.make_train_step`) and the generation programs (`sajax.infer.generate`: prefill,
then the decode loop) are lowered with abstract inputs — ShapeDtypeStructs carrying the NamedShardings a run gives
them on the target's mesh — and compiled by XLA for a Cloud TPU slice that libtpu describes on any CPU machine
(`pip install '.[tpu]'`). Per chip, it reports:

- memory, from XLA's memory analysis of the compiled program: arguments (parameters, optimizer state, the batch;
  for generation the KV cache), outputs, aliased bytes (outputs written over donated arguments, counted once),
  temporaries and generated code; total = arguments + outputs − aliased + temporaries + code, against the chip's
  HBM. The step does not fit when the total exceeds the HBM, or when XLA refuses to compile it
  (RESOURCE_EXHAUSTED);
- FLOPs per step: the model's (`metrics.train_flops_per_token`: 6·N + attention per token, no recomputation) and
  what XLA counts in the compiled step (recomputation by `remat_policy` included);
- predicted step time and MFU: XLA's `optimal_seconds` for the step (its cost model's time for every operation
  at the chip's compute and memory rates) and the model FLOPs per chip ÷ (that time × the chip's peak) — only
  when the cost analysis is self-consistent. On large per-chip batches XLA reports fewer FLOPs than the model
  has (likely its own loops, such as windowed einsums over fsdp shards, counted once) and `optimal_seconds` can
  come out negative; the report then says so instead of predicting.

XLA's cost analysis counts the body of a loop once, whatever its trip count, and the step loops over layers
(`scan_layers`), loss chunks (`loss_chunk_size`) and micro-batches (`grad_accum_steps`). So the costs come from
compiles of the same step with every loop unrolled (`step_costs`) — for 1 and 2 layers, extrapolated to all of
them (every layer is the same computation). Memory always comes from the step as configured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re

import jax
import ml_collections

from sajax.data import batch as batch_lib
from sajax.infer import generate
from sajax.model import decoder
from sajax.parallel import sharding
from sajax.train import losses, metrics
from sajax.train import loop as train_lib
from sajax.train import step as ts

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip (Cloud TPU's published figures)."""

    generation: str  # as in a topology name: v5p:4x4x4
    device_kind: str  # jax's device_kind
    hbm_bytes: int

    @property
    def peak_flops(self) -> float:
        """Dense bf16 FLOP/s (`metrics.PEAK_FLOPS`)."""
        return metrics.known_peak_flops(self.device_kind)


TPU_CHIPS = {chip.generation: chip for chip in (
    Chip("v4", "TPU v4", 32 * GiB),
    Chip("v5e", "TPU v5 lite", 16 * GiB),
    Chip("v5p", "TPU v5", 95 * GiB),
    Chip("v6e", "TPU v6 lite", 32 * GiB),
)}


class DoesNotFit(RuntimeError):
    """A program needs more memory per chip than the target has."""


def parse_topology(topology: str) -> tuple[Chip, tuple[int, ...]]:
    """'v5p:4x4x4' → (the v5p chip, (4, 4, 4)); ValueError naming the accepted forms."""
    match = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+){1,2})", topology)
    if not match or match.group(1) not in TPU_CHIPS:
        raise ValueError(f"--topology {topology!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                         f"{sorted(TPU_CHIPS)}, e.g. v5e:2x2, v5p:4x4x4, v6e:8x8")
    dims = tuple(int(d) for d in match.group(2).split("x"))
    if min(dims) < 1:
        raise ValueError(f"--topology {topology!r}: every dimension must be >= 1")
    return TPU_CHIPS[match.group(1)], dims


def topology_devices(topology: str) -> tuple[Chip, list]:
    """The chip and the devices of a TPU slice, described by libtpu on this machine (no TPU needed)."""
    chip, _ = parse_topology(topology)
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError("sajax-compile needs libtpu to compile for TPUs: pip install '.[tpu]'")
    # (off a TPU, sajax/__init__.py keeps libtpu from warning about the host's own slice, which plays no part here)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: other processes may use libtpu
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # libtpu's own message: an unknown shape for this generation
        raise ValueError(f"--topology {topology!r}: libtpu cannot describe it ({str(e).splitlines()[0]})") from e
    return chip, list(devices)


@dataclasses.dataclass
class Memory:
    """Bytes per chip of one compiled program (XLA's memory analysis)."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled) -> Memory:
        m = compiled.memory_analysis()
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes,
                   m.generated_code_size_in_bytes)


@contextlib.contextmanager
def _out_of_memory(what: str):
    """XLA's out-of-memory at compile time (a JaxRuntimeError like any other) → DoesNotFit naming `what`."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e) or "hbm" in str(e).lower():
            raise DoesNotFit(f"{what}: XLA cannot fit it in the chip's memory: {str(e).splitlines()[0][:500]}") from e
        raise


def compile_lowered(lowered, what: str = "the program"):
    with _out_of_memory(what):
        return lowered.compile()


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def lower_train_step(cfg, config, mesh):
    steps = max(cfg.train.steps, 1)
    tx = ts.make_optimizer(cfg.optimizer, steps, config)
    shardings = ts.state_shardings(config, tx, mesh)
    state = ts.abstract_state(config, tx, shardings)
    batch = _abstract(batch_lib.abstract(cfg.train.batch_size, cfg.data.num_comp, cfg.data.max_len),
                      batch_lib.shardings(mesh))
    frozen = ts.split_trainable(config, decoder.param_shapes(config))[1]  # LoRA: the base, in lora.base_dtype
    dtype = train_lib.base_dtype(cfg)
    frozen = _abstract(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), frozen),
                       ts.frozen_shardings(config, mesh))
    with sharding.activation_rules(mesh):
        step = ts.make_train_step(config, cfg.train, tx, ts.learning_rate_schedule(cfg.optimizer, steps), mesh,
                                  shardings)
        return step.lower(state, batch, frozen)


COSTS = ("flops", "bytes accessed", "optimal_seconds")


def step_costs(cfg: ml_collections.ConfigDict, config, mesh, progress=None) -> dict[str, float]:
    """XLA's cost analysis of one train step, per chip, counting every loop iteration.

    The step is compiled with its loops over loss chunks and micro-batches unrolled (`losses.unrolled_loops`) and
    its layers unrolled, for 1 and for 2 layers: every layer is the same computation on the same shardings, so a
    cost is c(L) = c(1) + (L − 1)·(c(2) − c(1)) — two compiles of one or two layers instead of one of L."""
    costs = []
    for layers in (1, 2):
        shallow = dataclasses.replace(config, num_hidden_layers=layers, scan_layers=False)
        with losses.unrolled_loops():
            lowered = lower_train_step(cfg, shallow, mesh)
        costs.append(compile_lowered(lowered, f"the train step with {layers} layer(s)").cost_analysis())
        if progress:
            progress(f"costs, {layers} layer(s)")
    layers = config.num_hidden_layers
    return {key: costs[0][key] + (layers - 1) * (costs[1][key] - costs[0][key]) for key in COSTS}


def compile_train_step(cfg: ml_collections.ConfigDict, chip: Chip, devices: list, *, costs: bool = True,
                       progress=None) -> dict:
    """The train step of `cfg` compiled for `devices`: its memory per chip, FLOPs, predicted time and MFU.
    `progress(name)` is called after each compile."""
    train_lib.check_config(cfg)
    config = train_lib.model_config(cfg)
    mesh = sharding.make_mesh(**cfg.mesh, devices=devices, arrange=True)
    sharding.check_micro_batch(cfg.train.batch_size // cfg.train.grad_accum_steps, mesh)
    decoder.param_shardings(config, mesh)  # every parameter divisible by its mesh axes (names the first that is not)
    memory = Memory.of(compile_lowered(lower_train_step(cfg, config, mesh), "the train step"))
    if progress:
        progress("train step")
    tokens = cfg.train.batch_size * cfg.data.num_comp * cfg.data.max_len
    model_flops = metrics.train_flops_per_token(config, cfg.data.max_len) * tokens / len(devices)
    out = {"program": "train step", "mesh": dict(mesh.shape), "memory": memory, "hbm_bytes": chip.hbm_bytes,
           "params": config.num_params(), "tokens_per_step": tokens, "model_flops_per_chip": model_flops}
    if costs:
        out.update(predict(cfg, config, mesh, chip, model_flops, tokens, progress))
    return out


def predict(cfg: ml_collections.ConfigDict, config, mesh, chip: Chip, model_flops: float, tokens: int,
            progress=None) -> dict:
    """XLA's FLOPs and bytes per chip and, when its cost analysis is self-consistent, the predicted step time,
    tokens/s and MFU (`step_costs`); else `no_prediction` saying why — also when the loop-free compiles behind
    the prediction do not fit the chip themselves (unrolled loops keep more temporaries than the step does)."""
    try:
        cost = step_costs(cfg, config, mesh, progress)
    except DoesNotFit as e:
        return {"no_prediction": f"the loop-free compiles that predict the time do not fit the chip themselves ({e})"}
    seconds = cost["optimal_seconds"]
    out = {"xla_flops_per_chip": cost["flops"], "bytes_accessed_per_chip": cost["bytes accessed"]}
    unreliable = []
    if cost["flops"] < model_flops:
        unreliable.append(f"XLA counts fewer FLOPs than the model's own ({cost['flops']:.3e} < "
                          f"{model_flops:.3e}): likely a loop XLA introduced itself (a windowed einsum over the "
                          "fsdp shards), counted once")
    if seconds <= 0:
        unreliable.append(f"XLA's optimal_seconds is {seconds:.3g}, not a time")
    if unreliable:
        out["no_prediction"] = "; ".join(unreliable)
    else:
        out.update(predicted_seconds=seconds, predicted_mfu=model_flops / (seconds * chip.peak_flops),
                   predicted_tokens_per_second=tokens / seconds)
    return out


def compile_generation(cfg: ml_collections.ConfigDict, chip: Chip, devices: list, *, batch: int,
                       prompt_len: int, new_tokens: int) -> list[dict]:
    """`generate`'s two programs for `batch` prompts of `prompt_len` tokens and `new_tokens` more, the parameters
    sharded as in training: the prefill (which builds the KV cache) and the decode loop. Their memory per chip."""
    config = train_lib.model_config(cfg)
    mesh = sharding.make_mesh(**cfg.mesh, devices=devices, arrange=True)
    if prompt_len + new_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt {prompt_len} + {new_tokens} new tokens exceed max_position_embeddings "
                         f"({config.max_position_embeddings})")
    params = _abstract(decoder.param_shapes(config), decoder.param_shardings(config, mesh))
    with sharding.activation_rules(mesh), _out_of_memory("generation"):
        prefill, decode = generate.compile_generation(config, params, batch=batch, prompt_len=prompt_len,
                                                      new_tokens=new_tokens,
                                                      input_sharding=sharding.replicated(mesh))
    return [{"program": f"generation prefill ({batch} × {prompt_len} tokens)", "memory": Memory.of(prefill),
             "hbm_bytes": chip.hbm_bytes},
            {"program": f"generation decode (+{new_tokens} tokens)", "memory": Memory.of(decode),
             "hbm_bytes": chip.hbm_bytes}]


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _seconds(t: float) -> str:
    return f"{t:.3f} s" if t >= 1 else f"{t * 1e3:.3g} ms"


def format_report(topology: str, chip: Chip, devices: list, results: list[dict]) -> str:
    lines = [f"# {topology}: {len(devices)} × {chip.device_kind} ({_size(chip.hbm_bytes)} HBM, "
             f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16 each)"]
    for r in results:
        m = r["memory"]
        lines.append(f"\n## {r['program']}" + (f" on mesh {r['mesh']}" if "mesh" in r else ""))
        lines.append(f"memory per chip: arguments {_size(m.arguments)}, outputs {_size(m.outputs)}, aliased "
                     f"{_size(m.aliased)}, temporaries {_size(m.temporaries)}, code {_size(m.code)}")
        lines.append(f"  total {_size(m.total)} of {_size(r['hbm_bytes'])} HBM ({m.total / r['hbm_bytes']:.1%}): "
                     + ("fits" if m.total <= r["hbm_bytes"] else "DOES NOT FIT"))
        if "model_flops_per_chip" in r:
            lines.append(f"{r['params']:,} parameters, {r['tokens_per_step']:,} tokens per step; model FLOPs per "
                         f"chip per step {r['model_flops_per_chip']:.3e}")
        if "xla_flops_per_chip" in r:
            lines.append(f"XLA: {r['xla_flops_per_chip']:.3e} FLOPs per chip (recomputation included), "
                         f"{_size(r['bytes_accessed_per_chip'])} of memory traffic")
        if "no_prediction" in r:
            lines.append(f"no step time predicted: {r['no_prediction']}")
        if "predicted_seconds" in r:
            lines.append(f"predicted step time {_seconds(r['predicted_seconds'])}, "
                         f"{r['predicted_tokens_per_second']:,.0f} tokens/s, MFU {r['predicted_mfu']:.1%}")
    return "\n".join(lines)


def check_fits(results: list[dict]) -> None:
    """DoesNotFit naming every program whose total memory exceeds the chip's HBM."""
    over = [f"{r['program']} needs {_size(r['memory'].total)} per chip, {_size(r['hbm_bytes'])} available"
            for r in results if r["memory"].total > r["hbm_bytes"]]
    if over:
        raise DoesNotFit("; ".join(over) + ": shard more (--config.mesh.fsdp / tensor), use a smaller "
                         "train.batch_size or more train.grad_accum_steps, model.remat_policy=full, or a larger slice")


def to_json(results: list[dict]) -> list[dict]:
    return [{**r, "memory": {**dataclasses.asdict(r["memory"]), "total": r["memory"].total}} for r in results]

