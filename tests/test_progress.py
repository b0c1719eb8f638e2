"""Progress on stderr: the walk shown before the files to do are counted, then the files done."""

from __future__ import annotations

from api.progress import BarProgress, LineProgress


def test_lines_show_the_walk_then_the_files_to_process(capsys):
    progress = LineProgress("indexing", every_s=0)
    progress.walked(1000)
    progress.walked(2000)
    progress.start(5)
    progress.advance(5)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[:3] == ["indexing: walking, 1000 files found so far", "indexing: walking, 2000 files found so far",
                         "indexing: 5 files to process"]
    assert lines[-1].startswith("indexing: 5/5 files")


def test_the_bar_counts_the_walk_then_becomes_the_files_bar(capsys):
    progress = BarProgress("indexing")
    progress.walked(1000)
    progress.walked(3000)
    assert progress.bar.n == 3000 and progress.bar.total is None
    progress.start(7)
    assert progress.bar.n == 0 and progress.bar.total == 7
    progress.close()
    assert "indexing: walking" in capsys.readouterr().err
