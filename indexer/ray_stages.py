"""The stages that run on Ray workers: decode on CPU actors, then embed or caption on model actors,
which write their results as shard files (Parquet, anywhere fsspec reaches) for the driver to merge.

A shard file is written under a temporary name and then renamed (one PUT on object stores), so a
reader sees whole shards only; its name is unique, so no two writers ever touch the same file.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np

from indexer.catalog import has_hash
from indexer.decode import Decoded, DecodeOptions
from indexer.workers import DecodePool, PoolOptions

SHARD_PREFIX = "part-"
MODEL_KEY = b"blipsearch.model"  # Parquet metadata: the identity of the model that made the vectors


def read_todo(batch: dict[str, np.ndarray], shards_url: str) -> dict[str, np.ndarray]:
    """Ray Data function: the todo files named in `batch` (`Shards.write_todo`) -> their rows."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, _ = fsspec.core.url_to_fs(shards_url)
    tables = []
    for name in batch["file"]:
        with fs.open(name, "rb") as handle:
            tables.append(pq.read_table(handle))
    table = pa.concat_tables(tables)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


class DecodeStage:
    """Ray Data callable class: a batch of paths -> pixels and file facts (other columns pass through).

    Each actor decodes through its own `DecodePool`, so a file that hangs or crashes a decoder is
    recorded as skipped with its reason, exactly as in a single-machine run."""

    def __init__(self, options: DecodeOptions, pool: PoolOptions) -> None:
        self.options = options
        self.pool = DecodePool(options, pool)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        transform = self.options.transform
        n = len(batch["path"])
        pixels = np.zeros((n, 3, transform.height, transform.width), np.uint8)
        facts: dict[str, list] = {k: [] for k in ("decoded", "content_hash", "error", "reason", "width", "height", "format")}
        # Files read again after indexing (captions) come with the content hash they must still have.
        files = list(zip(batch["path"], batch["expected_hash"])) if "expected_hash" in batch else list(batch["path"])
        for i, (_, outcome) in enumerate(self.pool.imap(files)):
            decoded = isinstance(outcome, Decoded)
            if decoded:
                pixels[i] = outcome.pixels
            facts["decoded"].append(decoded)
            facts["reason"].append(None if decoded else outcome.reason)
            facts["error"].append(None if decoded else outcome.error)
            for key in ("content_hash", "width", "height", "format"):
                facts[key].append(getattr(outcome, key))
        columns = {k: np.asarray(v, dtype=bool if k == "decoded" else object) for k, v in facts.items()}
        return {**batch, **columns, "pixels": pixels}


class ShardWriter:
    def __init__(self, shards_url: str) -> None:
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(shards_url)
        self.fs.makedirs(self.root, exist_ok=True)

    def write(self, columns: dict[str, list], metadata: dict[bytes, bytes]) -> str:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(columns).replace_schema_metadata(metadata)
        name = f"{SHARD_PREFIX}{uuid.uuid4().hex}.parquet"
        tmp = f"{self.root}/.tmp-{name}"
        with self.fs.open(tmp, "wb") as handle:
            pq.write_table(table, handle)
        self.fs.mv(tmp, f"{self.root}/{name}")
        return name


class EmbedStage:
    """Ray Data callable class on a model actor: decoded pixels -> 32 ITC vectors per new content ->
    one shard file per batch. Contents the catalog already has (`known`) are not embedded again."""

    def __init__(self, model_config: Any, shards_url: str, known: Any) -> None:
        """`known`: a Ray object reference to the catalog's content hashes (`Catalog.content_hashes`:
        one sorted array of 16-byte keys, which the actors of a node share from Ray's object store
        without a copy)."""
        import ray

        from retrieval.encoders import Blip2Retriever

        self.retriever = Blip2Retriever.load(model_config)
        self.writer = ShardWriter(shards_url)
        self.known = ray.get(known)
        identity = self.retriever.identity
        self.metadata = {MODEL_KEY: json.dumps(identity.__dict__).encode()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        fresh: dict[str, int] = {}  # content hash -> row, the first of each new content
        for i in range(n):
            digest = batch["content_hash"][i]
            if batch["decoded"][i] and not has_hash(self.known, digest) and digest not in fresh:
                fresh[digest] = i
        vectors: list[bytes | None] = [None] * n
        if fresh:
            rows = list(fresh.values())
            encoded = self.retriever.encode_images(batch["pixels"][rows])
            for row, embeds in zip(rows, np.asarray(encoded.query_embeds, np.float32)):
                vectors[row] = embeds.tobytes()
        columns = {key: [_plain(v) for v in batch[key]] for key in
                   ("path", "size", "mtime_ns", "decoded", "content_hash", "reason", "error", "width", "height", "format")}
        name = self.writer.write({**columns, "vectors": vectors}, self.metadata)
        return {"path": batch["path"], "shard": np.asarray([name] * n, dtype=object)}


class CaptionStage:
    """Ray Data callable class on a model actor: decoded pixels -> captions -> one shard file per batch."""

    def __init__(self, model_config: Any, options: Any, shards_url: str) -> None:
        from retrieval.captioner import Blip2Captioner

        self.captioner = Blip2Captioner.load(model_config)
        self.options = options
        self.writer = ShardWriter(shards_url)
        self.metadata = {MODEL_KEY: json.dumps({"name": self.captioner.name, "prompt": options.prompt}).encode()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = np.asarray(batch["decoded"], bool)
        texts: list[str | None] = [None] * len(decoded)
        if decoded.any():
            for row, text in zip(np.flatnonzero(decoded), self.captioner.caption(batch["pixels"][decoded], self.options)):
                texts[row] = text
        columns = {"embedding_id": [int(v) for v in batch["embedding_id"]], "path": list(batch["path"]),
                   "reason": [_plain(v) for v in batch["reason"]], "caption": texts}
        name = self.writer.write(columns, self.metadata)
        return {"path": batch["path"], "shard": np.asarray([name] * len(decoded), dtype=object)}


def _plain(value):
    """numpy scalars -> Python values for Arrow."""
    return value.item() if isinstance(value, np.generic) else value
