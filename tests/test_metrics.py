"""finetune.py metrics (numpy) against sklearn / scipy / seqeval on random inputs; GLUE table layout."""
import numpy as np
import pytest

import eval as ev
import finetune as ft

SEEDS = range(20)


@pytest.mark.parametrize("seed", SEEDS)
def test_classification_metrics_match_sklearn(seed):
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < rng.random(), y, rng.integers(0, 2, n))  # correlated with y, to varying degrees
    assert ft.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)
    assert ft.f1_binary(p, y) == pytest.approx(skm.f1_score(y, p, zero_division=0), abs=1e-12)
    assert ft.matthews(p, y) == pytest.approx(skm.matthews_corrcoef(y, p), abs=1e-12)
    k = int(rng.integers(3, 6))  # multi-class MCC (sklearn's generalisation)
    y3, p3 = rng.integers(0, k, n), rng.integers(0, k, n)
    p3 = np.where(rng.random(n) < 0.5, y3, p3)
    assert ft.matthews(p3, y3) == pytest.approx(skm.matthews_corrcoef(y3, p3), abs=1e-12)


def test_degenerate_classification():
    skm = pytest.importorskip("sklearn.metrics")
    y = np.array([0, 1, 1, 0, 1])
    for p in (np.zeros(5, int), np.ones(5, int)):  # constant predictions: MCC 0 (undefined)
        assert ft.matthews(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
        assert ft.f1_binary(p, y) == pytest.approx(skm.f1_score(y, p, zero_division=0))
    assert ft.matthews(y, y) == 1.0 and ft.matthews(1 - y, y) == -1.0
    assert ft.f1_binary([0, 0], [0, 0]) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_correlations_match_scipy(seed):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 500))
    y = np.round(rng.uniform(0, 5, n) * 5) / 5  # STS-B-like scores with many ties
    x = y + rng.normal(0, rng.uniform(0.1, 3), n)
    if seed % 3 == 0:
        x = np.round(x)  # ties in the predictions too
    assert ft.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10)
    assert ft.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)
    np.testing.assert_allclose(ft.rankdata(x), stats.rankdata(x))
    np.testing.assert_allclose(ft.rankdata(y), stats.rankdata(y))


def test_rankdata_ties_by_hand():
    assert ft.rankdata([10, 20, 10, 30, 20, 10]).tolist() == [2.0, 4.5, 2.0, 6.0, 4.5, 2.0]
    assert np.isnan(ft.pearson([1, 1, 1], [1, 2, 3]))


def random_tags(rng, n, types=("PER", "LOC", "ORG")):
    """Random tag sequences, including IOB1-style and invalid transitions (I- after O / another type)."""
    out = []
    for _ in range(n):
        out.append([str(rng.choice(["O", "O", "O"] + [f"{b}-{t}" for b in "BI" for t in types]))
                    for _ in range(int(rng.integers(1, 25)))])
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_ner_f1_matches_seqeval(seed):
    sq = pytest.importorskip("seqeval.metrics")
    rng = np.random.default_rng(seed)
    gold = random_tags(rng, int(rng.integers(1, 60)))
    pred = [[t if rng.random() < 0.7 else str(rng.choice(["O", "B-PER", "I-PER", "I-LOC", "B-ORG"])) for t in s] for s in gold]
    r = ft.ner_scores(gold, pred)
    assert r["f1"] == pytest.approx(sq.f1_score(gold, pred), abs=1e-12)
    assert r["precision"] == pytest.approx(sq.precision_score(gold, pred), abs=1e-12)
    assert r["recall"] == pytest.approx(sq.recall_score(gold, pred), abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_entities_match_seqeval_chunks(seed):
    seqeval = pytest.importorskip("seqeval.metrics.sequence_labeling")
    rng = np.random.default_rng(100 + seed)
    for tags in random_tags(rng, 30):
        assert ft.entities(tags) == seqeval.get_entities(tags)


def test_entities_by_hand():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG", "O", "B-MISC"]
    assert ft.entities(tags) == [("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5), ("ORG", 6, 6), ("MISC", 8, 8)]
    r = ft.ner_scores([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]])  # exact span: a partial match is wrong
    assert r == dict(precision=0.0, recall=0.0, f1=0.0)


def test_task_metrics_keys():
    assert set(ft.task_metrics("cola", [0, 1], [0, 1])) == {"acc", "mcc"}
    assert set(ft.task_metrics("mrpc", [0, 1], [0, 1])) == {"acc", "f1", "acc_f1"}
    assert set(ft.task_metrics("stsb", [0.1, 1.0, 2.0], [0.0, 1.5, 2.5])) == {"pearson", "spearman", "corr"}
    assert set(ft.task_metrics("conll", [["O"]], [["O"]])) == {"precision", "recall", "f1"}
    assert set(ft.task_metrics("rte", [0], [0])) == {"acc"}


def test_glue_table_order_and_average():
    row = ev.glue_row({"rte": {"acc": 0.6}, "mrpc": {"acc": 0.8, "f1": 0.9}, "mnli": {"m_acc": 0.8, "mm_acc": 0.7},
                       "conll": {"f1": 0.9}})
    assert row["RTE"] == pytest.approx(60) and row["MRPC"] == pytest.approx(90) and row["SST-2"] is None
    assert row["Avg"] == pytest.approx((60 + 90 + 80 + 70) / 4)  # CoNLL is not part of the GLUE average
    md = ev.markdown_table({"ours": row})
    head = md.splitlines()[0]
    order = ["SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "QNLI", "RTE", "CoLA", "Avg", "CoNLL"]
    assert [head.index(c) for c in order] == sorted(head.index(c) for c in order)
    assert "| ours | – | 90.0 |" in md
