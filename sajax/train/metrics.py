"""Training metrics: model FLOPs and MFU, and a writer to JSONL + TensorBoard event files (tensorboardX, no
TensorFlow)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sajax import fileutil
from sajax.model import decoder, lora
from sajax.model.config import ModelConfig
from sajax.parallel import distributed

# Dense bf16 peak FLOP/s per device, by jax `device_kind` prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
}


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of forward + backward per token (PaLM, appendix B): 6·N_matmul + 12·L·H·E·T, where N_matmul
    counts the weights used in matmuls (the output projection but not the embedding lookup) and the second term
    is attention's score and value products. With LoRA the frozen weights get no weight gradient: 4·N_frozen
    (forward, and the gradient w.r.t. their inputs) + 6·N_trained (adapters, modules_to_save). Recomputation
    (remat) is not counted: this is *model* FLOPs."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    if config.lora_rank == 0:
        return 6.0 * _matmul_params(config, decoder.param_shapes(config)) + attention
    trained, frozen = lora.split(decoder.param_shapes(config), config.lora_modules_to_save)
    return 6.0 * _matmul_params(config, trained) + 4.0 * _matmul_params(config, frozen) + attention


def _matmul_params(config: ModelConfig, tree: dict) -> int:
    """Parameters of `tree`, less the embedding table when it is only looked up (untied)."""
    lookup = tree["embed_tokens"].size if "embed_tokens" in tree and not config.tie_word_embeddings else 0
    return sum(x.size for x in jax.tree.leaves(tree)) - lookup


def measure_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a jitted float32 [size²]·[size²] matmul on the default device (the CPU peak we report
    MFU against)."""
    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_device(configured: float = 0.0) -> float | None:
    """`configured` if > 0, else a known accelerator's bf16 peak, else (CPU) the measured fp32 matmul peak;
    None for an unknown accelerator (MFU is then not reported rather than guessed)."""
    if configured > 0:
        return configured
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measure_matmul_peak()
    return known_peak_flops(device.device_kind)


def known_peak_flops(device_kind: str) -> float | None:
    """The dense bf16 peak of a known accelerator (by jax `device_kind`; the longest matching prefix), else
    None."""
    matches = [prefix for prefix in PEAK_FLOPS if device_kind.startswith(prefix)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


class MetricsWriter:
    """Appends `{"step": s, **scalars}` lines to `<workdir>/metrics.jsonl` and writes TensorBoard scalars to
    `<workdir>/tensorboard` (process 0 only). On resume from `start_step`, lines of later steps (written after
    the checkpoint by the crashed run) are dropped, and TensorBoard is told to purge them, so nothing is
    duplicated."""

    def __init__(self, workdir: str | Path, start_step: int = 0):
        self.enabled = distributed.is_main()
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        path = Path(workdir) / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= start_step]
            fileutil.write_text(path, "".join(line + "\n" for line in kept))
        self._jsonl = open(path, "a", encoding="utf-8")
        self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"),
                                          purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        values = {f"{prefix}/{k}": float(v) for k, v in scalars.items() if np.isfinite(v)}
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
