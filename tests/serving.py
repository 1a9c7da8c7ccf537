"""Helpers for the service tests: a served copy of a run (real app, TestClient), and
writes paced against a retrain."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time


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


def start_server(argv, ready, what, timeout):
    """A server process (``argv``, output piped) once ``ready()`` is true; fails the
    test with the process's output if it dies first, or after ``timeout`` seconds."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{what} never became ready"
        time.sleep(0.2)
    return proc
