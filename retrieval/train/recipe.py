"""The whole recipe, stage after stage, ending in two standard checkpoints:
`blip2-itm-shapes` (`Blip2ForImageTextRetrieval`) and `blip2-opt-shapes`
(`Blip2ForConditionalGeneration`), each with its processor, readable by `retrieval.loading`.

1. image encoder: attribute classification, then frozen; its features are computed once and cached
2. the Q-Former's text side: pre-trained to read a caption's structure (`retrieval.train.text`), as
   BLIP-2 starts its Q-Former from BERT
3. stage 1: Q-Former with ITC + ITM + ITG
4. language model: next-token pre-training on caption text, then frozen
5. stage 2: Q-Former (from stage 1) + projection as the language model's soft prompt (with
   `caption_colour_noise`, each caption's last colour word made unreliable in teacher forcing)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from retrieval.train.architecture import (
    Architecture, caption_model, caption_processor, retrieval_model, retrieval_processor,
)
from retrieval.train.loop import Progress, Schedule

RETRIEVAL_NAME = "blip2-itm-shapes"
CAPTION_NAME = "blip2-opt-shapes"
IGNORED = -100  # cross_entropy's ignore_index: a label not to learn from
# The shipped recipe's data options (`indexer.synthetic.training_set`): the share of scenes the image
# encoder also sees in random colours, and whether stage 1 learns from each caption's swaps.
RECOLOUR_SHARE, WITH_SWAPS = 0.5, True


@dataclass(frozen=True)
class TrainConfig:
    architecture: Architecture = Architecture()
    vision: Schedule = Schedule(steps=3000, lr=1.5e-3, batch_size=64)
    # the Q-Former's text side pre-trained to read word order before stage 1 (BLIP-2 starts from BERT)
    text: Schedule = Schedule(steps=600, lr=1e-3, batch_size=128)
    stage1: Schedule = Schedule(steps=850, lr=1e-3, batch_size=96)
    language: Schedule = Schedule(steps=1500, lr=2e-3, batch_size=32)
    stage2: Schedule = Schedule(steps=1300, lr=1e-3, batch_size=64)
    # Where ITM's hard negatives come from: "batch", as LAVIS; "bank", the whole training set and its
    # foils (`retrieval.train.negatives`). Tried for issue 7's ITM, not better yet: see RESULTS.md.
    itm_negatives: str = "batch"
    # The weight of attribute matching beside ITM (`retrieval.train.stage1`); 0: ITM alone, as LAVIS.
    itm_attributes: float = 0.0
    # ITM's in-batch negatives drawn by softmax(cosine / this); 0: by ITC's learned temperature, as LAVIS.
    mining_temperature: float = 0.0
    # Stage 2's teacher forcing with each caption's last colour word replaced by a random colour this
    # often (`retrieval.train.stage2.WordNoise`); 0 feeds the captions as they are, as BLIP-2 does.
    # 1 names unseen pairs right more often (RESULTS.md, eleventh and twelfth sessions): the shipped
    # captioner was trained with it.
    caption_colour_noise: float = 1.0
    seed: int = 0
    threads: int = 0  # 0: torch's default

    @classmethod
    def smoke(cls) -> "TrainConfig":
        """A few steps of every stage on a narrower model: for tests of the machinery, not of quality."""
        return cls(
            architecture=Architecture(vision_hidden=32, vision_layers=1, qformer_hidden=32, qformer_layers=2, lm_hidden=32, lm_layers=1),
            vision=Schedule(steps=3, lr=1e-3, batch_size=8), text=Schedule(steps=3, lr=1e-3, batch_size=8),
            stage1=Schedule(steps=3, lr=1e-3, batch_size=8),
            language=Schedule(steps=3, lr=1e-3, batch_size=4), stage2=Schedule(steps=3, lr=1e-3, batch_size=8),
        )


@dataclass(frozen=True)
class TrainingSet:
    """Images (RGB PIL) with one caption each; class labels of what each image shows, as a whole and
    region by region (an "L" mask per image whose value m has the classes `region_codes[i][m]`);
    text-only captions for the language model; `foils`, captions a change away from the images' own,
    for ITM to learn from as negatives; and `scene_ids`, the number of the scene that each caption,
    then each foil, describes (captions of one scene in other words share it); `recoloured`, for some
    images (by index), the same scene drawn in other colours, with its mask, for the image encoder;
    `swap_rows`, for each image, where its swapped captions (`indexer.synthetic.swaps`) are among the
    texts (captions, then foils): stage 1's binding negatives when given; `partners`, for each image
    the row of its swap drawn alike, or -1: stage 1 then batches the two together."""

    images: list[Any]
    captions: list[str]
    scene_ids: list[int]
    attributes: list[tuple[int, ...]]
    attribute_classes: tuple[int, ...]
    masks: list[Any]
    region_codes: list[list[tuple[int, ...]]]
    region_classes: tuple[int, ...]
    corpus: list[str]
    foils: list[str] = field(default_factory=list)
    recoloured: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    swap_rows: list[list[int]] = field(default_factory=list)
    partners: list[int] = field(default_factory=list)  # for each image, its swap twin's row, or -1

    def words(self) -> list[str]:
        """Every word of the captions and the language corpus: the retrieval tokenizer's vocabulary."""
        return sorted({word for text in [*self.captions, *self.corpus] for word in text.lower().split()})

    def for_vision(self) -> "TrainingSet":
        """What the image encoder trains on: the images, those in `recoloured` swapped for their
        other drawing, whose colour labels (scene and regions) become IGNORED, bar "no second
        thing"; other stages see only the named colours the captions name."""
        from indexer.synthetic import COLOUR_ATTRIBUTES, COLOURS

        def without_colours(labels: tuple[int, ...]) -> tuple[int, ...]:
            # classes from len(COLOURS) on are "no second thing", still true of a recoloured scene
            return tuple(IGNORED if a in COLOUR_ATTRIBUTES and label < len(COLOURS) else label
                         for a, label in enumerate(labels))

        if not self.recoloured:
            return self
        images, masks, attributes, codes = list(self.images), list(self.masks), list(self.attributes), list(self.region_codes)
        for i, (image, mask) in self.recoloured.items():
            images[i], masks[i] = image, mask
            attributes[i] = without_colours(attributes[i])
            codes[i] = [codes[i][0]] + [(IGNORED, *rest) for _, *rest in codes[i][1:]]  # region 0: background
        return replace(self, images=images, masks=masks, attributes=attributes, region_codes=codes, recoloured={})

    def patch_labels(self, grid: int, min_cover: float = 0.1):
        """(N, grid * grid, R) classes of the thing covering most of each ViT patch, in the ViT's raster
        order; background where no thing covers `min_cover` of the patch. Labelling by coverage, not
        by the patch's centre, puts shape labels on the patches that hold a thing's edges, the only
        ones that show its shape, and on small things that cover no patch centre."""
        import numpy as np

        labels = []
        for mask, codes in zip(self.masks, self.region_codes):
            share = patch_coverage(mask, len(codes), grid)
            owner = share[:, 1:].argmax(axis=1) + 1
            owner[share[np.arange(grid * grid), owner] < min_cover] = 0
            labels.append(np.asarray(codes)[owner])
        return np.stack(labels)


def patch_coverage(mask: Any, regions: int, grid: int):
    """(grid * grid, regions) share of each ViT patch, in raster order, that each value of a square
    "L" `mask` covers (value m: region m, 0 the background)."""
    import numpy as np

    owners = np.asarray(mask)
    cells = np.arange(owners.shape[0]) * grid // owners.shape[0]  # a pixel row or column -> its patch's
    patch = (cells[:, None] * grid + cells[None, :]).reshape(-1)
    counts = np.zeros((grid * grid, regions))
    np.add.at(counts, (patch, owners.reshape(-1)), 1)
    return counts / counts.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Trained:
    retrieval_dir: Path
    caption_dir: Path
    losses: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def train(data: TrainingSet, config: TrainConfig, out: Path, progress: Progress | None = None) -> Trained:
    """Runs the four stages on `data` and writes both checkpoints under `out`."""
    import torch

    from retrieval.tiny import quiet

    quiet()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    arch, seconds, losses = config.architecture, {}, {}
    itm_processor = retrieval_processor(arch, data.words())
    opt_processor = caption_processor(arch, data.corpus)

    def timed(name: str, stage, *args):
        began = time.perf_counter()
        result, losses[name] = stage(*args)
        seconds[name] = time.perf_counter() - began
        return result

    retrieval = retrieval_model(arch, itm_processor)
    features = timed("vision", _image_encoder, retrieval.vision_model, itm_processor, data, config, progress)
    if config.text.steps:
        timed("text", _text_encoder, retrieval, itm_processor, data, config, progress)
    timed("stage1", _stage1, retrieval, itm_processor, features, data, config, progress)
    captioner = caption_model(arch, opt_processor)
    timed("language", _language_model, captioner, opt_processor, data, config, progress)
    captioner.vision_model.load_state_dict(retrieval.vision_model.state_dict())
    _copy_qformer(retrieval, captioner)
    timed("stage2", _stage2, captioner, opt_processor, features, data, config, progress)

    out = Path(out)
    retrieval_dir, caption_dir = out / RETRIEVAL_NAME, out / CAPTION_NAME
    for model, processor, directory in ((retrieval, itm_processor, retrieval_dir), (captioner, opt_processor, caption_dir)):
        model.half().save_pretrained(directory)  # fp16 halves what ships; loading casts back as asked
        processor.save_pretrained(directory)
    return Trained(retrieval_dir, caption_dir, losses, seconds)


def _image_encoder(vision_model: Any, processor: Any, data: TrainingSet, config: TrainConfig, progress):
    """Pre-trains and freezes the ViT; returns its features of every training image, computed once."""
    import torch

    from retrieval.train.vision import pretrain_vision

    arch = config.architecture
    shown = data.for_vision()
    pixels = image_pixels(processor, shown.images)
    labels = torch.tensor(shown.attributes, dtype=torch.long)
    patch_labels = torch.from_numpy(shown.patch_labels(arch.image_size // arch.patch_size)).long()
    loss = pretrain_vision(vision_model, pixels, labels, data.attribute_classes, patch_labels, data.region_classes,
                           config.vision, config.seed, progress)
    if shown is not data:  # the later stages see the images their captions describe
        pixels = image_pixels(processor, data.images)
    return frozen_features(vision_model, pixels), loss


def image_pixels(processor: Any, images: list[Any]):
    """(N, 3, H, W) model inputs of PIL `images`, as the processor's transform makes them."""
    import numpy as np
    import torch

    from retrieval.preprocess import ImageTransform

    transform = ImageTransform.from_processor(processor)
    return torch.from_numpy(np.stack([transform(image) for image in images]))


def frozen_features(vision_model: Any, pixels: Any, chunk: int = 256):
    """(N, P, Dv) features of a frozen ViT, `chunk` images at a time: what stages 1 and 2 read."""
    import torch

    with torch.no_grad():
        return torch.cat([vision_model(pixel_values=pixels[i : i + chunk]).last_hidden_state
                          for i in range(0, len(pixels), chunk)])


def _text_encoder(model: Any, processor: Any, data: TrainingSet, config: TrainConfig, progress):
    """Pre-trains the Q-Former's text side on the captions and the language corpus (`retrieval.train.text`)."""
    import torch

    from indexer.synthetic import ATTRIBUTE_CLASSES, caption_attributes
    from retrieval.train.text import pretrain_text

    texts = [*data.captions, *data.corpus]
    tokens = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    labels = torch.tensor([caption_attributes(text) for text in texts])
    return None, pretrain_text(model, tokens["input_ids"], tokens["attention_mask"], labels, ATTRIBUTE_CLASSES,
                               config.text, config.seed, progress)


def _stage1(model: Any, processor: Any, features: Any, data: TrainingSet, config: TrainConfig, progress):
    import torch

    from retrieval.train.stage1 import Pairs, swap_matrix, train_stage1

    tokenizer = processor.tokenizer
    from_bank = config.itm_negatives == "bank"
    with_foils = from_bank or bool(data.swap_rows)
    texts = [*data.captions, *data.foils] if with_foils else data.captions
    tokens = tokenizer(texts, padding="longest", return_tensors="pt")
    if with_foils:
        groups = data.scene_ids
    else:  # identical captions match, as the shipped checkpoints were trained, so they stay reproducible
        number = {caption: i for i, caption in enumerate(dict.fromkeys(data.captions))}
        groups = [number[caption] for caption in data.captions]
    swaps = swap_matrix(data.swap_rows) if data.swap_rows else None
    pairs = Pairs(features, tokens["input_ids"], tokens["attention_mask"], torch.tensor(groups), swaps,
                  partners=data.partners or None)
    if config.itm_attributes:
        from indexer.synthetic import caption_attributes

        pairs = replace(pairs, image_attributes=torch.tensor(data.attributes),
                        text_attributes=torch.tensor([caption_attributes(text) for text in texts]))
    losses = train_stage1(model, pairs, tokenizer.bos_token_id, config.stage1, config.seed, progress, from_bank,
                          config.itm_attributes, config.mining_temperature)
    return None, losses


def _tokenize(processor: Any, texts: list[str]) -> list[list[int]]:
    return processor.tokenizer(texts, add_special_tokens=False)["input_ids"]


def _language_model(model: Any, processor: Any, data: TrainingSet, config: TrainConfig, progress):
    from retrieval.train.language import pack, pretrain_language_model

    length = 2 * config.architecture.max_text_positions
    rows = pack(_tokenize(processor, data.corpus), model.config.text_config.bos_token_id, length)
    return None, pretrain_language_model(model.language_model, rows, config.language, config.seed, progress)


def _stage2(model: Any, processor: Any, features: Any, data: TrainingSet, config: TrainConfig, progress):
    from retrieval.train.stage2 import caption_inputs, train_stage2

    input_ids, mask, labels = caption_inputs(model, _tokenize(processor, data.captions))
    noise = colour_noise(processor, input_ids, config.caption_colour_noise)
    return None, train_stage2(model, features, input_ids, mask, labels, config.stage2, config.seed, progress,
                              noise=noise)


def colour_noise(processor: Any, input_ids: Any, share: float):
    """Stage 2's noise on each caption's last colour word (`input_ids` from `caption_inputs`), or None."""
    from indexer.synthetic import COLOURS
    from retrieval.train.stage2 import WordNoise, last_word_positions, word_ids

    if not share:
        return None
    colours = word_ids(processor.tokenizer, list(COLOURS))
    return WordNoise(last_word_positions(input_ids, colours), colours, share)


def _copy_qformer(source: Any, target: Any) -> None:
    """Stage 2 starts from stage 1's Q-Former (its text-only feed-forward layers stay behind)."""
    import torch

    missing, unexpected = target.qformer.load_state_dict(source.qformer.state_dict(), strict=False)
    if missing or any(".intermediate." not in k and ".output." not in k for k in unexpected):
        raise RuntimeError(f"Q-Former weights do not carry over: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        target.query_tokens.copy_(source.query_tokens)
