"""Reference log-probabilities for DPO: every response of every group scored once by the initial model.

Stored in the workdir as `reference_logp.npz` (ragged: per source `offsets_i` [records + 1] and `values_i`
[responses]), so training keeps a single model in memory and a resumed run reuses them.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from sajax import batch as batch_lib
from sajax import distributed, fileutil, input_pipeline, sharding
from sajax.input_pipeline import ReferenceLogps
from sajax.train_step import response_nll

FILE = "reference_logp.npz"


def compute(params, config, encoder: input_pipeline.GroupEncoder, source, mesh, *, batch_size: int,
            chunk_size: int) -> ReferenceLogps:
    """Summed log p(response | prompt) of every response (same tokenization and truncation as training)."""
    single = dataclasses.replace(encoder, num_comp=1)
    fields = ("tokens", "attention_mask", "loss_mask")
    shardings = batch_lib.shardings(mesh, fields)
    score = jax.jit(functools.partial(_logp, config=config, chunk_size=chunk_size),
                    in_shardings=(sharding.param_shardings(config, mesh), shardings),
                    out_shardings=sharding.replicated(mesh))  # every process reads every value
    counts, values, pending = [], [], []

    def flush():
        rows = pending + [single.empty()] * (batch_size - len(pending))
        batch = {key: np.stack([row[key] for row in rows]) for key in fields}
        # every process computes the same rows (replicated input): reference scoring is a one-off
        logp = jax.device_get(score(params, {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}))
        values.extend(logp[:len(pending)].tolist())
        pending.clear()

    for record in tqdm(range(len(source)), desc="reference log-probs", disable=not distributed.is_main()):
        group = source[record]  # decoded once, all its responses scored
        counts.append(len(group["responses"]))
        for k in range(counts[-1]):
            pending.append(single.encode(group, [k]))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    return ReferenceLogps(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), np.asarray(values, np.float32))


def _logp(params, batch, *, config, chunk_size):
    return -response_nll(config, params, batch, chunk_size).total[:, 0]


def load(path: Path, sources) -> list[ReferenceLogps]:
    """The stored reference log-probs of each source; ValueError naming the file when it is unreadable or does
    not match the sources (a dataset changed since it was computed)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            refs = [ReferenceLogps(stored[f"offsets_{i}"], stored[f"values_{i}"]) for i in range(len(sources))]
    except Exception as e:  # zipfile.BadZipFile, EOFError, KeyError, ValueError: a damaged or foreign file
        raise ValueError(f"{path}: unreadable reference log-probs ({e}); delete the file to recompute it from the "
                         "initial model") from e
    for i, (ref, source) in enumerate(zip(refs, sources)):
        if len(ref.offsets) != len(source) + 1 or ref.offsets[-1] != sum(
                len(source[j]["responses"]) for j in range(len(source))) or len(ref.values) != ref.offsets[-1]:
            raise ValueError(f"{path}: reference log-probs for source {i} do not match {source.path} (was the "
                             "dataset changed?); delete the file to recompute from the initial model")
    return refs


def compute_and_save(path: Path, params, config, encoder, sources, mesh, *, batch_size: int,
                     chunk_size: int) -> list[ReferenceLogps]:
    """The reference log-probs of each source under `params` (the initial model), written atomically to
    `path` (process 0)."""
    refs = [compute(params, config, encoder, source, mesh, batch_size=batch_size, chunk_size=chunk_size)
            for source in sources]
    if distributed.is_main():
        with fileutil.replace_file(path) as tmp:
            np.savez(tmp, **{f"offsets_{i}": r.offsets for i, r in enumerate(refs)},
                     **{f"values_{i}": r.values for i, r in enumerate(refs)})
    return refs
