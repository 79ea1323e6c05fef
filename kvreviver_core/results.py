"""Append-only JSONL results that survive a kill: each finished row is flushed to disk before the next starts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


class ResultStore:
    """Rows keyed by ``key_fields``; a rerun skips the keys already present.

    A kill can leave a half-written last line, the start of a row's JSON object without its newline; it is dropped
    on load (that row is simply recomputed). Any other malformed line, a complete last one included, means the file
    is not ours or was edited, and is reported with its line number (the file is left as it is), as is a row without
    the key fields (another command's results). Every reader checks this, torchrun ranks included, before anything
    is appended.
    """

    def __init__(self, path: Path | None, key_fields: Iterable[str]) -> None:
        self.path = Path(path) if path is not None else None
        self.key_fields = tuple(key_fields)
        self.rows: list[dict] = []
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            text = self.path.read_text()
        except UnicodeDecodeError:  # rows are written as ASCII JSON
            raise ValueError(f"{self.path}: not a results file (not UTF-8 text)") from None
        lines = text.split("\n")
        complete = lines[:-1] if lines and lines[-1] == "" else lines
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                # A write torn by a kill is a last line without its newline, and the start of a row's JSON object:
                # any other text there (a foreign file of one line, say) is reported, not truncated away.
                if number == len(complete) and not text.endswith("\n") and line.startswith("{"):
                    self._truncate_to(complete[: number - 1])
                    break
                raise ValueError(f"{self.path}:{number}: malformed results line ({exc})") from None
            missing = [field for field in self.key_fields if field not in row]
            if missing:
                raise ValueError(f"{self.path}:{number}: row has no {', '.join(missing)}: not this command's "
                                 "results (another command's --out?)")
            self.rows.append(row)

    def _truncate_to(self, lines: list[str]) -> None:
        self.path.write_text("".join(line + "\n" for line in lines))

    def key(self, row: dict) -> tuple:
        return tuple(json.dumps(row.get(field), sort_keys=True) for field in self.key_fields)

    def done_keys(self) -> set[tuple]:
        return {self.key(row) for row in self.rows}

    def has(self, **key_values) -> bool:
        return self.key(key_values) in self.done_keys()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
