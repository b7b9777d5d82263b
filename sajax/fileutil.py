"""Files: write-then-rename (a reader sees the old complete file or directory, or the new complete one), and
JSON / JSONL readers whose errors name the file and the line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where sajax keeps what it fetches or builds once per machine (known models, compiled programs):
    `$SAJAX_CACHE`, else ~/.cache/sajax."""
    return Path(os.environ.get("SAJAX_CACHE") or Path.home() / ".cache" / "sajax")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replace_directory(path: str | os.PathLike):
    """Yields an empty temporary directory beside `path`; when the block ends without an exception it becomes
    `path` (an existing `path` is moved aside first and deleted after), otherwise it is deleted and `path` is
    untouched. The directory gets the permissions a plain mkdir would give (not mkdtemp's 0700)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def replace_file(path: str | os.PathLike):
    """Yields a temporary path beside `path` (same suffix, so writers that go by the extension still work); when
    the block ends without an exception it replaces `path`, otherwise it is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` all at once: a reader sees the old content or the new, never a part."""
    with replace_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of `path`; ValueError naming the file and the line of the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from e


def read_json(path: str | os.PathLike):
    """The parsed JSON of `path`; ValueError naming the file, line and column where it is broken."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from e


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; ValueError naming the file and the
    first broken line."""
    out = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno})") from e
    return out


def read_json_records(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """The objects of a file holding either one JSON array of objects or JSON Lines (one object per line),
    told apart by the content, not the file name. Returns (where, object) pairs; `where` names the file and the
    record ("<file> record 3") or line ("<file> line 4") for error messages. ValueError for anything else."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        values = read_json(path)
        pairs = [(f"{path} record {i}", value) for i, value in enumerate(values)]
    else:
        pairs = [(f"{path} line {n}", value) for n, value in read_jsonl(path)]
    for where, value in pairs:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return pairs
