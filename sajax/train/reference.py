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

from sajax import fileutil
from sajax.data import packing, pipeline
from sajax.data import batch as batch_lib
from sajax.data.pipeline import ReferenceLogps
from sajax.model import decoder
from sajax.parallel import distributed, sharding
from sajax.train.step import response_nll

FILE = "reference_logp.npz"


def compute(params, config, encoder: pipeline.GroupEncoder, source, mesh, *, batch_size: int,
            chunk_size: int, pack_len: int = 0) -> ReferenceLogps:
    """Summed log p(response | prompt) of every response (same tokenization and truncation as training), in
    batches of `batch_size` rows of one response each; with `pack_len`, in packed batches (`sajax.data.packing`) of
    `batch_size` groups of up to `encoder.num_comp` responses of a record each, its prompt computed once."""
    per_group = encoder.num_comp if pack_len else 1
    grouped = dataclasses.replace(encoder, num_comp=per_group)
    packer = pipeline.make_packer(grouped, mesh, batch_size, 1, pack_len, replicated=True) if pack_len else None
    fields = tuple(batch_lib.PACKED_FIELDS) if pack_len else ("tokens", "attention_mask", "loss_mask")
    shardings = batch_lib.shardings(mesh, fields, packed=bool(pack_len))
    score = jax.jit(functools.partial(_logp, config=config, chunk_size=chunk_size),
                    in_shardings=(decoder.param_shardings(config, mesh), shardings),
                    out_shardings=sharding.replicated(mesh))  # every process reads every value
    counts, values, pending, sizes = [], [], [], []

    def flush():
        groups = pending + [grouped.empty()] * (batch_size - len(pending))
        if packer is None:
            batch = {key: np.stack([group[key] for group in groups]) for key in fields}
        else:
            packed = packer(groups)
            batch = packing.flatten(packed, packing.rows_of(packed))
        # every process computes the same rows (replicated input): reference scoring is a one-off
        logp = jax.device_get(score(params, {k: jax.device_put(batch[k], shardings[k]) for k in fields}))
        for row, size in zip(logp, sizes):
            values.extend(row[:size].tolist())
        pending.clear()
        sizes.clear()

    for record in tqdm(range(len(source)), desc="reference log-probs", disable=not distributed.is_main()):
        group = source[record]  # decoded once, all its responses scored
        counts.append(len(group["responses"]))
        for first in range(0, counts[-1], per_group):
            chosen = list(range(first, min(first + per_group, counts[-1])))
            pending.append(grouped.encode(group, chosen))
            sizes.append(len(chosen))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    return ReferenceLogps(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), np.asarray(values, np.float32))


def _logp(params, batch, *, config, chunk_size):
    return -response_nll(config, params, batch, chunk_size).total  # [B, K]


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
                     chunk_size: int, pack_len: int = 0) -> list[ReferenceLogps]:
    """The reference log-probs of each source under `params` (the initial model), written atomically to
    `path` (process 0)."""
    refs = [compute(params, config, encoder, source, mesh, batch_size=batch_size, chunk_size=chunk_size,
                    pack_len=pack_len) for source in sources]
    if distributed.is_main():
        with fileutil.replace_file(path) as tmp:
            np.savez(tmp, **{f"offsets_{i}": r.offsets for i, r in enumerate(refs)},
                     **{f"values_{i}": r.values for i, r in enumerate(refs)})
    return refs
