"""Lean replicas: ``fashionrec serve`` of one OpenVINO run, started without TensorFlow
(the default for an OpenVINO run: its NumPy head and OpenVINO IR backbone) and with it
(``--engine-path keras``: the Keras head, the Keras backbone converted to OpenVINO at
start, as every run was served before), several times each, alternating.

Each start is a real process on 127.0.0.1 (a free port). Measured: seconds from just
before the process is started to ``/api/ready`` answering 200 (the service warms up,
one item and one photo query through every stage, before it says ready); the process's
resident memory (``VmRSS``, and its proportional share ``Pss``, from ``/proc``) once
ready; whether any TensorFlow library is mapped into it (``/proc/<pid>/maps``). Each
path then answers one photo query and one item query: both paths must give the same
ids and distances (within 1e-4).

The run (made once, under ``experiments/out/replica/``): the real photos of
``../shared/datasets/clothing-dataset-small`` as the catalog, the stand-in ImageNet
ResNet50 (``../shared/models/resnet50_conv4_imagenet.keras``, used because the official
weights cannot be downloaded here) at 64 px, engine OpenVINO float32, 3 epochs.
Targets (issue 20): the lean path ready in at most 1/3 of the TensorFlow path's time,
with at most 1/2 of its memory.

    flock /tmp/bench.lock python experiments/bench_replica.py    # results/bench_replica.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from benchkit import free_port, matmul_gflops

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results"
WORK = HERE / "out" / "replica"
PHOTOS = ROOT.parent / "shared" / "datasets" / "clothing-dataset-small"
PATHS = {"lean": "auto", "tensorflow": "keras"}  # --engine-path of each


def prepare_run(run_dir, image_size):
    """The OpenVINO catalog run (trained once; delete the folder to remake it)."""
    if (run_dir / "run.json").is_file():
        return run_dir
    if not PHOTOS.is_dir():
        sys.exit(f"{PHOTOS} is not present")
    subprocess.run([sys.executable, "-m", "fashionrec", "train", "--catalog", str(PHOTOS),
                    "--image-size", str(image_size), "--epochs", "3", "--engine", "openvino",
                    "--precision", "float32", "--run-dir", str(run_dir), "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    return run_dir


def proc_status(pid):
    """``VmRSS`` and ``VmHWM`` (MB) from ``/proc/<pid>/status``, ``Pss`` (MB) from
    ``smaps_rollup``."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    rollup = Path(f"/proc/{pid}/smaps_rollup")
    if rollup.is_file():
        for line in rollup.read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1]) / 1024
    return out


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def post_photo(url, photo, k=5):
    """``POST /api/similar`` with ``photo`` (multipart, by hand: the standard library)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"q.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
    body += Path(photo).read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "/api/similar", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def start(run_dir, path, photo, item, timeout=600):
    """One start of ``fashionrec serve`` on the engine path ``path``: its ready time,
    memory, TensorFlow libraries, and answers to one photo and one item query."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("FASHIONREC_ENGINE_PATH", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fashionrec", "serve", "--run-dir",
                             str(run_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--engine-path", PATHS[path]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited:\n{proc.stdout.read()[-3000:]}")
            try:
                if get(url + "/api/ready")[0] == 200:
                    break
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise SystemExit("the server did not become ready")
            time.sleep(0.05)
        ready_s = time.perf_counter() - t0
        memory = proc_status(proc.pid)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        tensorflow = "site-packages/tensorflow/" in maps or "_pywrap_tensorflow" in maps
        photo_answer = post_photo(url, photo)
        item_answer = get(f"{url}/api/items/{item}/similar?k=5", timeout=60)[1]
    finally:
        proc.terminate()
        proc.communicate(timeout=120)
    return {"path": path, "ready_s": ready_s, "rss_mb": memory["VmRSS"],
            "peak_rss_mb": memory["VmHWM"], "pss_mb": memory.get("Pss"),
            "tensorflow_mapped": tensorflow,
            "photo": [[i["id"], i["distance"]] for i in photo_answer["items"]],
            "item": [[i["id"], i["distance"]] for i in item_answer["items"]]}


def lscpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return None


def same_answers(a, b, tol=1e-4):
    """Whether two starts answered both queries with the same ids and distances."""
    return all([i for i, _ in a[k]] == [i for i, _ in b[k]] and np.allclose(
        [d for _, d in a[k]], [d for _, d in b[k]], atol=tol, rtol=0) for k in ("photo", "item"))


def summary(rows, path):
    mine = [r for r in rows if r["path"] == path]
    return {key: {"median": float(np.median([r[key] for r in mine])),
                  "min": float(np.min([r[key] for r in mine])),
                  "max": float(np.max([r[key] for r in mine]))}
            for key in ("ready_s", "rss_mb", "pss_mb", "peak_rss_mb")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="starts of each path")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--run-dir", default=str(WORK / "clothing-64-openvino"))
    args = parser.parse_args()
    from fashionrec import Recommender
    from fashionrec.artifacts import cpu_description
    from fashionrec.rundir import RunDir

    run_dir = prepare_run(Path(args.run_dir), args.image_size)
    meta = RunDir(run_dir).read()
    photo = sorted((PHOTOS / "test").rglob("*.jpg"))[0]  # never trained on
    rec = Recommender.load(run_dir, log=None)
    item = rec.browse(0, 1)[1][0].id
    n_items = rec.stats()["items"]
    del rec
    load_before = os.getloadavg()
    rows = []
    for i in range(args.repeats):
        for path in (("lean", "tensorflow") if i % 2 == 0 else ("tensorflow", "lean")):
            rows.append(start(run_dir, path, photo, item))
            r = rows[-1]
            print(f"{path:10s} ready {r['ready_s']:6.2f} s  RSS {r['rss_mb']:7.1f} MB  "
                  f"PSS {r['pss_mb']:7.1f} MB  TensorFlow mapped: {r['tensorflow_mapped']}",
                  flush=True)
    lean, heavy = summary(rows, "lean"), summary(rows, "tensorflow")
    ref = next(r for r in rows if r["path"] == "tensorflow")
    result = {
        "machine": {"cpu": cpu_description(), "lscpu_model": lscpu_model(),
                    "cores": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(),
                    "numpy_float32_gemm_gflops": matmul_gflops()},
        "run": {"dir": str(Path(args.run_dir).relative_to(ROOT)) if Path(
                    args.run_dir).resolve().is_relative_to(ROOT) else args.run_dir,
                "catalog": "clothing-dataset-small (real photos)", "items": n_items,
                "backbone": meta.get("backbone_description"),
                "engine": meta["backbone"]["engine"], "precision": meta["backbone"]["precision"],
                "image_size": meta["backbone"]["image_size"]},
        "repeats": args.repeats, "rows": rows,
        "summary": {"lean": lean, "tensorflow": heavy},
        "ratios": {"ready": lean["ready_s"]["median"] / heavy["ready_s"]["median"],
                   "rss": lean["rss_mb"]["median"] / heavy["rss_mb"]["median"],
                   "pss": lean["pss_mb"]["median"] / heavy["pss_mb"]["median"]},
        "answers_agree": all(same_answers(r, ref) for r in rows),
        "lean_without_tensorflow": all(not r["tensorflow_mapped"] for r in rows
                                       if r["path"] == "lean"),
        "command": "flock /tmp/bench.lock python experiments/bench_replica.py",
    }
    result["targets_met"] = {"ready <= 1/3": result["ratios"]["ready"] <= 1 / 3,
                             "rss <= 1/2": result["ratios"]["rss"] <= 1 / 2}
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_replica.json").write_text(json.dumps(result, indent=1) + "\n")
    write_md(result)
    print((OUT / "bench_replica.md").read_text())


def write_md(result):
    m, run, s = result["machine"], result["run"], result["summary"]

    def cell(path, key, digits):
        v = s[path][key]
        return f"{v['median']:.{digits}f} ({v['min']:.{digits}f}-{v['max']:.{digits}f})"

    lines = [
        "# Lean replicas: `fashionrec serve` with and without TensorFlow",
        "",
        f"CPU: {m['cpu']} (lscpu: {m['lscpu_model']}); NumPy float32 GEMM peak "
        f"{m['numpy_float32_gemm_gflops']:.0f} GFLOP/s (2048²); load average before "
        f"{m['loadavg_before'][0]:.2f}, after {m['loadavg_after'][0]:.2f}.",
        "",
        f"Run: {run['catalog']}, {run['items']} items; {run['backbone']}; engine "
        f"{run['engine']} {run['precision']} at {run['image_size']} px. The same run is "
        f"served on both paths, {result['repeats']} starts each, alternating; each start "
        "is a fresh `fashionrec serve` process on 127.0.0.1.",
        "",
        "* **lean** (`--engine-path auto`, the default for an OpenVINO run): the NumPy "
        "head (`head_weights.h5`) and the backbone read from its OpenVINO IR "
        "(`backbone.xml`); TensorFlow is never imported.",
        "* **tensorflow** (`--engine-path keras`, or `FASHIONREC_ENGINE_PATH=keras`): the "
        "Keras head, the Keras backbone loaded and converted to OpenVINO at start, as "
        "every run was served before.",
        "",
        "Ready: seconds from just before the process starts to `/api/ready` answering 200 "
        "(it warms up first: one item and one photo query). Memory once ready, from "
        "`/proc`: resident (VmRSS), proportional (Pss: shared libraries split among the "
        "processes using them), peak resident (VmHWM). Median (min-max).",
        "",
        "| path | ready (s) | RSS (MB) | PSS (MB) | peak RSS (MB) | TensorFlow mapped |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for path in ("lean", "tensorflow"):
        mapped = {r["tensorflow_mapped"] for r in result["rows"] if r["path"] == path}
        lines.append(f"| {path} | {cell(path, 'ready_s', 2)} | {cell(path, 'rss_mb', 0)} | "
                     f"{cell(path, 'pss_mb', 0)} | {cell(path, 'peak_rss_mb', 0)} | "
                     f"{'yes' if mapped == {True} else 'no' if mapped == {False} else 'mixed'} |")
    r, t = result["ratios"], result["targets_met"]
    lines += [
        "",
        f"Lean / tensorflow (medians): ready **{r['ready']:.2f}x** (target <= 0.33: "
        f"{'met' if t['ready <= 1/3'] else 'NOT met'}), RSS **{r['rss']:.2f}x** (target "
        f"<= 0.50: {'met' if t['rss <= 1/2'] else 'NOT met'}), PSS {r['pss']:.2f}x.",
        "",
        f"Both paths answer a photo query (a test photo) and an item query with the same "
        f"ids and distances within 1e-4: {'yes' if result['answers_agree'] else 'NO'}.",
        "",
        f"Reproduce: `{result['command']}` (the run is trained once into "
        f"`{run['dir']}`).",
        "",
    ]
    (OUT / "bench_replica.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
