"""Write-then-rename for files and directories: a reader sees the old complete one or the new complete one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


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
