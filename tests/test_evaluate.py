import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from fashionrec import CatalogIndex
from fashionrec.cli import main
from fashionrec.evaluate import (
    average_precision_at_k,
    evaluate,
    evaluate_vectors,
    format_table,
    one_nn_accuracy,
    precision_at_k,
    recall_at_k,
    retrieval_scores,
)

# two queries, three retrieved items each; small enough to check by hand
REL = np.array([[1, 0, 1],
                [0, 0, 1]], dtype=bool)
N_REL = np.array([2, 1])


def test_precision_at_k_by_hand():
    assert precision_at_k(REL, 1).tolist() == [1.0, 0.0]
    np.testing.assert_allclose(precision_at_k(REL, 3), [2 / 3, 1 / 3])


def test_recall_at_k_by_hand():
    assert recall_at_k(REL, N_REL, 1).tolist() == [0.5, 0.0]
    assert recall_at_k(REL, N_REL, 3).tolist() == [1.0, 1.0]
    assert np.isnan(recall_at_k(REL[:1], [0], 3)[0])  # nothing relevant exists


def test_average_precision_by_hand():
    # q0: (P@1 * 1 + P@3 * 1) / min(3, 2) = (1 + 2/3) / 2; q1: (P@3 * 1) / 1 = 1/3
    np.testing.assert_allclose(average_precision_at_k(REL, N_REL, 3), [5 / 6, 1 / 3])
    # perfect ranking scores 1
    assert average_precision_at_k(np.array([[1, 1, 0]]), [2], 3).tolist() == [1.0]


def test_one_nn_accuracy_is_precision_at_1():
    assert one_nn_accuracy(REL).tolist() == precision_at_k(REL, 1).tolist() == [1.0, 0.0]


def test_retrieval_scores_from_labels():
    s = retrieval_scores(np.array([0, 1]), np.array([[0, 1, 0], [0, 0, 1]]), N_REL, ks=(1, 3))
    np.testing.assert_allclose(s["map@3"], [5 / 6, 1 / 3])
    assert set(s) == {"precision@1", "precision@3", "recall@1", "recall@3", "map@3",
                      "1nn_accuracy"}


def test_leave_one_out_on_toy_clusters():
    # two tight clusters on a line: every neighbour is in the query's class
    emb = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    index = CatalogIndex(StandardScaler().fit_transform(emb), np.arange(6), [0, 0, 0, 1, 1, 1], ["a", "b"])
    res = evaluate_vectors(index, index.vectors, index.labels, np.arange(6), ks=(1, 2))
    assert res["overall"]["precision@1"] == 1.0 and res["overall"]["precision@2"] == 1.0
    assert res["overall"]["recall@2"] == 1.0 and res["overall"]["map@2"] == 1.0
    assert res["per_class"]["a"]["n_queries"] == 3
    # with k beyond the cluster, precision drops exactly as counted
    res = evaluate_vectors(index, index.vectors, index.labels, np.arange(6), ks=(3,))
    assert res["overall"]["precision@3"] == pytest.approx(2 / 3)


def test_evaluate_a_run(trained_run):
    rec, run_dir = trained_run
    res = evaluate(rec, n_heldout=12, cache_dir=run_dir / "features", progress=False, log=None)
    assert res["catalog_loo"]["n_queries"] == 24 and res["heldout"]["n_queries"] == 12
    assert res["primary_metric"] == "heldout/map@10"
    assert res["head"]["n_images"] == 36
    assert np.array(res["head"]["confusion_matrix"]).sum() == 36
    for value in res["heldout"]["overall"].values():
        assert 0.0 <= value <= 1.0
    assert "held-out queries" in format_table(res)


def test_evaluate_cli(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    out = tmp_path / "ev.json"
    assert main(["evaluate", "--run-dir", str(run_dir), "--n-heldout", "8", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "precision@6" in text and "map@10" in text and out.is_file()
    assert (run_dir / "plots" / "per_class.png").is_file()
    assert (run_dir / "plots" / "confusion.png").is_file()
    assert main(["evaluate", "--run-dir", str(run_dir), "--n-heldout", "99999"]) == 1
    assert "n_heldout must be in" in capsys.readouterr().err
