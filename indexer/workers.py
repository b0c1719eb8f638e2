"""Decode worker processes that survive whatever a file does to them.

Decoding runs in separate processes so it overlaps with the model and so a hostile file cannot take
the run down: each worker caps its address space (a decompression blow-up raises MemoryError
instead of waking the OOM killer), silences C-library noise on its stderr, and gets a time limit
per file. A worker that hangs is killed; a worker that dies (segfault, kill) breaks the pool, after
which the files that were in flight are retried one at a time in a fresh pool, so the culprit is
named exactly and innocent files are not blamed.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from indexer.decode import (
    CORRUPT, DECODER_CRASHED, DECODER_TIMEOUT, OUT_OF_MEMORY, Decoded, DecodeOptions, Skipped, decode_file,
)


@dataclass(frozen=True)
class PoolOptions:
    workers: int = 1
    timeout_s: float = 60.0
    memory_limit_bytes: int | None = 4 << 30
    quiet: bool = True  # send the workers' C-level stderr to /dev/null


def _init_worker(options: PoolOptions, parent: int) -> None:
    threading.Thread(target=_exit_with, args=(parent,), name="blipsearch-parent-watch", daemon=True).start()
    if options.memory_limit_bytes:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = options.memory_limit_bytes if hard == resource.RLIM_INFINITY else min(hard, options.memory_limit_bytes)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    if options.quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)


def _exit_with(parent: int, every_s: float = 1.0) -> None:
    """Exit once `parent` is gone. A run killed outright (kill -9, the OOM killer) cannot stop its
    workers, and they would wait for work for ever, or block sending a result no one reads: each holds
    both ends of its pipes (multiprocessing passes them), so the parent's death brings no EOF. Each
    also held Python's resource tracker open, one more process left per kill."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


File = str | tuple[str, str]  # a path, or a path and the content hash it was indexed with


class DecodePool:
    """`imap(files)` yields `(file, Decoded | Skipped)` in input order, never raising for a file. A
    file is a path, or a (path, content hash) pair for a file read again after indexing: other
    content is then `CHANGED`, not decoded (`decode_file`'s `expected_hash`)."""

    def __init__(self, decode: DecodeOptions, options: PoolOptions, task: Callable = decode_file) -> None:
        self.decode = decode
        self.task = task  # a picklable (path, DecodeOptions) -> Decoded | Skipped; tests swap in hostile ones
        self.options = options
        self.window = max(4, 4 * options.workers)
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Cancel queued files and let the workers finish the ones in hand; kill them if one hangs."""
        executor = self._executor
        if executor is None:
            return
        stopper = threading.Thread(target=executor.shutdown, kwargs={"wait": True, "cancel_futures": True}, daemon=True)
        stopper.start()
        stopper.join(self.options.timeout_s)
        if stopper.is_alive():
            self._kill()
        self._executor = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.options.workers,
                mp_context=multiprocessing.get_context("spawn"),  # never fork a process holding torch threads
                initializer=_init_worker,
                initargs=(self.options, os.getpid()),
            )
        return self._executor

    def _kill(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        processes = list((getattr(executor, "_processes", None) or {}).values())
        for process in processes:
            process.kill()  # a hung decoder ignores polite shutdown
        for process in processes:
            process.join(5)
        # A worker killed while sending a result leaves half a message in the result pipe, and the
        # executor's manager thread would wait for the rest forever. With every worker dead, closing
        # our copy of the pipe's write end turns that wait into EOF, which the executor handles.
        writer = getattr(getattr(executor, "_result_queue", None), "_writer", None)
        if writer is not None:
            writer.close()
        executor.shutdown(wait=True, cancel_futures=True)

    def _submit(self, file: File) -> Future:
        if isinstance(file, str):  # the hostile tasks tests swap in take (path, options) only
            return self._pool().submit(self.task, file, self.decode)
        path, expected_hash = file
        return self._pool().submit(self.task, path, self.decode, expected_hash)

    def imap(self, files: Iterable[File]) -> Iterator[tuple[File, Decoded | Skipped]]:
        pending = iter(files)
        inflight: deque[tuple[File, Future]] = deque()
        isolate: deque[File] = deque()  # after a crash: run these one at a time to find the culprit
        while True:
            if isolate:
                file = isolate.popleft()
                yield file, self.one(file)
                continue
            while len(inflight) < self.window:
                file = next(pending, None)
                if file is None:
                    break
                inflight.append((file, self._submit(file)))
            if not inflight:
                return
            file, future = inflight[0]
            try:
                result = _outcome(future, self.options.timeout_s)
            except FutureTimeout:
                inflight.popleft()
                self._restart(inflight, isolate)
                yield file, Skipped(DECODER_TIMEOUT, f"decoding took over {self.options.timeout_s:g} s; gave up")
                continue
            except BrokenProcessPool:
                self._restart(inflight, isolate)
                continue
            inflight.popleft()
            yield file, result

    def _restart(self, inflight: deque, isolate: deque) -> None:
        """Kill the pool; the files it held go to one-at-a-time retries."""
        self._kill()
        isolate.extend(file for file, _ in inflight)
        inflight.clear()

    def one(self, file: File) -> Decoded | Skipped:
        """Decode `file` alone; the pool's workers stay for the next call."""
        try:
            return _outcome(self._submit(file), self.options.timeout_s)
        except FutureTimeout:
            self._kill()
            return Skipped(DECODER_TIMEOUT, f"decoding took over {self.options.timeout_s:g} s; gave up")
        except BrokenProcessPool:
            self._kill()
            return Skipped(DECODER_CRASHED, "the decoder crashed on this file")


def _outcome(future: Future, timeout_s: float) -> Decoded | Skipped:
    """The task's result; an exception it raised is that file's failure, not the run's."""
    try:
        return future.result(timeout=timeout_s)
    except (FutureTimeout, BrokenProcessPool):
        raise
    except MemoryError:
        return Skipped(OUT_OF_MEMORY, "decoding needed more memory than a worker may use")
    except Exception as exc:  # noqa: BLE001
        return Skipped(CORRUPT, f"{type(exc).__name__}: {exc}"[:300])


class UntrustedDecoder:
    """Decodes single untrusted files (an uploaded query image) one at a time, in a worker process kept
    between calls: a file that crashes, hangs or blows up the decoder is its own Skipped, never the
    server's; and one decode at a time bounds the memory that many uploads at once may take (each
    up to 100 MP, 0.3 GB decoded). Decoding takes its turn with the others: tens of ms a photo."""

    def __init__(self, options: PoolOptions, task: Callable = decode_file) -> None:
        self.options = options
        self.task = task
        self._pool: DecodePool | None = None
        self._lock = threading.Lock()

    def __call__(self, path: str, decode: DecodeOptions) -> Decoded | Skipped:
        with self._lock:
            if self._pool is None or self._pool.decode != decode:
                self._close()
                self._pool = DecodePool(decode, self.options, self.task)
            return self._pool.one(path)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
