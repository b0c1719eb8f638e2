"""The training recipe: its forward passes are the ones transformers runs at inference, its masks are
BLIP-2's, and `blipsearch train` writes checkpoints the loader reads. Quality is checked on the shipped
model in test_shapes_model.py; this file checks the machinery, in seconds."""

from __future__ import annotations

import json

import pytest
import torch

from indexer.synthetic import COLOUR_ATTRIBUTES, Scene, training_set
from retrieval.train.architecture import (
    Architecture, caption_model, caption_processor, retrieval_model, retrieval_processor,
)
from retrieval.train.language import pack
from retrieval.train.loop import Schedule
from retrieval.train.negatives import NegativeBank, hard_negatives
from retrieval.train.stage1 import Pairs, Stage1, multimodal_causal_mask, swap_matrix
from retrieval.train.stage2 import caption_inputs, caption_loss
from tests.conftest import run_cli

SMALL = Architecture(vision_hidden=32, vision_layers=1, qformer_hidden=32, qformer_layers=2, lm_hidden=32, lm_layers=1)
CAPTIONS = ["a small red circle", "a large blue square above a small green triangle", "two small white circles"]


@pytest.fixture(scope="module")
def data():
    return training_set(8, seed=1, corpus_size=50)


@pytest.fixture(scope="module")
def stage1(data):
    torch.manual_seed(0)
    processor = retrieval_processor(SMALL, sorted({w for c in data.corpus + CAPTIONS for w in c.split()}))
    return Stage1(retrieval_model(SMALL, processor).eval(), processor.tokenizer.bos_token_id), processor


def pixels_of(images, processor):
    from retrieval.train.recipe import image_pixels

    return image_pixels(processor, images)


def test_stage1_itc_and_itm_are_what_transformers_computes(stage1, data):
    stage, processor = stage1
    model = stage.model
    pixels = pixels_of(data.images[:3], processor)
    tokens = processor.tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        features = model.vision_model(pixel_values=pixels).last_hidden_state
        ours = torch.einsum("iqd,td->itq", stage.image_embeds(features),
                            stage.text_embeds(tokens["input_ids"], tokens["attention_mask"])).max(dim=2).values
        theirs = model(pixel_values=pixels, **tokens).logits_per_image
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        itm = stage.itm_logits(features, tokens["input_ids"], tokens["attention_mask"])
        reference = model(pixel_values=pixels, **tokens, use_image_text_matching_head=True).logits_per_image
        torch.testing.assert_close(itm, reference, rtol=1e-5, atol=1e-5)


def test_itg_mask_text_sees_only_the_past_and_queries_never_see_text(stage1, data):
    stage, processor = stage1
    pixels = pixels_of(data.images[:1], processor)
    tokens = processor.tokenizer(["a large blue square above a small green triangle"], return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    changed = ids.clone()
    changed[0, 5:] = processor.tokenizer.convert_tokens_to_ids("red")
    with torch.no_grad():
        features = stage.model.vision_model(pixel_values=pixels).last_hidden_state
        before, after = stage.itg_logits(features, ids, mask), stage.itg_logits(features, changed, mask)
    assert torch.equal(before[0, :5], after[0, :5])  # positions before the change cannot see it
    assert not torch.allclose(before[0, 5:], after[0, 5:])
    full = multimodal_causal_mask(2, torch.tensor([[1, 1, 0]]), torch.float32)[0, 0]
    allowed = (full == 0).int().tolist()
    # rows/columns: query, query, text0, text1, pad
    assert allowed == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]


@pytest.mark.timeout(30)
def test_batches_from_fewer_examples_than_a_batch_use_them_all_each_epoch():
    """`train --images 16` meets a batch of 64: it must get batches of 16, not wait forever for 64."""
    import itertools

    from retrieval.train.loop import batches

    drawn = list(itertools.islice(batches(5, 8, seed=0), 3))
    assert all(sorted(b.tolist()) == [0, 1, 2, 3, 4] for b in drawn)
    full = list(itertools.islice(batches(10, 4, seed=0), 4))  # enough examples: batches of 4, 2 per epoch
    assert [len(b) for b in full] == [4, 4, 4, 4]
    assert len(set(torch.cat(full[:2]).tolist())) == 8
    with pytest.raises(ValueError):
        next(batches(0, 4, seed=0))


def test_hard_negatives_never_pick_a_positive():
    generator = torch.Generator().manual_seed(0)
    caption_ids = torch.tensor([0, 0, 1, 2, 2, 3])
    positive = caption_ids[:, None] == caption_ids[None, :]
    similarity = torch.randn(6, 6) * 5
    for _ in range(50):
        picked = hard_negatives(similarity, positive, generator)
        assert not positive[torch.arange(6), picked].any()
    # the most similar negative is drawn most often: "hard" negatives
    similarity = torch.zeros(6, 6)
    similarity[0, 3] = 10
    counts = torch.bincount(torch.stack([hard_negatives(similarity, positive, generator)[0] for _ in range(200)]), minlength=6)
    assert counts[3] > 150


def test_bank_mines_the_hardest_non_matching_pairs_of_the_whole_set_never_a_paraphrase(stage1, data):
    """The bank's negatives come from all of the set, not the batch; the most ITC-similar caption that
    does not match is drawn most often; a caption of the same scene in other words is never drawn."""
    stage, processor = stage1
    captions = ["a small red circle above a large blue square", "a large blue square below a small red circle",
                "a small red circle above a large green square", "two small white circles"] * 2
    tokens = processor.tokenizer(captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        features = stage.model.vision_model(pixel_values=pixels_of(data.images, processor)).last_hidden_state
    groups = torch.tensor([0, 0, 1, 2, 0, 0, 1, 2])  # captions 0 and 1 (and their repeats): one scene
    bank = NegativeBank(features, tokens["input_ids"], tokens["attention_mask"], groups)
    assert bank.text_rows.tolist() == [0, 1, 2, 3]  # one candidate per distinct caption
    bank.refresh(stage)
    # caption 2 is the near miss of image 0 and image 6 that of text 0; the paraphrase (caption 1)
    # and image 4 (a repeat) are as close, but match
    bank.text_embeds = torch.nn.functional.normalize(torch.randn_like(bank.text_embeds), dim=-1)
    image = bank.image_embeds[:1]
    bank.text_embeds[1] = bank.text_embeds[2] = image[0, 5]
    bank.image_embeds = torch.nn.functional.normalize(torch.randn_like(bank.image_embeds), dim=-1)
    text = bank.text_embeds[:1]
    bank.image_embeds[4, 3] = bank.image_embeds[6, 3] = text[0]
    generator = torch.Generator().manual_seed(0)
    picks = [bank.pick(torch.tensor([0]), image, text, 0.05, generator) for _ in range(200)]
    texts = torch.cat([p.texts for p in picks])
    images = torch.cat([p.images for p in picks])
    assert not torch.isin(texts, torch.tensor([0, 1])).any() and not torch.isin(images, torch.tensor([0, 1, 4, 5])).any()
    assert (texts == 2).sum() > 150 and (images == 6).sum() > 150


def test_stage1_losses_draw_itm_negatives_from_the_bank_when_given_one(stage1, data):
    stage, processor = stage1
    tokens = processor.tokenizer(data.captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        features = stage.model.vision_model(pixel_values=pixels_of(data.images, processor)).last_hidden_state
    pairs = Pairs(features, tokens["input_ids"], tokens["attention_mask"], torch.tensor(data.scene_ids))
    bank = NegativeBank(pairs.features, pairs.input_ids, pairs.attention_mask, pairs.groups)
    bank.refresh(stage)
    seen = []
    pick = bank.pick
    bank.pick = lambda *args: seen.append(pick(*args)) or seen[-1]
    with torch.no_grad():
        losses = stage.losses(pairs, torch.tensor([0, 1]), torch.Generator().manual_seed(0), bank)
    assert len(seen) == 1 and torch.isfinite(losses.itm)
    anchors = pairs.groups[torch.tensor([0, 1])]
    assert (pairs.groups[seen[0].images] != anchors).all() and (pairs.groups[seen[0].texts] != anchors).all()


def test_stage2_loss_is_transformers_captioning_loss(data):
    torch.manual_seed(0)
    processor = caption_processor(SMALL, data.corpus + CAPTIONS)
    model = caption_model(SMALL, processor).eval()
    tokens = [processor.tokenizer(c, add_special_tokens=False)["input_ids"] for c in CAPTIONS]
    input_ids, mask, labels = caption_inputs(model, tokens)
    pixels = pixels_of(data.images[:3], processor)
    with torch.no_grad():
        features = model.vision_model(pixel_values=pixels).last_hidden_state
        ours = caption_loss(model, features, input_ids, mask, labels)
        theirs = model(pixel_values=pixels, input_ids=input_ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, theirs)
    # labels cover the caption and EOS, after the 32 image positions and BOS
    row = labels[0][labels[0] != -100].tolist()
    assert row == tokens[0] + [model.config.text_config.eos_token_id]


def test_colour_noise_replaces_only_each_captions_last_colour_word_and_never_a_label(data, monkeypatch):
    from indexer.synthetic import COLOURS
    from retrieval.train import stage2
    from retrieval.train.recipe import colour_noise

    processor = caption_processor(SMALL, data.corpus + CAPTIONS)
    model = caption_model(SMALL, processor).eval()
    tokens = [processor.tokenizer(c, add_special_tokens=False)["input_ids"] for c in CAPTIONS]
    input_ids, mask, labels = caption_inputs(model, tokens)
    assert colour_noise(processor, input_ids, 0.0) is None
    noise = colour_noise(processor, input_ids, 1.0)
    colours = {processor.tokenizer(f" {c}", add_special_tokens=False)["input_ids"][0]: c for c in COLOURS}
    # "red"; "green", not the first thing's "blue"; "white"
    marked = [colours[int(input_ids[row, column])] for row, column in noise.positions.nonzero().tolist()]
    assert marked == ["red", "green", "white"]
    generator = torch.Generator().manual_seed(0)
    noisy = [noise.apply(input_ids, torch.arange(3), generator) for _ in range(20)]
    changed = torch.stack([n != input_ids for n in noisy]).any(dim=0)
    assert changed.any() and not (changed & ~noise.positions).any()
    assert all(set(n[noise.positions].tolist()) <= set(colours) for n in noisy)
    # a batch of other rows, cut short: the positions follow the rows
    rows, length = torch.tensor([2, 0]), int(mask[[2, 0]].sum(dim=1).max())
    cut = torch.stack([noise.apply(input_ids[rows, :length], rows, generator) != input_ids[rows, :length]
                       for _ in range(20)]).any(dim=0)
    assert cut.any() and not (cut & ~noise.positions[rows, :length]).any()
    with pytest.raises(ValueError, match="one token"):
        stage2.word_ids(processor.tokenizer, ["red", "redgreenblue"])

    seen = []  # train_stage2 feeds the loss noisy inputs, with their labels as they were
    monkeypatch.setattr(stage2, "caption_loss", lambda m, f, ids, attn, lab: seen.append((ids, lab)) or
                        (m.language_projection.weight.sum() * 0))
    stage2.train_stage2(model, torch.zeros(3, 5, SMALL.vision_hidden), input_ids, mask, labels,
                        Schedule(steps=6, lr=1e-3, batch_size=3), noise=noise)
    changed_any = False
    for ids, lab in seen:
        order = [next(r for r in range(3) if torch.equal(labels[r, : lab.shape[1]], row)) for row in lab]
        changed = ids != input_ids[order, : ids.shape[1]]
        assert not (changed & ~noise.positions[order, : ids.shape[1]]).any()
        changed_any |= bool(changed.any())
    assert len(seen) == 6 and changed_any


def test_pack_puts_a_separator_before_every_caption():
    rows = pack([[5, 6], [7], [8, 9], [11]], separator=2, length=3)
    assert rows.tolist() == [[2, 5, 6], [2, 7, 2], [8, 9, 2]]  # the stream's tail shorter than a row is dropped


def test_train_smoke_writes_checkpoints_the_loader_reads(tmp_path):
    result = run_cli("train", "--smoke", "--images", "48", "--test-images", "8", "--recolour", "0.5", "--swaps",
                     "--colour-noise", "0.5", "--out", str(tmp_path), "--json", check=True, timeout=600)
    report = json.loads(result.stdout)
    from retrieval.captioner import Blip2Captioner, CaptionOptions
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    retriever = Blip2Retriever.load(ModelConfig(name=report["retrieval_model"], device="cpu"))
    captioner = Blip2Captioner.load(ModelConfig(name=report["caption_model"], device="cpu"))
    assert retriever.identity.num_queries == 32 and retriever.transform.height == 64
    # the fusion of ITM and ITC, calibrated on the validation split (another seed than the test split's)
    assert retriever.fusion.calibrated and report["fusion"] == retriever.fusion.describe()
    assert report["evaluation"]["retrieval"]["fusion"] == report["fusion"]
    assert (tmp_path / "validation-data" / "test.jsonl").read_text() != (tmp_path / "test-data" / "test.jsonl").read_text()
    pixels = pixels_of(training_set(2, seed=3, corpus_size=1).images, captioner.processor).numpy()
    assert len(captioner.caption(pixels, CaptionOptions(max_new_tokens=5))) == 2
    evaluation = report["evaluation"]
    assert evaluation["retrieval"]["images"] == 8 and 0 <= evaluation["captions"]["exact"] <= 1
    assert evaluation["captions_best_of"]["16"]["images"] == 8
    assert set(report["losses"]) == {"vision", "text", "stage1", "language", "stage2"}
    assert report["caption_colour_noise"] == 0.5
    assert all(v == v for v in report["losses"]["stage1"].values())  # no NaN


@pytest.mark.parametrize("from_bank", [False, True], ids=["in-batch", "bank-with-foils"])
def test_training_steps_reduce_the_stage1_loss(stage1, from_bank):
    """A few steps on 8 pairs must fit them better: the objectives are wired to the weights."""
    from retrieval.train.loop import Schedule
    from retrieval.train.stage1 import train_stage1

    _, processor = stage1
    data = training_set(8, seed=1, corpus_size=50, foils_per_scene=2 if from_bank else 0)
    torch.manual_seed(0)
    model = retrieval_model(SMALL, processor)
    pixels = pixels_of(data.images, processor)
    with torch.no_grad():
        features = model.vision_model(pixel_values=pixels).last_hidden_state
    tokens = processor.tokenizer([*data.captions, *data.foils], padding="longest", return_tensors="pt")
    pairs = Pairs(features, tokens["input_ids"], tokens["attention_mask"], torch.tensor(data.scene_ids))
    stage = Stage1(model, processor.tokenizer.bos_token_id)
    with torch.no_grad():
        before = stage.losses(pairs, torch.arange(len(data.captions)), torch.Generator().manual_seed(0))
    after = train_stage1(model, pairs, processor.tokenizer.bos_token_id, Schedule(steps=60, lr=2e-3, batch_size=8),
                         from_bank=from_bank)
    assert after["itc"] < 0.8 * float(before.itc) and after["itg"] < 0.8 * float(before.itg), (before, after)
    assert after["itm"] == after["itm"]  # no NaN


def test_bank_draws_foils_as_negative_texts_never_as_images(stage1):
    stage, processor = stage1
    data = training_set(8, seed=1, corpus_size=50, foils_per_scene=3)
    tokens = processor.tokenizer([*data.captions, *data.foils], padding="longest", return_tensors="pt")
    with torch.no_grad():
        features = stage.model.vision_model(pixel_values=pixels_of(data.images, processor)).last_hidden_state
    bank = NegativeBank(features, tokens["input_ids"], tokens["attention_mask"], torch.tensor(data.scene_ids))
    bank.refresh(stage)
    assert len(bank.image_embeds) == 8 and len(bank.text_embeds) == len(set(data.captions + data.foils))
    generator = torch.Generator().manual_seed(0)
    index = torch.arange(8)
    with torch.no_grad():
        image = stage.image_embeds(features)
        picks = [bank.pick(index, image, stage.text_embeds(tokens["input_ids"][:8], tokens["attention_mask"][:8]),
                           1.0, generator) for _ in range(30)]
    texts, images = torch.cat([p.texts for p in picks]), torch.cat([p.images for p in picks])
    assert (images < 8).all() and (texts >= 8).any()
    groups = torch.tensor(data.scene_ids)
    assert (groups[texts] != groups[index.repeat(30)]).all()  # a foil never describes the image it is drawn for


def test_swaps_are_one_more_itc_text_and_half_of_itm_negatives(stage1):
    """With swaps, each image with one has a swapped caption of its own among its ITC texts, and about
    half of ITM's negative texts are such swaps, never the image's own caption."""
    stage, processor = stage1
    data = training_set(24, seed=2, corpus_size=10, with_swaps=True)
    tokens = processor.tokenizer([*data.captions, *data.foils], padding="longest", return_tensors="pt")
    swaps = swap_matrix(data.swap_rows)
    with torch.no_grad():
        features = stage.model.vision_model(pixel_values=pixels_of(data.images, processor)).last_hidden_state
    pairs = Pairs(features, tokens["input_ids"], tokens["attention_mask"], torch.tensor(data.scene_ids), swaps)
    texts_seen, itm_seen = [], []
    text_embeds, itm_states = stage.text_embeds, stage.itm_states
    stage.text_embeds = lambda ids, mask: texts_seen.append(ids) or text_embeds(ids, mask)
    stage.itm_states = lambda f, ids, mask: itm_seen.append(ids) or itm_states(f, ids, mask)
    try:
        with torch.no_grad():
            losses = stage.losses(pairs, torch.arange(24), torch.Generator().manual_seed(0))
    finally:
        del stage.text_embeds, stage.itm_states
    with_swaps = [i for i, rows in enumerate(data.swap_rows) if rows]
    assert 3 < len(with_swaps) < 24 and torch.isfinite(losses.itc) and torch.isfinite(losses.itm)
    assert [len(ids) for ids in texts_seen] == [24, len(with_swaps)]

    def rows_of(ids):  # which texts (captions, then foils) these token rows are
        width = ids.shape[1]
        padded = torch.nn.functional.pad(ids, (0, tokens["input_ids"].shape[1] - width))
        return [int((tokens["input_ids"] == row).all(dim=1).nonzero()[0]) for row in padded]

    assert all(row in data.swap_rows[i] for i, row in zip(with_swaps, rows_of(texts_seen[1])))
    negatives = rows_of(itm_seen[0][48:])  # the ITM batch: 24 positives, 24 negative images, 24 negative texts
    used = sum(negatives[i] in data.swap_rows[i] for i in with_swaps)
    assert 0 < used < len(with_swaps)
    groups = torch.tensor(data.scene_ids)
    assert all(groups[row] != groups[i] for i, row in enumerate(negatives))


def test_foils_need_the_swaps_or_the_bank(tmp_path):
    result = run_cli("train", "--smoke", "--foils", "2", "--no-swaps", "--out", str(tmp_path))
    assert result.returncode == 2 and "--itm-negatives bank" in result.stderr and "Traceback" not in result.stderr


def test_train_into_an_unwritable_place_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("train", "--smoke", "--out", str(blocker / "models"))
    assert result.returncode == 1 and "cannot write to" in result.stderr and "Traceback" not in result.stderr


def test_patch_labels_follow_what_covers_each_patch_not_its_centre():
    from PIL import Image, ImageDraw

    from retrieval.train.recipe import TrainingSet

    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 6, 6), fill=1)  # a small thing in the corner of patch 0 (16 px)
    ImageDraw.Draw(mask).rectangle((16, 16, 17, 17), fill=2)  # a speck in patch 5: under 10% of it
    codes = [(9, 9), (1, 2), (3, 4)]  # background, thing 1, thing 2
    data = TrainingSet([], [], [], [], (), [mask], [codes], (), [])
    labels = data.patch_labels(4)
    assert labels.shape == (1, 16, 2)
    assert labels[0, 0].tolist() == [1, 2]  # covers 19% of the patch, but not its centre
    assert labels[0, 5].tolist() == [9, 9] and labels[0, 15].tolist() == [9, 9]


def test_the_image_encoder_sees_recoloured_scenes_without_their_colour_labels_and_the_rest_the_named_ones():
    import numpy as np

    from indexer.synthetic import COLOURS
    from retrieval.train.recipe import IGNORED, TrainConfig, _image_encoder, frozen_features

    plain = training_set(12, seed=1, corpus_size=10)
    data = training_set(12, seed=1, corpus_size=10, recolour_share=0.5)
    assert plain.for_vision() is plain and not plain.recoloured
    assert data.captions == plain.captions and data.attributes == plain.attributes
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(data.images, plain.images))
    assert 0 < len(data.recoloured) < 12
    shown = data.for_vision()
    for i in range(12):
        if i not in data.recoloured:
            assert shown.images[i] is data.images[i] and shown.attributes[i] == data.attributes[i]
            continue
        assert (shown.images[i], shown.masks[i]) == data.recoloured[i]
        colours = [a for a, label in enumerate(data.attributes[i]) if a in (1, 4) and label < len(COLOURS)]
        assert [a for a, label in enumerate(shown.attributes[i]) if label == IGNORED] == colours
        assert shown.region_codes[i][0] == data.region_codes[i][0]  # the background keeps its colour class
        assert all(code[0] == IGNORED and code[1:] == named[1:]
                   for code, named in zip(shown.region_codes[i][1:], data.region_codes[i][1:]))

    config = TrainConfig.smoke()
    processor = retrieval_processor(config.architecture, data.words())
    vision = retrieval_model(config.architecture, processor).vision_model
    features, _ = _image_encoder(vision, processor, data, config, None)
    assert torch.equal(features, frozen_features(vision, pixels_of(data.images, processor)))  # stages 1, 2: named


def test_text_pretraining_learns_the_scene_from_the_words_and_leaves_the_image_side_alone():
    import random
    from dataclasses import replace

    from indexer.synthetic import ATTRIBUTE_CLASSES, caption_attributes, paraphrase, scenes, swaps
    from retrieval.train.loop import Schedule
    from retrieval.train.text import pretrain_text

    shown = [s for s in scenes(200, random.Random(3)) if s.relation][:24]
    # each scene's swaps have its caption's words (or its paraphrase's) and other labels
    texts = [t for s in shown for t in (s.caption, paraphrase(s), *(w.caption for w in swaps(s)))]
    processor = retrieval_processor(SMALL, sorted({w for t in texts for w in t.split()}))
    torch.manual_seed(0)
    model = retrieval_model(replace(SMALL, qformer_hidden=128), processor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    labels = torch.tensor([caption_attributes(t) for t in texts])
    loss = pretrain_text(model, tokens["input_ids"], tokens["attention_mask"], labels, ATTRIBUTE_CLASSES,
                         Schedule(steps=300, lr=2e-3, batch_size=32))
    # measured: 0.06; the same training with position embeddings zeroed and frozen (a bag of words) ends at 2.4
    assert loss < 1.0, loss
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "embeddings.word_embeddings.weight" in changed and "embeddings.position_embeddings.weight" in changed
    assert not any(k.startswith(("vision_model.", "query_tokens", "vision_projection", "itm_head")) or "crossattention" in k
                   or "_query." in k for k in changed), sorted(changed)


def test_attribute_agreement_says_which_attributes_a_text_gets_right_whatever_its_wording():
    from indexer.synthetic import attributes, caption_attributes, parse
    from retrieval.train.stage1 import attribute_agreement

    caption = "a small red circle above a large blue square"
    scene = Scene(*parse(caption), (0, 0, 0), caption)
    texts = [caption, "a large blue square below a small red circle",  # the same scene in other words
             "a small blue circle above a large red square",  # colours swapped
             "a small red square above a large blue circle"]  # shapes swapped
    pairs = Pairs(None, None, None, None, image_attributes=torch.tensor([attributes(scene)]),
                  text_attributes=torch.tensor([caption_attributes(t) for t in texts]))
    agree = attribute_agreement(pairs, torch.zeros(4, dtype=torch.long), torch.arange(4))
    wrong = [tuple(int(a) for a in (row == 0).nonzero().flatten()) for row in agree]
    assert wrong == [(), (), COLOUR_ATTRIBUTES, (2, 5)]  # attributes 2 and 5: the two things' shapes


def test_attribute_matching_trains_beside_itm_on_its_pairs_and_is_not_saved(stage1, monkeypatch):
    """With a match weight, each ITM pair is labelled attribute by attribute (a positive agrees on
    all), the extra loss falls as stage 1 trains, and the head stays out of the checkpoint."""
    import retrieval.train.stage1 as stage1_module
    from indexer.synthetic import caption_attributes
    from retrieval.train.loop import Schedule
    from retrieval.train.stage1 import train_stage1

    _, processor = stage1
    data = training_set(16, seed=2, corpus_size=10, with_swaps=True)
    texts = [*data.captions, *data.foils]
    tokens = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    torch.manual_seed(0)
    model = retrieval_model(SMALL, processor)
    saved_keys = set(model.state_dict())
    with torch.no_grad():
        features = model.vision_model(pixel_values=pixels_of(data.images, processor)).last_hidden_state
    pairs = Pairs(features, tokens["input_ids"], tokens["attention_mask"], torch.tensor(data.scene_ids),
                  swap_matrix(data.swap_rows), torch.tensor(data.attributes),
                  torch.tensor([caption_attributes(t) for t in texts]))
    assert Stage1(model, processor.tokenizer.bos_token_id).match_head is None  # the default: ITM alone
    stage = Stage1(model, processor.tokenizer.bos_token_id, match_weight=1.0, attributes=7)
    labels = []
    agreement = stage1_module.attribute_agreement
    monkeypatch.setattr(stage1_module, "attribute_agreement", lambda *a: labels.append(agreement(*a)) or labels[-1])
    with torch.no_grad():
        before = stage.losses(pairs, torch.arange(16), torch.Generator().manual_seed(0))
    assert (labels[0][:16] == 1).all() and (labels[0][16:] == 0).any()  # positives, then the negatives
    assert torch.isclose(before.total, before.itc + before.itm + before.itg + before.match)
    after = train_stage1(model, pairs, processor.tokenizer.bos_token_id, Schedule(steps=60, lr=2e-3, batch_size=16),
                         match_weight=1.0)
    assert after["match"] < 0.9 * float(before.match), (before, after)
    assert set(model.state_dict()) == saved_keys


@pytest.mark.timeout(30)
def test_paired_batches_keep_each_pair_together_and_use_every_example():
    import itertools

    from retrieval.train.loop import paired_batches

    partners = [-1, 3, -1, 1, 5, 4, -1, 9, -1, 7]  # pairs (1, 3), (4, 5), (7, 9)
    drawn = list(itertools.islice(paired_batches(partners, 4, seed=0), 30))
    assert all(2 <= len(b) <= 4 for b in drawn)
    for batch in drawn:
        members = set(batch.tolist())
        assert all(partners[i] in members for i in members if partners[i] >= 0), batch
    assert set(torch.cat(drawn).tolist()) == set(range(10))
    few = list(itertools.islice(paired_batches([1, 0, -1], 8, seed=0), 3))  # fewer than a batch: all of them
    assert all(sorted(b.tolist()) == [0, 1, 2] for b in few)
    with pytest.raises(ValueError):
        next(paired_batches([], 4, seed=0))


def test_itm_negatives_can_be_mined_at_a_temperature_of_their_own(stage1, monkeypatch):
    """LAVIS mines ITM's in-batch negatives by ITC's logits (cosine / ITC's temperature); with a mining
    temperature, by cosine / that temperature instead."""
    import retrieval.train.stage1 as stage1_module

    _, processor = stage1
    data = training_set(8, seed=1, corpus_size=10)
    tokens = processor.tokenizer(data.captions, padding="longest", return_tensors="pt")
    torch.manual_seed(0)
    model = retrieval_model(SMALL, processor).eval()
    with torch.no_grad():
        features = model.vision_model(pixel_values=pixels_of(data.images, processor)).last_hidden_state
    pairs = Pairs(features, tokens["input_ids"], tokens["attention_mask"], torch.tensor(data.scene_ids))
    mined = []
    in_batch = stage1_module.in_batch
    monkeypatch.setattr(stage1_module, "in_batch", lambda index, sim, *a: mined.append(sim) or in_batch(index, sim, *a))
    index = torch.arange(8)
    with torch.no_grad():
        for mining_temperature in (0.0, 0.5):
            stage = Stage1(model, processor.tokenizer.bos_token_id, mining_temperature=mining_temperature)
            stage.losses(pairs, index, torch.Generator().manual_seed(0))
        cosine = torch.einsum("iqd,td->itq", stage.image_embeds(features),
                              stage.text_embeds(tokens["input_ids"], tokens["attention_mask"])).max(dim=2).values
    torch.testing.assert_close(mined[0], cosine / 0.07)  # ITC's temperature, before training
    torch.testing.assert_close(mined[1], cosine / 0.5)
