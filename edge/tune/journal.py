"""The tune journal: one JSON line per finished measurement, appended as it finishes.

Ctrl-C or a crash loses at most the measurement in flight; a rerun with the same model,
device and options reads the journal and measures only what is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Journal:
    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash: measured again
                self.records.append(rec)
        self._earlier = {id(r) for r in self.records}  # what a previous run measured
        head = next((r for r in self.records if r.get("kind") == "header"), None)
        if head is not None and head.get("options") != header.get("options"):
            # other options (objective, budget, text): earlier figures answer another question
            path.rename(path.with_suffix(".old.jsonl"))
            self.records = []
            self._earlier = set()
            head = None
        if head is None:
            self.append({"kind": "header", **header})

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)  # one write: a line is whole or missing
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(record)

    def find(self, kind: str, **match: Any) -> dict[str, Any] | None:
        for r in self.records:
            if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items()):
                return r
        return None

    def from_earlier_run(self, record: dict[str, Any]) -> bool:
        """Whether `record` was read from the file rather than measured by this run."""
        return id(record) in self._earlier

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]
