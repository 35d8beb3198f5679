"""Metrics and plots on hand-built cases; the expected value is written next to each check."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba

from gedi_nesy.plots import save_confusion_png, save_image_grid, save_panels_png
from gedi_nesy.shortcuts import metrics as M

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = Path(__file__).resolve().parents[1]


# --- Clustering -------------------------------------------------------------------------------


def test_mapped_accuracy_renames_the_clusters_before_comparing() -> None:
    # clusters 0, 1, 2 renamed to 1, 0, -1: predictions read 1, 0, -1, 1 against 1, 0, 2, 2
    assert M.mapped_accuracy([1, 0, 2, 2], [0, 1, 2, 0], np.array([1, 0, -1])) == 0.5
    m = np.array([1, 0, 2])  # the same with cluster 2 named 2: 3 of 4
    assert M.mapped_accuracy([1, 0, 2, 2], [0, 1, 2, 0], m) == 0.75


def test_confusion_matrix_rows_true_cols_pred() -> None:
    m = M.confusion_matrix([0, 0, 1, 2], [1, 1, 1, 0], n_true=3, n_pred=2)
    np.testing.assert_array_equal(m, [[0, 2], [0, 1], [1, 0]])  # M[i, j] = #{true=i, pred=j}


def test_permuted_perfect_classifier() -> None:
    true = np.repeat(np.arange(10), 3)  # 30 samples, 3 per digit
    pred = (true + 1) % 10  # every digit shifted by one: a perfect permutation
    m = M.confusion_matrix(true, pred, 10, 10)
    assert M.accuracy(true, pred) == 0.0  # raw Acc(C) = 0
    assert M.clustering_accuracy(true, pred, 10) == 1.0  # Hungarian-matched Acc(C) = 1
    assert M.hard_concept_collapse(m) == 0.0  # every value predicted
    assert M.soft_concept_collapse(m) == pytest.approx(0.0)  # each column max share = 1
    assert M.nmi(true, pred) == pytest.approx(1.0)  # same partition
    assert M.ari(true, pred) == pytest.approx(1.0)
    assert M.implemented_concept_map(m) == (1, 2, 3, 4, 5, 6, 7, 8, 9, 0)
    assert not M.is_intended_map(M.implemented_concept_map(m))  # identity is the default
    np.testing.assert_array_equal(
        M.hungarian_mapping(true, pred, 10, 10), [9, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    )  # cluster j -> digit j - 1


def test_constant_classifier_collapses() -> None:
    true = np.arange(10)  # one sample per digit
    pred = np.zeros(10, dtype=np.int64)  # always predicts 0
    m = M.confusion_matrix(true, pred, 10, 10)
    assert M.hard_concept_collapse(m) == pytest.approx(0.9)  # 1 - 1/10: only column 0 used
    assert M.soft_concept_collapse(m) == pytest.approx(0.9)  # column 0 max share 1, others 0
    assert M.accuracy(true, pred) == pytest.approx(0.1)  # only digit 0 right
    assert M.implemented_concept_map(m) == (0,) * 10
    assert M.n_used_clusters(pred, 10) == 1


def test_soft_collapse_hand_built_matrix() -> None:
    m = np.array([[2, 1, 0], [0, 3, 0], [1, 1, 2]])
    # Mhat rows: [2/3, 1/3, 0], [0, 1, 0], [1/4, 1/4, 1/2]; column maxima 2/3, 1, 1/2
    assert M.soft_concept_collapse(m) == pytest.approx(1 - (2 / 3 + 1 + 1 / 2) / 3)  # 5/18
    assert M.hard_concept_collapse(m) == 0.0  # all three columns used
    assert M.implemented_concept_map(m) == (0, 1, 2)
    assert M.is_intended_map(M.implemented_concept_map(m))


def test_collapse_ignores_empty_true_rows() -> None:
    m = np.array([[3, 0], [0, 0]])  # true value 1 never occurs
    assert M.soft_concept_collapse(m) == pytest.approx(0.5)  # column maxima 1, 0
    assert M.hard_concept_collapse(m) == pytest.approx(0.5)
    assert M.implemented_concept_map(m) == (0, -1)  # absent class maps to -1


def test_hungarian_more_clusters_than_labels() -> None:
    true = [0, 0, 0, 1, 1, 1]
    pred = [2, 2, 1, 0, 0, 0]  # 3 clusters, 2 labels
    # counts: cluster 0 -> label 1 (3), cluster 1 -> label 0 (1), cluster 2 -> label 0 (2)
    np.testing.assert_array_equal(M.hungarian_mapping(true, pred, 2, 3), [1, -1, 0])
    assert M.clustering_accuracy(true, pred, 2, 3) == pytest.approx(5 / 6)  # cluster 1 unmatched


def test_hungarian_fewer_clusters_than_labels() -> None:
    true = [0, 0, 1, 1, 2, 2]
    pred = [0, 0, 1, 1, 1, 0]  # 2 clusters, 3 labels
    np.testing.assert_array_equal(M.hungarian_mapping(true, pred, 3, 2), [0, 1])
    assert M.clustering_accuracy(true, pred, 3, 2) == pytest.approx(4 / 6)  # label 2 unmatched


def test_cluster_usage_and_used_count() -> None:
    np.testing.assert_allclose(M.cluster_usage([0, 0, 1, 3], 4), [0.5, 0.25, 0.0, 0.25])
    assert M.n_used_clusters([0, 0, 1, 3], 4) == 3


def test_ood_auroc() -> None:
    assert M.ood_auroc([0.9, 0.8], [0.1, 0.2]) == 1.0  # perfectly separated
    assert M.ood_auroc([0.1, 0.2], [0.9, 0.8]) == 0.0  # reversed
    assert M.ood_auroc([0.5, 0.5], [0.5, 0.5]) == 0.5  # all tied
    assert M.ood_auroc([3.0, 1.0], [2.0]) == 0.5  # one of two pairs ordered right


def test_clustering_report_keys_and_values() -> None:
    report = M.clustering_report([0, 0, 1, 1], [1, 1, 0, 0], 2)
    assert report == {
        "cluster_acc": 1.0,  # swap matched
        "cluster_nmi": pytest.approx(1.0),
        "cluster_ari": pytest.approx(1.0),
        "cluster_usage": [0.5, 0.5],
        "n_used_clusters": 2,
    }


# --- Reasoning shortcuts ----------------------------------------------------------------------


def test_f1_by_hand() -> None:
    true = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    # class 0: P 2/2, R 2/3, F1 0.8; class 1: P 1/2, R 1/2, F1 0.5; class 2: P 1/2, R 1, F1 2/3
    assert M.macro_f1(true, pred) == pytest.approx(59 / 90)  # (0.8 + 0.5 + 2/3) / 3
    assert M.weighted_f1(true, pred) == pytest.approx(61 / 90)  # (3*0.8 + 2*0.5 + 1*2/3) / 6
    assert M.accuracy(true, pred) == pytest.approx(4 / 6)


def test_per_class_accuracy_by_hand() -> None:
    m = M.confusion_matrix([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 4, 4)  # value 3 absent
    per_class = M.per_class_accuracy(m)
    np.testing.assert_allclose(per_class[:3], [2 / 3, 1 / 2, 1.0])
    assert math.isnan(per_class[3])  # no true sample of class 3
    assert M.mean_per_class_accuracy(m) == pytest.approx(13 / 18)  # (2/3 + 1/2 + 1) / 3


def test_ece_four_samples_by_hand() -> None:
    probs = np.array([[0.95, 0.05], [0.91, 0.09], [0.35, 0.65], [0.45, 0.55]])
    true = np.array([0, 1, 1, 0])
    # bin (0.9, 1]: conf 0.95 right, 0.91 wrong -> 2/4 * |1/2 - 0.93| = 0.215
    # bin (0.6, 0.7]: conf 0.65 right -> 1/4 * |1 - 0.65| = 0.0875
    # bin (0.5, 0.6]: conf 0.55 wrong -> 1/4 * |0 - 0.55| = 0.1375
    assert M.concept_ece(probs, true) == pytest.approx(0.44)


def test_ece_perfectly_confident_and_right_is_zero() -> None:
    assert M.concept_ece(np.eye(3), [0, 1, 2]) == 0.0  # conf 1, acc 1


def test_mean_normalized_entropy() -> None:
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert M.mean_normalized_entropy(probs) == pytest.approx(0.5)  # (1 + 0) / 2


def test_intended_map_other_than_identity() -> None:
    shortcut = tuple((d + 5) % 10 for d in range(10))  # the bijective EvenOdd shortcut
    assert M.is_intended_map(shortcut, shortcut)
    assert not M.is_intended_map(shortcut)


def test_rs_rate_small_table() -> None:
    acc_y = [0.95, 0.95, 0.80, 0.90, 0.99]
    acc_c = [0.10, 0.95, 0.10, 0.899, 0.90]
    # RS: seed 0 (solved, wrong concepts) and seed 3 (Acc(Y) = 0.9 counts, 0.899 < 0.9)
    assert M.rs_rate(acc_y, acc_c) == pytest.approx(2 / 5)
    assert M.rs_rate(acc_y, acc_c, task_threshold=0.7, concept_threshold=0.5) == pytest.approx(
        2 / 5
    )  # seeds 0 and 2
    assert M.rs_rate(acc_y, acc_c, concept_threshold=1.0) == pytest.approx(4 / 5)  # all but 2


def test_concept_report_permuted_classifier() -> None:
    true = np.array([0, 1, 2, 0, 1, 2])
    pred = (true + 1) % 3
    probs = np.eye(3)[pred]  # (6, 3) one-hot on the prediction
    report = M.concept_report(true, pred, probs, 3)
    assert report["acc_c"] == 0.0
    assert report["acc_c_matched"] == 1.0
    assert report["nmi_c"] == pytest.approx(1.0)
    assert report["f1_c_macro"] == 0.0
    assert report["f1_c_weighted"] == 0.0
    assert report["acc_c_per_class"] == [0.0, 0.0, 0.0]
    assert report["acc_c_per_class_mean"] == 0.0
    assert report["collapse_hard"] == 0.0
    assert report["collapse_soft"] == pytest.approx(0.0)
    assert report["ece_c"] == 1.0  # conf 1, acc 0
    assert report["entropy_c"] == 0.0
    assert report["concept_map"] == [1, 2, 0]
    assert report["concept_map_is_intended"] == 0.0  # identity by default
    shifted = M.concept_report(true, pred, probs, 3, intended=(1, 2, 0))
    assert shifted["concept_map_is_intended"] == 1.0


def test_torch_tensors_are_accepted() -> None:
    true = torch.tensor([0, 1, 1])
    pred = torch.tensor([0, 1, 0])
    assert M.accuracy(true, pred) == pytest.approx(2 / 3)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], requires_grad=True)
    assert M.mean_normalized_entropy(probs) > 0.0


# --- Input validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: M.accuracy([0, 1], [0]), "differ in length"),
        (lambda: M.accuracy([], []), "empty"),
        (lambda: M.accuracy([[0, 1]], [[0, 1]]), "1-D"),
        (lambda: M.accuracy([0.0, 1.0], [0, 1]), "integer"),
        (lambda: M.confusion_matrix([0, 3], [0, 1], 3, 3), r"allowed \[0, 2\]"),
        (lambda: M.confusion_matrix([0, 1], [0, -1], 3, 3), r"allowed \[0, 2\]"),
        (lambda: M.hungarian_mapping([0, 1], [0, 5], 2, 2), "pred has labels"),
        (lambda: M.cluster_usage([0, 1], 0), "positive int"),
        (lambda: M.ood_auroc([], [0.1]), "non-empty"),
        (lambda: M.concept_ece(np.full((2, 2), 0.7), [0, 1]), "sum to 1"),
        (lambda: M.concept_ece(np.eye(2), [0, 1, 1]), "one each"),
        (lambda: M.concept_ece(np.eye(2), [0, 2]), "allowed"),
        (lambda: M.mean_normalized_entropy(np.ones((2, 1))), "K >= 2"),
        (lambda: M.soft_concept_collapse(np.ones((2, 3))), "square"),
        (lambda: M.is_intended_map((0, 1), (0, 1, 2)), "entries"),
        (lambda: M.rs_rate([0.9, 0.8], [0.1]), "seeds"),
        (lambda: M.rs_rate([95.0], [10.0]), "percentages"),
        (lambda: M.concept_report([0, 1], [0, 1], np.eye(3), 2), "shape"),
    ],
)
def test_bad_input_raises_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --- Plots ------------------------------------------------------------------------------------


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 100
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_save_confusion_png(tmp_path: Path) -> None:
    m = M.confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], 3, 3)
    out = save_confusion_png(
        m, tmp_path / "cm" / "c.png", row_labels=["a", "b", "c"], col_labels=["0", "1", "2"]
    )
    _assert_png(out)


def test_save_image_grid(tmp_path: Path) -> None:
    images = torch.linspace(-1.0, 1.0, 5 * 28 * 28).reshape(5, 1, 28, 28)  # (5, 1, 28, 28)
    out = save_image_grid(images, tmp_path / "grid.png", nrow=3)
    _assert_png(out)
    width, height = int.from_bytes(out.read_bytes()[16:20]), int.from_bytes(out.read_bytes()[20:24])
    assert (width, height) == ((3 * 30 + 2) * 2, (2 * 30 + 2) * 2)  # 3 x 2 tiles, pad 2, scale 2


def test_save_panels_png_gives_a_method_one_colour_in_every_panel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gedi_nesy.plots as plots

    figures = []
    save = plots._save_atomic

    def keep(fig: Any, path: Any, dpi: int) -> Path:
        figures.append(fig)
        return save(fig, path, dpi)

    monkeypatch.setattr(plots, "_save_atomic", keep)
    names = [f"m{i}" for i in range(12)]  # more methods than tab10 has colours
    panels = {  # the right panel lists the methods in the opposite order and leaves one out
        "raw": {name: [0.1 * i, 0.05 * i] for i, name in enumerate(names)},
        "matched": {name: [0.2, 0.3] for name in reversed(names[1:])},
    }
    out = save_panels_png([100, 1000], panels, tmp_path / "p.png", xlabel="n", ylabel="Acc(C)",
                          title="bench", logx=True)  # fmt: skip
    _assert_png(out)
    (fig,) = figures
    colours = []  # per panel: method name -> RGBA of its line
    for ax in fig.axes:
        lines = {bars.get_label(): bars.lines[0].get_color() for bars in ax.containers}
        colours.append({name: to_rgba(colour) for name, colour in lines.items()})
    raw, matched = colours
    assert set(raw) == set(names) and set(matched) == set(names[1:])
    assert all(matched[name] == raw[name] for name in matched)  # the same colour in both panels
    assert len(set(raw.values())) == len(names)  # and no two methods share one


def test_plot_input_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        save_image_grid(np.zeros((2, 3, 4, 4)), tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"error bars for \['a'\] in panel 'raw' have no line"):
        save_panels_png([1], {"matched": {"a": [1]}}, tmp_path / "p.png", xlabel="x",
                        ylabel="y", yerr_panels={"raw": {"a": [0]}})  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # nothing written on error


def test_importing_plots_selects_no_backend() -> None:
    code = (
        "import sys, matplotlib, gedi_nesy.plots; "
        "assert matplotlib.get_backend(auto_select=False) is None, 'backend selected at import'; "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported at import time'"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # no preset backend
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, check=True)


def test_concept_label_metrics_are_the_report_keys_that_change_when_the_labels_do() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=200)  # (200, 4)
    pred = probs.argmax(-1)
    true = np.where(rng.random(200) < 0.7, pred, rng.integers(0, 4, 200))  # 70% agreement
    before = M.concept_report(true, pred, probs, 4)
    after = M.concept_report(rng.permutation(true), pred, probs, 4)
    changed = {key for key in before if before[key] != after[key]}
    assert changed == M.CONCEPT_LABEL_METRICS == set(before) - {"entropy_c", "collapse_hard"}
    assert M.reads_concept_labels("ood_digit_net.acc_c") and M.reads_concept_labels("nmi_c")
    assert not M.reads_concept_labels("train_min_usage_c")
    assert not M.reads_concept_labels("best_val_task_acc")


def test_ece_after_matching_renames_the_values_first() -> None:
    true = np.repeat(np.arange(4), 5)  # (20,) five images of each value
    probs = np.full((20, 4), 0.1 / 3)  # (20, 4) confidence 0.9 on value (c + 1) mod 4
    probs[np.arange(20), (true + 1) % 4] = 0.9
    report = M.concept_report(true, probs.argmax(-1), probs, 4)
    assert report["ece_c"] == pytest.approx(0.9)  # every raw prediction wrong at 0.9
    assert report["ece_c_matched"] == pytest.approx(0.1)  # every matched one right at 0.9
