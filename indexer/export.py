"""The caption-enriched catalog out as JSON Lines, CSV or Parquet: one row per file, indexed or not,
with the reason if not, and its image's caption when there is one."""

from __future__ import annotations

import csv
import json
from itertools import islice
from dataclasses import asdict
from pathlib import Path
from typing import IO, Iterator

from indexer.catalog import Catalog
from retrieval.errors import UsageError

FORMATS = ("jsonl", "csv", "parquet")
PARQUET_ROWS = 50_000  # rows per Parquet row group
COLUMNS = (
    "path", "status", "error", "size", "mtime_ns", "content_hash", "width", "height", "format", "updated_at",
    "caption", "caption_model", "caption_prompt", "captioned_at",
)


def records(catalog: Catalog, status: str | None = None, path_glob: str | None = None) -> Iterator[dict]:
    """Every file, or those of one `status` or matching `path_glob`, with its caption fields (None
    where there is no caption)."""
    for chunk in catalog.iter_files(status=status, path_glob=path_glob):
        captions = catalog.captions.get([r.embedding_id for r in chunk if r.embedding_id is not None])
        for row in chunk:
            caption = captions.get(row.embedding_id)
            record = {k: v for k, v in asdict(row).items() if k in COLUMNS}
            record.update(
                caption=caption.caption if caption else None,
                caption_model=caption.model if caption else None,
                caption_prompt=caption.prompt if caption else None,
                captioned_at=caption.created_at if caption else None,
            )
            yield record


def write_text(rows: Iterator[dict], out: IO[str], fmt: str) -> int:
    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for count, record in enumerate(rows, 1):
            writer.writerow(record)
    elif fmt == "jsonl":
        for count, record in enumerate(rows, 1):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"unknown text export format {fmt!r}")
    return count


def write_parquet(rows: Iterator[dict], path: Path) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError('Parquet export needs pyarrow: pip install -e ".[parquet]"') from None
    schema = pa.schema([
        ("path", pa.string()), ("status", pa.string()), ("error", pa.string()), ("size", pa.int64()),
        ("mtime_ns", pa.int64()), ("content_hash", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("format", pa.string()), ("updated_at", pa.float64()), ("caption", pa.string()),
        ("caption_model", pa.string()), ("caption_prompt", pa.string()), ("captioned_at", pa.float64()),
    ])
    count = 0
    with open(path, "wb") as handle, pq.ParquetWriter(handle, schema) as writer:  # Python's OSError for a bad path
        while batch := list(islice(rows, PARQUET_ROWS)):  # a row group at a time, never the whole catalog
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count
