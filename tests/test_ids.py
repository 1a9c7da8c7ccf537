"""Item ids are checked in one place (fashionrec.ids): the catalog readers, added
products and the command line refuse an id the service could not show or route."""

import re
import subprocess
import sys

import numpy as np
import pytest
from catalogs import draw_product

from fashionrec import FashionrecError
from fashionrec.catalog import Catalog
from fashionrec.cli import main
from fashionrec.ids import check_id

BAD_IDS = {
    "nul": "a\x00b",
    "long": "x" * 300,
    "route": "x/image",
    "newline": "a\nb",
    "empty": "",
}


def image(path):
    draw_product("ellipse", (200, 40, 40), np.random.default_rng(0)).save(path)
    return path


@pytest.mark.parametrize("good", [
    "Footwear/Boots/acme/boots-0000.jpg", "10000", 17, "x" * 256, "imaged", "my image",
    "a/similarity", "é/ü"])
def test_valid_ids_pass_as_str(good):
    assert check_id(good) == str(good)


@pytest.mark.parametrize("bad, words", [
    ("a\x00b", "control character U+0000"), ("a\nb", "control character U+000A"),
    ("a\x7fb", "control character U+007F"), ("x" * 300, "300 characters"),
    ("x" * 257, "at most 256"), ("", "empty"), ("   ", "empty"),
    ("x/image", "ends in /image"), ("a/b/similar", "ends in /similar"),
    ("/x", "starts or ends with /"), ("x/", "starts or ends with /"), ("/", "with /"),
])
def test_bad_ids_are_refused_in_one_line(bad, words):
    with pytest.raises(FashionrecError, match=re.escape(words)) as exc:
        check_id(bad)
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 200


@pytest.mark.parametrize("name", sorted(BAD_IDS))
def test_from_files_refuses_a_bad_id(tmp_path, name):
    path = image(tmp_path / "a.png")
    with pytest.raises(FashionrecError) as exc:
        Catalog.from_files([path], ids=[BAD_IDS[name]])
    assert "\n" not in str(exc.value)
    assert Catalog.from_files([path], ids=[7]).ids == ["7"]  # integer ids pass as str


def test_from_files_refuses_a_bad_file_name_as_id(tmp_path):
    path = image(tmp_path / "a\x01b.png")
    with pytest.raises(FashionrecError, match="control character U\\+0001"):
        Catalog.from_files([path])


def test_a_csv_row_with_a_bad_id_is_skipped_and_reported(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("ok", "bad"):
        image(tmp_path / "images" / f"{name}.png")
    long_id = "y" * 300
    (tmp_path / "m.csv").write_text(
        "id,label,file\n"
        "ok,hat,images/ok.png\n"
        "x/image,hat,images/bad.png\n"
        f"{long_id},hat,images/bad.png\n"
        '"a\nb",hat,images/bad.png\n', encoding="utf-8")
    cat = Catalog.from_csv(tmp_path / "m.csv", image_column="file")
    assert cat.ids == ["ok"]
    bad = {s["id"]: s for s in cat.skipped}
    assert set(bad) == {"x/image", long_id, "a\nb"}
    assert all(s["kind"] == "bad id" for s in bad.values())
    assert "ends in /image" in bad["x/image"]["reason"]
    assert "300 characters" in bad[long_id]["reason"]
    assert "U+000A" in bad["a\nb"]["reason"]
    _, report = cat.check(progress=False)
    assert report["skipped_by_kind"] == {"bad id": 3}


def test_a_folder_file_with_a_bad_name_is_skipped(tmp_path):
    for name in ("ok.png", "a\x02b.png"):
        (tmp_path / "Hats").mkdir(exist_ok=True)
        image(tmp_path / "Hats" / name)
    cat = Catalog.from_folder(tmp_path)
    assert cat.ids == ["Hats/ok.png"]
    assert [(s["id"], s["kind"]) for s in cat.skipped] == [("Hats/a\x02b.png", "bad id")]


def test_add_products_refuses_a_bad_id_before_any_work(trained_run, tmp_path):
    rec, _ = trained_run
    n = len(rec.index_)
    catalog = Catalog(["20000", "x/similar"], [image(tmp_path / "a.png")] * 2, [None] * 2,
                      [""] * 2)
    with pytest.raises(FashionrecError, match="ends in /similar"):
        rec.add(catalog, progress=False, log=None)
    assert len(rec.index_) == n


@pytest.mark.parametrize("name", sorted(BAD_IDS))
def test_cli_add_refuses_a_bad_id_in_one_line(trained_run, tmp_path, capsys, name):
    _, run_dir = trained_run
    path = image(tmp_path / "new.png")
    rc = main(["add", "--run-dir", str(run_dir), "--image", str(path), "--id",
               BAD_IDS[name], "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_cli_add_bad_id_in_a_process_has_no_traceback(trained_run, tmp_path):
    _, run_dir = trained_run
    path = image(tmp_path / "new.png")
    proc = subprocess.run([sys.executable, "-m", "fashionrec", "add", "--run-dir",
                           str(run_dir), "--image", str(path), "--id", "a\nb"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: id 'a\\nb' holds"), proc.stderr
