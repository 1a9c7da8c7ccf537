"""Better neighbours from the same features: the metric-learning losses on the head's
dense_mid, alpha query expansion and database-side augmentation, checked against
references written here from the papers' formulas, and through a saved run (CLI,
reload in a fresh process, add)."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fashionrec import ClassifierHead, FashionrecError, Recommender, RunConfig
from fashionrec.catalog import Catalog
from fashionrec.cli import main
from fashionrec.expansion import augment_catalog, expand, weighted_mean
from fashionrec.head import MID_LAYER
from fashionrec.index import CatalogIndex
from fashionrec.metric import metric_loss_from, resolve
from fashionrec.search import ExactSearch


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def batch(seed=0, n=12, d=8, classes=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), np.arange(n) % classes


# ------------------------------------------------------------------ losses
def multi_similarity_reference(x, y, alpha, beta, lam, eps):
    """Wang et al. 2019, eq. (5)-(8), one anchor at a time in plain Python."""
    s = unit(x.astype(np.float64)) @ unit(x.astype(np.float64)).T
    out = []
    for i in range(len(x)):
        pos = [j for j in range(len(x)) if j != i and y[j] == y[i]]
        neg = [j for j in range(len(x)) if y[j] != y[i]]
        keep_neg = [j for j in neg if s[i, j] + eps > min(s[i, p] for p in pos)]
        keep_pos = [j for j in pos if s[i, j] - eps < max(s[i, n] for n in neg)]
        loss = np.log1p(sum(np.exp(-alpha * (s[i, j] - lam)) for j in keep_pos)) / alpha
        loss += np.log1p(sum(np.exp(beta * (s[i, j] - lam)) for j in keep_neg)) / beta
        out.append(loss)
    return np.array(out)


def supcon_reference(x, y, tau):
    """Khosla et al. 2020, L_out: for each anchor the mean over its positives of
    -log softmax over every other item."""
    s = unit(x.astype(np.float64)) @ unit(x.astype(np.float64)).T / tau
    out = []
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        log_den = np.log(sum(np.exp(s[i, j]) for j in others))
        pos = [j for j in others if y[j] == y[i]]
        out.append(-np.mean([s[i, p] - log_den for p in pos]))
    return np.array(out)


def test_multi_similarity_matches_the_paper():
    x, y = batch()
    setting = resolve({"name": "multi_similarity", "alpha": 2.0, "beta": 10.0,
                       "lambda": 0.3, "epsilon": 0.2})
    got = np.asarray(metric_loss_from(setting).call(y, x))
    want = multi_similarity_reference(x, y, 2.0, 10.0, 0.3, 0.2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_supcon_matches_the_paper():
    x, y = batch(1)
    got = np.asarray(metric_loss_from({"name": "supcon", "temperature": 0.5}).call(y, x))
    np.testing.assert_allclose(got, supcon_reference(x, y, 0.5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["multi_similarity", "supcon"])
def test_losses_reward_embeddings_that_group_classes(name):
    rng = np.random.default_rng(2)
    y = np.arange(30) % 3
    grouped = (np.eye(3)[y] * 5 + rng.normal(0, 0.3, (30, 3))).astype(np.float32)
    shuffled = grouped[rng.permutation(30)]
    loss = metric_loss_from(name)
    assert float(np.mean(loss.call(y, grouped))) < float(np.mean(loss.call(y, shuffled)))


def test_bad_loss_settings_are_named():
    with pytest.raises(FashionrecError, match="one of multi_similarity, supcon, got 'arcface'"):
        resolve("arcface")
    with pytest.raises(FashionrecError, match="unknown supcon setting"):
        resolve({"name": "supcon", "margin": 0.2})
    with pytest.raises(FashionrecError, match="weight must be a number > 0"):
        RunConfig(metric_loss="supcon", metric_weight=0.0)


def test_head_with_a_metric_loss_is_still_the_recipes_network(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(96) % 3
    x = (np.eye(3)[y] @ rng.normal(0, 3, (3, 16)) + rng.normal(0, 1, (96, 16))).astype(
        np.float32)
    head = ClassifierHead(3, epochs=3, batch_size=16, verbose=0,
                          metric_loss={"name": "multi_similarity", "weight": 0.5}).fit(x, y)
    assert head.model_.output_shape == (None, 3)  # one output: the softmax
    assert [layer.name for layer in head.model_.layers][2:4] == ["dropout_1", MID_LAYER]
    assert {"metric_loss", "softmax_loss", "accuracy", "val_accuracy"} <= set(head.history_)
    head.save(tmp_path / "h.keras", tmp_path / "h.json")
    state = json.loads((tmp_path / "h.json").read_text())
    assert state["params"]["metric_loss"] == {"name": "multi_similarity", "weight": 0.5,
                                              "alpha": 2.0, "beta": 40.0, "lambda": 0.5,
                                              "epsilon": 0.1}
    again = ClassifierHead.load(tmp_path / "h.keras", tmp_path / "h.json")
    np.testing.assert_allclose(again.embed(x), head.embed(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ expansion
def test_weighted_mean_follows_the_formula():
    v = np.array([[1.0, 0.0]], np.float32)
    nb = np.array([[[1.0, 1.0], [0.0, 2.0], [-1.0, 0.0]]], np.float32)
    # cosines 1/sqrt(2), 0, -1 -> weights 0.5 (alpha 2), 0, 0 (clipped)
    want = (np.array([1.0, 0.0]) + 0.5 * np.array([1.0, 1.0])) / 1.5
    np.testing.assert_allclose(weighted_mean(v, nb, 2.0)[0], want, rtol=1e-6)


def test_query_expansion_in_search_rows_is_the_two_searches():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(40, 6)).astype(np.float32)
    index = CatalogIndex(vectors, np.arange(40), np.arange(40) % 4, list("abcd"))
    q = rng.normal(size=(3, 6)).astype(np.float32)
    plain_rows, _ = index.search_rows(q, 5)
    index.query_expansion = {"k": 3, "alpha": 1.0}
    rows, _ = index.search_rows(q, 5, exclude_rows=[2, -1, -1], allowed_rows=np.arange(20))
    # by hand: brute-force neighbours (query 0 never gets row 2), weighted mean, search
    d = ((q[:, None] - vectors[None]) ** 2).sum(-1)
    d[0, 2] = np.inf
    nn = np.argsort(d, axis=1)[:, :3]
    cos = np.einsum("md,mkd->mk", unit(q), unit(vectors[nn].reshape(-1, 6)).reshape(3, 3, 6))
    w = np.clip(cos, 0, None)
    expanded = (q + np.einsum("mk,mkd->md", w, vectors[nn])) / (1 + w.sum(1, keepdims=True))
    d2 = ((expanded[:, None] - vectors[None, :20]) ** 2).sum(-1)
    d2[0, 2] = np.inf
    np.testing.assert_array_equal(rows, np.argsort(d2, axis=1)[:, :5])
    assert not np.array_equal(rows[1:], plain_rows[1:])  # it changed something


def test_dba_averages_each_item_with_its_nearest_others():
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(30, 5)).astype(np.float32)
    out = augment_catalog(vectors, ExactSearch(vectors), {"k": 2, "alpha": 0.0})
    d = ((vectors[:, None] - vectors[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :2]
    # alpha 0: weight 1 for each neighbour with positive cosine, 0 otherwise
    cos = np.einsum("nd,nkd->nk", unit(vectors), unit(vectors[nn].reshape(-1, 5)).reshape(
        30, 2, 5))
    w = (cos > 0).astype(np.float32)
    want = (vectors + np.einsum("nk,nkd->nd", w, vectors[nn])) / (1 + w.sum(1, keepdims=True))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    # expand() with no setting is the identity
    assert expand(vectors, vectors, ExactSearch(vectors), None) is not None


# ------------------------------------------------------------------ through a run
@pytest.fixture(scope="module")
def methods_run(tmp_path_factory, fmnist_dir):
    from conftest import TINY

    run = tmp_path_factory.mktemp("methods") / "run"
    assert main(["train", "--data-dir", str(fmnist_dir), "--run-dir", str(run),
                 "--no-progress", "--n-train", str(TINY["n_train"]), "--n-reco",
                 str(TINY["n_reco"]), "--image-size", "32", "--weights", "none",
                 "--epochs", "2", "--batch-size", "16", "--extract-batch-size", "16",
                 "--metric-loss", "supcon", "--metric-weight", "0.5",
                 "--qe-k", "2", "--dba-k", "3", "--dba-alpha", "1"]) == 0
    return run


def test_a_run_records_and_applies_its_methods(methods_run):
    meta = json.loads((methods_run / "run.json").read_text())
    assert meta["search"]["query_expansion"] == {"k": 2, "alpha": 3.0}
    assert meta["search"]["dba"] == {"k": 3, "alpha": 1.0}
    assert meta["head_loss"]["metric"] == {"name": "supcon", "weight": 0.5,
                                           "temperature": 0.1}
    rec = Recommender.load(methods_run)
    index = rec.index_
    assert index.query_expansion == {"k": 2, "alpha": 3.0}
    # the stored vectors are the DBA of the model's own embeddings of the catalog
    _, raw = rec.embedder_.encode_images(rec.test_images()[0][:len(index)])
    np.testing.assert_allclose(
        index.vectors, augment_catalog(raw, ExactSearch(raw), {"k": 3, "alpha": 1.0}),
        rtol=1e-4, atol=1e-4)


def test_a_fresh_process_gives_the_same_answers(methods_run):
    rec = Recommender.load(methods_run)
    here = [(i.id, round(i.distance, 4)) for i in rec.recommend(item=5, k=4).items]
    code = textwrap.dedent(f"""
        import json
        from fashionrec import Recommender
        rec = Recommender.load({str(methods_run)!r})
        print(json.dumps([(i.id, round(i.distance, 4)) for i in rec.recommend(item=5, k=4).items]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert [tuple(x) for x in json.loads(out.strip().splitlines()[-1])] == here


def test_index_turns_query_expansion_off_and_on(methods_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(methods_run, run)
    with_qe = Recommender.load(run).recommend(item=5, k=4)
    assert main(["index", "--run-dir", str(run), "--search", "exact", "--qe-k", "0"]) == 0
    meta = json.loads((run / "run.json").read_text())
    assert "query_expansion" not in meta["search"] and meta["search"]["dba"]
    rec = Recommender.load(run)
    assert rec.index_.query_expansion is None
    plain = rec.recommend(item=5, k=4)
    # without expansion the answer is the stored vectors' own nearest neighbours
    d = np.linalg.norm(rec.index_.vectors - rec.index_.vectors[5], axis=1)
    d[5] = np.inf
    assert [i.id for i in plain.items] == np.argsort(d, kind="stable")[:4].tolist()
    assert len(with_qe.items) == 4


def test_an_added_product_joins_with_dba(methods_run, tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    shutil.copytree(methods_run, run)
    rec = Recommender.load(run)
    image, _ = rec.query_image(7000)
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp_path / "new.png")
    before = rec.index_
    _, raw = rec.embedder_.encode_images(np.asarray(image, np.float32)[None])
    rec.add(Catalog.from_files([tmp_path / "new.png"], ids=[10000]), progress=False, log=None)
    row = rec.index_.row_of(10000)
    want = expand(raw, before.vectors, before.backend, {"k": 3, "alpha": 1.0})
    np.testing.assert_allclose(rec.index_.vectors[row], want[0], rtol=1e-4, atol=1e-4)


def test_bad_method_options_are_one_line_errors(tmp_path, fmnist_dir, capsys):
    for argv, msg in ((["--qe-k", "-1"], "--qe-k: '-1' must be >= 0"),
                      (["--metric-loss", "supcon", "--metric-weight", "0"],
                       "weight must be a number > 0"),
                      (["--dba-alpha", "-2"], "alpha must be a number >= 0")):
        try:
            code = main(["train", "--data-dir", str(fmnist_dir), "--run-dir",
                         str(tmp_path / "r"), *argv])
        except SystemExit as exc:  # argparse's own refusal
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code in (1, 2) and msg in err[-1] and "Traceback" not in "\n".join(err)


def test_the_service_applies_query_expansion(methods_run, tmp_path):
    pytest.importorskip("fastapi")
    from serving import serve_copy

    served = serve_copy(methods_run, tmp_path / "run", "key")
    client, run = next(served)
    try:
        got = client.get("/api/items/5/similar", params={"k": 4}).json()
    finally:
        served.close()
    v = Recommender.load(run).index_.vectors
    # by hand: item 5's stored vector expanded by its 2 nearest others, then searched
    q = expand(v[5:6], v, ExactSearch(v), {"k": 2, "alpha": 3.0}, exclude_rows=[5])
    d = np.linalg.norm(v - q, axis=1)
    d[5] = np.inf
    assert [i["id"] for i in got["items"]] == np.argsort(d, kind="stable")[:4].tolist()
