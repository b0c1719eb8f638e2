"""`blipsearch serve`: the service over HTTP (FastAPI). The edge: it turns requests into core calls and
core errors into `{"error": ..., "detail": ...}` bodies with the right status code."""

from __future__ import annotations

import hmac
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.service import PREVIEW_PX, Service
from api.thumbnails import THUMBNAIL_PX
from indexer.decode import CHANGED, Skipped
from indexer.errors import CatalogConnectionError, IndexBusyError
from retrieval.errors import BlipsearchError

WEB_PAGE = Path(__file__).parent / "web" / "index.html"
GLOB_HELP = "Only files whose full path matches this glob: absolute (/photos/2019/*) or from * (*2019*)"
AFTER_HELP = ("Start after this path: the previous page's `next`. Faster than a large offset, which reads every "
              "row it skips, and it does not shift as files are added or removed meanwhile")
MEDIA_TYPES = {  # Pillow's format names; MPO (a camera's multi-picture JPEG) as the JPEG browsers show
    "JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
    "BMP": "image/bmp", "TIFF": "image/tiff", "AVIF": "image/avif", "HEIF": "image/heif",
}
MAX_ID = 2**53  # a number JSON carries exactly; ids beyond the catalog's range are simply unknown (404)
ImageId = Annotated[int, PathParam(ge=0, le=MAX_ID)]
JobId = Annotated[int, PathParam(ge=0, le=MAX_ID)]


class IndexJob(BaseModel):
    kind: Literal["index"]
    paths: list[str] = Field(default_factory=list, max_length=100)  # none: every folder indexed before
    exclude: list[str] | None = Field(None, max_length=100)  # none: those the index was last given
    batch_size: int = Field(16, ge=1, le=1024)


class CaptionJob(BaseModel):
    kind: Literal["caption"]
    prompt: str = Field("", max_length=1000)
    max_new_tokens: int = Field(30, ge=1, le=512)
    candidates: int = Field(1, ge=1, le=16)  # > 1: the best of that many beams by ITC (`caption --candidates`)
    batch_size: int = Field(8, ge=1, le=1024)
    overwrite: bool = False


def _matches(request: Request, etag: str) -> bool:
    """If-None-Match holds `etag` or `*` (RFC 9110 13.1.2: a list, compared weakly)."""
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag.removeprefix("W/") in tags


def _not_modified(headers) -> Response:
    """304, with the headers a 200 would carry that describe caching (RFC 9110 15.4.5)."""
    kept = {name: headers[name] for name in ("ETag", "Cache-Control", "Last-Modified") if name in headers}
    return Response(status_code=304, headers=kept)


def _scanned(offset: int, status: str | None, has_caption: bool | None, glob: str | None) -> bool:
    """Whether a listing's page is read a window at a time (`Catalog.scan_page`): filters that no
    index finds the matches of (a caption or not; a glob that does not start with a folder), paged by
    `after`. Skipped files have an index of their own, and an `offset` counts from the first match."""
    from indexer.path_glob import literal_start

    slow = has_caption is not None or (glob is not None and not literal_start(glob).startswith("/"))
    return slow and offset == 0 and status != "skipped"


def error_body(status: int, error: str, detail: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def create_app(service: Service) -> FastAPI:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    app = FastAPI(title="blipsearch", version="0.1", description="Find images by describing them (BLIP-2).")
    registry = CollectorRegistry()
    requests = Counter("blipsearch_requests", "HTTP requests", ["route", "status"], registry=registry)
    latency = Histogram("blipsearch_request_seconds", "HTTP request latency", ["route"], registry=registry)
    images = Gauge("blipsearch_index_images", "Distinct images in the index", registry=registry)
    files = Gauge("blipsearch_index_files", "Files in the catalog", registry=registry)
    jobs = Gauge("blipsearch_jobs", "Jobs by state", ["state"], registry=registry)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        began = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        requests.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - began)
        return response

    @app.exception_handler(StarletteHTTPException)  # also routing's 404 and 405
    async def http_error(_request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else None
        return error_body(exc.status_code, _reason(exc.status_code), detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_body(422, "invalid request", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(BlipsearchError)
    async def core_error(_request, exc: BlipsearchError):
        # Exit code 2 marks the caller's mistakes (bad value, missing path or model): a 400.
        # A catalog server gone away is the service's trouble, for a while: a 503 says try again.
        status = (409 if isinstance(exc, IndexBusyError) else 503 if isinstance(exc, CatalogConnectionError)
                  else 400 if exc.exit_code == 2 else 500)
        return error_body(status, type(exc).__name__, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):  # a bug: still the one error shape
        from api.cli import gpu_out_of_memory

        if gpu_out_of_memory(exc):  # the model's device, for a while (other requests hold memory): try again
            return error_body(503, "service unavailable", "the GPU ran out of memory; try again, or ask for fewer "
                                                          "candidates")
        return error_body(500, "internal error", type(exc).__name__)

    def require_token(request: Request) -> None:
        token = service.config.token
        if not token:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "this endpoint needs the API token: Authorization: Bearer <token>")

    # -- pages and health --------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return WEB_PAGE.read_text(encoding="utf-8")

    @app.get("/healthz")
    def healthz() -> dict:
        identity = service.retriever.identity
        return {"status": "ok", "model": identity.name, "device": service.retriever.device,
                "rerank": service.retriever.fusion.describe(), "counts": service.counts.get()}

    @app.get("/api/status")
    def status() -> dict:
        recorded = service.store.catalog.model()
        return {"index": str(service.store.directory), "model": recorded.name if recorded else None,
                "counts": service.counts.get(), "bytes_on_disk": service.disk_bytes.get()["bytes"],
                "jobs": service.jobs.counts()}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        counts = service.counts.get()
        images.set(counts.get("distinct_images", 0))
        files.set(counts.get("files", 0))
        for state, n in service.jobs.counts().items():
            jobs.labels(state).set(n)
        return generate_latest(registry).decode()

    # -- search -------------------------------------------------------------------------------------
    @app.get("/api/search")
    def search(
        q: list[str] = Query(..., min_length=1, max_length=20, description='Texts; "WEIGHT:text" weights one'),
        not_: list[str] = Query([], alias="not", max_length=20, description="Texts to push away from"),
        k: int = Query(10, ge=1, le=10_000), candidates: int | None = Query(None, ge=1, le=10_000),
        rerank: bool = True, score: Literal["itm", "itm+itc", "itc"] | None = None,
        min_score: float | None = None, path: str | None = Query(None, max_length=1000, description=GLOB_HELP),
        hybrid: bool = False, caption_only: bool = False,
    ) -> dict:
        from indexer.search import SearchOptions, search_captions
        from retrieval.query import TextQuery

        if caption_only and (hybrid or not_ or score not in (None, "itc")):  # as the CLI: not silently ignored
            raise HTTPException(400, "caption_only ranks by caption text; it takes no hybrid, not or score")
        options = SearchOptions(k=k, candidates=candidates, rerank=rerank and not caption_only,
                                score=score,
                                min_score=min_score, path_glob=_absolute_glob(path), hybrid=hybrid)
        options.validate()
        reranked = options.depth * (2 if hybrid else 1) if options.rerank else 0  # hybrid adds caption matches
        if reranked > service.config.max_rerank:
            raise HTTPException(400, f"this search would re-rank {reranked} images by ITM, and this server re-ranks "
                                     f"at most {service.config.max_rerank} (serve --max-rerank); ask for fewer "
                                     "(k, candidates), or rerank=false")
        if caption_only:
            return _response(" ".join(q), search_captions(service.store.catalog, " ".join(q), options))
        query = TextQuery.parse(q, not_)
        return _response(" + ".join(query.texts), service.require_searcher().search_text(query, options))

    @app.post("/api/search/image")
    async def search_image(image: UploadFile = File(...), k: int = Query(10, ge=1, le=10_000),
                           path: str | None = Query(None, max_length=1000, description=GLOB_HELP)) -> dict:
        import tempfile

        from indexer.decode import content_hash
        from indexer.search import SearchOptions, stored_content

        data = await image.read(service.config.max_upload_bytes + 1)
        if len(data) > service.config.max_upload_bytes:
            raise HTTPException(413, f"the upload is over {service.config.max_upload_bytes} bytes")
        options = SearchOptions(k=k, rerank=False, score="itc", path_glob=_absolute_glob(path))
        name = image.filename or "upload"

        def search():  # decoding and the model run off the event loop, as `def` routes do
            if known := stored_content(service.store.catalog, content_hash(data)):
                # An image the index holds: its vectors, no decoding, no model.
                return service.require_searcher().search_stored(known, options)
            with tempfile.NamedTemporaryFile(suffix=Path(image.filename or "").suffix[:10]) as handle:
                handle.write(data)
                handle.flush()
                return service.require_searcher().search_image(handle.name, options, name=f"the upload {name!r}",
                                                               decode=service.uploads)

        return _response(name, await run_in_threadpool(search))

    @app.get("/api/images/{file_id}/similar")
    def search_similar(file_id: ImageId, k: int = Query(10, ge=1, le=10_000),
                       path: str | None = Query(None, max_length=1000, description=GLOB_HELP)) -> dict:
        """Images like an indexed one, by its stored vectors: no upload, no decoding, no model."""
        from indexer.search import SearchOptions

        row = service.store.catalog.file(file_id)
        if row is None:
            raise HTTPException(404, f"no image with id {file_id}")
        options = SearchOptions(k=k, rerank=False, score="itc", path_glob=_absolute_glob(path))
        return _response(f"images like {Path(row.path).name}", service.require_searcher().search_similar(row, options))

    # -- catalog ------------------------------------------------------------------------------------
    @app.get("/api/images")
    def list_images(offset: int = Query(0, ge=0, le=MAX_ID), limit: int = Query(50, ge=1, le=1000),
                    status: Literal["indexed", "skipped"] | None = None, has_caption: bool | None = None,
                    path: str | None = Query(None, max_length=1000, description=GLOB_HELP),
                    after: str | None = Query(None, max_length=4096, description=AFTER_HELP)) -> dict:
        from indexer.walk import storable

        if after is not None and not storable(after):
            raise HTTPException(400, "after must be a path from a previous page's next")
        # Counting for each page read every row the filters match (0.1-0.2 s a million files): by
        # status alone, or none, the counts /api/status reports answer; other filters count within
        # a time limit, and a total that would take longer is null.
        catalog, glob = service.store.catalog, _absolute_glob(path)
        within_s = service.config.count_time_limit_s
        if _scanned(offset, status, has_caption, glob):  # no index finds these: a page reads a bounded window
            rows, following = catalog.listing.scan_page(limit, has_caption, glob, after, status,
                                                service.config.page_scan_rows)
            total = catalog.listing.count_matching(status, has_caption, glob, within_s)
        else:
            by_status_only = has_caption is None and path is None
            total, rows = catalog.listing.page(offset, limit, status, has_caption, glob, after, count=not by_status_only,
                                       count_within_s=within_s)
            if by_status_only:
                total = service.counts.get().get(status or "files", 0)
            following = rows[-1].path if len(rows) == limit else None
        captions = catalog.captions.get([r.embedding_id for r in rows if r.embedding_id])
        return {"total": total, "offset": offset, "limit": limit, "next": following,
                "images": [_image(row, captions.get(row.embedding_id)) for row in rows]}

    @app.get("/api/images/{file_id}")
    def image(file_id: ImageId) -> dict:
        row = service.store.catalog.file(file_id)
        if row is None:
            raise HTTPException(404, f"no image with id {file_id}")
        caption = service.store.catalog.captions.get([row.embedding_id]).get(row.embedding_id) if row.embedding_id else None
        return _image(row, caption)

    @app.get("/api/images/{file_id}/file")
    def image_file(file_id: ImageId, request: Request) -> Response:
        file = service.servable_file(file_id)
        try:
            stat = None if file is None else os.stat(file.path)
        except OSError:  # removed since it was found
            stat = None
        if stat is None:
            raise HTTPException(404, f"no servable file for image {file_id} (unknown, moved, or outside the indexed folders)")
        # Its type as its content was read, never by its name: images are found by content, so a
        # name may say nothing (a file with no extension was an octet stream a browser downloads),
        # or lie (a skipped "logo.svg" in an indexed folder, a script run as this server's own page).
        # What was not read as an image is a download, never sniffed.
        media_type = MEDIA_TYPES.get(file.format or "")
        response = FileResponse(file.path, stat_result=stat, media_type=media_type or "application/octet-stream",
                                filename=None if media_type else file.path.name,  # Content-Disposition: attachment
                                headers={"X-Content-Type-Options": "nosniff"})  # its ETag: mtime and size
        return _not_modified(response.headers) if _matches(request, response.headers["etag"]) else response

    @app.get("/api/images/{file_id}/thumbnail")
    def thumbnail(file_id: ImageId, request: Request) -> Response:
        return _jpeg_of(file_id, request, "thumbnail", THUMBNAIL_PX, service.thumbnail)

    @app.get("/api/images/{file_id}/preview")
    def preview(file_id: ImageId, request: Request) -> Response:
        """The image as a JPEG of at most 2048 px, for browsers that cannot show its format (HEIC, TIFF)."""
        return _jpeg_of(file_id, request, "preview", PREVIEW_PX, service.preview)

    def _jpeg_of(file_id: int, request: Request, what: str, px: int, make) -> Response:
        file = service.servable_file(file_id)
        if file is None or file.content_hash is None:
            raise HTTPException(404, f"no servable file for image {file_id}")
        # Made from the content as indexed, so that content's hash names it: a browser's next look,
        # once max-age is past, costs one catalog row and no decode.
        headers = {"Cache-Control": "max-age=86400", "ETag": f'"{file.content_hash[:32]}-{px}"'}
        if _matches(request, headers["ETag"]):
            return _not_modified(headers)
        jpeg = make(file)
        if isinstance(jpeg, Skipped):  # 409: the file is not what was indexed, so not what the ETag names
            raise HTTPException(409 if jpeg.reason == CHANGED else 422, f"cannot make a {what}: {jpeg.detail}")
        return Response(jpeg, media_type="image/jpeg", headers=headers)

    @app.delete("/api/images/{file_id}", dependencies=[Depends(require_token)])
    def delete_image(file_id: ImageId) -> dict:
        if not service.delete_image(file_id):
            raise HTTPException(404, f"no image with id {file_id}")
        return {"deleted": file_id}

    # -- jobs ---------------------------------------------------------------------------------------
    @app.post("/api/jobs", status_code=202, dependencies=[Depends(require_token)])
    def start_job(job: Annotated[IndexJob | CaptionJob, Field(discriminator="kind")]) -> dict:
        if isinstance(job, IndexJob):
            from indexer.walk import recorded_roots, resolve_roots

            relative = [path for path in job.paths if not Path(path).is_absolute()]
            if relative:  # the client cannot know which folder the server runs in
                raise HTTPException(400, f"paths must be absolute: {relative[0]!r}")
            if job.paths:
                resolve_roots(job.paths)  # 400 now for a wrong path, not a failed job later
            else:
                recorded_roots(service.store.catalog.roots())  # 400 now when there are none left
        else:
            from retrieval.captioner import CaptionOptions

            CaptionOptions(prompt=job.prompt, max_new_tokens=job.max_new_tokens).validate()  # 400 now, not a failed job
        return service.jobs.submit(job.kind, job.model_dump(exclude={"kind"})).as_dict()

    @app.get("/api/jobs")
    def list_jobs() -> dict:
        return {"jobs": [job.as_dict() for job in service.jobs.all()]}

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: JobId) -> dict:
        job = service.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job.as_dict()

    @app.delete("/api/jobs/{job_id}", dependencies=[Depends(require_token)])
    def cancel_job(job_id: JobId) -> dict:
        job = service.jobs.cancel(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job.as_dict()

    return app


def _absolute_glob(glob: str | None) -> str | None:
    """A `path` glob as the catalog's absolute paths can match it; a relative one would be taken from
    the server's working folder, which means nothing to a client. A folder means the files under it."""
    from indexer.path_glob import anchored, folder_files

    if glob is None:
        return None
    if not anchored(glob):
        raise HTTPException(400, f"path must be an absolute glob or start with *, not {glob!r}")
    return folder_files(glob)


def _image(row, caption) -> dict:
    out = {k: v for k, v in asdict(row).items() if k != "embedding_id"}
    out.update(caption=caption.caption if caption else None, caption_model=caption.model if caption else None,
               caption_prompt=caption.prompt if caption else None)
    return out


def _response(label: str, response) -> dict:
    results = []
    for r in response.results:
        item = {k: v for k, v in asdict(r).items() if k not in ("file_id", "embedding_id")}
        results.append({"id": r.file_id, **item})
    return {"query": label, "results": results, "missing": response.missing, "changed": response.changed}


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"
