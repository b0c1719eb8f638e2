"""`blipsearch search`: text, example-image and caption queries from the command line."""

from __future__ import annotations

import click

from api.options import (
    absolute_glob, emit_json, feature_cache, feature_cache_option, index_model, index_options, model_options,
    store_config, warn_changed, warn_missing,
)


@click.command()
@click.argument("texts", nargs=-1)
@index_options
@model_options
@click.option("-k", "k", type=int, default=10, show_default=True, help="Number of results.")
@click.option("--candidates", type=int, default=None, help="ITC candidates to re-rank [default: max(32, k)].")
@click.option("--no-rerank", is_flag=True, help="Rank by ITC alone (no ITM head).")
@click.option("--score", type=click.Choice(["itm", "itm+itc", "itc"]), default=None,
              help="Final score: ITM match probability, ITM + ITC (as the model's calibrated fusion weighs them, "
                   "else ITM logit + ITC as LAVIS ranks), or ITC [default: itm+itc for a calibrated model, else itm].")
@click.option("--min-score", type=float, default=None, help="Drop results scoring below this.")
@click.option("--path", "path_glob", default=None,
              help="Only files under this folder, or whose full path matches this glob; a relative one is "
                   "taken from the current folder ('vacation', 'vacation/*.png'), one starting with * matches "
                   "anywhere ('*2019*').")
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
    if image_path and negatives:  # not silently dropped
        raise UsageError("--not subtracts texts from a text query; it does not apply to --image")
    if (image_path or caption_only) and score not in (None, "itc"):  # ITM needs a text to judge
        raise UsageError(f"--score {score} re-ranks a text query by ITM; "
                         + ("--image searches by ITC alone" if image_path else "--caption-only ranks by caption text"))
    options = SearchOptions(
        k=k, candidates=candidates, rerank=not no_rerank and not image_path and not caption_only,
        score=score,
        min_score=min_score, path_glob=absolute_glob(path_glob), hybrid=hybrid,
    )
    options.validate()
    if caption_only:
        response, hint = _caption_search(index_dir, catalog_url, " ".join(texts), options)
        _print_search(" ".join(texts), response, as_json, hint)
        return
    query = TextQuery.parse(list(texts), list(negatives)) if texts else None
    response, label, hint = _run_search(
        index_dir, catalog_url, model, device, dtype, query, image_path, options, feature_cache_mb
    )
    _print_search(label, response, as_json, hint)


def _caption_search(index_dir, catalog_url, text, options):
    from indexer.search import search_captions
    from indexer.store import IndexStore

    store = IndexStore.open(store_config(index_dir, catalog_url))
    try:
        response = search_captions(store.catalog, text, options)
        return response, _why_none(store, response, options)
    finally:
        store.close()


def _why_none(store, response, options) -> str | None:
    """For a search that found nothing within a --path: whether that is because no indexed file is
    there (a mistyped folder, one never indexed), where the catalog can tell within half a second."""
    if response.results or not options.path_glob:
        return None
    if store.catalog.listing.count_matching(status="indexed", path_glob=options.path_glob, within_s=0.5) == 0:
        return f"no results: no indexed file is under or matches --path {options.path_glob}"
    return None


def _run_search(index_dir, catalog_url, model, device, dtype, query, image_path, options, feature_cache_mb):
    from indexer.rerank import Reranker
    from indexer.search import Searcher, indexed_content
    from indexer.store import IndexStore
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    store = IndexStore.open(store_config(index_dir, catalog_url))
    try:
        if image_path is not None and model is None and (content := indexed_content(store.catalog, image_path)):
            # An image the index holds: its vectors are in the catalog, and the model need not load.
            response = Searcher(store, None).search_stored(content, options)
            return response, image_path, _why_none(store, response, options)
        retriever = Blip2Retriever.load(ModelConfig.retrieval(index_model(store, model), device, dtype))
        reranker = Reranker(retriever, feature_cache(store, retriever.identity, feature_cache_mb))
        searcher = Searcher(store, retriever, reranker)
        if query is not None:
            response, label = searcher.search_text(query, options), " + ".join(query.texts)
        else:
            response, label = searcher.search_image(image_path, options), image_path
        if reranker.cache and reranker.cache.write_error:
            click.echo(f"warning: cannot write the feature cache in {reranker.cache.directory} "
                       f"({reranker.cache.write_error}); searched without caching", err=True)
        slow_rerank_note(reranker, store.directory)
        return response, label, _why_none(store, response, options)
    finally:
        store.close()


SLOW_RERANK_S = 10.0  # re-ranking that spent longer decoding files and running the ViT gets a note


def slow_rerank_note(reranker, index_dir) -> None:
    """Where re-ranking spent long recomputing ViT features without a feature cache (ViT-g on a
    CPU: seconds an image), say how to keep them; searches after that reuse what they compute."""
    if reranker.cache is None and reranker.recompute_seconds > SLOW_RERANK_S:
        click.echo(f"note: re-ranking decoded {reranker.recomputed} images and ran the ViT on them "
                   f"({reranker.recompute_seconds:.0f} s); a feature cache keeps what searches compute for the "
                   f"next ones: blipsearch index --index {index_dir} --feature-cache-mb MB (about 0.7 MB an "
                   f"image for ViT-g); --candidates fewer, or --no-rerank, are faster", err=True)


def _print_search(label, response, as_json: bool, hint: str | None = None) -> None:
    from dataclasses import asdict

    if as_json:
        results = [{k: v for k, v in asdict(r).items() if k not in ("file_id", "embedding_id")} for r in response.results]
        emit_json({"query": label, "results": results, "missing": response.missing, "changed": response.changed})
        return
    warn_missing(response.missing, "skipped")
    warn_changed(response.changed, "skipped")
    if not response.results:
        click.echo(hint or "no results", err=True)
    for rank, result in enumerate(response.results, 1):
        caption = f"  {result.caption}" if result.caption else ""
        click.echo(f"{rank:>3}  {result.score:.4f}  {result.path}{caption}")


def _pairs_command(name: str, pairs_help: str, candidates_help: str):
    """A command over captioned pairs and a retrieval model, as `eval` and `calibrate` are."""
    def decorate(function):
        for option in reversed((
            click.command(name),
            click.option("--pairs", "pairs_file", required=True, type=click.Path(dir_okay=False), help=pairs_help),
            model_options,
            click.option("--itm-candidates", type=click.IntRange(1, 1000), default=16, show_default=True,
                         help=candidates_help),
            click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout."),
        )):
            function = option(function)
        return function
    return decorate


@_pairs_command("eval", 'JSON Lines: {"image": PATH, "captions": [TEXT, ...]} per line; relative paths from its folder.',
               "Top ITC candidates per query re-scored with ITM (LAVIS uses 128 on Flickr30K).")
def evaluate_command(pairs_file, model, device, dtype, itm_candidates, as_json) -> None:
    """Text->image and image->text Recall@1/5/10 over a captioned image set, ITC alone and ITC+ITM."""
    from pathlib import Path

    from indexer.evaluate import Pairs, evaluate
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    pairs = Pairs.read(Path(pairs_file))
    retriever = Blip2Retriever.load(ModelConfig.retrieval(model, device, dtype))
    result = {"model": retriever.identity.name, **evaluate(retriever, pairs, itm_candidates)}
    if as_json:
        emit_json(result)
        return
    click.echo(f"{result['images']} images, {result['texts']} texts, model {result['model']}")
    click.echo(f"{'':12}{'text->image R@1/5/10':>24}{'image->text R@1/5/10':>24}{'ms/query':>10}")
    for name in ("itc", "itc+itm"):
        t2i, i2t = result[name]["text_to_image"], result[name]["image_to_text"]
        cells = ["/".join(f"{scores[k]:.3f}" for k in (1, 5, 10)) for scores in (t2i, i2t)]
        click.echo(f"{name:12}{cells[0]:>24}{cells[1]:>24}{result['ms_per_query'][name]:>10.1f}")
    click.echo(f"re-ranked by {result['fusion']}, the top {result['itm_candidates']} by ITC of each query")


@_pairs_command("calibrate", "Held-out pairs, as eval reads them; not the pairs you will report eval on.",
               "Top ITC candidates per query re-scored with ITM, as search and eval will.")
def calibrate_command(pairs_file, model, device, dtype, itm_candidates, as_json) -> None:
    """Choose how re-ranking adds ITM to ITC for a model: the weight of ITC beside ITM's log-odds that
    ranks PAIRS best, stored in the model's directory, where search, serve and eval read it."""
    from dataclasses import asdict
    from pathlib import Path

    from indexer.evaluate import Pairs, calibrate_fusion
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever
    from retrieval.errors import UsageError
    from retrieval.fusion import Fusion, write_fusion

    directory = Path(model).expanduser()
    if not directory.is_dir():
        raise UsageError(f"calibrate stores its result in the model's directory, and {model} is not one: download "
                         "the checkpoint (hf download NAME --local-dir DIR) and pass --model DIR")
    pairs = Pairs.read(Path(pairs_file))
    # the fusion stored with the model, if any, plays no part and is replaced (even when unreadable),
    # unless these pairs cannot choose a weight
    retriever = Blip2Retriever.load(ModelConfig.retrieval(model, device, dtype), fusion=Fusion())
    calibration = calibrate_fusion(retriever, pairs, itm_candidates)
    if len(set(zip(calibration.text_to_image, calibration.image_to_text))) == 1:  # e.g. a handful of easy pairs
        raise UsageError(f"every weight ranks these {len(pairs.texts)} texts and {len(pairs.images)} images the same "
                         f"(R@1 {calibration.text_to_image[0]:.3f} and {calibration.image_to_text[0]:.3f}), so they "
                         "cannot choose one; nothing was written. Calibrate on more, or harder, held-out pairs")
    path = write_fusion(directory, calibration, str(Path(pairs_file).resolve()))
    if as_json:
        emit_json({"model": model, "file": str(path), "chosen": calibration.best.itc_weight, **asdict(calibration)})
        return
    click.echo(f"{len(pairs.images)} images, {len(pairs.texts)} texts; R@1 after re-ranking the top {itm_candidates} "
               "by ITC, ranked by ITM log-odds + WEIGHT x ITC:")
    click.echo(f"{'weight':>8}{'text->image':>14}{'image->text':>14}")
    for weight, t2i, i2t in zip(calibration.weights, calibration.text_to_image, calibration.image_to_text):
        mark = "  <- chosen" if weight == calibration.best.itc_weight else ""
        click.echo(f"{weight:>8g}{t2i:>14.3f}{i2t:>14.3f}{mark}")
    click.echo(f"{'ITC alone':>8}{calibration.itc_text_to_image:>14.3f}{calibration.itc_image_to_text:>14.3f}")
    click.echo(f"wrote {path}: re-ranking with this model now scores {calibration.best.describe()}")
    if not calibration.improves_on_itc:
        click.echo("warning: no weight ranks these pairs better than ITC alone; search --no-rerank ranks by ITC",
                   err=True)
