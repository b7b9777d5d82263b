"""The alignment dataset: the contract between the simulator and the trainer.

A TFDS dataset (ArrayRecord files, no TensorFlow needed) with one record per prompt group:
  query Text (the filled Alpaca template) · instruction Text · input Text · responses Sequence(Text) ·
  scores Tensor((None,), float32) · kind ClassLabel(imitation, self_critic, realignment) · model Text ·
  world_id int32;  splits `train` and `validation`.
It opens with plain `tfds.builder_from_directory(dir).as_data_source('train')`. The trainer also reads the
original Stable Alignment release format: a JSON list (or JSONL) of `{query, responses, scores}`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sajax import fileutil

KINDS = ("imitation", "self_critic", "realignment")
SPLITS = ("train", "validation")
DATASET_NAME = "sajax_alignment"
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:"


def alpaca_query(instruction: str, input: str = "") -> str:  # noqa: A002 (the field's name)
    """The short Alpaca template, without the Input block when `input` is empty."""
    if input:
        return ALPACA_TEMPLATE.format(instruction=instruction, input=input)
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)


class DataError(ValueError):
    """A dataset record is malformed; the message names the file, record and field."""


@functools.cache
def _builder_class():
    import tensorflow_datasets as tfds

    class SajaxAlignment(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Stable Alignment groups: a query with several rated responses."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "First release."}

        def __init__(self, *, split_records: Mapping[str, Iterable[Mapping[str, Any]]], **kwargs):
            self._split_records = split_records
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=__doc__, features=tfds.features.FeaturesDict({
                "query": tfds.features.Text(),
                "instruction": tfds.features.Text(),
                "input": tfds.features.Text(),
                "responses": tfds.features.Sequence(tfds.features.Text()),
                "scores": tfds.features.Tensor(shape=(None,), dtype=np.float32),
                "kind": tfds.features.ClassLabel(names=list(KINDS)),
                "model": tfds.features.Text(),
                "world_id": np.int32,
            }))

        def _split_generators(self, dl_manager):
            del dl_manager
            return {name: self._generate_examples(records) for name, records in self._split_records.items()}

        def _log_download_bytes(self):  # nothing is downloaded: no "Downloading and preparing" line
            pass

        def _log_download_done(self):
            pass

        def _generate_examples(self, records):
            for i, record in enumerate(records):
                yield i, {**record, "scores": np.asarray(record["scores"], np.float32)}

    SajaxAlignment.name = DATASET_NAME
    return SajaxAlignment


def write_tfds(split_records: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | os.PathLike) -> Path:
    """Writes the records of each split (dicts with the features above) as a TFDS ArrayRecord dataset at
    `out_dir` (the directory `builder_from_directory` opens). Built in a temporary directory and renamed, so an
    existing `out_dir` is replaced only by a complete dataset."""
    for split, records in split_records.items():
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected {SPLITS}")
        for i, record in enumerate(records):
            validate_group(record, f"{split} record {i}")
    out_dir = Path(out_dir)
    with fileutil.replace_directory(out_dir) as tmp:
        builder = _builder_class()(split_records=split_records, data_dir=str(tmp / "build"),
                                   file_format="array_record")
        with tfds_quiet():
            builder.download_and_prepare()
        for file in Path(builder.data_path).iterdir():
            os.replace(file, tmp / file.name)
        shutil.rmtree(tmp / "build")
    return out_dir


@contextlib.contextmanager
def tfds_quiet():
    """No per-split progress bars or 'downloading and preparing' lines from TFDS while writing."""
    import tensorflow_datasets as tfds
    from absl import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(True)
        logging.set_verbosity(verbosity)


def validate_group(record: Mapping[str, Any], where: str, rating_range: tuple[float, float] | None = None) -> None:
    """Raises DataError naming `where` and the field when a group cannot be trained on: missing or empty
    query/responses, a response that is not a non-empty string, a scores/responses length mismatch, a
    non-finite score, or a score outside `rating_range` (inclusive)."""
    for field in ("query", "responses", "scores"):
        if field not in record:
            raise DataError(f"{where}: missing field {field!r}")
    query, responses, scores = record["query"], record["responses"], record["scores"]
    if not isinstance(query, str) or not query.strip():
        raise DataError(f"{where}: field 'query' must be a non-empty string, got {query!r:.80}")
    if isinstance(responses, (str, bytes)) or not isinstance(responses, Sequence) or len(responses) == 0:
        raise DataError(f"{where}: field 'responses' must be a non-empty list, got {responses!r:.80}")
    for k, response in enumerate(responses):
        if not isinstance(response, str) or not response.strip():
            raise DataError(f"{where}: field 'responses[{k}]' must be a non-empty string, got {response!r:.80}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1) if _is_numeric_list(scores) else None
    if scores is None:
        raise DataError(f"{where}: field 'scores' must be a list of numbers, got {record['scores']!r:.80}")
    if len(scores) != len(responses):
        raise DataError(f"{where}: {len(responses)} responses but {len(scores)} scores")
    for k, score in enumerate(scores):
        if not math.isfinite(score):
            raise DataError(f"{where}: field 'scores[{k}]' is {score}, not a finite number")
        if rating_range is not None and not rating_range[0] <= score <= rating_range[1]:
            raise DataError(f"{where}: field 'scores[{k}]' is {score:g}, outside the rating range "
                            f"{rating_range[0]:g}..{rating_range[1]:g}")


def _is_numeric_list(value) -> bool:
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and np.issubdtype(value.dtype, np.number)
    return (isinstance(value, Sequence) and not isinstance(value, (str, bytes))
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value))


class GroupSource:
    """Random access to the groups of one split, as dicts {query: str, responses: [str], scores: float32[K]},
    from a TFDS directory (`dataset_info.json` inside) or a JSON / JSONL file in the release format."""

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path, self.split = Path(path), split
        if (self.path / "dataset_info.json").is_file():
            import tensorflow_datasets as tfds

            builder = tfds.builder_from_directory(str(self.path))
            if split not in builder.info.splits:
                raise DataError(f"{self.path}: no split {split!r} (has {sorted(builder.info.splits)})")
            self._records = builder.as_data_source(split)
            self._decode = _decode_tfds
        elif self.path.is_file() and self.path.suffix in (".json", ".jsonl"):
            self._records = read_json_records(self.path)
            self._decode = dict
        elif not self.path.exists():
            raise FileNotFoundError(f"{self.path}: dataset not found")
        else:
            raise DataError(f"{self.path}: not a TFDS dataset directory (no dataset_info.json) nor a .json/.jsonl "
                            "file")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._decode(self._records[index])

    def where(self, index: int) -> str:
        name = f"{self.path}" if self.path.is_file() else f"{self.path} [{self.split}]"
        return f"{name} record {index}"

    def validate(self, rating_range: tuple[float, float]) -> None:
        """Checks every record (`validate_group`); the first bad one raises DataError naming it."""
        if len(self) == 0:
            raise DataError(f"{self.path}: split {self.split!r} has no records")
        for i in range(len(self)):
            validate_group(self[i], self.where(i), rating_range)


def has_split(path: str | os.PathLike, split: str) -> bool:
    """Whether `path` is a TFDS dataset directory holding `split` (a JSON file holds no named splits)."""
    info = Path(path) / "dataset_info.json"
    return info.is_file() and any(s.get("name") == split for s in json.loads(info.read_text()).get("splits", []))


def _decode_tfds(record) -> dict:
    return {"query": record["query"].decode("utf-8"),
            "responses": [r.decode("utf-8") for r in record["responses"]],
            "scores": np.asarray(record["scores"], np.float32)}


def read_json_records(path: Path, fields: str = "{query, responses, scores}") -> list[dict]:
    """The objects of a JSON list or a JSONL file (one object per line); DataError naming the file or record."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of {fields} records")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path} record {i}: expected an object, got {type(record).__name__}")
    return records
