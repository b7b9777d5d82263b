"""Shared-prompt packing: a batch of prompt groups as rows of `row_len` tokens holding each prompt once.

The padded layout (`sajax.data.batch`) gives every response its own row  [BOS] + prompt + response + pad, so the prompt
is computed K times and short responses pay for the longest. Packed, one *unit* is a prompt followed by the
responses that share it:

    prompt[:-1] | prompt[-1] response_1 | prompt[-1] response_2 | …

Every response *span* starts with a copy of the prompt's last token (whose hidden state predicts the response's
first token, as in the padded row) and attends to the prompt and to itself only; positions restart after the
prompt, so each span sees exactly the context and positions of its padded row, and its next-token NLL is the same
function of the weights. Several units share a row when they fit (`segment_ids`), a unit longer than a row is
split into several, each with the prompt (so `row_len` >= data.max_len suffices). Responses of one group whose
prompts were truncated differently (a long response keeps less prompt) form separate units.

Row fields, [R, L] int32 (L = row_len):
  tokens, positions
  segment_ids    unit of the token within its row (1, 2, …); 0 = padding
  span_ids       0 for prompt tokens, else the response span (unique within the row)
  loss_mask      1 where the token is a response token predicted from the token before it (same span)
  response_index where that NLL goes: the response's slot b·K + k among its micro-batch's groups
Group fields, [B, K]: scores, valid, reference_logp (as `sajax.data.batch`).

Rows are laid out so that the train step's micro-batch split and the mesh's batch split keep working: the groups
a device holds in the padded layout (a contiguous block of the batch) are packed into that device's rows, and
row j of micro-batch a is row j·A + a of the device's block, as group j·A + a is. `Packer` returns the rows per
(device block, micro-batch) as [blocks, A, rows, L]; `flatten` pads every block to the same number of rows
(agreed across processes) and lays them out as [blocks · rows · A, L].
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from sajax.data.batch import GROUP_FIELDS
from sajax.data.batch import PACKED_ROW_FIELDS as ROW_FIELDS


def is_packed(batch: dict) -> bool:
    return "segment_ids" in batch


@dataclasses.dataclass(frozen=True)
class Unit:
    """One prompt and the responses that share it: (k, response tokens) of group `group` (its slot in the
    micro-batch)."""

    group: int
    prompt: tuple[int, ...]
    responses: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def length(self) -> int:
        """prompt[:-1] + Σ (prompt[-1] + response); without a prompt, Σ response."""
        shared = max(len(self.prompt) - 1, 0)
        return shared + sum(len(r) + (1 if self.prompt else 0) for _, r in self.responses)


def units_of(group: dict, slot: int) -> list[Unit]:
    """The units of one padded group ([K, T] rows of `GroupEncoder.encode`): its valid responses grouped by
    identical prompt (the tokens before the first response token), in order of first appearance."""
    by_prompt: dict[tuple[int, ...], list] = {}
    for k in np.flatnonzero(group["valid"]):
        length = int(group["attention_mask"][k].sum())
        start = int(np.argmax(group["loss_mask"][k])) if group["loss_mask"][k].any() else length
        tokens = group["tokens"][k, :length].tolist()
        by_prompt.setdefault(tuple(tokens[:start]), []).append((int(k), tuple(tokens[start:])))
    return [Unit(slot, prompt, tuple(responses)) for prompt, responses in by_prompt.items()]


def split_to_fit(unit: Unit, row_len: int) -> list[Unit]:
    """`unit` as consecutive pieces of at most `row_len` tokens, each with the prompt (ValueError when a single
    response does not fit)."""
    pieces, current = [], []
    for response in unit.responses:
        alone = dataclasses.replace(unit, responses=(response,)).length
        if alone > row_len:
            raise ValueError(f"a prompt + response of {alone} tokens does not fit in data.pack_len {row_len}; "
                             "pack_len must be >= data.max_len")
        if current and dataclasses.replace(unit, responses=tuple(current + [response])).length > row_len:
            pieces.append(dataclasses.replace(unit, responses=tuple(current)))
            current = []
        current.append(response)
    pieces.append(dataclasses.replace(unit, responses=tuple(current)))
    return pieces


def place(units: Sequence[Unit], row_len: int) -> list[list[Unit]]:
    """First-fit decreasing: units (split to fit) sorted by length, longest first (ties in input order), each into
    the first row with room. Deterministic."""
    pieces = [piece for unit in units for piece in split_to_fit(unit, row_len)]
    order = sorted(range(len(pieces)), key=lambda i: -pieces[i].length)
    rows, free = [], []
    for i in order:
        piece = pieces[i]
        for r, room in enumerate(free):
            if piece.length <= room:
                rows[r].append(piece)
                free[r] -= piece.length
                break
        else:
            rows.append([piece])
            free.append(row_len - piece.length)
    return rows


def write_row(units: Sequence[Unit], row_len: int, num_comp: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row's fields ([L] each) from its units."""
    row = {name: np.zeros(row_len, np.int32) for name in ROW_FIELDS}
    row["tokens"][:] = pad_id
    at, span = 0, 0
    for segment, unit in enumerate(units, start=1):
        shared = unit.prompt[:-1]
        row["tokens"][at:at + len(shared)] = shared
        row["positions"][at:at + len(shared)] = np.arange(len(shared))
        row["segment_ids"][at:at + len(shared)] = segment
        at += len(shared)
        for k, response in unit.responses:
            span += 1
            tokens = list(unit.prompt[-1:]) + list(response)
            n = len(tokens)
            row["tokens"][at:at + n] = tokens
            row["positions"][at:at + n] = len(shared) + np.arange(n)
            row["segment_ids"][at:at + n] = segment
            row["span_ids"][at:at + n] = span
            first = at + n - len(response) + (0 if unit.prompt else 1)  # without a prompt: first token unpredicted
            row["loss_mask"][first:at + n] = 1
            row["response_index"][at:at + n] = unit.group * num_comp + k
            at += n
    return row


@dataclasses.dataclass(frozen=True)
class Packer:
    """Packs this process's groups of a global batch (`input_pipeline` batch_fn).

    row_len: tokens per row; blocks: how many batch shards this process's devices hold (its groups split into
    that many contiguous blocks); micro_batches: train.grad_accum_steps (group g goes to micro-batch g mod A);
    group_offset: the global index of this process's first group."""

    row_len: int
    num_comp: int
    pad_id: int
    blocks: int = 1
    micro_batches: int = 1
    group_offset: int = 0

    def __call__(self, groups: Sequence[dict]) -> dict[str, np.ndarray]:
        """[blocks, A, rows, L] row fields (rows: the most any (block, micro-batch) needs; the others padded) and
        [B_local, K] group fields."""
        per_block, a = len(groups) // self.blocks, self.micro_batches
        if per_block * self.blocks != len(groups) or per_block % a:
            raise ValueError(f"{len(groups)} groups do not split into {self.blocks} blocks of a multiple of "
                             f"{a} micro-batches")
        cells = [[[] for _ in range(a)] for _ in range(self.blocks)]
        for i, group in enumerate(groups):
            g = self.group_offset + i
            cells[i // per_block][g % a].extend(units_of(group, g // a))
        placed = [[place(units, self.row_len) for units in block] for block in cells]
        rows = max(1, max(len(cell) for block in placed for cell in block))
        out = {name: np.zeros((self.blocks, a, rows, self.row_len), np.int32) for name in ROW_FIELDS}
        out["tokens"][:] = self.pad_id
        for d, block in enumerate(placed):
            for m, cell in enumerate(block):
                for r, units in enumerate(cell):
                    for name, values in write_row(units, self.row_len, self.num_comp, self.pad_id).items():
                        out[name][d, m, r] = values
        out.update({name: np.stack([group[name] for group in groups]) for name in GROUP_FIELDS})
        return out


def rows_of(packed: dict) -> int:
    """Rows per (device block, micro-batch) of `Packer`'s output."""
    return packed["tokens"].shape[2]


def flatten(packed: dict, rows: int) -> dict[str, np.ndarray]:
    """`Packer` output → the train step's arrays: every (block, micro-batch) padded to `rows` (>= its own) rows,
    then laid out [blocks · rows · A, L] with row j of micro-batch a of block d at d·rows·A + j·A + a."""
    have = rows_of(packed)
    if rows < have:
        raise ValueError(f"cannot pad {have} packed rows to {rows}")
    out = {}
    for name in ROW_FIELDS:
        x = packed[name]
        pad = np.zeros((*x.shape[:2], rows - have, x.shape[3]), x.dtype)
        x = np.concatenate([x, pad], axis=2)  # padding rows: segment 0, no loss
        out[name] = x.transpose(0, 2, 1, 3).reshape(-1, x.shape[3])
    out.update({name: packed[name] for name in GROUP_FIELDS})
    return out


def non_padding_tokens(packed: dict) -> int:
    """Tokens that are not padding (each unit's prompt, and its responses each with a copy of the prompt's last
    token), of `Packer` or `flatten` output."""
    return int((packed["segment_ids"] > 0).sum())
