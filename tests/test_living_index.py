"""The living index: add and remove without rewriting, and a process killed
mid-update leaves the index loadable in its old or its new state."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fashionrec import CatalogIndex, FashionrecError
from fashionrec.store import IndexStore

CLASSES = ["boots", "bags", "hats"]


def base_index(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return CatalogIndex(
        rng.normal(size=(n, 4)), ids=[f"sku-{i}" for i in range(n)], labels=np.arange(n) % 3,
        class_names=CLASSES, metadata={"run_id": "run-1"},
        paths=[f"/shop/{i}.jpg" for i in range(n)], categories=["Shoes/Boots"] * n)


def part(ids, index, seed=1):
    rng = np.random.default_rng(seed)
    return CatalogIndex(rng.normal(size=(len(ids), 4)), ids, np.zeros(len(ids)), CLASSES,
                        None, paths=[f"/new/{i}.jpg" for i in ids],
                        categories=["New"] * len(ids))


@pytest.fixture
def store(tmp_path):
    index = base_index()
    index.save(tmp_path / "index.h5")
    return IndexStore(tmp_path / "index.h5"), index


def test_string_ids_and_optional_columns_round_trip(store):
    s, index = store
    loaded = s.load()
    assert loaded.ids.tolist() == index.ids.tolist() and loaded.id_kind == "str"
    assert loaded.paths[3] == "/shop/3.jpg" and loaded.category_of(3) == "Shoes/Boots"
    assert loaded.row_of("sku-5") == 5 and loaded.row_of(5) is None
    np.testing.assert_array_equal(loaded.vectors, index.vectors)


def test_add_remove_readd_without_rewriting_the_base(store):
    s, index = store
    before = s.path.stat()
    s.add(part(["new-1", "new-2"], index))
    s.remove(["sku-0", "new-1"])
    s.add(part(["sku-0"], index, seed=7))  # a removed id may come back
    live = s.load()
    assert sorted(live.ids.tolist()) == sorted(
        [f"sku-{i}" for i in range(1, 12)] + ["new-2", "sku-0"])
    assert live.paths[live.row_of("sku-0")] == "/new/sku-0.jpg"
    assert live.metadata["generation"] == 3 and live.metadata["run_id"] == "run-1"
    after = s.path.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    manifest = json.loads(s.manifest_path.read_text())
    assert [op["op"] for op in manifest["ops"]] == ["add", "remove", "add"]
    # search finds an added item by its own vector
    row = live.row_of("new-2")
    rows, d = live.search_rows(live.vectors[[row]], k=1)
    assert rows[0, 0] == row and d[0, 0] == 0


def test_bad_updates_change_nothing(store):
    s, index = store
    with pytest.raises(FashionrecError, match="already in the index"):
        s.add(part(["sku-3"], index))
    with pytest.raises(FashionrecError, match="not in the index.*nothing was removed"):
        s.remove(["sku-1", "nope"])
    assert not s.manifest_path.exists() and len(s.load()) == 12
    other = CatalogIndex(np.zeros((1, 4)), ["x"], [0], ["a", "b", "c"])
    with pytest.raises(FashionrecError, match="another model"):
        s.add(other)


def test_damaged_or_foreign_updates_are_refused(store):
    s, index = store
    s.add(part(["new-1"], index))
    seg = next(s.segment_dir.iterdir())
    manifest = json.loads(s.manifest_path.read_text())
    s.manifest_path.write_text(json.dumps({**manifest, "run_id": "run-2"}))
    with pytest.raises(FashionrecError, match="belongs to another run"):
        s.load()
    s.manifest_path.write_text(json.dumps({**manifest, "ops": [{"op": "add"}]}))
    with pytest.raises(FashionrecError, match="is damaged; deleting it"):
        s.load()
    s.manifest_path.write_text(json.dumps(manifest))
    seg.unlink()
    with pytest.raises(FashionrecError, match="is missing; the index is damaged"):
        s.load()


def test_concurrent_updates_are_locked_out(store):
    s, index = store
    import fcntl

    with open(s.lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(FashionrecError, match="being updated by another process"):
            s.remove(["sku-1"])
    s.remove(["sku-1"])


# ------------------------------------------------------------- killed updates
KILL_AT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from fashionrec import CatalogIndex
    from fashionrec.store import IndexStore

    path, when, what = sys.argv[1], sys.argv[2], sys.argv[3]
    real_replace = os.replace

    def dying_replace(src, dst):  # SIGKILL ourselves at one exact point of the update
        if when == "before-rename" and os.path.basename(dst).startswith(what):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
        if when == "after-rename" and os.path.basename(dst).startswith(what):
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = dying_replace
    store = IndexStore(path)
    index = store.load()
    if sys.argv[4] == "add":
        store.add(CatalogIndex(np.ones((3, 4)), ["n1", "n2", "n3"], [0, 1, 2],
                               index.class_names))
    else:
        store.remove(["sku-1", "sku-2"])
""")


@pytest.mark.parametrize("when,what,op,applied", [
    ("before-rename", "seg-", "add", False),       # segment written, not yet named
    ("after-rename", "seg-", "add", False),        # segment in place, manifest not yet
    ("before-rename", "index.manifest", "add", False),  # new manifest written, not renamed
    ("after-rename", "index.manifest", "add", True),    # manifest replaced: update done
    ("before-rename", "index.manifest", "remove", False),
])
def test_killed_mid_update_leaves_old_or_new_state(store, when, what, op, applied):
    s, index = store
    s.add(part(["new-1"], index))  # a manifest already exists: it must survive
    before = sorted(s.load().ids.tolist())
    proc = subprocess.run([sys.executable, "-c", KILL_AT, str(s.path), when, what, op],
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    live = s.load()
    ids = sorted(live.ids.tolist())
    if not applied:
        assert ids == before
    else:
        assert ids == sorted(before + ["n1", "n2", "n3"])
    rows, _ = live.search_rows(live.vectors[:1], k=3)  # and it answers queries
    assert rows.shape == (1, 3)
    # the next update cleans up what the killed one left behind, and works
    s.remove(["sku-5"])
    named = {op["file"].split("/")[-1] for op in s.manifest()["ops"] if op["op"] == "add"}
    assert {f.name for f in s.segment_dir.iterdir()} == named
    assert "sku-5" not in s.load().ids.tolist()


UPDATER = textwrap.dedent("""
    import sys
    import numpy as np
    from fashionrec import CatalogIndex
    from fashionrec.store import IndexStore

    store = IndexStore(sys.argv[1])
    index = store.load()
    for step in range(int(sys.argv[2]), 10_000):
        if step % 3 == 2:
            store.remove([f"s{step - 2}-0"])
        else:
            store.add(CatalogIndex(np.full((50, 4), step, float),
                                   [f"s{step}-{j}" for j in range(50)], np.zeros(50),
                                   index.class_names))
        print(step, flush=True)
""")


def expected_ids(n_ops):
    """The live ids after the first ``n_ops`` operations of UPDATER."""
    ids = {f"sku-{i}" for i in range(12)}
    for step in range(n_ops):
        if step % 3 == 2:
            ids.discard(f"s{step - 2}-0")
        else:
            ids |= {f"s{step}-{j}" for j in range(50)}
    return sorted(ids)


def test_killed_at_random_moments_the_index_is_always_a_prefix(store):
    """SIGKILL a process that updates the index non-stop, at several moments;
    every time the index loads and holds exactly the state after its last
    published operation."""
    s, _ = store
    rng = np.random.default_rng(0)
    for _ in range(4):
        start = s.manifest()["generation"]
        proc = subprocess.Popen([sys.executable, "-c", UPDATER, str(s.path), str(start)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout.readline()  # it is updating now
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        live = s.load()
        generation = live.metadata["generation"]
        assert generation > start
        assert sorted(live.ids.tolist()) == expected_ids(generation)
