"""Load test of `blipsearch serve` (a real process on localhost) with a tiny checkpoint.

Mixed requests (text search with ITM re-ranking, ITC-only search, thumbnails, status, image metadata,
plus one indexing job mid-run) from 1 client, then from 8 concurrent clients. Reports errors,
requests/s and p50/p99 latency for each, and the 8-client / 1-client throughput ratio.

Run: python -m benchmarks.bench_serve [--requests 400]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"


def start_server(index: Path, model: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BLIPSEARCH_API_TOKEN": TOKEN}
    server = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--index", str(index), "--model", str(model),
                               "--port", str(port)], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(f"{base}/healthz", timeout=2)
            return server, base
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def one_request(client, base: str, ids: list[int], rng: random.Random) -> tuple[float, int]:
    roll = rng.random()
    began = time.perf_counter()
    if roll < 0.35:
        response = client.get(f"{base}/api/search", params={"q": rng.choice(["a red circle", "a blue square"]), "k": 10})
    elif roll < 0.5:
        response = client.get(f"{base}/api/search", params={"q": "a green shape", "rerank": "false"})
    elif roll < 0.8:
        response = client.get(f"{base}/api/images/{rng.choice(ids)}/thumbnail")
    elif roll < 0.9:
        response = client.get(f"{base}/api/status")
    else:
        response = client.get(f"{base}/api/images/{rng.choice(ids)}")
    return time.perf_counter() - began, response.status_code


def load(base: str, clients: int, requests: int, ids: list[int], job_folder: Path | None) -> dict:
    import httpx

    def worker(seed: int) -> list[tuple[float, int]]:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as client:
            return [one_request(client, base, ids, rng) for _ in range(requests // clients)]

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(worker, seed) for seed in range(clients)]
        if job_folder is not None:  # a job runs while the clients search
            httpx.post(f"{base}/api/jobs", json={"kind": "index", "paths": [str(job_folder)]},
                       headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()
        results = [r for f in futures for r in f.result()]
    elapsed = time.perf_counter() - began
    latencies = np.asarray([t for t, _ in results])
    errors = sum(1 for _, status in results if status >= 400)
    return {"n": len(results), "errors": errors, "rps": len(results) / elapsed,
            "p50": np.percentile(latencies, 50) * 1e3, "p99": np.percentile(latencies, 99) * 1e3}


def main() -> None:
    import httpx

    from retrieval.tiny import make_retrieval
    from tests.conftest import make_images

    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_retrieval(tmp / "model")
        make_images(tmp / "photos", 60, seed=1, size=(640, 480))
        make_images(tmp / "more", 30, seed=2, size=(640, 480))
        subprocess.run([sys.executable, "-m", "api.cli", "index", str(tmp / "photos"), "--index", str(tmp / "idx"),
                        "--model", str(model), "-q"], cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        server, base = start_server(tmp / "idx", model)
        try:
            ids = [image["id"] for image in httpx.get(f"{base}/api/images", params={"limit": 100}).json()["images"]]
            single = load(base, 1, args.requests // 4, ids, None)
            many = load(base, 8, args.requests, ids, tmp / "more")
            jobs = httpx.get(f"{base}/api/jobs").json()["jobs"]
            for _ in range(300):
                if jobs[-1]["state"] not in ("queued", "running"):
                    break
                time.sleep(0.2)
                jobs = httpx.get(f"{base}/api/jobs").json()["jobs"]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    for label, r in (("1 client ", single), ("8 clients", many)):
        print(f"{label}: {r['n']} mixed requests, {r['errors']} errors, {r['rps']:.1f} requests/s, "
              f"p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms")
    print(f"index job during the 8-client run: {jobs[-1]['state']}, indexed {jobs[-1]['result']['indexed']}")
    print(f"throughput 8 clients / 1 client = {many['rps'] / single['rps']:.2f}x")


if __name__ == "__main__":
    main()
