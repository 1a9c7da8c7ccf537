"""Service benchmark: ``fashionrec serve`` on 127.0.0.1 under bounded load.

* item queries (``GET /api/items/{id}/similar?k=6``) at concurrency 1 / 8 / 32 on a
  5,000-item and a 100,000-item catalog: p50 / p95 / p99, requests/s, errors;
* photo queries (``POST /api/similar``, 224 px) at concurrency 1 and 16, in images/s,
  next to the run's own extractor measured in the same run (batched, and one image at
  a time), so the micro-batching is seen against what the backbone can do;
* a mixed run: item queries at concurrency 8 while products are added and removed
  through the API: errors, the final count against the expected one, and whether
  every added product is findable.

Runs (under ``experiments/out/serve/``, made once): the stand-in ImageNet backbone at
64 px with the first 5,000 test images as the catalog; the same run with its index
replaced by 100,000 items (its 5,000 embeddings and noisy copies of them, searched as
``--search auto`` chooses); a 224-px run for photo queries. Every load loop stops after
its request count or its time limit, whichever comes first.

    python experiments/bench_serve.py      # writes experiments/results/bench_serve.{json,md}
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
from benchkit import free_port

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
WORK = HERE / "out" / "serve"
KEY = "bench-key"


def run_cli(*args):
    subprocess.run([sys.executable, "-m", "fashionrec", *args], check=True,
                   stdout=subprocess.DEVNULL)


def prepare_runs():
    """The three runs (made once; delete experiments/out/serve to remake them)."""
    from fashionrec import Recommender
    from fashionrec.index import CatalogIndex
    from fashionrec.rundir import RunDir
    from fashionrec.store import IndexStore

    small, big, photo = WORK / "items-5k", WORK / "items-100k", WORK / "photo-224"
    if not (small / "run.json").is_file():
        run_cli("train", "--n-train", "2000", "--n-reco", "5000", "--image-size", "64",
                "--epochs", "8", "--run-dir", str(small), "--no-progress")
    if not (photo / "run.json").is_file():
        run_cli("train", "--n-train", "300", "--n-reco", "500", "--image-size", "224",
                "--epochs", "3", "--run-dir", str(photo), "--no-progress")
    if not (big / "run.json").is_file():
        tmp = big.with_name(big.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(small, tmp, ignore=shutil.ignore_patterns("features", "plots"))
        rec = Recommender.load(tmp)
        base, n = rec.index_, 100_000
        rng = np.random.default_rng(0)
        reps = -(-n // len(base))
        vectors = np.tile(np.asarray(base.vectors), (reps, 1))[:n]
        vectors[len(base):] += 0.3 * rng.standard_normal(
            (n - len(base), base.dim), dtype=np.float32)
        # ids: the 5,000 test images, then products from 10,000 up (ids and test
        # indices never mix)
        ids = np.concatenate([base.ids, 10_000 + np.arange(n - len(base))])
        index = CatalogIndex(vectors, ids, np.tile(base.labels, reps)[:n], base.class_names,
                             base.scaler, np.tile(base.images, (reps, 1, 1))[:n],
                             metadata=base.metadata)
        IndexStore.of(RunDir(tmp).current()).write_base(index)
        Recommender.load(tmp).reindex("auto", progress=False, log=None)
        tmp.rename(big)
    return small, big, photo


class Server:
    """``fashionrec serve`` in a child process on 127.0.0.1."""

    def __init__(self, run_dir, workers=1, timeout=600):
        self.port = free_port()
        env = {**os.environ, "FASHIONREC_API_KEY": KEY, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fashionrec", "serve", "--run-dir", str(run_dir),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)],
            env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.proc.stdout.read()[-3000:]}")
            try:
                if request(self.port, "GET", "/api/ready")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit("the server did not become ready")
            time.sleep(0.2)

    def stop(self):
        self.proc.terminate()  # SIGTERM: uvicorn stops cleanly
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def request(port, method, path, body=None, headers=None, conn=None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def multipart(fields, files):
    boundary = "fashionrec-bench-boundary"
    parts = []
    for name, value in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     f"{value}\r\n".encode())
    for name, filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                     f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'.encode()
                     + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def load(port, make_request, concurrency, max_requests, max_seconds):
    """``concurrency`` workers send ``make_request(i) -> (method, path, body, headers)``
    until ``max_requests`` are sent or ``max_seconds`` have passed."""
    lock, counter = threading.Lock(), [0]
    latencies, statuses = [], []
    deadline = time.monotonic() + max_seconds

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < deadline:
            with lock:
                if counter[0] >= max_requests:
                    break
                i = counter[0]
                counter[0] += 1
            method, path, body, headers = make_request(i)
            t = time.perf_counter()
            try:
                status, _ = request(port, method, path, body, headers, conn)
            except (OSError, http.client.HTTPException):
                status = -1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                latencies.append(time.perf_counter() - t)
                statuses.append(status)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1e3
    return {"concurrency": concurrency, "requests": len(ms), "seconds": wall,
            "per_s": len(ms) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
            "errors": int(sum(s != 200 for s in statuses))}


def item_queries(run_dir, n_items, args, workers=1):
    from fashionrec.rundir import RunDir
    from fashionrec.store import IndexStore

    ids = IndexStore.of(RunDir(run_dir).current()).live_ids()[0]
    ids = sorted(ids)
    rng = random.Random(0)
    picks = [ids[rng.randrange(len(ids))] for _ in range(100_000)]
    server = Server(run_dir, workers)
    try:
        time.sleep(5 * (workers > 1))  # ready is one worker's; let the others warm too
        stats = json.loads(request(server.port, "GET", "/api/stats")[1])
        rows = []
        for c in (1, 8, 32):
            def make(i):
                return "GET", f"/api/items/{quote(str(picks[i]), safe='')}/similar?k=6", None, {}
            load(server.port, make, c, 200, 20)  # warm-up
            rows.append({"catalog": n_items, "search": stats["index"]["search"],
                         "workers": workers,
                         **load(server.port, make, c, args.item_requests, args.seconds)})
            print(rows[-1], flush=True)
    finally:
        server.stop()
    return rows


def photo_queries(run_dir, args):
    from fashionrec import Recommender

    rec = Recommender.load(run_dir)
    x_test, _ = rec.test_images()
    photos = []
    from PIL import Image

    for i in range(64):
        buf = io.BytesIO()
        Image.fromarray(x_test[9000 + i]).save(buf, "PNG")
        photos.append(buf.getvalue())
    # the extractor alone, in this process, before the server starts
    ext = rec.extractor
    images = x_test[9000:9064].astype(np.float32)
    ext.transform(images[:16])
    t = time.perf_counter()
    for _ in range(2):
        ext.transform(images)
    batched = 128 / (time.perf_counter() - t)
    t = time.perf_counter()
    for img in images[:16]:
        ext.transform(img[None])
    one = 16 / (time.perf_counter() - t)
    del rec, ext
    server = Server(run_dir)
    rows = []
    try:
        for c, n in ((1, args.photo_requests // 4), (16, args.photo_requests)):
            def make(i):
                body, headers = multipart([("k", "6")], [("image", "q.png",
                                                          photos[i % len(photos)])])
                return "POST", "/api/similar", body, headers
            load(server.port, make, c, 16, 60)  # warm-up
            r = load(server.port, make, c, n, args.seconds * 3)
            r["images_per_s"] = r["per_s"]
            rows.append(r)
            print(r, flush=True)
        metrics = request(server.port, "GET", "/metrics")[1].decode()
        sizes = [line for line in metrics.splitlines()
                 if line.startswith("fashionrec_photo_batch_size_") and "_sum" in line
                 or line.startswith("fashionrec_photo_batch_size_count")]
    finally:
        server.stop()
    return {"extractor_batched_img_s": batched, "extractor_one_at_a_time_img_s": one,
            "server": rows, "batch_size_metrics": sizes}


def mixed(run_dir, args):
    """Queries at concurrency 8 while a writer adds 20 products and removes 10."""
    from fashionrec import Recommender

    work = WORK / "mixed"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(run_dir, work, ignore=shutil.ignore_patterns("features", "plots"))
    rec = Recommender.load(work)
    x_test, _ = rec.test_images()
    before = len(rec.index_)
    from PIL import Image

    photos = []
    for i in range(20):
        buf = io.BytesIO()
        Image.fromarray(x_test[8000 + i]).save(buf, "PNG")
        photos.append(buf.getvalue())
    del rec
    server = Server(work)
    auth = {"Authorization": f"Bearer {KEY}"}
    write_errors, added, removed = [], [], []

    def writer():
        for j in range(20):
            body, headers = multipart([("ids", str(50_000 + j))],
                                      [("images", f"p{j}.png", photos[j])])
            status, text = request(server.port, "POST", "/api/items", body,
                                   {**headers, **auth})
            (added.append(50_000 + j) if status == 200 else write_errors.append(text))
            if j % 2:
                status, text = request(server.port, "DELETE", f"/api/items/{50_000 + j - 1}",
                                       None, auth)
                (removed.append(50_000 + j - 1) if status == 200 else write_errors.append(text))

    try:
        w = threading.Thread(target=writer)
        w.start()
        ids = list(range(0, before))
        queries = load(server.port, lambda i: ("GET", f"/api/items/{ids[i % len(ids)]}"
                                               f"/similar?k=6", None, {}),
                       8, args.item_requests, args.seconds * 2)
        w.join(timeout=600)
        count = json.loads(request(server.port, "GET", "/api/stats")[1])["items"]
        live = set(added) - set(removed)
        findable = sum(request(server.port, "GET", f"/api/items/{i}/similar?k=3")[0] == 200
                       for i in sorted(live))
        gone = sum(request(server.port, "GET", f"/api/items/{i}")[0] == 404 for i in removed)
    finally:
        server.stop()
    return {"queries": queries, "added": len(added), "removed": len(removed),
            "write_errors": len(write_errors), "count_before": before, "count_after": count,
            "count_expected": before + len(added) - len(removed),
            "added_findable": findable, "added_live": len(live), "removed_gone": gone}


def write(result):
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_serve.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# The service under load (127.0.0.1, bounded runs)", "",
             f"CPU: {result['cpu']}. Server and load generator share the machine.", "",
             "## Item queries (`GET /api/items/{id}/similar?k=6`)", "",
             "| catalog | search | workers | concurrency | requests | requests/s | p50 (ms) | "
             "p95 (ms) | p99 (ms) | errors |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["items"]:
        lines.append(f"| {r['catalog']:,} | {r['search']} | {r['workers']} | {r['concurrency']} | "
                     f"{r['requests']} "
                     f"| {r['per_s']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['errors']} |")
    p = result["photos"]
    lines += ["", "## Photo queries (`POST /api/similar`, 224 px)", "",
              f"The run's extractor alone, same run: **{p['extractor_batched_img_s']:.1f} img/s** "
              f"batched (64 images, batch 32), {p['extractor_one_at_a_time_img_s']:.1f} img/s "
              f"one image at a time.", "",
              "| concurrency | requests | images/s | share of the batched extractor | p50 (ms) | "
              "p99 (ms) | errors |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in p["server"]:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s'] / p['extractor_batched_img_s']:.0%} | "
                     f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |")
    m = result["mixed"]
    q = m["queries"]
    lines += ["", "## Mixed: item queries at concurrency 8 while products are added and "
              "removed through the API", "",
              f"{q['requests']} queries, {q['errors']} errors, p50 {q['p50_ms']:.1f} ms, "
              f"p99 {q['p99_ms']:.1f} ms; {m['added']} adds and {m['removed']} removes, "
              f"{m['write_errors']} write errors; items {m['count_before']} -> "
              f"{m['count_after']} (expected {m['count_expected']}); added and still live "
              f"products findable: {m['added_findable']} of {m['added_live']}; removed ones "
              f"gone: {m['removed_gone']} of {m['removed']}."]
    (OUT / "bench_serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--item-requests", type=int, default=2000)
    p.add_argument("--photo-requests", type=int, default=320)
    p.add_argument("--seconds", type=float, default=30, help="time limit of one load run")
    args = p.parse_args()
    from fashionrec.artifacts import cpu_description

    WORK.mkdir(parents=True, exist_ok=True)
    small, big, photo = prepare_runs()
    result = {"cpu": cpu_description(),
              "items": item_queries(small, 5000, args) + item_queries(big, 100_000, args)
              + item_queries(big, 100_000, args, workers=2),
              "photos": photo_queries(photo, args), "mixed": mixed(small, args)}
    write(result)


if __name__ == "__main__":
    main()
