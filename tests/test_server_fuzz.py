"""Schemathesis against the app's own OpenAPI spec: generated requests never cause a server error.

Runs without the API token, so write endpoints answer 401 or 422 and no job touches the disk; the
read endpoints get every generated input.
"""

from __future__ import annotations

import contextlib

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from api.server import create_app
from api.service import ServeConfig, Service
from indexer.pipeline import IndexConfig, Indexer
from indexer.store import IndexStore, StoreConfig
from tests.conftest import make_images, postgres_database


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def app(request, tmp_path_factory, retriever):
    """On both catalogs: PostgreSQL refuses text that SQLite takes (NUL), and that was a 500."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if request.param == "postgresql" else None
        root = tmp_path_factory.mktemp("fuzz")
        make_images(root / "photos", 6, seed=51)
        store = IndexStore.open(StoreConfig(root / "idx", catalog_url=url), create=True)
        Indexer(store, retriever, IndexConfig(batch_size=4)).run([str(root / "photos")])
        store.close()
        service = Service(ServeConfig(StoreConfig(root / "idx", catalog_url=url), token="not-given-to-the-fuzzer"),
                          retriever)
        yield create_app(service)
        service.close()


def test_no_server_errors(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_server_error(case):
            case.call_and_validate(checks=[not_a_server_error])

        no_server_error()
