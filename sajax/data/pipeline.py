"""Alignment groups → tokenized, sampled, batched, sharded global arrays (grain; deterministic; resumable).

Per group and epoch, `num_comp` responses are sampled (all of them when the group has fewer, the rest padded
and marked invalid). Each response becomes one row  [BOS] + prompt tail + response head + EOS  of at most
`max_len` tokens (`chat`: the prompt is the group's instruction and input as one user turn in the tokenizer's
chat template, which writes its own BOS, and the response ends with the template's end-of-turn token — the form a
chat model is evaluated and served in): the prompt keeps its *end* (at least `max_prompt_len` tokens of it when the
response is long), the response keeps its *start*. `loss_mask` marks the response tokens (the prompt is never
trained on).

A global batch holds B groups in the layout of `sajax.data.batch` (reference_logp: zeros unless DPO), or with a
`packing.Packer`, packed rows (`sajax.data.packing`: each prompt once, no padding between responses); each of P
processes reads, encodes and yields only the B/P rows its devices hold, and the global batches are the same for
any P.
Order and sampling depend only on the seed and the position in the stream, and the grain iterator's state
(a small dict) is saved with each checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import grain
import jax
import numpy as np

from sajax.data import packing
from sajax.data import batch as batch_lib
from sajax.data.alignment import GroupSource
from sajax.formats import tokenizer as tokenizer_lib
from sajax.parallel import distributed, sharding


@dataclasses.dataclass(frozen=True)
class GroupEncoder:
    """Tokenizes a group's prompt and sampled responses into fixed-shape [K, T] rows."""

    tokenizer: object
    max_len: int
    max_prompt_len: int
    num_comp: int
    chat: bool = False  # prompts in the tokenizer's chat template instead of the group's `query` text

    def __post_init__(self):
        if not 1 <= self.max_prompt_len <= self.max_len - 2:
            raise ValueError(f"data.max_prompt_len must be in 1..max_len-2 ({self.max_len - 2}), "
                             f"got {self.max_prompt_len}")
        if self.num_comp < 1:
            raise ValueError(f"data.num_comp must be >= 1, got {self.num_comp}")
        if self.chat and not tokenizer_lib.has_chat_template(self.tokenizer):
            raise ValueError("data.prompt_format is 'chat' but the tokenizer has no chat template")

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def pack(self, prompt: Sequence[int], response: Sequence[int]) -> tuple[list[int], int]:
        """[BOS] + prompt tail + response head (≤ max_len tokens); returns (tokens, index of the first
        response token)."""
        bos = [] if self.chat or self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        room = self.max_len - len(bos)
        response_keep = min(len(response), room - min(len(prompt), self.max_prompt_len))
        prompt_keep = min(len(prompt), room - response_keep)
        head = bos + list(prompt[len(prompt) - prompt_keep:])
        return head + list(response[:response_keep]), len(head)

    def encode(self, group: dict, chosen: Sequence[int], reference_logp: np.ndarray | None = None) -> dict:
        """Rows for the responses `chosen` (indices into the group's responses), padded to num_comp."""
        out = batch_lib.empty_group(self.num_comp, self.max_len, self.pad_id)
        prompt = self.prompt_ids(group)
        scores = np.asarray(group["scores"], np.float32)
        eos = self.end_ids()
        for row, index in enumerate(chosen):
            response = self.tokenizer.encode(group["responses"][index], add_special_tokens=False) + eos
            tokens, start = self.pack(prompt, response)
            out["tokens"][row, :len(tokens)] = tokens
            out["attention_mask"][row, :len(tokens)] = 1
            out["loss_mask"][row, start:len(tokens)] = 1
            out["scores"][row] = scores[index]
            out["valid"][row] = True
            if reference_logp is not None:
                out["reference_logp"][row] = reference_logp[index]
        return out

    def prompt_ids(self, group: dict) -> list[int]:
        """The group's `query` text; with `chat`, its `messages` (a conversational preference row's turns) or its
        instruction (+ a blank line + its input) as a user turn of the chat template (the query itself for
        release-format groups, which have no instruction)."""
        if not self.chat:
            return self.tokenizer.encode(group["query"], add_special_tokens=False)
        if group.get("messages"):
            return tokenizer_lib.encode_chat(self.tokenizer, [tuple(turn) for turn in group["messages"]])
        user = group.get("instruction") or group["query"]
        if group.get("input"):
            user = f"{user}\n\n{group['input']}"
        return tokenizer_lib.encode_chat(self.tokenizer, user)

    def end_ids(self) -> list[int]:
        """What ends a response: the chat template's end-of-turn token (`chat`), else EOS."""
        end_of_turn = tokenizer_lib.end_of_turn_ids(self.tokenizer) if self.chat else []
        if end_of_turn:
            return end_of_turn
        return [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]

    def empty(self) -> dict:
        """An all-invalid group (pads the last evaluation batch)."""
        return batch_lib.empty_group(self.num_comp, self.max_len, self.pad_id)


def sample_responses(num_responses: int, num_comp: int, rng: np.random.Generator) -> list[int]:
    """`num_comp` distinct response indices in increasing order (all of them if there are fewer)."""
    if num_responses <= num_comp:
        return list(range(num_responses))
    return sorted(rng.choice(num_responses, size=num_comp, replace=False).tolist())


def stack(elements: Sequence[dict]) -> dict:
    return {key: np.stack([e[key] for e in elements]) for key in elements[0]}


class ReferenceLogps:
    """Per-record summed log-probabilities of every response under the initial model (DPO), ragged."""

    def __init__(self, offsets: np.ndarray, values: np.ndarray):
        self.offsets, self.values = offsets, values

    def __getitem__(self, record: int) -> np.ndarray:
        return self.values[self.offsets[record]:self.offsets[record + 1]]


def train_dataset(source: GroupSource, encoder: GroupEncoder, *, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, reference: ReferenceLogps | None = None,
                  read_threads: int = 4, packer: packing.Packer | None = None) -> grain.IterDataset:
    """Endless stream of this process's share of each global batch of `batch_size` groups.

    The global stream is the same for any number of processes: every record, reshuffled each epoch, with fresh
    response samples each epoch (seeded by the position in the stream), cut into global batches; process p of P
    encodes and yields rows [p·b, (p+1)·b) of each, b = batch_size / P — the rows its devices hold in the
    global array (`to_global`). So a run on P processes sees exactly the batches of a run on one."""
    local = rows_per_process(batch_size, process_count)

    def encode(item, rng):
        index, group = item
        chosen = sample_responses(len(group["responses"]), encoder.num_comp, rng)
        return encoder.encode(group, chosen, None if reference is None else reference[index])

    dataset = (grain.MapDataset.source(source)
               .map_with_index(lambda index, group: (index % len(source), group))  # later epochs index past the end
               .shuffle(seed=seed)
               .repeat(None)
               .random_map(encode, seed=seed + 1)
               .batch(local, drop_remainder=True, batch_fn=packer or stack)  # lazy: only this process's rows
               .slice(slice(process_index, None, process_count)))
    return dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * local))


def eval_batches(source: GroupSource, encoder: GroupEncoder, *, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, reference: ReferenceLogps | None = None,
                 packer: packing.Packer | None = None) -> Iterator[dict]:
    """One pass over the split in order, in global batches of `batch_size` groups of which this process yields
    its rows [p·b, (p+1)·b), b = batch_size / P (as `train_dataset`); the same response sample every time (seeded
    by the record index); the last global batch is padded with invalid groups. The global batches do not depend
    on the number of processes."""
    local = rows_per_process(batch_size, process_count)
    for start in range(0, len(source), batch_size):
        first = start + process_index * local
        elements = []
        for index in range(first, min(first + local, len(source))):
            group = source[index]
            rng = np.random.default_rng([seed, index])
            chosen = sample_responses(len(group["responses"]), encoder.num_comp, rng)
            elements.append(encoder.encode(group, chosen, None if reference is None else reference[index]))
        elements += [encoder.empty()] * (local - len(elements))
        yield (packer or stack)(elements)


def rows_per_process(batch_size: int, process_count: int) -> int:
    """The rows of a global batch each process reads: batch_size / process_count (ValueError unless whole)."""
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes")
    return batch_size // process_count


def process_block(mesh: jax.sharding.Mesh, batch_size: int) -> int:
    """Which of the P equal blocks of rows of a global batch of `batch_size` the devices of this process hold
    (the `process_index` to give `train_dataset` and `eval_batches`); ValueError when they hold another share."""
    local = rows_per_process(batch_size, jax.process_count())
    indices = sharding.batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,)).values()
    rows = sorted({row for (index,) in indices for row in range(*index.indices(batch_size))})
    if rows != list(range(rows[0], rows[0] + local)) or rows[0] % local:
        raise ValueError(f"this process's devices hold batch rows {rows[:4]}… of {batch_size}, not one block of "
                         f"{local}: the mesh must split the batch over every process (mesh.tensor within a host)")
    return rows[0] // local


def make_packer(encoder: GroupEncoder, mesh: jax.sharding.Mesh, batch_size: int, micro_batches: int,
                row_len: int, replicated: bool = False) -> packing.Packer:
    """The `packing.Packer` of this process's share of global batches of `batch_size` groups on `mesh`, which
    packs each batch shard's groups into that shard's rows (`replicated`: every process packs the whole batch)."""
    shards = sharding.batch_shards(mesh)
    if replicated:
        return packing.Packer(row_len, encoder.num_comp, encoder.pad_id, blocks=shards, micro_batches=micro_batches)
    local = rows_per_process(batch_size, jax.process_count())
    return packing.Packer(row_len, encoder.num_comp, encoder.pad_id, blocks=local // (batch_size // shards),
                          micro_batches=micro_batches, group_offset=process_block(mesh, batch_size) * local)


def to_global(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Per-process numpy batch → global jax.Arrays split over the mesh's batch axes. A packed batch (`Packer`
    output) is first laid out with as many rows per shard as the fullest shard of any process needs."""
    if packing.is_packed(batch):
        batch = packing.flatten(batch, distributed.max_over_processes(packing.rows_of(batch)))
    return {key: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, value.ndim), value)
            for key, value in batch.items()}
