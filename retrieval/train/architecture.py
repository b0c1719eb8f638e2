"""The shapes model's sizes, and empty BLIP-2 models and processors of those sizes, in transformers'
own classes so that the trained weights save as standard checkpoints."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Architecture:
    image_size: int = 64
    patch_size: int = 16  # 4x4 patches: a small thing fits in one, so its shape is visible locally
    vision_hidden: int = 128
    vision_layers: int = 4
    qformer_hidden: int = 128
    qformer_layers: int = 2
    cross_attention_frequency: int = 1
    heads: int = 4
    queries: int = 32
    embed_dim: int = 64  # ITC space (256 in blip2-itm-vit-g)
    lm_hidden: int = 128
    lm_layers: int = 2
    max_text_positions: int = 64
    # the Q-Former's dropout while it trains (BERT's and LAVIS's 0.1; inference runs without it)
    qformer_dropout: float = 0.0


def _vision_config(arch: Architecture):
    from transformers import Blip2VisionConfig

    return Blip2VisionConfig(
        hidden_size=arch.vision_hidden, intermediate_size=4 * arch.vision_hidden,
        num_hidden_layers=arch.vision_layers, num_attention_heads=arch.heads, image_size=arch.image_size,
        patch_size=arch.patch_size, layer_norm_eps=1e-6, qkv_bias=True, attention_dropout=0.0,
        initializer_range=0.02,  # transformers' default, 1e-10, suits loading a trained ViT, not training one
    )


def _qformer_config(arch: Architecture, vocab_size: int, text_input: bool):
    from transformers import Blip2QFormerConfig

    return Blip2QFormerConfig(
        vocab_size=vocab_size, hidden_size=arch.qformer_hidden, num_hidden_layers=arch.qformer_layers,
        num_attention_heads=arch.heads, intermediate_size=4 * arch.qformer_hidden,
        cross_attention_frequency=arch.cross_attention_frequency, encoder_hidden_size=arch.vision_hidden,
        max_position_embeddings=arch.max_text_positions, use_qformer_text_input=text_input, pad_token_id=0,
        hidden_dropout_prob=arch.qformer_dropout, attention_probs_dropout_prob=arch.qformer_dropout,
    )


def retrieval_processor(arch: Architecture, words: list[str]):
    from transformers import Blip2Processor

    from retrieval.tiny import bert_tokenizer, image_processor

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = bert_tokenizer(Path(scratch), words)
    return Blip2Processor(image_processor=image_processor(arch.image_size), tokenizer=tokenizer)


def caption_processor(arch: Architecture, corpus: list[str]):
    from transformers import Blip2Processor

    from retrieval.tiny import bpe_tokenizer, image_processor

    return Blip2Processor(
        image_processor=image_processor(arch.image_size), tokenizer=bpe_tokenizer(corpus), num_query_tokens=arch.queries
    )


def retrieval_model(arch: Architecture, processor: Any):
    """An untrained `Blip2ForImageTextRetrieval` (ViT + Q-Former with text input + ITC/ITM heads)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    config = Blip2Config(
        vision_config=_vision_config(arch).to_dict(),
        qformer_config=_qformer_config(arch, len(processor.tokenizer), text_input=True).to_dict(),
        num_query_tokens=arch.queries, image_text_hidden_size=arch.embed_dim,
    )
    return _init_queries(Blip2ForImageTextRetrieval(config))


def caption_model(arch: Architecture, processor: Any):
    """An untrained `Blip2ForConditionalGeneration` with an OPT decoder of the processor's vocabulary."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    tokenizer = processor.tokenizer
    text = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=arch.lm_hidden, num_hidden_layers=arch.lm_layers,
        ffn_dim=4 * arch.lm_hidden, num_attention_heads=arch.heads, max_position_embeddings=2 * arch.max_text_positions + arch.queries,
        word_embed_proj_dim=arch.lm_hidden, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dropout=0.0, attention_dropout=0.0,
    )
    config = Blip2Config(
        vision_config=_vision_config(arch).to_dict(),
        qformer_config=_qformer_config(arch, 2, text_input=False).to_dict(),
        text_config=text.to_dict(), num_query_tokens=arch.queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return _init_queries(Blip2ForConditionalGeneration(config))


def _init_queries(model: Any):
    """Query tokens drawn from N(0, 0.02) as LAVIS draws them: transformers starts them at zero, and 32
    equal queries would stay equal through training."""
    import torch

    with torch.no_grad():
        model.query_tokens.normal_(0.0, model.config.qformer_config.initializer_range)
    return model
