"""A recommender trained on a product catalog: recommend by item id, by a new image,
within a class or category; add and remove products; fresh-process round trips;
a process killed mid-update."""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from catalogs import CLASSES, draw_product, make_csv_catalog, make_folder_catalog
from conftest import TINY_MODEL
from models import same_answers

from fashionrec import FashionrecError, Recommender
from fashionrec import images as images_module
from fashionrec.artifacts import read_json
from fashionrec.catalog import Catalog, verify_image
from fashionrec.cli import main
from fashionrec.rundir import RunDir

BOOT = "Shoes/Boots/brand1/001.png"


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A tiny folder catalog, trained once and saved; returns (Recommender, run_dir, root)."""
    root = tmp_path_factory.mktemp("shop") / "folder"
    make_folder_catalog(root)
    run_dir = tmp_path_factory.mktemp("shop-run")
    catalog = Catalog.from_folder(root, label_depth=2)
    rec = Recommender(**TINY_MODEL).fit_catalog(catalog, min_class_size=5,
                                          cache_dir=run_dir / "features", progress=False,
                                          log=None)
    rec.save(run_dir)
    return rec, run_dir, root


@pytest.fixture
def shop_copy(shop, tmp_path):
    """A private copy of the trained shop run, free to be updated."""
    _, run_dir, root = shop
    shutil.copytree(run_dir, tmp_path / "run")
    return Recommender.load(tmp_path / "run"), tmp_path / "run", root


def new_image(tmp_path, name, cls="Shoes/Boots", seed=5, mode="RGB"):
    shape, colour = CLASSES[cls]
    path = tmp_path / name
    draw_product(shape, colour, np.random.default_rng(seed), (70, 45), mode).save(path)
    return path


def test_run_records_the_catalog_and_its_report(shop):
    rec, run_dir, root = shop
    meta = read_json(run_dir / "run.json")
    assert meta["config"]["dataset"] == "catalog" and meta["config"]["n_reco"] == 24
    assert meta["dataset"]["kind"] == "catalog"
    assert meta["dataset"]["source"] == {"layout": "folder", "root": str(root.resolve()),
                                         "label_depth": 2}
    assert meta["dataset"]["class_names"] == sorted(CLASSES)
    assert len(meta["dataset"]["content_sha256"]) == 64
    assert 0 <= meta["head_val_accuracy"] <= 1
    report = read_json(RunDir(run_dir).current().report)
    assert report["n_ok"] == 24 and report["small_classes"] == {"Hats/Caps": 2}
    assert {s["kind"] for s in report["skipped"]} == {
        "unreadable image", "not an image file", "no class folder", "class too small"}
    assert len(rec.index_) == 24 and rec.index_.id_kind == "str"


def test_recommend_by_item_id(shop):
    rec, _, _ = shop
    result = rec.recommend(item=BOOT, k=5)
    assert result.query["kind"] == "item" and result.query["true_class"] == "Shoes/Boots"
    ids = [i.id for i in result.items]
    assert BOOT not in ids and len(ids) == 5 and all(isinstance(i, str) for i in ids)
    dists = [i.distance for i in result.items]
    assert dists == sorted(dists)
    assert all(i.path and i.category for i in result.items)
    assert result.image.shape == (160, 160, 3)
    with pytest.raises(FashionrecError, match="not in the catalog"):
        rec.recommend(item="Shoes/Boots/nope.jpg")
    with pytest.raises(FashionrecError, match="either a query"):
        rec.recommend(3, item=BOOT)
    with pytest.raises(FashionrecError, match="no test split"):
        rec.recommend(3)


def test_an_item_queried_by_its_image_finds_itself_first(shop):
    rec, _, root = shop
    result = rec.recommend(str(root / BOOT), k=3)
    assert result.query["kind"] == "file" and result.query["predicted_class"] in CLASSES
    # ~0, not exactly: the catalog was embedded in batches, the query alone
    assert result.items[0].id == BOOT and result.items[0].distance < 0.05


def test_new_product_image_within_class_or_category(shop, tmp_path):
    rec, _, _ = shop
    path = new_image(tmp_path, "new-boot.jpg", mode="RGB")
    same = rec.recommend(str(path), k=50, same_class=True)
    pred = same.query["predicted_class"]
    assert same.items and all(i.class_name == pred for i in same.items)
    assert len(same.items) == same.query["n_candidates"] == 8  # fewer than k: all of them
    bags = rec.recommend(str(path), k=4, category="bags")
    assert all(i.category.startswith("Bags/") for i in bags.items) and len(bags.items) == 4
    brand = rec.recommend(item=BOOT, k=30, category="brand1")
    assert len(brand.items) == 11 and all("/brand1" in i.category for i in brand.items)
    with pytest.raises(FashionrecError, match="no other catalog item is in category Hats"):
        rec.recommend(str(path), category="Hats")


ROUND_TRIP = textwrap.dedent("""
    import json, sys
    from fashionrec import Recommender
    rec = Recommender.load(sys.argv[1])
    out = {"item": [(i.id, round(i.distance, 4)) for i in rec.recommend(item=sys.argv[2]).items],
           "image": [(i.id, round(i.distance, 4)) for i in rec.recommend(sys.argv[3]).items]}
    print(json.dumps(out))
""")


def same_run_answers(there, here):
    """The same products in the same order, the same distances up to float32 rounding
    (a fresh process of an OpenVINO run computes its head in NumPy, not Keras: 1e-4)."""
    assert there.keys() == here.keys()
    same_answers(there, here, here, atol=2e-4, rtol=1e-5)


def test_round_trip_in_a_fresh_process(shop, tmp_path):
    rec, run_dir, root = shop
    query = new_image(tmp_path, "q.png", "Bags/Totes", mode="RGBA")
    here = {"item": [[i.id, round(i.distance, 4)] for i in rec.recommend(item=BOOT).items],
            "image": [[i.id, round(i.distance, 4)] for i in rec.recommend(str(query)).items]}
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(run_dir), BOOT, str(query)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    same_run_answers(json.loads(proc.stdout.strip().splitlines()[-1]), here)


def test_add_then_remove_then_query(shop_copy, tmp_path, monkeypatch):
    rec, run_dir, _ = shop_copy
    base_size = RunDir(run_dir).current().index.stat().st_size
    paths = [new_image(tmp_path, "a.jpg", seed=11), new_image(tmp_path, "b.png", "Bags/Totes"),
             new_image(tmp_path, "c.webp", seed=12)]
    broken = tmp_path / "d.jpg"
    broken.write_bytes(b"\xff\xd8\xff nope")
    cut = tmp_path / "e.jpg"  # a header that reads, data that does not decode
    whole = new_image(tmp_path, "e-whole.jpg", seed=13).read_bytes()
    cut.write_bytes(whole[:whole.index(b"\xff\xda") + 20])  # cut just after start of scan
    verify_image(cut, decode=False)  # passes the header check: the extractor reports it
    catalog = Catalog.from_files(paths + [broken, cut],
                                 ids=["new-a", "new-b", "new-c", "new-d", "new-e"],
                                 labels=["Shoes/Boots", None, "Shoes/Wellies", None, None])
    decoded = []
    real_decode = images_module._decode
    monkeypatch.setattr(images_module, "_decode", lambda data, p, *a: decoded.append(Path(p).name)
                        or real_decode(data, p, *a))
    report = rec.add(catalog, progress=False, log=None)
    monkeypatch.undo()
    # each new product is decoded once, for all its views, and only if it is to be added
    assert sorted(decoded) == ["a.jpg", "b.png", "e.jpg"]
    assert report["n_added"] == 2
    assert {a["id"]: a["class_from"] for a in report["added"]} == {"new-a": "catalog",
                                                                  "new-b": "predicted"}
    assert {s["id"]: s["kind"] for s in report["skipped"]} == {
        "new-c": "unknown class", "new-d": "unreadable image", "new-e": "unreadable image"}
    assert len(rec.index_) == 26 and RunDir(run_dir).current().index.stat().st_size == base_size
    # the new product is found by its own image and can be a query itself
    assert rec.recommend(str(paths[0]), k=1).items[0].id == "new-a"
    assert "new-a" not in [i.id for i in rec.recommend(item="new-a", k=25).items]
    rec.remove(["new-a", BOOT], log=None)
    assert len(rec.index_) == 24
    for result in (rec.recommend(str(paths[0]), k=24), rec.recommend(item="new-b", k=23)):
        assert not {"new-a", BOOT} & {i.id for i in result.items}
    fresh = Recommender.load(run_dir)
    assert sorted(fresh.index_.ids.tolist()) == sorted(rec.index_.ids.tolist())
    here = {"item": [[i.id, round(i.distance, 4)] for i in rec.recommend(item="new-b").items],
            "image": [[i.id, round(i.distance, 4)] for i in rec.recommend(str(paths[0])).items]}
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(run_dir), "new-b",
                           str(paths[0])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    same_run_answers(json.loads(proc.stdout.strip().splitlines()[-1]), here)  # a fresh process
    again = rec.add(Catalog.from_files(paths[:2], ids=["new-a", "new-b"]), progress=False,
                    log=None)  # new-a was removed: it comes back; new-b is still there
    assert again["n_added"] == 1 and again["added"][0]["id"] == "new-a"
    assert [(s["id"], s["kind"]) for s in again["skipped"]] == [("new-b", "already in the index")]
    with pytest.raises(FashionrecError, match="not in the index"):
        rec.remove([BOOT], log=None)


KILLED_ADD = textwrap.dedent("""
    import os, signal, sys
    from fashionrec import Recommender
    from fashionrec.catalog import Catalog
    real = os.replace
    def replace(src, dst):  # die just before the new manifest is published
        if os.path.basename(dst) == "index.manifest.json":
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    os.replace = replace
    rec = Recommender.load(sys.argv[1])
    rec.add(Catalog.from_files([sys.argv[2]], ids=["new-x"]), progress=False)
""")


def test_killed_during_add_then_query(shop_copy, tmp_path):
    rec, run_dir, _ = shop_copy
    before = [(i.id, i.distance) for i in rec.recommend(item=BOOT).items]
    path = new_image(tmp_path, "x.jpg", seed=3)
    proc = subprocess.run([sys.executable, "-c", KILLED_ADD, str(run_dir), str(path)],
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert list(RunDir(run_dir).current().index_segments.iterdir())  # the segment was written ...
    reloaded = Recommender.load(run_dir)  # ... but never published
    assert reloaded.index_.row_of("new-x") is None and len(reloaded.index_) == 24
    assert [(i.id, i.distance) for i in reloaded.recommend(item=BOOT).items] == before
    reloaded.add(Catalog.from_files([path], ids=["new-x"]), progress=False, log=None)
    assert Recommender.load(run_dir).recommend(str(path), k=1).items[0].id == "new-x"
    assert len(list(RunDir(run_dir).current().index_segments.iterdir())) == 1  # the orphan was cleaned up


def test_retraining_into_the_run_dir_keeps_the_living_catalog(shop_copy, tmp_path):
    rec, run_dir, root = shop_copy
    rec.remove([BOOT], log=None)
    cache = {p: p.stat().st_mtime_ns for p in (run_dir / "features").iterdir()}
    Recommender(**TINY_MODEL).fit_catalog(Catalog.from_folder(root, 2), min_class_size=5,
                                    cache_dir=run_dir / "features", progress=False,
                                    log=None).save(run_dir)
    # same backbone, same image files: the features come from the cache, untouched
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "features").iterdir()} == cache
    fresh = Recommender.load(run_dir)
    assert fresh.run_id_ != rec.run_id_
    # a product removed before the retrain stays removed; the rest are all there
    assert fresh.index_.row_of(BOOT) is None and len(fresh.index_) == len(rec.index_)
    assert not RunDir(run_dir).current().index_manifest.exists()


def test_csv_catalog_through_the_cli(tmp_path, capsys):
    make_csv_catalog(tmp_path / "kaggle")
    run = tmp_path / "run"
    assert main(["train", "--catalog", str(tmp_path / "kaggle/styles.csv"),
                 "--label-column", "articleType",
                 "--category-columns", "masterCategory,articleType", "--image-size", "32",
                 "--weights", "none", "--epochs", "2", "--run-dir", str(run),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "24 products, 3 classes (4 skipped" in out
    assert main(["recommend", "--run-dir", str(run), "--item", "1003", "--k", "4",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["query"]["id"] == "1003" and data["query"]["category"] == "Shoes/Boots"
    assert [set(i) for i in data["items"]] == [
        {"rank", "id", "label", "class_name", "distance", "category", "path",
         "attributes"}] * 4
    # the CSV's other columns are the products' attributes
    assert {i["attributes"]["productDisplayName"].split(",")[0] for i in data["items"]} \
        <= {"Boots", "Sandals", "Totes"}
    assert set(data["items"][0]["attributes"]) == {"masterCategory", "productDisplayName"}
    assert "1003" not in [i["id"] for i in data["items"]]
    assert (run / "plots/recommend-item-1003.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["recommend", "--run-dir", str(run), "--item", "1003", "--category",
                 "Bags", "-k", "3"]) == 0
    text = capsys.readouterr().out
    assert "only: category Bags (8 candidates)" in text
    assert [line.split()[2] for line in text.splitlines()[3:6]] == ["Totes"] * 3

    img = new_image(tmp_path, "new.png", "Bags/Totes")
    assert main(["add", "--run-dir", str(run), "--image", str(img), "--id", "5000",
                 "--label", "Totes", "--no-progress"]) == 0
    assert "+ 5000: Totes (catalog)" in capsys.readouterr().out
    assert main(["remove", "--run-dir", str(run), "1003", "5000"]) == 0
    assert "now holds 23 items" in capsys.readouterr().out
    assert main(["recommend", "--run-dir", str(run), "--item", "1003"]) == 1
    assert "item '1003' is not in the catalog" in capsys.readouterr().err


def test_cli_errors_for_catalog_commands(shop, tmp_path, capsys):
    _, run_dir, root = shop
    cases = [
        (["train", "--catalog", str(tmp_path / "none")], "does not exist"),
        (["train", "--catalog", str(root), "--n-train", "10"], "--n-train do(es) not apply"),
        (["remove", "--run-dir", str(run_dir), "nope"], "not in the index"),
        (["add", "--run-dir", str(run_dir), "--image", str(tmp_path / "x.jpg")],
         "does not exist"),
        (["add", "--run-dir", str(run_dir), "--image", "a.jpg", "b.jpg", "--id", "x"],
         "--id names a single --image"),
        (["recommend", "--run-dir", str(run_dir), "--idx", "3"], "no test split"),
    ]
    for argv, message in cases:
        assert main(argv) != 0, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_fashion_mnist_run_takes_new_products_too(trained_run, tmp_path):
    from PIL import Image

    _, run_dir = trained_run
    shutil.copytree(run_dir, tmp_path / "run")
    rec = Recommender.load(tmp_path / "run")
    image, _ = rec.query_image(30)  # test image 30 is not in the 24-image catalog
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp_path / "new.png")
    with pytest.raises(FashionrecError, match="ids are integers"):
        rec.add(Catalog.from_files([tmp_path / "new.png"]), progress=False, log=None)
    rec.add(Catalog.from_files([tmp_path / "new.png"], ids=[90001]), progress=False, log=None)
    result = rec.recommend(30, k=3)
    assert result.items[0].id == 90001 and result.items[0].distance < 0.05
    assert isinstance(rec.recommend(item="90001").items[0].id, int)
    rec.remove([3], log=None)
    assert 3 not in [i.id for i in rec.recommend(30, k=23).items]


def test_evaluate_without_held_out_products_is_labelled_optimistic(shop, tmp_path, capsys):
    _, run_dir, _ = shop
    out = tmp_path / "ev.json"
    assert main(["evaluate", "--run-dir", str(run_dir), "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "OPTIMISTIC" in text and "catalog (leave-one-out), optimistic" in text
    res = json.loads(out.read_text())
    assert res["optimistic"] and res["catalog_loo"]["n_queries"] == 24
    assert res["primary_metric"] == "catalog_loo/map@10"


def test_catalog_options_without_a_catalog_are_refused(capsys):
    assert main(["train", "--label-column", "articleType", "--run-dir", "unused"]) == 1
    assert "--label-column appl(ies) only with --catalog" in capsys.readouterr().err
