"""`blipsearch serve` and `blipsearch demo`."""

from __future__ import annotations

from pathlib import Path

import click

from api.options import (
    best_of, feature_cache_option, index_model, index_options, make_directory, model_options, store_config,
)
from api.signals import GracefulCommand

DEMO_CANDIDATES = 16  # the demo's captions: the best of this many beams by ITC, as `caption --candidates`


@click.command(cls=GracefulCommand)
@index_options
@model_options
@click.option("--caption-model", default=None, help="Captioning model for caption jobs (loaded on first use).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (localhost only by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@feature_cache_option
@click.option("--max-upload-mb", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--max-rerank", type=click.IntRange(1, 10_000), default=256, show_default=True,
              help="Most images one search may have the ITM head re-rank (each is decoded and run through "
                   "the ViT), so that one request cannot hold the model for minutes.")
@click.option("--thumbnail-cache-mb", type=click.IntRange(0, 10**9), default=1024, show_default=True,
              help="Most megabytes of thumbnails kept in the index directory, the least recently shown "
                   "removed first (0: none kept, each made when asked for).")
def serve(index_dir, catalog_url, model, device, dtype, caption_model, host, port, feature_cache_mb,
          max_upload_mb, max_rerank, thumbnail_cache_mb) -> None:
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
        name = index_model(store, model)
    finally:
        store.close()
    listening = _listen(host, port)
    try:
        retriever = Blip2Retriever.load(ModelConfig.retrieval(name, device, dtype))
        config = ServeConfig(location, model, caption_model, device, token, max_upload_mb * 1024 * 1024,
                             feature_cache_mb, max_rerank=max_rerank, thumbnail_cache_mb=thumbnail_cache_mb)
        service = Service(config, retriever,
                          lambda: Blip2Captioner.load(ModelConfig.captioning(caption_model, device, dtype)))
        images = service.counts.get().get("distinct_images", 0)
        hint = " (an empty index: index into it with POST /api/jobs, or check --index)" if not images else ""
        click.echo(f"blipsearch: serving {location.directory}, {images} images{hint}, on {url(host, port)}",
                   err=True)
        try:
            uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning")).run(sockets=[listening])
        finally:
            service.close()
    finally:
        listening.close()


def url(host: str, port: int) -> str:
    """The server's address as a browser takes it: an IPv6 host in brackets (http://[::1]:8000/)."""
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _listen(host: str, port: int):
    """The server's socket, bound before the model loads: a port in use is told at once and in one
    line, not by uvicorn after minutes of loading the model."""
    import socket

    from retrieval.errors import UsageError

    listening = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listening = socket.socket(family, kind, proto)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        listening.bind(address)
    except OSError as exc:
        if listening is not None:
            listening.close()
        raise UsageError(f"cannot listen on {host} port {port}: {exc.strerror or exc}; "
                         "choose another --port (or --host)") from None
    return listening


@click.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to put the demo images and index [default: a per-user data directory].")
@click.option("--model", default=None, help="Retrieval model [default: the shipped shapes model].")
@click.option("--caption-model", default=None, help="Captioning model [default: the shipped shapes model].")
def demo(directory, model, caption_model) -> None:
    """Generate 40 images of coloured shapes, index and caption them with the small BLIP-2 that ships
    with blipsearch, and search them by description; all offline."""
    from platformdirs import user_data_dir

    from indexer.captions import CaptionConfig, CaptionRun
    from indexer.demo import make_demo_images
    from indexer.pipeline import IndexConfig, Indexer
    from indexer.search import Searcher, SearchOptions
    from indexer.store import IndexStore, StoreConfig
    from retrieval.captioner import Blip2Captioner, CaptionOptions
    from retrieval.checkpoints import SHAPES_CAPTION, SHAPES_RETRIEVAL
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever
    from retrieval.query import TextQuery

    directory = make_directory((directory or Path(user_data_dir("blipsearch")) / "demo").expanduser())
    images = make_demo_images(directory / "images")
    click.echo(f"demo images: {len(images)} in {directory / 'images'}", err=True)
    model, caption_model = model or str(SHAPES_RETRIEVAL), caption_model or str(SHAPES_CAPTION)
    store = IndexStore.open(StoreConfig(directory / "index"), create=True)
    try:
        with store.writer_lock():
            retriever = Blip2Retriever.load(ModelConfig.retrieval(model))
            captioner = Blip2Captioner.load(ModelConfig.captioning(caption_model))
            if captioner.transform == retriever.transform:  # the best of 16 beams by ITC (`caption --candidates 16`)
                captioner = best_of(captioner, retriever, DEMO_CANDIDATES)
            else:  # another --model or --caption-model: ITC cannot judge the captioner's images
                click.echo("note: captions are the caption model's first choices, since the two models prepare "
                           "images differently and ITC cannot choose among them", err=True)
            config = IndexConfig(caption=CaptionOptions())
            summary = Indexer(store, retriever, config, captioner=captioner).run([str(directory / "images")])
            # as `index --caption`: images whose captioner needs other pixels than the retrieval model's
            summary.captioned += CaptionRun(store, captioner, CaptionConfig(CaptionOptions())).run().captioned
        click.echo(f"indexed {summary.indexed}, captioned {summary.captioned}, unchanged {summary.unchanged}"
                   f" -> {store.directory}\nmodels: {model}, {caption_model}\n"
                   f"ranked: the top 32 by ITC, re-scored {retriever.fusion.describe()}", err=True)
        searcher = Searcher(store, retriever)
        first = []
        for number, image in enumerate(images):
            response = searcher.search_text(TextQuery.parse([image.description]), SearchOptions(k=3))
            first.append(bool(response.results) and Path(response.results[0].path) == image.path.resolve())
            if number in (0, 1, 2, 3):  # print a few in full; the rest only count
                _print_demo_search(image, response.results)
        unseen = [hit for hit, image in zip(first, images) if image.unseen_pair]
        click.echo(f"\nsearching each image's description: the described image came first for {sum(first)} of "
                   f"{len(images)} ({sum(unseen)} of {len(unseen)} with a colour-shape pair never seen in training)")
    finally:
        store.close()
    # The index remembers its model, so neither command needs --model.
    click.echo(f"try: blipsearch search \"a purple triangle\" --index {directory / 'index'}\n"
               f"     blipsearch serve --index {directory / 'index'}", err=True)


def _print_demo_search(image, results) -> None:
    unseen = "  (unseen colour-shape pair)" if image.unseen_pair else ""
    click.echo(f"\nsearch: {image.description!r}{unseen}")
    for rank, result in enumerate(results, 1):
        mark = "<- described image" if Path(result.path) == image.path.resolve() else ""
        click.echo(f"{rank:>3}  {result.score:.3f}  {Path(result.path).name}  caption: {result.caption!r}  {mark}")
