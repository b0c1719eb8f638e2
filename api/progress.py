"""Progress on stderr: a tqdm bar on a terminal, plain periodic lines otherwise, nothing when quiet."""

from __future__ import annotations

import sys
import time


class BarProgress:
    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None

    def walked(self, count: int) -> None:
        """A counter without a total while the folders are walked; `start` replaces it."""
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(desc=f"{self.label}: walking", unit="file", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(count - self.bar.n)

    def start(self, total: int) -> None:
        from tqdm import tqdm

        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=total, desc=self.label, unit="file", file=sys.stderr, dynamic_ncols=True)

    def advance(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class LineProgress:
    """For logs and pipes: one line every `every_s` seconds, and one at the end."""

    def __init__(self, label: str, every_s: float = 10.0) -> None:
        self.label = label
        self.every_s = every_s
        self.total = self.done = 0
        self.started = self.last = time.monotonic()

    def walked(self, count: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(f"{self.label}: walking, {count} files found so far", file=sys.stderr, flush=True)

    def start(self, total: int) -> None:
        self.total, self.started = total, time.monotonic()
        self.last = self.started
        print(f"{self.label}: {total} files to process", file=sys.stderr, flush=True)

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(
            f"{self.label}: {self.done}/{self.total} files, {rate:.1f} files/s, ETA {eta:.0f} s",
            file=sys.stderr, flush=True,
        )

    def close(self) -> None:
        if self.total:
            self._line(time.monotonic())


def make_progress(label: str, quiet: bool):
    from indexer.pipeline import NoProgress

    if quiet:
        return NoProgress()
    return BarProgress(label) if sys.stderr.isatty() else LineProgress(label)
