"""The command line's edge: how errors it does not expect from the core reach the user."""

from __future__ import annotations

import errno

import pytest
from click.testing import CliRunner

from api.cli import RESUMABLE, BlipsearchGroup, main
from api.signals import GracefulCommand


class DriverError(Exception):
    """Like SQLAlchemy's OperationalError: the driver's error as `orig`, noise in its own text."""

    def __init__(self, orig: Exception) -> None:
        super().__init__(f"({type(orig).__name__}) {orig}\n(Background on this error at: https://sqlalche.me/)")
        self.orig = orig


def run(raised: BaseException, command: str = "index"):
    group = BlipsearchGroup(name="blipsearch")

    @group.command(name=command)
    def failing() -> None:
        raise raised

    return CliRunner().invoke(group, [command])


@pytest.mark.parametrize("raised, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "[Errno 28] No space left on device"),
    (DriverError(Exception("database or disk is full")), "database or disk is full"),
    (RuntimeError("Error in faiss::FileIOWriter: No space left on device"),
     "Error in faiss::FileIOWriter: No space left on device"),
])
def test_a_full_disk_is_one_line_that_says_what_to_do(raised, reason):
    result = run(raised)
    assert result.exit_code == 1
    assert result.output == (f"Error: the disk is full ({reason}); free some space and run the same command again; "
                             "every finished batch is kept, and the same command goes on from there.\n")
    assert run(raised, "search").output == f"Error: the disk is full ({reason}); free some space and run the " \
                                           "same command again.\n"


def test_a_gpu_out_of_memory_is_one_line_that_says_what_to_do():
    import torch

    raised = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 3.81 GiB total)")
    result = run(raised)
    assert (result.exit_code, result.output) == (1, "Error: the GPU ran out of memory (CUDA out of memory. Tried to "
                                                    "allocate 2.00 GiB (GPU 0; 3.81 GiB total)); lower --batch-size "
                                                    "(for search, --candidates), or run on --device cpu; every "
                                                    "finished batch is kept, and the same command goes on from there.\n")


def test_a_drivers_warning_while_it_cleans_up_does_not_come_before_the_error():
    """The catalog server gone mid-batch: psycopg, tearing down its pipeline, logged "error ignored
    terminating <psycopg.Pipeline [BAD]>: the connection is lost" on stderr, ahead of the one line that
    says what happened (seen in a CI run of test_catalog's lost connection). In a process of its own,
    as logging writes there with no handler configured (pytest's would catch it here)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    program = """
import logging
from api.cli import BlipsearchGroup
from indexer.errors import CatalogConnectionError
group = BlipsearchGroup(name="blipsearch")
@group.command(name="index")
def lost():
    logging.getLogger("psycopg").warning("error ignored terminating %r: %s", "<psycopg.Pipeline [BAD]>",
                                         "the connection is lost")
    raise CatalogConnectionError("lost the connection to the catalog")
group.main(["index"], prog_name="blipsearch")
"""
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (1, "Error: lost the connection to the catalog; every finished "
                                                     "batch is kept, and the same command goes on from there\n")


def test_other_errors_are_not_dressed_up():
    result = run(ValueError("a bug"))
    assert isinstance(result.exception, ValueError) and result.exit_code == 1


@pytest.mark.parametrize("args", [
    ["index", ".", "--decode-timeout", "nan"],  # passed the range check and skipped every file as timed out
    ["index", ".", "--max-megapixels", "NaN"],  # a traceback (int(nan))
    ["train", "--recolour", "nan"],
])
def test_nan_is_refused_where_a_number_is_asked_for(args):
    from api.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and f"{args[-1]!r} is not a number" in result.output


@pytest.mark.parametrize("args", [["train", "--out", "x", "--seed", str(2**64)], ["models", "make-tiny", "x", "--seed", "-1"]])
def test_a_seed_torch_cannot_take_is_refused(args):
    """2**64 was a traceback from torch.manual_seed once the data had been drawn."""
    from api.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "is not in the range 0<=x<=2147483647" in result.output


def test_the_commands_that_hold_work_open_take_sigterm_as_ctrl_c():
    """test_crash sends SIGTERM to `index`, test_server to `serve`; `caption` gets it through the same class."""
    assert all(isinstance(main.commands[name], GracefulCommand) for name in (*RESUMABLE, "serve"))
