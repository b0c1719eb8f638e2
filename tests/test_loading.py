"""Loading by hub id or directory, the short missing-model error, and a fast `--help`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from retrieval.config import ModelConfig
from retrieval.errors import ModelNotFoundError
from retrieval.loading import load
from tests.conftest import ROOT, make_images, run_cli


def test_tiny_checkpoints_have_the_real_layout(tiny_models):
    retrieval_dir, caption_dir = tiny_models
    for directory in tiny_models:
        names = {p.name for p in directory.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
        assert "processor_config.json" in names or "preprocessor_config.json" in names
    retrieval_config = json.loads((retrieval_dir / "config.json").read_text())
    assert retrieval_config["architectures"] == ["Blip2ForImageTextRetrieval"]
    assert retrieval_config["qformer_config"]["use_qformer_text_input"] is True
    assert retrieval_config["num_query_tokens"] == 32
    caption_config = json.loads((caption_dir / "config.json").read_text())
    assert caption_config["architectures"] == ["Blip2ForConditionalGeneration"]
    assert caption_config["text_config"]["model_type"] == "opt"
    assert caption_config["image_token_index"] is not None


def test_captioner_loads_through_the_same_loader(tiny_models):
    loaded = load("Blip2ForConditionalGeneration", ModelConfig(name=str(tiny_models[1]), device="cpu"))
    assert type(loaded.model).__name__ == "Blip2ForConditionalGeneration"
    assert loaded.processor.num_query_tokens == 32


@pytest.mark.parametrize("name, says", [
    ("Salesforce/blip2-itm-vit-g-not-cached", "hf download Salesforce/blip2-itm-vit-g-not-cached --local-dir DIR"),
    ("./no/such/dir", "no/such/dir: no such directory"),
    ("/no/such/abs", "/no/such/abs: no such directory"),
])
def test_missing_model_is_a_model_not_found_error(name, says):
    with pytest.raises(ModelNotFoundError) as info:
        load("Blip2ForImageTextRetrieval", ModelConfig(name=name, device="cpu"))
    assert name in str(info.value) and says in str(info.value)
    assert ("hf download" in str(info.value)) == (not name.startswith(("/", "."))), "no download command for a path"


def test_a_directory_or_file_that_is_no_checkpoint_is_named(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    for name, reason in ((tmp_path, "the directory has no config.json"),
                         (tmp_path / "weights.bin", "a file, not a directory")):
        with pytest.raises(ModelNotFoundError, match=reason):
            load("Blip2ForConditionalGeneration", ModelConfig(name=str(name), device="cpu"))


def test_a_corrupt_checkpoint_is_one_clear_error(tiny_model, tmp_path):
    import shutil

    for name, damage in (("truncated", lambda f: f.write_bytes(f.read_bytes()[:20_000])),
                         ("garbage", lambda f: f.write_bytes(b"\x00" * 100))):
        broken = shutil.copytree(tiny_model, tmp_path / name)
        damage(broken / "model.safetensors")
        with pytest.raises(ModelNotFoundError, match=f"{name}: Error while deserializing"):
            load("Blip2ForImageTextRetrieval", ModelConfig(name=str(broken), device="cpu"))


@pytest.mark.parametrize("missing, says", [
    # transformers built a BertTokenizer of the special tokens alone: every word [UNK], searches noise
    ("tokenizer.json", "its tokenizer has no vocabulary (tokenizer.json or vocab.txt is missing)"),
    # transformers guessed another tokenizer class, without padding: a traceback at the first search
    ("tokenizer_config.json", "its tokenizer has no padding token (tokenizer_config.json is missing?)"),
])
def test_a_checkpoint_missing_tokenizer_files_is_refused(tiny_model, tmp_path, missing, says):
    import shutil

    broken = shutil.copytree(tiny_model, tmp_path / "partial")
    (broken / missing).unlink()
    with pytest.raises(ModelNotFoundError) as raised:
        load("Blip2ForImageTextRetrieval", ModelConfig(name=str(broken), device="cpu"))
    assert f"{broken}: {says}; download the model again." in str(raised.value)


def test_a_long_loader_error_is_cut_at_its_first_sentence(tiny_model, tmp_path):
    """transformers' error for a missing processor file goes on about the hub for a local directory; cut
    at 200 characters it ended mid-word."""
    import shutil

    broken = shutil.copytree(tiny_model, tmp_path / "partial")
    (broken / "processor_config.json").unlink()
    with pytest.raises(ModelNotFoundError) as raised:
        load("Blip2ForImageTextRetrieval", ModelConfig(name=str(broken), device="cpu"))
    assert str(raised.value).splitlines()[0].endswith(f"{broken}: Can't load image processor for '{broken}'.")


def test_a_checkpoint_of_the_other_class_is_refused(tiny_models):
    retrieval_dir, caption_dir = tiny_models
    with pytest.raises(ModelNotFoundError, match="is for Blip2ForConditionalGeneration, not Blip2ForImageTextRe"):
        load("Blip2ForImageTextRetrieval", ModelConfig(name=str(caption_dir), device="cpu"))
    with pytest.raises(ModelNotFoundError, match="--caption-model DIR"):
        load("Blip2ForConditionalGeneration", ModelConfig(name=str(retrieval_dir), device="cpu"))


def test_a_model_directory_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    """An index records its model, and later runs without --model load it: recorded as given
    ('models/blip2'), it named nothing to a run from another folder (a cron job's)."""
    (tmp_path / "models" / "blip2").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "models" / "blip2")
    monkeypatch.chdir(tmp_path / "models")
    assert ModelConfig.retrieval("blip2").name == str(tmp_path / "models" / "blip2")
    assert ModelConfig.captioning("../link").name == str(tmp_path / "link")  # the link, not where it points
    assert ModelConfig(name="Salesforce/blip2-itm-vit-g").name == "Salesforce/blip2-itm-vit-g"  # a hub id
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ModelConfig(name="~/models/blip2").name == str(tmp_path / "models" / "blip2")


def test_an_index_remembers_a_relative_model_directory_absolutely(tmp_path):
    result = run_cli("index", str(make_images(tmp_path / "photos", 2, seed=3)[0].parent), "--index",
                     str(tmp_path / "idx"), "--model", "retrieval/checkpoints/blip2-itm-shapes", "-q")  # from ROOT
    assert result.returncode == 0, result.stderr
    status = json.loads(run_cli("status", "--index", str(tmp_path / "idx"), "--json", check=True).stdout)
    assert status["model"] == str(ROOT / "retrieval" / "checkpoints" / "blip2-itm-shapes")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_loads_are_the_same_model(tiny_models, dtype):
    """The fingerprint an index checks reads the query tokens and the Q-Former's layernorm, which
    transformers keeps in fp32 for fp16 loads but not for bf16: an index built in fp32 refused
    `--dtype bfloat16` as another model ("built with model M (fingerprint a), not M (fingerprint b)")."""
    from retrieval.captioner import Blip2Captioner, CaptionOptions
    from retrieval.encoders import Blip2Retriever

    retrieval, caption = (str(path) for path in tiny_models)
    full = Blip2Retriever.load(ModelConfig(name=retrieval, device="cpu", dtype="float32"))
    half = Blip2Retriever.load(ModelConfig(name=retrieval, device="cpu", dtype=dtype))
    assert half.identity == full.identity and str(half.model.vision_model.embeddings.patch_embedding.weight.dtype) == f"torch.{dtype}"
    pixels = np.zeros((2, 3, half.transform.height, half.transform.width), np.uint8)
    assert np.allclose(half.encode_images(pixels).query_embeds, full.encode_images(pixels).query_embeds, atol=0.05)
    assert Blip2Captioner.load(ModelConfig(name=caption, device="cpu", dtype=dtype)).caption(pixels, CaptionOptions(max_new_tokens=4))


def test_a_missing_model_is_refused_before_torch_and_transformers_load(tmp_path):
    code = (
        "import sys\nfrom retrieval.config import ModelConfig\nfrom retrieval.errors import ModelNotFoundError\n"
        "from retrieval.loading import load\n"
        f"for name in ('Salesforce/not-cached-here', {str(tmp_path / 'nothing')!r}, {str(tmp_path)!r}):\n"
        "    try:\n        load('Blip2ForImageTextRetrieval', ModelConfig(name=name, device='cpu'))\n"
        "    except ModelNotFoundError:\n        print('REFUSED')\n"
        "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    assert out.count("REFUSED") == 3 and "HEAVY []" in out, out


def test_missing_model_cli_says_what_to_do_with_exit_2(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    # From a fresh interpreter: the message must hold however the libraries' imports go.
    result = run_cli("index", str(images), "--index", str(tmp_path / "idx"), "--model", "Salesforce/blip2-itm-vit-g",
                     fresh=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3
    assert "Salesforce/blip2-itm-vit-g" in result.stderr and "--model DIR" in result.stderr


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys\nfrom api.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'faiss') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "index" in out and "search" in out


def test_make_tiny_command(tmp_path):
    result = run_cli("models", "make-tiny", str(tmp_path / "m"), check=True)
    assert (tmp_path / "m" / "blip2-itm-tiny" / "model.safetensors").exists()
    assert (tmp_path / "m" / "blip2-opt-tiny" / "model.safetensors").exists()
    assert "blip2-itm-tiny" in result.stdout
    assert len(result.stdout.splitlines()) == 2, result.stdout  # the two paths and nothing else


@pytest.mark.parametrize("command", [("models", "make-tiny"), ("demo", "--dir"), ("train", "--smoke", "--out")])
def test_a_directory_that_cannot_be_made_is_one_clear_error(tmp_path, command):
    (tmp_path / "a-file").write_text("")
    result = run_cli(*command, str(tmp_path / "a-file" / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == f"Error: cannot write to {tmp_path}/a-file/out: Not a directory\n"


def test_tiny_tokenizer_knows_its_words(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a red circle near two dogs")["input_ids"])
    assert tokens == ["[CLS]", "a", "red", "circle", "near", "two", "dogs", "[SEP]"]
    assert tokenizer.bos_token == "[DEC]"
