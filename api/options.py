"""Options and helpers shared by the command-line modules."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import click


class NumberRange(click.FloatRange):
    """click.FloatRange, but refusing nan, which passes every range check (its comparisons are all
    false): `--decode-timeout nan` skipped every file as timed out."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


def make_directory(directory: Path) -> Path:
    """`directory`, created if need be; one clear error where it cannot be (a file in its path, a
    missing mount, no permission)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(f"cannot write to {directory}: {exc.strerror or exc}") from None
    return directory


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
                        help="Retrieval model: hub id or local directory (default: the one the index was built "
                             "with; for a new index Salesforce/blip2-itm-vit-g). Env: BLIPSEARCH_MODEL.")(func)


def caption_options(func):
    func = click.option(
        "--candidates", type=int, default=1, show_default=True,
        help="Write this many captions per image (the beam search's best) and keep the one the retrieval "
             "model's ITC ranks first (1: the caption model's own first choice).")(func)
    func = click.option("--num-beams", type=int, default=1, show_default=True, help="Beam search width (1: greedy).")(func)
    func = click.option("--max-new-tokens", type=int, default=30, show_default=True, help="Longest caption, in tokens.")(func)
    func = click.option("--prompt", default="", help='Text the caption continues, e.g. "a photo of" (kept in the catalog).')(func)
    return click.option("--caption-model", default=None,
                        help="Captioning model: hub id or directory (default Salesforce/blip2-opt-2.7b). "
                             "Env: BLIPSEARCH_CAPTION_MODEL.")(func)


def best_of(captioner, retriever, candidates: int):
    """The captioner itself, or with `candidates` > 1 one that keeps the best of that many by ITC."""
    from retrieval.best_caption import BestOfCaptions

    return BestOfCaptions(captioner, retriever, candidates) if candidates > 1 else captioner


def index_model(store, model: str | None) -> str | None:
    """The retrieval model to use on `store`: `model` when given, else the one the index was built with
    (None for an index not built yet: the default model)."""
    recorded = store.catalog.model()
    return model or (recorded.name if recorded else None)


def feature_cache_option(func):
    return click.option(
        "--feature-cache-mb", type=click.IntRange(0, 10_000_000), default=None, envvar="BLIPSEARCH_FEATURE_CACHE_MB",
        help="Keep up to this many MB of fp16 ViT features in the index directory, so re-ranking a known "
             "image skips decoding and the ViT (0: off). Given to index, it is kept for later runs, searches "
             "and servers; default: as kept, else 0. Env: BLIPSEARCH_FEATURE_CACHE_MB.",
    )(func)


def feature_cache(store, identity, megabytes: int | None):
    """The index's feature cache for a search or server: `megabytes` for this run, else (None) as kept."""
    from indexer.features import FeatureCache, FeatureCacheConfig

    if megabytes is None:
        megabytes = store.settings().feature_cache_mb
    return FeatureCache.for_model(store.directory, identity.fingerprint, FeatureCacheConfig(megabytes * 1_000_000))


def absolute_glob(glob: str | None) -> str | None:
    """A `--path` glob as the catalog's absolute paths can match it: `vacation/*` matched nothing,
    silently; a relative glob is taken from the current folder, one starting with * matches anywhere,
    and a folder means the files under it (`path_glob.folder_files`)."""
    from indexer.path_glob import anchored, folder_files

    if glob is None:
        return None
    if not anchored(glob):
        folder = glob.endswith("/")
        glob = os.path.normpath(os.path.join(os.getcwd(), os.path.expanduser(glob)))  # ../photos/* too
        glob += "/" if folder and glob != "/" else ""  # normpath drops it
    return folder_files(glob)


def store_config(index_dir: Path | None, catalog_url: str | None):
    from indexer.store import StoreConfig, default_index_dir

    # Absolute (not resolved: a symlinked folder keeps the user's name), so that --json, status and the
    # serve line name the index wherever they are read, not relative to where the command ran.
    directory = Path(os.path.abspath((index_dir or default_index_dir()).expanduser()))
    return StoreConfig(directory=directory, catalog_url=catalog_url)


SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
              "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


class ByteSize(click.ParamType):
    """A memory size: `4GiB`, `500MB`, `2g`, or plain bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        import re

        if isinstance(value, int):
            return value
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = found and found.group(2).lower()
        if not found or unit not in SIZE_UNITS or float(found.group(1)) <= 0:
            self.fail(f"{value!r} is not a size like 4GiB, 500MB or 1000000", param, ctx)
        return int(float(found.group(1)) * SIZE_UNITS[unit])


def index_type_options(func):
    func = click.option(
        "--max-index-memory", type=ByteSize(), default=None,
        help="Memory the FAISS index may use (e.g. 8GiB). Alone, it picks the index type: exact flat fp16, "
             "else SQ8, else IVF-PQ with the largest code that fits.",
    )(func)
    return click.option(
        "--index-type", default=None, metavar="TYPE",
        help="FAISS index: flat-fp16 (default, exact), flat-fp32, sq8, ivf-flat, ivf-pq, hnsw, or auto; options "
             "as TYPE:key=value,... (nlist, m, opq, nprobe, hnsw_m, ef_search). Kept for later runs.",
    )(func)


def emit_json(payload) -> None:
    click.echo(json.dumps(payload, indent=None, ensure_ascii=False))


def warn_missing(missing: list[str], consequence: str) -> None:
    """A few of the files gone from disk, and how to drop them, rather than a line for each: a
    deleted folder can make every one of them gone."""
    _warn_files(missing, "was indexed but is gone from disk", consequence, "gone from disk",
                "blipsearch index drops files deleted from the folders it was given; blipsearch forget FOLDER "
                "drops a folder that is gone")


def warn_changed(changed: list[str], consequence: str) -> None:
    """As `warn_missing`, for files that hold other content than was indexed (edited, replaced)."""
    _warn_files(changed, "has changed since it was indexed", consequence, "changed",
                "blipsearch index FOLDER reads changed files again")


def _warn_files(paths: list[str], what: str, consequence: str, more: str, hint: str, shown: int = 3) -> None:
    for path in paths[:shown]:
        click.echo(f"warning: {path} {what}; {consequence}", err=True)
    if len(paths) > shown:
        click.echo(f"warning: and {len(paths) - shown} more {more}", err=True)
    if paths:
        click.echo(f"({hint})", err=True)
