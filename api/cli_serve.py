"""`blipsearch serve` and `blipsearch demo`."""

from __future__ import annotations

from pathlib import Path

import click

from api.options import feature_cache_option, index_options, model_options, store_config


@click.command()
@index_options
@model_options
@click.option("--caption-model", default=None, help="Captioning model for caption jobs (loaded on first use).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (localhost only by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@feature_cache_option
@click.option("--max-upload-mb", type=click.IntRange(1, 1000), default=20, show_default=True)
def serve(index_dir, catalog_url, model, device, dtype, caption_model, host, port, feature_cache_mb,
          max_upload_mb) -> None:
    """Serve the index over HTTP: a JSON API (OpenAPI at /openapi.json) and a search page at /.

    Write endpoints (jobs, deletions) require `Authorization: Bearer $BLIPSEARCH_API_TOKEN` when that
    variable is set; set it whenever --host is not a loopback address.
    """
    import os

    import uvicorn

    from api.server import create_app
    from api.service import ServeConfig, Service
    from indexer.store import IndexStore
    from retrieval.captioner import Blip2Captioner
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever
    from retrieval.errors import UsageError

    token = os.environ.get("BLIPSEARCH_API_TOKEN") or None
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise UsageError(f"--host {host} exposes the server beyond this machine; set BLIPSEARCH_API_TOKEN first")
    location = store_config(index_dir, catalog_url)
    store = IndexStore.open(location, create=True)
    try:
        recorded = store.catalog.model()
    finally:
        store.close()
    retriever = Blip2Retriever.load(ModelConfig.retrieval(model or (recorded.name if recorded else None), device, dtype))
    config = ServeConfig(location, model, caption_model, device, token, max_upload_mb * 1024 * 1024, feature_cache_mb)
    service = Service(config, retriever, lambda: Blip2Captioner.load(ModelConfig.captioning(caption_model, device, dtype)))
    click.echo(f"blipsearch: serving {location.directory} on http://{host}:{port}/", err=True)
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
    finally:
        service.close()



@click.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to put the demo images, models and index [default: a per-user data directory].")
@click.option("--model", default=None, help="Retrieval model to use instead of the built-in tiny one.")
def demo(directory, model) -> None:
    """Build a small example collection, index it, and run a few searches, all offline."""
    from platformdirs import user_data_dir

    from indexer.demo import make_demo_images
    from indexer.pipeline import IndexConfig, Indexer
    from indexer.search import SearchOptions
    from indexer.store import IndexStore, StoreConfig
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever
    from retrieval.query import TextQuery
    from retrieval.tiny import RETRIEVAL_DIR, make_retrieval

    directory = (directory or Path(user_data_dir("blipsearch")) / "demo").expanduser()
    images = make_demo_images(directory / "images")
    click.echo(f"demo images: {len(images)} in {directory / 'images'}", err=True)
    if model is None:
        model = str(directory / "models" / RETRIEVAL_DIR)
        if not (Path(model) / "config.json").exists():
            make_retrieval(model)
        click.echo(f"model: tiny random BLIP-2 at {model} (plumbing only: its rankings carry no meaning)", err=True)
    store = IndexStore.open(StoreConfig(directory / "index"), create=True)
    try:
        with store.writer_lock():
            retriever = Blip2Retriever.load(ModelConfig.retrieval(model))
            summary = Indexer(store, retriever, IndexConfig()).run([str(directory / "images")])
        click.echo(f"indexed {summary.indexed}, unchanged {summary.unchanged} -> {store.directory}", err=True)
        from indexer.search import Searcher

        searcher = Searcher(store, retriever)
        for text in ("a red circle", "a blue square on a black background"):
            click.echo(f"\nsearch: {text!r}")
            response = searcher.search_text(TextQuery.parse([text]), SearchOptions(k=3))
            for rank, result in enumerate(response.results, 1):
                click.echo(f"{rank:>3}  {result.score:.4f}  {Path(result.path).name}")
    finally:
        store.close()
    click.echo(f"\ntry: blipsearch search \"a green triangle\" --index {directory / 'index'}", err=True)
