"""`blipsearch` command line. Heavy libraries (torch, transformers, faiss) load inside the commands
that need them, so `blipsearch --help` answers at once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from retrieval.errors import BlipsearchError


class BlipsearchGroup(click.Group):
    """Turns the core's typed errors into `Error: ...` on stderr and the error's exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BlipsearchError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=BlipsearchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blipsearch")
def main() -> None:
    """Find images by describing them: BLIP-2 retrieval over folders of images."""


# -- shared options -----------------------------------------------------------------------------
def index_options(func):
    func = click.option(
        "--catalog-url", default=None, envvar="BLIPSEARCH_CATALOG_URL",
        help="SQLAlchemy URL of the catalog (e.g. postgresql+psycopg://host/db); default SQLite inside --index.",
    )(func)
    return click.option(
        "--index", "index_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Index directory (catalog, vectors, lock). Default: $BLIPSEARCH_INDEX or a per-user data directory.",
    )(func)


def model_options(func):
    func = click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default=None,
                        help="Model precision; auto: float16 on GPU, float32 on CPU.")(func)
    func = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                        help="Where the model runs; auto: CUDA when present. Env: BLIPSEARCH_DEVICE.")(func)
    return click.option("--model", default=None,
                        help="Retrieval model: hub id or local directory (default Salesforce/blip2-itm-vit-g). "
                             "Env: BLIPSEARCH_MODEL.")(func)


def caption_options(func):
    func = click.option("--num-beams", type=int, default=1, show_default=True, help="Beam search width (1: greedy).")(func)
    func = click.option("--max-new-tokens", type=int, default=30, show_default=True, help="Longest caption, in tokens.")(func)
    func = click.option("--prompt", default="", help='Text the caption continues, e.g. "a photo of" (kept in the catalog).')(func)
    return click.option("--caption-model", default=None,
                        help="Captioning model: hub id or directory (default Salesforce/blip2-opt-2.7b). "
                             "Env: BLIPSEARCH_CAPTION_MODEL.")(func)


def feature_cache_option(func):
    return click.option(
        "--feature-cache-mb", type=click.IntRange(0, 10_000_000), default=0, envvar="BLIPSEARCH_FEATURE_CACHE_MB",
        show_default=True,
        help="Keep up to this many MB of fp16 ViT features in the index directory, so re-ranking a known "
             "image skips decoding and the ViT (0: off). Env: BLIPSEARCH_FEATURE_CACHE_MB.",
    )(func)


def _feature_cache(store, identity, megabytes: int):
    from indexer.features import FeatureCache, FeatureCacheConfig

    return FeatureCache.for_model(store.directory, identity.fingerprint, FeatureCacheConfig(megabytes * 1_000_000))


def _store_config(index_dir: Path | None, catalog_url: str | None):
    from indexer.store import StoreConfig, default_index_dir

    return StoreConfig(directory=(index_dir or default_index_dir()).expanduser(), catalog_url=catalog_url)


def _emit_json(payload) -> None:
    click.echo(json.dumps(payload, indent=None, ensure_ascii=False))


# -- models -------------------------------------------------------------------------------------
@main.group()
def models() -> None:
    """Model utilities."""


@models.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
def make_tiny_command(directory: Path, seed: int) -> None:
    """Write tiny random BLIP-2 checkpoints (retrieval and captioning) to DIRECTORY, to try blipsearch offline.

    Their scores carry no meaning; they exercise the real code paths with the real file layout.
    """
    from retrieval.tiny import make_tiny

    retrieval_dir, caption_dir = make_tiny(directory, seed=seed)
    click.echo(f"retrieval model: {retrieval_dir}\ncaption model:   {caption_dir}")


# -- index --------------------------------------------------------------------------------------
@main.command()
@click.argument("paths", nargs=-1, required=True)
@index_options
@model_options
@click.option("--batch-size", type=click.IntRange(1, 4096), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Decode worker processes [default: the number of CPU cores; the main process mostly waits on them].")
@click.option("--exclude", multiple=True, help="Glob of file or directory names/paths to skip (repeatable).")
@click.option("--follow-symlinks", is_flag=True, help="Follow symbolic links to files and directories.")
@click.option("--max-megapixels", type=click.FloatRange(0.01, 10_000), default=100.0, show_default=True,
              help="Skip images larger than this (decompression-bomb guard).")
@click.option("--decode-timeout", type=click.FloatRange(0.1, 3600), default=60.0, show_default=True,
              help="Seconds one file may take to decode before it is skipped.")
@feature_cache_option
@click.option("--caption", "with_captions", is_flag=True,
              help="Also caption images (stage-2 LLM), new ones from the same decoded pixels.")
@caption_options
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
def index(paths, index_dir, catalog_url, model, device, dtype, batch_size, workers, exclude, follow_symlinks,
          max_megapixels, decode_timeout, feature_cache_mb, with_captions, caption_model, prompt, max_new_tokens,
          num_beams, quiet, as_json) -> None:
    """Index the images under PATHS (folders or files): new and changed files are embedded, renamed and
    duplicate files reuse their vectors, files gone from disk are removed."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from api.progress import make_progress
    from indexer.features import FeatureCacheConfig
    from indexer.pipeline import IndexConfig, Indexer
    from indexer.store import IndexStore
    from indexer.walk import WalkOptions, resolve_roots
    from indexer.workers import PoolOptions
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever
    from indexer.captions import CaptionConfig, CaptionRun
    from retrieval.captioner import Blip2Captioner, CaptionOptions
    from retrieval.preprocess import peek_transform

    resolve_roots(list(paths))  # fail on a wrong path before loading anything
    caption = CaptionOptions(prompt=prompt, max_new_tokens=max_new_tokens, num_beams=num_beams)
    caption.validate()
    max_pixels = int(max_megapixels * 1e6)
    config = IndexConfig(
        batch_size=batch_size,
        walk=WalkOptions(excludes=tuple(exclude), follow_symlinks=follow_symlinks),
        pool=PoolOptions(
            workers=workers or os.cpu_count() or 1,
            timeout_s=decode_timeout,
            memory_limit_bytes=max(4 << 30, 16 * max_pixels + (1 << 30)),
        ),
        max_pixels=max_pixels,
        feature_cache=FeatureCacheConfig(feature_cache_mb * 1_000_000),
        caption=caption if with_captions else None,
    )
    store = IndexStore.open(_store_config(index_dir, catalog_url), create=True)
    model_config = ModelConfig.retrieval(model, device, dtype)
    try:
        with store.writer_lock(), ThreadPoolExecutor(max_workers=1) as loader:
            # The models load in the background while files are walked and decoded; one after the
            # other, since transformers' loading is not thread-safe.
            embedder = loader.submit(Blip2Retriever.load, model_config)
            captioner = None
            if with_captions:
                captioner = loader.submit(Blip2Captioner.load, ModelConfig.captioning(caption_model, device, dtype))
            indexer = Indexer(store, embedder, config, make_progress("index", quiet), peek_transform(model_config.name),
                              captioner)
            summary = indexer.run(paths)
            if with_captions:  # images indexed earlier, or whose captioner needs other pixels
                pool = PoolOptions(workers=config.pool.workers)
                rest = CaptionRun(store, captioner.result(), CaptionConfig(caption, 8, False, pool)).run()
                summary.captioned += rest.captioned
    finally:
        store.close()
    result = {"index": str(store.directory), **summary.as_dict()}
    if as_json:
        _emit_json(result)
    else:
        skipped = ", ".join(f"{n} {reason}" for reason, n in result["skipped_by_reason"].items())
        click.echo(
            f"indexed {result['indexed']}, unchanged {result['unchanged']}, reused {result['reused']}, "
            f"removed {result['removed']}, skipped {result['skipped']}" + (f" ({skipped})" if skipped else "")
            + (f", captioned {result['captioned']}" if with_captions else "")
            + f" in {result['seconds']['total']:.1f} s"
        )


# -- caption ----------------------------------------------------------------------------------
@main.command()
@index_options
@caption_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Where the model runs.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default=None)
@click.option("--batch-size", type=click.IntRange(1, 1024), default=8, show_default=True)
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Decode worker processes [default: CPU cores].")
@click.option("--overwrite", is_flag=True, help="Re-caption images captioned by another model or prompt.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
def caption(index_dir, catalog_url, caption_model, prompt, max_new_tokens, num_beams, device, dtype, batch_size,
            workers, overwrite, quiet, as_json) -> None:
    """Write a caption for every indexed image that has none, with BLIP-2's stage-2 LLM."""
    import os

    from api.progress import make_progress
    from indexer.captions import CaptionConfig, CaptionRun
    from indexer.store import IndexStore
    from indexer.workers import PoolOptions
    from retrieval.captioner import Blip2Captioner, CaptionOptions
    from retrieval.config import ModelConfig

    options = CaptionOptions(prompt=prompt, max_new_tokens=max_new_tokens, num_beams=num_beams)
    options.validate()
    config = CaptionConfig(options, batch_size, overwrite, PoolOptions(workers=workers or os.cpu_count() or 1))
    store = IndexStore.open(_store_config(index_dir, catalog_url))
    try:
        with store.writer_lock():
            captioner = Blip2Captioner.load(ModelConfig.captioning(caption_model, device, dtype))
            summary = CaptionRun(store, captioner, config, make_progress("caption", quiet)).run()
    finally:
        store.close()
    result = {"index": str(store.directory), **summary.as_dict()}
    if as_json:
        _emit_json(result)
        return
    for path in summary.missing[:20]:
        click.echo(f"warning: {path} was indexed but is gone from disk; not captioned", err=True)
    failed = ", ".join(f"{n} {reason}" for reason, n in result["failed_by_reason"].items())
    click.echo(f"captioned {result['captioned']}, missing {result['missing']}, failed {result['failed']}"
               + (f" ({failed})" if failed else "") + f" in {result['seconds']['total']:.1f} s")


# -- export / status ----------------------------------------------------------------------------
@main.command()
@index_options
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "parquet"]), default="jsonl", show_default=True,
              help="parquet needs the parquet extra (pyarrow) and -o.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write (default stdout).")
def export(index_dir, catalog_url, fmt, output) -> None:
    """Write one row per file in the catalog: path, status, error, size, mtime, hash, width, height,
    format, and the caption with its model, prompt and time."""
    from indexer.export import records, write_parquet, write_text
    from indexer.store import IndexStore
    from retrieval.errors import UsageError

    if fmt == "parquet" and output is None:
        raise UsageError("Parquet is binary: give a file with -o FILE")
    store = IndexStore.open(_store_config(index_dir, catalog_url))
    try:
        if output is None:
            write_text(records(store.catalog), sys.stdout, fmt)
            return
        tmp = output.with_name(output.name + ".tmp")
        if fmt == "parquet":
            count = write_parquet(records(store.catalog), tmp)
        else:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                count = write_text(records(store.catalog), handle, fmt)
        tmp.replace(output)
    finally:
        store.close()
    click.echo(f"wrote {count} rows to {output}", err=True)


@main.command()
@index_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(index_dir, catalog_url, as_json) -> None:
    """Summarise an index: model, counts, size on disk."""
    from indexer.store import IndexStore

    store = IndexStore.open(_store_config(index_dir, catalog_url))
    try:
        identity = store.catalog.model()
        result = {
            "index": str(store.directory),
            "model": identity.name if identity else None,
            "model_fingerprint": identity.fingerprint if identity else None,
            "embed_dim": identity.embed_dim if identity else None,
            "num_queries": identity.num_queries if identity else None,
            **store.catalog.counts(),
            "bytes_on_disk": store.disk_bytes(),
        }
    finally:
        store.close()
    if as_json:
        _emit_json(result)
    else:
        for key, value in result.items():
            click.echo(f"{key}: {value}")


# -- search -------------------------------------------------------------------------------------
@main.command()
@click.argument("texts", nargs=-1)
@index_options
@model_options
@click.option("-k", "k", type=int, default=10, show_default=True, help="Number of results.")
@click.option("--candidates", type=int, default=None, help="ITC candidates to re-rank [default: max(32, k)].")
@click.option("--no-rerank", is_flag=True, help="Rank by ITC alone (no ITM head).")
@click.option("--score", type=click.Choice(["itm", "itm+itc", "itc"]), default=None,
              help="Final score: ITM match probability (default), ITM logit + ITC as LAVIS ranks, or ITC.")
@click.option("--min-score", type=float, default=None, help="Drop results scoring below this.")
@click.option("--path", "path_glob", default=None, help="Only files whose path matches this glob.")
@click.option("--not", "negatives", multiple=True, help="Push results away from this text (repeatable).")
@click.option("--image", "image_path", type=click.Path(dir_okay=False), default=None,
              help="Search by an example image instead of text.")
@click.option("--hybrid", is_flag=True,
              help="Blend the visual ranking with a full-text match on captions (reciprocal rank fusion).")
@click.option("--caption-only", is_flag=True, help="Full-text search over captions alone (no model is loaded).")
@feature_cache_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def search(texts, index_dir, catalog_url, model, device, dtype, k, candidates, no_rerank, score, min_score,
           path_glob, negatives, image_path, hybrid, caption_only, feature_cache_mb, as_json) -> None:
    """Find indexed images matching TEXTS.

    Several texts add up (rclip-style query arithmetic); give a text a weight as WEIGHT:TEXT, e.g.
    blipsearch search "2:a red car" "at night" --not "rain".
    """
    from indexer.search import SearchOptions
    from retrieval.errors import UsageError
    from retrieval.query import TextQuery

    if bool(texts) == bool(image_path):
        raise UsageError("give either query TEXTS or --image FILE")
    if caption_only and (image_path or hybrid or negatives):
        raise UsageError("--caption-only searches caption text; it takes no --image, --hybrid or --not")
    if hybrid and image_path:
        raise UsageError("--hybrid blends text with captions; it does not apply to --image")
    options = SearchOptions(
        k=k, candidates=candidates, rerank=not no_rerank and not image_path and not caption_only,
        score=score or ("itc" if no_rerank or image_path or caption_only else "itm"),
        min_score=min_score, path_glob=path_glob, hybrid=hybrid,
    )
    options.validate()
    if caption_only:
        _print_search(" ".join(texts), _caption_search(index_dir, catalog_url, " ".join(texts), options), as_json)
        return
    query = TextQuery.parse(list(texts), list(negatives)) if texts else None
    response, label = _run_search(
        index_dir, catalog_url, model, device, dtype, query, image_path, options, feature_cache_mb
    )
    _print_search(label, response, as_json)


def _caption_search(index_dir, catalog_url, text, options):
    from indexer.search import search_captions
    from indexer.store import IndexStore

    store = IndexStore.open(_store_config(index_dir, catalog_url))
    try:
        return search_captions(store.catalog, text, options)
    finally:
        store.close()


def _run_search(index_dir, catalog_url, model, device, dtype, query, image_path, options, feature_cache_mb):
    from indexer.rerank import Reranker
    from indexer.search import Searcher
    from indexer.store import IndexStore
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    store = IndexStore.open(_store_config(index_dir, catalog_url))
    try:
        recorded = store.catalog.model()
        name = model or (recorded.name if recorded else None)
        retriever = Blip2Retriever.load(ModelConfig.retrieval(name, device, dtype))
        reranker = Reranker(retriever, _feature_cache(store, retriever.identity, feature_cache_mb))
        searcher = Searcher(store, retriever, reranker)
        if query is not None:
            return searcher.search_text(query, options), " + ".join(query.texts)
        return searcher.search_image(image_path, options), image_path
    finally:
        store.close()


def _print_search(label, response, as_json: bool) -> None:
    from dataclasses import asdict

    if as_json:
        results = [{k: v for k, v in asdict(r).items() if k not in ("file_id", "embedding_id")} for r in response.results]
        _emit_json({"query": label, "results": results, "missing": response.missing})
        return
    for path in response.missing:
        click.echo(f"warning: {path} was indexed but is gone from disk; skipped", err=True)
    if not response.results:
        click.echo("no results", err=True)
    for rank, result in enumerate(response.results, 1):
        caption = f"  {result.caption}" if result.caption else ""
        click.echo(f"{rank:>3}  {result.score:.4f}  {result.path}{caption}")


# -- serve --------------------------------------------------------------------------------------
@main.command()
@index_options
@model_options
@click.option("--caption-model", default=None, help="Captioning model for caption jobs (loaded on first use).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (localhost only by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@feature_cache_option
@click.option("--max-upload-mb", type=click.IntRange(1, 1000), default=20, show_default=True)
def serve(index_dir, catalog_url, model, device, dtype, caption_model, host, port, feature_cache_mb,
          max_upload_mb) -> None:
    """Serve the index over HTTP: a JSON API (OpenAPI at /docs) and a search page at /.

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
    store_config = _store_config(index_dir, catalog_url)
    store = IndexStore.open(store_config, create=True)
    try:
        recorded = store.catalog.model()
    finally:
        store.close()
    retriever = Blip2Retriever.load(ModelConfig.retrieval(model or (recorded.name if recorded else None), device, dtype))
    config = ServeConfig(store_config, model, caption_model, device, token, max_upload_mb * 1024 * 1024, feature_cache_mb)
    service = Service(config, retriever, lambda: Blip2Captioner.load(ModelConfig.captioning(caption_model, device, dtype)))
    click.echo(f"blipsearch: serving {store_config.directory} on http://{host}:{port}/", err=True)
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
    finally:
        service.close()


# -- demo ---------------------------------------------------------------------------------------
@main.command()
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


if __name__ == "__main__":
    main()
