"""The HTTP API on a tiny checkpoint: every endpoint, its errors, the token, jobs, file safety."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.server import create_app
from api.service import CachedCounts, ServeConfig, Service
from indexer.store import StoreConfig
from tests.conftest import Cuttable, fill_files, make_images

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, retriever, captioner):
    root = tmp_path_factory.mktemp("served")
    make_images(root / "photos", 8, seed=41)
    make_images(root / "later", 3, seed=42)
    (root / "secret.txt").write_text("not for you")
    config = ServeConfig(StoreConfig(root / "idx"), token=TOKEN, max_upload_bytes=200_000)
    service = Service(config, retriever, lambda: captioner)
    with TestClient(create_app(service)) as client:
        job = client.post("/api/jobs", json={"kind": "index", "paths": [str(root / "photos")]}, headers=AUTH)
        assert job.status_code == 202, job.text
        wait(client, job.json()["id"])
        yield client, root, service
    service.close()


def wait(client, job_id, timeout=120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def assert_error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"]


def test_health_status_metrics_and_page(served):
    client, _, _ = served
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["device"] == "cpu" and health["counts"]["distinct_images"] == 8
    assert health["rerank"] == "ITM logit + ITC (LAVIS)"  # the tiny model has no calibrated fusion
    assert client.get("/api/status").json()["jobs"]["done"] >= 1
    metrics = client.get("/metrics").text
    assert "blipsearch_index_images 8.0" in metrics and "blipsearch_request_seconds_bucket" in metrics
    page = client.get("/")
    assert page.status_code == 200 and "<input id=\"query\"" in page.text and "http" not in page.text.split("<script>")[1].split("fetch")[0]
    assert client.get("/openapi.json").json()["paths"]["/api/search"]


def test_health_checks_do_not_count_the_catalog_each_time(served, monkeypatch):
    from sqlalchemy import event

    client, _, service = served
    counts: list[str] = []

    def note(conn, cursor, statement, *_):
        if "count(" in statement.lower():
            counts.append(statement)

    event.listen(service.store.catalog.engine, "before_cursor_execute", note)
    walked = []
    disk_bytes = service.store.disk_bytes
    monkeypatch.setattr(service.store, "disk_bytes", lambda: walked.append(1) or disk_bytes())  # a stat per file
    began = time.monotonic()
    try:
        for _ in range(10):
            for url in ("/healthz", "/api/status", "/metrics"):
                assert client.get(url).status_code == 200
    finally:
        event.remove(service.store.catalog.engine, "before_cursor_execute", note)
    seconds = time.monotonic() - began
    assert len(counts) <= 3 * (2 + int(seconds)), counts  # a count (3 statements) a second at most; there were 90
    assert len(walked) <= 2 + int(seconds)  # there were 10


def test_search_matches_the_core_and_takes_every_option(served):
    client, _, service = served
    from indexer.search import SearchOptions
    from retrieval.query import TextQuery

    body = client.get("/api/search", params={"q": "a red circle", "k": 5}).json()
    core = service.searcher.search_text(TextQuery.parse(["a red circle"]), SearchOptions(k=5))
    assert [r["path"] for r in body["results"]] == [r.path for r in core.results]
    assert [r["score"] for r in body["results"]] == pytest.approx([r.score for r in core.results])
    first = body["results"][0]
    assert set(first) >= {"id", "path", "score", "itc_score", "itm_score", "query_slot", "caption"}
    arithmetic = client.get("/api/search", params=[("q", "2:a red circle"), ("q", "a dog"), ("not", "blue"),
                                                   ("k", "3"), ("score", "itm+itc"), ("candidates", "6"),
                                                   ("path", "*img000*"), ("hybrid", "true")])
    assert arithmetic.status_code == 200 and len(arithmetic.json()["results"]) == 3
    itc = client.get("/api/search", params={"q": "a red circle", "rerank": "false"}).json()
    assert all(r["itm_score"] is None for r in itc["results"])


@pytest.mark.parametrize("params, status", [
    ({}, 422), ({"q": ""}, 400), ({"q": "x" * 1001}, 400), ({"q": "a", "k": 0}, 422),
    ({"q": "a", "k": 10**6}, 422), ({"q": "a", "score": "best"}, 422), ({"q": "a", "rerank": "false", "score": "itm"}, 400),
    ({"q": "a", "min_score": "nan"}, 400), ({"q": "a", "min_score": "-inf"}, 400),
    ({"q": "a", "caption_only": "true", "hybrid": "true"}, 400), ({"q": "a", "caption_only": "true", "not": "b"}, 400),
    ({"q": "a", "caption_only": "true", "score": "itm"}, 400),  # each was silently ignored
    ({"q": "a", "path": "photos/*"}, 400),  # relative to the server's working folder: matched nothing
])
def test_bad_searches_are_4xx_with_the_error_shape(served, params, status):
    client, _, _ = served
    assert_error(client.get("/api/search", params=params), status)


def test_search_by_uploaded_image(served):
    client, root, _ = served
    query = root / "photos" / "img0003.jpg"
    body = client.post("/api/search/image", params={"k": 3}, files={"image": ("q.jpg", query.read_bytes())}).json()
    assert len(body["results"]) == 3 and all(r["path"] != str(query) for r in body["results"])
    not_an_image = client.post("/api/search/image", files={"image": ("q.jpg", b"not an image")})
    assert_error(not_an_image, 400)
    assert not_an_image.json()["detail"] == "the upload 'q.jpg': cannot use as a query image (not-an-image: " \
        "not a format Pillow can read)"  # its name, not the server's temporary file
    assert_error(client.post("/api/search/image", files={"image": ("big.jpg", b"x" * 300_000)}), 413)
    bomb = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(bomb, "PNG")  # 144 MP in 140 kB
    too_large = client.post("/api/search/image", files={"image": ("bomb.png", bomb.getvalue())})
    assert_error(too_large, 400)
    assert "(too-large: 12000x12000 is 144 MP, over the 100 MP limit" in too_large.json()["detail"]


def test_images_like_an_indexed_one_need_no_upload(served):
    """"More like this" on the web page: by the image's id, from its stored vectors, the images an
    upload of its file finds."""
    client, root, _ = served
    image = client.get("/api/images", params={"path": "*photos/img0003.jpg"}).json()["images"][0]
    like = client.get(f"/api/images/{image['id']}/similar", params={"k": 5})
    assert like.status_code == 200, like.text
    with open(image["path"], "rb") as handle:
        uploaded = client.post("/api/search/image", params={"k": 5}, files={"image": ("x.jpg", handle.read())}).json()
    body = like.json()
    assert body["query"] == "images like img0003.jpg" and len(body["results"]) == 5
    assert [r["path"] for r in body["results"]] == [r["path"] for r in uploaded["results"]]
    assert image["path"] not in [r["path"] for r in body["results"]]
    narrow = client.get(f"/api/images/{image['id']}/similar", params={"path": "*img000[4-5].jpg"}).json()
    assert sorted(os.path.basename(r["path"]) for r in narrow["results"]) == ["img0004.jpg", "img0005.jpg"]
    assert_error(client.get("/api/images/999999/similar"), 404)
    assert_error(client.get(f"/api/images/{image['id']}/similar", params={"k": 0}), 422)


def test_an_upload_the_index_holds_is_searched_by_its_vectors(served, monkeypatch):
    """Dragging one of the collection's own photos onto the page: its content is in the catalog, so
    neither the decoder nor the model runs. Another image is decoded as before."""
    from indexer.search import SearchOptions

    client, root, service = served
    image = client.get("/api/images", params={"path": "*photos/img0005.jpg"}).json()["images"][0]
    decoded = service.require_searcher().search_image(image["path"], SearchOptions(k=4, rerank=False, score="itc"))
    decoder, uploads = service.uploads, []
    monkeypatch.setattr(service, "uploads", lambda path, options: uploads.append(path) or decoder(path, options))
    with open(image["path"], "rb") as handle:
        known = client.post("/api/search/image", params={"k": 4}, files={"image": ("mine.jpg", handle.read())})
    assert known.status_code == 200, known.text
    assert [r["path"] for r in known.json()["results"]] == [r.path for r in decoded.results]
    assert [r["score"] for r in known.json()["results"]] == pytest.approx([r.score for r in decoded.results], abs=1e-5)
    assert uploads == []
    other = io.BytesIO()
    Image.new("RGB", (50, 40), (10, 120, 240)).save(other, "PNG")
    assert client.post("/api/search/image", files={"image": ("new.png", other.getvalue())}).status_code == 200
    assert len(uploads) == 1


def test_an_upload_that_crashes_or_hangs_the_decoder_is_a_400_and_the_server_goes_on(served, monkeypatch):
    """An uploaded query image is decoded in a worker process, one at a time: a file that kills the
    decoder (as a segfault in a C library would) or never finishes is that request's 400, where it
    took the server down or held a thread for ever."""
    from indexer.workers import PoolOptions, UntrustedDecoder
    from tests.hostile import hang_or_crash_by_content

    client, root, service = served
    hostile = UntrustedDecoder(PoolOptions(workers=1, timeout_s=3), task=hang_or_crash_by_content)
    monkeypatch.setattr(service, "uploads", hostile)
    try:
        crashed = client.post("/api/search/image", files={"image": ("q.jpg", b"crash" + b"\0" * 100)})
        hung = client.post("/api/search/image", files={"image": ("q.jpg", b"hang!" + b"\0" * 100)})
        fine = client.post("/api/search/image", params={"k": 2},
                           files={"image": ("q.jpg", (root / "photos" / "img0002.jpg").read_bytes())})
    finally:
        hostile.close()
    assert_error(crashed, 400)
    assert crashed.json()["detail"] == ("the upload 'q.jpg': cannot use as a query image (decoder-crashed: the "
                                        "decoder crashed on this file)")
    assert_error(hung, 400)
    assert "(decoder-timeout: decoding took over 3 s; gave up)" in hung.json()["detail"]
    assert fine.status_code == 200 and len(fine.json()["results"]) == 2


def test_catalog_listing_pages_by_path_after_the_last(served):
    """`offset` reads every row it skips (seconds, deep into a hundred million); `next` and `after` do not."""
    client, _, _ = served
    everything = client.get("/api/images", params={"limit": 1000}).json()
    paths = [image["path"] for image in everything["images"]]
    assert everything["total"] == len(paths) and everything["next"] is None and paths == sorted(paths)
    walked, after = [], None
    for _ in range(len(paths)):
        page = client.get("/api/images", params={"limit": 3, **({"after": after} if after else {})}).json()
        assert page["total"] == len(paths)
        walked += [image["path"] for image in page["images"]]
        after = page["next"]
        if after is None:
            break
    assert walked == paths
    listed = client.get("/api/images", params={"limit": 2, "status": "indexed", "after": paths[0]}).json()
    assert [image["path"] for image in listed["images"]] == paths[1:3] and listed["total"] == len(paths)
    assert_error(client.get("/api/images", params={"after": "/a\x00"}), 400)


def test_a_large_catalogs_listing_totals_do_not_count_every_row(tmp_path, retriever):
    """A filtered listing counted every row its filters match for each page (0.1-0.2 s a million
    files): by status the counts /api/status keeps answer, and other filters count within a time
    limit, past which the total is null and the page still comes. Its page read rows until it had
    found one: a bounded window of paths now, with `next` where the following window starts."""
    from sqlalchemy import event

    service = Service(ServeConfig(StoreConfig(tmp_path / "idx"), count_time_limit_s=0.001, page_scan_rows=1000),
                      retriever)
    fill_files(service.store.catalog, 200000, "/p/a/%d.jpg", "indexed")
    fill_files(service.store.catalog, 30, "/p/z/%d.jpg", "skipped")
    service.counts.refresh()
    counted: list[str] = []

    def count_of_total(conn, cursor, statement, *_):  # not scan_page's window, a count(*) and max(path)
        if "count(" in statement and "max(" not in statement:
            counted.append(statement)

    event.listen(service.store.catalog.engine, "before_cursor_execute", count_of_total)
    with TestClient(create_app(service)) as client:
        skipped = client.get("/api/images", params={"status": "skipped", "limit": 5}).json()
        indexed = client.get("/api/images", params={"status": "indexed", "limit": 1}).json()
        assert counted == []
        many = client.get("/api/images", params={"path": "*7.jpg", "limit": 2}).json()
        few = client.get("/api/images", params={"path": "/p/z/*1.jpg"}).json()
        totals_counted = len(counted)
        rare = client.get("/api/images", params={"path": "*9999.jpg"}).json()  # 109999 is the first
        rarer = client.get("/api/images", params={"path": "*9999.jpg", "after": rare["next"]}).json()
    service.close()
    # A page by a glob with no folder reads 1,000 paths (page_scan_rows), not all up to its 50th match.
    assert rare["images"] == [] and rare["next"] == "/p/a/101000.jpg" and rarer["next"] == "/p/a/102000.jpg"
    assert skipped["total"] == 30 and [i["path"] for i in skipped["images"]] == [f"/p/z/{100001 + i}.jpg" for i in range(5)]
    assert skipped["images"][0]["error"] == "corrupt: x" and indexed["total"] == 200000
    assert many["total"] is None and [i["path"] for i in many["images"]] == ["/p/a/100007.jpg", "/p/a/100017.jpg"]
    assert many["next"] == "/p/a/100017.jpg" and few["total"] == 3 and totals_counted == 2


def test_catalog_listing_metadata_file_and_thumbnail(served):
    client, root, _ = served
    page = client.get("/api/images", params={"limit": 3, "offset": 2, "status": "indexed"}).json()
    assert page["total"] == 8 and len(page["images"]) == 3
    assert client.get("/api/images", params={"path": "*img0001*"}).json()["total"] == 1
    for folder in (str(root / "photos"), f"{root}/photos/"):  # a folder: its files
        assert client.get("/api/images", params={"path": folder}).json()["total"] == 8
    found = client.get("/api/search", params={"q": "a photo", "path": str(root / "photos"), "k": 3}).json()
    assert len(found["results"]) == 3
    image_id = page["images"][0]["id"]
    meta = client.get(f"/api/images/{image_id}").json()
    assert meta["path"] == page["images"][0]["path"] and meta["width"] == 160
    served_file = client.get(f"/api/images/{image_id}/file")
    assert served_file.status_code == 200 and served_file.content == open(meta["path"], "rb").read()
    thumb = client.get(f"/api/images/{image_id}/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    kept = list((root / "idx" / "thumbnails").glob("*.jpg"))
    assert len(kept) >= 1
    other, thumbnails = page["images"][1], root / "idx" / "thumbnails"
    os.rename(thumbnails, f"{thumbnails}.away")
    thumbnails.write_text("")  # in the way, as a full disk or a read-only index would be: it cannot be kept
    try:
        unkept = client.get(f"/api/images/{other['id']}/thumbnail")
    finally:
        os.unlink(thumbnails)
        os.rename(f"{thumbnails}.away", thumbnails)
    assert unkept.status_code == 200 and unkept.headers["content-type"] == "image/jpeg", unkept.text
    assert Image.open(io.BytesIO(unkept.content)).size == (other["width"], other["height"])
    assert_error(client.get("/api/images/999999"), 404)
    assert_error(client.get("/api/images/not-a-number"), 422)
    assert_error(client.get("/api/images/999999/file"), 404)


def test_a_preview_is_the_image_as_a_jpeg_of_at_most_2048_px(served, tmp_path):
    """For the web page's viewer where the browser cannot show the file's format (HEIC, TIFF)."""
    from api.service import PREVIEW_PX, ServableFile

    client, _, service = served
    image = client.get("/api/images", params={"limit": 1, "status": "indexed"}).json()["images"][0]
    preview = client.get(f"/api/images/{image['id']}/preview")
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(preview.content)).size == (image["width"], image["height"])
    Image.new("RGB", (3000, 1500), (200, 30, 30)).save(tmp_path / "wide.tif")
    wide = ServableFile(tmp_path / "wide.tif", hashlib.sha256((tmp_path / "wide.tif").read_bytes()).hexdigest(), "TIFF")
    large = Image.open(io.BytesIO(service.preview(wide)))
    assert PREVIEW_PX == 2048 and large.format == "JPEG" and large.size == (2048, 1024)
    assert_error(client.get("/api/images/999999/preview"), 404)


def test_a_file_is_served_as_the_type_its_content_was_read_as(tmp_path, retriever, captioner):
    """Images are found by content, so a name need not say the type: a PNG named without extension
    (a camera dump, a recovered file) is image/png, where its name alone made it an octet stream
    that a browser downloads instead of showing; and a skipped "logo.svg" was image/svg+xml, whose
    script a browser opening it runs as the server's own page, free to call the API."""
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "photos" / "IMG_0001", "PNG")
    (tmp_path / "photos" / "logo.svg").write_text(  # Pillow reads no SVG: skipped as not an image
        '<svg xmlns="http://www.w3.org/2000/svg"><script>fetch("/api/jobs", {method: "POST"})</script></svg>')
    service = Service(ServeConfig(StoreConfig(tmp_path / "idx"), token=TOKEN), retriever, lambda: captioner)
    with TestClient(create_app(service)) as client:
        wait(client, client.post("/api/jobs", json={"kind": "index", "paths": [str(tmp_path / "photos")]},
                                 headers=AUTH).json()["id"])
        image, svg = client.get("/api/images").json()["images"]
        served, svg_served = (client.get(f"/api/images/{i['id']}/file") for i in (image, svg))
    service.close()
    assert image["format"] == "PNG" and served.headers["content-type"] == "image/png"
    assert served.content == (tmp_path / "photos" / "IMG_0001").read_bytes()
    # A file skipped as not an image is a download, whatever its name says: never a page of this origin.
    assert svg["status"] == "skipped" and svg_served.headers["content-type"] == "application/octet-stream"
    assert svg_served.headers["content-disposition"] == 'attachment; filename="logo.svg"'
    assert served.headers["x-content-type-options"] == svg_served.headers["x-content-type-options"] == "nosniff"


def test_a_file_or_thumbnail_the_browser_has_is_not_sent_again(served, monkeypatch):
    """If-None-Match with the ETag given before: 304 with no body, and for a thumbnail without making
    it; another tag gets the image; a file changed since gets a new tag."""
    client, _, service = served
    image = client.get("/api/images", params={"limit": 1, "status": "indexed"}).json()["images"][0]
    tags = {}
    for what in ("file", "thumbnail", "preview"):
        url = f"/api/images/{image['id']}/{what}"
        tags[what] = client.get(url).headers["etag"]
        for header in (tags[what], f"W/{tags[what]}", f'"other", {tags[what]}', "*"):
            again = client.get(url, headers={"If-None-Match": header})
            assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tags[what], header
        assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    thumbnail_url = f"/api/images/{image['id']}/thumbnail"
    monkeypatch.setattr(service, "thumbnail", lambda file: pytest.fail("a thumbnail made for a 304"))
    not_modified = client.get(thumbnail_url, headers={"If-None-Match": tags["thumbnail"]})
    assert not_modified.status_code == 304 and not_modified.headers["cache-control"] == "max-age=86400"
    stat = os.stat(image["path"])
    os.utime(image["path"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # changed since the browser's copy
    try:
        changed = client.get(f"/api/images/{image['id']}/file", headers={"If-None-Match": tags["file"]})
    finally:
        os.utime(image["path"], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert changed.status_code == 200 and changed.headers["etag"] != tags["file"]


def test_a_file_changed_since_indexing_gets_no_thumbnail_of_another_image(served):
    """A thumbnail is kept, and tagged, under the content hash it was indexed with; made from a file
    edited or replaced since, it would show another image under that hash, to every later view of
    that content. It is a 409 instead, and a re-ranked search names the file as changed."""
    client, root, service = served
    image = client.get("/api/images", params={"path": "*img0006*"}).json()["images"][0]
    kept = service.store.directory / "thumbnails" / f"{image['content_hash']}.jpg"
    kept.unlink(missing_ok=True)
    original = Path(image["path"]).read_bytes()
    Image.new("RGB", (60, 40), (250, 250, 0)).save(image["path"], "JPEG")
    try:
        made = {what: client.get(f"/api/images/{image['id']}/{what}") for what in ("thumbnail", "preview")}
        found = client.get("/api/search", params={"q": "a red circle", "k": 8, "candidates": 8}).json()
    finally:
        Path(image["path"]).write_bytes(original)
    for what, response in made.items():
        assert_error(response, 409)
        assert response.json()["detail"] == f"cannot make a {what}: the file has changed since it was indexed; " \
                                            "index its folder again"
    assert not kept.exists()
    assert found["changed"] == [image["path"]] and image["path"] not in {r["path"] for r in found["results"]}
    assert client.get(f"/api/images/{image['id']}/thumbnail").status_code == 200  # its content back: as before


def test_files_outside_the_indexed_roots_are_never_served(served):
    client, root, service = served
    page = client.get("/api/images", params={"limit": 1}).json()
    image_id = page["images"][0]["id"]
    original = page["images"][0]["path"]
    os.rename(original, original + ".moved")
    try:  # a symlink in the indexed file's place, pointing outside every root
        os.symlink(root / "secret.txt", original)
        assert_error(client.get(f"/api/images/{image_id}/file"), 404)
    finally:
        os.unlink(original)
        os.rename(original + ".moved", original)
    assert_error(client.get("/api/images/..%2F..%2Fetc%2Fpasswd/file"), 404)
    assert_error(client.get("/api/images/1/../../../etc/passwd"), 404)


def test_write_endpoints_need_the_token(served):
    client, root, _ = served
    assert_error(client.post("/api/jobs", json={"kind": "caption"}), 401)
    assert_error(client.post("/api/jobs", json={"kind": "caption"}, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(client.delete("/api/images/1"), 401)
    assert_error(client.delete("/api/jobs/1"), 401)
    assert_error(client.post("/api/jobs", json={"kind": "index", "paths": [str(root / "nope")]}, headers=AUTH), 400)
    unknown = client.post("/api/jobs", json={"kind": "reindex"}, headers=AUTH)
    assert_error(unknown, 422)
    assert "'reindex'" in unknown.json()["detail"] and "'index', 'caption'" in unknown.json()["detail"]
    # Told by its own kind's rules: the error named the index job's kind for any caption job's mistake.
    long_prompt = client.post("/api/jobs", json={"kind": "caption", "prompt": "a" * 2000}, headers=AUTH)
    assert_error(long_prompt, 422)
    assert long_prompt.json()["detail"].startswith("body.caption.prompt: String should have at most 1000")
    for path in ("", "photos", "~/photos"):  # the server's working folder means nothing to a client
        relative = client.post("/api/jobs", json={"kind": "index", "paths": [path]}, headers=AUTH)
        assert_error(relative, 400)
        assert relative.json()["detail"] == f"paths must be absolute: {path!r}"
    latin1 = os.fsdecode(bytes(root) + b"/caf\xe9")  # a folder whose name the catalog cannot hold
    os.mkdir(latin1)
    body = json.dumps({"kind": "index", "paths": [latin1]})  # "\udce9": JSON can carry it
    refused = client.post("/api/jobs", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert_error(refused, 400)
    assert "caf\\xe9: the name is not valid UTF-8" in refused.json()["detail"]
    nul = client.post("/api/jobs", json={"kind": "caption", "prompt": "a\x00b"}, headers=AUTH)  # PostgreSQL refuses NUL
    assert_error(nul, 400)
    assert "--prompt 'a\x00b' is not valid UTF-8 text without NUL characters" == nul.json()["detail"]


def test_jobs_add_images_searches_see_them_and_captions(served, retriever, captioner):
    client, root, _ = served
    job = client.post("/api/jobs", json={"kind": "index", "paths": [str(root / "later")]}, headers=AUTH).json()
    done = wait(client, job["id"])
    assert done["state"] == "done" and done["result"]["indexed"] == 3 and done["done"] == done["total"] == 3
    paths = {r["path"] for r in client.get("/api/search", params={"q": "a red circle", "k": 11, "rerank": "false"}).json()["results"]}
    assert {str(p) for p in (root / "later").iterdir()} <= paths  # no restart needed
    again = wait(client, client.post("/api/jobs", json={"kind": "index"}, headers=AUTH).json()["id"])
    assert again["params"]["paths"] == [] and again["state"] == "done"  # every folder indexed before
    assert (again["result"]["unchanged"], again["result"]["indexed"], again["result"]["roots_gone"]) == (11, 0, [])
    job = client.post("/api/jobs", json={"kind": "caption", "max_new_tokens": 5}, headers=AUTH).json()
    assert wait(client, job["id"])["result"]["captioned"] == 11
    assert client.get("/api/images", params={"has_caption": "false"}).json()["total"] == 0
    assert client.get("/api/jobs").json()["jobs"][-1]["id"] == job["id"]
    job = client.post("/api/jobs", json={"kind": "caption", "max_new_tokens": 5, "candidates": 2, "overwrite": True},
                      headers=AUTH).json()
    assert wait(client, job["id"])["result"]["captioned"] == 11
    models = {image["caption_model"] for image in client.get("/api/images", params={"limit": 100}).json()["images"]}
    assert models == {f"{captioner.name} (best of 2 by {retriever.identity.name})"}
    for candidates in (0, 17):
        assert_error(client.post("/api/jobs", json={"kind": "caption", "candidates": candidates}, headers=AUTH), 422)
    assert_error(client.get("/api/jobs/9999"), 404)


def test_cancel_a_running_job(served, tmp_path):
    client, _, _ = served
    make_images(tmp_path / "many", 60, seed=43)
    job = client.post("/api/jobs", json={"kind": "index", "paths": [str(tmp_path / "many")], "batch_size": 2},
                      headers=AUTH).json()
    while client.get(f"/api/jobs/{job['id']}").json()["done"] < 4:
        time.sleep(0.05)
    during = client.get("/api/search", params={"q": "a red circle", "k": 3})  # searches go on meanwhile
    assert during.status_code == 200 and len(during.json()["results"]) == 3
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "running"
    image_id = client.get("/api/images", params={"limit": 1}).json()["images"][0]["id"]
    busy = client.delete(f"/api/images/{image_id}", headers=AUTH)  # the job holds the writer lock
    assert_error(busy, 409)
    assert busy.json()["detail"].startswith("the index is busy: a job of this server, or another blipsearch run")
    assert client.delete(f"/api/jobs/{job['id']}", headers=AUTH).status_code == 200
    final = wait(client, job["id"])
    assert final["state"] == "cancelled" and 4 <= final["done"] < 60


def test_one_search_cannot_rerank_more_than_the_server_allows(served):
    """k and candidates go to 10,000, and each re-ranked image is decoded and run through the ViT: one
    request could hold the model for many minutes (serve --max-rerank, 256 by default)."""
    client, _, _ = served
    for params in ({"k": 257}, {"candidates": 300}, {"k": 200, "hybrid": "true"}):
        refused = client.get("/api/search", params={"q": "a red circle", **params})
        assert_error(refused, 400)
        assert "and this server re-ranks at most 256 (serve --max-rerank)" in refused.json()["detail"]
    for params in ({"k": 256}, {"k": 10_000, "rerank": "false"}, {"k": 128, "hybrid": "true"}):
        assert client.get("/api/search", params={"q": "a red circle", **params}).status_code == 200


def test_a_gpu_out_of_memory_is_a_503(served, monkeypatch):
    import torch

    client, _, service = served

    class OutOfMemory:
        def search_text(self, *_):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(service, "require_searcher", OutOfMemory)
    failed = TestClient(client.app, raise_server_exceptions=False).get("/api/search", params={"q": "a red circle"})
    assert_error(failed, 503)
    assert failed.json()["detail"] == "the GPU ran out of memory; try again, or ask for fewer candidates"


def test_thumbnails_are_made_a_few_at_a_time(served, monkeypatch):
    """Made in request threads, each decoding a whole image where it is no JPEG: at most one per core."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from indexer import decode
    from tests.conftest import MostAtOnce

    client, _, service = served
    slow_thumbnail = MostAtOnce(decode.Skipped("corrupt", "stand-in"), seconds=0.05)

    for kept in (service.store.directory / "thumbnails").glob("*.jpg"):  # made by earlier tests
        kept.unlink()
    monkeypatch.setattr(decode, "thumbnail_jpeg", slow_thumbnail)
    monkeypatch.setattr(service.thumbnails, "decode_slots", threading.BoundedSemaphore(2))
    ids = [image["id"] for image in client.get("/api/images", params={"status": "indexed"}).json()["images"]]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: client.get(f"/api/images/{i}/thumbnail").status_code, ids * 2))
    assert set(statuses) == {422} and slow_thumbnail.most == 2


def test_delete_an_image(served):
    client, _, _ = served
    page = client.get("/api/images", params={"path": "*img0007*"}).json()
    image_id = page["images"][0]["id"]
    files = client.get("/api/status").json()["counts"]["files"]
    assert client.delete(f"/api/images/{image_id}", headers=AUTH).json() == {"deleted": image_id}
    assert client.get("/api/status").json()["counts"]["files"] == files - 1  # this server's writes: counted at once
    assert_error(client.get(f"/api/images/{image_id}"), 404)
    found = client.get("/api/search", params={"q": "a red circle", "k": 100, "rerank": "false"}).json()
    assert page["images"][0]["path"] not in {r["path"] for r in found["results"]}
    assert_error(client.delete(f"/api/images/{image_id}", headers=AUTH), 404)


def test_counts_are_cached_and_counted_again_in_the_background():
    """/healthz, /api/status and /metrics counted every catalog row for each request: at 0.1-0.3 s a
    million files, a probe every few seconds on a large catalog kept the database busy counting."""
    from indexer.errors import CatalogConnectionError

    counted, outage = [], []

    def count():
        time.sleep(0.02)
        if outage:
            raise CatalogConnectionError("lost the connection to the catalog")
        counted.append(time.monotonic())
        return {"files": len(counted)}

    def counted_again(times: int) -> None:
        deadline = time.monotonic() + 10
        while len(counted) < times and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # counted; then kept, a moment later

    counts = CachedCounts(count, min_age_s=0.3)
    assert [counts.get() for _ in range(50)] == [{"files": 1}] * 50 and len(counted) == 1
    time.sleep(0.3)
    assert counts.get() == {"files": 1}  # stale: the answer is the last count, and a count starts
    counted_again(2)
    assert counts.get() == {"files": 2} and len(counted) == 2
    counts.refresh()  # after this server's own writes
    assert counts.get() == {"files": 3}
    outage.append(True)
    time.sleep(0.3)
    counts.get()  # starts the count that fails
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            counts.get()
            time.sleep(0.01)
        except CatalogConnectionError:
            break
    with pytest.raises(CatalogConnectionError):  # as an uncached count would, while the database is away
        counts.get()
    outage.clear()
    time.sleep(0.3)
    with pytest.raises(CatalogConnectionError):
        counts.get()  # starts a count that succeeds
    counted_again(4)
    assert counts.get() == {"files": 4}
    # A count that takes long is made ten times its duration apart, not every `min_age_s`.
    # Counted by the first request rather than at start (the index directory's bytes: a stat per file).
    later: list[int] = []
    lazy = CachedCounts(lambda: later.append(1) or {"bytes": len(later)}, at_start=False)
    assert later == [] and lazy.get() == {"bytes": 1} and lazy.get() == {"bytes": 1} and later == [1]
    slow_counts: list[float] = []
    slow = CachedCounts(lambda: time.sleep(0.1) or slow_counts.append(0) or {"files": 0}, min_age_s=0.0)
    began = time.monotonic()
    while time.monotonic() - began < 0.5:
        slow.get()
    assert len(slow_counts) == 1


def test_serve_command_answers_over_real_http(tmp_path, tiny_model):
    import signal
    import subprocess
    import sys

    import httpx

    from tests.conftest import ROOT, free_port, run_cli

    refused = run_cli("serve", "--index", str(tmp_path / "idx"), "--model", str(tiny_model), "--host", "0.0.0.0",
                      env={"BLIPSEARCH_API_TOKEN": ""})
    assert refused.returncode == 2 and "BLIPSEARCH_API_TOKEN" in refused.stderr
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--index", str(tmp_path / "idx"), "--model", str(tiny_model),
         "--port", str(port)], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read().decode()
                time.sleep(0.2)
        assert health.status_code == 200 and health.json()["counts"]["files"] == 0
        empty = httpx.get(f"http://127.0.0.1:{port}/api/search", params={"q": "a dog"})
        assert empty.status_code == 400 and "index is empty" in empty.json()["detail"]
        second = run_cli("serve", "--index", str(tmp_path / "idx"), "--model", str(tiny_model), "--port", str(port))
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.strip() == f"Error: cannot listen on 127.0.0.1 port {port}: Address already in use; " \
            "choose another --port (or --host)"
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 143  # uvicorn shuts down, then raises SIGTERM again: Terminated
    assert server.stderr.read().decode().startswith(
        f"blipsearch: serving {tmp_path / 'idx'}, 0 images (an empty index: index into it with POST /api/jobs, "
        f"or check --index), on http://127.0.0.1:{port}/")


def test_the_start_line_gives_an_address_a_browser_takes():
    from api.cli_serve import url

    assert url("127.0.0.1", 8000) == "http://127.0.0.1:8000/" and url("::1", 8080) == "http://[::1]:8080/"


def test_searches_see_what_other_processes_index(tmp_path, retriever, tiny_model):
    """A `blipsearch index` run by cron beside the server: the next search after it sees its images,
    and stops returning the ones it removed, without a restart."""
    from tests.conftest import run_cli

    idx = tmp_path / "idx"
    service = Service(ServeConfig(StoreConfig(idx), reload_check_s=0), retriever)

    def outside_index():
        run_cli("index", str(tmp_path / "photos"), "--index", str(idx), "--model", str(tiny_model), "-q", check=True)

    def found(expected):
        """What searches return once they agree with `expected` (reloads run in the background)."""
        deadline = time.monotonic() + 30
        while True:
            response = client.get("/api/search", params={"q": "a red circle", "k": 50, "rerank": "false"})
            paths = {os.path.relpath(r["path"], tmp_path / "photos") for r in response.json()["results"]} \
                if response.status_code == 200 else response.json()["detail"]
            if paths == expected or time.monotonic() > deadline:
                return paths
            time.sleep(0.05)

    try:
        with TestClient(create_app(service)) as client:
            empty = "the index is empty; start an index job first (POST /api/jobs)"
            assert found(empty) == empty
            no_roots = client.post("/api/jobs", json={"kind": "index"})
            assert_error(no_roots, 400)
            assert no_roots.json()["detail"] == "give the folders to index: this index has none yet"
            make_images(tmp_path / "photos", 3, seed=43)
            outside_index()
            assert found({"img0000.jpg", "img0001.jpg", "img0002.jpg"}) == {"img0000.jpg", "img0001.jpg", "img0002.jpg"}
            make_images(tmp_path / "photos" / "more", 2, seed=44)
            os.remove(tmp_path / "photos" / "img0001.jpg")
            outside_index()
            expected = {"img0000.jpg", "img0002.jpg", "more/img0000.jpg", "more/img0001.jpg"}
            assert found(expected) == expected
            # A writer sharing the catalog (under a FAISS file of its own) removes the oldest image: the
            # newest embedding id, which the server watched before, stays as it was.
            from indexer.catalog import Catalog, sqlite_url

            state = service._index_state()
            other = Catalog.open(sqlite_url(idx / "catalog.sqlite"))
            oldest = min(other.files(), key=lambda row: row.embedding_id)
            assert len(other.remove_files([oldest.id])) == 1
            other.close()
            assert service._index_state() != state
    finally:
        service.close()


def test_an_index_another_model_claimed_meanwhile_is_a_clear_error(tmp_path, retriever):
    """The server started on an empty index; another process then indexed it with another model."""
    from retrieval.tiny import make_retrieval
    from tests.conftest import run_cli

    idx = tmp_path / "idx"
    service = Service(ServeConfig(StoreConfig(idx), reload_check_s=0), retriever)
    other = make_retrieval(tmp_path / "other-model", seed=1)
    make_images(tmp_path / "photos", 2, seed=45)
    try:
        with TestClient(create_app(service)) as client:
            run_cli("index", str(tmp_path / "photos"), "--index", str(idx), "--model", str(other), "-q", check=True)
            deadline = time.monotonic() + 30
            while "was built with model" not in (detail := client.get("/api/search", params={"q": "x"}).text):
                assert time.monotonic() < deadline, detail
                time.sleep(0.05)
            assert_error(client.get("/api/search", params={"q": "x"}), 400)
    finally:
        service.close()


def test_an_index_job_keeps_the_excludes_the_index_was_given(tmp_path, retriever, tiny_model):
    from tests.conftest import run_cli

    make_images(tmp_path / "photos" / "keep", 2, seed=44)
    make_images(tmp_path / "photos" / "cache", 2, seed=45)
    run_cli("index", str(tmp_path / "photos"), "--index", str(tmp_path / "idx"), "--model", str(tiny_model),
            "--exclude", "cache", "-q", check=True)
    service = Service(ServeConfig(StoreConfig(tmp_path / "idx")), retriever)
    try:
        with TestClient(create_app(service)) as client:
            job = client.post("/api/jobs", json={"kind": "index"}).json()
            assert job["params"]["exclude"] is None
            result = wait(client, job["id"])["result"]
    finally:
        service.close()
    assert result["indexed"] == 0 and result["unchanged"] == 2


def test_a_catalog_server_away_is_a_503_and_its_return_needs_no_restart(tmp_path, retriever, postgres_url):
    """Before, a database restart left `serve` answering 500 once for each pooled connection."""
    make_images(tmp_path / "photos", 3, seed=43)
    link = Cuttable(postgres_url)
    service = Service(ServeConfig(StoreConfig(tmp_path / "idx", catalog_url=link.url)), retriever, lambda: None)
    try:
        with TestClient(create_app(service)) as client:
            job = client.post("/api/jobs", json={"kind": "index", "paths": [str(tmp_path / "photos")]})
            assert wait(client, job.json()["id"])["state"] == "done"
            assert len(client.get("/api/search", params={"q": "a red circle"}).json()["results"]) == 3
            link.cut()
            away = client.get("/api/search", params={"q": "a red circle"})
            assert_error(away, 503)
            assert away.json()["detail"].startswith("lost the connection to the catalog at postgresql+psycopg://")
            link.restore()
            assert len(client.get("/api/search", params={"q": "a red circle"}).json()["results"]) == 3
    finally:
        service.close()
        link.cut()
