"""Forget indexed files without touching them on disk: a folder deleted or a drive unplugged since it
was indexed (`index` refuses a path that is not there, so it cannot remove them), or one image."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence


from indexer.store import IndexStore
from indexer.walk import at_or_under, shown, storable
from retrieval.errors import UsageError


@dataclass(frozen=True)
class Forgotten:
    files: int
    images: int  # distinct images whose vectors went with them; others share their content with a file kept
    roots: list[str]  # folders (or files) given to `index` that it will no longer search or serve
    still_walked: list[str]  # targets still on disk inside a folder `index` walks: its next run adds them again


def forget(store: IndexStore, targets: Sequence[str]) -> Forgotten:
    """Remove the files at or under each of `targets` (catalog paths, which need not exist any more)
    from the catalog and the FAISS file, and the index roots among them. A target with nothing
    indexed is an error, and then nothing is removed."""
    catalog = store.catalog
    with store.writer_lock():
        roots = catalog.roots()
        for target in targets:
            if not storable(target) or (not catalog.has_under(target)
                                        and not any(at_or_under(root, target) for root in roots)):
                raise UsageError(f"nothing is indexed at {shown(target)}")
        files, orphaned = catalog.remove_under(targets)
        removed_roots = catalog.remove_roots(targets)
        identity = catalog.model()
        if identity is not None and orphaned:
            version = catalog.vectors_version()  # before load_vectors reconciles: see IndexStore.save_vectors
            vectors = store.load_vectors(identity)  # reconciled: the orphans' vectors are gone from it
            store.save_vectors(vectors, synced=version)
        remaining = [root for root in roots if root not in removed_roots]
    still_walked = [t for t in targets if os.path.exists(t) and any(at_or_under(t, root) for root in remaining)]
    return Forgotten(files, len(orphaned), removed_roots, still_walked)
