"""A label-free run never reads concept labels (issue 15's protocol): shuffling which digit label
each image carries, after the task has built its sums, leaves the trained network and every
metric that does not read digit labels bit-identical. The one-label baseline reads them, so there
the same shuffle must change the network: that is what shows the shuffle reaches the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gedi_nesy.cli import main
from gedi_nesy.shortcuts.metrics import reads_concept_labels

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(REPO_ROOT / "configs/smoke_train.yaml")  # 4 steps, every GEDI term on

CLOCK_KEYS = {"train_seconds", "queries_per_s"}  # wall-clock time, never equal across runs

# Short runs of each label-free method on the smoke config (every GEDI term on unless switched off).
LABEL_FREE = {
    "gedi": [],  # the full objective: L_GEN, L_INV, L_PRIOR
    "gedi+overclustering+relabelling": [
        "model.clusters_per_value=2",  # 20 clusters for 10 digits
        "optim.gedi_only_steps=1",  # the GEDI-only warm-up
        "optim.relabel_every=1",  # logic-guided relabelling after steps 2 and 3
        "gedi.clean_view=true",
    ],
    "swav": ["gedi.method=swav", "gedi.w_gen=0"],
    "entropy": ["gedi.w_gen=0", "gedi.w_inv=0", "gedi.w_prior=0", "gedi.w_marginal_entropy=1"],
}


def _shuffle_digit_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the addition task shuffle its images' digit labels (training and test) after it has
    built its queries, so the sums are the true ones and the labels are not."""
    import tasks.mnist_addition as module

    build = module.build

    def shuffled(params: Any, root: Any) -> Any:
        task = build(params, root)
        g = torch.Generator().manual_seed(12345)
        task.concept_labels = task.concept_labels[
            torch.randperm(len(task.concept_labels), generator=g)
        ]
        task.train_labels = {
            source: labels[torch.randperm(len(labels), generator=g)]
            for source, labels in task.train_labels.items()
        }
        return task

    monkeypatch.setattr(module, "build", shuffled)


def _run(
    tmp_path: Path, folder: str, overrides: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the smoke config with ``overrides``; its metrics and its networks' weights."""
    sets = [x for o in overrides for x in ("--set", o)]
    args = ["train", SMOKE, "--no-progress", "--set", f"out_dir={tmp_path / folder}",
            "--set", f"logic.cache_dir={tmp_path / 'cc'}", *sets]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / folder / "smoke_train"
    metrics = json.loads((run / "metrics.json").read_text())
    weights = torch.load(run / "checkpoint.pt", weights_only=False)["trainer"]["nets"]
    return metrics, weights


def _same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        a[net].keys() == b[net].keys() and all(torch.equal(a[net][k], b[net][k]) for k in a[net])
        for net in a
    )


@pytest.mark.parametrize("method", list(LABEL_FREE))
@pytest.mark.needs_data
def test_a_label_free_run_is_the_same_when_the_digit_labels_are_shuffled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    straight, straight_weights = _run(tmp_path, "straight", LABEL_FREE[method])
    _shuffle_digit_labels(monkeypatch)
    shuffled, shuffled_weights = _run(tmp_path, "shuffled", LABEL_FREE[method])

    assert _same_weights(straight_weights, shuffled_weights)
    assert straight.keys() == shuffled.keys()
    label_free = {key for key in straight if not reads_concept_labels(key)} - CLOCK_KEYS
    assert {"test_task_acc", "best_val_task_acc", "train_min_usage_c"} <= label_free
    assert {k: straight[k] for k in label_free} == {k: shuffled[k] for k in label_free}
    assert straight["acc_c"] != shuffled["acc_c"]  # the shuffle did reach what reads the labels


@pytest.mark.needs_data
def test_the_one_label_baseline_reads_the_labels_so_the_shuffle_changes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_label = ["supervision.labels_per_class=1"]
    _, straight_weights = _run(tmp_path, "straight", one_label)
    _shuffle_digit_labels(monkeypatch)
    _, shuffled_weights = _run(tmp_path, "shuffled", one_label)
    assert not _same_weights(straight_weights, shuffled_weights)
