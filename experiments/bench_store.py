"""Catalog store benchmark: the local store (HNSW, :class:`fashionrec.store.IndexStore`)
against Milvus (:class:`fashionrec.milvus.MilvusStore` on a Milvus Lite server this
script starts on 127.0.0.1 and stops), for clustered catalogs of 100k and 1M 512-d
vectors (``bench_query.py``'s generator), measured in one run.

Every product has a category that follows its picture, ``<group>/<class>/<part>``:
its Fashion-MNIST class (10 %), the group of five classes the class is in (50 %),
and a tenth of the class cut along the class's main direction (1 %); and a random
integer attribute ``attr`` in 0..99, unrelated to the picture (``attr < 1`` keeps
1 %). Queries go through :func:`fashionrec.queries.nearest`, the code a service
request runs: the local store's filters become allowed rows (vectorised masks), the
Milvus store's one boolean expression.

Per store and size: the ingest rate (local: the HNSW graph built and the index and
graph written, as ``fashionrec index`` does; Milvus: :meth:`MilvusStore.publish`, the
rows inserted, flushed, indexed and loaded); single-query p50 / p99 and recall@10
against exact search; throughput at concurrency 8 (a fixed number of requests, with
a time cap); and filtered queries at 1 %, 10 % and 50 % on the random attribute
(fresh queries, products like the catalog's) and on the category (queried from a
product of another category: the filter's rows are far from the query), each with
the share of answers of exactly k items and recall@10 against exact search over the
rows the filter keeps. Milvus Lite is a development server (one Python process);
what a Milvus cluster would do is not measured here.

    python experiments/embeddings.py --size 64     # once: the real embeddings
    python experiments/bench_store.py              # writes experiments/results/bench_store.{json,md}
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from benchkit import matmul_gflops  # noqa: E402

OUT = HERE / "results"
K = 10
WARM = 200  # unfiltered queries run after a load, before measuring (page the files in)
CLASSES = ("Tshirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Boot")
GROUPS = ("GroupA", "GroupB")  # classes 0-4, 5-9
SCHEMA = {"attr": "integer"}
SHARES = ("1%", "10%", "50%")
WHERE = {"1%": "attr < 1", "10%": "attr < 10", "50%": "attr < 50"}


# ------------------------------------------------------------------ the catalog
def catalog(n, n_queries):
    """``(index, queries, note, parts)``: ``n`` clustered vectors as a
    :class:`~fashionrec.index.CatalogIndex` with categories and ``attr``, fresh
    queries, the generator's note and each product's part (0..9) in its class."""
    from bench_query import make_vectors

    from fashionrec.index import CatalogIndex

    vectors, queries, note, labels = make_vectors("clustered", n, n_queries, with_labels=True)
    rng = np.random.default_rng(2)
    attr = rng.integers(0, 100, n).astype(np.float64)
    parts = np.empty(n, dtype=np.int64)
    for c in range(len(CLASSES)):  # the class cut in ten along its main direction
        rows = np.flatnonzero(labels == c)
        sample = vectors[rows[:5000]]
        axis = np.linalg.svd(sample - sample.mean(0), full_matrices=False)[2][0]
        rank = np.empty(len(rows), dtype=np.int64)
        rank[np.argsort(vectors[rows] @ axis, kind="stable")] = np.arange(len(rows))
        parts[rows] = rank * 10 // len(rows)
    categories = np.array([f"{GROUPS[c >= 5]}/{CLASSES[c]}/part{p}"
                           for c, p in zip(labels.tolist(), parts.tolist(), strict=True)],
                          dtype=object)
    index = CatalogIndex(vectors, np.arange(n), labels, CLASSES, categories=categories,
                         paths=None, schema=SCHEMA, attributes={"attr": attr},
                         metadata={"run_id": "bench_store"})
    return index, queries, note, parts


def category_cases(index, parts, n_queries, seed=3):
    """Per share, ``[(row, category)]``: a product and a category it is not in (the
    filter's rows are far from it)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(index), n_queries, replace=False)
    cases = {s: [] for s in SHARES}
    for r in rows.tolist():
        a = int(index.labels[r])
        b = int(rng.choice([c for c in range(len(CLASSES)) if c != a]))
        cases["10%"].append((r, CLASSES[b]))
        cases["1%"].append((r, f"{CLASSES[b]}/part{int(rng.integers(0, 10))}"))
        cases["50%"].append((r, GROUPS[a < 5]))
    return cases


def allowed_of(index, parts, category=None, where=None, own=None):
    """The rows a filter keeps (the truth's own computation, not the store's)."""
    keep = np.ones(len(index), dtype=bool)
    if where is not None:
        keep &= index.attributes["attr"] < float(where.split("<")[1])
    if category is not None:
        bits = category.split("/")
        if bits[0] in GROUPS:
            keep &= (index.labels >= 5) == (bits[0] == GROUPS[1])
        else:
            keep &= index.labels == CLASSES.index(bits[0])
            if len(bits) > 1:
                keep &= parts == int(bits[1][4:])
    if own is not None:
        keep[own] = False
    return np.flatnonzero(keep)


# ------------------------------------------------------------------ measuring
def percentiles(seconds):
    ms = np.asarray(seconds) * 1e3
    if not len(ms):
        return {"p50_ms": None, "p99_ms": None, "n": 0}
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "n": len(ms)}


def recall_at_k(got, truth):
    return float(np.mean([len(set(a[:K]) & set(b[:K])) / max(len(b[:K]), 1)
                          for a, b in zip(got, truth, strict=True)])) if got else None


def measure(ask, requests, truth, cap_s):
    """Single queries, one at a time, for at most ``cap_s`` seconds: latency, the
    share answered with exactly k items, recall@10."""
    times, got = [], []
    deadline = time.monotonic() + cap_s
    for req in requests:
        if time.monotonic() > deadline:
            break
        t = time.perf_counter()
        ids = ask(*req)
        times.append(time.perf_counter() - t)
        got.append(ids)
    return {**percentiles(times), "exactly_k": float(np.mean([len(g) == K for g in got])),
            "recall_at_10": recall_at_k(got, truth[:len(got)])}


def throughput(ask, requests, n_requests, cap_s, workers=8):
    """Requests per second with ``workers`` concurrent clients: ``n_requests`` requests
    (cycling over ``requests``), stopped after ``cap_s`` seconds."""
    lock, counter = threading.Lock(), {"next": 0, "done": 0}
    deadline = time.monotonic() + cap_s

    def client():
        while time.monotonic() < deadline:
            with lock:
                i = counter["next"]
                if i >= n_requests:
                    return
                counter["next"] += 1
            ask(*requests[i % len(requests)])
            with lock:
                counter["done"] += 1

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(client) for _ in range(workers)]:
            f.result()
    elapsed = time.perf_counter() - t
    return {"qps": counter["done"] / elapsed, "requests": counter["done"],
            "seconds": elapsed, "workers": workers}


def asker(snapshot, own_of):
    """``ask(vector, own, category, where) -> ids`` through :func:`queries.nearest`."""
    from fashionrec import queries

    def ask(vector, own=None, category=None, where=None):
        result = queries.nearest(snapshot, CLASSES, {"kind": "vector"}, vector[None], 0,
                                 own_of(own), None, K, category=category, where=where)
        return [item.id for item in result.items]
    return ask


def run_store(name, ask, index, queries, cats, truth, args, warm, cap_scale=1.0,
              warm_filters=True):
    """Every measurement of one store (``ask`` answers a query), after ``warm`` queries
    (unfiltered, and with ``warm_filters`` one of each category filter) ran
    unmeasured."""
    cap = args.cap_s * cap_scale
    deadline = time.monotonic() + cap
    for q in warm:
        if time.monotonic() > deadline:
            break
        ask(q)
    for share in SHARES * warm_filters:  # the first scan of a filter pages vectors in
        r, c = cats[share][-1]
        ask(index.vectors[r], r, c)
    n_single = args.queries
    plain = [(q,) for q in queries[:n_single]]
    row = {"single": measure(ask, plain, truth["plain"], cap)}
    row["concurrency_8"] = throughput(ask, plain, args.concurrent_requests, cap)
    row["filters"] = {}
    for share in SHARES:
        attr_req = [(q, None, None, WHERE[share]) for q in queries[:n_single]]
        cat_req = [(index.vectors[r], r, c, None) for r, c in cats[share]]
        row["filters"][share] = {
            "attribute": measure(ask, attr_req, truth["attr", share], cap),
            "category": measure(ask, cat_req, truth["cat", share], cap)}
        f = row["filters"][share]
        print(f"  {name} {share}: attribute p99 {f['attribute']['p99_ms']:.1f} ms recall "
              f"{f['attribute']['recall_at_10']:.3f}; category p99 "
              f"{f['category']['p99_ms']:.1f} ms recall {f['category']['recall_at_10']:.3f}",
              file=sys.stderr, flush=True)
    return row


def truths(index, queries, cats, parts, n_single):
    """Exact answers (ids) of every measured request."""
    from fashionrec.search import ExactSearch

    exact = ExactSearch(index.vectors)
    q = queries[:n_single]
    out = {"plain": exact.search(q, K)[0].tolist()}
    for share in SHARES:
        out["attr", share] = exact.search(q, K, allowed_of(index, parts, where=WHERE[share]))[
            0].tolist()
        out["cat", share] = [
            exact.search(index.vectors[r][None], K, allowed_of(index, parts, c, own=r))[0][0]
            .tolist() for r, c in cats[share]]
    return out


# ------------------------------------------------------------------ Milvus Lite
def start_milvus(data_dir):
    from serving import free_port, milvus_lite

    return milvus_lite(data_dir, free_port(), timeout=120)


def rss_mb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def milvus_segments(data_dir, collection):
    """``(data files, vector index files)`` of ``collection`` in Milvus Lite's data
    folder: its segments and the per-segment index sidecars built for them (Milvus
    Lite builds them in the background after a flush; a segment without one is
    searched by brute force)."""
    root = Path(data_dir) / "collections" / collection / "partitions"
    data = sorted(p.stem for p in root.glob("*/data/*.parquet"))
    index = sorted(p.name for p in root.glob("*/indexes/*.idx"))
    return data, index


def read_sidecar(data_dir, collection, files):
    """What the first vector index sidecar is, read back with FAISS (its class and
    graph parameters), or why it could not be read."""
    if not files:
        return None
    import faiss

    path = next((Path(data_dir) / "collections" / collection / "partitions").glob(
        f"*/indexes/{files[0]}"))
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as exc:
        return f"not a FAISS index ({str(exc).splitlines()[0][:120]})"
    out = {"class": type(index).__name__, "ntotal": int(index.ntotal)}
    if hasattr(index, "hnsw"):
        out.update(M=int(index.hnsw.nb_neighbors(1)),
                   efConstruction=int(index.hnsw.efConstruction))
    return out


def wait_indexed(data_dir, collection, cap_s):
    """Seconds until every segment of ``collection`` has its vector index sidecar
    (``None`` when ``cap_s`` passed first)."""
    t = time.perf_counter()
    while time.perf_counter() - t < cap_s:
        data, index = milvus_segments(data_dir, collection)
        if data and all(any(i.startswith(d + ".vector.") for i in index) for d in data):
            return time.perf_counter() - t
        time.sleep(1.0)
    return None


# ------------------------------------------------------------------ one size
def child(n, args):
    from fashionrec.artifacts import peak_rss_mb
    from fashionrec.search import build, resolve
    from fashionrec.store import IndexStore

    index, queries, note, parts = catalog(n, args.queries + WARM)
    queries, warm = queries[:args.queries], queries[args.queries:]
    cats = category_cases(index, parts, args.queries)
    row = {"catalog": n, "vectors": note, "shares": {}}
    for share in SHARES:  # the shares the filters really keep
        row["shares"][share] = {
            "attribute": float(np.mean(index.attributes["attr"] < float(
                WHERE[share].split("<")[1]))),
            "category": float(np.mean([len(allowed_of(index, parts, c)) / n
                                       for _, c in cats[share]]))}
    t = time.perf_counter()
    truth = truths(index, queries, cats, parts, args.queries)
    row["truth_s"] = time.perf_counter() - t
    print(f"{n:,}: truth in {row['truth_s']:.0f} s", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(dir=HERE / "out", prefix="bench_store-"))
    proc = None
    try:
        # ---------------- local store: built as `fashionrec index` builds a run's index
        spec = resolve("hnsw", n)
        t = time.perf_counter()
        index.backend = build(spec, index.vectors)
        store = IndexStore(work / "index.h5")
        store.write_base(index)
        ingest = time.perf_counter() - t
        index.backend = None
        snap = store.load(spec)
        row["local"] = {"ingest_s": ingest, "ingest_per_s": n / ingest, "params": spec,
                        "disk_mb": sum(f.stat().st_size for f in work.rglob("*")
                                       if f.is_file()) / 2**20}
        print(f"{n:,}: local ingest {ingest:.0f} s", file=sys.stderr, flush=True)
        row["local"].update(run_store("local", asker(snap, lambda own: own), snap, queries,
                                      cats, truth, args, warm))
        row["local"]["peak_rss_mb"] = peak_rss_mb()
        # ---------------- Milvus (the Lite server)
        if args.no_milvus:
            return row
        from fashionrec.milvus import MilvusStore

        data_dir = work / "milvus"
        proc, uri = start_milvus(data_dir)
        ms = MilvusStore(uri, "bench", CLASSES, SCHEMA, "int")
        mv = row["milvus"] = {"server": "Milvus Lite (a development server: one Python "
                                        "process)", "describe": ms.describe()}
        projected = args.milvus_rate and n / args.milvus_rate
        if projected and projected > args.milvus_max_s:
            part = min(n, args.milvus_part)
            t = time.perf_counter()
            name = ms.publish(snap.take(np.arange(part)))
            took = mv["publish_s"] = time.perf_counter() - t
            mv["index_wait_s"] = wait_indexed(data_dir, name, args.milvus_max_s)
            took += mv["index_wait_s"] or 0.0
            mv.update(ingest_rows=part, ingest_s=took, ingest_per_s=part / took,
                      ingest_note=f"projected {projected / 60:.0f} min for {n:,} rows at the "
                                  f"rate measured before, over the {args.milvus_max_s / 60:.0f}"
                                  f" min cap: the rate is measured on the first {part:,} "
                                  f"rows only, and no query at {n:,} is measured")
        else:
            t = time.perf_counter()
            name = ms.publish(snap)
            mv["publish_s"] = time.perf_counter() - t
            mv["index_wait_s"] = wait_indexed(data_dir, name, args.milvus_max_s)
            took = time.perf_counter() - t
            mv.update(ingest_rows=n, ingest_s=took, ingest_per_s=n / took)
        print(f"{n:,}: milvus ingest {mv['ingest_rows']:,} rows in {took:.0f} s",
              file=sys.stderr, flush=True)
        field = ms.client.list_indexes(name)[0]
        mv["describe_index"] = {k: v for k, v in ms.client.describe_index(name, field).items()
                                if isinstance(v, (str, int, float, bool))}
        mv["segments"], mv["index_files"] = milvus_segments(data_dir, name)
        mv["index_file_reads_as"] = read_sidecar(data_dir, name, mv["index_files"])
        if mv["ingest_rows"] == n:
            remote = ms.snapshot()
            mv.update(run_store("milvus", asker(remote, lambda own: None if own is None else
                                                {"id": int(own)}), snap, queries, cats, truth,
                                args, warm, args.milvus_cap_scale, warm_filters=False))
        mv["server_peak_rss_mb"] = rss_mb(proc.pid)
        return row
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
        row["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(row))


# ------------------------------------------------------------------ the machine
def cpu_model():
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name")), "unknown")


# ------------------------------------------------------------------ results
def fmt(v, digits=1):
    return "-" if v is None else f"{v:,.{digits}f}"


def cell(m):
    if m is None:
        return "-"
    return (f"{fmt(m['p50_ms'])} / {fmt(m['p99_ms'])} / {fmt(m['recall_at_10'], 3)} / "
            f"{m['exactly_k']:.0%} (n={m['n']})")


def write_results(result):
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_store.json").write_text(json.dumps(result, indent=1) + "\n")
    m = result["machine"]
    lines = [f"# Catalog stores: local (HNSW) against Milvus Lite (k={K}, 512-d, clustered)",
             "", f"CPU: {m['cpu']} (`lscpu`: {m['lscpu_model']}); float32 matmul peak "
             f"(NumPy, 2048x2048) {m['matmul_gflops']:.0f} GFLOP/s. One run: "
             f"`{result['command']}`.", "",
             "**Milvus Lite is a development server** (milvus-lite "
             f"{result['versions'].get('milvus_lite', '?')}: one Python process that keeps a "
             "FAISS index per segment and checks rows in Python per query). Its numbers say "
             "what this server does, not what Milvus Standalone or a Milvus cluster would "
             "do, which is not measured here. The local store stays the default.", "",
             "Queries go through `queries.nearest` (what a service request runs). Latency "
             "in ms: p50 / p99 / recall@10 / share of answers with exactly k items (n = "
             "queries measured; a store's section stops at its time cap). Filters on the "
             "random attribute `attr` use fresh queries; filters on the category (class: "
             "10 %, group of five classes: 50 %, a tenth of a class: 1 %) are queried from "
             "a product of another category, so their rows are far from the query. Before "
             f"measuring, {WARM} unfiltered queries (and, for the local store, one of each "
             "category filter) ran to page the files in. Sections are capped at "
             f"{result['caps']['local_s']:.0f} s (local) and {result['caps']['milvus_s']:.0f} s "
             "(Milvus); concurrency 8 runs at most "
             f"{result['caps']['concurrent_requests']} requests within the same cap; "
             "Milvus ingest projected over "
             f"{result['caps']['milvus_ingest_s'] / 60:.0f} min is measured on a part.", "",
             "| catalog | store | ingest (rows/s) | single p50 / p99 / recall | "
             "concurrency 8 (req/s) | attr 1 % | attr 10 % | attr 50 % | category 1 % | "
             "category 10 % | category 50 % |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    for r in result["rows"]:
        for store in ("local", "milvus"):
            s = r.get(store)
            if s is None:
                continue
            ingest = f"{s['ingest_per_s']:,.0f}" + (
                f" ({s['ingest_rows']:,} rows)" if s.get("ingest_rows", r["catalog"]) !=
                r["catalog"] else "")
            if s.get("ingest_note"):
                notes.append(f"Milvus at {r['catalog']:,}: {s['ingest_note']}.")
            f = s.get("filters", {})
            cells = [f"{r['catalog']:,}", store, ingest, cell(s.get("single")),
                     fmt(s["concurrency_8"]["qps"]) if "concurrency_8" in s else "-"]
            cells += [cell(f.get(sh, {}).get("attribute")) for sh in SHARES]
            cells += [cell(f.get(sh, {}).get("category")) for sh in SHARES]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += notes
    for r in result["rows"]:
        mv = r.get("milvus", {})
        if "describe_index" in mv:
            wait = mv.get("index_wait_s")
            lines.append(
                f"Milvus at {r['catalog']:,}: ingest = `MilvusStore.publish` (insert, flush, "
                f"load: {mv['publish_s']:.0f} s) and then the wait until Milvus Lite had "
                f"built every segment's index in the background ("
                + (f"{wait:.0f} s" if wait is not None else "not done within the cap")
                + f"). A sidecar read back with FAISS: {json.dumps(mv['index_file_reads_as'])}"
                f". `describe_index` says {json.dumps(mv['describe_index'])}; on disk: "
                f"{len(mv['segments'])} segments, index sidecars "
                f"{', '.join(mv['index_files'][:2])}{', ...' if len(mv['index_files']) > 2 else ''}"
                f" ({len(mv['index_files'])}); server peak RSS "
                f"{fmt(mv.get('server_peak_rss_mb'), 0)} MB.")
        loc = r.get("local", {})
        if loc:
            lines.append(f"Local at {r['catalog']:,}: HNSW {json.dumps(loc['params'])}, "
                         f"ingest {loc['ingest_s']:.0f} s (graph built, index and graph "
                         f"written), {loc['disk_mb']:,.0f} MB on disk; bench process peak RSS "
                         f"{fmt(r.get('peak_rss_mb'), 0)} MB. Shares kept: "
                         + ", ".join(f"{sh} attr {v['attribute']:.2%} / category "
                                     f"{v['category']:.2%}" for sh, v in r["shares"].items())
                         + ".")
    lines.append("")
    lines.append("Milvus Lite's `describe_index` answers `state: Finished` with `indexed_rows` "
                 "equal to all rows whatever its segments hold (its gRPC adapter fills them "
                 "in); the index sidecar files, read back above, say what it built.")
    lines.append("")
    lines.append(f"Milvus store: {json.dumps(result.get('milvus_describe'))} "
                 "(`MilvusStore.describe()`).")
    (OUT / "bench_store.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--queries", type=int, default=200, help="single queries per section")
    p.add_argument("--concurrent-requests", type=int, default=800)
    p.add_argument("--cap-s", type=float, default=60.0,
                   help="time cap of a section of the local store (s)")
    p.add_argument("--milvus-cap-scale", type=float, default=1.0,
                   help="Milvus' time cap per section, in local caps")
    p.add_argument("--milvus-max-s", type=float, default=25 * 60,
                   help="ingest longer than this (projected from the previous size's rate) "
                        "is measured on a part only")
    p.add_argument("--milvus-part", type=int, default=200000)
    p.add_argument("--milvus-rate", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--no-milvus", action="store_true")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args)
    from importlib.metadata import version

    from fashionrec.artifacts import cpu_description

    (HERE / "out").mkdir(exist_ok=True)
    machine = {"cpu": cpu_description(), "lscpu_model": cpu_model(),
               "matmul_gflops": matmul_gflops()}
    rows, rate = [], 0.0
    passed = [a for a in sys.argv[1:]]
    for n in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, __file__, *passed, "--child", str(n),
               "--milvus-rate", str(rate)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            raise SystemExit(f"{n} failed (exit {proc.returncode})")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        rate = rows[-1].get("milvus", {}).get("ingest_per_s", 0.0)
    versions = {}
    for pkg in ("milvus_lite", "pymilvus", "faiss-cpu", "numpy"):
        try:
            versions[pkg] = version(pkg.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed
            pass
    describe = next((r["milvus"]["describe"] for r in rows if "milvus" in r), None)
    result = {"machine": machine, "versions": versions, "rows": rows,
              "caps": {"local_s": args.cap_s, "milvus_s": args.cap_s * args.milvus_cap_scale,
                       "concurrent_requests": args.concurrent_requests,
                       "milvus_ingest_s": args.milvus_max_s},
              "command": "python experiments/bench_store.py " + " ".join(passed),
              "milvus_describe": describe}
    write_results(result)


if __name__ == "__main__":
    main()
