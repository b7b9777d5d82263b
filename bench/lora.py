"""LoRA vs full fine-tuning on a real model: SmolLM2-135M-Instruct (its GGUF, fetched once per machine), the
trainer's jitted Stable Alignment step on the same batches, side by side in one run.

Per variant: the train state (what the step updates and its AdamW moments — what a checkpoint holds), the frozen
weights held beside it, both summed from the arrays themselves; XLA's memory analysis of the compiled step
(arguments, outputs, temporaries); and tokens/s (median step time over steps that alternate between the variants,
after every variant compiled). Variants: full fine-tuning; LoRA rank 8 on every attention and MLP projection
(fp32 base); the same with the base held in bfloat16 (`lora.base_dtype`).

    python bench/lora.py [--groups 4] [--k 2] [--seq 128] [--steps 5] [--rank 8]
"""

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from sajax.config_files import load_module
from sajax.data import pipeline
from sajax.formats import known_models, loading
from sajax.model import decoder, lora
from sajax.parallel import sharding
from sajax.train import metrics
from sajax.train import step as ts
from train_throughput import synthetic_batch  # bench/ is this script's folder: its first import path

tiny = load_module(Path(__file__).resolve().parent.parent / "configs" / "tiny.py")
MiB = 2**20


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def variant(base_config, base_params, cfg, mesh, rank, base_dtype):
    """(config, jitted step, initial state, frozen weights) of one variant."""
    config = base_config.replace(lora_rank=rank) if rank else base_config
    params = base_params
    if rank:
        params = lora.combine(base_params, jax.device_get(decoder.init_adapters(config, 0)))
    tx = ts.make_optimizer(cfg.optimizer, 100, config)
    shardings = ts.state_shardings(config, tx, mesh)
    trainable, frozen = ts.split_trainable(config, params)
    if base_dtype:
        frozen = jax.tree.map(lambda x: np.asarray(x).astype(base_dtype), frozen)
    state = ts.init_state(jax.device_put(trainable, shardings.params), tx, shardings)
    frozen = jax.device_put(frozen, ts.frozen_shardings(config, mesh))
    step = ts.make_train_step(config, cfg.train, tx, ts.learning_rate_schedule(cfg.optimizer, 100), mesh, shardings)
    return config, step, state, frozen


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    base_config, base_params = loading.load_pretrained(known_models.resolve("SmolLM2-135M-Instruct"))
    cfg = tiny.get_config()
    cfg.train.update(batch_size=args.groups, loss_chunk_size=16)
    cfg.data.update(max_len=args.seq, num_comp=args.k)
    mesh = sharding.make_mesh()
    batch = synthetic_batch(args.groups, args.k, args.seq, base_config.vocab_size)
    peak = metrics.measure_matmul_peak()
    print(f"SmolLM2-135M-Instruct ({base_config.num_params() / 1e6:.1f}M params), {args.groups} groups × K={args.k} "
          f"× T={args.seq} per step, fp32 compute, {jax.devices()[0].platform} ({len(jax.devices())} device); "
          f"measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    variants = {"full fine-tuning": (0, None), f"LoRA r={args.rank}": (args.rank, None),
                f"LoRA r={args.rank}, bf16 base": (args.rank, "bfloat16")}
    runs = {}
    with sharding.activation_rules(mesh):
        global_batch = pipeline.to_global(batch, mesh)
        for name, (rank, base_dtype) in variants.items():
            config, step, state, frozen = variant(base_config, base_params, cfg, mesh, rank, base_dtype)
            memory = step.lower(state, global_batch, frozen).compile().memory_analysis()
            state_bytes, frozen_bytes = nbytes(state), nbytes(frozen)
            state, out = step(state, global_batch, frozen)  # compile + warm-up
            jax.block_until_ready(out)
            runs[name] = dict(config=config, step=step, state=state, frozen=frozen, times=[], memory=memory,
                              state_bytes=state_bytes, frozen_bytes=frozen_bytes,
                              trainable=sum(x.size for x in jax.tree.leaves(state.params)))
        for _ in range(args.steps):
            for run in runs.values():
                start = time.perf_counter()
                run["state"], out = run["step"](run["state"], global_batch, run["frozen"])
                jax.block_until_ready(out)
                run["times"].append(time.perf_counter() - start)
    tokens = args.groups * args.k * args.seq
    full = runs["full fine-tuning"]
    print("\n| variant | trainable params | train state (params + AdamW) | frozen weights | XLA temporaries | "
          "step | tokens/s | vs full | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        seconds = float(np.median(run["times"]))
        rate = tokens / seconds
        mfu = metrics.train_flops_per_token(run["config"], args.seq) * rate / peak
        print(f"| {name} | {run['trainable'] / 1e6:.2f}M | {run['state_bytes'] / MiB:.0f} MiB | "
              f"{run['frozen_bytes'] / MiB:.0f} MiB | {run['memory'].temp_size_in_bytes / MiB:.0f} MiB | "
              f"{seconds * 1e3:.0f} ms | {rate:.0f} | {rate / (tokens / float(np.median(full['times']))):.2f}x | "
              f"{mfu:.1%} |")


if __name__ == "__main__":
    main()
