"""Helpers for the service tests: a served copy of a run (real app, TestClient), and
writes paced against a retrain."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request


def serve_copy(run_dir, run, key, **settings):
    """A copy of ``run_dir`` at ``run``, served with writes on (``key``) and
    ``settings``, once ready: yields ``(client, run)``."""
    from fastapi.testclient import TestClient

    from fashionrec.serve import ServeSettings, create_app

    shutil.copytree(run_dir, run)
    app = create_app(ServeSettings(str(run), api_key=key, **{
        "max_upload_bytes": 200_000, "check_interval": 0.0, **settings}))
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/api/ready").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.1)
        yield client, run


def paced(queue, saving, done):
    """Ids from ``queue`` to write while a retrain runs: slowly while it trains, at full
    speed once ``saving`` is set, and a few more after ``done``."""
    after = 0
    while queue and after < 3:
        if not saving.is_set():
            saving.wait(0.5)
        yield queue.pop(0)
        after += done.is_set()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(argv, ready, what, timeout, env=None):
    """A server process (``argv``, output piped, environment ``env``) once ``ready()``
    is true; fails the test with the process's output if it dies first, or after
    ``timeout`` seconds."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{what} never became ready"
        time.sleep(0.2)
    return proc


def is_ready(url):
    """Whether the service at ``url`` answers ``/api/ready`` with 200."""
    try:
        with urllib.request.urlopen(url + "/api/ready", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def fashionrec_serve(run, *more, env=None, timeout=180):
    """A ``fashionrec serve`` process of ``run`` on 127.0.0.1 (options ``more``) once
    ``/api/ready`` says yes: ``(process, url)``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server([sys.executable, "-m", "fashionrec", "serve", "--run-dir", str(run),
                         "--host", "127.0.0.1", "--port", str(port), *more],
                        lambda: is_ready(url), "fashionrec serve", timeout, env)
    return proc, url


def milvus_lite(data_dir, port, timeout=60):
    """A Milvus Lite server on 127.0.0.1:``port`` keeping its data in ``data_dir``,
    once it answers: ``(process, uri)``."""
    from fashionrec.errors import FashionrecError
    from fashionrec.milvus import connect

    uri = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return connect(uri, timeout=2) is not None
        except FashionrecError:
            return False
    proc = start_server([sys.executable, "-m", "milvus_lite", "server", "--data-dir",
                         str(data_dir), "--host", "127.0.0.1", "--port", str(port)], ready,
                        "Milvus Lite", timeout)
    return proc, uri


def stop(proc, timeout=30):
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
