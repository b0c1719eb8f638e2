"""A warm parent for the tests' `blipsearch` processes: it imports torch, transformers and faiss once,
then forks one child per command.

Each test command is still a process of its own, with its own environment, working directory,
stdout, stderr and exit code; what it skips is the five to seven seconds of importing the heavy
libraries, which on two cores made up most of the suite's time. The parent never runs a torch
operation, so no OpenMP pool or tokenizer thread exists to be copied into a child (the same rule
that lets DataLoader workers fork), and the children's decode pools still spawn fresh interpreters.

Tests that are about how a process starts or dies (killed indexers, the server, the missing-model
message) still start `python -m api.cli` from scratch, and BLIPSEARCH_TEST_FRESH_PROCESSES=1 makes
every command do so, to check that the warm parent changes no result.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

PROGRAM = [sys.executable, "-m", "api.cli"]


class WarmCli:
    """Runs `blipsearch ARGS` in a child forked from a parent that has imported the libraries."""

    def __init__(self, root: Path, env: dict[str, str]):
        self._root, self._env = root, env
        self._parent: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def run(self, args: list[str], env: dict[str, str], timeout: float, output_dir: Path):
        with self._lock:
            parent = self._start()
            out, err = output_dir / "stdout", output_dir / "stderr"
            request = {"args": args, "env": env, "cwd": str(self._root), "stdout": str(out), "stderr": str(err)}
            parent.stdin.write(json.dumps(request) + "\n")
            parent.stdin.flush()
            pid = self._reply(parent, None)["pid"]
            try:
                code = self._reply(parent, timeout)["code"]
            except subprocess.TimeoutExpired:
                os.kill(pid, 9)
                self._reply(parent, None)
                raise subprocess.TimeoutExpired(PROGRAM + args, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(PROGRAM + args, code, out.read_text(), err.read_text())

    def close(self) -> None:
        if self._parent is not None:
            self._parent.stdin.close()
            self._parent.wait(timeout=30)
            self._parent = None

    def _start(self) -> subprocess.Popen:
        if self._parent is None or self._parent.poll() is not None:
            self._parent = subprocess.Popen(
                [sys.executable, "-c", "import tests.warm_cli as w; w.serve()"], cwd=self._root, env=self._env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            )
        return self._parent

    def _reply(self, parent: subprocess.Popen, timeout: float | None) -> dict:
        ready, _, _ = select.select([parent.stdout], [], [], timeout)
        if not ready:
            raise subprocess.TimeoutExpired(PROGRAM, timeout)
        line = parent.stdout.readline()
        if not line:
            raise RuntimeError(f"the warm CLI parent died (exit code {parent.wait()})")
        return json.loads(line)


def serve() -> None:
    """The parent: import everything a command may need, then fork one child per request line."""
    import faiss  # noqa: F401
    import sqlalchemy  # noqa: F401
    import torch  # noqa: F401
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval  # noqa: F401

    import api.cli  # noqa: F401
    import api.server  # noqa: F401
    import indexer.pipeline  # noqa: F401
    import indexer.search  # noqa: F401

    replies = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


def _child(request: dict) -> None:
    """Become `python -m api.cli ARGS`: its environment, directory and streams; exit as it would."""
    import atexit
    import traceback

    code = 1
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        written = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], written),
                                (2, request["stderr"], written)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        sys.argv = [str(Path(request["cwd"]) / "api" / "cli.py"), *request["args"]]
        from api.cli import main

        try:
            main.main(args=request["args"], prog_name="python -m api.cli")
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:  # noqa: BLE001 -- an uncaught error: print it and exit 1, as Python does
            traceback.print_exc()
            code = 1
        # What the interpreter does at a normal exit: wait for non-daemon threads, run exit handlers.
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits 1
    return 1
