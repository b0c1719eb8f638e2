"""Options and helpers shared by the command-line modules."""

from __future__ import annotations

import json
from pathlib import Path

import click

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


def feature_cache(store, identity, megabytes: int):
    from indexer.features import FeatureCache, FeatureCacheConfig

    return FeatureCache.for_model(store.directory, identity.fingerprint, FeatureCacheConfig(megabytes * 1_000_000))


def store_config(index_dir: Path | None, catalog_url: str | None):
    from indexer.store import StoreConfig, default_index_dir

    return StoreConfig(directory=(index_dir or default_index_dir()).expanduser(), catalog_url=catalog_url)


def emit_json(payload) -> None:
    click.echo(json.dumps(payload, indent=None, ensure_ascii=False))
