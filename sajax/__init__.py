"""sajax: Stable Alignment in JAX — a sharded Flax decoder with HF parity, training, generation and model-file I/O.

Packages by layer; every import runs down this list (tests/test_layout.py checks it):
  cli, aot        command lines (flags and one-line errors); ahead-of-time compilation for TPU slices
  evals           evaluations of a model's social alignment
  infer           generation, scoring, the OpenAI-compatible server
  train           losses, the jitted step, the run, checkpoints, export
  data            the alignment dataset contract and the input pipeline
  formats         Hugging Face folders, GGUF files, tokenizers, known models
  model           the architecture config and the decoder
  parallel        mesh, shardings, multi-process jobs
`fileutil` and `config_files` are leaf utilities any layer may use; `compilation_cache` (jax's persistent cache,
on for every command) uses `fileutil` only.
"""

import glob
import importlib.util
import os


def _quiet_libtpu_off_tpus() -> None:
    """With libtpu installed (the `tpu` extra, for sajax-compile) on a machine without TPU chips, jax still starts
    libtpu, which prints warnings about the TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES it cannot look up before
    jax falls back to the CPU. Off a TPU these select nothing: give them neutral values (only where no Google
    PCI device, i.e. no TPU chip, is present, and never over values already set)."""
    if importlib.util.find_spec("libtpu") is None:
        return
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == "0x1ae0":  # Google: a TPU chip
                    return
        except OSError:
            continue
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


_quiet_libtpu_off_tpus()

from sajax.model.config import Llama3RopeScaling, ModelConfig  # noqa: E402

__all__ = ["ModelConfig", "Llama3RopeScaling"]
__version__ = "0.1.0"
