"""FAISS index types for the 32 query vectors per image, and how to choose one for a memory budget.

A type is written `kind` or `kind:key=value,...`, e.g. `ivf-pq:m=32,nprobe=16`:

| kind        | stores per vector            | candidates        | final ITC scores                    |
|-------------|------------------------------|-------------------|-------------------------------------|
| `flat-fp32` | 4·d bytes                    | exact             | exact                               |
| `flat-fp16` | 2·d bytes (the default)      | exact (bounded)   | exact, re-scored on fp32            |
| `sq8`       | d bytes, 8 bits per dim      | approximate       | exact, re-scored on fp32            |
| `ivf-flat`  | 4·d bytes in `nlist` lists   | approximate       | exact                               |
| `ivf-pq`    | `m` bytes (PQ, optional OPQ) | approximate       | exact, re-scored on fp32            |
| `hnsw`      | 2·d bytes + graph links      | approximate       | exact, re-scored on fp32            |

Each vector also costs 8 bytes of id. "Re-scored on fp32" reads the exact vectors from the catalog;
without them (a bare `MaxSimIndex`) the codec's own reconstruction is used, which is exact for
`flat-*` and `ivf-flat`, within 2^-11 for fp16, within half a quantisation step per dimension for
`sq8`, and only as close as the PQ codebooks for `ivf-pq`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from retrieval.errors import UsageError

KINDS = ("flat-fp32", "flat-fp16", "sq8", "ivf-flat", "ivf-pq", "hnsw")
EXACT_KINDS = ("flat-fp32", "flat-fp16")  # the top-n images are exact by construction
TRAINED_KINDS = ("sq8", "ivf-flat", "ivf-pq")  # need a sample before they can hold vectors
ID_BYTES = 8
MIN_SQ8_TRAIN = 1_000
PQ_TRAIN_PER_CENTROID = 39  # FAISS warns below 39 training points per k-means centroid


@dataclass(frozen=True)
class IndexSpec:
    kind: str = "flat-fp16"
    nlist: int | None = None  # IVF lists; None: about 4 * sqrt(vectors) when trained
    m: int | None = None  # PQ bytes per vector; None: dim // 4 (64 for 256-d; 32 lost recall: RESULTS.md)
    opq: bool = False  # rotate before PQ (OPQ), which lowers PQ's error on correlated dimensions
    nprobe: int | None = None  # IVF lists visited per search; None: nlist // 16, at least 8
    hnsw_m: int = 32  # HNSW links per node
    ef_search: int = 128  # HNSW search breadth (raised to the number of vectors asked for)
    rescore: int | None = None  # images re-scored exactly per image asked; None: 16 for PQ, else 2

    @classmethod
    def parse(cls, text: str) -> "IndexSpec":
        """`kind[:key=value,...]`, e.g. `ivf-pq:m=16,opq=1,nprobe=32`."""
        kind, _, rest = text.strip().partition(":")
        if kind not in KINDS:
            raise UsageError(f"unknown index type {kind!r}; expected one of {', '.join(KINDS)}")
        settings: dict = {}
        names = {f.name for f in fields(cls)}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in names or key == "kind" or not value:
                raise UsageError(f"bad index type option {item!r} in {text!r}")
            try:
                settings[key] = value.strip() not in ("0", "false", "no") if key == "opq" else int(value)
            except ValueError:
                raise UsageError(f"index type option {key} must be a whole number, not {value!r}") from None
        spec = cls(kind, **settings)
        spec.validate()
        return spec

    def validate(self, dim: int | None = None) -> None:
        for name in ("nlist", "m", "nprobe", "hnsw_m", "ef_search", "rescore"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"index type option {name} must be at least 1, not {value}")
        if dim is not None and self.kind == "ivf-pq" and dim % self.pq_m(dim):
            raise UsageError(f"ivf-pq needs m dividing the embedding size {dim}; m={self.pq_m(dim)} does not")

    def __str__(self) -> str:
        default = IndexSpec(self.kind)
        options = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in asdict(self).items()
                   if k != "kind" and v != getattr(default, k)]
        return self.kind + (":" + ",".join(options) if options else "")

    # -- sizes ------------------------------------------------------------------------------------
    def pq_m(self, dim: int) -> int:
        return self.m or max(1, dim // 4)

    def bytes_per_vector(self, dim: int) -> int:
        """Memory per stored vector, ids included (graph links for HNSW, not the IVF centroids)."""
        code = {
            "flat-fp32": 4 * dim, "flat-fp16": 2 * dim, "sq8": dim, "ivf-flat": 4 * dim,
            "ivf-pq": self.pq_m(dim), "hnsw": 2 * dim + 2 * self.hnsw_m * 4 + 8,
        }[self.kind]
        return code + ID_BYTES

    @property
    def exact(self) -> bool:
        return self.kind in EXACT_KINDS

    @property
    def trained(self) -> bool:
        return self.kind in TRAINED_KINDS

    def nlist_for(self, vectors: int) -> int:
        """IVF lists for `vectors` vectors: about 4 sqrt(n), a power of two, and at most n / 39 so
        that k-means has enough points per list (FAISS warns below 39)."""
        if self.nlist:
            return self.nlist
        ideal = min(4 * math.sqrt(max(vectors, 1)), vectors / PQ_TRAIN_PER_CENTROID, 65_536)
        return 2 ** max(4, int(math.log2(max(ideal, 1))))

    def min_train_vectors(self, dim: int, vectors: int) -> int:
        """How many vectors the collection needs before this type can be trained on them."""
        if self.kind == "sq8":
            return MIN_SQ8_TRAIN
        need = PQ_TRAIN_PER_CENTROID * self.nlist_for(vectors)
        if self.kind == "ivf-pq":
            need = max(need, PQ_TRAIN_PER_CENTROID * 256)  # 8-bit PQ codebooks have 256 centroids
        return need

    def rescore_factor(self) -> int:
        """PQ's scores are rough, so its true top n hides deeper in its candidates than other kinds'."""
        return self.rescore or (16 if self.kind == "ivf-pq" else 2)

    def probes(self, nlist: int) -> int:
        return min(nlist, self.nprobe or max(8, nlist // 16))


def auto_candidates(dim: int) -> list[IndexSpec]:
    """What `auto` chooses from, most exact (and largest) first."""
    pq = [IndexSpec("ivf-pq", m=m) for m in (dim // 4, dim // 8, dim // 16, dim // 32) if m >= 1 and dim % m == 0]
    return [IndexSpec("flat-fp16"), IndexSpec("sq8"), *dict.fromkeys(pq)]


def choose_spec(max_bytes: int, images: int, num_queries: int, dim: int) -> IndexSpec:
    """The most exact type whose vectors for `images` images fit in `max_bytes`.

    Exact flat fp16 first, then SQ8, then IVF-PQ with the largest code that fits; the caller passes
    the collection size it expects to reach (this leaves no other headroom)."""
    vectors = max(images, 1) * num_queries
    candidates = auto_candidates(dim)
    for spec in candidates:
        if spec.bytes_per_vector(dim) * vectors <= max_bytes:
            return spec
    smallest = candidates[-1].bytes_per_vector(dim) * vectors
    raise UsageError(
        f"{images:,} image{'' if images == 1 else 's'} need{'s' if images == 1 else ''} at least "
        f"{_size(smallest)} of index memory ({candidates[-1]}); raise --max-index-memory above {_size(max_bytes)}"
    )


def _size(nbytes: float) -> str:
    """1.5 KiB, 12.0 MiB: in whole MiB alone, 1,000 bytes read as 0 MiB."""
    if nbytes < 1024:
        return f"{nbytes:,.0f} byte{'' if nbytes == 1 else 's'}"
    for unit in ("KiB", "MiB", "GiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "GiB":
            break
    return f"{nbytes:,.1f} {unit}"
