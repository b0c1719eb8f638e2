"""Background jobs for the server: index a folder or caption the index, one at a time, cancellable.

A job runs in a worker thread with the index's writer lock, reporting progress through the same
`Progress` protocol the CLI's bar uses; cancelling makes its next progress report raise, so the job
stops after the batch in hand (committed batches stay). When a job ends, `on_done` lets the server
reload what searches read, so they see the new images without a restart.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
KEPT_FINISHED = 1000  # finished jobs the server remembers: a cron job's every run must not grow it forever


class JobCancelled(Exception):
    pass


@dataclass
class Job:
    id: int
    kind: str
    params: dict
    state: str = QUEUED
    walked: int = 0  # files an index job's walk found so far, before `total` is known
    total: int | None = None
    done: int = 0
    result: dict | None = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)

    def as_dict(self) -> dict:
        return {
            "id": self.id, "kind": self.kind, "params": self.params, "state": self.state, "walked": self.walked,
            "total": self.total,
            "done": self.done, "result": self.result, "error": self.error, "created_at": self.created_at,
            "finished_at": self.finished_at,
        }


class JobProgress:
    """The pipelines' Progress protocol, recording into a Job and honouring cancellation."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def walked(self, count: int) -> None:
        self.job.walked = count  # a long walk shows, and can be cancelled
        self._check()

    def start(self, total: int) -> None:
        self.job.total = total
        self._check()

    def advance(self, count: int) -> None:
        self.job.done += count
        self._check()

    def close(self) -> None: ...

    def _check(self) -> None:
        if self.job.cancel_requested.is_set():
            raise JobCancelled()


class JobRunner:
    def __init__(self, run: Callable[[Job, JobProgress], dict], on_done: Callable[[Job], None],
                 kept_finished: int = KEPT_FINISHED) -> None:
        self._run = run
        self._on_done = on_done
        self._kept_finished = kept_finished
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blipsearch-job")
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def submit(self, kind: str, params: dict) -> Job:
        with self._lock:
            job = Job(next(self._ids), kind, params)
            self._jobs[job.id] = job
            finished = [j.id for j in self._jobs.values() if j.finished_at is not None]
            for old in finished[: max(0, len(finished) - self._kept_finished)]:  # oldest first: ids ascend
                del self._jobs[old]
        self._executor.submit(self._execute, job)
        return job

    def _execute(self, job: Job) -> None:
        with self._lock:  # against `cancel`: a job is either cancelled while queued or started
            if job.state == CANCELLED:
                return
            job.state = RUNNING
        state = FAILED  # also after a BaseException, which leaves no error message
        try:
            job.result = self._run(job, JobProgress(job))
            state = DONE
        except JobCancelled:
            state = CANCELLED
        except Exception as exc:  # noqa: BLE001 - a job's failure is reported on the job, not raised
            state, job.error = FAILED, str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
        finally:
            # The job shows as finished only after `on_done` (the server takes in its images): a
            # client that polls it until done and then searches must find them.
            try:
                self._on_done(job)
            finally:
                job.finished_at = time.time()
                job.state = state

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.id)

    def cancel(self, job_id: int) -> Job | None:
        """A queued job is cancelled at once; a running one after the batch in hand."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.state == QUEUED:
                job.state, job.finished_at = CANCELLED, time.time()
            elif job is not None and job.state == RUNNING:
                job.cancel_requested.set()
        return job

    def counts(self) -> dict[str, int]:
        out = {state: 0 for state in (QUEUED, RUNNING, DONE, FAILED, CANCELLED)}
        for job in list(self._jobs.values()):
            out[job.state] += 1
        return out

    def shutdown(self) -> None:
        for job in list(self._jobs.values()):
            self.cancel(job.id)
        self._executor.shutdown(wait=True, cancel_futures=False)



