import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fashionrec import FashionrecError, Recommender, RunDir
from fashionrec.artifacts import read_json, write_json


def test_fit_records_what_made_the_run(trained_run, tiny_config):
    rec, run_dir = trained_run
    meta = read_json(run_dir / "run.json")
    assert meta["config"]["n_train"] == tiny_config.n_train
    assert meta["backbone"]["weights"] == "none" and meta["backbone"]["image_size"] == 32
    assert meta["dataset"]["name"] == "fashion_mnist" and meta["dataset"]["n_reco"] == 24
    assert {"keras", "tensorflow", "numpy", "h5py"} <= set(meta["versions"])
    assert set(meta["timings"]) >= {"extract_s", "head_s", "index_s", "total_s", "peak_rss_mb"}
    assert 0.0 <= meta["head_test_accuracy"] <= 1.0
    assert len(rec.index_) == 24 and rec.index_.dim == 512


def test_recommend_by_test_index(trained_run):
    rec, _ = trained_run
    result = rec.recommend(30, k=6)
    assert result.query["test_index"] == 30 and result.query["true_class"]
    assert len(result.items) == 6
    dists = [i.distance for i in result.items]
    assert dists == sorted(dists)
    assert all(0 <= i.id < 24 for i in result.items)
    assert all(i.class_name == rec.class_names[i.label] for i in result.items)


def test_a_catalog_item_never_gets_itself_back(trained_run):
    rec, _ = trained_run
    for idx in (0, 5, 23):
        ids = [i.id for i in rec.recommend(idx, k=23).items]
        assert idx not in ids and len(ids) == 23


def test_array_and_file_queries_match_the_test_index_query(trained_run, tmp_path):
    rec, _ = trained_run
    image, _ = rec.query_image(30)
    by_idx = [(i.id, round(i.distance, 4)) for i in rec.recommend(30).items]
    by_array = [(i.id, round(i.distance, 4)) for i in rec.recommend(np.asarray(image)).items]
    path = tmp_path / "q.png"
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
    by_file = [(i.id, round(i.distance, 4)) for i in rec.recommend(str(path)).items]
    assert by_idx == by_array == by_file
    rgb = np.repeat(np.asarray(image)[..., None], 3, axis=-1)
    assert [i.id for i in rec.recommend(rgb).items] == [i for i, _ in by_idx]


def test_bad_queries_are_clear_errors(trained_run, tmp_path):
    rec, _ = trained_run
    with pytest.raises(FashionrecError, match="out of range 0..9999"):
        rec.recommend(10_000)
    with pytest.raises(FashionrecError, match="k must be a positive integer"):
        rec.recommend(3, k=0)
    with pytest.raises(FashionrecError, match="more than the catalog"):
        rec.recommend(3, k=24)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(FashionrecError, match="cannot read image"):
        rec.recommend(str(tmp_path / "bad.png"))
    with pytest.raises(FashionrecError, match="does not exist"):
        rec.recommend(str(tmp_path / "missing.png"))
    with pytest.raises(FashionrecError, match="image array must be"):
        rec.recommend(np.zeros((2, 3, 4, 5)))


def test_load_in_a_fresh_process_gives_the_same_recommendations(trained_run):
    rec, run_dir = trained_run
    here = [r.to_dict() for r in (rec.recommend(30), rec.recommend(2, k=4))]
    code = (
        "import json, sys; from fashionrec import Recommender; "
        "rec = Recommender.load(sys.argv[1]); "
        "print(json.dumps([rec.recommend(30).to_dict(), rec.recommend(2, k=4).to_dict()]))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True,
                         text=True, check=True)
    there = json.loads(out.stdout.strip().splitlines()[-1])
    for a, b in zip(here, there, strict=True):
        assert [i["id"] for i in a["items"]] == [i["id"] for i in b["items"]]
        np.testing.assert_allclose([i["distance"] for i in a["items"]],
                                   [i["distance"] for i in b["items"]], rtol=1e-4)
        assert a["query"]["predicted_class"] == b["query"]["predicted_class"]


def test_loading_refuses_missing_and_mixed_runs(trained_run, tmp_path):
    with pytest.raises(FashionrecError, match="run `make train` first"):
        Recommender.load(tmp_path / "nothing")
    _, run_dir = trained_run
    mixed = tmp_path / "mixed"
    shutil.copytree(run_dir, mixed, ignore=shutil.ignore_patterns("features"))
    version = RunDir(mixed).current()
    meta = read_json(mixed / "run.json")
    meta["run_id"] = "another-run"  # as if the save was interrupted after run.json changed
    write_json(mixed / "run.json", meta)
    with pytest.raises(FashionrecError, match="mixes files of two runs"):
        Recommender.load(mixed)
    # a head from another run beside this run's index and run.json is refused too
    (mixed / "run.json").write_bytes((run_dir / "run.json").read_bytes())
    head = read_json(version.head_state)
    head["run_id"] = "another-run"
    write_json(version.head_state, head)
    with pytest.raises(FashionrecError, match="mixes files of two runs"):
        Recommender.load(mixed)


def test_n_beyond_the_dataset_is_refused(tiny_config):
    with pytest.raises(FashionrecError, match="n_reco 20000 exceeds"):
        Recommender(tiny_config, n_reco=20000).fit(progress=False, log=None)


def test_bad_config_values_are_refused(tiny_config):
    with pytest.raises(FashionrecError, match="image_size must be an integer >= 32"):
        Recommender(tiny_config, image_size=16)
    with pytest.raises(FashionrecError, match="unknown dataset"):
        Recommender(tiny_config, dataset="cifar")
    with pytest.raises(FashionrecError, match="weights must be"):
        Recommender(tiny_config, weights="nonexistent.h5")


def test_a_different_test_split_is_refused(trained_run):
    _, run_dir = trained_run
    rec = Recommender.load(run_dir)
    rec.index_.images = rec.index_.images[::-1].copy()  # as if made from other images
    with pytest.raises(FashionrecError, match="not the one this run's catalog was made from"):
        rec.recommend(3)
