"""Building, recognising and reading FAISS indexes of each `IndexSpec` kind.

Every kind keeps our int64 vector ids: IVF kinds natively, the others through `IndexIDMap`. Not
`IndexIDMap2`: its reverse map (id -> position), which FAISS rebuilds whenever it reads the file,
cost every search's open about 1.5 kB of memory and 2 us an image (`benchmarks/bench_id_map.py`),
and only serves reading vectors back by id, which `reconstruct` does from `id_map` where that is
needed (an HNSW rebuild). Files an earlier blipsearch saved with `IndexIDMap2` are read as
`IndexIDMap`. The kind is read back from the saved file itself, so a file always says what it holds.
"""

from __future__ import annotations

import logging

import numpy as np

from retrieval.index_types import IndexSpec

log = logging.getLogger(__name__)
GPU_KINDS = ("flat-fp32", "ivf-flat", "ivf-pq")  # what FAISS's GPU cloner supports among ours
# FAISS's GPU k-selection returns at most 2048 results and visits at most 2048 IVF lists a search (more
# is an error, facebookresearch/faiss#2103); our searches ask for up to 32 vectors an image, and 16
# times that where approximate kinds re-score: `MaxSimIndex` asks the GPU for 2048 and goes to the CPU
# only when those do not hold the images it needs.
GPU_MAX_K = 2048


def new_index(spec: IndexSpec, dim: int, vectors: int):
    """An empty index of `spec` for a collection of about `vectors` vectors (untrained if it needs training)."""
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    if spec.kind == "flat-fp32":
        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    if spec.kind == "flat-fp16":
        return faiss.IndexIDMap(faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, ip))
    if spec.kind == "sq8":
        return faiss.IndexIDMap(faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, ip))
    if spec.kind == "hnsw":
        return faiss.IndexIDMap(faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, spec.hnsw_m, ip))
    nlist = spec.nlist_for(vectors)
    if spec.kind == "ivf-flat":
        return faiss.index_factory(dim, f"IVF{nlist},Flat", ip)
    m = spec.pq_m(dim)
    prefix = f"OPQ{m}," if spec.opq else ""
    # "np": no polysemous training, which costs more than the rest and serves a search mode we do not use
    return faiss.index_factory(dim, f"{prefix}IVF{nlist},PQ{m}np", ip)


def kind_of(index) -> str | None:
    import faiss

    if isinstance(index, faiss.IndexIDMap):  # IndexIDMap2 too: older files, until `read_index` converts
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexFlatIP):
            return "flat-fp32"
        if isinstance(inner, faiss.IndexHNSW):
            return "hnsw"
        if isinstance(inner, faiss.IndexScalarQuantizer):
            return {faiss.ScalarQuantizer.QT_fp16: "flat-fp16", faiss.ScalarQuantizer.QT_8bit: "sq8"}.get(inner.sq.qtype)
        return None
    ivf = faiss.try_extract_index_ivf(index)
    ivf = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(ivf, faiss.IndexIVFPQ):
        return "ivf-pq"
    if isinstance(ivf, faiss.IndexIVFFlat):
        return "ivf-flat"
    return None


def matches(index, spec: IndexSpec, dim: int) -> bool:
    """Whether `index` is of `spec`'s kind with the options the user fixed (nlist, m, opq)."""
    import faiss

    if kind_of(index) != spec.kind:
        return False
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return spec.kind != "hnsw" or faiss.downcast_index(index.index).hnsw.nb_neighbors(1) == spec.hnsw_m
    if spec.nlist is not None and ivf.nlist != spec.nlist:
        return False
    if spec.kind == "ivf-pq":
        return faiss.downcast_index(ivf).pq.M == spec.pq_m(dim) and isinstance(index, faiss.IndexPreTransform) == spec.opq
    return True


def stored_ids(index) -> np.ndarray:
    """Every vector id the index holds (int64), in no particular order."""
    import faiss

    if index.ntotal == 0:
        return np.zeros(0, np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    lists = faiss.extract_index_ivf(index).invlists
    parts = []
    for number in range(lists.nlist):
        size = lists.list_size(number)
        if size:
            ids = lists.get_ids(number)
            parts.append(faiss.rev_swig_ptr(ids, size).copy())
            lists.release_ids(number, ids)
    return np.concatenate(parts).astype(np.int64)


def stored_keys(index, num_queries: int) -> np.ndarray:
    """The image keys of the index's vectors (id // num_queries), sorted, each once. An image's
    vectors are added and removed together, so its first (id % num_queries == 0) stands for it:
    the ids are read a list (IVF) or a view (`id_map`) at a time and only those kept, so memory
    grows with the images, not with their 32 vectors each as `stored_ids` does."""
    import faiss

    if index.ntotal == 0:
        return np.zeros(0, np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        ids = faiss.rev_swig_ptr(index.id_map.data(), index.id_map.size())  # a view: nothing copied
        return np.sort(ids[ids % num_queries == 0] // num_queries)
    lists = faiss.extract_index_ivf(index).invlists
    parts = [np.zeros(0, np.int64)]
    for number in range(lists.nlist):
        size = lists.list_size(number)
        if size:
            pointer = lists.get_ids(number)
            ids = faiss.rev_swig_ptr(pointer, size)
            parts.append(ids[ids % num_queries == 0] // num_queries)  # a copy, before the release
            lists.release_ids(number, pointer)
    return np.sort(np.concatenate(parts).astype(np.int64))


def train(index, sample: np.ndarray) -> None:
    """Train on `sample`; the k-means of IVF kinds runs on the GPU when there is one."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and gpu_count() > 0:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    if ivf is not None:
        ivf.clustering_index = None


def skip_selector(ids: np.ndarray):
    """A FAISS selector of every id but `ids` (with what it references, to keep alive while it is
    used): built once per change of the skipped ids, as building it costs 0.44 s for 3.2 M ids."""
    import faiss

    batch = faiss.IDSelectorBatch(ids)
    return faiss.IDSelectorNot(batch), batch


def search_params(index, spec: IndexSpec, depth: int, skip=None):
    """FAISS search parameters: IVF probes, HNSW breadth, and `skip` (a `skip_selector`: the ids
    `MaxSimIndex.skip` leaves out; None for none)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        params = faiss.SearchParametersIVF(nprobe=spec.probes(ivf.nlist))
    elif kind_of(index) == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=max(spec.ef_search, depth))
    elif skip is None:
        return None
    else:
        params = faiss.SearchParameters()
    if skip is not None:
        params.sel = skip[0]
    return params


def reconstruct(index, ids: np.ndarray) -> np.ndarray:
    """The stored vectors of `ids` (all present), (len(ids), d) float32, for kinds that `reconstructs`:
    their positions are looked up in `id_map` (sorting it: O(n log n), so for rebuilds and small
    indexes, not for every search)."""
    import faiss

    ids = np.asarray(ids, np.int64)
    stored = faiss.rev_swig_ptr(index.id_map.data(), index.id_map.size())
    order = np.argsort(stored, kind="stable")
    found = np.searchsorted(stored, ids, sorter=order)
    positions = order[np.minimum(found, len(order) - 1)] if len(order) else found
    if len(ids) and (len(order) == 0 or not np.array_equal(stored[positions], ids)):
        raise KeyError("reconstruct: an id is not in the index")
    return index.index.reconstruct_batch(positions.astype(np.int64))


def reconstructs(index) -> bool:
    """Whether stored vectors can be read back by id (IVF kinds would need a direct map)."""
    import faiss

    return faiss.try_extract_index_ivf(index) is None


def gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def to_gpu(index):
    """A GPU copy of `index` for searching, or None when there is no GPU or FAISS cannot move this kind."""
    import faiss

    if gpu_count() == 0 or kind_of(index) not in GPU_KINDS:
        return None
    try:
        options = faiss.GpuMultipleClonerOptions()
        # For IVF-PQ, fp16 lookup tables: needed for codes of 56 bytes and over. For a flat index the
        # same option stores the vectors in fp16, which would make flat-fp32 (exact, never re-scored)
        # return fp16 scores and orders.
        options.useFloat16 = kind_of(index) == "ivf-pq"
        return faiss.index_cpu_to_all_gpus(index, options)
    except RuntimeError as exc:  # an index FAISS's GPU code does not implement: search on the CPU
        log.warning("searching on the CPU: FAISS could not move the index to the GPU (%s)", exc)
        return None


def gpu_search(gpu_index, nprobe: int | None, queries: np.ndarray, depth: int):
    """Search a `to_gpu` copy; `nprobe` for IVF kinds (GPU indexes take it as a setting, not a parameter)."""
    import faiss

    if nprobe is not None:
        faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", nprobe)
    return gpu_index.search(queries, depth)


def ivf_nlist(index) -> int:
    import faiss

    return faiss.extract_index_ivf(index).nlist


def read_index(path, mmap: bool):
    """The FAISS index in the file at `path`, None if it cannot be read. `mmap`: mapped read-only.
    IO_FLAG_MMAP maps IVF lists but reads flat codes (flat-fp16, sq8, HNSW's vectors) into memory,
    where IO_FLAG_MMAP_IFC maps them too (0.04 s against 0.45 s for 0.8 GB); FAISS refuses the two
    flags together on IVF files, which then get IO_FLAG_MMAP alone."""
    import faiss

    mapped_codes = getattr(faiss, "IO_FLAG_MMAP_IFC", 0)  # older FAISS (pyproject allows 1.8) lacks it
    tries = [faiss.IO_FLAG_MMAP | mapped_codes, faiss.IO_FLAG_MMAP] if mmap else [0]
    for flags in tries:
        try:
            return without_reverse_map(faiss.read_index(str(path), flags | (faiss.IO_FLAG_READ_ONLY if mmap else 0)))
        except RuntimeError:
            continue
    return None


def saved_with_reverse_map(path) -> bool:
    """Whether the file at `path` holds an `IndexIDMap2` (FAISS's tag, its first four bytes): an
    earlier blipsearch's, which every read still pays for until it is saved again."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"IxM2"
    except OSError:
        return False


def without_reverse_map(index):
    """An `IndexIDMap2` read from an older file, as the `IndexIDMap` saved now: the same sub-index and
    id_map (moved, not copied), its reverse map freed; anything else as it is. (FAISS has built that
    map while reading; it is not kept, and the file is saved without it at its next change.)"""
    import faiss

    if not isinstance(index, faiss.IndexIDMap2):
        return index
    plain = faiss.IndexIDMap(faiss.IndexFlatIP(index.d))  # the Python constructor wants a sub-index
    plain.index, plain.referenced_objects = index.index, []
    plain.ntotal, plain.is_trained = index.ntotal, index.is_trained
    plain.metric_type, plain.metric_arg = index.metric_type, index.metric_arg
    plain.id_map.swap(index.id_map)
    index.own_fields, plain.own_fields = False, True  # the sub-index now belongs to `plain`
    return plain
