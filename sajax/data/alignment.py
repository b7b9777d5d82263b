"""The alignment dataset: the contract between the simulator and the trainer.

A TFDS dataset (ArrayRecord files, no TensorFlow needed) with one record per prompt group:
  query Text (the filled Alpaca template) · instruction Text · input Text · responses Sequence(Text) ·
  scores Tensor((None,), float32) · kind ClassLabel(imitation, self_critic, realignment) · model Text ·
  world_id int32;  splits `train` and `validation`.
It opens with plain `tfds.builder_from_directory(dir).as_data_source('train')`. The trainer also reads the
original Stable Alignment release format — a JSON list (or JSONL) of `{query, responses, scores}` — and TRL's
preference format (`sajax.data.preference`: prompt / chosen / rejected in JSONL, JSON or Parquet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sajax import fileutil
from sajax.data import preference

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


def check_output(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """DataError unless `out_dir` may receive a dataset: absent, an empty directory, a dataset written by
    `write_tfds` (replaced), or anything at all with `overwrite`."""
    out_dir = Path(out_dir)
    if overwrite or not out_dir.exists():
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    info = out_dir / "dataset_info.json"
    if out_dir.is_dir() and info.is_file():
        try:
            name = fileutil.read_json(info).get("name")
        except (ValueError, AttributeError):
            name = None
        if name == DATASET_NAME:
            return
    what = "a file" if not out_dir.is_dir() else "a directory that holds no sajax dataset"
    raise DataError(f"{out_dir}: exists and is {what}; refusing to replace it (choose another output or pass "
                    "--overwrite)")


def write_tfds(split_records: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | os.PathLike,
               overwrite: bool = False) -> Path:
    """Writes the records of each split (dicts with the features above) as a TFDS ArrayRecord dataset at
    `out_dir` (the directory `builder_from_directory` opens). Built in a temporary directory and renamed, so an
    existing `out_dir` is replaced only by a complete dataset — and only if `check_output` allows it."""
    check_output(out_dir, overwrite)
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
    bad = invalid_scores(record, where, rating_range)
    if bad:
        raise DataError(f"{where}: {bad[0][1]}")


def invalid_scores(record: Mapping[str, Any], where: str, rating_range: tuple[float, float] | None
                   ) -> list[tuple[int, str]]:
    """The responses whose score is not finite or lies outside `rating_range`, as (index, description) pairs;
    DataError naming `where` and the field for every other defect (see `validate_group`)."""
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
    bad = []
    for k, score in enumerate(scores):
        if not math.isfinite(score):
            bad.append((k, f"field 'scores[{k}]' is {score}, not a finite number"))
        elif rating_range is not None and not rating_range[0] <= score <= rating_range[1]:
            bad.append((k, f"field 'scores[{k}]' is {score:g}, outside the rating range "
                           f"{rating_range[0]:g}..{rating_range[1]:g}"))
    return bad


def _is_numeric_list(value) -> bool:
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and np.issubdtype(value.dtype, np.number)
    return (isinstance(value, Sequence) and not isinstance(value, (str, bytes))
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value))


@dataclasses.dataclass(frozen=True)
class Dropped:
    """What `GroupSource.validate(drop_invalid_scores=True)` left out."""

    responses: int = 0
    groups: int = 0  # groups left without any response

    def __str__(self) -> str:
        return f"{self.responses} responses with invalid scores ({self.groups} groups left empty)"


class GroupSource:
    """Random access to the groups of one split, as dicts {query: str, responses: [str], scores: float32[K]},
    from a TFDS directory (`dataset_info.json` inside), a JSON / JSONL file in the release format (a JSON list
    of objects or one object per line), or a preference file (TRL's prompt / chosen / rejected in JSONL, JSON or
    Parquet: 2-response groups rated `preference_scores` unless it has score columns). Every read error names the
    file."""

    def __init__(self, path: str | os.PathLike, split: str = "train",
                 preference_scores: tuple[float, float] = (7.0, 1.0)):
        self.path, self.split = Path(path), split
        self._keep: list[int] | None = None  # record indices after dropping (validate); None: all of them
        self._drop: dict[int, list[int]] = {}  # record → response indices dropped
        if (self.path / "dataset_info.json").is_file():
            self._open_tfds()
        elif self._is_preference_file():
            try:
                pairs = preference.read_groups(self.path, preference_scores)
            except ValueError as e:
                raise DataError(str(e)) from e
            self._records = [record for _, record in pairs]
            self._where = [where for where, _ in pairs]
            self._decode = dict
        elif self.path.is_file() and self.path.suffix in (".json", ".jsonl"):
            try:
                pairs = fileutil.read_json_records(self.path)
            except ValueError as e:
                raise DataError(str(e)) from e
            self._records = [record for _, record in pairs]
            self._where = [where for where, _ in pairs]
            self._decode = dict
        elif not self.path.exists():
            raise FileNotFoundError(f"{self.path}: dataset not found")
        else:
            raise DataError(f"{self.path}: not a TFDS dataset directory (no dataset_info.json) nor a .json/.jsonl/"
                            ".parquet file")

    def _is_preference_file(self) -> bool:
        try:
            return preference.is_preference_file(self.path)
        except ValueError as e:  # broken JSON: named by the file, line and column
            raise DataError(str(e)) from e

    def _open_tfds(self) -> None:
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder_from_directory(str(self.path))
        except Exception as e:  # protobuf's ParseError, KeyError, … for a damaged dataset_info.json
            raise DataError(f"{self.path / 'dataset_info.json'}: not a readable TFDS dataset description ({e})") from e
        if self.split not in builder.info.splits:
            raise DataError(f"{self.path}: no split {self.split!r} (has {sorted(builder.info.splits)})")
        info = builder.info.splits[self.split]
        self._shards = list(zip(np.cumsum(info.shard_lengths).tolist(), info.filenames))  # (end, file name)
        try:
            self._records = builder.as_data_source(self.split)
        except Exception as e:
            raise DataError(f"{self.path} [{self.split}]: cannot open its ArrayRecord files ({e})") from e
        self._where = None
        self._decode = _decode_tfds

    def __len__(self) -> int:
        return len(self._records) if self._keep is None else len(self._keep)

    def __getitem__(self, index: int) -> dict:
        record = index if self._keep is None else self._keep[index]
        try:
            group = self._decode(self._records[record])
        except Exception as e:  # riegeli's RuntimeError for a truncated or corrupted ArrayRecord file, …
            raise DataError(f"{self._file_of(record)}: cannot read record {record} of split {self.split!r}: the file "
                            f"is damaged or truncated ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                            ) from e
        drop = self._drop.get(record)
        if drop:
            keep = [k for k in range(len(group["responses"])) if k not in drop]
            group = {**group, "responses": [group["responses"][k] for k in keep],
                     "scores": np.asarray(group["scores"], np.float32)[keep]}
        return group

    def _file_of(self, record: int) -> Path:
        if self._where is not None:
            return self.path
        return self.path / next(name for end, name in self._shards if record < end)

    def where(self, record: int) -> str:
        """'<file> record i' (or '<file> line n' for JSONL) of the i-th record as stored."""
        if self._where is not None:
            return self._where[record]
        return f"{self.path} [{self.split}] record {record}"

    def validate(self, rating_range: tuple[float, float], drop_invalid_scores: bool = False) -> Dropped:
        """Checks every record (`invalid_scores`). A structural defect raises DataError naming the first bad
        record. Scores that are not finite or lie outside `rating_range` raise DataError naming the records
        that hold them — or, with `drop_invalid_scores`, those responses (and groups left with none) are left
        out of this source; returns what was dropped."""
        self._keep, self._drop = None, {}
        if len(self) == 0:
            raise DataError(f"{self.path}: split {self.split!r} has no records")
        bad: dict[int, list[tuple[int, str]]] = {}
        emptied = set()
        for i in range(len(self)):
            group = self[i]
            found = invalid_scores(group, self.where(i), rating_range)
            if found:
                bad[i] = found
                if len(found) == len(group["responses"]):
                    emptied.add(i)
        if not bad:
            return Dropped()
        if not drop_invalid_scores:
            listed = "; ".join(f"{self.where(i)}: {found[0][1]}" for i, found in list(bad.items())[:5])
            more = f" (and {len(bad) - 5} more records)" if len(bad) > 5 else ""
            raise DataError(f"{listed}{more}. {len(bad)} records hold invalid scores; set data.drop_invalid_scores="
                            "True to train without those responses")
        self._drop = {i: [k for k, _ in found] for i, found in bad.items()}
        self._keep = [i for i in range(len(self._records)) if i not in emptied]
        if not self._keep:
            raise DataError(f"{self.path}: split {self.split!r} has no response with a valid score")
        return Dropped(responses=sum(len(ks) for ks in self._drop.values()), groups=len(emptied))


def has_split(path: str | os.PathLike, split: str) -> bool:
    """Whether `path` is a TFDS dataset directory holding `split` (a JSON file holds no named splits)."""
    info = Path(path) / "dataset_info.json"
    if not info.is_file():
        return False
    description = fileutil.read_json(info)
    return any(s.get("name") == split for s in description.get("splits", []) if isinstance(s, dict))


def _decode_tfds(record) -> dict:
    return {"query": record["query"].decode("utf-8"), "instruction": record["instruction"].decode("utf-8"),
            "input": record["input"].decode("utf-8"),
            "responses": [r.decode("utf-8") for r in record["responses"]],
            "scores": np.asarray(record["scores"], np.float32)}
