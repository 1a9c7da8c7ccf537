"""Two replicas on one Milvus: how soon an add through one is found through the other.

A Milvus Lite server on 127.0.0.1; a catalog run trained into it (`fashionrec train
--store milvus`, 200 real photos from clothing-dataset-small's ``train/``, 20 per
class, 32 px, random weights: the measurement is about the store, not the model); two
``fashionrec serve`` processes on two ports. Then ``--adds`` photos from ``test/`` are
added one by one through replica A (``POST /api/items``) and, from the moment A answers
200, replica B is asked for the product (``GET /api/items/{id}``) until it answers 200:
the time to found, per add. Target (issue 20): every add found through B, each within
1 s of its 200. Bounded: ``--adds`` requests, each wait at most ``--wait-s``.

    python experiments/bench_replicas.py      # experiments/results/bench_replicas.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from benchkit import free_port, matmul_gflops

HERE = Path(__file__).resolve().parent
REAL = HERE.parent.parent / "shared" / "datasets" / "clothing-dataset-small"
RESULTS = HERE / "results"
KEY = "bench"


def wait(check, timeout, what, proc=None):
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what} died:\n{proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up within {timeout} s")
        time.sleep(0.2)


def answers(url):
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def catalog(root, per_class):
    """A split-free folder catalog of ``per_class`` photos per class (copies: a
    catalog's images stay inside its folder)."""
    for cls in sorted(p.name for p in (REAL / "train").iterdir()):
        (root / cls).mkdir(parents=True)
        for photo in sorted((REAL / "train" / cls).iterdir())[:per_class]:
            shutil.copy(photo, root / cls / photo.name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adds", type=int, default=100)
    ap.add_argument("--wait-s", type=float, default=10.0)
    ap.add_argument("--per-class", type=int, default=20)
    args = ap.parse_args()
    from fashionrec.artifacts import cpu_description
    from fashionrec.milvus import connect

    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    procs = []
    env = {**os.environ, "FASHIONREC_API_KEY": KEY, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(work / "m"),
             "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))

        def milvus_up():
            try:
                return connect(uri, timeout=2) is not None
            except Exception:  # noqa: BLE001
                return False
        wait(milvus_up, 60, "Milvus Lite")
        catalog(work / "shop", args.per_class)
        subprocess.run([sys.executable, "-m", "fashionrec", "train", "--catalog",
                        str(work / "shop"), "--image-size", "32", "--weights", "none",
                        "--epochs", "2", "--run-dir", str(work / "run"), "--no-progress",
                        "--store", "milvus", "--milvus-uri", uri, "--collection", "shop"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        urls = []
        for _ in range(2):
            p = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "fashionrec", "serve", "--run-dir",
                                     str(work / "run"), "--host", "127.0.0.1", "--port",
                                     str(p)], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            procs.append(proc)
            urls.append(f"http://127.0.0.1:{p}")
            wait(lambda u=urls[-1]: answers(f"{u}/api/ready"), 240, "fashionrec serve", proc)
        a, b = (httpx.Client(base_url=u, timeout=30) for u in urls)
        photos = sorted(p for c in sorted((REAL / "test").iterdir()) for p in c.iterdir())
        photos = photos[:: max(1, len(photos) // args.adds)][:args.adds]
        found_s, add_s, missing, first_ask = [], [], [], 0
        for i, photo in enumerate(photos):
            item = f"added-{i}"
            t = time.perf_counter()
            r = a.post("/api/items", headers={"Authorization": f"Bearer {KEY}"},
                       files=[("images", (photo.name, photo.read_bytes()))],
                       data={"ids": item})
            acked = time.perf_counter()
            if r.status_code != 200:
                raise SystemExit(f"add {item}: {r.status_code} {r.text}")
            add_s.append(acked - t)
            asks = 1
            while b.get(f"/api/items/{item}").status_code != 200:
                if time.perf_counter() - acked > args.wait_s:
                    missing.append(item)
                    break
                asks += 1
            else:
                found_s.append(time.perf_counter() - acked)
                first_ask += asks == 1
        items = [c.get("/api/stats").json()["items"] for c in (a, b)]
    finally:
        for proc in procs[::-1]:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    found = np.asarray(found_s) * 1e3
    out = {
        "machine": {"cpu": cpu_description(), "numpy_float32_gflops": matmul_gflops()},
        "setup": {"catalog": 10 * args.per_class, "adds": len(photos), "image_size": 32,
                  "milvus": "Milvus Lite server (development server), Strong consistency"},
        "found_through_b": len(found_s), "missing": missing,
        "found_ms": {"p50": float(np.percentile(found, 50)),
                     "p99": float(np.percentile(found, 99)), "max": float(found.max())},
        "add_ms": {"p50": float(np.percentile(add_s, 50)) * 1e3,
                   "p99": float(np.percentile(add_s, 99)) * 1e3},
        "within_1s": int((found <= 1000).sum()), "found_on_first_ask": first_ask,
        "items_after": items,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_replicas.json").write_text(json.dumps(out, indent=2) + "\n")
    f = out["found_ms"]
    md = [
        "# Two replicas on one Milvus Lite server: an add through A found through B",
        "",
        f"CPU: {out['machine']['cpu']}, NumPy float32 matmul peak "
        f"{out['machine']['numpy_float32_gflops']:.0f} GFLOP/s. Milvus Lite's own server on 127.0.0.1 (a "
        f"development server: pure Python; a Milvus cluster is not measured here). A "
        f"catalog run of {out['setup']['catalog']} real photos trained into it at 32 px; "
        f"two `fashionrec serve` processes. `python experiments/bench_replicas.py`.",
        "",
        "| adds through A | found through B | within 1 s of A's 200 | time to found p50 / "
        "p99 / max (ms) | add (A's 200) p50 / p99 (ms) | items A / B after |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {len(photos)} | {len(found_s)} | {out['within_1s']} | {f['p50']:.1f} / "
        f"{f['p99']:.1f} / {f['max']:.1f} | {out['add_ms']['p50']:.0f} / "
        f"{out['add_ms']['p99']:.0f} | {items[0]} / {items[1]} |",
        "",
        "Time to found: from A's 200 to the first 200 from B's `GET /api/items/{id}` "
        f"(asked again at once until found; Strong consistency: found on B's first ask "
        f"{first_ask} of {len(found_s)} times). Target: every add found, each within 1 s.",
    ]
    (RESULTS / "bench_replicas.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
