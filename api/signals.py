"""SIGTERM (`kill`, `docker stop`, systemd, a batch scheduler) handled as Ctrl-C is: the commands that
hold work open (`index`, `caption`, `serve`) raise `Terminated` where Ctrl-C raises KeyboardInterrupt,
so they stop through the same cleanup, and `api.cli` reports it in one line with exit code 143."""

from __future__ import annotations

import signal
import threading

import click


class Terminated(KeyboardInterrupt):
    """Raised by SIGTERM where Ctrl-C would raise KeyboardInterrupt: the batch in hand is dropped, the
    decode workers are shut down, a server finishes its requests and cancels its jobs."""


class GracefulCommand(click.Command):
    """While the command runs, SIGTERM raises `Terminated`; Python's default would end the process
    at once, skipping every `finally`. `serve`: uvicorn takes SIGTERM itself while it serves, shuts
    down, then raises it again, which lands here once uvicorn has given the handler back. Outside the
    main thread (click's test runner in a thread) Python takes no signals, so nothing changes."""

    def invoke(self, ctx: click.Context):
        if threading.current_thread() is not threading.main_thread():
            return super().invoke(ctx)
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return super().invoke(ctx)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame):
    raise Terminated()
