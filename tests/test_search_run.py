"""A trained run and its search back-end: chosen at training, switched with
``fashionrec index``, compacted with ``fashionrec compact``, recorded in run.json and
the same in a fresh process; item ids and test indices never mix."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fashionrec import FashionrecError, Recommender
from fashionrec.artifacts import read_json
from fashionrec.catalog import Catalog
from fashionrec.cli import main
from fashionrec.rundir import RunDir
from fashionrec.search import ExactSearch, LiveSearch
from fashionrec.search.hnsw import HNSWSearch

pytest.importorskip("faiss")


@pytest.fixture
def run_copy(trained_run, tmp_path):
    _, run_dir = trained_run
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def ids(result):
    return [(item.id, round(item.distance, 5)) for item in result.items]


def test_auto_picks_hnsw_from_the_threshold_and_records_it(tiny_config, tmp_path):
    rec = Recommender(tiny_config, search="auto", hnsw_min_items=20, hnsw_m=8).fit(
        progress=False, log=None)
    assert isinstance(rec.index_.backend, HNSWSearch)
    assert rec.metadata_["search"]["backend"] == "hnsw" and rec.metadata_["search"]["m"] == 8
    before = ids(rec.recommend(item=5, k=5))
    rec.save(tmp_path / "run")
    assert read_json(tmp_path / "run" / "run.json")["search"]["backend"] == "hnsw"
    # the saved graph answers in a fresh process, without being rebuilt
    script = textwrap.dedent("""
        import json, sys
        from fashionrec import Recommender
        messages = []
        rec = Recommender.load(sys.argv[1], log=messages.append)
        r = rec.recommend(item=5, k=5)
        print(json.dumps({"backend": type(rec.index_.backend).__name__, "messages": messages,
                          "items": [[i.id, round(i.distance, 5)] for i in r.items]}))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], check=True,
                         capture_output=True, text=True).stdout
    fresh = json.loads(out.strip().splitlines()[-1])
    assert fresh["backend"] == "HNSWSearch" and fresh["messages"] == []
    assert [tuple(i) for i in fresh["items"]] == before
    small = Recommender(tiny_config, hnsw_min_items=25).config.search_spec(24)
    assert small == {"backend": "exact"}  # below the threshold: exact


def test_index_switches_a_saved_run_and_compact_folds_updates(run_copy, capsys):
    exact = Recommender.load(run_copy)
    assert isinstance(exact.index_.backend, ExactSearch)
    before = ids(exact.recommend(item=3, k=6))
    assert main(["index", "--run-dir", str(run_copy), "--search", "hnsw", "--hnsw-m", "8",
                 "--no-progress"]) == 0
    assert "HNSW search: M=8" in capsys.readouterr().out
    meta = read_json(run_copy / "run.json")
    assert meta["search"]["backend"] == "hnsw" and meta["config"]["search"] == "hnsw"
    rec = Recommender.load(run_copy)
    assert isinstance(rec.index_.backend, HNSWSearch)
    assert ids(rec.recommend(item=3, k=6)) == before  # 24 items: the graph finds them all

    rec.remove(iter([0, 1]), log=None)  # a generator of ids
    assert isinstance(rec.index_.backend, LiveSearch) and len(rec.index_) == 22
    assert main(["compact", "--run-dir", str(run_copy), "--no-progress"]) == 0
    assert "22 items" in capsys.readouterr().out
    rec = Recommender.load(run_copy)
    assert isinstance(rec.index_.backend, HNSWSearch) and len(rec.index_) == 22
    assert rec.index_.metadata["n_updates"] == 0
    assert [i for i in ids(rec.recommend(item=3, k=4))] == [
        i for i in before if i[0] not in (0, 1)][:4]

    assert main(["index", "--run-dir", str(run_copy), "--search", "exact"]) == 0
    assert isinstance(Recommender.load(run_copy).index_.backend, ExactSearch)
    assert "ann" not in json.loads(RunDir(run_copy).current().index_manifest.read_text())


def test_index_and_compact_errors_are_one_line(tmp_path, run_copy, capsys, monkeypatch):
    cases = [
        (["index", "--run-dir", str(tmp_path / "none"), "--search", "hnsw"], "no trained run"),
        (["compact", "--run-dir", str(tmp_path / "none")], "no trained run"),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["index", "--run-dir", str(run_copy)]) == 1  # neither --search nor --store
    err = capsys.readouterr().err
    assert "give --search (how the catalog is searched) or --store" in err
    assert len(err.strip().splitlines()) == 1
    for argv in (["index", "--run-dir", str(run_copy), "--search", "fast"],
                 ["index", "--run-dir", str(run_copy), "--search", "hnsw", "--hnsw-m", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    import fashionrec.search as search

    monkeypatch.setattr(search, "hnsw_available", lambda: False)
    assert main(["index", "--run-dir", str(run_copy), "--search", "hnsw"]) == 1
    assert "pip install 'fashionrec[ann]'" in capsys.readouterr().err


def test_new_products_never_take_a_test_index(run_copy, tmp_path):
    from PIL import Image

    rec = Recommender.load(run_copy)
    image, _ = rec.query_image(7000)  # a test image, not in the 24-image catalog
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp_path / "new.png")
    new = Catalog.from_files([tmp_path / "new.png"], ids=[7000])
    with pytest.raises(FashionrecError, match="id 7000 is test image 7000.*from 10000 up"):
        rec.add(new, progress=False, log=None)
    rec.remove([3], log=None)
    with pytest.raises(FashionrecError, match="id 3 is test image 3"):  # not a misleading one
        rec.add(Catalog.from_files([tmp_path / "new.png"], ids=[3]), progress=False, log=None)
    rec.add(Catalog.from_files([tmp_path / "new.png"], ids=[10000]), progress=False, log=None)
    # the test image query and the product are told apart
    by_index = rec.recommend(7000, k=3)
    assert by_index.query["kind"] == "test_index" and by_index.items[0].id == 10000
    by_item = rec.recommend(item=10000, k=3)
    assert 10000 not in [i.id for i in by_item.items]
