"""Safety nets: empty catalogs stop with one line on every path, a CSV catalog keeps
to its folder, the demo deletes only what it wrote, and two extractions of one run
do not take each other's partial feature cache."""

import os
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest
from catalogs import CLASSES, draw_product
from conftest import TINY_MODEL

from fashionrec import FashionrecError
from fashionrec.artifacts import flocked
from fashionrec.catalog import Catalog
from fashionrec.cli import main
from fashionrec.cli.parser import build_parser
from fashionrec.demo import MARKER, make_demo_catalog
from fashionrec.demo import main as demo_main
from fashionrec.extract import BackboneInfo, ViewCache

TINY_CATALOG = ["--image-size", str(TINY_MODEL["image_size"]), "--weights", "none",
                "--epochs", "1", "--batch-size", "8", "--extract-batch-size", "16",
                "--no-progress"]


def image(path, cls="Shoes/Boots", seed=0):
    shape, colour = CLASSES[cls]
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_product(shape, colour, np.random.default_rng(seed), (48, 40)).save(path)
    return path


def one_line_error(capsys, rc):
    out = capsys.readouterr()
    assert rc != 0, out.out[-2000:]
    assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    assert "Traceback" not in out.err + out.out
    return out


# ----------------------------------------------------------------- empty catalogs
def empty_folder(root):
    root.mkdir()
    return root


def non_images(root):
    (root / "Shoes").mkdir(parents=True)
    (root / "Shoes/notes.txt").write_text("not an image")
    (root / "Shoes/list.csv").write_text("a,b\n")
    return root


def header_only_csv(root):
    root.mkdir()
    (root / "styles.csv").write_text("id,label\n")
    return root / "styles.csv"


def empty_splits(root):
    for split in ("train", "validation", "test"):
        (root / split).mkdir(parents=True)
    return root


def one_class(root):
    for k in range(6):
        image(root / "Boots" / f"{k}.jpg", seed=k)
    return root


@pytest.mark.parametrize("make, words", [
    (empty_folder, "has no usable product (see the report: 0 skipped)"),
    (non_images, "has no usable product (see the report: 2 skipped)"),
    (header_only_csv, "has no usable product"),
    (empty_splits, "has no usable product"),
    (one_class, "has 1 usable class(es); 2 classes needed"),
])
def test_train_on_an_empty_catalog_is_one_line(tmp_path, capsys, make, words):
    catalog = make(tmp_path / "shop")
    rc = main(["train", "--catalog", str(catalog), "--run-dir", str(tmp_path / "run"),
               *TINY_CATALOG])
    out = one_line_error(capsys, rc)
    assert words in out.err and str(catalog) in out.err
    assert "catalog: 0 of" in out.out or "catalog: 6 of" in out.out  # the report, on stdout
    assert not list((tmp_path / "run").rglob("*.h5"))  # stopped before extraction


@pytest.mark.parametrize("make", [empty_folder, header_only_csv])
def test_extract_of_an_empty_catalog_is_one_line(tmp_path, capsys, make):
    catalog = make(tmp_path / "shop")
    rc = main(["extract", "--catalog", str(catalog), "--run-dir", str(tmp_path / "run"),
               "--image-size", "32", "--weights", "none", "--no-progress"])
    assert "has no usable product" in one_line_error(capsys, rc).err


def test_train_on_an_empty_folder_in_a_process_has_no_traceback(tmp_path):
    (tmp_path / "shop").mkdir()
    proc = subprocess.run([sys.executable, "-m", "fashionrec", "train", "--catalog",
                           str(tmp_path / "shop"), "--run-dir", str(tmp_path / "run"),
                           *TINY_CATALOG], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the catalog "), proc.stderr


@pytest.fixture(scope="module")
def catalog_run(tmp_path_factory):
    """A tiny product-catalog run (two classes of five), trained and saved once."""
    from fashionrec import Recommender

    root = tmp_path_factory.mktemp("shop")
    for cls in ("Shoes/Boots", "Bags/Totes"):
        for k in range(5):
            image(root / cls / f"{k}.png", cls, seed=k)
    run_dir = tmp_path_factory.mktemp("run")
    Recommender(**TINY_MODEL).fit_catalog(
        Catalog.from_folder(root), min_class_size=5, cache_dir=run_dir / "features",
        progress=False, log=None).save(run_dir)
    return run_dir


@pytest.mark.parametrize("make", [empty_folder, non_images, header_only_csv, empty_splits])
def test_add_of_an_empty_catalog_is_one_line(catalog_run, tmp_path, capsys, make):
    run_dir = catalog_run
    catalog = make(tmp_path / "new")
    rc = main(["add", "--catalog", str(catalog), "--run-dir", str(run_dir), "--no-progress"])
    out = one_line_error(capsys, rc)
    assert "lists no product to add" in out.err


def test_view_cache_of_no_images(tmp_path):
    info = BackboneInfo("resnet50", "none", feature_dim=8, image_size=32, seed=0)

    class Nothing:
        def iter_batches(self, images, progress, desc, skip):
            return iter(())

    views, failed = ViewCache(tmp_path, info, ["a", "b"], ["k", "l"], 0).extract(
        None, [], False, runner=Nothing())
    assert [v.shape for v in views] == [(0, 8), (0, 8)] and failed == {}
    assert not list(tmp_path.glob("*.partial.h5"))
    again = ViewCache(tmp_path, info, ["a", "b"], ["k", "l"], 0).load()  # cached
    assert again is not None and again[0][0].shape == (0, 8)


# ----------------------------------------------------------------- CSV outside its folder
@pytest.fixture
def csv_shop(tmp_path):
    shop, away = tmp_path / "shop", tmp_path / "away"
    image(shop / "images/in.png")
    image(shop / "images/in2.png", "Bags/Totes")
    image(away / "secret.png")
    image(tmp_path / "up.png")
    (shop / "images/link.png").symlink_to(away / "secret.png")
    (shop / "m.csv").write_text(
        "id,label,file\n"
        "in,boot,images/in.png\n"
        "in2,tote,images/../images/in2.png\n"
        f"abs,boot,{away / 'secret.png'}\n"
        "up,boot,../up.png\n"
        "link,boot,images/link.png\n")
    return shop / "m.csv"


def test_csv_rows_outside_the_folder_are_skipped(csv_shop):
    cat = Catalog.from_csv(csv_shop, image_column="file")
    assert cat.ids == ["in", "in2"]
    skipped = {s["id"]: s for s in cat.skipped}
    assert set(skipped) == {"abs", "up", "link"}
    assert {s["kind"] for s in skipped.values()} == {"outside the catalog"}
    assert "../up.png" in skipped["up"]["reason"]
    assert "secret.png" in skipped["abs"]["reason"] and "secret.png" in skipped["link"]["reason"]
    assert "allow_outside" not in cat.source
    # the pattern form too: an id may not lead the path out
    (csv_shop.parent / "p.csv").write_text("id,label\n../../up,boot\n")
    pat = Catalog.from_csv(csv_shop.parent / "p.csv", image_pattern="images/{id}.png")
    assert not len(pat) and pat.skipped[0]["kind"] == "outside the catalog"


def test_csv_rows_outside_the_folder_when_allowed(csv_shop):
    cat = Catalog.read(csv_shop, image_column="file", allow_outside=True)
    assert cat.ids == ["in", "in2", "abs", "up", "link"] and not cat.skipped
    assert cat.source["allow_outside"] is True
    assert cat.paths[4] == (csv_shop.parent.parent / "away/secret.png").resolve()


def test_folder_links_outside_the_folder_are_skipped_unless_allowed(csv_shop):
    """A folder catalog's symbolic link to a file outside it would be served by the
    image route: skipped, unless allowed."""
    shop = csv_shop.parent  # as a folder catalog: images/in.png, images/link.png, ...
    cat = Catalog.read(shop)
    assert "images/in.png" in cat.ids and "images/link.png" not in cat.ids
    skipped = {s["id"]: s for s in cat.skipped}
    assert skipped["images/link.png"]["kind"] == "outside the catalog"
    assert "secret.png" in skipped["images/link.png"]["reason"]
    allowed = Catalog.read(shop, allow_outside=True)
    assert "images/link.png" in allowed.ids and allowed.source["allow_outside"] is True


def test_cli_allow_outside(csv_shop, tmp_path, capsys):
    for verb in ("train", "extract", "add"):
        args = build_parser().parse_args([verb, "--catalog", "x.csv", "--allow-outside"])
        assert args.allow_outside is True
    rc = main(["train", "--allow-outside", "--run-dir", str(tmp_path / "r")])
    assert "--allow-outside appl(ies) only with --catalog" in one_line_error(capsys, rc).err
    (csv_shop.parent / "out.csv").write_text(
        f"id,label,file\nabs,boot,{tmp_path / 'away/secret.png'}\nup,tote,../up.png\n")
    argv = ["extract", "--catalog", str(csv_shop.parent / "out.csv"), "--image-column", "file",
            "--min-class-size", "1", "--run-dir", str(tmp_path / "run"), "--image-size", "32",
            "--weights", "none", "--no-progress"]
    out = one_line_error(capsys, main(argv))
    assert "has no usable product" in out.err and "2 outside the catalog" in out.out
    assert main([*argv, "--allow-outside"]) == 0, capsys.readouterr().err
    assert "features:       2 products" in capsys.readouterr().out


# ----------------------------------------------------------------- the demo catalog
def test_demo_refuses_to_delete_a_folder_it_did_not_write(tmp_path, fmnist_dir, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder/keep.txt").write_text("mine")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / MARKER).write_text("")
    assert demo_main([str(tmp_path), "--per-class", "3", "--data-dir", str(fmnist_dir)]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'folder'} exists and was not written by the demo "
                   f"(no {MARKER} in it); move it away or choose another folder\n")
    assert (tmp_path / "folder/keep.txt").read_text() == "mine"
    assert (tmp_path / "new" / MARKER).is_file()  # refused before deleting anything


def test_demo_replaces_its_own_output(tmp_path, fmnist_dir):
    make_demo_catalog(tmp_path, per_class=3, data_dir=fmnist_dir)
    for sub in ("folder", "csv", "new"):
        assert (tmp_path / sub / MARKER).is_file()
    (tmp_path / "folder/stale.jpg").write_bytes(b"x")
    make_demo_catalog(tmp_path, per_class=3, data_dir=fmnist_dir)
    assert not (tmp_path / "folder/stale.jpg").exists()
    assert not any(MARKER in i for i in Catalog.read(tmp_path / "folder").ids)


# ----------------------------------------------------------------- two extractions at once
INFO = BackboneInfo("resnet50", "none", feature_dim=4, image_size=32, seed=0)


class Crash(Exception):
    pass


class Rows:
    """A runner computing ``n`` rows of ones (optionally stopping after ``stop``)."""

    def __init__(self, n, stop=None):
        self.n, self.stop = n, stop

    def iter_batches(self, images, progress, desc, skip):
        for start in range(self.n):
            if self.stop is not None and start >= self.stop:
                raise Crash()
            if not skip[start]:
                yield start, np.ones((1, 4), np.float32), {}


def partial_cache(tmp_path):
    """A cache with a partial file one row into three (as if killed)."""
    cache = ViewCache(tmp_path, INFO, ["catalog"], ["k"], 3)
    with pytest.raises(Crash):
        cache.extract(None, [], False, runner=Rows(3, stop=1))
    path = cache.partial_path([0])
    assert path.is_file()
    return cache, path


def test_a_second_extraction_leaves_the_first_ones_partial_file(tmp_path):
    cache, path = partial_cache(tmp_path)
    held, release = threading.Event(), threading.Event()

    def first():  # the other extraction, holding the partial file's lock
        with flocked(path.with_suffix(".lock")):
            held.set()
            release.wait(30)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert held.wait(30)
        with pytest.raises(FashionrecError) as exc:
            cache.extract(None, [], False, runner=Rows(3))
    finally:
        release.set()
        t.join()
    message = str(exc.value)
    assert message.startswith(f"the feature cache {path} is being written by another "
                              "process; wait for it or use another --run-dir")
    assert "\n" not in message
    with h5py.File(path) as f:  # untouched: still one row done
        assert f["done"][:].tolist() == [True, False, False]
    # once the lock is free, the extraction resumes it
    views, _ = cache.extract(None, [], False, runner=Rows(3))
    assert views[0].shape == (3, 4) and not path.exists()


@pytest.mark.skipif(os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE",
                    reason="HDF5 file locking is off")
def test_hdf5s_own_lock_is_not_taken_for_a_truncated_file(tmp_path):
    cache, path = partial_cache(tmp_path)
    reader = subprocess.Popen(
        [sys.executable, "-c", "import sys, h5py\nf = h5py.File(sys.argv[1], 'r')\n"
         "print('open', flush=True)\nsys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "open"
        with pytest.raises(FashionrecError, match="being written by another process"):
            cache.extract(None, [], False, runner=Rows(3))
    finally:
        reader.communicate("", timeout=30)
    with h5py.File(path) as f:
        assert f["done"][:].tolist() == [True, False, False]


@pytest.mark.parametrize("content", ["junk", "foreign"])
def test_a_corrupt_or_foreign_partial_file_is_replaced(tmp_path, content):
    cache = ViewCache(tmp_path, INFO, ["catalog"], ["k"], 3)
    path = cache.partial_path([0])
    if content == "junk":
        path.write_bytes(b"cut short" * 10)
    else:
        with h5py.File(path, "w") as f:
            f["other"] = [1, 2]
    views, _ = cache.extract(None, [], False, runner=Rows(3))
    assert views[0].shape == (3, 4) and not path.exists()
