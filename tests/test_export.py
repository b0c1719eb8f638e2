"""`indexer.export`: the catalog streamed out, never held whole (a hundred million rows would not fit)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

import indexer.export
from indexer.catalog import Catalog
from indexer.export import records, write_parquet
from tests.conftest import make_images


@pytest.fixture
def store(tmp_path, retriever):
    from indexer.pipeline import IndexConfig, Indexer
    from indexer.store import IndexStore, StoreConfig

    make_images(tmp_path / "photos", 7, seed=19)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not an image")
    store = IndexStore.open(StoreConfig(tmp_path / "idx"), create=True)
    Indexer(store, retriever, IndexConfig()).run([str(tmp_path / "photos")])
    yield store
    store.close()


def test_records_stream_the_catalog_in_batches(store, monkeypatch):
    expected = [row.path for row in store.catalog.files()]
    batches = []
    streamed = Catalog.iter_files

    def recorded(catalog, batch=5000, **filters):
        for part in streamed(catalog, batch=3, **filters):
            batches.append(len(part))
            yield part

    monkeypatch.setattr(Catalog, "iter_files", recorded)
    monkeypatch.setattr(Catalog, "files", lambda *a, **k: pytest.fail("export read the whole catalog at once"))
    assert [record["path"] for record in records(store.catalog)] == expected
    assert batches == [3, 3, 2]


def test_records_of_one_status_or_glob(store, tmp_path, monkeypatch):
    """`export --status skipped` and `--path GLOB`: only those files, chosen in SQL (`Catalog.iter_files`)."""
    from api.options import absolute_glob

    skipped = list(records(store.catalog, status="skipped"))
    assert [(r["path"], r["error"]) for r in skipped] == [(str(tmp_path / "photos" / "broken.jpg"),
                                                           "not-an-image: not a format Pillow can read")]
    monkeypatch.chdir(tmp_path)
    glob = absolute_glob("photos/img000[0-2].jpg")  # relative, as search --path takes it
    assert [r["path"] for r in records(store.catalog, path_glob=glob)] == \
        [str(tmp_path / "photos" / f"img000{i}.jpg") for i in range(3)]
    assert list(records(store.catalog, status="skipped", path_glob=glob)) == []


def test_parquet_is_written_a_row_group_at_a_time(store, tmp_path, monkeypatch):
    monkeypatch.setattr(indexer.export, "PARQUET_ROWS", 3)
    count = write_parquet(records(store.catalog), tmp_path / "catalog.parquet")
    table = pq.ParquetFile(tmp_path / "catalog.parquet")
    assert count == 8 and table.metadata.num_row_groups == 3
    assert table.read().to_pylist() == list(records(store.catalog))
