"""Fine-tuning the backbone's last stage: the cut, what trains and what stays frozen,
the run's record, its own fingerprint, a fresh process and the OpenVINO engine."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from catalogs import make_folder_catalog
from conftest import TINY_MODEL

from fashionrec import FashionrecError, Recommender, RunConfig
from fashionrec.catalog import Catalog
from fashionrec.cli import main
from fashionrec.extract import build_backbone
from fashionrec.finetune import split


def test_split_cuts_before_the_last_blocks_of_the_last_stage():
    model, _ = build_backbone("resnet50", "none", 32, log=None)
    frozen, top, cut = split(model, 2)
    assert cut == "conv5_block1_out"  # stage 5 has 3 blocks: the last 2 train
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(top(frozen(x)), model(x), rtol=1e-4, atol=1e-4)
    trainable = {w.path.split("/")[0] for w in top.trainable_weights}
    assert trainable and all(n.startswith(("conv5_block2", "conv5_block3")) for n in trainable)
    assert not any("_bn" in n for n in trainable)  # batch norms keep their statistics
    with pytest.raises(FashionrecError, match=r"must be 1\.\.3"):
        split(model, 4)


def test_fine_tune_is_for_catalogs(fmnist_dir):
    with pytest.raises(FashionrecError, match="for product-catalog runs"):
        Recommender(RunConfig(data_dir=str(fmnist_dir), n_train=8, n_reco=4,
                              fine_tune_blocks=1, **TINY_MODEL)).fit(log=None)


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("shop")
    make_folder_catalog(root / "shop", n_per_class=6)
    run = root / "run"
    assert main(["train", "--catalog", str(root / "shop"), "--run-dir", str(run),
                 "--no-progress", "--image-size", "32", "--weights", "none", "--epochs", "2",
                 "--batch-size", "8", "--extract-batch-size", "16", "--engine", "keras",
                 "--precision", "float32", "--fine-tune-blocks", "1",
                 "--fine-tune-epochs", "1"]) == 0
    return root, run


def test_the_run_records_a_new_backbone(tuned_run):
    root, run = tuned_run
    meta = json.loads((run / "run.json").read_text())
    ft = meta["fine_tune"]
    assert ft["blocks"] == 1 and ft["cut_after"] == "conv5_block2_out"
    assert ft["train_s"] > 0 and ft["frozen_part_s"] > 0 and ft["peak_rss_mb"] > 0
    assert meta["config"]["fine_tune_blocks"] == 1 and meta["config"]["backbone"] == "resnet50"
    info = meta["backbone"]
    assert info["backbone"] == "custom" and info["model_path"].endswith(".keras")
    base, _ = build_backbone("resnet50", "none", 32, log=None)
    tuned = Recommender.load(run).embedder_.extractor.model
    weights = {w.path: np.asarray(w) for w in tuned.weights}
    for w in base.weights:  # frozen blocks unchanged, the tuned block's kernels moved
        same = np.allclose(weights[w.path], np.asarray(w))
        if w.path.startswith("conv5_block3") and w.path.endswith("_conv/kernel"):
            assert not same, w.path
        elif not w.path.startswith("conv5_block3"):
            assert same, w.path
    # its own fingerprint: another cache key than the base backbone's
    from fashionrec.extract import BackboneInfo
    assert BackboneInfo.from_dict(info).fingerprint != BackboneInfo.from_dict(
        ft["base_backbone"]).fingerprint


def test_a_fresh_process_and_openvino_answer_the_same(tuned_run):
    root, run = tuned_run
    photo = sorted((root / "shop").rglob("*.jpg"))[0]
    rec = Recommender.load(run)
    here = [i.id for i in rec.recommend(photo, k=3).items]
    code = textwrap.dedent(f"""
        import json
        from fashionrec import Recommender
        rec = Recommender.load({str(run)!r})
        print(json.dumps([i.id for i in rec.recommend({str(photo)!r}, k=3).items]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == here
    pytest.importorskip("openvino")
    from fashionrec.extract import FeatureExtractor, rebuild_backbone
    from fashionrec.images import ImageFiles

    info = rec.embedder_.info
    model = rebuild_backbone(info)
    files = ImageFiles([photo], 32)
    keras_f = FeatureExtractor(model, info, 4).transform(files)
    info_ov = type(info).from_dict({**info.to_dict(), "engine": "openvino"})
    ov_f = FeatureExtractor(model, info_ov, 4).transform(files)
    np.testing.assert_allclose(ov_f, keras_f, rtol=1e-3, atol=1e-3)
    assert Catalog  # the catalog reader made the products above
