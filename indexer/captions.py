"""The captioning pipeline: catalog (contents without a caption) -> decode workers -> stage-2 model
-> one catalog transaction per batch.

Like indexing, it is incremental and crash-safe: a batch's captions land in one transaction, and a
re-run asks the catalog what still lacks a caption, so after `kill -9` no finished batch is repeated.
Decoding runs ahead in worker processes while the model generates.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np

from indexer.caption_catalog import CaptionTask
from indexer.decode import CHANGED, Decoded, DecodeOptions
from indexer.pipeline import NoProgress, Progress
from indexer.store import IndexStore
from indexer.workers import DecodePool, PoolOptions

PAGE = 512  # catalog rows fetched at a time


class Captioner(Protocol):
    name: str
    transform: Any

    def caption(self, pixel_values: np.ndarray, options: Any) -> list[str]: ...


@dataclass(frozen=True)
class CaptionConfig:
    options: Any  # retrieval.captioner.CaptionOptions
    batch_size: int = 8
    overwrite: bool = False  # re-caption contents captioned by another model or prompt
    pool: PoolOptions = PoolOptions()


@dataclass
class CaptionSummary:
    captioned: int = 0
    missing: list[str] = field(default_factory=list)  # files gone since indexing
    changed: list[str] = field(default_factory=list)  # files holding other content than was indexed
    failed: Counter = field(default_factory=Counter)  # reason -> count, files that no longer decode
    seconds: dict[str, float] = field(default_factory=lambda: Counter())

    def as_dict(self) -> dict:
        return {
            "captioned": self.captioned,
            "missing": len(self.missing),
            "missing_files": self.missing[:100],
            "changed": len(self.changed),
            "changed_files": self.changed[:100],
            "failed": sum(self.failed.values()),
            "failed_by_reason": dict(sorted(self.failed.items())),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }

    def count_failure(self, path: str, reason: str) -> None:
        if reason == CHANGED:
            self.changed.append(path)
        else:
            self.failed[reason] += 1


class CaptionRun:
    def __init__(self, store: IndexStore, captioner: Captioner, config: CaptionConfig,
                 progress: Progress | None = None) -> None:
        self.store = store
        self.captioner = captioner
        self.config = config
        self.progress = progress or NoProgress()

    def run(self) -> CaptionSummary:
        started = time.perf_counter()
        self.config.options.validate()
        summary = CaptionSummary()
        self.progress.start(self.store.catalog.captions.todo_count(*self._key()))
        decode = DecodeOptions.for_indexed(self.captioner.transform)
        submitted: deque[CaptionTask] = deque()
        batch: list[tuple[CaptionTask, np.ndarray]] = []
        with DecodePool(decode, self.config.pool) as pool:
            for _, outcome in pool.imap(self._files(submitted, summary)):
                task = submitted.popleft()
                if isinstance(outcome, Decoded):
                    batch.append((task, outcome.pixels))
                else:
                    summary.count_failure(task.path, outcome.reason)
                    self.progress.advance(1)
                if len(batch) >= self.config.batch_size:
                    self._write(batch, summary)
                    batch = []
            self._write(batch, summary)
        summary.seconds["total"] = time.perf_counter() - started
        self.progress.close()
        return summary

    def _key(self) -> tuple[str, str, bool]:
        return self.captioner.name, self.config.options.prompt, self.config.overwrite

    def _files(self, submitted: deque[CaptionTask], summary: CaptionSummary) -> Iterator[tuple[str, str]]:
        for task in self._present(summary):
            submitted.append(task)  # the pool yields outcomes in this order
            yield task.path, task.content_hash  # a caption of other content would be filed under this one

    def _present(self, summary: CaptionSummary) -> Iterator[CaptionTask]:
        """Every content still to caption, page by page, skipping (and reporting) vanished files."""
        after = 0
        while True:
            page = self.store.catalog.captions.todo(*self._key(), after_id=after, limit=PAGE)
            if not page:
                return
            after = page[-1].embedding_id
            for task in page:
                if os.path.exists(task.path):
                    yield task
                else:
                    summary.missing.append(task.path)
                    self.progress.advance(1)

    def _write(self, batch: list[tuple[CaptionTask, np.ndarray]], summary: CaptionSummary) -> None:
        if not batch:
            return
        began = time.perf_counter()
        texts = self.captioner.caption(np.stack([pixels for _, pixels in batch]), self.config.options)
        summary.seconds["model"] += time.perf_counter() - began
        captions = {task.embedding_id: text for (task, _), text in zip(batch, texts)}
        self.store.catalog.captions.write(captions, self.captioner.name, self.config.options.prompt)
        summary.captioned += len(captions)
        self.progress.advance(len(batch))
