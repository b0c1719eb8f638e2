"""The server's job queue: one job at a time, cancelling, and how many finished jobs it remembers."""

from __future__ import annotations

import threading
import time

from api.jobs import CANCELLED, DONE, FAILED, RUNNING, JobRunner


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


def test_a_job_shows_as_finished_only_once_its_results_are_searchable():
    """A client that polled a job until "done" and then searched could find the index empty: the
    server took in the job's images (`on_done`: a reload) after the job showed as finished."""
    reloaded = []

    def on_done(job):
        time.sleep(0.3)  # a reload of a large index takes a while
        reloaded.append(job)

    runner = JobRunner(lambda job, progress: {"n": 1}, on_done=on_done)
    failing = JobRunner(lambda job, progress: 1 / 0, on_done=on_done)
    jobs = [runner.submit("index", {}), failing.submit("index", {})]
    for job in jobs:
        wait_for(lambda: job.state in (DONE, FAILED))
        assert any(done is job for done in reloaded) and job.finished_at is not None, job.as_dict()
    runner.shutdown()
    failing.shutdown()
    assert jobs[0].state == DONE and jobs[0].result == {"n": 1} and jobs[1].state == FAILED
    assert jobs[1].error == "division by zero"


def test_only_the_latest_finished_jobs_are_kept():
    """A job posted every minute by cron must not grow the server's memory (and GET /api/jobs) forever."""
    runner = JobRunner(lambda job, progress: {"n": job.id}, on_done=lambda job: None, kept_finished=3)
    jobs = [runner.submit("index", {}) for _ in range(5)]
    wait_for(lambda: all(job.state == DONE for job in jobs))
    latest = runner.submit("index", {})
    runner.shutdown()
    assert [job.id for job in runner.all()] == [3, 4, 5, latest.id]
    assert runner.get(1) is None and runner.get(5).result == {"n": 5}


def test_an_index_job_shows_its_walk_and_can_be_cancelled_while_walking(tmp_path):
    """The walk of a large folder comes before `total` is known; it took minutes that showed nothing and
    that cancelling could not stop."""
    from indexer.compare import Comparison
    from indexer.catalog import Catalog, sqlite_url
    from indexer.walk import WalkOptions

    for i in range(5000):
        (tmp_path / "photos").mkdir(exist_ok=True)
        (tmp_path / "photos" / f"{i:05d}.jpg").touch()
    catalog = Catalog.open(sqlite_url(tmp_path / "catalog.sqlite"))
    walked_far, seen = threading.Event(), []

    def run(job, progress):
        def on_walked(count):
            progress.walked(count)
            seen.append(job.as_dict()["walked"])
            if count == 2000:
                walked_far.set()
                wait_for(job.cancel_requested.is_set)
        list(Comparison(catalog, [str(tmp_path / "photos")], WalkOptions(), on_walked=on_walked))
        return {}

    runner = JobRunner(run, on_done=lambda job: None)
    job = runner.submit("index", {})
    walked_far.wait(10)
    runner.cancel(job.id)
    wait_for(lambda: job.state == CANCELLED)
    runner.shutdown()
    catalog.close()
    # stopped at the next report after the cancel, not at the end of the walk
    assert seen == [1000, 2000] and job.walked == 3000 and job.total is None
