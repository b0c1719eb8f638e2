"""`blipsearch` command line. Heavy libraries (torch, transformers, faiss) load inside the commands
that need them, so `blipsearch --help` answers at once."""

from __future__ import annotations

import errno
import logging
import signal
from pathlib import Path

import click

from api.cli_catalog import export, forget, status
from api.cli_search import calibrate_command, evaluate_command, search
from api.cli_serve import demo, serve
from api.cli_train import train
from api.cli_ray import caption_on_ray, index_on_ray, ray_config, ray_options
from api.signals import GracefulCommand, Terminated
from api.options import (
    best_of, caption_options, emit_json, feature_cache_option, index_model, index_options, index_type_options,
    make_directory, model_options, NumberRange, store_config, warn_changed, warn_missing,
)
from indexer.errors import CatalogConnectionError
from retrieval.errors import BlipsearchError


RESUMABLE = ("index", "caption")  # commit batch by batch: a rerun goes on where they stopped


class BlipsearchGroup(click.Group):
    """Turns the core's typed errors into `Error: ...` on stderr and the error's exit code, Ctrl-C
    and SIGTERM into one line and the shell's exit code for them (130, 143) instead of click's bare
    "Aborted!" or a silent death, and a full disk into one line saying what to do instead of a
    driver's traceback."""

    def invoke(self, ctx: click.Context):
        # psycopg logs what fails while it tears down a broken connection ("error ignored terminating
        # <psycopg.Pipeline [BAD]>: the connection is lost"); the error that follows says it all, once.
        logging.getLogger("psycopg").setLevel(logging.ERROR)
        try:
            return super().invoke(ctx)
        except BlipsearchError as exc:
            click.echo(f"Error: {exc}{_kept(ctx) if isinstance(exc, CatalogConnectionError) else ''}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            said = "Terminated" if terminated else "\nInterrupted"  # after the ^C a terminal shows
            click.echo(f"{said}{_kept(ctx)}.", err=True)
            ctx.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
        except Exception as exc:
            if gpu_out_of_memory(exc):
                click.echo(f"Error: the GPU ran out of memory ({str(exc).splitlines()[0][:200]}); lower --batch-size "
                           f"(for search, --candidates), or run on --device cpu{_kept(ctx)}.", err=True)
                ctx.exit(1)
            if not disk_full(exc):
                raise
            reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:200]  # SQLAlchemy's driver error
            click.echo(f"Error: the disk is full ({reason}); free some space and run the same command again"
                       f"{_kept(ctx)}.", err=True)
            ctx.exit(1)


def _kept(ctx: click.Context) -> str:
    if ctx.invoked_subcommand in RESUMABLE:
        return "; every finished batch is kept, and the same command goes on from there"
    return ""


def gpu_out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA out-of-memory error (a RuntimeError subclass; recognised without importing torch)."""
    return type(exc).__name__ == "OutOfMemoryError" or (isinstance(exc, RuntimeError)
                                                        and "CUDA out of memory" in str(exc))


def disk_full(exc: BaseException) -> bool:
    """Out of space, whichever layer noticed: the OS, SQLite, PostgreSQL or FAISS (by their messages,
    so this edge need not import them)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    return "database or disk is full" in text or "No space left on device" in text


@click.group(cls=BlipsearchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blipsearch")
def main() -> None:
    """Find images by describing them: BLIP-2 retrieval over folders of images."""


# -- models -------------------------------------------------------------------------------------
@main.group()
def models() -> None:
    """Model utilities."""


@models.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True,
              help="Seed of the random weights.")
def make_tiny_command(directory: Path, seed: int) -> None:
    """Write tiny random BLIP-2 checkpoints (retrieval and captioning) to DIRECTORY, to try blipsearch offline.

    Their scores carry no meaning; they exercise the real code paths with the real file layout.
    """
    from retrieval.tiny import make_tiny

    retrieval_dir, caption_dir = make_tiny(make_directory(directory), seed=seed)
    click.echo(f"retrieval model: {retrieval_dir}\ncaption model:   {caption_dir}")


# -- index --------------------------------------------------------------------------------------
@main.command(cls=GracefulCommand)
@click.argument("paths", nargs=-1)
@index_options
@model_options
@click.option("--batch-size", type=click.IntRange(1, 4096), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Decode worker processes [default: the number of CPU cores; the main process mostly waits on them].")
@click.option("--exclude", multiple=True,
              help="Glob of file or directory names/paths to skip (repeatable); kept for later runs.")
@click.option("--no-exclude", is_flag=True, help="Drop the --exclude globs kept from earlier runs.")
@click.option("--follow-symlinks/--no-follow-symlinks", default=None,
              help="Follow symbolic links to files and directories (kept for later runs; default: not).")
@click.option("--max-megapixels", type=NumberRange(0.01, 10_000), default=100.0, show_default=True,
              help="Skip images larger than this (decompression-bomb guard).")
@click.option("--decode-timeout", type=NumberRange(0.1, 3600), default=60.0, show_default=True,
              help="Seconds one file may take to decode before it is skipped.")
@feature_cache_option
@click.option("--caption", "with_captions", is_flag=True,
              help="Also caption images (stage-2 LLM), new ones from the same decoded pixels.")
@caption_options
@index_type_options
@ray_options
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
def index(paths, index_dir, catalog_url, model, device, dtype, batch_size, workers, exclude, no_exclude,
          follow_symlinks, max_megapixels, decode_timeout, feature_cache_mb, with_captions, caption_model, prompt,
          max_new_tokens, num_beams, candidates, index_type, max_index_memory, ray_address, shards_url, ray_model_actors,
          ray_gpus_per_actor, quiet, as_json) -> None:
    """Index the images under PATHS (folders or files): new and changed files are embedded, renamed and
    duplicate files reuse their vectors, files gone from disk are removed. Without PATHS: every
    folder the index was given before."""
    import os
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from api.progress import make_progress
    from indexer.features import FeatureCacheConfig
    from indexer.pipeline import IndexConfig, Indexer
    from indexer.store import IndexStore
    from indexer.walk import resolve_roots
    from indexer.workers import PoolOptions
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever
    from indexer.captions import CaptionConfig, CaptionRun
    from retrieval.captioner import Blip2Captioner, CaptionOptions
    from retrieval.preprocess import peek_transform

    if paths:
        resolve_roots(list(paths))  # fail on a wrong path before loading anything
    caption = CaptionOptions(prompt=prompt, max_new_tokens=max_new_tokens, num_beams=num_beams)
    caption.validate()
    _check_candidates(candidates, ray_address)
    if candidates > 1 and not with_captions:
        raise click.UsageError("--candidates chooses among captions: add --caption")
    max_pixels = int(max_megapixels * 1e6)
    config = IndexConfig(
        batch_size=batch_size,
        pool=PoolOptions(
            workers=workers or os.cpu_count() or 1,
            timeout_s=decode_timeout,
            memory_limit_bytes=max(4 << 30, 16 * max_pixels + (1 << 30)),
        ),
        max_pixels=max_pixels,
        caption=caption if with_captions else None,
    )
    store = IndexStore.open(store_config(index_dir, catalog_url), create=bool(paths))
    # The index's own model unless --model names one, as search and serve do: a cron run without
    # --model on an index built with another model asked for the default one.
    model_config = ModelConfig.retrieval(index_model(store, model), device, dtype)
    try:
        paths = paths or _recorded_roots(store)
        with store.writer_lock(), ThreadPoolExecutor(max_workers=1) as loader:
            config = replace(config, walk=store.choose_walk(tuple(exclude), no_exclude, follow_symlinks))
            if index_type is not None or max_index_memory is not None:
                _choose_index_type(store, index_type or "auto", max_index_memory)
            settings = store.settings()
            if feature_cache_mb is not None:  # kept for later runs, searches and servers
                settings = replace(settings, feature_cache_mb=feature_cache_mb)
                store.save_settings(settings)
            config = replace(config, feature_cache=FeatureCacheConfig(settings.feature_cache_mb * 1_000_000))
            if ray_address is not None:
                ray = ray_config(store, ray_address, shards_url, ray_model_actors, ray_gpus_per_actor, batch_size,
                                 "index")
                summary = index_on_ray(store, model_config, config, ray, paths, make_progress("index", quiet))
                return _print_index_summary(store, summary, with_captions, as_json)
            # The models load in the background while files are walked and decoded; one after the
            # other, since transformers' loading is not thread-safe.
            embedder = loader.submit(Blip2Retriever.load, model_config)
            captioner = None
            if with_captions:
                caption_config = ModelConfig.captioning(caption_model, device, dtype)
                captioner = loader.submit(lambda: best_of(Blip2Captioner.load(caption_config), embedder.result(),
                                                          candidates))
            indexer = Indexer(store, embedder, config, make_progress("index", quiet), peek_transform(model_config.name),
                              captioner)
            summary = indexer.run(paths)
            if with_captions:  # images indexed earlier, or whose captioner needs other pixels
                pool = PoolOptions(workers=config.pool.workers)
                rest = CaptionRun(store, captioner.result(), CaptionConfig(caption, 8, False, pool)).run()
                summary.captioned += rest.captioned
    finally:
        store.close()
    _print_index_summary(store, summary, with_captions, as_json)


def _recorded_roots(store) -> list[str]:
    """`index` without PATHS: every folder (or file) the index was given that is still there."""
    from indexer.walk import recorded_roots

    present, gone = recorded_roots(store.catalog.roots())
    for root in gone:
        click.echo(f"warning: {root} is gone (deleted, or on a drive not mounted); its files stay in the index; "
                   f"blipsearch forget {root} removes them", err=True)
    return present


def _check_candidates(candidates: int, ray_address) -> None:
    """Before any model loads: the count, and that it is not asked of Ray."""
    from retrieval.captioner import check_candidates
    from retrieval.errors import UsageError

    check_candidates(candidates)
    if candidates > 1 and ray_address is not None:
        raise UsageError("--candidates runs in this process; leave out --ray to use it")


def _print_index_summary(store, summary, with_captions: bool, as_json: bool) -> None:
    result = {"index": str(store.directory), **summary.as_dict()}
    if as_json:
        emit_json(result)
    else:
        skipped = ", ".join(f"{n} {reason}" for reason, n in result["skipped_by_reason"].items())
        click.echo(
            f"indexed {result['indexed']}, unchanged {result['unchanged']}, reused {result['reused']}, "
            f"removed {result['removed']}, skipped {result['skipped']}" + (f" ({skipped})" if skipped else "")
            + (f", captioned {result['captioned']}" if with_captions else "")
            + f" in {result['seconds']['total']:.1f} s"
        )
        if result["skipped"]:
            click.echo(f"the skipped files, and why: {_export_skipped_command(store)}", err=True)
    if summary.names_not_utf8:
        click.echo(f"warning: {len(summary.names_not_utf8)} file(s) not indexed, because their names are not valid "
                   "UTF-8 and the catalog keeps names as UTF-8 text; rename them (for example with convmv): "
                   + _first_few(summary.names_not_utf8), err=True)
    if summary.paths_too_long:
        from indexer.walk import MAX_PATH_BYTES

        click.echo(f"warning: {len(summary.paths_too_long)} file(s) not indexed, because their paths are longer than "
                   f"the {MAX_PATH_BYTES} bytes a PostgreSQL catalog keeps; move them higher up: "
                   + _first_few([path[:120] + "..." for path in summary.paths_too_long]), err=True)
    if summary.unreadable:
        click.echo(f"warning: could not read {len(summary.unreadable)} folder(s) or file(s); what was indexed there "
                   "is kept until they can be read: " + _first_few(summary.unreadable), err=True)
    for root in summary.roots_found_empty:
        click.echo(f"warning: {root} is empty, but files were indexed there (an unmounted drive?); they are kept: "
                   f"blipsearch forget {root} removes them", err=True)
    if summary.links_not_followed:
        click.echo(f"note: {summary.links_not_followed} symbolic link(s) to files or folders were not followed; "
                   "--follow-symlinks indexes what they point to", err=True)


def _export_skipped_command(store) -> str:
    """The command that lists the index's skipped files (a catalog URL's password hidden)."""
    import shlex

    from sqlalchemy.engine import make_url

    command = ["blipsearch", "export", "--index", str(store.directory)]
    if store.config.catalog_url:
        command += ["--catalog-url", make_url(store.config.catalog_url).render_as_string(hide_password=True)]
    return shlex.join(command + ["--status", "skipped"])


def _first_few(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _choose_index_type(store, index_type: str, max_memory: int | None) -> None:
    """Record the index type for this and later runs, checked against the collection when it has a model."""
    from dataclasses import replace

    settings = replace(store.settings(), index_type=index_type, max_memory=max_memory)
    settings.validate()
    identity = store.catalog.model()
    if identity is not None:
        settings.spec_for(len(store.catalog.embedding_ids()), identity.num_queries, identity.embed_dim)
    store.save_settings(settings)


# -- caption ----------------------------------------------------------------------------------
@main.command(cls=GracefulCommand)
@index_options
@caption_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Where the model runs.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default=None)
@click.option("--batch-size", type=click.IntRange(1, 1024), default=8, show_default=True)
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Decode worker processes [default: CPU cores].")
@click.option("--model", default=None,
              help="With --candidates: the retrieval model that chooses [default: the one the index was built with].")
@click.option("--overwrite", is_flag=True, help="Re-caption images captioned by another model or prompt.")
@ray_options
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
def caption(index_dir, catalog_url, caption_model, prompt, max_new_tokens, num_beams, candidates, model, device,
            dtype, batch_size, workers, overwrite, ray_address, shards_url, ray_model_actors, ray_gpus_per_actor, quiet,
            as_json) -> None:
    """Write a caption for every indexed image that has none, with BLIP-2's stage-2 LLM."""
    import os

    from api.progress import make_progress
    from indexer.captions import CaptionConfig, CaptionRun
    from indexer.store import IndexStore
    from indexer.workers import PoolOptions
    from retrieval.captioner import Blip2Captioner, CaptionOptions
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    options = CaptionOptions(prompt=prompt, max_new_tokens=max_new_tokens, num_beams=num_beams)
    options.validate()
    _check_candidates(candidates, ray_address)
    config = CaptionConfig(options, batch_size, overwrite, PoolOptions(workers=workers or os.cpu_count() or 1))
    store = IndexStore.open(store_config(index_dir, catalog_url))
    try:
        with store.writer_lock():
            model_config = ModelConfig.captioning(caption_model, device, dtype)
            if ray_address is not None:
                ray = ray_config(store, ray_address, shards_url, ray_model_actors, ray_gpus_per_actor, batch_size,
                                 "captions")
                summary = caption_on_ray(store, model_config, config, ray, make_progress("caption", quiet))
            else:
                captioner = Blip2Captioner.load(model_config)
                if candidates > 1:  # the index's own retrieval model chooses, unless --model names another
                    retriever = Blip2Retriever.load(ModelConfig.retrieval(index_model(store, model), device, dtype))
                    captioner = best_of(captioner, retriever, candidates)
                summary = CaptionRun(store, captioner, config, make_progress("caption", quiet)).run()
    finally:
        store.close()
    result = {"index": str(store.directory), **summary.as_dict()}
    if as_json:
        emit_json(result)
        return
    warn_missing(summary.missing, "not captioned")
    warn_changed(summary.changed, "not captioned")
    failed = ", ".join(f"{n} {reason}" for reason, n in result["failed_by_reason"].items())
    changed = f", changed {result['changed']}" if result["changed"] else ""
    click.echo(f"captioned {result['captioned']}, missing {result['missing']}{changed}, failed {result['failed']}"
               + (f" ({failed})" if failed else "") + f" in {result['seconds']['total']:.1f} s")


for command in (search, evaluate_command, calibrate_command, forget, export, status, serve, demo, train):
    main.add_command(command)


if __name__ == "__main__":
    main()
