"""BLIP-2 stage-1 encoders that run each sub-network once.

`Blip2ForImageTextRetrieval.forward` re-runs the ViT for every call and scores pairs; a search
service needs the stages apart: images -> query embeddings (+ ViT features for ITM) at index time,
text -> [CLS] embedding at query time, and ITM on cached ViT features for re-ranking, as LAVIS's
`compute_sim_matrix` does. The math follows transformers' forward step by step, including its
dtype casts (the Q-Former stays fp32 when the rest runs in fp16), so scores match it exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from retrieval.config import ModelConfig
from retrieval.errors import UsageError
from retrieval.fusion import Fusion, read_fusion
from retrieval.loading import ModelIdentity, fingerprint, load
from retrieval.preprocess import ImageTransform


# LAVIS's `BlipCaptionProcessor.pre_caption`, which every caption BLIP-2 was trained and evaluated on
# went through: lower case, these marks as spaces, at most 50 words.
_LAVIS_DROPPED = re.compile(r"([.!\"()*#:;~])")
LAVIS_MAX_WORDS = 50


def as_trained(text: str) -> str:
    """`text` as LAVIS feeds captions to BLIP-2: "A dog (running)!" is read as "a dog running"."""
    text = re.sub(r"\s{2,}", " ", _LAVIS_DROPPED.sub(" ", text.lower())).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:LAVIS_MAX_WORDS])


@dataclass(frozen=True)
class ImageEncoding:
    """`query_embeds`: (B, Q, D) float32, L2-normalised. `vit_features`: (B, P, Dv) torch tensor or None."""

    query_embeds: np.ndarray
    vit_features: Any = None


class Blip2Retriever:
    """ITC and ITM scoring on a loaded `Blip2ForImageTextRetrieval`."""

    def __init__(self, model: Any, processor: Any, device: str, max_text_tokens: int, name: str,
                 fusion: Fusion = Fusion()) -> None:
        self.model = model
        self.fusion = fusion  # how re-ranking adds ITM to ITC for this model
        self.tokenizer = processor.tokenizer
        self.transform = ImageTransform.from_processor(processor)
        self.device = device
        self.max_text_tokens = max_text_tokens
        self.identity = ModelIdentity(
            name=name,
            fingerprint=fingerprint(model),
            embed_dim=int(model.config.image_text_hidden_size),
            num_queries=int(model.config.num_query_tokens),
        )

    @classmethod
    def load(cls, config: ModelConfig, fusion: Fusion | None = None) -> "Blip2Retriever":
        """`fusion`: how to re-rank; None reads the one stored with the model (`read_fusion`)."""
        loaded = load("Blip2ForImageTextRetrieval", config)
        return cls(loaded.model, loaded.processor, loaded.device, config.max_text_tokens, config.name,
                   read_fusion(config.name) if fusion is None else fusion)

    # -- images -------------------------------------------------------------------------------
    def _pixels(self, pixel_values: Any):
        vision_dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        return self.transform.to_tensor(pixel_values, self.device, vision_dtype)

    def vit_features(self, pixel_values: Any):
        """(B, 3, H, W) model input (float, or uint8 from a decoder) -> frozen ViT last hidden state
        (B, P, Dv), on the model's device."""
        import torch

        with torch.inference_mode():
            return self.model.vision_model(pixel_values=self._pixels(pixel_values)).last_hidden_state

    def stack_vit_features(self, features: Sequence[Any]):
        """Per-image ViT features (P, Dv), e.g. from a cache -> one (B, P, Dv) tensor as `vit_features` gives."""
        import torch

        dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        return torch.stack([torch.as_tensor(f).to(self.device, dtype) for f in features])

    def query_embeds_from_vit(self, vit_features: Any) -> np.ndarray:
        """ViT features -> (B, Q, D) L2-normalised ITC query embeddings."""
        import torch

        model = self.model
        with torch.inference_mode():
            batch = vit_features.shape[0]
            mask = torch.ones(vit_features.shape[:-1], dtype=torch.long, device=vit_features.device)
            query_tokens = model.query_tokens.expand(batch, -1, -1)
            out = model.qformer(
                query_embeds=query_tokens, encoder_hidden_states=vit_features, encoder_attention_mask=mask
            ).last_hidden_state
            out = out.to(model.vision_projection.weight.dtype)
            # Normalised in fp32: in fp16 (the GPU default) the norms came out up to 6e-4 off one, near
            # the index's 1e-3 refusal, and its exactness bounds assume unit vectors.
            embeds = torch.nn.functional.normalize(model.vision_projection(out).float(), dim=-1)
            return embeds.cpu().numpy()

    def encode_images(self, pixel_values: Any, keep_vit: bool = False) -> ImageEncoding:
        vit = self.vit_features(pixel_values)
        return ImageEncoding(self.query_embeds_from_vit(vit), vit if keep_vit else None)

    # -- texts --------------------------------------------------------------------------------
    def _tokenize(self, texts: Sequence[str]):
        if isinstance(texts, str) or not texts:
            raise UsageError("expected a non-empty list of texts")
        tokens = self.tokenizer(
            [as_trained(text) for text in texts], padding="longest", truncation=True,
            max_length=self.max_text_tokens, return_tensors="pt",
        )
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (B, D) L2-normalised projections of the Q-Former's [CLS] output."""
        import torch

        model = self.model
        input_ids, attention_mask = self._tokenize(texts)
        with torch.inference_mode():
            embeds = model.embeddings(input_ids=input_ids)
            out = model.qformer(query_embeds=embeds, query_length=0, attention_mask=attention_mask).last_hidden_state
            out = out.to(model.text_projection.weight.dtype)
            cls = torch.nn.functional.normalize(model.text_projection(out[:, 0, :]).float(), dim=-1)  # as above
            return cls.cpu().numpy()

    # -- ITM ----------------------------------------------------------------------------------
    def itm_logits(self, vit_features: Any, texts: Sequence[str]) -> np.ndarray:
        """ITM head logits (N, 2) for N images' ViT features and one text (shared) or N texts (paired)."""
        import torch

        model = self.model
        batch = vit_features.shape[0]
        input_ids, attention_mask = self._tokenize(texts)
        if input_ids.shape[0] == 1:
            input_ids, attention_mask = input_ids.expand(batch, -1), attention_mask.expand(batch, -1)
        elif input_ids.shape[0] != batch:
            raise UsageError(f"ITM needs one text or one per image; got {input_ids.shape[0]} for {batch} images")
        with torch.inference_mode():
            queries = model.query_tokens.expand(batch, -1, -1)
            query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=queries.device)
            embeds = model.embeddings(input_ids=input_ids, query_embeds=queries)
            image_mask = torch.ones(vit_features.shape[:-1], dtype=torch.long, device=vit_features.device)
            out = model.qformer(
                query_embeds=embeds,
                query_length=queries.shape[1],
                attention_mask=torch.cat([query_mask, attention_mask], dim=1),
                encoder_hidden_states=vit_features,
                encoder_attention_mask=image_mask,
            ).last_hidden_state
            out = out.to(model.itm_head.weight.dtype)
            logits = model.itm_head(out[:, : queries.shape[1], :]).mean(dim=1)
            return logits.float().cpu().numpy()

    def itm_probabilities(self, vit_features: Any, texts: Sequence[str]) -> np.ndarray:
        """Match probability softmax(logits)[:, 1], shape (N,)."""
        return match_probability(self.itm_logits(vit_features, texts)).astype(np.float32)


def match_probability(logits: np.ndarray) -> np.ndarray:
    """ITM logits (N, 2) -> softmax(logits)[:, 1], computed stably."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted[:, 1] / shifted.sum(axis=1)
