"""`blipsearch forget`, `export` and `status`: the catalog from the command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from api.options import absolute_glob, emit_json, index_options, store_config


@click.command()
@click.argument("paths", nargs=-1, required=True)
@index_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
def forget(paths, index_dir, catalog_url, as_json) -> None:
    """Remove the files at or under PATHS from the index, whether or not they still exist on disk (a
    deleted folder, an unplugged drive); the files themselves are not touched."""
    from indexer.forget import forget as forget_paths
    from indexer.store import IndexStore
    from indexer.walk import catalog_path

    store = IndexStore.open(store_config(index_dir, catalog_url))
    try:
        forgotten = forget_paths(store, [catalog_path(p) for p in paths])
    finally:
        store.close()
    if as_json:
        emit_json({"files": forgotten.files, "images": forgotten.images, "roots": forgotten.roots,
                   "still_walked": forgotten.still_walked})
    else:
        click.echo(f"forgot {forgotten.files} files ({forgotten.images} images no other file shares)"
                   + (f"; no longer indexed: {', '.join(forgotten.roots)}" if forgotten.roots else ""))
    for path in forgotten.still_walked:
        click.echo(f"note: {path} is still on disk, inside a folder blipsearch index walks: its next run adds it "
                   "again (move it out, or exclude it: blipsearch index --exclude GLOB, kept for later runs)", err=True)


@click.command()
@index_options
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "parquet"]), default="jsonl", show_default=True,
              help="parquet needs the parquet extra (pyarrow) and -o.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write (default stdout).")
@click.option("--status", type=click.Choice(["indexed", "skipped"]), default=None,
              help="Only files of this status: skipped lists what could not be indexed, and why (error).")
@click.option("--path", "path_glob", default=None,
              help="Only files under this folder or matching this glob, as search --path takes them.")
def export(index_dir, catalog_url, fmt, output, status, path_glob) -> None:
    """Write one row per file in the catalog: path, status, error, size, mtime, hash, width, height,
    format, and the caption with its model, prompt and time."""
    from indexer.export import records, write_text
    from indexer.store import IndexStore
    from retrieval.errors import UsageError

    if fmt == "parquet" and output is None:
        raise UsageError("Parquet is binary: give a file with -o FILE")
    path_glob = absolute_glob(path_glob)
    store = IndexStore.open(store_config(index_dir, catalog_url))
    try:
        rows = records(store.catalog, status, path_glob)
        if output is None:
            write_text(rows, sys.stdout, fmt)
            return
        count = _export_to(output, lambda path: _write_export(rows, path, fmt))
    finally:
        store.close()
    click.echo(f"wrote {count} rows to {output}", err=True)


def _write_export(rows, path: Path, fmt: str) -> int:
    from indexer.export import write_parquet, write_text

    if fmt == "parquet":
        return write_parquet(rows, path)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        return write_text(rows, handle, fmt)


def _export_to(output: Path, write) -> int:
    """`write(path)` into `output` whole or not at all: into a temporary file beside it, then renamed
    over it, so a failure (no such folder, no permission, a full disk) leaves the old file as it was.
    A symbolic link stays and its target is replaced. What is not a regular file (/dev/stdout, a FIFO)
    is written through: renaming over it would put a file in its place."""
    from retrieval.errors import UsageError

    try:
        if output.exists() and not output.is_file():
            return write(output)
        target = Path(os.path.realpath(output))
        tmp = target.with_name(target.name + ".tmp")
        try:
            count = write(tmp)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        return count
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None


@click.command()
@index_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(index_dir, catalog_url, as_json) -> None:
    """Summarise an index: the folders it was given, model, counts, size on disk."""
    from indexer.store import IndexStore

    store = IndexStore.open(store_config(index_dir, catalog_url))
    try:
        identity, walk = store.catalog.model(), store.kept_walk()
        result = {
            "index": str(store.directory),
            "roots": store.catalog.roots(),  # what `index` without folders re-indexes
            "excludes": list(walk.excludes),  # and how it walks them
            "follow_symlinks": walk.follow_symlinks,
            "model": identity.name if identity else None,
            "model_fingerprint": identity.fingerprint if identity else None,
            "embed_dim": identity.embed_dim if identity else None,
            "num_queries": identity.num_queries if identity else None,
            **store.catalog.counts(),
            "path_trigram_index": store.catalog.listing.has_path_trigrams(),  # for --path '*2019*'
            "bytes_on_disk": store.disk_bytes(),
            **store.vectors_summary(),
        }
    finally:
        store.close()
    if as_json:
        emit_json(result)
    else:
        for key, value in result.items():
            click.echo(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
