"""The training batch: B prompt groups × K responses × T tokens. One schema for the input pipeline (which fills
it), the train and eval steps (which shard it) and shape checks.

  tokens, loss_mask, attention_mask [B, K, T] int32   [BOS] + prompt + response + EOS, right-padded; loss_mask
                                                      marks the response tokens, attention_mask the real ones
  scores [B, K] float32                               the responses' ratings
  valid [B, K] bool                                   False for the padding responses of groups with < K
  reference_logp [B, K] float32                       Σ log p(response | prompt) under the initial model (DPO)

Packed (`sajax.data.packing`, data.packing): the token arrays are replaced by rows [R, L] of several groups each
(PACKED_FIELDS); the group fields stay [B, K].
"""

from __future__ import annotations

import jax
import numpy as np

from sajax.parallel import sharding

FIELDS = {  # name: (dtype, rank)
    "tokens": (np.int32, 3), "loss_mask": (np.int32, 3), "attention_mask": (np.int32, 3),
    "scores": (np.float32, 2), "valid": (np.bool_, 2), "reference_logp": (np.float32, 2),
}


PACKED_ROW_FIELDS = ("tokens", "positions", "segment_ids", "span_ids", "loss_mask", "response_index")  # [R, L]
GROUP_FIELDS = ("scores", "valid", "reference_logp")  # [B, K] in both layouts
PACKED_FIELDS = {**{name: (np.int32, 2) for name in PACKED_ROW_FIELDS}, **{name: FIELDS[name] for name in GROUP_FIELDS}}


def empty_group(num_comp: int, max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One group's arrays ([K, T] / [K]) with every response invalid; tokens hold `pad_id`."""
    out = {name: np.zeros((num_comp, max_len)[:rank - 1], dtype) for name, (dtype, rank) in FIELDS.items()}
    out["tokens"][:] = pad_id
    return out


def abstract(batch_size: int, num_comp: int, max_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {name: jax.ShapeDtypeStruct((batch_size, num_comp, max_len)[:rank], dtype)
            for name, (dtype, rank) in FIELDS.items()}


def shardings(mesh: jax.sharding.Mesh, names=None, packed: bool = False) -> dict[str, jax.sharding.NamedSharding]:
    """Every field (of `names`, default all) split over the mesh's batch axes (data, fsdp) along its first axis
    (B, or R for packed rows)."""
    fields = PACKED_FIELDS if packed else FIELDS
    return {name: sharding.batch_sharding(mesh, fields[name][1]) for name in (names or fields)}
