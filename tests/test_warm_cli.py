"""The tests' warm CLI parent (tests/warm_cli.py) answers as a fresh `python -m api.cli` does."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import free_port, run_cli


@pytest.mark.parametrize("args", [
    ["--version"],
    ["index"],  # a usage error: exit 2, click's message naming the program
    ["status", "--index", "/nonexistent/blipsearch-index", "--json"],  # the core's typed error
])
def test_warm_commands_answer_as_fresh_ones(args):
    warm, fresh = run_cli(*args), run_cli(*args, fresh=True)
    assert (warm.returncode, warm.stdout, warm.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


def test_environment_and_timeout_reach_the_child(tmp_path, tiny_model):
    result = run_cli("status", "--json", env={"BLIPSEARCH_INDEX": str(tmp_path / "nothing-here")})
    assert result.returncode != 0 and "nothing-here" in result.stderr, result.stderr
    with pytest.raises(subprocess.TimeoutExpired):  # a server runs until it is stopped
        run_cli("serve", "--index", str(tmp_path / "idx"), "--model", str(tiny_model), "--port", str(free_port()),
                timeout=3)
    assert run_cli("--version").returncode == 0  # the parent outlives a child killed on timeout
