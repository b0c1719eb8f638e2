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
