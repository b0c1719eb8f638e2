"""Search: query vector -> exact max-sim candidates (FAISS) -> files -> ITM re-ranking.

This is LAVIS's `compute_sim_matrix` for one query: ITC picks the top `candidates` images, the ITM
head scores each (text, image) pair on freshly computed ViT features, and the final score is the ITM
match probability (`itm`), ITM positive logit + ITC (`itm+itc`, as LAVIS ranks), or ITC alone.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexer.catalog import FileRow, check_same_model
from indexer.decode import Decoded, DecodeOptions, decode_file
from indexer.rerank import Reranker
from indexer.schema import INDEXED
from indexer.store import IndexStore
from retrieval.errors import UsageError
from retrieval.query import TextQuery, combine, image_query_vector

SCORES = ("itm", "itm+itc", "itc")
MAX_K = 10_000


@dataclass(frozen=True)
class SearchOptions:
    k: int = 10
    candidates: int | None = None  # default max(32, k)
    rerank: bool = True
    score: str = "itm"
    min_score: float | None = None
    path_glob: str | None = None

    def validate(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise UsageError(f"-k must be between 1 and {MAX_K}, not {self.k}")
        if self.candidates is not None and not 1 <= self.candidates <= MAX_K:
            raise UsageError(f"--candidates must be between 1 and {MAX_K}, not {self.candidates}")
        if self.score not in SCORES:
            raise UsageError(f"--score must be one of {', '.join(SCORES)}")
        if not self.rerank and self.score != "itc":
            raise UsageError("--no-rerank scores by ITC only; drop --score or use --score itc")

    @property
    def depth(self) -> int:
        if not self.rerank:
            return self.k
        return max(self.candidates or 32, self.k)


@dataclass(frozen=True)
class SearchResult:
    path: str
    score: float
    itc_score: float
    itm_score: float | None
    query_slot: int
    file_id: int


@dataclass
class SearchResponse:
    results: list[SearchResult]
    missing: list[str] = field(default_factory=list)  # candidates whose files vanished since indexing


@dataclass(frozen=True)
class _Candidate:
    row: FileRow
    itc: float
    slot: int


class Searcher:
    def __init__(self, store: IndexStore, retriever: Any, reranker: Reranker | None = None) -> None:
        recorded = store.catalog.model()
        if recorded is None:
            raise UsageError(f"the index at {store.directory} is empty; run blipsearch index first")
        check_same_model(recorded, retriever.identity)
        self.store = store
        self.retriever = retriever
        self.vectors = store.load_vectors(recorded)
        self.exact_vectors = store.exact_vectors(recorded)
        self.decode_options = DecodeOptions(retriever.transform, max_pixels=1 << 40)
        self.reranker = reranker or Reranker(retriever)

    def search_text(self, query: TextQuery, options: SearchOptions) -> SearchResponse:
        options.validate()
        positive = self.retriever.encode_texts(list(query.texts))
        negative = self.retriever.encode_texts(list(query.negatives)) if query.negatives else None
        vector = combine(positive, query.weights, negative, query.negative_weight)
        candidates = self._candidates(vector, options, exclude_hash=None)
        return self._finish(candidates, options, query)

    def search_image(self, path: str, options: SearchOptions) -> SearchResponse:
        options.validate()
        decoded = decode_file(path, self.decode_options)
        if not isinstance(decoded, Decoded):
            raise UsageError(f"{path}: cannot use as a query image ({decoded.error})")
        embeds = self.retriever.encode_images(decoded.pixels[None]).query_embeds[0]
        itc_only = SearchOptions(**{**options.__dict__, "rerank": False, "score": "itc"})
        candidates = self._candidates(image_query_vector(embeds), itc_only, exclude_hash=decoded.content_hash)
        candidates = [c for c in candidates if os.path.realpath(c.row.path) != os.path.realpath(path)]
        return self._finish(candidates, itc_only, None)

    # -- stages -----------------------------------------------------------------------------------
    def _candidates(self, vector: np.ndarray, options: SearchOptions, exclude_hash: str | None) -> list[_Candidate]:
        """The top `options.depth` files by ITC, widening the FAISS search until filters leave enough."""
        wanted = options.depth
        n_images = wanted
        while True:
            hits = self.vectors.search(vector[None], n_images, exact=self.exact_vectors)[0]
            rows = self.store.catalog.files(embedding_ids=hits.keys.tolist())
            by_key: dict[int, list[FileRow]] = {}
            for row in rows:
                if row.status == INDEXED and self._passes(row, options, exclude_hash):
                    by_key.setdefault(row.embedding_id, []).append(row)
            out = [
                _Candidate(row, float(score), int(slot))
                for key, score, slot in zip(hits.keys, hits.scores, hits.slots)
                for row in by_key.get(int(key), [])
            ]
            if len(out) >= wanted or hits.exhausted:
                return out[:wanted]
            n_images *= 2

    @staticmethod
    def _passes(row: FileRow, options: SearchOptions, exclude_hash: str | None) -> bool:
        if exclude_hash is not None and row.content_hash == exclude_hash:
            return False
        if options.path_glob and not fnmatch.fnmatch(row.path, options.path_glob):
            return False
        return True

    def _finish(self, candidates: list[_Candidate], options: SearchOptions, query: TextQuery | None) -> SearchResponse:
        missing = [c.row.path for c in candidates if not os.path.exists(c.row.path)]
        gone = set(missing)
        candidates = [c for c in candidates if c.row.path not in gone]
        matches = {}
        if options.rerank and query:
            first_file: dict[str, str] = {}
            for c in candidates:
                first_file.setdefault(c.row.content_hash, c.row.path)
            matches = self.reranker.score(first_file, query.texts, query.weights)
        results = []
        for c in candidates:
            match = matches.get(c.row.content_hash)
            prob = match.probability if match else None
            score = {"itc": c.itc, "itm": prob, "itm+itc": match.logit + c.itc if match else None}[options.score]
            if score is None:  # the re-ranker could not read this file after all
                continue
            results.append(SearchResult(c.row.path, float(score), c.itc, prob, c.slot, c.row.id))
        results.sort(key=lambda r: -r.score)
        if options.min_score is not None:
            results = [r for r in results if r.score >= options.min_score]
        return SearchResponse(results[: options.k], missing)
