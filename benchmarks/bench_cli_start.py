"""What a `blipsearch` process spends before its work, project vs baseline in one run.

1. A missing model: `blipsearch search` with a hub id that is neither cached nor reachable, as a
   user runs it, against the same command in a process that imports transformers' BLIP-2 classes
   first, as the loader did before it checked the model (8307b78).
2. The tests' commands: `status` and an ITC `search` over 20 indexed images on a tiny checkpoint,
   through `tests.conftest.run_cli` forked from its warm parent, against the same commands started
   fresh (BLIPSEARCH_TEST_FRESH_PROCESSES=1), as every test command was before d38588d.

Each time is the best of `--repeats` runs.

Run: python -m benchmarks.bench_cli_start [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_search import best_of

ROOT = Path(__file__).resolve().parent.parent
MISSING = "Salesforce/blip2-not-cached-anywhere"
IMPORT_FIRST = ("import sys; from transformers import Blip2ForImageTextRetrieval; from api.cli import main; "
                "main(sys.argv[1:], prog_name='blipsearch')")


def bench_missing_model(index_dir: Path, repeats: int) -> None:
    args = ["search", "a red circle", "--index", str(index_dir), "--model", MISSING]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(command: list[str]) -> None:
        result = subprocess.run(command + args, cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 2 and MISSING in result.stderr, result.stderr

    now = best_of(lambda: run([sys.executable, "-m", "api.cli"]), repeats)
    before = best_of(lambda: run([sys.executable, "-c", IMPORT_FIRST]), repeats)
    print(f"missing model, search: {now:.2f} s; importing transformers first: {before:.2f} s; "
          f"{before / now:.1f}x faster")


def bench_test_commands(index_dir: Path, model: Path, repeats: int) -> None:
    from tests import conftest

    commands = [["status", "--index", str(index_dir), "--json"],
                ["search", "a red circle", "--index", str(index_dir), "--model", str(model), "--no-rerank", "--json"]]

    def run_all() -> None:
        for command in commands:
            conftest.run_cli(*command, check=True)

    conftest.run_cli("--version", check=True)  # start the warm parent outside the timing
    warm = best_of(run_all, repeats)
    os.environ["BLIPSEARCH_TEST_FRESH_PROCESSES"] = "1"
    try:
        fresh = best_of(run_all, repeats)
    finally:
        del os.environ["BLIPSEARCH_TEST_FRESH_PROCESSES"]
        conftest.pytest_sessionfinish(None, 0)
    print(f"test commands (status + search): warm {warm:.2f} s, fresh {fresh:.2f} s; {fresh / warm:.1f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from retrieval.tiny import make_tiny
    from tests.conftest import make_images, run_cli

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = make_tiny(scratch / "models")[0]
        make_images(scratch / "photos", 20, seed=3)
        index_dir = scratch / "index"
        run_cli("index", str(scratch / "photos"), "--index", str(index_dir), "--model", str(model), "-q", check=True)
        bench_missing_model(index_dir, args.repeats)
        bench_test_commands(index_dir, model, args.repeats)


if __name__ == "__main__":
    main()
