"""Crash safety: `kill -9` a real indexing process several times mid-run, then finish the job; Ctrl-C and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, assert_consistent, children, make_images, run_cli, wait_gone


def committed_embeddings(index_dir) -> int:
    path = index_dir / "catalog.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM embeddings").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0


@pytest.mark.parametrize("index_type", ["flat-fp16", "sq8"])  # sq8 trains once 1,000 vectors are in
def test_kill_dash_nine_repeatedly_then_resume(tmp_path, tiny_model, index_type):
    folder = tmp_path / "photos"
    total = len(make_images(folder, 120, seed=7))
    idx = tmp_path / "idx"
    command = [sys.executable, "-m", "api.cli", "index", str(folder), "--index", str(idx), "--model",
               str(tiny_model), "--batch-size", "4", "--workers", "1", "--json", "-q", "--index-type", index_type]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    kills = 0
    for _ in range(3):
        before = committed_embeddings(idx)
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while committed_embeddings(idx) < before + 8 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is None:
            workers = children(process.pid)
            process.send_signal(signal.SIGKILL)
            kills += 1
            assert workers and wait_gone(workers) == [], "decode workers outlived their killed run"
        process.wait()
    assert kills >= 2, "the runs finished before they could be killed; make the collection larger"
    done_before_final = committed_embeddings(idx)
    assert 0 < done_before_final < total
    final = run_cli(*command[3:], check=True, timeout=300)  # the same command, forked from the warm parent
    summary = json.loads(final.stdout)
    # Nothing committed before a kill is embedded again, and nothing is lost.
    assert summary["indexed"] == total - done_before_final
    assert summary["indexed"] + summary["unchanged"] == total
    assert committed_embeddings(idx) == total
    assert_consistent(idx)


def test_ctrl_c_and_sigterm_keep_finished_batches_and_say_so(tmp_path, tiny_model):
    """Ctrl-C, then SIGTERM as `kill`, `docker stop` and systemd send it: each one line and the shell's
    exit code for the signal, the decode workers gone, and each rerun goes on from the last finished batch."""
    folder = tmp_path / "photos"
    total = len(make_images(folder, 80, seed=8))
    idx = tmp_path / "idx"
    command = [sys.executable, "-m", "api.cli", "index", str(folder), "--index", str(idx), "--model",
               str(tiny_model), "--batch-size", "4", "--workers", "1", "--json", "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    kept = 0
    for signum, code, said in ((signal.SIGINT, 130, "Interrupted"), (signal.SIGTERM, 143, "Terminated")):
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True,  # SIGINT as a shell leaves it to its commands:
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while committed_embeddings(idx) < kept + 8 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before the signal; make the collection larger"
        workers = children(process.pid)
        process.send_signal(signum)  # to the run alone, as `kill` does; a terminal's Ctrl-C reaches its workers too
        out, err = process.communicate(timeout=60)
        assert process.returncode == code and out == "", err
        assert err.strip() == f"{said}; every finished batch is kept, and the same command goes on from there."
        assert workers and wait_gone(workers, timeout=5) == []
        assert committed_embeddings(idx) >= kept + 8
        kept = committed_embeddings(idx)
    summary = json.loads(run_cli(*command[3:], check=True, timeout=300).stdout)
    assert kept < total and summary["unchanged"] == kept and summary["indexed"] == total - kept
    assert_consistent(idx)


def test_sigterm_stops_a_server_and_its_running_job_cleanly(tmp_path, tiny_model):
    """`docker stop` on `serve` while an index job runs: uvicorn shuts down, then the job is cancelled
    after its batch in hand and its decode workers stop, where Python's default for SIGTERM (after
    uvicorn raises it again) ended the process before any of that, and left the workers' semaphores
    to the resource tracker's warning. Nothing finished is lost: the next run goes on from there."""
    import httpx

    from tests.conftest import free_port

    folder = tmp_path / "photos"
    total = len(make_images(folder, 300, seed=9))
    idx, port = tmp_path / "idx", free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "api.cli", "serve", "--index", str(idx), "--model", str(tiny_model), "--port",
               str(port)]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        job = httpx.post(f"{base}/api/jobs", json={"kind": "index", "paths": [str(folder)], "batch_size": 4}).json()
        while httpx.get(f"{base}/api/jobs/{job['id']}").json()["done"] < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = children(server.pid)
        assert httpx.get(f"{base}/api/jobs/{job['id']}").json()["state"] == "running" and workers
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 143, err
    assert err.strip().endswith("Terminated.") and "Traceback" not in err and "leaked" not in err, err
    assert wait_gone(workers, timeout=5) == []
    kept = committed_embeddings(idx)
    summary = json.loads(run_cli("index", "--index", str(idx), "--json", "-q", check=True, timeout=300).stdout)
    assert 8 <= kept < total and summary["unchanged"] == kept and summary["indexed"] == total - kept
    assert_consistent(idx)
