"""`--ray`: the `index` and `caption` commands' runs on a Ray cluster (indexer/ray_index.py)."""

from __future__ import annotations

from pathlib import Path

import click

from api.options import NumberRange
from retrieval.errors import UsageError


def ray_options(func):
    func = click.option("--ray-gpus-per-actor", type=NumberRange(0, 64), default=None,
                        help="GPUs per model actor with --ray [default: 1 when the cluster has GPUs, else 0].")(func)
    func = click.option("--ray-model-actors", type=click.IntRange(1, 10_000), default=1, show_default=True,
                        help="Model actors (one model copy each) with --ray.")(func)
    func = click.option("--shards", "shards_url", default=None, metavar="URL",
                        help="Where --ray workers write shards: a path every node sees or an fsspec URL "
                             "(s3://bucket/run, gs://...) [default: INDEX/shards].")(func)
    return click.option(
        "--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
        help="Run on Ray: alone, a local Ray on this machine; --ray=auto or --ray=ray://head:10001 joins a "
             "cluster. Decoding runs on CPU actors, the model on model actors.",
    )(func)


def ray_config(store, ray_address: str, shards_url: str | None, model_actors: int, gpus: float | None,
               batch_size: int, part: str):
    from indexer.ray_index import RayConfig

    url = shards_url.rstrip("/") + f"/{part}" if shards_url else str(Path(store.directory) / "shards" / part)
    return RayConfig(address=None if ray_address == "local" else ray_address, shards_url=url,
                     model_actors=model_actors, gpus_per_model_actor=gpus, batch_size=batch_size)


def transform_of(model_config, load):
    """The model's image transform from its processor file, or from loading it (`load`) if that fails."""
    from retrieval.preprocess import peek_transform

    return peek_transform(model_config.name) or load(model_config).transform


def index_on_ray(store, model_config, config, ray, paths, progress):
    from indexer.ray_index import RayIndexRun
    from retrieval.encoders import Blip2Retriever

    if config.caption is not None:
        raise UsageError("--caption does not combine with --ray; run `blipsearch caption --ray` afterwards")
    transform = transform_of(model_config, Blip2Retriever.load)
    return RayIndexRun(store, model_config, config, ray, transform, progress).run(paths)


def caption_on_ray(store, model_config, config, ray, progress):
    from indexer.ray_index import RayCaptionRun
    from retrieval.captioner import Blip2Captioner

    transform = transform_of(model_config, Blip2Captioner.load)
    return RayCaptionRun(store, model_config, config, ray, transform, progress).run()
