"""Split folders, held-out products and the evaluation of product-catalog runs."""

import contextlib
import json
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
from catalogs import make_folder_catalog, make_split_catalog
from conftest import TINY_MODEL

from fashionrec import CatalogIndex, FashionrecError, Recommender
from fashionrec.artifacts import read_json
from fashionrec.catalog import Catalog, assign_splits, split_folders
from fashionrec.cli import main
from fashionrec.evaluate import evaluate, format_table
from fashionrec.head import ClassifierHead
from fashionrec.plots import confusion_figure, per_class_figure
from fashionrec.rundir import RunDir

# Four trainings in all, shared by the tests that only read them: the split-folder
# catalog through the command line (split_run) and again on train+validation (refit),
# the folder catalog with a held-out quarter, flipped (holdout_run) and not (in
# test_flip_...).


# ------------------------------------------------------------------ reading splits
def test_split_folders_give_class_below_the_split(tmp_path):
    ids = make_split_catalog(tmp_path / "shop")
    cat = Catalog.from_folder(tmp_path / "shop")
    assert cat.source["split_folders"] == ["test", "train", "validation"]
    assert len(cat) == sum(len(v) for v in ids.values()) == 42
    row = cat.ids.index(ids["test"][0])
    assert cat.splits[row] == "test" and cat.labels[row] == "Boots"
    assert cat.categories[row] == "Boots"  # the split is not part of the category
    assert sorted(set(cat.labels)) == ["Boots", "Sandals", "Totes"]
    assert {s: cat.splits.count(s) for s in set(cat.splits)} == {
        "train": 24, "validation": 9, "test": 9}


def test_val_folder_is_validation_and_plain_folders_are_not_splits(tmp_path):
    make_split_catalog(tmp_path / "a", {"train": 5, "val": 2}, val_name="val")
    cat = Catalog.from_folder(tmp_path / "a")
    assert set(cat.splits) == {"train", "validation"}
    make_folder_catalog(tmp_path / "b")
    assert split_folders(tmp_path / "b") == [] and Catalog.from_folder(tmp_path / "b").splits is None
    (tmp_path / "c" / "train" / "x").mkdir(parents=True)
    assert split_folders(tmp_path / "c") == []  # train/ alone is a class called train
    make_split_catalog(tmp_path / "d", {"train": 5, "val": 2, "validation": 2})
    with pytest.raises(FashionrecError, match="both val/ and validation/"):
        Catalog.from_folder(tmp_path / "d")


def test_file_outside_the_split_folders_is_reported(tmp_path):
    make_split_catalog(tmp_path, {"train": 5, "test": 2})
    (tmp_path / "stray.jpg").write_bytes((tmp_path / "train/Boots/train-00.jpg").read_bytes())
    cat = Catalog.from_folder(tmp_path)
    assert [s["kind"] for s in cat.skipped] == ["no split folder"]


def test_holdout_is_seeded_and_stratified(tmp_path):
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    cat = Catalog([str(i) for i in range(100)], [tmp_path] * 100, labels, labels)
    roles = assign_splits(cat, 0.2, seed=7)
    held = np.array(labels)[roles == "heldout"]
    assert {c: int((held == c).sum()) for c in "abc"} == {"a": 10, "b": 6, "c": 4}
    assert np.array_equal(roles, assign_splits(cat, 0.2, seed=7))
    assert not np.array_equal(roles, assign_splits(cat, 0.2, seed=8))
    assert (assign_splits(cat, None) == "train").all()
    with pytest.raises(FashionrecError, match="share in"):
        assign_splits(cat, 1.5)


def test_holdout_with_split_folders_is_refused(tmp_path):
    make_split_catalog(tmp_path, {"train": 5, "test": 2})
    with pytest.raises(FashionrecError, match="drop --holdout"):
        assign_splits(Catalog.from_folder(tmp_path), 0.2)


# ------------------------------------------------------------------ training
@contextlib.contextmanager
def head_fit_calls():
    """Records what every ClassifierHead.fit call is given, while in the block."""
    calls = []
    real = ClassifierHead.fit

    def spy(self, X, y, validation_data=None):
        calls.append({"X": np.array(X), "y": np.array(y), "validation_data": validation_data})
        return real(self, X, y, validation_data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ClassifierHead, "fit", spy)
        yield calls


@pytest.fixture
def fitted_with():
    """Records what every ClassifierHead.fit call in the test was given."""
    with head_fit_calls() as calls:
        yield calls


def _rows_of(features, subset):
    """Which rows of ``features`` appear (exactly) in ``subset``."""
    keys = {row.tobytes() for row in np.asarray(subset, np.float32)}
    return [i for i, row in enumerate(np.asarray(features, np.float32)) if row.tobytes() in keys]


def _stamps(folder):
    """The feature cache's files and their times (not its lock files)."""
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5")}


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """The split-folder catalog (train/, validation/, test/) trained once by
    ``fashionrec train`` with every setting a catalog run leaves to its defaults but the
    tiny model's; what the head was given is recorded. Tests only read it."""
    root = tmp_path_factory.mktemp("split-shop")
    ids = make_split_catalog(root)
    run_dir = tmp_path_factory.mktemp("split-run") / "run"
    with head_fit_calls() as calls:
        assert main(["train", "--catalog", str(root), "--run-dir", str(run_dir),
                     "--image-size", "32", "--weights", "none", "--epochs", "2",
                     "--batch-size", "8", "--no-progress"]) == 0
    return SimpleNamespace(root=root, ids=ids, run_dir=run_dir, calls=calls,
                           rec=Recommender.load(run_dir, log=None))


@pytest.fixture(scope="module")
def refit(split_run, tmp_path_factory):
    """The same catalog trained again, on train+validation, with a copy of split_run's
    feature cache (its file times recorded before and after)."""
    features = tmp_path_factory.mktemp("refit") / "features"
    shutil.copytree(split_run.run_dir / "features", features)
    before = _stamps(features)
    with head_fit_calls() as calls:
        rec = Recommender(**TINY_MODEL, train_on="train+validation").fit_catalog(
            Catalog.from_folder(split_run.root), cache_dir=features, progress=False, log=None)
    return SimpleNamespace(rec=rec, calls=calls, features=features, stamps_before=before,
                           stamps_after=_stamps(features))


@pytest.fixture(scope="module")
def holdout_run(tmp_path_factory):
    """The folder catalog (24 readable products in 3 classes) with a quarter held out,
    letterboxed and flipped (``image_fit="pad"``, catalog runs flip by default), trained
    once and saved. Tests only read it."""
    root = tmp_path_factory.mktemp("folder-shop")
    make_folder_catalog(root)
    run_dir = tmp_path_factory.mktemp("holdout-run") / "run"
    with head_fit_calls() as calls:
        rec = Recommender(**TINY_MODEL, image_fit="pad").fit_catalog(
            Catalog.from_folder(root, label_depth=2), holdout=0.25,
            cache_dir=run_dir / "features", progress=False, log=None)
    rec.save(run_dir)
    return SimpleNamespace(root=root, run_dir=run_dir, rec=rec, calls=calls)


def test_split_folder_run_never_trains_on_test_or_validation(split_run):
    ids, rec = split_run.ids, split_run.rec
    assert len(rec.index_) == 42  # every split is indexed
    feats = rec.catalog_features(split_run.run_dir / "features", progress=False)[0]
    (call,) = split_run.calls
    trained = _rows_of(feats, call["X"])
    assert sorted(str(rec.index_.ids[r]) for r in trained) == sorted(ids["train"])
    x_val, y_val = call["validation_data"]
    assert sorted(str(rec.index_.ids[r]) for r in _rows_of(feats, x_val)) == sorted(
        ids["validation"])
    assert rec.split_.method == "folders"
    assert sorted(rec.split_.heldout_ids) == sorted(ids["test"])
    assert rec.metadata_["dataset"]["split"]["heldout"] == 9


def test_train_on_train_and_validation_never_trains_on_test(split_run, refit, tmp_path):
    ids, rec = split_run.ids, refit.rec
    feats = rec.catalog_features(refit.features, progress=False)[0]
    (call,) = refit.calls
    trained = sorted(str(rec.index_.ids[r]) for r in _rows_of(feats, call["X"]))
    assert trained == sorted(ids["train"] + ids["validation"])
    assert call["validation_data"] is None and rec.head_.validation_split == 0.0
    assert "val_accuracy" not in rec.head_.history_
    assert rec.metadata_["config"]["train_on"] == "train+validation"
    assert rec.metadata_["config"]["n_train"] == len(ids["train"]) + len(ids["validation"])
    assert sorted(rec.split_.heldout_ids) == sorted(ids["test"])
    make_split_catalog(tmp_path / "noval", {"train": 5, "test": 2})
    with pytest.raises(FashionrecError, match="needs a validation split"):
        Recommender(**TINY_MODEL, train_on="train+validation").fit_catalog(
            Catalog.from_folder(tmp_path / "noval"), progress=False, log=None)


def test_holdout_run_records_and_reloads_its_held_out_products(holdout_run):
    rec, run_dir = holdout_run.rec, holdout_run.run_dir
    held = rec.split_.heldout_ids
    assert len(held) == 6 and rec.metadata_["dataset"]["split"]["train"] == 18
    feats = rec.catalog_features(run_dir / "features", progress=False)[0]
    trained = {str(rec.index_.ids[r]) for r in _rows_of(feats, holdout_run.calls[0]["X"])}
    assert trained.isdisjoint(held) and len(trained) == 18
    assert all(rec.index_.row_of(i) is not None for i in held)  # held out, still indexed
    split = read_json(RunDir(run_dir).current().split)
    assert split["heldout_ids"] == held and split["run_id"] == rec.run_id_
    assert Recommender.load(run_dir).split_.heldout_ids == held


# ------------------------------------------------------------------ evaluation by hand
def _toy_run(split_ids):
    """A run-shaped object small enough to score by hand: six products on a line,
    classes a a b | b a b; the head predicts class 0 for everything; raw features put
    every product at its own class's corner (cosine 1 within a class)."""
    vectors = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    labels = np.array([0, 0, 1, 1, 0, 1])
    index = CatalogIndex(vectors, np.array(list("uvwxyz")), labels, ["a", "b"], scaler=None)
    raw = np.eye(2)[labels] * np.arange(1, 7)[:, None]
    split = None if split_ids is None else SimpleNamespace(heldout_ids=split_ids)
    return SimpleNamespace(
        index_=index, split_=split, is_catalog=True,
        head_outputs=lambda views: (np.eye(2)[np.zeros(len(views[0]), dtype=int)], None),
        catalog_features=lambda cache_dir, progress: [raw])


def test_catalog_evaluation_by_hand():
    res = evaluate(_toy_run(["v", "y"]), ks=(1, 2), progress=False, log=None)
    assert res["optimistic"] is False and res["primary_metric"] == "heldout/map@2"
    h = res["heldout"]["overall"]
    # v (a): nearest u (a), w (b) -> P@1 1, P@2 1/2; y (a): x (b) and z (b) at 1 -> 0, 0
    assert h["precision@1"] == pytest.approx(0.5) and h["precision@2"] == pytest.approx(0.25)
    # relevant to v: u, y (2); to y: u, v (2). recall@2: v 1/2, y 0
    assert h["recall@2"] == pytest.approx(0.25)
    # AP@2: v = (P@1 * 1) / 2 = 0.5; y = 0
    assert h["map@2"] == pytest.approx(0.25)
    # raw cosine: every other class-a product is at distance 0 -> all relevant
    assert res["raw_cosine"]["overall"]["precision@2"] == 1.0
    assert res["head"]["accuracy"] == 1.0  # both held-out products are class a = 0
    assert res["head"]["confusion_matrix"] == [[2, 0], [0, 0]]
    table = format_table(res)
    assert "held-out queries" in table and "raw features, cosine" in table


def test_no_held_out_products_is_leave_one_out_and_says_optimistic():
    messages = []
    res = evaluate(_toy_run(None), ks=(1, 2), progress=False, log=messages.append)
    assert res["optimistic"] is True and "heldout" not in res
    assert res["catalog_loo"]["n_queries"] == 6
    assert any("OPTIMISTIC" in m for m in messages)
    # nearest other product: u->v (a, right), v->u (tie with w, lower row wins: right),
    # w->v (wrong), x->y (wrong), y->x (tie with z: wrong), z->y (wrong)
    assert res["catalog_loo"]["overall"]["precision@1"] == pytest.approx(2 / 6)
    assert "optimistic" in format_table(res)


def test_plots_show_every_query_set_and_class():
    res = evaluate(_toy_run(["v", "y"]), ks=(1, 6, 10), progress=False, log=None)
    fig = per_class_figure(res)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert len(ax.containers) == 2  # held-out and raw cosine
    assert all(len(c) == 2 for c in ax.containers)  # one bar per class
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == [
        "head accuracy", "held-out queries", "raw features, cosine (same queries)"]
    assert ax.get_title() == "precision@6 per class"
    conf = confusion_figure(res).axes[0]
    assert conf.get_title().startswith("head confusion matrix (2 held-out products")
    assert [t.get_text() for t in conf.get_yticklabels()] == ["a", "b"]


# ------------------------------------------------------------------ a real run, CLI
def test_evaluate_cli_on_a_split_folder_run(split_run, capsys):
    split_run = split_run.run_dir
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(split_run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "held-out queries" in out and "raw features, cosine" in out
    res = json.loads((split_run / "evaluation.json").read_text())
    assert res["heldout"]["n_queries"] == 9 and res["raw_cosine"]["n_queries"] == 9
    assert res["head"]["n_images"] == 9 and not res["optimistic"]
    for name in ("per_class.png", "confusion.png"):
        assert (split_run / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    assert main(["evaluate", "--run-dir", str(split_run), "--n-heldout", "3"]) == 1
    assert "--n-heldout is for Fashion-MNIST runs" in capsys.readouterr().err


def test_evaluate_reuses_the_feature_cache_in_a_fresh_process(split_run):
    """A fresh process scores the saved run the same, without extracting again."""
    split_run = split_run.run_dir
    here = evaluate(Recommender.load(split_run), cache_dir=split_run / "features",
                    progress=False, log=None)
    code = textwrap.dedent(f"""
        import json, fashionrec.extract as ex
        from fashionrec import Recommender
        from fashionrec.evaluate import evaluate
        ex.FeatureExtractor.transform_to_h5 = None  # any extraction would fail
        rec = Recommender.load({str(split_run)!r})
        res = evaluate(rec, cache_dir={str(split_run / "features")!r}, progress=False, log=None)
        print(json.dumps(res["heldout"]["overall"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == here["heldout"]["overall"]


def test_cli_refuses_bad_holdout(tmp_path, capsys):
    make_split_catalog(tmp_path / "shop", {"train": 5, "test": 2})
    assert main(["train", "--holdout", "0.2", "--run-dir", str(tmp_path / "r")]) == 1
    assert "only with --catalog" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--catalog", str(tmp_path / "shop"), "--holdout", "2"])
    assert "must be a share in (0, 1)" in capsys.readouterr().err
    assert main(["train", "--catalog", str(tmp_path / "shop"), "--holdout", "0.2",
                 "--run-dir", str(tmp_path / "r"), "--weights", "none"]) == 1
    assert "drop --holdout" in capsys.readouterr().err


def test_flip_trains_on_mirror_images_and_a_photo_equals_its_mirror(holdout_run, fitted_with):
    """A catalog run flips by default: the head sees every training product twice
    (as photographed and mirrored), and a photo's embedding is the mean of both, so a
    photo and its mirror image get the very same recommendations."""
    from PIL import Image, ImageOps

    rec = holdout_run.rec
    n_train = 18  # 24 products, a quarter of them held out
    assert rec.config.flip is True and rec.metadata_["dataset"]["flip"] is True
    assert len(holdout_run.calls[0]["X"]) == 2 * n_train
    # arrays of the full decode: a JPEG file is decoded at a reduced scale (draft), its
    # re-saved mirror would not be
    photo = np.asarray(Image.open(holdout_run.root / "Shoes/Boots/brand0/000.jpg")
                       .convert("RGB"))
    mirror = np.asarray(ImageOps.mirror(Image.fromarray(photo)))
    a, b = rec.recommend(photo, k=5), rec.recommend(mirror, k=5)
    assert [i.id for i in a.items] == [i.id for i in b.items]
    np.testing.assert_allclose([i.distance for i in a.items], [i.distance for i in b.items],
                               rtol=1e-4, atol=1e-4)
    off = Recommender(**TINY_MODEL, image_fit="pad", flip=False).fit_catalog(
        Catalog.from_folder(holdout_run.root, label_depth=2), holdout=0.25, progress=False,
        log=None)
    assert off.config.flip is False and len(fitted_with[0]["X"]) == n_train
    with pytest.raises(FashionrecError, match="are for product-catalog runs"):
        Recommender(**TINY_MODEL, flip=True).fit(log=None)


def test_several_fits_are_views_cached_once_each(split_run, refit):
    """The catalog default, ``image_fit="pad+crop"`` with flip: four views per product
    (letterboxed, cropped, each mirrored), each extracted once into its own cache file; a
    retrain (refit: the same catalog, on train+validation) reuses them."""
    rec = split_run.rec  # the catalog default: pad+crop, flip
    assert rec.config.image_fit == "pad+crop" and rec.config.views() == [
        ("pad", False), ("pad", True), ("crop", False), ("crop", True)]
    assert len(split_run.calls[0]["X"]) == 4 * len(split_run.ids["train"])
    names = sorted(p.name.rsplit("-", 1)[0]
                   for p in (split_run.run_dir / "features").glob("*.h5"))  # not the locks
    assert names == ["catalog", "catalog-crop", "catalog-crop-mirror", "catalog-pad-mirror"]
    assert len(refit.stamps_before) == 4 and refit.stamps_after == refit.stamps_before
    with pytest.raises(FashionrecError, match="image_fit must be one or more of"):
        Recommender(**TINY_MODEL, image_fit="pad+squash")


def test_unset_settings_take_the_kind_of_runs_defaults(split_run, tmp_path):
    """Fashion-MNIST keeps the design card's recipe; catalogs get the measured defaults;
    what was used is recorded (split_run leaves the learning rate, flip and pooling
    unset); a catalog run from before these settings reloads as letterboxed and
    unmirrored."""
    from fashionrec import RunConfig
    from fashionrec.config import CATALOG_DEFAULTS

    recipe = RunConfig().resolved()
    assert (recipe.epochs, recipe.learning_rate, recipe.flip, recipe.pooling) == (
        32, 4e-4, False, "avg")
    shop = RunConfig().resolved(catalog=True)
    assert shop.epochs == CATALOG_DEFAULTS["epochs"] and shop.image_fit == "pad+crop"
    assert RunConfig(epochs=5).resolved(catalog=True).epochs == 5  # given: kept
    run = shutil.copytree(split_run.run_dir, tmp_path / "run", symlinks=True)  # edited below
    saved = read_json(run / "run.json")["config"]
    assert saved["learning_rate"] == CATALOG_DEFAULTS["learning_rate"] and saved["flip"] is True
    assert saved["pooling"] == "gem" == read_json(run / "run.json")["backbone"]["pooling"]
    assert Recommender.load(run).recommend(item=split_run.ids["train"][0], k=3).items  # rebuilt
    meta = read_json(run / "run.json")
    meta["config"].pop("image_fit")
    meta["config"].pop("flip")
    (run / "run.json").write_text(json.dumps(meta))
    old = Recommender.load(run)
    assert old.config.image_fit == "pad" and old.config.flip is False


def test_removed_held_out_products_are_said_and_skipped():
    messages = []
    res = evaluate(_toy_run(["v", "gone"]), ks=(1, 2), progress=False, log=messages.append)
    assert res["heldout"]["n_queries"] == 1 and not res["optimistic"]
    assert any("1 held-out product(s) were removed" in m for m in messages)
    messages.clear()
    res = evaluate(_toy_run(["gone"]), ks=(1, 2), progress=False, log=messages.append)
    assert res["optimistic"] and any("all its held-out products were removed" in m
                                     for m in messages)
