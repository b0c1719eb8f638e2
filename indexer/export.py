"""Catalog rows out as JSON Lines or CSV: one row per file, indexed or not, with the reason if not."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from typing import IO, Iterable

from indexer.catalog import FileRow

FORMATS = ("jsonl", "csv")
COLUMNS = ("path", "status", "error", "size", "mtime_ns", "content_hash", "width", "height", "format", "updated_at")


def export_rows(rows: Iterable[FileRow], out: IO[str], fmt: str) -> int:
    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
            count += 1
    elif fmt == "jsonl":
        for row in rows:
            record = {k: v for k, v in asdict(row).items() if k in COLUMNS}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    else:
        raise ValueError(f"unknown export format {fmt!r}")
    return count
