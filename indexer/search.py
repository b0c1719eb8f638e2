"""Search: query vector -> exact max-sim candidates (FAISS) -> files -> ITM re-ranking.

This is LAVIS's `compute_sim_matrix` for one query: ITC picks the top `candidates` images, the ITM
head scores each (text, image) pair on freshly computed ViT features, and the final score is the ITM
match probability (`itm`), ITM and ITC added (`itm+itc`: as the model's calibrated fusion weighs them,
else ITM positive logit + ITC as LAVIS ranks; `retrieval.fusion`), or ITC alone. Re-ranking scores by
`itm+itc` when the model has a calibrated fusion, else by `itm`.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from indexer import path_glob
from indexer.catalog import Catalog, FileRow, check_same_model
from indexer.decode import Decoded, DecodeOptions, Skipped, decode_file, file_hash, holds_content
from indexer.rerank import Match, Reranker
from indexer.schema import INDEXED
from indexer.store import IndexStore
from retrieval.errors import UsageError
from retrieval.fusion import Fusion
from retrieval.query import TextQuery, combine, image_query_vector, validate_text

SCORES = ("itm", "itm+itc", "itc")
MAX_K = 10_000
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009): hybrid = sum of 1 / (60 + rank)
# A --path glob whose literal start (up to its first wildcard) holds at most this many files is served
# by scoring those files' images exactly (32 KB of vectors each) instead of widening FAISS's search
# until enough pass: for a folder of a few hundred images in an index of millions, that widening
# doubled its way to most of the index.
PREFILTER_FILES = 2000


@dataclass(frozen=True)
class SearchOptions:
    k: int = 10
    candidates: int | None = None  # default max(32, k)
    rerank: bool = True
    score: str | None = None  # None: "itc" without re-ranking, else the model's default (`default_score`)
    min_score: float | None = None
    path_glob: str | None = None  # over full paths: `path_glob.anchored`
    hybrid: bool = False  # fuse the visual ranking with a full-text ranking of captions

    def __post_init__(self) -> None:
        if self.score is None and not self.rerank:
            object.__setattr__(self, "score", "itc")

    def validate(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise UsageError(f"-k must be between 1 and {MAX_K}, not {self.k}")
        if self.candidates is not None and not 1 <= self.candidates <= MAX_K:
            raise UsageError(f"--candidates must be between 1 and {MAX_K}, not {self.candidates}")
        if self.score is not None and self.score not in SCORES:
            raise UsageError(f"--score must be one of {', '.join(SCORES)}")
        if not self.rerank and self.score != "itc":
            raise UsageError("--no-rerank scores by ITC only; drop --score or use --score itc")
        if self.min_score is not None and not math.isfinite(self.min_score):  # NaN would drop every result
            raise UsageError(f"--min-score must be a finite number, not {self.min_score}")

    @property
    def depth(self) -> int:
        if not self.rerank:
            return self.k
        return max(self.candidates or 32, self.k)


@dataclass(frozen=True)
class SearchResult:
    path: str
    score: float
    itc_score: float | None  # None for caption-only results
    itm_score: float | None
    query_slot: int | None
    file_id: int
    embedding_id: int
    caption: str | None = None
    caption_rank: int | None = None  # 1-based rank among caption matches (hybrid and caption-only)


@dataclass
class SearchResponse:
    results: list[SearchResult]
    missing: list[str] = field(default_factory=list)  # candidates whose files vanished since indexing
    changed: list[str] = field(default_factory=list)  # candidates left out: their files changed since indexing


@dataclass(frozen=True)
class IndexedContent:
    """An image content the catalog holds vectors of."""

    content_hash: str
    embedding_id: int


@dataclass(frozen=True)
class _Candidate:
    row: FileRow
    itc: float
    slot: int


class Searcher:
    def __init__(self, store: IndexStore, retriever: Any | None, reranker: Reranker | None = None) -> None:
        """`retriever` None: no model, for `search_similar` alone, which needs only stored vectors."""
        recorded = store.catalog.model()
        if recorded is None:
            raise UsageError(f"the index at {store.directory} is empty; run blipsearch index first")
        if retriever is not None:
            check_same_model(recorded, retriever.identity)
        self.store = store
        self.retriever = retriever
        self.vectors = store.load_vectors(recorded, read_only=True)
        self.vectors.use_gpu()  # FAISS on the GPU when there is one and it supports the index kind
        self.exact_vectors = store.exact_vectors(recorded)
        self.reranker = reranker or (Reranker(retriever) if retriever is not None else None)

    def search_text(self, query: TextQuery, options: SearchOptions) -> SearchResponse:
        options.validate()
        positive = self.retriever.encode_texts(list(query.texts))
        negative = self.retriever.encode_texts(list(query.negatives)) if query.negatives else None
        vector = combine(positive, query.weights, negative, query.negative_weight)
        candidates = self._candidates(vector, options, exclude_hash=None)
        caption_ranks: dict[int, int] = {}
        if options.hybrid:
            caption_ranks = self._caption_ranks(" ".join(query.itm_texts()[0]), options.depth)
            candidates += self._caption_candidates(vector, caption_ranks, candidates, options)
        return self._finish(candidates, options, query, caption_ranks)

    def search_image(self, path: str, options: SearchOptions, name: str | None = None,
                     decode: Callable[[str, DecodeOptions], Decoded | Skipped] = decode_file) -> SearchResponse:
        """`name`: what errors call the image, when `path` is a temporary copy (an upload); `decode`:
        in this process, unless the caller isolates untrusted files (`workers.UntrustedDecoder`)."""
        options.validate()
        decoded = decode(path, DecodeOptions.for_query(self.retriever.transform))
        if not isinstance(decoded, Decoded):
            raise UsageError(f"{name or path}: cannot use as a query image ({decoded.error})")
        embeds = self.retriever.encode_images(decoded.pixels[None]).query_embeds[0]
        return self._like(embeds, decoded.content_hash, options, os.path.realpath(path))

    def search_similar(self, row: FileRow, options: SearchOptions) -> SearchResponse:
        """Images like an indexed one, by its vectors in the catalog: what `search_image` finds for
        its file, without reading the file or running the model (and so as it was indexed)."""
        if row.status != INDEXED or row.embedding_id is None:
            raise UsageError(f"{row.path} was not indexed ({row.error}), so it has no vectors to compare")
        return self.search_stored(IndexedContent(row.content_hash, row.embedding_id), options)

    def search_stored(self, content: IndexedContent, options: SearchOptions) -> SearchResponse:
        """Images like an indexed content, by its vectors in the catalog (`search_similar`)."""
        options.validate()
        found, vectors = self.exact_vectors(np.asarray([content.embedding_id], np.int64))
        if len(found) == 0:  # forgotten since it was looked up
            raise UsageError("that image is no longer indexed")
        return self._like(vectors[0], content.content_hash, options)

    def _like(self, query_embeds: np.ndarray, content_hash: str, options: SearchOptions,
              real_path: str | None = None) -> SearchResponse:
        """The images nearest an example's (Q, D) query embeddings by ITC, leaving out its content
        and its own file."""
        itc_only = SearchOptions(**{**options.__dict__, "rerank": False, "score": "itc"})
        candidates = self._candidates(image_query_vector(query_embeds), itc_only, exclude_hash=content_hash)
        if real_path is not None:
            candidates = [c for c in candidates if os.path.realpath(c.row.path) != real_path]
        return self._finish(candidates, itc_only, None)

    # -- stages -----------------------------------------------------------------------------------
    def _candidates(self, vector: np.ndarray, options: SearchOptions, exclude_hash: str | None) -> list[_Candidate]:
        """The top `options.depth` files by ITC: the few a --path can match scored exactly, else found
        by FAISS, widening its search until the filters leave enough."""
        few = self._few_matching(options, exclude_hash) if options.path_glob else None
        if few is not None:
            return self._scored(vector, few)[: options.depth]
        wanted = options.depth
        n_images = wanted
        while True:
            hits = self.vectors.search(vector[None], n_images, exact=self.exact_vectors)[0]
            rows = self.store.catalog.files(embedding_ids=hits.keys.tolist())
            by_key: dict[int, list[FileRow]] = {}
            for row in rows:
                if row.status == INDEXED and _passes(row, options, exclude_hash):
                    by_key.setdefault(row.embedding_id, []).append(row)
            out = [
                _Candidate(row, float(score), int(slot))
                for key, score, slot in zip(hits.keys, hits.scores, hits.slots)
                for row in by_key.get(int(key), [])
            ]
            if len(out) >= wanted or hits.exhausted:
                return out[:wanted]
            n_images *= 2

    def _few_matching(self, options: SearchOptions, exclude_hash: str | None) -> list[FileRow] | None:
        """The indexed files `--path` matches, when they are at most `PREFILTER_FILES`; None when they
        are more (FAISS then finds matches soon enough). The database finds them: within the glob's
        literal start by the path index, else by reading every path, which costs one pass over the
        paths (the search it saves, widening until a few matches turn up, would read them all too)."""
        rows = self.store.catalog.listing.indexed_matching(options.path_glob, PREFILTER_FILES)
        return None if rows is None else [row for row in rows if _passes(row, options, exclude_hash)]

    def _scored(self, vector: np.ndarray, rows: list[FileRow]) -> list[_Candidate]:
        """`rows` by their images' exact ITC max-sim, best first: the scores FAISS's path returns."""
        keys = np.unique(np.fromiter((row.embedding_id for row in rows), np.int64, len(rows)))
        best: dict[int, tuple[float, int]] = {}
        for start in range(0, len(keys), 256):  # 8 MB of vectors at a time
            found, vectors = self.exact_vectors(keys[start : start + 256])
            for key, sims in zip(found, vectors @ vector):
                best[int(key)] = (float(sims.max()), int(sims.argmax()))
        scored = [_Candidate(row, *best[row.embedding_id]) for row in rows if row.embedding_id in best]
        return sorted(scored, key=lambda c: (-c.itc, c.row.embedding_id, c.row.path))

    def _caption_ranks(self, text: str, depth: int) -> dict[int, int]:
        """embedding id -> 1-based rank of its caption for `text`."""
        return {eid: i + 1 for i, (eid, _) in enumerate(self.store.catalog.captions.search(text, depth))}

    def _caption_candidates(self, vector: np.ndarray, caption_ranks: dict[int, int], have: list[_Candidate],
                            options: SearchOptions) -> list[_Candidate]:
        """Caption matches the visual search did not propose, with their exact ITC max-sim."""
        seen = {c.row.embedding_id for c in have}
        wanted = [eid for eid in caption_ranks if eid not in seen]
        if not wanted:
            return []
        keys, vectors = self.exact_vectors(np.asarray(wanted, np.int64))
        sims = vectors @ vector
        itc = {int(k): (float(s.max()), int(s.argmax())) for k, s in zip(keys, sims)}
        rows = self.store.catalog.files(embedding_ids=list(itc))
        return [_Candidate(r, *itc[r.embedding_id]) for r in rows
                if r.status == INDEXED and _passes(r, options, None)]

    def _finish(self, candidates: list[_Candidate], options: SearchOptions, query: TextQuery | None,
                caption_ranks: dict[int, int] | None = None) -> SearchResponse:
        missing, changed = on_disk([c.row for c in candidates])
        unusable = {*missing, *changed}
        candidates = [c for c in candidates if c.row.path not in unusable]
        if options.rerank and query:
            matches, changed_since = self._rerank(candidates, query)  # read, so checked by content too
            changed.extend(sorted(changed_since))
            candidates = [c for c in candidates if c.row.path not in changed_since]
        else:
            matches = {}
        kind = options.score or default_score(self.retriever.fusion)
        results = []
        for c in candidates:
            match = matches.get(c.row.content_hash)
            prob = match.probability if match else None
            fused = self.retriever.fusion.combine(match.logit, match.log_odds, c.itc) if match else None
            score = {"itc": c.itc, "itm": prob, "itm+itc": fused}[kind]
            if score is None:  # the re-ranker could not read this file after all
                continue
            results.append(SearchResult(c.row.path, float(score), c.itc, prob, c.slot, c.row.id, c.row.embedding_id,
                                        caption_rank=(caption_ranks or {}).get(c.row.embedding_id)))
        results.sort(key=lambda r: -r.score)
        if options.hybrid:
            results = _fuse(results)
        if options.min_score is not None:
            results = [r for r in results if r.score >= options.min_score]
        return SearchResponse(with_captions(self.store.catalog, results[: options.k]), missing, changed)

    def _rerank(self, candidates: list[_Candidate], query: TextQuery) -> tuple[dict[str, Match], set[str]]:
        """ITM matches by content hash, each scored on one file that holds it (duplicates once), and
        the files that hold other content now; a content whose file changed is read from another
        file that holds it, where there is one."""
        matches: dict[str, Match] = {}
        changed: set[str] = set()
        tried: set[str] = set()
        wanted: set[str] | None = None  # the contents still to score; None: all
        while True:
            files: dict[str, str] = {}
            for c in candidates:
                if (wanted is None or c.row.content_hash in wanted) and c.row.path not in tried:
                    files.setdefault(c.row.content_hash, c.row.path)
            if not files:
                return matches, changed
            reranked = self.reranker.score(files, *query.itm_texts())
            matches.update(reranked.matches)
            tried.update(files.values())
            changed.update(files[h] for h in reranked.changed)
            wanted = set(reranked.changed)


def indexed_content(catalog: Catalog, path: str) -> IndexedContent | None:
    """The catalog's embedding of the content of the file at `path` (indexed there or anywhere else),
    if it has one: its vectors are then the model's answer for the file, and `search_stored` needs
    no model. A pipe or other non-file is not read here: it could not be read again."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as handle:
            digest = file_hash(handle)
    except OSError:
        return None
    return stored_content(catalog, digest)


def stored_content(catalog: Catalog, digest: str) -> IndexedContent | None:
    """The catalog's embedding of the content whose SHA-256 is `digest`, if it has one."""
    found = catalog.embedding_ids_for([digest])
    return IndexedContent(digest, found[digest]) if digest in found else None


def default_score(fusion: Fusion) -> str:
    """How re-ranking scores when not told: ITM and ITC fused where the model was calibrated to add
    them, else ITM's match probability."""
    return "itm+itc" if fusion.calibrated else "itm"


def search_captions(catalog: Catalog, text: str, options: SearchOptions) -> SearchResponse:
    """Full-text search over captions alone; the score is the database's relevance (bm25 / ts_rank)."""
    options.validate()
    validate_text(text)
    depth = options.k
    while True:
        matches = catalog.captions.search(text, depth)
        relevance = dict(matches)
        rows = [r for r in catalog.files(embedding_ids=list(relevance))
                if r.status == INDEXED and _passes(r, options, None)]
        if len(rows) >= options.k or len(matches) < depth:
            break
        depth *= 4
    missing, changed = on_disk(rows)
    unusable = {*missing, *changed}
    rank = {eid: i + 1 for i, (eid, _) in enumerate(matches)}
    results = [
        SearchResult(r.path, relevance[r.embedding_id], None, None, None, r.id, r.embedding_id,
                     caption_rank=rank[r.embedding_id])
        for r in rows if r.path not in unusable
    ]
    results.sort(key=lambda r: (r.caption_rank, r.path))
    if options.min_score is not None:
        results = [r for r in results if r.score >= options.min_score]
    return SearchResponse(with_captions(catalog, results[: options.k]), missing, changed)


def on_disk(rows: list[FileRow]) -> tuple[list[str], list[str]]:
    """The paths of `rows` gone from disk, and those that hold other content than was indexed: a stat
    each, as `os.path.exists` made; a file whose size or mtime is not the catalog's is read to tell
    (a file touched, or copied back, holds the same content still)."""
    missing, changed = [], []
    for row in rows:
        try:
            now = os.stat(row.path)
        except OSError:
            missing.append(row.path)
            continue
        if (now.st_size, now.st_mtime_ns) != (row.size, row.mtime_ns) and not _holds_indexed(row):
            changed.append(row.path)
    return missing, changed


def _holds_indexed(row: FileRow) -> bool:
    try:
        with open(row.path, "rb") as handle:
            return row.content_hash is not None and holds_content(handle, row.content_hash)
    except OSError:
        return False


def with_captions(catalog: Catalog, results: list[SearchResult]) -> list[SearchResult]:
    captions = catalog.captions.get([r.embedding_id for r in results])
    return [replace(r, caption=captions[r.embedding_id].caption if r.embedding_id in captions else None)
            for r in results]


def _passes(row: FileRow, options: SearchOptions, exclude_hash: str | None) -> bool:
    if exclude_hash is not None and row.content_hash == exclude_hash:
        return False
    if options.path_glob and not path_glob.matches(row.path, options.path_glob):
        return False
    return True


def _fuse(results: list[SearchResult]) -> list[SearchResult]:
    """Reciprocal rank fusion: score = 1/(60 + visual rank) + 1/(60 + caption rank), the second term
    only for caption matches. `results` arrive sorted by their visual score."""
    fused = [
        replace(r, score=1 / (RRF_K + rank) + (1 / (RRF_K + r.caption_rank) if r.caption_rank else 0.0))
        for rank, r in enumerate(results, 1)
    ]
    return sorted(fused, key=lambda r: -r.score)
