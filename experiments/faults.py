"""The fault suite of ``fashionrec serve``: a real server process on 127.0.0.1, killed,
flooded, left mid-request and written to from two sides, with the number each case
must hold.

* ``kill-adds``: SIGKILL at a random moment while adds arrive over HTTP, ``--rounds``
  times; every add answered 200 is in the index after each kill, and the index loads
  every time (the next round's server starts from it);
* ``kill-compaction``: SIGKILL just after an automatic compaction starts
  (``--compact-segments 4``); the same checks;
* ``disconnects``: clients that send a photo query and leave before the answer (and
  some mid-body), then normal photo queries: all answered 200;
* ``full-queue``: more concurrent photo queries than the queue holds: only 200, 503
  (each with ``Retry-After``) or 504, none waiting past its timeout;
* ``many-adds``: single-product adds, then the item-query p99 against the same catalog
  compacted (at most 2x), and the server's open files sampled throughout (bounded);
* ``pixel-budget``: concurrent uploads at the pixel budget: the server's peak RSS;
* ``cli-and-service``: ``fashionrec add`` processes and HTTP adds on one run at once:
  nothing lost, no 5xx.

The served run is a tiny Fashion-MNIST run (random weights, 32 px) trained here once;
every case works on its own copy. Results go to ``experiments/results/faults.json`` and
``faults.md``; ``tests/test_faults.py`` runs a fast slice.

    python experiments/faults.py                 # every case, full size (~20 min)
    python experiments/faults.py --cases kill-adds --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from benchkit import free_port

HERE = Path(__file__).resolve().parent
KEY = "faults-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FIRST_ID = 100_000  # new products' ids (above Fashion-MNIST's 10,000 test images)
TINY = ["--n-train", "48", "--n-reco", "24", "--image-size", "32", "--weights", "none",
        "--epochs", "2", "--batch-size", "16", "--extract-batch-size", "16",
        "--engine", "keras", "--search", "exact", "--no-progress"]


def env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "FASHIONREC_API_KEY": KEY,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent),
                                                        os.environ.get("PYTHONPATH")]))}


def train_run(run):
    """The tiny run every case serves a copy of."""
    out = subprocess.run([sys.executable, "-m", "fashionrec", "train", "--run-dir", str(run),
                          *TINY], env=env(), capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"training the tiny run failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return run


def png(array):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def noise_png(seed, size=28):
    return png(np.random.default_rng(seed).integers(0, 256, (size, size)))


class Server:
    """``fashionrec serve`` on ``run`` in its own process (127.0.0.1, a free port)."""

    def __init__(self, run, *options):
        self.run, self.options, self.port = Path(run), list(options), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines, self.proc = [], None

    def start(self, timeout=240):
        import httpx

        t0 = time.monotonic()
        self.lines = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fashionrec", "serve", "--run-dir", str(self.run),
             "--host", "127.0.0.1", "--port", str(self.port), *self.options],
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited:\n" + "\n".join(self.lines[-30:]))
            try:
                if httpx.get(self.url + "/api/ready", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > timeout:
                self.kill()
                raise RuntimeError("the server never became ready:\n" +
                                   "\n".join(self.lines[-30:]))
            time.sleep(0.2)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def said(self, text):
        return any(text in line for line in list(self.lines))

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait(30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def open_files(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def memory(self, field="VmRSS"):
        """``field`` of /proc/PID/status in MiB (VmRSS now, VmHWM the peak)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return None


def live_ids(run):
    """The ids the run's published catalog holds, read from disk (this loads the
    index: a failure here is an index that does not load)."""
    from fashionrec.rundir import RunDir
    from fashionrec.store import IndexStore

    return {int(i) for i in IndexStore.of(RunDir(run).current()).load().ids.tolist()}


class Writer:
    """Threads posting single-product adds (fresh ids) until stopped or refused by a
    dead server; ``acked`` holds the ids answered 200, ``statuses`` every status."""

    def __init__(self, url, first_id, threads=2):
        self.url, self.next_id, self.lock = url, first_id, threading.Lock()
        self.acked, self.statuses, self.stop = [], [], threading.Event()
        self.threads = [threading.Thread(target=self._post, daemon=True)
                        for _ in range(threads)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _post(self):
        import httpx

        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                with self.lock:
                    item_id, self.next_id = self.next_id, self.next_id + 1
                try:
                    r = client.post(self.url + "/api/items", headers=AUTH,
                                    files=[("images", ("p.png", noise_png(item_id)))],
                                    data={"ids": [str(item_id)]})
                except httpx.HTTPError:
                    self.statuses.append("connection")
                    if self.stop.wait(0.05):
                        return
                    continue
                self.statuses.append(r.status_code)
                if r.status_code == 200:
                    self.acked.append(item_id)


def kill_rounds(template, work, rounds, options=(), trigger=None, seed=0):
    """Rounds of: start the server, write, SIGKILL (at a random moment, or when
    ``trigger(server)`` says), check every acked add is on disk."""
    run = work / "run"
    shutil.copytree(template, run)
    rng, next_id = random.Random(seed), FIRST_ID
    acked, lost, load_failures, statuses, mid, starts = [], [], 0, [], 0, []
    for _ in range(rounds):
        server = Server(run, *options)
        try:
            starts.append(server.start())
        except RuntimeError:
            load_failures += 1
            break
        with Writer(server.url, next_id) as writer:
            deadline = time.monotonic() + 30
            if trigger is None:
                time.sleep(rng.uniform(0.3, 2.5))
            else:
                while not trigger(server) and time.monotonic() < deadline:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, 0.03))
                mid += trigger(server) and not server.said("serve: compacted")
            server.kill()
        next_id = writer.next_id
        acked += writer.acked
        statuses += writer.statuses
        try:
            on_disk = live_ids(run)
        except Exception:  # noqa: BLE001 - an index that does not load is the failure
            load_failures += 1
            continue
        lost += [i for i in writer.acked if i not in on_disk]
    server = Server(run, *options)  # the last state loads and serves every acked add
    try:
        server.start()
        import httpx

        missing = [i for i in acked if httpx.get(f"{server.url}/api/items/{i}",
                                                 timeout=10).status_code != 200]
    except RuntimeError:
        load_failures, missing = load_failures + 1, acked
    finally:
        server.stop()
    fives = sum(1 for s in statuses if isinstance(s, int) and s >= 500)
    return {"rounds": rounds, "acked": len(acked), "lost": len(lost),
            "missing_after_restart": len(missing), "load_failures": load_failures,
            "status_5xx": fives, "statuses": _count(statuses),
            "killed_mid_compaction": mid if trigger else None,
            "start_s_median": round(statistics.median(starts), 1) if starts else None,
            "holds": not lost and not missing and not load_failures}


def _count(values):
    out = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def case_kill_adds(template, work, rounds=20, **_):
    return kill_rounds(template, work, rounds)


def case_kill_compaction(template, work, rounds=10, **_):
    return kill_rounds(template, work, rounds, ("--compact-segments", "4"),
                       trigger=lambda s: s.said("serve: compacting"), seed=1)


def photo_request(port, body, boundary, leave_after=None):
    """A raw photo query; with ``leave_after`` bytes of the body sent, the client closes
    the connection without reading anything (a client that leaves)."""
    head = (f"POST /api/similar HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            f"multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
            f"\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + (body if leave_after is None else body[:leave_after]))
        if leave_after is not None:
            return None
        return s.recv(64).split(b" ")[1].decode()


def multipart(data, boundary="fAuLtS", k=6):
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"q.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()


def case_disconnects(template, work, leave=200, normal=100, **_):
    import httpx

    run = work / "run"
    shutil.copytree(template, run)
    server = Server(run)
    server.start()
    try:
        body = multipart(noise_png(1))
        rng = random.Random(2)
        cuts = [None if i % 4 else rng.randrange(1, len(body)) for i in range(leave)]
        t = time.monotonic()
        with ThreadPoolExecutor(16) as pool:  # leave right after sending, or mid-body
            list(pool.map(lambda cut: photo_request(server.port, body, "fAuLtS",
                                                    leave_after=len(body) if cut is None
                                                    else cut), cuts))
        drained = queue_drained(server.url, timeout=30)
        drain_s = time.monotonic() - t
        photo = noise_png(3)

        def query(_):
            return httpx.post(server.url + "/api/similar", files={"image": ("q.png", photo)},
                              timeout=60).status_code
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(query, range(normal)))
        alive = server.proc.poll() is None
    finally:
        server.stop()
    ok = sum(s == 200 for s in statuses)
    return {"clients_that_left": leave, "normal_queries": normal, "answered_200": ok,
            "statuses": _count(statuses), "server_alive": alive,
            "queue_drained_s": round(drain_s, 2),
            "holds": ok == normal and alive and drained}


def queue_drained(url, timeout):
    """Wait until no photo query waits in the server's queue (its Prometheus gauge):
    the requests of clients that left are dropped, not answered."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("fashionrec_photo_queue ") and float(line.split()[1]) == 0:
                return True
        time.sleep(0.05)
    return False


def big_png(megapixels, seed=0):
    """A smooth RGB PNG of about ``megapixels`` (small as a file, full size decoded)."""
    side = int((megapixels * 1e6) ** 0.5)
    x = np.linspace(0, 255, side, dtype=np.float32)
    img = np.stack([np.add.outer(x, x) / 2, np.add.outer(x, x[::-1]) / 2,
                    np.full((side, side), (seed * 37) % 256, np.float32)], -1)
    return png(img.astype(np.uint8))


def case_full_queue(template, work, clients=48, timeout_s=3.0, **_):
    import httpx

    run = work / "run"
    shutil.copytree(template, run)
    server = Server(run, "--max-queue", "2", "--max-batch", "1",
                    "--photo-timeout-s", str(timeout_s))
    server.start()
    photo = big_png(30)
    try:
        def query(_):
            t = time.monotonic()
            r = httpx.post(server.url + "/api/similar", files={"image": ("q.png", photo)},
                           timeout=60)
            return r.status_code, "retry-after" in r.headers, time.monotonic() - t
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(query, range(clients)))
        after = httpx.post(server.url + "/api/similar", files={"image": ("q.png",
                                                                         noise_png(4))},
                           timeout=60).status_code
    finally:
        server.stop()
    statuses = [a[0] for a in answers]
    busy = [a for a in answers if a[0] == 503]
    worst = max(a[2] for a in answers)
    return {"clients": clients, "max_queue": 2, "photo_timeout_s": timeout_s,
            "statuses": _count(statuses), "busy_with_retry_after": sum(a[1] for a in busy),
            "slowest_answer_s": round(worst, 2), "next_query_after": after,
            "holds": bool(busy) and all(a[1] for a in busy)
            and set(statuses) <= {200, 503, 504} and after == 200
            and worst <= timeout_s + 2.0}


def item_p99(url, ids, n=300):
    import httpx

    times = []
    with httpx.Client(timeout=30) as client:
        for i in range(n):
            t = time.perf_counter()
            r = client.get(f"{url}/api/items/{ids[i % len(ids)]}/similar", params={"k": 6})
            times.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
    return float(np.percentile(times, 99) * 1e3), float(np.percentile(times, 50) * 1e3)


def case_many_adds(template, work, adds=2000, **_):
    import httpx

    from fashionrec.rundir import RunDir
    from fashionrec.store import IndexStore

    run = work / "run"
    shutil.copytree(template, run)
    server = Server(run)
    server.start()
    files, statuses, t0 = [], [], time.monotonic()
    try:
        with httpx.Client(timeout=60) as client:
            for n in range(adds):
                r = client.post(server.url + "/api/items", headers=AUTH,
                                files=[("images", ("p.png", noise_png(n)))],
                                data={"ids": [str(FIRST_ID + n)]})
                statuses.append(r.status_code)
                if n % 25 == 0:
                    files.append(server.open_files())
        add_s = time.monotonic() - t0
        time.sleep(1.5)  # a background compaction the last add started, and a reload
        ids = [FIRST_ID + i for i in range(0, adds, max(adds // 100, 1))]
        pending = IndexStore.of(RunDir(run).current()).pending()
        p99, p50 = item_p99(server.url, ids)
        subprocess.run([sys.executable, "-m", "fashionrec", "compact", "--run-dir", str(run),
                        "--no-progress"], env=env(), check=True, capture_output=True,
                       timeout=600)
        time.sleep(1.5)  # the service reloads the compacted index
        p99_c, p50_c = item_p99(server.url, ids)
        items = httpx.get(server.url + "/api/stats", timeout=30).json()["items"]
        compactions = sum("serve: compacted" in line for line in server.lines)
    finally:
        server.stop()
    ratio = p99 / p99_c
    return {"adds": adds, "adds_per_s": round(adds / add_s, 1),
            "statuses": _count(statuses), "items_after": items,
            "background_compactions": compactions, "pending_at_end": pending,
            "open_files_min": min(files), "open_files_max": max(files),
            "query_p50_ms": round(p50, 2), "query_p99_ms": round(p99, 2),
            "compacted_p50_ms": round(p50_c, 2), "compacted_p99_ms": round(p99_c, 2),
            "p99_ratio": round(ratio, 2),
            "holds": statuses.count(200) == adds and items == 24 + adds and ratio <= 2.0
            and max(files) - min(files) <= 16}


def case_pixel_budget(template, work, uploads=16, megapixels=40, **_):
    import httpx

    run = work / "run"
    shutil.copytree(template, run)
    server = Server(run, "--max-upload-mb", "20")
    server.start()
    photos = [big_png(megapixels * 0.999, seed) for seed in range(uploads)]
    try:
        before, peak_before = server.memory(), server.memory("VmHWM")
        samples, stop = [], threading.Event()

        def sample():
            while not stop.wait(0.01):
                samples.append(server.memory())
        threading.Thread(target=sample, daemon=True).start()

        def query(photo):
            return httpx.post(server.url + "/api/similar", files={"image": ("q.png", photo)},
                              timeout=300).status_code
        with ThreadPoolExecutor(uploads) as pool:
            statuses = list(pool.map(query, photos))
        stop.set()
        peak = server.memory("VmHWM")
    finally:
        server.stop()
    return {"uploads": uploads, "megapixels_each": round(megapixels * 0.999, 2),
            "upload_mb_each": round(len(photos[0]) / 2**20, 2), "statuses": _count(statuses),
            "rss_before_mib": round(before), "peak_before_mib": round(peak_before),
            "peak_rss_mib": round(max(peak, max(samples, default=0))),
            "peak_growth_mib": round(max(peak, max(samples, default=0)) - before),
            "holds": set(statuses) <= {200}}


def case_cli_and_service(template, work, http_adds=40, cli_adds=4, **_):
    import httpx

    run = work / "run"
    shutil.copytree(template, run)
    server = Server(run)
    server.start()
    cli_ok, cli_rc = [], []
    try:
        with Writer(server.url, FIRST_ID, threads=1) as writer:
            for n in range(cli_adds):
                item_id = FIRST_ID + 50_000 + n
                path = work / f"cli-{n}.png"
                path.write_bytes(noise_png(item_id))
                out = subprocess.run([sys.executable, "-m", "fashionrec", "add", "--run-dir",
                                      str(run), "--image", str(path), "--id", str(item_id),
                                      "--no-progress"], env=env(), capture_output=True,
                                     text=True, timeout=600)
                cli_rc.append(out.returncode)
                if out.returncode == 0:
                    cli_ok.append(item_id)
            deadline = time.monotonic() + 120
            while len(writer.acked) < http_adds and time.monotonic() < deadline:
                time.sleep(0.1)
        time.sleep(1.5)
        wanted = writer.acked + cli_ok
        missing = [i for i in wanted if httpx.get(f"{server.url}/api/items/{i}",
                                                  timeout=10).status_code != 200]
        on_disk = live_ids(run)
    finally:
        server.stop()
    lost = [i for i in wanted if i not in on_disk]
    fives = sum(1 for s in writer.statuses if isinstance(s, int) and s >= 500)
    return {"http_acked": len(writer.acked), "cli_adds": cli_adds, "cli_ok": len(cli_ok),
            "cli_exit_codes": cli_rc, "http_statuses": _count(writer.statuses),
            "lost": len(lost), "not_served": len(missing), "status_5xx": fives,
            "holds": not lost and not missing and not fives and len(cli_ok) == cli_adds}


CASES = {"kill-adds": case_kill_adds, "kill-compaction": case_kill_compaction,
         "disconnects": case_disconnects, "full-queue": case_full_queue,
         "many-adds": case_many_adds, "pixel-budget": case_pixel_budget,
         "cli-and-service": case_cli_and_service}


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def report(results, machine):
    lines = ["# Fault suite of `fashionrec serve`", "",
             f"CPU: {machine['cpu']}, {machine['cores']} cores; {machine['date']}. A tiny "
             "Fashion-MNIST run (24 items, random weights, 32 px) served by "
             "`fashionrec serve` in its own process on 127.0.0.1. "
             "`python experiments/faults.py` reproduces it.", "",
             "| case | holds | run at | figures |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        figures = ", ".join(f"{k}={json.dumps(v)}" for k, v in r.items()
                            if k not in ("holds", "seconds", "run"))
        lines.append(f"| {name} | {'yes' if r['holds'] else '**no**'} | {r.get('run', '')} "
                     f"| {figures} ({r['seconds']:.0f} s) |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=20, help="kill-adds rounds (>= 20)")
    p.add_argument("--compaction-rounds", type=int, default=10)
    p.add_argument("--adds", type=int, default=2000)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--merge", action="store_true",
                   help="keep the saved results of the cases not run (same CPU only)")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="fashionrec-faults-") as tmp:
        template = train_run(Path(tmp) / "template")
        for name in args.cases.split(","):
            work = Path(tmp) / name
            work.mkdir()
            t = time.monotonic()
            kwargs = {"rounds": args.compaction_rounds if name == "kill-compaction"
                      else args.rounds, "adds": args.adds}
            results[name] = {**CASES[name](template, work, **kwargs),
                             "seconds": round(time.monotonic() - t, 1),
                             "run": time.strftime("%Y-%m-%d %H:%M")}
            print(name, json.dumps(results[name]), flush=True)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge and (out / "faults.json").is_file():  # re-run cases, keep the others
        saved = json.loads((out / "faults.json").read_text())
        if saved["machine"]["cpu"] == machine["cpu"]:
            results = {**saved["cases"], **results}
    (out / "faults.json").write_text(json.dumps({"machine": machine, "cases": results},
                                                indent=2) + "\n")
    (out / "faults.md").write_text(report(results, machine))
    return 0 if all(r["holds"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
