"""A round's request journal: every response of an HTTP backend (the raw answer: text, logprobs, usage, embeddings)
is appended as it arrives, keyed by the request that got it; a round redone after a crash replays the journalled
responses and sends only the requests that have none. So a crash costs no repeated (paid) calls, and the redone
round equals the one that was interrupted even when the server answers differently every time.

One JSON object per line: {"key": sha256 of (kind, request body), "kind": "chat" | "embeddings", "stage", "request",
"response"}. A request sent twice with the same body (identical prompt, seed and settings) gets its journalled
responses in the order they were recorded. A line torn by a crash while it was written (the last one, without its
newline) is dropped when the journal is opened again; any other damaged line is an error naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def request_key(kind: str, body: dict) -> str:
    """sha256 of the canonical JSON of [kind, body] (sorted keys): the same request, the same key."""
    text = json.dumps([kind, body], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Journal:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[str, list[dict]] = {}
        self.replayed = self.recorded = 0
        self._file = None
        self._good_bytes = 0  # the journal's bytes up to its last whole line
        self._pending_newline = False  # its last entry is whole but lacks the newline
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        for n, line in enumerate(lines, 1):
            torn = n == len(lines)  # the bytes after the last newline: a write the crash cut short
            if not line:
                continue
            try:
                entry = json.loads(line.decode("utf-8"))
                if not isinstance(entry, dict) or not {"key", "response"} <= entry.keys():
                    raise ValueError("not a journal entry")
            except ValueError as e:
                if torn:
                    break
                raise ValueError(f"{self.path} line {n}: damaged ({str(e)[:80]}); move the file away to send the "
                                 "round's requests again") from e
            if torn:  # a complete entry without its newline: keep it, end the line before appending
                self._good_bytes = len(data)
                self.entries.setdefault(entry["key"], []).append(entry["response"])
                self._pending_newline = True
                return
            self.entries.setdefault(entry["key"], []).append(entry["response"])
        self._good_bytes = data.rfind(b"\n") + 1

    def replay(self, kind: str, body: dict) -> dict | None:
        """The journalled response to this request (each one used once), or None: send it."""
        responses = self.entries.get(request_key(kind, body))
        if not responses:
            return None
        self.replayed += 1
        return responses.pop(0)

    def record(self, kind: str, body: dict, response: dict, stage: str = "") -> None:
        """Appends one response, flushed at once (a process killed right after keeps it)."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
            self._file.truncate(self._good_bytes)
            if self._pending_newline:
                self._file.write(b"\n")
        entry = {"key": request_key(kind, body), "kind": kind, "stage": stage, "request": body, "response": response}
        self._file.write(json.dumps(entry, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
        self._file.flush()
        self.recorded += 1

    def close(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
