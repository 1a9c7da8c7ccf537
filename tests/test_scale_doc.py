"""docs/scale.md runs as written: every command of its ``bash`` blocks, in order, in a
shell, against a Milvus Lite server on 127.0.0.1 (servers started in the background,
each waited for until it answers; the rest must exit 0)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving import free_port, stop

pytest.importorskip("milvus_lite")
pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

DOC = Path(__file__).resolve().parent.parent / "docs" / "scale.md"


def commands():
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _until(check, timeout, what):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _answers(url):
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _milvus_answers(uri):
    from fashionrec.errors import FashionrecError
    from fashionrec.milvus import connect

    try:
        return connect(uri, timeout=2) is not None
    except FashionrecError:
        return False


def test_every_command_of_the_scale_doc_runs(tmp_path):
    import numpy as np
    from catalogs import CLASSES, draw_product, make_styles

    make_styles(tmp_path / "styles", n_per_class=5)
    photo = tmp_path / "new.png"
    draw_product(*CLASSES["Bags/Totes"], np.random.default_rng(1), (48, 48)).save(photo)
    env = {**os.environ, "MILVUS_PORT": str(free_port()), "CATALOG": "styles/styles.csv",
           "RUN": "run", "HOST": "127.0.0.1", "PORT_A": str(free_port()),
           "PORT_B": str(free_port()), "RAY_ADDRESS": "local", "PHOTO": str(photo),
           "FASHIONREC_API_KEY": "d0c", "FASHIONREC_MILVUS_TOKEN": "",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["MILVUS_URI"] = f"http://127.0.0.1:{env['MILVUS_PORT']}"
    a, b = (f"http://127.0.0.1:{env[p]}" for p in ("PORT_A", "PORT_B"))
    servers, ran = [], []

    def shell(line, background=False):
        argv = ["bash", "-c", ("exec " if background else "") + line]
        if background:
            proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            servers.append(proc)
            return proc
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, f"{line}\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def run_id():
        return json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]

    try:
        for line in commands():
            words = shlex.split(line)
            ran.append(words[:3])
            if words[:3] == ["python", "-m", "milvus_lite"]:
                shell(line.replace("python", shlex.quote(sys.executable), 1), True)
                _until(lambda: _milvus_answers(env["MILVUS_URI"]), 60, "Milvus Lite")
            elif words[:2] == ["fashionrec", "serve"]:
                shell(line, True)
                port = env[words[words.index("--port") + 1].lstrip("$")]
                _until(lambda p=port: _answers(f"http://127.0.0.1:{p}/api/ready"), 180,
                       f"serve on {port}")
            elif words[0] == "curl":
                answer = json.loads(shell(line))
                if "/api/items/n1/similar" in line:  # n1, added through A, is found
                    assert answer["query"]["id"] == "n1", answer  # through B
                    prices = [i.get("attributes", {}).get("price") for i in answer["items"]]
                    assert len(prices) == 3 and all(p < 40 for p in prices), answer
                else:
                    assert answer["n_added"] == 1, answer
            elif words[:2] == ["fashionrec", "train"] and "--store" not in words:
                before = run_id()
                shell(line)
                assert run_id() != before
                for url in (a, b):  # both replicas pick up the retrain
                    _until(lambda u=url: httpx.get(f"{u}/api/stats").json()["run"]["run_id"]
                           == run_id(), 120, f"{url} did not follow the retrain")
                    assert httpx.get(f"{url}/api/items/n1").json()["attributes"] == {
                        "price": 9.5}
            else:
                shell(line)
                if words[:2] == ["fashionrec", "index"]:
                    store = json.loads((tmp_path / "run" / "run.json").read_text()).get(
                        "store", {"kind": "file"})
                    assert store["kind"] == words[words.index("--store") + 1]
                    for url in (a, b):
                        _until(lambda u=url: httpx.get(f"{u}/api/items/n1/similar",
                                                       params={"k": 1}).status_code == 200,
                               60, f"{url} did not follow the move")
        assert ["fashionrec", "extract", "--catalog"] in ran and len(servers) == 3
    finally:
        for proc in servers[::-1]:
            stop(proc)
