"""The living index with a saved HNSW graph, and compaction: folded atomically, killed
at each step, read while it runs."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from fashionrec import CatalogIndex, FashionrecError
from fashionrec.search import ExactSearch, LiveSearch
from fashionrec.search.hnsw import HNSWSearch
from fashionrec.store import IndexStore

pytest.importorskip("faiss")
CLASSES = ["boots", "bags", "hats"]
SPEC = {"backend": "hnsw", "m": 8, "ef_construction": 40, "ef_search": 40,
        "filter_exact_max": 10}


def base_index(n=300, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, 8)) * 4
    emb = centers[np.arange(n) % 6] + rng.normal(size=(n, 8))
    return CatalogIndex(StandardScaler().fit_transform(emb), ids=[f"sku-{i}" for i in range(n)], labels=np.arange(n) % 3,
                              class_names=CLASSES, metadata={"run_id": "run-1"},
                              paths=[f"/shop/{i}.jpg" for i in range(n)])


def part(ids, index, seed=1):
    rng = np.random.default_rng(seed)
    return CatalogIndex(rng.normal(size=(len(ids), 8)).astype(np.float32), ids,
                        np.zeros(len(ids)), CLASSES, None,
                        paths=[f"/new/{i}.jpg" for i in ids])


@pytest.fixture
def store(tmp_path):
    index = base_index()
    index.backend = HNSWSearch.build(index.vectors, **{k: v for k, v in SPEC.items()
                                                      if k != "backend"})
    s = IndexStore(tmp_path / "index.h5")
    s.write_base(index)
    return s, index


def exact_answer(live, queries, k):
    return ExactSearch(np.asarray(live.vectors)).search(queries, k)


def test_the_saved_graph_is_named_in_the_manifest_and_used(store):
    s, index = store
    entry = s.manifest()["ann"]
    assert entry["run_id"] == "run-1" and entry["n"] == 300 and entry["m"] == 8
    assert (s.path.parent / entry["file"]).stat().st_size == entry["bytes"]
    messages = []
    live = s.load(SPEC, log=messages.append)
    assert isinstance(live.backend, HNSWSearch) and not messages  # loaded, not rebuilt
    assert isinstance(live.vectors, np.memmap)  # vectors mapped, not read
    rows, _ = live.search_rows(live.vectors[:5], k=4)
    assert np.array_equal(rows, exact_answer(live, live.vectors[:5], 4)[0])
    assert isinstance(s.load().backend, ExactSearch)  # the exact spec ignores the graph


def test_updates_are_searched_exactly_beside_the_graph_and_removed_never_return(store):
    s, index = store
    s.add(part(["new-1", "new-2"], index))
    s.remove([f"sku-{i}" for i in range(0, 300, 2)])
    live = s.load(SPEC)
    assert isinstance(live.backend, LiveSearch) and len(live) == 152
    row = live.row_of("new-2")
    rows, d = live.search_rows(live.vectors[[row]], k=1)
    assert rows[0, 0] == row and d[0, 0] == 0
    removed = index.vectors[0:300:2]
    rows, _ = live.search_rows(removed, k=5)
    returned = {live.ids[r] for r in rows.ravel()}
    assert not returned & {f"sku-{i}" for i in range(0, 300, 2)}
    # filters keep their meaning across graph and segments
    allowed = np.flatnonzero(live.labels == 0)
    rows, _ = live.search_rows(live.vectors[:3], k=10, allowed_rows=allowed)
    assert set(rows.ravel()) <= set(allowed)


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "stale", "other-params"])
def test_a_missing_stale_or_damaged_graph_is_rebuilt_not_trusted(store, damage):
    s, index = store
    m = s.manifest()
    graph = s.path.parent / m["ann"]["file"]
    if damage == "missing":
        graph.unlink()
    elif damage == "truncated":
        graph.write_bytes(graph.read_bytes()[:1000])
    elif damage == "garbage":  # same size, other vectors: reads, but is not this index's
        other = HNSWSearch.build(np.random.default_rng(5).normal(size=(300, 8)).astype(
            np.float32), 8, 40, 40)
        other.save(graph)
        s.manifest_path.write_text(json.dumps({**m, "ann": {**m["ann"],
                                                            "bytes": graph.stat().st_size}}))
    elif damage == "stale":
        s.manifest_path.write_text(json.dumps({**m, "ann": {**m["ann"], "base_id": "old"}}))
    else:
        s.manifest_path.write_text(json.dumps({**m, "ann": {**m["ann"], "m": 4}}))
    messages = []
    live = s.load(SPEC, log=messages.append)
    assert any("building it in memory over 300 items" in msg for msg in messages), messages
    rows, _ = live.search_rows(live.vectors[:5], k=3)
    assert np.array_equal(rows, exact_answer(live, live.vectors[:5], 3)[0])
    # a reader never writes a graph (a service and the CLI would overwrite each other's
    # choice): the manifest is as it was, and only `index` saves a sound graph
    assert s.manifest() == json.loads(s.manifest_path.read_text())
    again = []
    s.load(SPEC, log=again.append)
    assert any("building it in memory" in msg for msg in again), again
    s.build_graph(SPEC)
    quiet = []
    s.load(SPEC, log=quiet.append)
    assert quiet == []
    assert {f.name for f in s.segment_dir.iterdir()} == {s.manifest()["ann"]["file"].split("/")[1]}


def test_compact_folds_updates_into_a_fresh_base(store):
    s, index = store
    s.add(part(["new-1", "new-2", "new-3"], index))
    s.remove(["sku-0", "new-2"])
    before = s.load(SPEC)
    expected = sorted(before.ids.tolist())
    manifest = s.compact(SPEC)
    assert manifest["ops"] == [] and manifest["base"] == "index.h5"
    live = s.load(SPEC)
    assert sorted(live.ids.tolist()) == expected
    assert isinstance(live.backend, HNSWSearch) and live.backend.size == 301
    assert isinstance(live.vectors, np.memmap)  # loads like a freshly trained index
    header = CatalogIndex.read_header(s.path)
    assert sorted(header[0].tolist()) == expected and header[4] == manifest["base_id"]
    # only the new graph is left beside the base
    assert [f.name for f in s.segment_dir.iterdir()] == [manifest["ann"]["file"].split("/")[1]]
    np.testing.assert_array_equal(live.vectors[live.row_of("new-3")],
                                  before.vectors[before.row_of("new-3")])
    assert s.compact(SPEC)["generation"] == manifest["generation"]  # nothing left to fold


def test_concat_refuses_rows_out_of_range():
    index = base_index(10)
    with pytest.raises(FashionrecError, match="out of range"):
        CatalogIndex.concat([index], [np.array([0, 10])])
    with pytest.raises(FashionrecError, match="out of range"):
        index.take([-1])


def test_a_manifest_naming_another_base_is_refused(store):
    s, index = store
    s.remove(["sku-1"])
    base_index(300, seed=3).save(s.path)  # a foreign base put in place by hand
    with pytest.raises(FashionrecError, match="names a base index other than"):
        s.load(SPEC)
    with pytest.raises(FashionrecError, match="names a base index other than"):
        s.remove(["sku-2"])  # an update says so too, and changes nothing


# ------------------------------------------------------------- killed compaction
KILL_COMPACT = textwrap.dedent("""
    import os, signal, sys
    from fashionrec.store import IndexStore

    path, when, nth, spec = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    spec = {"backend": "hnsw", "m": 8, "ef_construction": 40, "ef_search": 40,
            "filter_exact_max": 10} if spec == "hnsw" else None
    calls = {"replace": 0, "unlink": 0}

    def dying(name, real):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            if when == "before-" + name and calls[name] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*args, **kwargs)
            if when == "after-" + name and calls[name] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapped

    os.replace = dying("replace", os.replace)
    from pathlib import Path
    Path.unlink = dying("unlink", Path.unlink)
    IndexStore(path).compact(spec)
    print("finished", calls, flush=True)
""")

# os.replace calls of a compaction with a graph: 1 the new base, 2 the graph, 3 the
# manifest naming them, 4 index.h5 (the hard link), 5 the manifest naming index.h5;
# Path.unlink: the mkstemp placeholder before the link, then the files left behind.
STEPS = [("before-replace", n) for n in range(1, 6)] + [("after-replace", n)
                                                        for n in range(1, 6)] + [
    ("after-unlink", 2), ("after-unlink", 3)]


@pytest.mark.parametrize("when,nth", STEPS)
def test_compaction_killed_at_each_step_leaves_the_old_or_the_new_index(store, when, nth):
    s, index = store
    s.add(part(["new-1", "new-2"], index))
    s.remove(["sku-5"])
    expected = sorted(s.load(SPEC).ids.tolist())
    proc = subprocess.run([sys.executable, "-c", KILL_COMPACT, str(s.path), when, str(nth),
                           "hnsw"], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr).decode()[-2000:]
    messages = []
    live = s.load(SPEC, log=messages.append)
    assert sorted(live.ids.tolist()) == expected  # the same products, whichever state
    assert not messages  # and never a graph that has to be rebuilt
    row = live.row_of("new-1")
    assert live.search_rows(live.vectors[[row]], k=1)[0][0, 0] == row
    # the next compaction finishes the job and removes what the killed one left
    final = s.compact(SPEC)
    assert final["ops"] == [] and final["base"] == "index.h5"
    assert sorted(s.load(SPEC).ids.tolist()) == expected
    assert {f.name for f in s.segment_dir.iterdir()} == {final["ann"]["file"].split("/")[1]}


READER = textwrap.dedent("""
    import sys
    from fashionrec.store import IndexStore

    store, n = IndexStore(sys.argv[1]), int(sys.argv[2])
    seen = set()
    for _ in range(n):
        live = store.load()
        ids = live.ids.tolist()
        assert len(ids) == len(set(ids)) == len(live.vectors)
        news = sorted(i for i in ids if i.startswith("new-"))
        # adds are published in order: the live new ids are always a prefix
        assert news == sorted(f"new-{j}" for j in range(len(news))), news
        assert len(ids) - len(news) == 300
        seen.add(len(news))
    print(len(seen), flush=True)
""")


def test_a_reader_never_sees_a_half_compacted_index(store):
    """One process loads the index over and over while this one adds products and
    compacts, again and again: every load is whole and consistent."""
    s, index = store
    reader = subprocess.Popen([sys.executable, "-c", READER, str(s.path), "150"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    j = 0
    while reader.poll() is None and j < 200:
        s.add(part([f"new-{j}"], index, seed=j))
        j += 1
        s.compact()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err.decode()[-2000:]
    assert int(out) >= 2  # it saw several states
    assert os.listdir(s.segment_dir) == [] or all(
        f.startswith("ann-") for f in os.listdir(s.segment_dir))


def test_a_sound_graph_with_poor_recall_is_trusted_not_rebuilt(tmp_path):
    """The integrity check reads the graph's stored vectors; it does not ask the graph
    to find them (an approximate graph on hard data may not)."""
    rng = np.random.default_rng(0)
    index = CatalogIndex(rng.standard_normal((400, 64)).astype(np.float32), np.arange(400),
                         np.zeros(400), CLASSES, None,
                         metadata={"run_id": "run-1"})
    spec = {**SPEC, "m": 2, "ef_construction": 2, "ef_search": 2}
    index.backend = HNSWSearch.build(index.vectors, 2, 2, 2)
    s = IndexStore(tmp_path / "index.h5")
    s.write_base(index)
    messages = []
    assert isinstance(s.load(spec, log=messages.append).backend, HNSWSearch)
    assert messages == []
