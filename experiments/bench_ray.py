"""Catalog feature extraction on Ray Data against the plain single-process path: the
same images, the same catalog views (pad+crop x flip: 4 backbone inputs per image), the
same backbone, for each engine asked for; throughput (catalog images per second, each
seen in every view) of the plain path, a local Ray with 1 worker and with 2 workers,
and the largest feature difference between Ray and the plain path.

    python experiments/bench_ray.py                          # 512 JPEGs, 224 px, both engines
    python experiments/bench_ray.py --n 64 --engines keras:float32 --rounds 1   # a quick look

Each measurement is one ``Recommender.extract_catalog`` call into a fresh feature cache
(backbone built, headers checked, every view extracted and written), as ``fashionrec
extract`` runs it. Ray's own start (``ray.init``, once per process) is timed apart; its
actors' start (each rebuilds the backbone) is inside the measurement. The three ways
take turns, ``--rounds`` times, and the best round of each counts, so that load from
other processes on the machine (measured and recorded: CPU time not spent by this
benchmark's processes) hits them alike.

Writes experiments/results/bench_ray.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from fashionrec.artifacts import cpu_description  # noqa: E402
from fashionrec.config import RunConfig, shared_dirs  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
TARGET = 0.85  # Ray 2 workers must keep this share of the plain path's throughput
TICK = os.sysconf("SC_CLK_TCK")


def first_jpegs(root, n):
    paths = sorted(p for p in Path(root).rglob("*.jpg") if p.is_file())
    if len(paths) < n:
        sys.exit(f"{root} has {len(paths)} JPEGs, fewer than --n {n}")
    return paths[:n]


def default_images():
    for shared in shared_dirs():
        d = shared / "datasets" / "clothing-dataset-small"
        if d.is_dir():
            return d
    return None


class ForeignLoad:
    """CPU time spent on this machine by processes other than this benchmark and its
    descendants (its Ray and Ray's workers), as a share of all cores, while the
    ``with`` block runs: the machine's busy time (``/proc/stat``, niced time included)
    less our processes' time (sampled twice a second, so one that exits loses at most
    half a second of it)."""

    def __enter__(self):
        self._seen, self._stop = {}, threading.Event()
        self._busy0, self._t0 = self._busy(), time.monotonic()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._sample()
        self._thread.start()
        return self

    @staticmethod
    def _busy():
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait

    def _sample(self):
        procs = {}
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    stat = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            procs[pid] = (stat[1], int(stat[11]) + int(stat[12]))  # ppid, utime + stime
        ours = {str(os.getpid())}
        grew = True
        while grew:  # our descendants
            new = {pid for pid, (ppid, _) in procs.items() if ppid in ours} - ours
            ours |= new
            grew = bool(new)
        for pid in ours & procs.keys():
            ticks = procs[pid][1]
            first = self._seen.get(pid, (ticks, ticks))[0]
            self._seen[pid] = (first, ticks)

    def _watch(self):
        while not self._stop.wait(0.5):
            self._sample()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = time.monotonic() - self._t0
        ours = sum(last - first for first, last in self._seen.values())
        busy = self._busy() - self._busy0
        self.share = max(0.0, (busy - ours) / TICK / (wall * (os.cpu_count() or 1)))
        self.ours = ours / TICK / (wall * (os.cpu_count() or 1))


def features(cache_dir):
    """``{view file stem: features}`` of a feature cache folder (fingerprint dropped)."""
    out = {}
    for path in sorted(Path(cache_dir).glob("catalog*.h5")):
        with h5py.File(path, "r") as f:
            out[path.stem.rsplit("-", 1)[0]] = f["features"][:]
    return out


def max_diff(a, b):
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return float(max(np.abs(a[k] - b[k]).max() for k in a))


def measure(cfg, catalog, cache, runner=None):
    """One extraction into the empty folder ``cache``: ``(record, features)``."""
    from fashionrec import Recommender

    with ForeignLoad() as load:
        t = time.perf_counter()
        out = Recommender(cfg).extract_catalog(catalog, min_class_size=1, cache_dir=cache,
                                               progress=False, log=None, runner=runner)
        seconds = time.perf_counter() - t
    assert out["n_items"] == len(catalog) and not out["n_failed"], out
    record = {"seconds": seconds, "img_s": len(catalog) / seconds,
              "foreign_load": load.share, "own_load": load.ours}
    if runner is not None:
        record["stats"] = dict(runner.stats_)
    return record, features(cache)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default=None,
                   help="folder whose JPEGs (sorted) are used (default: "
                        "../shared/datasets/clothing-dataset-small)")
    p.add_argument("--n", type=int, default=512, help="images (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--engines", default="keras:float32,auto:auto",
                   help="engine:precision pairs, comma-separated (default: %(default)s)")
    p.add_argument("--workers", default="1,2", help="Ray local workers to measure")
    p.add_argument("--rounds", type=int, default=2, help="turns of each way (best counts)")
    p.add_argument("--extract-batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=None, help="images per Ray task")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs per actor")
    p.add_argument("--threads", type=int, default=None, help="TensorFlow threads per actor")
    p.add_argument("--out", default=str(OUT), help="folder for bench_ray.{json,md}")
    args = p.parse_args(argv)

    from fashionrec.catalog import Catalog
    from fashionrec.distributed import RayExtractor
    from fashionrec.engine import resolve

    root = Path(args.images) if args.images else default_images()
    if root is None:
        sys.exit("no ../shared/datasets/clothing-dataset-small; pass --images DIR")
    paths = first_jpegs(root, args.n)
    catalog = Catalog.from_files(paths, ids=[p.relative_to(root).as_posix() for p in paths],
                                 labels=[p.parent.name for p in paths])
    engines = [tuple(e.split(":")) for e in args.engines.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    command = " ".join(["python experiments/bench_ray.py",
                        *(argv if argv is not None else sys.argv[1:])])
    print(f"{command}\n{len(paths)} images of {root}; CPU: {cpu_description()}", flush=True)

    t = time.perf_counter()
    runners = {w: RayExtractor(workers=w, chunk_size=args.chunk_size,
                               num_cpus=args.num_cpus, threads=args.threads)
               for w in workers}
    runners[workers[0]].connect()
    ray_start_s = time.perf_counter() - t
    print(f"ray.init: {ray_start_s:.1f} s", flush=True)
    ways = ["plain", *[f"ray{w}" for w in workers]]
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as work:
            for engine, precision in engines:
                cfg = RunConfig(image_size=args.image_size, weights=args.weights,
                                backbone=args.backbone, engine=engine, precision=precision,
                                extract_batch_size=args.extract_batch_size)
                name = "-".join(resolve(engine, precision)[:2])
                runs = {way: [] for way in ways}
                feats = {}
                for r in range(args.rounds):
                    for way in ways:
                        runner = None if way == "plain" else runners[int(way[3:])]
                        cache = Path(work) / f"{name}-{way}-{r}"
                        record, got = measure(cfg, catalog, cache, runner)
                        runs[way].append(record)
                        feats.setdefault(way, got)
                        print(f"  {name} {way} round {r + 1}: {record['seconds']:.1f} s, "
                              f"{record['img_s']:.2f} img/s, foreign load "
                              f"{record['foreign_load']:.0%}", flush=True)
                best = {way: min(runs[way], key=lambda x: x["seconds"]) for way in ways}
                row = {"engine": name, "asked": f"{engine}:{precision}",
                       "n_images": len(paths), "best": best, "runs": runs, "ray": {}}
                for w in workers:
                    num_cpus, threads = runners[w].resources()
                    b = best[f"ray{w}"]
                    row["ray"][str(w)] = {
                        "img_s": b["img_s"], "vs_plain": best["plain"]["seconds"] / b["seconds"],
                        "max_abs_diff": max_diff(feats["plain"], feats[f"ray{w}"]),
                        "actor_num_cpus": num_cpus, "actor_threads": threads,
                        "chunk_images": int(len(runners[w].chunks(len(paths), 4)[0])),
                    }
                rows.append(row)
    finally:
        for runner in runners.values():
            runner.close()

    result = {
        "command": command, "cpu": cpu_description(), "images": str(root),
        "n_images": len(paths), "image_size": args.image_size, "views": 4,
        "backbone": f"{args.backbone}, weights {args.weights}",
        "extract_batch_size": args.extract_batch_size, "rounds": args.rounds,
        "ray_init_s": ray_start_s, "target_ray2_vs_plain": TARGET, "results": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ray.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench_ray.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r):
    lines = [
        "# Catalog feature extraction on Ray Data vs. the plain path",
        "",
        f"Reproduce: `{r['command']}`",
        "",
        f"CPU: {r['cpu']}. {r['n_images']} JPEGs of {r['images']} (the first, sorted), "
        f"{r['image_size']} px, the catalog's default {r['views']} views (pad+crop x flip), "
        f"backbone {r['backbone']}, {r['extract_batch_size']} backbone inputs per call.",
        "",
        "| engine | plain (img/s) | Ray local, 1 worker (img/s) | Ray local, 2 workers "
        "(img/s) | Ray 2 workers / plain | max abs feature diff, Ray vs. plain |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["results"]:
        ray, best = row["ray"], row["best"]
        one, two = ray.get("1"), ray.get("2")
        ratio = f"**{two['vs_plain']:.2f}** ({(two['vs_plain'] - 1) * 100:+.0f} %)" if two else "-"
        diff = max(x["max_abs_diff"] for x in ray.values())
        lines.append(f"| {row['engine']} (asked {row['asked']}) | {best['plain']['img_s']:.2f} | "
                     f"{_rate(one)} | {_rate(two)} | {ratio} | {diff:.1e} |")
    lines += [
        "",
        "img/s: catalog images per second, each seen in all 4 views (4 backbone inputs), "
        f"the best of {r['rounds']} turn(s) each. Each figure is one "
        "`Recommender.extract_catalog` call into an empty feature cache (backbone built, "
        "files checked, all views written); Ray's start (`ray.init`, "
        f"{r['ray_init_s']:.1f} s, once per process) is not included, its actors' start "
        "(each rebuilds the backbone) is. Target: Ray with 2 workers at least "
        f"{r['target_ray2_vs_plain']:.0%} of the plain path's rate.",
        "",
        "Inside the Ray runs (best turn): the time from the call to the first chunk "
        "computed (Ray Data's start, actor processes, backbone rebuilt), and each actor's "
        "compute rate:",
        "",
        "| engine | Ray workers | CPUs / TF threads per actor | images per task | "
        "to first chunk (s) | slowest actor's backbone build (s) | per-actor rate (img/s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["results"]:
        for w, x in row["ray"].items():
            s = row["best"][f"ray{w}"]["stats"]
            lines.append(
                f"| {row['engine']} | {w} | {x['actor_num_cpus']:.2f} / {x['actor_threads']} | "
                f"{x['chunk_images']} | {s['first_compute_s']:.1f} | {s['actor_start_s']:.1f} "
                f"| {s['images'] / s['compute_s']:.2f} |")
    lines += [
        "",
        "Load from other processes on the machine during each turn (CPU time of processes "
        "this benchmark cannot see, share of all cores): "
        + "; ".join(f"{row['engine']} {way} "
                    + "/".join(f"{x['foreign_load']:.0%}" for x in runs)
                    for row in r["results"] for way, runs in row["runs"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _rate(x):
    return f"{x['img_s']:.2f}" if x else "-"


if __name__ == "__main__":
    main()
