"""Decode tasks that misbehave like hostile files do, for the worker-pool tests (importable by workers)."""

import os
import time

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
