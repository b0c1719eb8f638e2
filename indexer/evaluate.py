"""Retrieval evaluation over a captioned image set, BLIP-2 style (LAVIS `compute_sim_matrix`).

Text->image and image->text Recall@1/5/10, first by ITC alone (max over the 32 query vectors), then
with the top `itm_candidates` of each query re-scored from ITM and ITC: ITM positive logit + ITC as
LAVIS ranks, or as the model's calibrated fusion weighs them (`retrieval.fusion`), which
`calibrate_fusion` measures on held-out pairs.
The pairs file is JSON Lines: {"image": PATH, "captions": [TEXT, ...]} (or "caption": TEXT), with
relative paths taken from the file's folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.decode import DEFAULT_MAX_PIXELS, TOO_LARGE, Decoded, DecodeOptions, Skipped, decode_file
from retrieval.errors import UsageError
from retrieval.fusion import Calibration, Candidates, Fusion, calibrate

RANKS = (1, 5, 10)


@dataclass(frozen=True)
class Pairs:
    images: list[str]
    texts: list[str]
    text_image: np.ndarray  # (T,) index of each text's image

    @classmethod
    def read(cls, path: Path) -> "Pairs":
        """An image on several lines (one caption per line, as COCO's annotations are) gets them all."""
        path = Path(path)
        images: dict[str, int] = {}  # resolved path -> its index
        texts, owner = [], []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{path}: not UTF-8 text") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
                image, captions = _pair(record)
            except ValueError as exc:
                raise UsageError(f'{path}:{number}: {exc}; expected {{"image": PATH, "captions": [TEXT, ...]}}') from None
            index = images.setdefault(str((path.parent / image).resolve()), len(images))
            texts.extend(captions)
            owner.extend([index] * len(captions))
        if not images:
            raise UsageError(f"{path}: no pairs")
        return cls(list(images), texts, np.asarray(owner, dtype=np.int64))


def _pair(record: Any) -> tuple[str, list[str]]:
    """(image, captions) of one line, or ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        raise ValueError('"image" is not a path')
    captions = record["captions"] if "captions" in record else [record.get("caption")]
    if isinstance(captions, str):  # a string would be read as a list of its characters
        raise ValueError('"captions" is a string, not a list of them')
    if not isinstance(captions, list) or not captions or \
            not all(isinstance(text, str) and text.strip() for text in captions):
        raise ValueError('"captions" is not a list of texts')
    return image, captions


@dataclass(frozen=True)
class Recalls:
    text_to_image: dict[int, float]
    image_to_text: dict[int, float]


def recall_at(scores: np.ndarray, correct: list[set[int]]) -> dict[int, float]:
    """`scores` (queries, items), higher is better; a query hits at k when any correct item is in its top k."""
    order = np.argsort(-scores, axis=1, kind="stable")
    best_rank = np.asarray([
        min(int(np.flatnonzero(row == item)[0]) for item in items) for row, items in zip(order, correct)
    ])
    return {k: float(np.mean(best_rank < k)) for k in RANKS}


def evaluate(retriever: Any, pairs: Pairs, itm_candidates: int = 16, batch_size: int = 32) -> dict:
    """Recalls by ITC alone and after ITM re-ranking (by the model's fusion: `retriever.fusion`)."""
    began = time.perf_counter()
    itc, vit = _itc_scores(retriever, pairs, batch_size)
    itc_seconds = time.perf_counter() - began
    images_of, texts_of = _right_answers(pairs)
    result = {"images": len(pairs.images), "texts": len(pairs.texts), "itc": _recalls(itc, images_of, texts_of)}
    began = time.perf_counter()
    t2i, i2t = _itm_candidates(retriever, pairs, itc, vit, itm_candidates)
    fusion = retriever.fusion
    result["itc+itm"] = {"text_to_image": recall_at(_reranked(itc, t2i, fusion), images_of),
                         "image_to_text": recall_at(_reranked(itc.T, i2t, fusion), texts_of)}
    queries = len(pairs.texts) + len(pairs.images)
    result["ms_per_query"] = {"itc": 1e3 * itc_seconds / queries,
                              "itc+itm": 1e3 * (itc_seconds + time.perf_counter() - began) / queries}
    result["itm_candidates"] = itm_candidates
    result["fusion"] = fusion.describe()
    return result


def calibrate_fusion(retriever: Any, pairs: Pairs, itm_candidates: int = 16, batch_size: int = 32) -> Calibration:
    """R@1 on `pairs` with each candidate ITC weight of the fusion (`retrieval.fusion`)."""
    return calibrate(*score_candidates(retriever, pairs, itm_candidates, batch_size))


def score_candidates(retriever: Any, pairs: Pairs, itm_candidates: int = 16,
                     batch_size: int = 32) -> tuple[Candidates, Candidates]:
    """Text->image and image->text: each query's top candidates by ITC, with ITM's logits for them."""
    itc, vit = _itc_scores(retriever, pairs, batch_size)
    return _itm_candidates(retriever, pairs, itc, vit, itm_candidates)


def _itc_scores(retriever: Any, pairs: Pairs, batch_size: int):
    """(texts, images) ITC max-sim over the 32 query vectors, and each image's ViT features."""
    embeds, vit = _encode_images(retriever, pairs.images, batch_size)
    texts = np.concatenate([retriever.encode_texts(pairs.texts[i : i + 256]) for i in range(0, len(pairs.texts), 256)])
    return np.einsum("td,nqd->tnq", texts, embeds).max(axis=2), vit


def _right_answers(pairs: Pairs) -> tuple[list[set[int]], list[set[int]]]:
    """Each text's image, and each image's texts."""
    images_of = [{int(i)} for i in pairs.text_image]
    texts_of = [set(np.flatnonzero(pairs.text_image == n).tolist()) for n in range(len(pairs.images))]
    return images_of, texts_of


def _itm_candidates(retriever: Any, pairs: Pairs, itc: np.ndarray, vit: list, k: int) -> tuple[Candidates, Candidates]:
    """Every text's top k images by ITC and every image's top k texts, with their ITM logits."""
    if k < 1:
        raise UsageError("--itm-candidates must be at least 1")
    images_of, texts_of = _right_answers(pairs)
    t2i = _candidates(itc, k, images_of, lambda t, ns: _itm(retriever, vit, [pairs.texts[t]] * len(ns), ns))
    i2t = _candidates(itc.T, k, texts_of, lambda n, ts: _itm(retriever, vit, [pairs.texts[t] for t in ts], [n] * len(ts)))
    return t2i, i2t


def _recalls(scores: np.ndarray, images_of: list[set[int]], texts_of: list[set[int]]) -> dict:
    return {"text_to_image": recall_at(scores, images_of), "image_to_text": recall_at(scores.T, texts_of)}


def _pixel_batches(paths: list[str], transform: Any, batch_size: int):
    """(B, 3, H, W) model inputs, `batch_size` files at a time, in order; an unreadable file is an error."""
    options = DecodeOptions(transform, DEFAULT_MAX_PIXELS)  # in this process: indexing's bomb guard
    for start in range(0, len(paths), batch_size):
        pixels = []
        for path in paths[start : start + batch_size]:
            decoded = decode_file(path, options)
            if not isinstance(decoded, Decoded):
                raise UsageError(f"{path}: cannot evaluate on this image ({_problem(decoded)})")
            pixels.append(decoded.pixels)
        yield np.stack(pixels)


def _encode_images(retriever: Any, paths: list[str], batch_size: int):
    embeds, vit = [], []
    for pixels in _pixel_batches(paths, retriever.transform, batch_size):
        encoded = retriever.encode_images(pixels, keep_vit=True)
        embeds.append(encoded.query_embeds)
        vit.extend(encoded.vit_features)
    return np.concatenate(embeds), vit


def _itm(retriever: Any, vit: list, texts: list[str], images: list[int]) -> np.ndarray:
    """ITM logits (n, 2) of paired (text, image) lists."""
    return retriever.itm_logits(retriever.stack_vit_features([vit[n] for n in images]), texts)


def _candidates(itc: np.ndarray, k: int, correct: list[set[int]], itm) -> Candidates:
    """LAVIS: each query's top k items by ITC, in ITC's order, scored by `itm(query, items)`."""
    items = np.argsort(-itc, axis=1, kind="stable")[:, :k]
    logits = np.stack([itm(query, row.tolist()) for query, row in enumerate(items)]).astype(np.float64)
    right = np.asarray([[int(i) in correct[query] for i in row] for query, row in enumerate(items)])
    return Candidates(items, logits, np.take_along_axis(itc, items, axis=1).astype(np.float64), right)


def _reranked(itc: np.ndarray, candidates: Candidates, fusion: Fusion) -> np.ndarray:
    """Scores with each query's candidates re-scored by `fusion`; the rest rank below them all."""
    scores = np.full(itc.shape, -np.inf, dtype=np.float64)
    np.put_along_axis(scores, candidates.items, fusion.combine_logits(candidates.itm_logits, candidates.itc), axis=1)
    return scores


def judge_captions(captioner: Any, pairs: Pairs, names: Any, options: Any = None, batch_size: int = 32) -> list[dict]:
    """Captions every image and compares what `names(text)` extracts (e.g. colour-shape pairs) from the
    caption with what it extracts from the image's reference captions: one {"caption", "exact",
    "partial"} per image, `exact` when equal, `partial` when they share something."""
    from retrieval.captioner import CaptionOptions

    options = options or CaptionOptions()
    captions: list[str] = []
    for pixels in _pixel_batches(pairs.images, captioner.transform, batch_size):
        captions.extend(captioner.caption(pixels, options))
    judged = []
    for image, caption in enumerate(captions):
        wanted = set().union(*(names(pairs.texts[t]) for t in np.flatnonzero(pairs.text_image == image)))
        found = names(caption)
        judged.append({"caption": caption, "exact": found == wanted, "partial": bool(found & wanted)})
    return judged


def caption_summary(pairs: Pairs, judged: list[dict]) -> dict:
    """Shares of exact and partial captions, with a few examples."""
    count = max(1, len(judged))
    return {
        "images": len(judged), "exact": sum(j["exact"] for j in judged) / count,
        "partial": sum(j["partial"] for j in judged) / count,
        "examples": [{"image": pairs.images[i], "caption": j["caption"]} for i, j in enumerate(judged[:5])],
    }


def evaluate_captions(captioner: Any, pairs: Pairs, names: Any, options: Any = None, batch_size: int = 32) -> dict:
    return caption_summary(pairs, judge_captions(captioner, pairs, names, options, batch_size))


def _problem(skipped: Skipped) -> str:
    if skipped.reason == TOO_LARGE:  # its detail names index's --max-megapixels, which eval has not
        size = f"{skipped.width}x{skipped.height} is " if skipped.width else ""
        return f"{TOO_LARGE}: {size}over the {DEFAULT_MAX_PIXELS // 10**6} MP eval decodes"
    return skipped.error
