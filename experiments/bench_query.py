"""Search benchmark: the old exact search (float64 SciPy ``cdist`` over blocks), the new
exact search (float32 BLAS, :class:`fashionrec.search.ExactSearch`) and the FAISS HNSW
graph (:class:`fashionrec.search.hnsw.HNSWSearch`), for catalogs of 5k, 100k and 1M
512-d vectors of two kinds:

* ``gaussian`` — i.i.d. standard normal vectors and queries: no structure, the hard
  case for a graph;
* ``clustered`` — shaped like real embeddings: the 70,000 real Fashion-MNIST
  embeddings of the seed recipe (``experiments/embeddings.py``: stand-in backbone,
  64 px), the first N of them, or for larger catalogs all of them plus copies with
  Gaussian noise as large as a typical nearest-neighbour distance (noise norm = the
  median 1-NN distance of the real set); queries are real embeddings with fresh
  noise of that size (new products like the catalog's, none of them in it).

Each (kind, size, method) runs in its own process, through the path ``recommend``
uses: a :class:`~fashionrec.index.CatalogIndex` written with
:class:`~fashionrec.store.IndexStore`, loaded back (vectors memory-mapped, the graph
read memory-mapped), searched with ``search_rows``. Per row: single-query p50 / p99,
per-query time in batches of 64, recall@10 against exact search, filters keeping 1 %,
10 % and 50 % of the items (random rows: a filter unrelated to the vectors, the hard
case), build and load time, size on disk, peak memory (VmHWM).

    python experiments/embeddings.py --size 64     # once: the real embeddings (~6 min)
    python experiments/bench_query.py              # writes experiments/results/bench_query.{json,md}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fashionrec.artifacts import cpu_description, peak_rss_mb

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
DIM, K, BATCH = 512, 10, 64
WARM = 1000  # queries run after a load, before steady-state latency is measured
FRACTIONS = (0.01, 0.10, 0.50)
EMBEDDING_SIZE = 64


def old_knn_search(queries, vectors, k, block_size=8192):
    """The exact search this package had before (float64 SciPy ``cdist`` per block of
    catalog rows, merged with argpartition): the baseline."""
    from scipy.spatial.distance import cdist

    queries = np.atleast_2d(np.asarray(queries, dtype=np.float64))
    m = len(queries)
    best_d, best_i = np.full((m, 0), np.inf), np.zeros((m, 0), dtype=np.int64)
    for start in range(0, len(vectors), block_size):
        block = np.asarray(vectors[start:start + block_size], dtype=np.float64)
        d = cdist(queries, block)
        cand_d = np.concatenate([best_d, d], axis=1)
        cand_i = np.concatenate(
            [best_i, np.broadcast_to(np.arange(start, start + len(block)), d.shape)], axis=1)
        if cand_d.shape[1] > k:
            part = np.argpartition(cand_d, k - 1, axis=1)[:, :k]
            cand_d = np.take_along_axis(cand_d, part, axis=1)
            cand_i = np.take_along_axis(cand_i, part, axis=1)
        best_d, best_i = cand_d, cand_i
    order = np.lexsort((best_i, best_d), axis=1)
    return np.take_along_axis(best_i, order, axis=1), np.take_along_axis(best_d, order, axis=1)


def make_vectors(kind, n, n_queries, seed=0, with_labels=False):
    """``(catalog (n, 512) float32, queries (n_queries, 512) float32, note)``; with
    ``with_labels`` (``clustered`` only) also the catalog's classes, ``(n,)``: the
    Fashion-MNIST class of the real embedding each vector is (or copies)."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return (rng.standard_normal((n, DIM), dtype=np.float32),
                rng.standard_normal((n_queries, DIM), dtype=np.float32), "i.i.d. N(0, 1)")
    sys.path.insert(0, str(HERE))
    from embeddings import embeddings_path

    path = embeddings_path(EMBEDDING_SIZE)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run python experiments/embeddings.py first")
    real = np.load(path, mmap_mode="r")
    from fashionrec.search import ExactSearch

    sample = np.asarray(real[:2000])
    _, nn = ExactSearch(np.asarray(real)).search(sample, 1, exclude=np.arange(2000))
    sigma = float(np.median(nn[:, 0])) / np.sqrt(DIM)
    order = rng.permutation(len(real))
    vectors = np.empty((n, DIM), dtype=np.float32)
    for s in range(0, n, len(real)):
        block = np.asarray(real[order[:min(len(real), n - s)]])
        if s:  # copies beyond the real set get noise
            block = block + sigma * rng.standard_normal(block.shape, dtype=np.float32)
        vectors[s:s + len(block)] = block
    picks = rng.integers(0, len(real), n_queries)
    queries = (np.asarray(real[np.sort(picks)]) + sigma * rng.standard_normal(
        (n_queries, DIM), dtype=np.float32)).astype(np.float32)
    note = (f"real embeddings + N(0, {sigma:.3f}^2) noise per dimension "
            f"(noise norm = median 1-NN distance {sigma * np.sqrt(DIM):.2f})")
    if with_labels:
        labels = np.load(path.with_name(path.stem + "-labels.npy"))
        return vectors, queries, note, labels[order[np.arange(n) % len(real)]]
    return vectors, queries, note


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def percentiles(seconds):
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "n": len(ms)}


def recall_at_k(rows, truth):
    return float(np.mean([len(set(a[:K]) & set(b[:K])) / len(b[:K])
                          for a, b in zip(rows, truth, strict=True)]))


def child(kind, n, method, n_single, n_recall):
    from sklearn.preprocessing import StandardScaler

    from fashionrec import CatalogIndex
    from fashionrec.search import ExactSearch, build, resolve
    from fashionrec.store import IndexStore

    n_queries = max(n_single, n_recall, BATCH * 2)
    vectors, all_queries, note = make_vectors(kind, n, n_queries + 1 + WARM + n_single)
    # queries[0] warms up, queries[1:] are measured; `fresh` are never seen before the
    # steady-state measurement, `warm` only run to page the index in
    queries, warm = all_queries[:n_queries + 1], all_queries[n_queries + 1:][:WARM]
    fresh = all_queries[n_queries + 1 + WARM:]
    rng = np.random.default_rng(1)
    filters = {f: np.sort(rng.choice(n, max(1, int(round(f * n))), replace=False))
               for f in FRACTIONS}
    row = {"kind": kind, "catalog": n, "method": method, "vectors": note}
    # ground truth from the new exact search, batched (checked against cdist in tests)
    exact = ExactSearch(vectors)
    truth = exact.search(queries[1:n_recall + 1], K)[0]
    truth_f = {f: exact.search(queries[1:n_recall + 1], K, allowed)[0]
               for f, allowed in filters.items()}

    if method == "old":
        old_knn_search(queries[:1], vectors, K)  # warm-up
        single = [timed(old_knn_search, q[None], vectors, K)[1] for q in queries[1:n_single + 1]]
        (rows, _), t = timed(old_knn_search, queries[1:BATCH + 1], vectors, K)
        row.update(single=percentiles(single), batch_ms_per_query=t * 1e3 / BATCH,
                   recall_at_10=recall_at_k(rows, truth[:BATCH]))
    else:
        with tempfile.TemporaryDirectory(dir=HERE / "out") as tmp:
            spec = resolve(method, n)
            index = CatalogIndex(vectors, np.arange(n), np.zeros(n, np.int64), ["item"],
                                 StandardScaler().fit(vectors[:100]),
                                 metadata={"run_id": "bench"})
            backend, row["build_s"] = timed(build, spec, index.vectors)
            index.backend = backend
            store = IndexStore(Path(tmp) / "index.h5")
            _, row["write_s"] = timed(store.write_base, index)
            del index, backend, vectors, exact
            row["disk_mb"] = sum(f.stat().st_size for f in Path(tmp).rglob("*")
                                 if f.is_file()) / 2**20
            live, row["load_s"] = timed(store.load, spec)
            _, row["first_query_s"] = timed(live.search_rows, queries[:1], K)
            cold = [timed(live.search_rows, q[None], K)[1] for q in queries[1:n_single + 1]]
            batches = [timed(live.search_rows, queries[s:s + BATCH], K)[1]
                       for s in range(1, n_queries + 1 - BATCH, BATCH)][:4]
            for q in warm:  # steady state: the memory-mapped pages are in
                live.search_rows(q[None], K)
            single = [timed(live.search_rows, q[None], K)[1] for q in fresh]
            rows = np.concatenate([live.search_rows(queries[s:s + BATCH], K)[0]
                                   for s in range(1, n_recall + 1, BATCH)])[:n_recall]
            row.update(single=percentiles(single), single_cold=percentiles(cold),
                       batch_ms_per_query=float(np.median(batches)) * 1e3 / BATCH,
                       recall_at_10=recall_at_k(rows, truth), params=spec)
            row["filters"] = {}
            for f, allowed in filters.items():
                times, got = [], []
                for q in queries[1:n_recall + 1]:
                    (r, _), t = timed(live.search_rows, q[None], K, None, allowed)
                    times.append(t)
                    got.append(r[0])
                assert all(set(r) <= set(allowed.tolist()) for r in got[:20])
                row["filters"][f"{f:.0%}"] = {**percentiles(times),
                                              "recall_at_10": recall_at_k(got, truth_f[f])}
    row["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(row))


def fmt_ms(v):
    return f"{v:,.2f}" if v < 100 else f"{v:,.0f}"


def write_results(rows, cpu):
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_query.json").write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2)
                                          + "\n")
    names = {"old": "old exact (float64 cdist)", "exact": "exact (float32 BLAS)",
             "hnsw": "HNSW"}
    lines = [f"# Search latency and recall (k={K}, 512-d)", "",
             f"CPU: {cpu}. One process per row; times in ms. Single queries: steady state "
             f"(after {WARM:,} queries paged the memory-mapped index in), and the first "
             f"queries right after a load (`cold`). `recall@10`: share of the exact top 10 "
             "found. Filters keep random rows (1 %, 10 %, 50 % of the catalog), single "
             "queries.", ""]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        sub = [r for r in rows if r["kind"] == kind]
        lines += [f"## {kind}: {sub[0]['vectors']}", "",
                  "| catalog | method | single p50 / p99 | cold p99 | batch of 64, per query | "
                  "recall@10 | filter 1 % p50 / p99 / recall | filter 10 % | filter 50 % | "
                  "build (s) | load (s) | disk (MB) | peak RSS (MB) |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
                  "---: | ---: |"]
        for r in sub:
            s = r["single"]
            cells = [f"{r['catalog']:,}", names[r["method"]],
                     f"{fmt_ms(s['p50_ms'])} / {fmt_ms(s['p99_ms'])}",
                     fmt_ms(r["single_cold"]["p99_ms"]) if "single_cold" in r else "-",
                     fmt_ms(r["batch_ms_per_query"]), f"{r['recall_at_10']:.4f}"]
            for f in ("1%", "10%", "50%"):
                x = r.get("filters", {}).get(f)
                cells.append("-" if x is None else
                             f"{fmt_ms(x['p50_ms'])} / {fmt_ms(x['p99_ms'])} / "
                             f"{x['recall_at_10']:.3f}")
            cells += ["-" if "build_s" not in r else f"{r['build_s']:.1f}",
                      "-" if "load_s" not in r else f"{r['load_s']:.2f}",
                      "-" if "disk_mb" not in r else f"{r['disk_mb']:,.0f}",
                      f"{r['peak_rss_mb']:,.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    params = next((r["params"] for r in rows if r["method"] == "hnsw"), None)
    if params:
        lines.append(f"HNSW parameters (the package defaults): M={params['m']}, "
                     f"efConstruction={params['ef_construction']}, efSearch={params['ef_search']}"
                     f"; filters keeping at most {params['filter_exact_max']:,} rows are "
                     f"answered exactly, broader ones through the graph with an ID selector and "
                     f"efSearch widened by 1/share (at most 4,096).")
    lines.append("Load: `IndexStore.load` (vectors and graph memory-mapped); the first query "
                 "after a load also pages them in.")
    (OUT / "bench_query.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="5000,100000,1000000")
    p.add_argument("--kinds", default="clustered,gaussian")
    p.add_argument("--methods", default="old,exact,hnsw")
    p.add_argument("--queries", type=int, default=200, help="single queries per run")
    p.add_argument("--old-queries", default="50,20,10",
                   help="single queries of the old exact search, one per size (it is slow)")
    p.add_argument("--recall-queries", type=int, default=200)
    p.add_argument("--merge", action="store_true",
                   help="replace just the rows run now in the saved results")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, n, method, n_single, n_recall = args.child
        return child(kind, int(n), method, int(n_single), int(n_recall))
    (HERE / "out").mkdir(exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    old_q = dict(zip(sizes, [int(s) for s in args.old_queries.split(",")], strict=True))
    rows = []
    for kind in args.kinds.split(","):
        for n in sizes:
            for method in args.methods.split(","):
                n_single = old_q[n] if method == "old" else args.queries
                n_recall = min(args.recall_queries, BATCH) if method == "old" else \
                    args.recall_queries
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", kind, str(n), method,
                     str(n_single), str(n_recall)], capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{kind} {n} {method} failed:\n{proc.stderr[-3000:]}")
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{kind:>9} {n:>9,} {method:>5}: single p50 {r['single']['p50_ms']:.2f} "
                      f"ms, p99 {r['single']['p99_ms']:.2f} ms, recall@10 "
                      f"{r['recall_at_10']:.4f}", flush=True)
    if args.merge and (OUT / "bench_query.json").is_file():
        new = {(r["kind"], r["catalog"], r["method"]): r for r in rows}
        saved = json.loads((OUT / "bench_query.json").read_text())["rows"]
        keys = [(r["kind"], r["catalog"], r["method"]) for r in saved]
        rows = [new.pop(key, r) for key, r in zip(keys, saved, strict=True)] + list(new.values())
    write_results(rows, cpu_description())


if __name__ == "__main__":
    main()
