"""Search back-ends: exact float32 search against SciPy's cdist, HNSW recall and
filters, the merged search of a living index, and choosing a back-end."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from fashionrec import FashionrecError
from fashionrec.search import ExactSearch, LiveSearch, knn_search, resolve
from fashionrec.search.hnsw import HNSWSearch

faiss = pytest.importorskip("faiss")
HNSW = dict(m=16, ef_construction=64, ef_search=64)


def brute(queries, vectors, k, allowed=None, exclude=None):
    """Every distance by cdist in float64, sorted stably: (rows, distances)."""
    d = cdist(np.asarray(queries, np.float64), np.asarray(vectors, np.float64))
    if allowed is not None:
        keep = np.zeros(d.shape[1], bool)
        keep[allowed] = True
        d[:, ~keep] = np.inf
    if exclude is not None:
        for i, r in enumerate(exclude):
            if r >= 0:
                d[i, r] = np.inf
    rows = np.argsort(d, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(d, rows, axis=1)


def clustered(n, dim=24, centers=30, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim)) * 3
    return (c[rng.integers(0, centers, n)] + spread * rng.normal(size=(n, dim))).astype(
        np.float32)


def test_exact_equals_cdist_on_random_float32_data():
    rng = np.random.default_rng(3)
    V = rng.normal(size=(3000, 64)).astype(np.float32) * 5 + 2
    Q = rng.normal(size=(40, 64)).astype(np.float32) * 5 + 2
    for search in (ExactSearch(V), ExactSearch(V, block_rows=257, query_block=7)):
        rows, d = search.search(Q, 10)
        expect_rows, expect_d = brute(Q, V, 10)
        assert np.array_equal(rows, expect_rows)
        np.testing.assert_allclose(d, expect_d, atol=1e-4)


def test_exact_filters_and_exclusions_equal_cdist():
    V = clustered(2000)
    Q = V[[5, 17, 400]]
    allowed = np.flatnonzero(np.arange(2000) % 7 == 3)
    exclude = np.array([5, 17, 402])  # 17 and 402 are allowed rows, 5 is not
    rows, d = ExactSearch(V).search(Q, 6, allowed, exclude)
    expect_rows, expect_d = brute(Q, V, 6, allowed, exclude)
    assert np.array_equal(rows, expect_rows)
    np.testing.assert_allclose(d, expect_d, atol=1e-4)
    assert set(rows.ravel()) <= set(allowed) and 17 not in rows[1]


def test_duplicates_are_listed_by_row_with_true_distances():
    V = np.zeros((40, 3), np.float32)
    V[::2] = [3.0, 4.0, 0.0]  # 20 identical rows at distance 5 from the origin
    rows, d = knn_search([[3.0, 4.0, 0.0]], V, k=4)
    assert rows.tolist() == [[0, 2, 4, 6]] and d.tolist() == [[0.0] * 4]
    rows, d = knn_search([[0.0, 0.0, 0.0]], V, k=3)
    assert rows.tolist() == [[1, 3, 5]]
    rows, d = knn_search([[0.0, 0.0, 0.0]], V[::2], k=2)
    assert d.tolist() == [[5.0, 5.0]]  # not squared


def test_exact_searches_a_memory_map_in_place(tmp_path):
    V = clustered(500)
    np.save(tmp_path / "v.npy", V)
    mm = np.load(tmp_path / "v.npy", mmap_mode="r")
    search = ExactSearch(mm)
    assert search.vectors is mm  # not copied
    assert np.array_equal(search.search(V[:3], 5)[0], ExactSearch(V).search(V[:3], 5)[0])


def test_too_few_candidates_and_bad_queries_are_errors():
    search = ExactSearch(np.eye(3, dtype=np.float32))
    with pytest.raises(FashionrecError, match="too few items"):
        search.search(np.ones((1, 3)), 1, allowed=np.array([1]), exclude=np.array([1]))
    with pytest.raises(FashionrecError, match=r"\(M, 3\)"):
        search.search(np.ones((1, 4)), 1)
    assert search.search(np.ones((1, 3)), 99)[0].shape == (1, 3)  # k capped


def hnsw_over(V, **kw):
    return HNSWSearch.build(V, **{**HNSW, **kw})


def recall(rows, truth):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(rows, truth, strict=True)])


def test_hnsw_recall_on_a_clustered_set():
    V = clustered(5000)
    Q = V[:200] + 0.05 * np.random.default_rng(1).normal(size=(200, V.shape[1])).astype(
        np.float32)
    rows, d = hnsw_over(V).search(Q, 10)
    truth, truth_d = brute(Q, V, 10)
    assert recall(rows, truth) >= 0.95
    same = rows == truth  # where it found the true neighbour, the distance is the true one
    np.testing.assert_allclose(d[same], truth_d[same], atol=1e-4)


def test_hnsw_filters_keep_their_meaning():
    V = clustered(6000)
    labels = np.arange(6000) % 10
    Q = V[[11, 222, 3333]]
    exclude = np.array([11, 222, 3333])
    ann = hnsw_over(V, filter_exact_max=300)
    # selective (60 rows <= 300): answered exactly
    narrow = np.flatnonzero(labels == 1)[:60]
    rows, d = ann.search(Q, 6, narrow, exclude)
    assert np.array_equal(rows, brute(Q, V, 6, narrow, exclude)[0])
    # broad (half the rows): through the graph with a selector, still only allowed rows
    broad = np.flatnonzero(labels % 2 == 1)
    rows, d = ann.search(Q, 10, broad, exclude)
    assert set(rows.ravel()) <= set(broad) and not (rows == exclude[:, None]).any()
    assert recall(rows, brute(Q, V, 10, broad, exclude)[0]) >= 0.95
    assert np.all(np.diff(d, axis=1) >= 0)


def test_hnsw_never_returns_fewer_rows_than_exist():
    V = clustered(3000)
    ann = hnsw_over(V, filter_exact_max=1, ef_search=8)
    few = np.array([5, 900, 2999])  # 3 rows: above filter_exact_max, far apart
    rows, _ = ann.search(V[[0]], 3, few)
    assert sorted(rows[0].tolist()) == [5, 900, 2999]


def test_exact_gathers_a_filter_in_blocks_equal_to_cdist():
    V = clustered(3000)
    Q = V[[3, 1500, 2999]] + 0.01
    allowed = np.flatnonzero(np.arange(3000) % 3 != 1)
    exclude = np.array([3, 1501, -1])  # an allowed row, a row not allowed, none
    for search in (ExactSearch(V, block_rows=37), ExactSearch(V, block_rows=37, query_block=2)):
        rows, d = search.search(Q, 7, allowed, exclude)
        expect_rows, expect_d = brute(Q, V, 7, allowed, exclude)
        assert np.array_equal(rows, expect_rows)
        np.testing.assert_allclose(d, expect_d, atol=1e-4)
    search = ExactSearch(V)
    search.sqnorms()  # known norms are used for the gathered rows too
    assert np.array_equal(search.search(Q, 7, allowed, exclude)[0], expect_rows)


def classes(n, n_classes=10, dim=24, seed=0):
    """``(vectors, labels)``: well separated classes, each a few clusters."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    centers = rng.normal(size=(n_classes, 3, dim)) * 6
    V = centers[labels, rng.integers(0, 3, n)] + 0.4 * rng.normal(size=(n, dim))
    return V.astype(np.float32), labels


def test_hnsw_scans_a_broad_filter_far_from_the_query_exactly():
    V, labels = classes(6000)
    ann = hnsw_over(V, filter_exact_max=100)
    other = np.flatnonzero(labels == 3)  # ~600 rows: broad, but far from class-0 queries
    queries = np.flatnonzero(labels == 0)[:5]
    mask = np.zeros(len(V), bool)
    mask[other] = True
    assert ann._far(V[queries], mask, len(other)).all()
    for k in (10, len(other) - 1):  # exactly k, equal to brute force, up to all but one
        rows, d = ann.search(V[queries], k, other, queries)
        expect_rows, expect_d = brute(V[queries], V, k, other, queries)
        assert rows.shape == (5, k) and np.array_equal(rows, expect_rows)
        np.testing.assert_allclose(d, expect_d, atol=1e-4)


def test_hnsw_mixes_the_graph_and_the_scan_in_one_batch():
    V, labels = classes(6000)
    ann = hnsw_over(V, filter_exact_max=100)
    allowed = np.flatnonzero(labels == 2)
    inside, outside = np.flatnonzero(labels == 2)[:3], np.flatnonzero(labels == 5)[:3]
    queries = np.concatenate([inside, outside])
    mask = np.zeros(len(V), bool)
    mask[allowed] = True
    assert ann._far(V[queries], mask, len(allowed)).tolist() == [False] * 3 + [True] * 3
    rows, d = ann.search(V[queries], 10, allowed, queries)
    expect_rows, _ = brute(V[queries], V, 10, allowed, queries)
    assert set(rows.ravel()) <= set(allowed) and not (rows == queries[:, None]).any()
    assert np.array_equal(rows[3:], expect_rows[3:])  # scanned: exact
    assert recall(rows[:3], expect_rows[:3]) >= 0.95  # through the graph
    assert np.all(np.diff(d, axis=1) >= 0)


def test_hnsw_scan_of_a_tiny_filter_pads_nothing():
    V, labels = classes(3000)
    ann = hnsw_over(V, filter_exact_max=1)
    few = np.flatnonzero(labels == 4)[:3]
    rows, d = ann._scan(V[:2], 3, few, None)
    assert np.array_equal(np.sort(rows, axis=1), np.tile(few, (2, 1)))
    assert np.isfinite(d).all()


def test_hnsw_scan_split_over_threads_equals_brute_force(monkeypatch):
    import fashionrec.search.hnsw as hnsw

    monkeypatch.setattr(hnsw, "SCAN_THREADS", 3)
    monkeypatch.setattr(hnsw, "SCAN_PART_MIN", 50)  # 3 parts of the allowed rows
    V, labels = classes(4000)
    ann = hnsw_over(V)
    allowed = np.flatnonzero(labels % 3 == 1)
    queries = np.array([0, 1, 2, 3])
    for k in (1, 10, 60):
        rows, d = ann._scan(V[queries], k, allowed, queries)
        expect_rows, expect_d = brute(V[queries], V, k, allowed, queries)
        assert np.array_equal(rows, expect_rows)
        np.testing.assert_allclose(d, expect_d, atol=1e-4)
    # a selective filter (<= filter_exact_max) is answered by the same scan: exactly
    narrow = allowed[:40]
    rows, _ = ann.search(V[queries], 40, narrow, queries)
    assert np.array_equal(rows, brute(V[queries], V, 40, narrow, queries)[0][:, :rows.shape[1]])


def test_hnsw_save_load_memory_mapped_same_answers(tmp_path):
    V = clustered(2000)
    ann = hnsw_over(V)
    ann.save(tmp_path / "g.faiss")
    again = HNSWSearch.load(tmp_path / "g.faiss", V, **HNSW)
    assert again.params() == ann.params()
    a, b = ann.search(V[:20], 5), again.search(V[:20], 5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    (tmp_path / "bad.faiss").write_bytes(b"\0" * 100)
    with pytest.raises(FashionrecError, match="not a readable HNSW graph"):
        HNSWSearch.load(tmp_path / "bad.faiss", V, **HNSW)
    with pytest.raises(FashionrecError, match="holds 2000 x 24 vectors"):
        HNSWSearch.load(tmp_path / "g.faiss", V[:10], **HNSW)


def test_live_search_merges_the_graph_with_added_rows_and_skips_removed_ones():
    base = clustered(3000)
    added = clustered(50, seed=9)
    alive = np.setdiff1d(np.arange(3000), np.arange(0, 3000, 3))  # every third removed
    live_vectors = np.concatenate([base[alive], added])
    search = LiveSearch(hnsw_over(base), alive, ExactSearch(added))
    assert search.size == len(live_vectors)
    Q = np.concatenate([base[:4], added[:4]])
    rows, d = search.search(Q, 8)
    truth, truth_d = brute(Q, live_vectors, 8)
    assert recall(rows, truth) >= 0.95
    np.testing.assert_allclose(live_vectors[rows[4:, 0]], added[:4])  # added rows found
    # a removed base row is never returned, even when queried with its own vector
    rows, _ = search.search(base[[0, 3]], 5)
    assert not np.isin(live_vectors[rows.ravel()], base[[0, 3]]).all(axis=1).any()
    # filters and exclusions in live rows
    allowed = np.arange(len(live_vectors))[::2]
    exclude = np.array([0, 1, 2, 3, len(alive), len(alive) + 1, len(alive) + 2, 7])
    rows, _ = search.search(Q, 5, allowed, exclude)
    assert set(rows.ravel()) <= set(allowed) and not (rows == exclude[:, None]).any()


def test_resolve_picks_a_backend(monkeypatch):
    assert resolve("auto", 49_999) == {"backend": "exact"}
    spec = resolve("auto", 50_000)
    assert spec["backend"] == "hnsw" and spec["m"] >= 2
    assert resolve("auto", 10, hnsw_min_items=5, m=8)["m"] == 8
    assert resolve("exact", 10**7) == {"backend": "exact"}
    with pytest.raises(FashionrecError, match="must be one of"):
        resolve("fast", 10)
    import fashionrec.search as search

    monkeypatch.setattr(search, "hnsw_available", lambda: False)
    notes = []
    assert resolve("auto", 10**6, log=notes.append) == {"backend": "exact"}
    assert "faiss is not installed" in notes[0]
    with pytest.raises(FashionrecError, match=r"pip install 'fashionrec\[ann\]'"):
        resolve("hnsw", 10)
