import h5py
import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from fashionrec import CatalogIndex, FashionrecError, knn_search

# five points on a line: distances are easy to check by hand
LINE = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])


def test_knn_on_a_line_by_hand():
    rows, d = knn_search([[2.0]], LINE, k=3)
    assert rows.tolist() == [[1, 2, 0]]
    assert d.tolist() == [[1.0, 1.0, 2.0]]  # tie between rows 1 and 2 goes to the lower row


def test_knn_excludes_the_query_itself():
    rows, d = knn_search(LINE[[3]], LINE, k=2, exclude=np.array([3]))
    assert rows.tolist() == [[2, 4]] and d.tolist() == [[3.0, 4.0]]


def test_blocked_search_equals_brute_force():
    rng = np.random.default_rng(1)
    V, Q = rng.normal(size=(500, 8)), rng.normal(size=(7, 8))
    brute = np.sqrt(((Q[:, None, :] - V[None]) ** 2).sum(-1))
    expect = np.argsort(brute, axis=1, kind="stable")[:, :10]
    for block, qblock in ((13, 2), (64, 5), (10_000, 1024)):
        rows, d = knn_search(Q, V, k=10, block_size=block, query_block=qblock)
        assert np.array_equal(rows, expect)
        np.testing.assert_allclose(d, np.take_along_axis(brute, expect, axis=1))


def test_k_larger_than_catalog_is_capped():
    rows, _ = knn_search([[0.0]], LINE, k=99)
    assert rows.shape == (1, 5)


def make_index(n=20, d=4, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(3, 2, (n, d))
    return CatalogIndex(StandardScaler().fit_transform(emb), ids=np.arange(100, 100 + n), labels=np.arange(n) % 3,
                              class_names=["a", "b", "c"],
                              images=rng.integers(0, 255, (n, 28, 28)),
                              metadata={"run_id": "x", "backbone": "toy"}), emb


def test_index_excludes_by_id():
    index, emb = make_index()
    np.testing.assert_allclose(index.vectors.mean(0), 0, atol=1e-6)
    rows, d = index.search(index.vectors[[4]], k=3, exclude_ids=[104])
    assert 4 not in rows[0]
    rows, d = index.search(index.vectors[[4]], k=3)
    assert rows[0, 0] == 4 and d[0, 0] == 0


def test_save_load_round_trip(tmp_path):
    index, _ = make_index()
    index.save(tmp_path / "index.h5")
    loaded = CatalogIndex.load(tmp_path / "index.h5")
    for attr in ("vectors", "ids", "labels", "images"):
        assert np.array_equal(getattr(loaded, attr), getattr(index, attr))
    assert loaded.class_names == ("a", "b", "c") and loaded.metadata["backbone"] == "toy"
    assert loaded.scaler is None  # the model keeps the embedding scaler, not the index
    with h5py.File(tmp_path / "index.h5") as f:
        assert f.attrs["format"] == "fashionrec-index"


def test_foreign_and_corrupt_files_are_refused(tmp_path):
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(FashionrecError, match="foreign HDF5"):
        CatalogIndex.load(tmp_path / "foreign.h5")
    index, _ = make_index()
    index.save(tmp_path / "good.h5")
    raw = (tmp_path / "good.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(FashionrecError, match="corrupt or not a fashionrec index"):
        CatalogIndex.load(tmp_path / "cut.h5")
    with pytest.raises(FashionrecError, match="does not exist"):
        CatalogIndex.load(tmp_path / "missing.h5")


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    index, _ = make_index()
    path = index.save(tmp_path / "index.h5")
    before = path.read_bytes()
    monkeypatch.setattr(index, "images", object())  # not an array: save fails mid-way
    with pytest.raises(TypeError):
        index.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["index.h5"]
