"""Reader stage: one file in, pixels ready for the model (or a reason it was skipped) out.

Runs inside decode worker processes (see `workers.py`), so it imports neither torch nor
transformers. Every failure becomes a `Skipped` with a short reason code the summary counts and a
detail the catalog keeps.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import warnings
from dataclasses import dataclass

import numpy as np

from retrieval.preprocess import ImageTransform

# Reason codes, counted per run and stored in the catalog as "code: detail".
EMPTY = "empty"
NOT_AN_IMAGE = "not-an-image"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
TOO_LARGE = "too-large"
UNREADABLE = "unreadable"
DECODER_TIMEOUT = "decoder-timeout"
DECODER_CRASHED = "decoder-crashed"
OUT_OF_MEMORY = "out-of-memory"
# Read again after indexing (re-ranking, captions, thumbnails), the file no longer holds the content
# the catalog has for it: what is made from it would be filed under the old content's hash.
CHANGED = "changed"
CHANGED_DETAIL = "the file has changed since it was indexed; index its folder again"
# Reasons that come from this run's limits or the machine's state, not from the file's bytes: a later
# run tries such a file again though it is unchanged (after `--max-megapixels` or `--decode-timeout`
# were raised, a permission fixed, memory freed). The rest stand until the file changes.
RETRIED = frozenset({TOO_LARGE, UNREADABLE, DECODER_TIMEOUT, DECODER_CRASHED, OUT_OF_MEMORY})

DEFAULT_MAX_PIXELS = 100_000_000  # `index --max-megapixels` 100: the decompression-bomb guard
# An example image's file: uncompressed 8-bit RGB at 100 megapixels (300 MB) fits, 16-bit (600 MB) not.
QUERY_MAX_BYTES = 512 << 20

_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(frozen=True)
class DecodeOptions:
    transform: ImageTransform
    max_pixels: int
    use_draft: bool = True
    max_bytes: int | None = None  # read no more of a file: one read in the searching process itself

    @classmethod
    def for_indexed(cls, transform: ImageTransform) -> "DecodeOptions":
        """For files read again after indexing (re-ranking, captions), each with the content hash it
        was indexed with (`decode_file`'s `expected_hash`): no size limit here, indexing already
        applied `--max-megapixels` to that content, and other content is not decoded."""
        return cls(transform, max_pixels=1 << 40)

    @classmethod
    def for_query(cls, transform: ImageTransform) -> "DecodeOptions":
        """For an example image (`search --image`, an HTTP upload), decoded in the searching process
        itself: indexing's default limit, so a small crafted PNG cannot make it allocate gigabytes, and
        a byte limit, so a large file or an endless one (`--image /dev/zero`) cannot either."""
        return cls(transform, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=QUERY_MAX_BYTES)


@dataclass(frozen=True)
class Decoded:
    content_hash: str
    pixels: np.ndarray  # (3, H, W) uint8 at the model's size; `ImageTransform.to_tensor` normalises it
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class Skipped:
    reason: str
    detail: str
    content_hash: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None

    @property
    def error(self) -> str:
        return f"{self.reason}: {self.detail}"


def content_hash(data: bytes) -> str:
    # SHA-256 because CPUs hash it in hardware (SHA-NI, ARMv8 SHA2): 1.2 ms for a 2 MB photo here,
    # against 2.5 to 3.5 ms for BLAKE2b, a tenth of the cost of decoding it at reduced scale.
    # Catalogs written with BLAKE2b (before 2026-11) stay valid; their files get the new hash
    # when they are renamed or touched, and are then embedded again once instead of reused.
    return hashlib.sha256(data).hexdigest()


def same_content(data: bytes, digest: str, expected_hash: str) -> bool:
    """Whether `data` (whose SHA-256 is `digest`) is the content hashed as `expected_hash`."""
    if not _legacy(expected_hash):
        return digest == expected_hash
    hasher = _hasher_for(expected_hash)
    hasher.update(data)
    return hasher.hexdigest() == expected_hash


def _legacy(expected_hash: str) -> bool:
    """Catalogs written before 2026-11 hold content hashes as BLAKE2b-160 (40 hex digits)."""
    return len(expected_hash) == 40


def _hasher_for(expected_hash: str):
    return hashlib.blake2b(digest_size=20) if _legacy(expected_hash) else hashlib.sha256()


def decode_file(path: str, options: DecodeOptions, expected_hash: str | None = None) -> Decoded | Skipped:
    """`expected_hash`: the content the file was indexed with; other content is `CHANGED`, not decoded."""
    limit = options.max_bytes
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size  # 0 for a pipe
            if limit is None and size > _bytes_for(options.max_pixels):
                # A disk image or an archive under a name that might be an image's: read, it would run
                # into the worker's memory cap on every run; its size says enough.
                return Skipped(TOO_LARGE, f"the file is {size / 2**30:.1f} GB, more than an image of "
                                          f"{options.max_pixels / 1e6:g} megapixels takes (--max-megapixels)")
            data = handle.read() if limit is None else handle.read(limit + 1)
    except OSError as exc:
        return Skipped(UNREADABLE, exc.strerror or str(exc))
    if limit is not None and len(data) > limit:
        return Skipped(TOO_LARGE, f"the file is over {limit >> 20} MB")
    return decode_bytes(data, options, expected_hash)


def _bytes_for(max_pixels: int) -> int:
    """The largest file an image within `max_pixels` plausibly needs: uncompressed RGBA in 32-bit
    floats (16 bytes a pixel), with room for metadata and previews."""
    return 16 * max_pixels + (64 << 20)


@functools.cache
def register_optional_formats() -> None:
    """HEIC/HEIF through pillow-heif when it is installed (`pip install blipsearch[heif]`); AVIF is
    Pillow's own from Pillow 11.3 on."""
    try:
        import pillow_heif
    except ImportError:
        return
    pillow_heif.register_heif_opener()


def decode_bytes(data: bytes, options: DecodeOptions, expected_hash: str | None = None) -> Decoded | Skipped:
    from PIL import Image, UnidentifiedImageError

    register_optional_formats()
    digest = content_hash(data)
    if expected_hash is not None and not same_content(data, digest, expected_hash):
        return Skipped(CHANGED, CHANGED_DETAIL, digest)
    if not data:
        return Skipped(EMPTY, "the file is empty", digest)
    Image.MAX_IMAGE_PIXELS = None  # we apply our own limit below, with a clearer message
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if _has_image_signature(data):
            return Skipped(CORRUPT, "looks like an image but cannot be decoded", digest)
        return Skipped(NOT_AN_IMAGE, "not a format Pillow can read", digest)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this file's problem only
        return Skipped(CORRUPT, _describe(exc), digest)
    width, height = _oriented_size(image)
    fmt = image.format or "unknown"
    if width * height > options.max_pixels:
        return Skipped(
            TOO_LARGE,
            f"{width}x{height} is {width * height / 1e6:.0f} MP, over the {options.max_pixels / 1e6:.0f} MP limit "
            "(raise --max-megapixels to index it)",
            digest, width, height, fmt,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rgb = load_rgb(image, options)
            pixels = options.transform.resize(rgb)
    except MemoryError:
        return Skipped(OUT_OF_MEMORY, "decoding needed more memory than a worker may use", digest, width, height, fmt)
    except Exception as exc:  # noqa: BLE001
        return Skipped(_reason(exc), _describe(exc), digest, width, height, fmt)
    return Decoded(digest, pixels, width, height, fmt)


def load_rgb(image, options: DecodeOptions):
    """First frame, reduced-scale JPEG decode when far larger than needed, EXIF orientation, RGB."""
    return read_rgb(image, (options.transform.width, options.transform.height) if options.use_draft else None)


def read_rgb(image, draft: tuple[int, int] | None):
    """`load_rgb`, drafting JPEGs down towards `draft` (width, height) when given."""
    from PIL import ImageOps

    if draft and image.format == "JPEG":
        # Draft picks the smallest 1/2, 1/4 or 1/8 scale still >= the size asked. At 1/8 libjpeg keeps
        # only each block's mean, an exact 8x8 box filter, so drafting down to the model's input size
        # stays close to a full decode's resize (tested) while skipping the inverse DCT and most of the
        # resize; entropy decoding, the rest of the cost, cannot be skipped.
        image.draft("RGB", draft)
    image.seek(0)
    image.load()
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image):
    """Any mode to RGB: alpha composited over white, 16-bit and float scaled, not clipped."""
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode == "F" and array.max(initial=0) <= 1.0:
            array = array * 255.0
        elif mode != "F" and array.max(initial=0) > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _oriented_size(image) -> tuple[int, int]:
    width, height = image.size
    try:
        orientation = image.getexif().get(_ORIENTATION)
    except Exception:  # noqa: BLE001 - broken EXIF only loses orientation
        orientation = None
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


def _has_image_signature(data: bytes) -> bool:
    riff_webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    iso_media = data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis")
    return data.startswith(_SIGNATURES) or riff_webp or iso_media


def thumbnail_jpeg(path: str, size: int, expected_hash: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes | Skipped:
    """A JPEG at most `size` px on a side of the image at `path`, read as the index reads images (first
    frame, EXIF orientation, alpha over white, 16-bit scaled): a thumbnail shows what the model saw,
    so of the content hashed `expected_hash` only. Made in the caller's process, so within the
    decompression-bomb limit only."""
    from PIL import Image, UnidentifiedImageError

    register_optional_formats()
    Image.MAX_IMAGE_PIXELS = None  # as decode_bytes: our own limit, below
    try:
        handle = open(path, "rb")
    except OSError as exc:
        return Skipped(UNREADABLE, exc.strerror or str(exc))
    try:
        with handle, warnings.catch_warnings(), _opened_if_same(handle, expected_hash) as image:
            if image is None:
                return Skipped(CHANGED, CHANGED_DETAIL)
            warnings.simplefilter("ignore")
            width, height = _oriented_size(image)
            if width * height > max_pixels:
                return Skipped(TOO_LARGE, f"{width}x{height} is over the {max_pixels / 1e6:.0f} MP a thumbnail is "
                                          "made of", None, width, height, image.format)
            rgb = read_rgb(image, (2 * size, 2 * size))
            rgb.thumbnail((size, size))
    except UnidentifiedImageError:
        return Skipped(NOT_AN_IMAGE, "not a format Pillow can read")
    except Exception as exc:  # noqa: BLE001 - as decode_bytes: the file's problem, not the caller's
        return Skipped(_reason(exc), _describe(exc))
    jpeg = io.BytesIO()
    rgb.save(jpeg, "JPEG", quality=85)
    return jpeg.getvalue()


def holds_content(handle, expected_hash: str) -> bool:
    """Whether the open file holds the content hashed `expected_hash` (as `same_content`)."""
    return file_hash(handle, _hasher_for(expected_hash)) == expected_hash


def file_hash(handle, hasher=None) -> str:
    """The open file's `content_hash` (or `hasher`'s), read in chunks, not whole: it may be a 1 GB
    TIFF. (hashlib.file_digest does this from Python 3.11; blipsearch runs on 3.10 too.)"""
    hasher = hasher or hashlib.sha256()
    while chunk := handle.read(1 << 20):
        hasher.update(chunk)
    return hasher.hexdigest()


@contextlib.contextmanager
def _opened_if_same(handle, expected_hash: str):
    """The open file as a Pillow image if it holds the content hashed `expected_hash`, else None."""
    from PIL import Image

    if not holds_content(handle, expected_hash):
        yield None
        return
    handle.seek(0)
    with Image.open(handle) as image:
        yield image


def _reason(exc: BaseException) -> str:
    """The skip reason for a decoder's failure once the image was opened."""
    return TRUNCATED if "truncated" in str(exc).lower() else CORRUPT


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
