"""Reader stage: every image mode to RGB, orientation, animations, draft decoding, bad files, hostile files."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.decode import DecodeOptions, Decoded, Skipped, decode_bytes, decode_file, to_rgb
from indexer.workers import DecodePool, PoolOptions
from retrieval.preprocess import ImageTransform
from tests.conftest import make_images
from tests.hostile import png_claiming

TRANSFORM = ImageTransform(224, 224, int(Image.Resampling.BICUBIC), 1 / 255, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
OPTIONS = DecodeOptions(TRANSFORM, max_pixels=50_000_000)


def model_input(decoded: Decoded) -> np.ndarray:
    """Decoders send uint8 at the model's size; compare what the model receives."""
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (3, TRANSFORM.height, TRANSFORM.width)
    return TRANSFORM.normalise(decoded.pixels)


def test_uint8_and_float_inputs_reach_the_model_identically():
    import torch

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)) for _ in range(2)]
    as_float = np.stack([TRANSFORM(image) for image in images])
    as_uint8 = np.stack([TRANSFORM.resize(image) for image in images])
    assert as_uint8.dtype == np.uint8 and as_float.dtype == np.float32
    np.testing.assert_array_equal(TRANSFORM.normalise(as_uint8), as_float)
    expected = torch.from_numpy(as_float)
    assert torch.equal(TRANSFORM.to_tensor(as_uint8, "cpu", torch.float32), expected)
    assert torch.equal(TRANSFORM.to_tensor(as_float, "cpu", torch.float32), expected)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    la = Image.new("LA", (4, 4), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    decoded = Image.open(io.BytesIO(encode(image, "PNG")))
    assert to_rgb(decoded).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))  # mid-grey in 16 bits
    assert image.mode.startswith("I;16")
    assert to_rgb(image).getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_and_grey():
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_exif_orientation_applied_and_reported():
    image = Image.new("RGB", (200, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 100, 100))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    decoded = decode_bytes(encode(image, "JPEG", exif=exif), OPTIONS)
    assert isinstance(decoded, Decoded)
    assert (decoded.width, decoded.height) == (100, 200)
    upright = np.asarray(Image.new("RGB", (100, 200)))  # after rotation red is on top
    plain = decode_bytes(encode(image.transpose(Image.Transpose.ROTATE_270), "JPEG"), OPTIONS)
    np.testing.assert_allclose(model_input(decoded), model_input(plain), atol=0.1)
    assert upright.shape == (200, 100, 3)


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 255, 0)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_bytes(buffer.getvalue(), OPTIONS)
    first = decode_bytes(encode(frames[0], "GIF"), OPTIONS)
    np.testing.assert_allclose(model_input(decoded), model_input(first), atol=1e-6)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_formats_are_recognised_by_content(fmt):
    decoded = decode_bytes(encode(Image.new("RGB", (40, 30), (9, 99, 199)), fmt), OPTIONS)
    assert isinstance(decoded, Decoded) and decoded.format == fmt and decoded.pixels.shape == (3, 224, 224)


def test_draft_decode_stays_close_to_full_decode(tmp_path):
    from PIL import ImageFilter

    path = make_images(tmp_path, 1, seed=5, size=(3000, 2000))[0]
    # smooth photo-like content; draft mode changes only what the final 224 px resize would discard
    Image.open(path).filter(ImageFilter.GaussianBlur(4)).save(path, quality=92)
    data = path.read_bytes()
    drafted = decode_bytes(data, OPTIONS)
    full = decode_bytes(data, DecodeOptions(TRANSFORM, OPTIONS.max_pixels, use_draft=False))
    difference = np.abs(model_input(drafted) - model_input(full)) * np.asarray(TRANSFORM.std)[:, None, None]
    assert difference.mean() < 0.01 and difference.max() < 0.1  # in [0, 1] pixel units


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_when_a_plugin_reads_them(fmt):
    from PIL import features

    from indexer.decode import register_optional_formats

    register_optional_formats()  # pillow-heif is in the test extra; AVIF is Pillow's own
    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow was built without AVIF")
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    decoded = decode_bytes(encode(image, fmt), OPTIONS)
    assert isinstance(decoded, Decoded) and decoded.format == fmt
    expected = decode_bytes(encode(image, "PNG"), OPTIONS)
    assert np.abs(model_input(decoded) - model_input(expected)).mean() < 0.1  # lossy codecs, same picture
    broken = encode(image, fmt)[:40]
    assert decode_bytes(broken, OPTIONS).reason in ("corrupt", "truncated")


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"just some text, not an image", "not-an-image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "corrupt"),
    ],
)
def test_bad_bytes_get_reasons(data, reason):
    result = decode_bytes(data, OPTIONS)
    assert isinstance(result, Skipped) and result.reason == reason and result.detail


def test_truncated_and_too_large():
    data = encode(Image.effect_noise((400, 300), 60).convert("RGB"), "JPEG")
    assert decode_bytes(data[: len(data) // 2], OPTIONS).reason == "truncated"
    small_limit = DecodeOptions(TRANSFORM, max_pixels=1000)
    skipped = decode_bytes(data, small_limit)
    assert skipped.reason == "too-large" and "--max-megapixels" in skipped.detail


def test_thumbnails_show_what_the_model_saw(tmp_path):
    """serve's thumbnails used Pillow's convert('RGB'): a 16-bit PNG came out white (it clips, where the
    index scales), and transparent pixels showed whatever colour they hid (the index sees white)."""
    from indexer.decode import thumbnail_jpeg

    def thumbnail_of(image, name="x.png", **kwargs):
        image.save(tmp_path / name)
        made = thumbnail_jpeg(str(tmp_path / name), 256, _sha256(tmp_path / name), **kwargs)
        return made if isinstance(made, Skipped) else Image.open(io.BytesIO(made))

    gradient = Image.fromarray(np.linspace(0, 65535, 300 * 200).reshape(200, 300).astype(np.uint16))
    assert gradient.mode == "I;16" and np.asarray(gradient.convert("RGB")).mean() > 250
    thumb = thumbnail_of(gradient)
    assert thumb.size == (256, 171) and abs(np.asarray(thumb).mean() - 127.5) < 3
    hidden_red = thumbnail_of(Image.new("RGBA", (40, 30), (255, 0, 0, 0)))
    assert np.asarray(hidden_red).min() > 250  # white, not red
    photo = thumbnail_of(Image.effect_noise((2000, 1500), 60).convert("RGB"), "big.jpg")
    assert photo.size == (256, 192)
    assert thumbnail_of(Image.new("RGB", (200, 100)), max_pixels=10_000).reason == "too-large"
    (tmp_path / "text.png").write_bytes(b"just some text")
    assert thumbnail_jpeg(str(tmp_path / "text.png"), 256, _sha256(tmp_path / "text.png")).reason == "not-an-image"
    data = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert thumbnail_jpeg(str(tmp_path / "cut.jpg"), 256, _sha256(tmp_path / "cut.jpg")).reason == "truncated"


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_file_read_again_must_hold_the_content_it_was_indexed_with(tmp_path):
    """Re-ranking, captions and thumbnails file what they make from a file under the content hash it
    was indexed with; a file edited or replaced since holds other content, which is not decoded at
    all, so a decompression bomb put in an indexed image's place is not decoded without a limit."""
    from indexer.decode import thumbnail_jpeg

    photo = make_images(tmp_path, 1, seed=3)[0]
    indexed_hash = _sha256(photo)
    legacy_hash = hashlib.blake2b(photo.read_bytes(), digest_size=20).hexdigest()  # catalogs before 2026-11
    unlimited = DecodeOptions.for_indexed(TRANSFORM)
    for expected in (indexed_hash, legacy_hash):
        assert isinstance(decode_file(str(photo), unlimited, expected_hash=expected), Decoded)
        assert isinstance(thumbnail_jpeg(str(photo), 64, expected), bytes)
    photo.write_bytes(png_claiming(30_000, 30_000))  # 900 MP
    changed = decode_file(str(photo), unlimited, expected_hash=indexed_hash)
    assert changed.reason == "changed" and changed.content_hash == _sha256(photo)
    assert decode_file(str(photo), unlimited, expected_hash=legacy_hash).reason == "changed"
    assert thumbnail_jpeg(str(photo), 64, indexed_hash).reason == "changed"
    assert thumbnail_jpeg(str(photo), 64, legacy_hash).reason == "changed"
    assert decode_file(str(photo), OPTIONS).reason == "too-large"  # read as new, it meets the limit


def test_pool_survives_hangs_crashes_and_bombs(tmp_path):
    from tests.hostile import hang_or_crash

    good = make_images(tmp_path, 4, seed=1)
    names = ["hang.jpg", "crash.jpg", "bomb.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(good[0].read_bytes())
    order = [str(good[0]), str(tmp_path / "hang.jpg"), str(good[1]), str(tmp_path / "crash.jpg"),
             str(good[2]), str(tmp_path / "bomb.jpg"), str(good[3])]
    options = PoolOptions(workers=2, timeout_s=3, memory_limit_bytes=2 << 30)
    with DecodePool(OPTIONS, options, task=hang_or_crash) as pool:
        results = list(pool.imap(order))
    assert [p for p, _ in results] == order
    outcome = {p.split("/")[-1]: r for p, r in results}
    assert outcome["hang.jpg"].reason == "decoder-timeout"
    assert outcome["crash.jpg"].reason == "decoder-crashed"
    assert outcome["bomb.jpg"].reason == "out-of-memory"
    assert all(isinstance(outcome[p.name], Decoded) for p in good)


def test_a_query_image_is_read_up_to_a_limit(tmp_path):
    """`search --image` decodes in the searching process: `/dev/zero` (or a 20 GB file named .jpg) was
    read until memory ran out. A pipe (`--image <(curl ...)`) still works."""
    import os
    import threading


    options = DecodeOptions(TRANSFORM, max_pixels=10**8, max_bytes=1 << 20)
    endless = decode_file("/dev/zero", options)
    assert isinstance(endless, Skipped) and (endless.reason, endless.detail) == ("too-large", "the file is over 1 MB")
    make_images(tmp_path, 1)
    os.mkfifo(tmp_path / "pipe")
    writer = threading.Thread(target=lambda: (tmp_path / "pipe").write_bytes((tmp_path / "img0000.jpg").read_bytes()))
    writer.start()
    assert isinstance(decode_file(str(tmp_path / "pipe"), options), Decoded)
    writer.join()


def test_a_file_larger_than_any_image_within_the_limit_is_skipped_unread(tmp_path):
    """A disk image named .img or an archive without its extension was read whole, into the worker's
    memory cap, on every run (out-of-memory is retried); its size says enough."""

    big = tmp_path / "disk.img"
    with open(big, "wb") as handle:
        handle.truncate(2 << 30)  # sparse: reading it would take seconds and 2 GB
    skipped = decode_file(str(big), OPTIONS)
    assert isinstance(skipped, Skipped) and skipped.reason == "too-large"
    assert skipped.detail == "the file is 2.0 GB, more than an image of 50 megapixels takes (--max-megapixels)"
