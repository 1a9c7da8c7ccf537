"""The catalog store contract, the same assertions for both stores: the file store
(:class:`fashionrec.store.IndexStore`) and Milvus (:class:`fashionrec.milvus.MilvusStore`,
against a Milvus Lite server this module starts on 127.0.0.1). Add, remove, generation,
filters, exactly k, and reads while writes go on; then Milvus' alias switch."""

import json
import math
import threading
import time
import uuid

import numpy as np
import pytest
from serving import free_port, milvus_lite, stop

from fashionrec import FashionrecError, queries
from fashionrec import attributes as attrs
from fashionrec.index import CatalogIndex
from fashionrec.store import IndexStore

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

N, DIM = 240, 16
NAMES = ("Boots", "Sandals", "Totes")
SCHEMA = {"gender": "string", "price": "float", "year": "integer", "in_stock": "boolean"}


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    """A Milvus Lite server on 127.0.0.1 (stopped at the end)."""
    proc, uri = milvus_lite(tmp_path_factory.mktemp("milvus"), free_port())
    yield uri
    stop(proc)


def catalog(seed=0, n=N, start=0):
    """``(index, raw)``: clustered vectors by class, attributes with missing values;
    ``raw`` is the test's own copy of everything, to compute expected answers from."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(NAMES), n)
    centres = rng.normal(size=(len(NAMES), DIM)) * 3
    vectors = (centres[labels] + rng.normal(size=(n, DIM))).astype(np.float32)
    ids = [f"p{start + i:05d}" for i in range(n)]
    raw = {"gender": [("Women", "Men", "")[i % 3] for i in range(n)],
           "price": [f"{(i * 37) % 100 + 0.5}" if i % 7 else "" for i in range(n)],
           "year": [str(2010 + i % 9) for i in range(n)],
           "in_stock": [("true", "false")[i % 2] for i in range(n)]}
    categories = [f"Shoes/{NAMES[lab]}/brand{i % 4}" for i, lab in enumerate(labels)]
    index = CatalogIndex(vectors, ids, labels, NAMES, categories=categories,
                         paths=[""] * n, schema=SCHEMA,
                         attributes=attrs.columns(SCHEMA, raw, n))
    return index, {"vectors": vectors, "ids": ids, "labels": labels, "raw": raw,
                   "categories": categories}


@pytest.fixture(params=["file", "milvus"])
def store(request, tmp_path):
    """``(store, raw)`` of a fresh store holding :func:`catalog`."""
    index, raw = catalog()
    if request.param == "file":
        s = IndexStore(tmp_path / "index.h5")
        s.write_base(index)
    else:
        from fashionrec.milvus import MilvusStore

        uri = request.getfixturevalue("milvus_uri")
        s = MilvusStore(uri, f"c_{uuid.uuid4().hex[:10]}", NAMES, SCHEMA, "str")
        s.publish(index)
    return s, raw


def nearest(store, vector, k, **filters):
    snap = store.snapshot()  # a request's snapshot (the service takes one per request)
    result = queries.nearest(snap, NAMES, {"kind": "vector"}, vector[None], 0, None, None, k,
                             **filters)
    return [i.id for i in result.items], result


def expected(raw, vector, k, keep):
    d = np.sqrt(((raw["vectors"] - vector) ** 2).sum(1))
    rows = [r for r in np.argsort(d, kind="stable") if keep(r)]
    return [raw["ids"][r] for r in rows[:k]]


def test_unfiltered_answers_are_the_exact_nearest(store):
    s, raw = store
    for q in (0, 17, 101):
        ids, result = nearest(s, raw["vectors"][q], 8)
        assert ids == expected(raw, raw["vectors"][q], 8, lambda r: True)
        assert ids[0] == raw["ids"][q] and result.items[0].distance == pytest.approx(0, abs=1e-3)


@pytest.mark.parametrize("where,keep", [
    ('gender == "Women" and price < 50',
     lambda raw, r: raw["raw"]["gender"][r] == "Women" and raw["raw"]["price"][r] != ""
     and float(raw["raw"]["price"][r]) < 50),
    ('not (price >= 30) or in_stock == false',  # missing prices match the not
     lambda raw, r: not (raw["raw"]["price"][r] != "" and float(raw["raw"]["price"][r]) >= 30)
     or raw["raw"]["in_stock"][r] == "false"),
    ('year in [2011, 2015] and gender != "Men"',
     lambda raw, r: raw["raw"]["year"][r] in ("2011", "2015") and raw["raw"]["gender"][r] != "Men"),
])
def test_filters_answer_exactly_k_of_the_matching(store, where, keep):
    s, raw = store
    vector = raw["vectors"][5]
    n_match = sum(keep(raw, r) for r in range(N))
    for k in (5, n_match):
        ids, result = nearest(s, vector, k, where=where)
        assert ids == expected(raw, vector, k, lambda r: keep(raw, r))
        assert len(ids) == k and result.query["n_candidates"] == n_match
    ids, _ = nearest(s, vector, 6, where=where, category="boots", same_class=True)
    assert ids == expected(raw, vector, 6, lambda r: keep(raw, r) and raw["labels"][r] == 0)


def test_category_matches_whole_levels(store):
    s, raw = store
    ids, result = nearest(s, raw["vectors"][3], 400, category="Sandals/brand1")
    want = [i for i, c in zip(raw["ids"], raw["categories"], strict=True)
            if c.lower().startswith("shoes/sandals/brand1")]
    assert sorted(ids) == sorted(want) and result.query["n_candidates"] == len(want)
    with pytest.raises(FashionrecError, match="no other catalog item is in category brand"):
        nearest(s, raw["vectors"][3], 3, category="brand")  # a part of a level: no match


def test_add_remove_and_generation(store):
    s, raw = store
    g0 = s.generation()
    new, new_raw = catalog(seed=9, n=4, start=90000)
    s.add(new)
    g1 = s.generation()
    assert g1 > g0
    ids, result = nearest(s, new_raw["vectors"][2], 1)
    assert ids == ["p90002"]
    assert result.items[0].attributes == attrs.row(SCHEMA, new.attributes, 2)
    with pytest.raises(FashionrecError, match="1 id.s. already in the index, e.g. 'p90001'"):
        s.add(new.take([1]))
    assert s.generation() == g1 and len(s.snapshot()) == N + 4
    s.remove(["p90002", "p00000"])
    assert s.generation() > g1 and len(s.snapshot()) == N + 2
    assert nearest(s, new_raw["vectors"][2], 1)[0] != ["p90002"]
    with pytest.raises(FashionrecError, match="1 id.s. not in the index, e.g. 'nope'; nothing was removed"):
        s.remove(["p00001", "nope"])  # all or nothing
    assert len(s.snapshot()) == N + 2
    assert "p00001" in nearest(s, raw["vectors"][1], 1)[0]


def test_reads_during_writes_see_whole_states(store):
    s, raw = store
    vector, stop, seen, errors = raw["vectors"][7], threading.Event(), [], []

    def read():
        while not stop.is_set():
            try:
                ids, result = nearest(s, vector, 5, where="in_stock == true")
                seen.append(len(ids))
                assert all(i.attributes.get("in_stock") is True for i in result.items)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for b in range(4):
            part, _ = catalog(seed=20 + b, n=10, start=50000 + 10 * b)
            s.add(part)
            s.remove([f"p{50000 + 10 * b}"])
    finally:
        stop.set()
        reader.join(timeout=60)
    assert not errors and seen and set(seen) == {5}
    assert len(s.snapshot()) == N + 36


def test_milvus_publish_switches_the_alias_whole(milvus_uri):
    from fashionrec.milvus import MilvusStore, public_uri

    old, _ = catalog(seed=1)
    new, _ = catalog(seed=2, n=60, start=70000)
    s = MilvusStore(milvus_uri, f"c_{uuid.uuid4().hex[:10]}", NAMES, SCHEMA, "str")
    first = s.publish(old)
    stop, kinds, errors = threading.Event(), set(), []

    def read():
        while not stop.is_set():
            try:
                snap = s.snapshot()
                total, items = queries.browse(snap, 0, 500)
                starts = {str(i.id)[:2] for i in items}
                assert len(starts) == 1 and total == len(items)
                kinds.add((starts.pop(), total))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        time.sleep(0.3)
        second = s.publish(new)
        time.sleep(0.3)
    finally:
        stop.set()
        reader.join(timeout=60)
    assert not errors
    assert kinds <= {("p0", N), ("p7", 60)} and ("p7", 60) in kinds
    assert s.current() == second != first
    record = s.describe()
    assert record["uri"] == public_uri(milvus_uri) and record["index"]["type"] == "HNSW"


def test_milvus_broad_filters_widen_hnsw_then_rank_exactly(milvus_uri, monkeypatch):
    """Past :data:`EXACT_MAX` matches a filter is searched in HNSW with ``ef`` widened
    by its share, then four-fold while the answer is short; short still at ``EF_MAX``
    (a filter far from the query), every match is ranked exactly, page by page. The
    catalog here is small, so the thresholds are lowered and HNSW's short answers to a
    far filter are imitated by keeping half of what the server answers."""
    from fashionrec import milvus

    index, raw = catalog()
    s = milvus.MilvusStore(milvus_uri, f"c_{uuid.uuid4().hex[:10]}", NAMES, SCHEMA, "str")
    s.publish(index)
    monkeypatch.setattr(milvus, "EXACT_MAX", 0)
    monkeypatch.setattr(milvus, "EF_MAX", 1024)
    monkeypatch.setattr(milvus, "BATCH", 7)  # several pages
    real, efs = milvus.MilvusCatalog._search, []

    def search(self, vector, k, expression, ef):
        efs.append(ef)
        return real(self, vector, k, expression, ef)
    monkeypatch.setattr(milvus.MilvusCatalog, "_search", search)
    vector = raw["vectors"][int(np.flatnonzero(raw["labels"] == 0)[0])]
    totes = lambda r: raw["labels"][r] == 2  # noqa: E731
    n_totes = int(sum(totes(r) for r in range(N)))
    ids, _ = nearest(s, vector, 12, category="Totes")
    assert ids == expected(raw, vector, 12, totes)
    assert efs == [math.ceil(milvus.EF_SEARCH * N / n_totes)]  # widened by 1 / share

    efs.clear()
    monkeypatch.setattr(milvus.MilvusCatalog, "_search",
                        lambda self, *a: search(self, *a)[: a[1] // 2])  # short answers
    ids, _ = nearest(s, vector, 12, category="Totes")
    assert ids == expected(raw, vector, 12, totes) and len(ids) == 12
    assert efs[-1] == 1024 and all(b == min(a * 4, 1024) for a, b in zip(efs[:-1], efs[1:], strict=True))


def test_milvus_unreachable_is_one_line(tmp_path):
    from fashionrec.milvus import MilvusStore

    port = free_port()
    with pytest.raises(FashionrecError) as err:
        MilvusStore(f"http://user:secret@127.0.0.1:{port}", "c_x", NAMES)
    message = str(err.value)
    assert message.startswith(f"Milvus at http://127.0.0.1:{port} is unreachable")
    assert "secret" not in message and "\n" not in message


def test_a_run_moves_into_milvus_and_back(milvus_uri, tmp_path, capsys, monkeypatch):
    """The CLI: `index --store milvus` copies a trained run's catalog into Milvus, the
    run then reads and writes there (a second reader sees a write at once), and
    `index --store file` brings it back, the added product and its attributes too."""
    from catalogs import CLASSES, draw_product, make_styles

    from fashionrec import Recommender
    from fashionrec.cli import main

    rows = make_styles(tmp_path / "styles", n_per_class=6)
    run = tmp_path / "run"
    assert main(["train", "--catalog", str(tmp_path / "styles/styles.csv"), "--label-column",
                 "articleType", "--image-size", "32", "--weights", "none", "--epochs", "2",
                 "--run-dir", str(run), "--no-progress"]) == 0
    where = 'gender == "Women" and price < 60'
    before = Recommender.load(run).recommend(item="101", k=4, where=where, with_image=False)
    monkeypatch.setenv("FASHIONREC_MILVUS_TOKEN", "")
    uri = milvus_uri.replace("http://", "http://someone:secret@")
    capsys.readouterr()
    assert main(["index", "--run-dir", str(run), "--store", "milvus", "--milvus-uri", uri,
                 "--collection", "shop", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"index: {len(rows)} items in Milvus {milvus_uri}, collection shop" in out
    record = json.loads((run / "run.json").read_text())["store"]
    assert record["uri"] == milvus_uri and "secret" not in json.dumps(record)
    assert record["collection"] == "shop" and record["index"]["type"] == "HNSW"

    a, b = Recommender.load(run), Recommender.load(run)  # two readers
    assert getattr(a.index_, "remote", False)
    after = a.recommend(item="101", k=4, where=where, with_image=False)
    assert [i.id for i in after.items] == [i.id for i in before.items]
    assert [i.attributes for i in after.items] == [i.attributes for i in before.items]
    img = tmp_path / "new.png"
    draw_product(*CLASSES["Bags/Totes"], np.random.default_rng(3), (48, 48)).save(img)
    assert main(["add", "--run-dir", str(run), "--image", str(img), "--id", "777",
                 "--attr", "price=1.5", "--attr", "gender=Women", "--no-progress"]) == 0
    found = b.recommend(item="101", k=1, where="price < 2", with_image=False)
    assert [(i.id, i.attributes) for i in found.items] == [
        ("777", {"price": 1.5, "gender": "Women"})]
    gone = next(r["id"] for r in rows if r["id"] not in {i.id for i in before.items} | {"101"})
    a.remove([gone])
    assert b.index_.record(gone) is None and len(b.index_) == len(rows)
    # a retrain publishes into Milvus: a new collection behind the alias, named in
    # run.json with the new model; the added product is carried over (re-embedded from
    # its picture), the removed one stays removed
    assert main(["train", "--catalog", str(tmp_path / "styles/styles.csv"), "--label-column",
                 "articleType", "--image-size", "32", "--weights", "none", "--epochs", "2",
                 "--run-dir", str(run), "--no-progress", "--seed", "3"]) == 0
    retrained = json.loads((run / "run.json").read_text())
    assert retrained["store"]["collection"] == "shop"
    assert retrained["store"]["current"] != record["current"]
    c = Recommender.load(run)
    assert c.index_.collection == retrained["store"]["current"] != a.index_.collection
    assert len(c.index_) == len(rows) and c.index_.record(gone) is None
    assert c.item("777").attributes == {"price": 1.5, "gender": "Women"}
    assert a.index_.record("777") is not None  # a reader of the old version: whole
    assert not np.allclose(c.index_.record("101", vector=True)["vector"],
                           a.index_.record("101", vector=True)["vector"])

    assert main(["index", "--run-dir", str(run), "--store", "file", "--no-progress"]) == 0
    assert "store" not in json.loads((run / "run.json").read_text())
    back = Recommender.load(run)
    assert not getattr(back.index_, "remote", False) and len(back.index_) == len(rows)
    assert back.item("777").attributes == {"price": 1.5, "gender": "Women"}
    again = back.recommend(item="101", k=4, where=where, with_image=False)
    in_milvus = c.recommend(item="101", k=4, where=where, with_image=False)
    assert [i.id for i in again.items] == [i.id for i in in_milvus.items]


def test_an_embedded_milvus_lite_file_answers_the_same(tmp_path):
    """A ``.db`` URI: Milvus Lite inside this process, the same code."""
    from fashionrec.milvus import MilvusStore

    index, raw = catalog(seed=4, n=80)
    s = MilvusStore(tmp_path / "shop.db", "shop", NAMES, SCHEMA, "str")
    s.publish(index)
    assert s.describe()["uri"] == str((tmp_path / "shop.db").resolve())
    where = 'in_stock == true and gender != "Men"'
    ids, _ = nearest(s, raw["vectors"][4], 5, where=where)
    assert ids == expected(raw, raw["vectors"][4], 5, lambda r: raw["raw"]["in_stock"][r] ==
                           "true" and raw["raw"]["gender"][r] != "Men")


def test_train_into_milvus_is_checked_before_training(tmp_path, capsys):
    """`train --store milvus`: a dataset run, a missing option or an unreachable server
    is one line, before any training (nothing is written)."""
    from fashionrec.cli import main

    run = tmp_path / "run"
    port = free_port()
    cases = [
        (["--store", "milvus", "--milvus-uri", "x.db", "--collection", "c"],
         "--store milvus keeps product catalogs (--catalog)"),
        (["--catalog", str(tmp_path), "--store", "milvus", "--collection", "c"],
         "--store milvus needs --milvus-uri and --collection"),
        (["--catalog", str(tmp_path), "--store", "milvus", "--collection", "c",
          "--milvus-uri", f"http://127.0.0.1:{port}"],
         f"Milvus at http://127.0.0.1:{port} is unreachable"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(["train", "--run-dir", str(run), "--no-progress", *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
        assert not run.exists()


def test_milvus_writes_meet_a_publish_and_are_never_lost(milvus_uri):
    """A write that arrives while a retrain is being published waits for it and is then
    redone on the new version; one that was under way as the publish began is carried
    over by it and stands (not redone, not lost)."""
    from fashionrec.milvus import MilvusStore
    from fashionrec.rundir import StaleVersion

    old, _ = catalog(seed=1, n=40)
    alias = f"c_{uuid.uuid4().hex[:10]}"
    s = MilvusStore(milvus_uri, alias, NAMES, SCHEMA, "str")
    first = s.publish(old)
    retired = threading.Event()

    def guard():
        if retired.is_set():
            raise StaleVersion("retired")
    writer = s.pinned(first)
    writer.guard = guard
    part, _ = catalog(seed=2, n=2, start=90000)

    def republish():
        """What a retrain's publish does under its flag: catch up, build, switch."""
        new = s.pinned(first).load()  # the old catalog as it is now, writes included
        name = s.build(new)
        s.switch(name)
        retired.set()
        return name

    # 1. under way: the publish begins between the insert and the write's end
    note = writer._note

    def begins_now(*args):
        note(*args)
        if args[0] == "added" and not retired.is_set():
            flag.__enter__()
            threading.Thread(target=finish).start()

    def finish():
        time.sleep(0.5)
        finish.name = republish()
        flag.__exit__(None, None, None)
    flag = s.publishing()
    writer._note = begins_now
    writer.add(part)  # waits for the publish, finds its products carried over: stands
    assert s.snapshot().collection == finish.name
    assert all(s.snapshot().record(i) is not None for i in part.ids.tolist())

    # 2. arriving during a publish: waits, then redone on the new version
    retired.clear()
    writer._note = note
    late, _ = catalog(seed=3, n=1, start=95000)
    with s.publishing():
        out = []
        t = threading.Thread(target=lambda: out.append(_raises(writer.add, late)))
        t.start()
        time.sleep(0.5)
        assert t.is_alive()  # waiting
        republish()
    t.join(timeout=30)
    assert isinstance(out[0], StaleVersion)
    assert s.snapshot().record(late.ids.tolist()[0]) is None  # nothing half-done


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return exc
    return None
