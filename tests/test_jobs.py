"""The server's job queue: one job at a time, cancelling, and how many finished jobs it remembers."""

from __future__ import annotations

import threading
import time

from api.jobs import CANCELLED, DONE, RUNNING, JobRunner


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_queued_job_is_cancelled_at_once_and_never_runs():
    """Before, it stayed "queued" until the job ahead of it ended, maybe hours later."""
    release, ran = threading.Event(), []

    def run(job, progress):
        ran.append(job.id)
        release.wait(10)
        return {}

    runner = JobRunner(run, on_done=lambda job: None)
    first, second = runner.submit("index", {}), runner.submit("index", {})
    wait_for(lambda: first.state == RUNNING)
    cancelled = runner.cancel(second.id)
    assert cancelled.state == CANCELLED and cancelled.finished_at is not None
    release.set()
    runner.shutdown()
    assert ran == [first.id] and first.state == DONE and second.state == CANCELLED


def test_only_the_latest_finished_jobs_are_kept():
    """A job posted every minute by cron must not grow the server's memory (and GET /api/jobs) forever."""
    runner = JobRunner(lambda job, progress: {"n": job.id}, on_done=lambda job: None, kept_finished=3)
    jobs = [runner.submit("index", {}) for _ in range(5)]
    wait_for(lambda: all(job.state == DONE for job in jobs))
    latest = runner.submit("index", {})
    runner.shutdown()
    assert [job.id for job in runner.all()] == [3, 4, 5, latest.id]
    assert runner.get(1) is None and runner.get(5).result == {"n": 5}
