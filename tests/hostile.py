"""Decode tasks that misbehave like hostile files do, for the worker-pool tests (importable by workers)."""

import os
import struct
import time
import zlib

from indexer.decode import decode_file


def hang_or_crash(path, options):
    name = os.path.basename(path)
    if name.startswith("hang"):
        time.sleep(3600)
    if name.startswith("crash"):
        os._exit(139)  # what a segfaulting C decoder looks like from outside
    if name.startswith("bomb"):
        bytearray(64 << 30)  # over the worker's address-space cap: MemoryError, not the OOM killer
    return decode_file(path, options)


def hang_or_crash_by_content(path, options):
    """As `hang_or_crash`, by the file's first bytes: an upload reaches the decoder under a temporary name."""
    with open(path, "rb") as handle:
        head = handle.read(5)
    if head == b"hang!":
        time.sleep(3600)
    if head == b"crash":
        os._exit(139)
    return decode_file(path, options)


def png_claiming(width: int, height: int) -> bytes:
    """A few bytes of PNG whose header claims `width` x `height` grey pixels: a decompression bomb as a
    decoder's size check sees it, without the test allocating the image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
