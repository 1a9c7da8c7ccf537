"""Stateless replicas: two `fashionrec serve` processes (two ports) on one Milvus Lite
server that the test starts on 127.0.0.1, spoken to over HTTP only.

An add through one replica is found through the other on the next query, a removal
through the other is gone from the first, a retrain's publish is picked up by both,
and while the Milvus server is down the routes that need it answer 503 with
``{"error": ...}``, ``/api/health`` stays up, ``/api/ready`` says why, and both
recover by themselves once it is back.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from serving import fashionrec_serve, free_port, milvus_lite, stop

pytest.importorskip("milvus_lite")
httpx = pytest.importorskip("httpx")

KEY = "r3plica"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _train(styles, run, seed, *more):
    from fashionrec.cli import main

    assert main(["train", "--catalog", str(styles), "--label-column", "articleType",
                 "--image-size", "32", "--weights", "none", "--epochs", "2", "--seed",
                 str(seed), "--run-dir", str(run), "--no-progress", *more]) == 0


def _serve(run):
    """A `fashionrec serve` process of ``run`` with writes on, once ready, and a client."""
    proc, url = fashionrec_serve(run, env={**os.environ, "FASHIONREC_API_KEY": KEY})
    return proc, httpx.Client(base_url=url, timeout=30)


def _png(rng):
    from catalogs import CLASSES, draw_product

    buf = io.BytesIO()
    draw_product(*CLASSES["Bags/Totes"], rng, (48, 48)).save(buf, "PNG")
    return buf.getvalue()


def _until(check, timeout, what):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_two_replicas_on_one_milvus_server(tmp_path):
    from catalogs import make_styles

    port, data = free_port(), tmp_path / "milvus"
    milvus, uri = milvus_lite(data, port)
    procs = []
    try:
        make_styles(tmp_path / "styles", n_per_class=5)
        styles, run = tmp_path / "styles/styles.csv", tmp_path / "run"
        _train(styles, run, 1, "--store", "milvus", "--milvus-uri", uri, "--collection",
               "shop")
        assert json.loads((run / "run.json").read_text())["store"]["collection"] == "shop"
        (pa, a), (pb, b) = _serve(run), _serve(run)
        procs += [pa, pb]
        n = a.get("/api/stats").json()["items"]

        # an add through A is found through B on the very next query
        rng = np.random.default_rng(7)
        for i in range(5):
            r = a.post("/api/items", headers=AUTH, files=[("images", ("p.png", _png(rng)))],
                       data={"ids": f"n{i}", "attributes": json.dumps({"price": 0.1 * i})})
            assert r.status_code == 200, r.text
            got = b.get("/api/items/100/similar", params={"k": 1, "where": f"price == {0.1 * i}"})
            assert got.status_code == 200 and [x["id"] for x in got.json()["items"]] == [f"n{i}"]
        bad = a.get("/api/items/100/similar", params={"where": "colour == 1"})
        assert bad.status_code == 422 and "unknown attribute 'colour'" in bad.json()["error"]
        # a removal through B is gone from A
        assert b.delete("/api/items/n0", headers=AUTH).status_code == 200
        assert a.get("/api/items/n0").status_code == 404
        assert a.get("/api/stats").json()["items"] == b.get("/api/stats").json()["items"] == n + 4

        # a retrain's publish (alias switched, run.json naming model and collection) is
        # picked up by both; the products added through the service are carried over
        old_run = a.get("/api/stats").json()["run"]["run_id"]
        _train(styles, run, 2)
        new_run = json.loads((run / "run.json").read_text())["run_id"]
        assert new_run != old_run
        for c in (a, b):
            _until(lambda c=c: c.get("/api/stats").json()["run"]["run_id"] == new_run, 120,
                   "a replica did not pick up the retrain")
            assert c.get("/api/stats").json()["items"] == n + 4
            assert c.get("/api/items/n3").json()["attributes"] == {"price": 0.1 * 3}
            assert c.get("/api/items/n0").status_code == 404

        # Milvus down: 503 with an error on the routes that need it, health stays up,
        # ready says why; back up: both ready again by themselves
        before = a.get("/api/items/100/similar", params={"k": 3}).json()["items"]
        stop(milvus)
        r = a.get("/api/items/100/similar", params={"k": 3})
        assert r.status_code == 503 and "Milvus" in r.json()["error"], r.text
        assert "127.0.0.1" not in r.json()["error"] and r.headers["retry-after"] == "1"
        assert b.get("/api/items", params={"limit": 2}).status_code == 503
        r = b.post("/api/items", headers=AUTH, files=[("images", ("p.png", _png(rng)))],
                   data={"ids": "late"})
        assert r.status_code == 503 and "error" in r.json()
        for c in (a, b):
            assert c.get("/api/health").status_code == 200
            _until(lambda c=c: c.get("/api/ready").status_code == 503, 10, "still ready")
            assert "Milvus" in c.get("/api/ready").json()["error"]
        # a replica started while Milvus is down: one line that names the URI
        late = subprocess.run([sys.executable, "-m", "fashionrec", "serve", "--run-dir",
                               str(run), "--host", "127.0.0.1", "--port", str(free_port())],
                              capture_output=True, text=True, timeout=300)
        lines = late.stderr.strip().splitlines()
        assert late.returncode == 1 and len(lines) == 1, late.stderr
        assert lines[0].startswith(f"error: Milvus at {uri} is unreachable"), late.stderr
        milvus, _ = milvus_lite(data, port)
        for c in (a, b):
            _until(lambda c=c: c.get("/api/ready").status_code == 200, 60, "never recovered")
        again = b.get("/api/items/100/similar", params={"k": 3})
        assert again.status_code == 200 and again.json()["items"] == before
    finally:
        for proc in procs:
            stop(proc)
        stop(milvus)


def test_metrics_add_up_over_workers(trained_run, tmp_path):
    """`serve --workers 2`: whichever worker answers a scrape, the request counter
    holds every worker's requests (Prometheus' multiprocess registry)."""
    import shutil

    from prometheus_client.parser import text_string_to_metric_families

    _, run_dir = trained_run
    shutil.copytree(run_dir, tmp_path / "run")
    proc, url = fashionrec_serve(tmp_path / "run", "--workers", "2", timeout=240)
    try:
        ids = [i["id"] for i in httpx.get(f"{url}/api/items").json()["items"]]
        n, sent, deadline = 40, 0, time.monotonic() + 120
        for i in range(n):  # a new connection each: the workers share them
            while True:  # the other worker may still be loading its model: 503, asked again
                r = httpx.get(f"{url}/api/items/{ids[i % len(ids)]}/similar", params={"k": 2})
                sent += 1
                if r.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert r.status_code == 200, r.text
        for _ in range(6):
            text = httpx.get(f"{url}/metrics").text
            samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
            similar = [s for s in samples if s.name == "fashionrec_requests_total"
                       and s.labels["route"] == "/api/items/{item_id:path}/similar"]
            assert sum(s.value for s in similar if s.labels["status"] == "200") == n, text
            assert sum(s.value for s in similar) == sent, text
            items = [s.value for s in samples if s.name == "fashionrec_items"]
            assert items == [httpx.get(f"{url}/api/stats").json()["items"]]
    finally:
        stop(proc)
