"""How to answer a broad filter that does not follow the query (the local store's
HNSW back-end): the ways measured side by side, on the clustered catalog of
``bench_query.py``.

The case: a catalog of N clustered 512-d vectors (real Fashion-MNIST embeddings and
noisy copies), a filter keeping one class (10 %), half the classes (50 %) or a
slice of one class (1 %), queried from a product of another class, so the filter's
rows are far from the query. Every way is timed per single query (k=10) and scored
by recall@10 against the exact answer over the allowed rows:

* ``graph+bitmap`` — FAISS HNSW with an ``IDSelectorBitmap`` and ``efSearch``
  widened by 1/share (the graph part of the back-end before this change; ``short``
  counts the queries it answered with fewer than k rows, which then went exact);
* ``exact gather`` — ``vectors[allowed]`` copied, then BLAS (the exact path before
  this change);
* ``exact blocks`` — the allowed rows gathered a block at a time into one buffer,
  BLAS per block (no full copy);
* ``faiss flat+bitmap`` — the graph's own flat storage searched exactly with an
  ``IDSelectorBitmap`` (no copy, FAISS's SIMD distance loop over every row, the
  bitmap skipping the others);
* ``faiss flat+array`` — the same with an ``IDSelectorArray`` of the allowed rows
  (FAISS then measures just those rows); ``x2``: the rows split in two halves
  searched on two threads and merged;
* ``sq8+bitmap, rerank`` — an 8-bit scalar-quantized copy scanned with the bitmap,
  its best 64 re-measured exactly;
* ``class graph`` — an HNSW graph of the filter's class alone (a per-category
  sub-index: the bound on what one could reach), built for one class;
* ``probe`` — an unfiltered graph search of ``ef_search`` rows: the cost of telling
  whether the filter's rows are near the query;
* ``library`` — :class:`fashionrec.search.hnsw.HNSWSearch` as it stands.

    python experiments/bench_filter_paths.py --n 1000000
    # writes experiments/results/bench_filter_paths.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "results"
K = 10


def percentiles(seconds):
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def recall(rows, truth):
    return float(np.mean([len(set(a[:K].tolist()) & set(b[:K].tolist())) / K
                          for a, b in zip(rows, truth, strict=True)]))


def bitmap(n, allowed):
    mask = np.zeros(n, dtype=bool)
    mask[allowed] = True
    return np.packbits(mask, bitorder="little")


def exact_gather(vectors, q, allowed, k):
    x = vectors[allowed]
    d = np.einsum("ij,ij->i", x, x) - 2 * (x @ q)
    part = np.argpartition(d, k)[:k]
    return allowed[part[np.argsort(d[part])]]


def exact_blocks(vectors, q, allowed, k, buf):
    best_d, best_i = np.empty(0, np.float32), np.empty(0, np.int64)
    block = len(buf)
    for s in range(0, len(allowed), block):
        rows = allowed[s:s + block]
        x = np.take(vectors, rows, axis=0, out=buf[:len(rows)])
        d = np.einsum("ij,ij->i", x, x) - 2 * (x @ q)
        if len(d) > k:
            part = np.argpartition(d, k)[:k]
            d, rows = d[part], rows[part]
        best_d, best_i = np.concatenate([best_d, d]), np.concatenate([best_i, rows])
    return best_i[np.argsort(best_d)[:k]]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--skip", default="", help="ways not to run, comma-separated")
    args = p.parse_args()
    import faiss
    from bench_query import make_vectors

    from fashionrec.artifacts import cpu_description, peak_rss_mb
    from fashionrec.search import ExactSearch
    from fashionrec.search.hnsw import HNSWSearch

    skip = set(args.skip.split(","))
    vectors, _, note, labels = make_vectors("clustered", args.n, 1, with_labels=True)
    n = len(vectors)
    cache = HERE / "out" / f"filter-paths-{n}.faiss"
    t = time.perf_counter()
    if cache.is_file():
        index = faiss.read_index(str(cache))
        hnsw = HNSWSearch(index, vectors, 32, 80, 96)
    else:
        hnsw = HNSWSearch.build(vectors, 32, 80, 96)
        faiss.write_index(hnsw.index, str(cache))
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(7)
    qrows = rng.choice(n, args.queries, replace=False)
    # 1 %: a tenth of one class, the slice along the class's main direction (follows
    # the picture); 10 %: one class; 50 %: five classes
    by_class = {c: np.flatnonzero(labels == c) for c in range(10)}
    cases = {}
    for share in ("1%", "10%", "50%"):
        allowed, queries = [], []
        for r in qrows:
            a = labels[r]
            b = rng.choice([c for c in range(10) if c != a])
            if share == "10%":
                rows = by_class[b]
            elif share == "50%":
                group = [c for c in range(10) if (c < 5) == (b < 5)]
                if a in group:
                    group = [c for c in range(10) if c not in group]
                rows = np.flatnonzero(np.isin(labels, group))
            else:
                rows = by_class[b]
                x = vectors[rows[:5000]]
                axis = np.linalg.svd(x - x.mean(0), full_matrices=False)[2][0]
                proj = vectors[rows] @ axis
                rows = np.sort(rows[np.argsort(proj)[:len(rows) // 10]])
            allowed.append(rows)
            queries.append(vectors[r])
        cases[share] = (np.stack(queries), allowed)
    exact = ExactSearch(vectors)
    exact.sqnorms()
    result = {"cpu": cpu_description(), "n": n, "vectors": note, "graph_build_s": build_s,
              "queries": args.queries, "cases": {}}
    storage = faiss.downcast_index(hnsw.index.storage)
    sq = None
    if "sq8" not in skip:
        t = time.perf_counter()
        sq = faiss.IndexScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_8bit,
                                        faiss.METRIC_L2)
        sq.train(vectors[::10])
        for s in range(0, n, 100000):
            sq.add(vectors[s:s + 100000])
        result["sq8_build_s"] = time.perf_counter() - t
    buf = np.empty((4096, vectors.shape[1]), dtype=np.float32)
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(2)

    def array_params(ids):
        params = faiss.SearchParameters()
        params.sel = faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))
        params.keep = (ids, params.sel)  # alive while the search runs
        return params
    sub = None
    if "class" not in skip:
        t = time.perf_counter()
        rows0 = by_class[0]
        sub = (rows0, HNSWSearch.build(vectors[rows0], 32, 80, 96))
        result["class_graph_build_s"] = time.perf_counter() - t
    for share, (queries, allowed) in cases.items():
        truth = [exact.search(q[None], K, a)[0][0] for q, a in zip(queries, allowed,
                                                                    strict=True)]
        out = result["cases"][share] = {"rows": int(np.mean([len(a) for a in allowed]))}

        def run(name, fn, share=share, queries=queries, allowed=allowed, truth=truth,
                out=out):
            if name.split()[0] in skip:
                return
            fn(queries[0], allowed[0])  # warm
            times, got, extra = [], [], []
            for q, a in zip(queries, allowed, strict=True):
                t = time.perf_counter()
                rows = fn(q, a)
                times.append(time.perf_counter() - t)
                if isinstance(rows, tuple):
                    rows, e = rows
                    extra.append(e)
                got.append(np.asarray(rows))
            out[name] = {**percentiles(times), "recall_at_10": recall(got, truth)}
            if extra:
                out[name]["short"] = int(sum(extra))
            print(f"{share:>4} {name:<22} p50 {out[name]['p50_ms']:8.2f} ms  p99 "
                  f"{out[name]['p99_ms']:8.2f} ms  recall {out[name]['recall_at_10']:.3f}"
                  + (f"  short {out[name]['short']}" if extra else ""), flush=True)

        def graph_bitmap(q, a):
            bits = bitmap(n, a)
            params = faiss.SearchParametersHNSW()
            params.sel = sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
            params.efSearch = min(4096, int(np.ceil(96 * n / len(a))))
            _, rows = hnsw.index.search(q[None], K, params=params)
            del sel
            return rows[0], bool((rows[0] < 0).any())

        def flat_bitmap(q, a, index=storage):
            bits = bitmap(n, a)
            params = faiss.SearchParameters()
            params.sel = sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
            _, rows = index.search(q[None], K, params=params)
            del sel
            return rows[0]

        def flat_array(q, a, index=storage):
            params = faiss.SearchParameters()
            params.sel = sel = faiss.IDSelectorArray(len(a), faiss.swig_ptr(a))
            _, rows = index.search(q[None], K, params=params)
            del sel
            return rows[0]

        def flat_array_2(q, a):
            halves = np.array_split(a, 2)
            parts = list(pool.map(lambda h: (h, storage.search(q[None], K, params=array_params(
                h))), halves))
            d = np.concatenate([p[1][0][0] for p in parts])
            rows = np.concatenate([p[1][1][0] for p in parts])
            return rows[np.argsort(d)[:K]]

        def sq8(q, a):
            bits = bitmap(n, a)
            params = faiss.SearchParameters()
            params.sel = sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
            _, rows = sq.search(q[None], 64, params=params)
            del sel
            d = ((vectors[rows[0]] - q) ** 2).sum(1)
            return rows[0][np.argsort(d)[:K]]

        def probe(q, a):
            params = faiss.SearchParametersHNSW()
            params.efSearch = 96
            return hnsw.index.search(q[None], 96, params=params)[1]

        run("graph+bitmap", graph_bitmap)
        run("exact gather", lambda q, a: exact_gather(vectors, q, a, K))
        run("exact blocks", lambda q, a: exact_blocks(vectors, q, a, K, buf))
        run("faiss flat+bitmap", flat_bitmap)
        run("faiss flat+array", flat_array)
        run("faiss flat+array x2", flat_array_2)
        if sq is not None:
            run("sq8+bitmap rerank", sq8)
        run("library", lambda q, a: hnsw.search(q[None], K, a)[0][0])
        out["probe"] = None
        if "probe" not in skip:
            times = []
            for q in queries:
                t = time.perf_counter()
                probe(q, None)
                times.append(time.perf_counter() - t)
            out["probe"] = percentiles(times)
            print(f"{share:>4} probe (unfiltered ef=96)  p50 {out['probe']['p50_ms']:.2f} ms "
                  f"p99 {out['probe']['p99_ms']:.2f} ms", flush=True)
        if sub is not None and share == "10%":
            rows0, graph0 = sub
            qs = queries[[labels[r] != 0 for r in qrows]]
            t_all, got, tr = [], [], []
            for q in qs:
                t = time.perf_counter()
                r = graph0.search(q[None], K)[0][0]
                t_all.append(time.perf_counter() - t)
                got.append(rows0[r])
                tr.append(exact.search(q[None], K, rows0)[0][0])
            out["class graph"] = {**percentiles(t_all), "recall_at_10": recall(got, tr)}
            print(f"{share:>4} class graph            p50 {out['class graph']['p50_ms']:8.2f}"
                  f" ms  p99 {out['class graph']['p99_ms']:8.2f} ms  recall "
                  f"{out['class graph']['recall_at_10']:.3f}", flush=True)
    result["peak_rss_mb"] = peak_rss_mb()
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_filter_paths.json").write_text(json.dumps(result, indent=1) + "\n")
    write_md(result)


def write_md(result):
    ways = [w for w in ("graph+bitmap", "exact gather", "exact blocks", "faiss flat+bitmap",
                        "faiss flat+array", "faiss flat+array x2", "sq8+bitmap rerank",
                        "class graph", "library")
            if any(w in c for c in result["cases"].values())]
    lines = [f"# Broad filters far from the query: ways to answer them ({result['n']:,} "
             "clustered vectors, k=10)", "",
             f"CPU: {result['cpu']}. {result['queries']} single queries per filter, each a "
             "catalog product of another class than the filter keeps. Times in ms "
             "(p50 / p99), then recall@10 against exact search over the allowed rows.", "",
             "| filter (rows) | " + " | ".join(ways) + " | probe |",
             "| --- | " + " | ".join("---:" for _ in ways) + " | ---: |"]
    for share, c in result["cases"].items():
        cells = []
        for w in ways:
            x = c.get(w)
            cells.append("-" if x is None else f"{x['p50_ms']:.1f} / {x['p99_ms']:.1f} / "
                         f"{x['recall_at_10']:.3f}" + (f" ({x['short']} short)"
                                                       if "short" in x else ""))
        pr = c.get("probe")
        cells.append("-" if pr is None else f"{pr['p50_ms']:.2f} / {pr['p99_ms']:.2f}")
        lines.append(f"| {share} ({c['rows']:,}) | " + " | ".join(cells) + " |")
    lines += ["", f"Graph: HNSW M=32, efConstruction=80 ({result['graph_build_s']:.0f} s to "
              "build or read). `class graph`: one class's own graph (built in "
              f"{result.get('class_graph_build_s', float('nan')):.0f} s), queried from "
              "the other classes. `short`: queries the graph answered with fewer than k "
              "rows. Peak RSS "
              f"{result['peak_rss_mb']:,.0f} MB."]
    (OUT / "bench_filter_paths.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
