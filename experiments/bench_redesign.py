"""Before and after a change, on one machine in one session: the benchmarks whose hot
paths a refactor could slow, run alternately on two source trees (e.g. two git
worktrees), their results side by side.

* item query latency through the service (``bench_serve.py``: item queries at 5k exact
  and 100k HNSW, 1 and 2 workers; photo queries; queries while products come and go);
* exact and HNSW search through the store (``bench_query.py``: Gaussian vectors, 5k and
  100k, single-query p50/p99, recall@10, filters);
* feature extraction (``bench_extract.py``: each engine at 224 px, model only and end
  to end from real JPEGs).

Each tree runs its own copy of the script (``PYTHONPATH`` = the tree), so "before"
measures the old code with its old benchmark. Raw results go to
``experiments/results/redesign/<bench>-<label>.json``; the comparison to
``experiments/results/bench_redesign.md``.

    git worktree add ../bench-old <old commit>; git worktree add ../bench-new <new commit>
    python experiments/bench_redesign.py --before ../bench-old --after ../bench-new
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "redesign"
BENCHES = {
    "query": (["experiments/bench_query.py", "--kinds", "gaussian", "--sizes", "5000,100000",
               "--methods", "exact,hnsw", "--old-queries", "50,20"], "bench_query.json"),
    "serve": (["experiments/bench_serve.py", "--seconds", "30", "--item-requests", "1000",
               "--photo-requests", "160"], "bench_serve.json"),
    "extract": (["experiments/bench_extract.py", "speed", "--sizes", "224", "--n-batched",
                 "128", "--n-real", "128", "--rounds", "2", "--tag=-redesign"],
                "bench_extract-redesign.json"),
}


def run(tree, label, bench):
    """One benchmark on one tree; its result file copied to ``OUT``."""
    argv, result = BENCHES[bench]
    env = {**os.environ, "PYTHONPATH": str(tree), "TF_CPP_MIN_LOG_LEVEL": "3"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{bench} on {tree} failed:\n{proc.stderr[-3000:]}")
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(tree) / "experiments" / "results" / result,
                    OUT / f"{bench}-{label}.json")
    print(f"{bench} ({label}): {time.perf_counter() - t:.0f} s", flush=True)


def load(bench, label):
    return json.loads((OUT / f"{bench}-{label}.json").read_text())


def change(a, b):
    return f"{(b - a) / a:+.0%}" if a else "-"


def serve_rows():
    a, b = load("serve", "before"), load("serve", "after")
    lines = ["## Item queries through the service (`GET /api/items/{id}/similar?k=6`)", "",
             "| catalog | search | workers | concurrency | p50 before / after (ms) | "
             "p99 before / after (ms) | requests/s before / after | errors |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for x, y in zip(a["items"], b["items"], strict=True):
        lines.append(f"| {x['catalog']:,} | {x['search']} | {x['workers']} | {x['concurrency']} "
                     f"| {x['p50_ms']:.1f} / {y['p50_ms']:.1f} | {x['p99_ms']:.1f} / "
                     f"{y['p99_ms']:.1f} | {x['per_s']:.0f} / {y['per_s']:.0f} "
                     f"({change(x['per_s'], y['per_s'])}) | {x['errors']} / {y['errors']} |")
    lines += ["", "| photo queries, concurrency | images/s before / after | p50 before / after "
              "(ms) | p99 before / after (ms) |", "| ---: | ---: | ---: | ---: |"]
    for x, y in zip(a["photos"]["server"], b["photos"]["server"], strict=True):
        lines.append(f"| {x['concurrency']} | {x['images_per_s']:.1f} / {y['images_per_s']:.1f} "
                     f"| {x['p50_ms']:.0f} / {y['p50_ms']:.0f} | {x['p99_ms']:.0f} / "
                     f"{y['p99_ms']:.0f} |")
    ma, mb = a["mixed"], b["mixed"]
    lines += ["", f"Item queries while products are added and removed: p50 "
              f"{ma['queries']['p50_ms']:.1f} / {mb['queries']['p50_ms']:.1f} ms, p99 "
              f"{ma['queries']['p99_ms']:.1f} / {mb['queries']['p99_ms']:.1f} ms; write errors "
              f"{ma['write_errors']} / {mb['write_errors']}; findable "
              f"{ma['added_findable']}/{ma['added_live']} / {mb['added_findable']}/"
              f"{mb['added_live']}.", ""]
    return lines, a["cpu"]


def query_rows():
    a, b = load("query", "before")["rows"], load("query", "after")["rows"]
    lines = ["## Search through the store (`bench_query.py`, Gaussian 512-d, k=10)", "",
             "| catalog | method | single p50 before / after (ms) | single p99 before / after "
             "| batch of 64 per query | recall@10 | filter 10 % p50 | load (s) |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for x, y in zip(a, b, strict=True):
        lines.append(
            f"| {x['catalog']:,} | {x['method']} | {x['single']['p50_ms']:.2f} / "
            f"{y['single']['p50_ms']:.2f} | {x['single']['p99_ms']:.2f} / "
            f"{y['single']['p99_ms']:.2f} | {x['batch_ms_per_query']:.2f} / "
            f"{y['batch_ms_per_query']:.2f} | {x['recall_at_10']:.4f} / {y['recall_at_10']:.4f} "
            f"| {_filter_p50(x)} / {_filter_p50(y)} "
            f"| {x.get('load_s', 0):.2f} / {y.get('load_s', 0):.2f} |")
    return lines + [""]


def _filter_p50(row):
    f = row.get("filters", {}).get("10%")
    return "-" if f is None else f"{f['p50_ms']:.2f}"


def extract_rows():
    a, b = load("extract", "before"), load("extract", "after")
    lines = ["## Feature extraction at 224 px (`bench_extract.py speed`)", "",
             "| engine | precision | model only, images/s before / after | share of peak |",
             "| --- | --- | ---: | ---: |"]
    for x, y in zip(a["speed"][0]["engines"], b["speed"][0]["engines"], strict=True):
        lines.append(f"| {x['engine']} | {x['precision']} | {x['images_per_s']:.1f} / "
                     f"{y['images_per_s']:.1f} ({change(x['images_per_s'], y['images_per_s'])}) "
                     f"| {x['share_of_peak']:.0%} / {y['share_of_peak']:.0%} |")
    lines += ["", "| end to end (real JPEGs, 4 views) | model only, inputs/s before / after | "
              "end to end before / after | share before / after |", "| --- | ---: | ---: | ---: |"]
    for x, y in zip(a["end_to_end"], b["end_to_end"], strict=True):
        lines.append(f"| {x['engine']} {x['precision']} | {x['model_only_inputs_per_s']:.1f} / "
                     f"{y['model_only_inputs_per_s']:.1f} | {x['end_to_end_inputs_per_s']:.1f} / "
                     f"{y['end_to_end_inputs_per_s']:.1f} | {x['share_of_model_only']:.0%} / "
                     f"{y['share_of_model_only']:.0%} |")
    peak = b["machine"]["matmul_peak_gflops"]
    return lines + ["", f"Matmul peak of this machine (GFLOP/s): {json.dumps(peak)}.", ""]


def report(before, after):
    from fashionrec.artifacts import cpu_description

    have = {b for b in BENCHES if (OUT / f"{b}-before.json").is_file()
            and (OUT / f"{b}-after.json").is_file()}
    lines = ["# Before and after the core redesign (one machine, one session)", "",
             f"CPU: {cpu_description()}. Before: `{before}`; after: `{after}`. Each "
             "benchmark ran on both trees back to back (before first), the machine "
             f"otherwise idle. Benchmarks run: {', '.join(sorted(have))}.", ""]
    if "serve" in have:
        lines += serve_rows()[0]
    if "query" in have:
        lines += query_rows()
    if "extract" in have:
        lines += extract_rows()
    (HERE / "results" / "bench_redesign.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the old source tree")
    p.add_argument("--after", required=True, help="the new source tree")
    p.add_argument("--benches", default="serve,query,extract")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if not args.report_only:
        for bench in args.benches.split(","):
            run(Path(args.before).resolve(), "before", bench)
            run(Path(args.after).resolve(), "after", bench)
    report(_commit(args.before), _commit(args.after))


def _commit(tree):
    proc = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or str(tree)


if __name__ == "__main__":
    main()
