"""Session fixtures: tiny checkpoints and image folders, built once; helpers to run the CLI."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never touch a model hub

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    from retrieval.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> Path:
    return tiny_models[0]


@pytest.fixture(scope="session")
def retriever(tiny_model):
    from retrieval.config import ModelConfig
    from retrieval.encoders import Blip2Retriever

    return Blip2Retriever.load(ModelConfig(name=str(tiny_model), device="cpu"))


def make_images(directory: Path, count: int, seed: int = 0, size=(160, 120)) -> list[Path]:
    """Distinct images: coloured shapes on varied backgrounds, so tiny models score them differently."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        background = tuple(int(c) for c in rng.integers(0, 256, 3))
        image = Image.new("RGB", size, background)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = (int(v) for v in rng.integers(0, size[0] - 40, 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.ellipse((x, y, x + 40, y + int(rng.integers(20, 60))), fill=colour)
        path = directory / f"img{i:04d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def run_cli(*args: str, check: bool = False, timeout: float = 240, env: dict | None = None, fresh: bool = False):
    """Run `blipsearch` as a process of its own, exactly as a user would.

    It is forked from a parent that has already imported torch and transformers (tests/warm_cli.py)
    unless `fresh`, BLIPSEARCH_TEST_FRESH_PROCESSES=1, or `env` sets something other than blipsearch's
    own variables (the libraries read theirs on import): then it starts from nothing.
    """
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    warm = not (fresh or os.environ.get("BLIPSEARCH_TEST_FRESH_PROCESSES") == "1"
                or any(not key.startswith("BLIPSEARCH_") for key in env or {}))
    if warm:
        with tempfile.TemporaryDirectory(prefix="blipsearch-cli-") as output_dir:
            result = _warm_cli().run(list(args), full_env, timeout, Path(output_dir))
    else:
        result = subprocess.run(
            [sys.executable, "-m", "api.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
            env=full_env,
        )
    if check and result.returncode != 0:
        raise AssertionError(f"blipsearch {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


_WARM_CLI: list = []  # the one warm parent of this test session, started by the first command


def _warm_cli():
    from tests.warm_cli import WarmCli

    if not _WARM_CLI:
        _WARM_CLI.append(WarmCli(ROOT, {**os.environ, "HF_HUB_OFFLINE": "1"}))
    return _WARM_CLI[0]


def pytest_sessionfinish(session, exitstatus):
    for warm_cli in _WARM_CLI:
        warm_cli.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fill_files(catalog, count: int, path: str, status: str) -> None:
    """`count` files straight into the catalog, named `path` % i, in one statement on either database."""
    head, tail = path.split("%d")
    error = "NULL" if status == "indexed" else "'corrupt: x'"
    with catalog.engine.begin() as conn:
        conn.exec_driver_sql(
            f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) "
            f"INSERT INTO files (path, size, mtime_ns, status, error, updated_at) "
            f"SELECT '{head}' || (100000 + i) || '{tail}', 0, 1, '{status}', "
            f"{error}, 0 FROM n")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (decode workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after its last ')'
                if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):  # not a process, or gone meanwhile
            continue
    return found


def wait_gone(pids: list[int], timeout: float = 15) -> list[int]:
    """Those of `pids` still running after `timeout` (zombies count as gone: they run nothing)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    if handle.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(pid)
            except OSError:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def assert_consistent(index_dir: Path, catalog_url: str | None = None) -> None:
    """Catalog and FAISS file (with its delta, if one was saved) agree: every embedding has exactly its
    vectors, nothing else is stored."""
    import faiss

    from indexer.catalog import Catalog, sqlite_url
    from retrieval.faiss_index import stored_ids
    from retrieval.segments import delta_of, file_stamp

    catalog = Catalog.open(catalog_url or sqlite_url(index_dir / "catalog.sqlite"))
    try:
        identity = catalog.model()
        path = index_dir / "vectors.faiss"
        ids = stored_ids(faiss.read_index(str(path)))  # any index kind
        embedding_ids = catalog.embedding_ids()
        files = catalog.files()
    finally:
        catalog.close()
    delta = delta_of(path, file_stamp(path))
    if delta is not None:
        skipped, delta_index = delta
        ids = np.concatenate([ids[~np.isin(ids // identity.num_queries, skipped)], stored_ids(delta_index)])
    assert len(ids) == len(set(ids.tolist())), "duplicate vector ids"
    keys, per_key = np.unique(ids // identity.num_queries, return_counts=True)
    assert (per_key == identity.num_queries).all()
    assert keys.tolist() == embedding_ids.tolist()
    assert len({f.path for f in files}) == len(files)
    referenced = {f.embedding_id for f in files if f.status == "indexed"}
    assert referenced == set(embedding_ids.tolist()), "orphan or missing embeddings"


# -- PostgreSQL ------------------------------------------------------------------------------------
POSTGRES_URL = os.environ.get("BLIPSEARCH_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _postgres_admin(database: str | None = None):
    """An autocommit connection to the test server (to `database` on it, if given), or a skip (a
    failure where CI requires it)."""
    try:
        import psycopg

        plain = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
        if database is not None:
            plain = plain.rsplit("/", 1)[0] + "/" + database
        return psycopg.connect(plain, autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("BLIPSEARCH_REQUIRE_POSTGRES"):
            raise
        pytest.skip(f"no PostgreSQL server at {POSTGRES_URL} ({type(exc).__name__})")


@contextlib.contextmanager
def postgres_database():
    """The URL of a new, empty database, with a locale (ICU en-US) collation like a typical server's."""
    import uuid

    admin = _postgres_admin()
    name = f"blipsearch_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture
def postgres_url():
    """A new, empty database for one test."""
    with postgres_database() as url:
        yield url


class MostAtOnce:
    """A stand-in that takes a while and returns `result`; `most` is how many calls ran at once."""

    def __init__(self, result, seconds: float = 0.02) -> None:
        self.result, self.seconds = result, seconds
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, *_, **__):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        return self.result


class Cuttable:
    """A TCP forwarder to the PostgreSQL server that a test can cut and restore: the server going away
    as a restart, a failover or a dropped network makes it (refused connections, broken ones)."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self.target = make_url(url)
        self.lock = threading.Lock()  # the accepting thread and cut() both change the live sockets
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = self.target.set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                server = socket.create_connection((self.target.host, self.target.port or 5432))
            except OSError:  # the server itself refused: so does the link
                _sever(client)
                continue
            with self.lock:
                cut_meanwhile = listener is not self.listener  # accepted as cut() ran: it must not survive
                if not cut_meanwhile:
                    self.sockets += [client, server]
            if cut_meanwhile:
                _sever(client), _sever(server)
                return
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            # Not close() alone: while the other pump is blocked in recv() on `sink`, Linux sends no FIN,
            # and a server connection left open outlives its client (idle in a transaction, holding locks).
            _sever(sink)

    def cut(self) -> None:
        with self.lock:
            cut, self.listener, self.sockets = [self.listener, *self.sockets], None, []
        for sock in cut:  # shutdown wakes the thread blocked in accept
            _sever(sock)

    def restore(self) -> None:
        with self.lock:
            self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()


def _sever(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected, or already shut
        pass
    sock.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def caption_model(tiny_models) -> Path:
    return tiny_models[1]


@pytest.fixture(scope="session")
def captioner(caption_model):
    from retrieval.captioner import Blip2Captioner
    from retrieval.config import ModelConfig

    return Blip2Captioner.load(ModelConfig(name=str(caption_model), device="cpu"))
