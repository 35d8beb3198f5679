"""The command line end to end on a small real subset (needs GEDI_NESY_DATA), and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gedi_nesy.cli import main
from gedi_nesy.train.checkpoint import load_checkpoint
from gedi_nesy.train.standalone import GediTrainer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs/smoke.yaml")


@pytest.mark.needs_data
def test_gedi_smoke_run_writes_the_run_folder(tmp_path, capsys):
    assert main(["gedi", SMOKE, "--set", f"out_dir={tmp_path}", "--no-progress"]) == 0
    run = tmp_path / "smoke"
    for name in ["config.yaml", "metrics.json", "log.jsonl", "checkpoint.pt", "samples.png",
                 "curves.png"]:  # fmt: skip
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert 0.0 <= metrics["cluster_acc"] <= 1.0 and 0.0 <= metrics["ood_auroc"] <= 1.0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3]
    assert {"gen", "inv", "prior", "total"} <= set(log[0])
    assert "cluster_acc" in capsys.readouterr().out


@pytest.mark.needs_data
@pytest.mark.parametrize("method", ["gedi", "swav", "jem"])
def test_every_method_runs(tmp_path, method):
    args = ["gedi", SMOKE, "--no-progress", "--set", f"out_dir={tmp_path}",
            "--set", f"gedi.method={method}", "--set", "optim.max_steps=1"]  # fmt: skip
    assert main(args) == 0


@pytest.mark.needs_data
def test_resume_continues_to_the_same_result(tmp_path, monkeypatch):
    common = ["gedi", SMOKE, "--no-progress", "--set", "optim.max_steps=4"]
    assert main(common + ["--set", f"out_dir={tmp_path / 'straight'}"]) == 0

    real_step = GediTrainer.train_step

    def crash_at_step_2(self, x):
        if self.step == 2:  # the checkpoint of step 2 is on disk; die before step 3
            raise KeyboardInterrupt
        return real_step(self, x)

    monkeypatch.setattr(GediTrainer, "train_step", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        main(common + ["--set", f"out_dir={tmp_path / 'killed'}"])
    monkeypatch.setattr(GediTrainer, "train_step", real_step)
    assert main(common + ["--set", f"out_dir={tmp_path / 'killed'}", "--resume"]) == 0

    a = torch.load(tmp_path / "straight/smoke/checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "killed/smoke/checkpoint.pt", weights_only=False)
    assert a["trainer"]["step"] == b["trainer"]["step"] == 4
    for key, value in a["trainer"]["net"].items():
        assert torch.equal(value, b["trainer"]["net"][key]), key
    buffers = [c["trainer"]["objective"]["buffer"]["samples"] for c in (a, b)]
    assert torch.equal(*buffers)
    assert a["scheduler"] == b["scheduler"]
    log = (tmp_path / "killed/smoke/log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]


def test_errors_are_one_line_with_exit_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GEDI_NESY_DATA", str(tmp_path / "nowhere"))
    assert main(["gedi", SMOKE, "--set", "optim.stepz=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'optim.stepz'") and err.count("\n") == 1
    assert main(["gedi", SMOKE, "--set", f"out_dir={tmp_path}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "GEDI_NESY_DATA" in err and err.count("\n") == 1


def test_audit_command_prints_the_counts(capsys):
    assert main(["audit", "mnist_half", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["n_maps"], result["n_bijections"]) == (3, 1)  # shortcuts.md: 3 maps, 1 bijection
    assert main(["audit", "mnist_addition"]) == 2
    assert "has no audit_spec" in capsys.readouterr().err


def _train_tiny_half(tmp_path, name: str, per_world: int, batch: int, *extra: str) -> int:
    """``gedi-nesy train`` on a tiny MNIST-Half (width-4 net) with ``--set`` overrides ``extra``."""
    config = tmp_path / "half.yaml"
    config.write_text(
        f"name: {name}\n"
        f"task: {{name: mnist_half, n_train_per_world: {per_world}, n_val_per_world: 1, "
        "n_test_per_world: 1}\n"
        "model: {width: 4}\n"
        f"optim: {{batch_size: {batch}, log_every: 1}}\n"
    )
    sets = ["--set", f"out_dir={tmp_path}", "--set", f"logic.cache_dir={tmp_path / 'cc'}"]
    for item in extra:
        sets += ["--set", item]
    return main(["train", str(config), "--no-progress", *sets])


@pytest.mark.needs_data
def test_train_prints_the_shortcut_audit_and_trains_a_shortcut_task(tmp_path, capsys):
    assert _train_tiny_half(tmp_path, "half", 2, 7) == 0
    out = capsys.readouterr().out
    assert "shortcut audit: 3 concept maps fit the training data, 1 of them bijections" in out
    metrics = json.loads((tmp_path / "half/metrics.json").read_text())
    assert len(metrics["concept_map"]) == 5  # one entry per digit 0..4 (K = 5)
    assert metrics["steps"] == 2  # 7 worlds x 2 = 14 training sums, batch 7
    assert 0.0 <= metrics["ood_task_acc"] <= 1.0 and 0.0 <= metrics["ood_acc_c"] <= 1.0
    assert (tmp_path / "half/ood_confusion_digit_net.png").is_file()
    usage = metrics["train_usage_c"]  # label-free: predicted-value shares on the training images
    assert len(usage) == 5 and sum(usage) == pytest.approx(1.0, abs=1e-5)
    assert metrics["train_min_usage_c"] == pytest.approx(5 * min(usage), abs=1e-5)


@pytest.mark.needs_data
def test_without_validation_sums_the_last_network_is_evaluated(tmp_path, capsys):
    assert _train_tiny_half(tmp_path, "half_noval", 2, 7, "task.n_val_per_world=0") == 0
    lines = (tmp_path / "half_noval/log.jsonl").read_text().splitlines()
    log = [json.loads(line) for line in lines]
    assert [row["step"] for row in log] == [1, 2] and all("val_task_acc" not in row for row in log)
    metrics = json.loads((tmp_path / "half_noval/metrics.json").read_text())
    assert metrics["best_val_task_acc"] == -1.0  # no network kept by validation: the last one
    capsys.readouterr()
    sets = ("task.n_val_per_world=0", "optim.patience=2")
    assert _train_tiny_half(tmp_path, "half_patience", 2, 7, *sets) == 2
    err = capsys.readouterr().err
    assert "optim.patience = 2 stops on validation sums, but task mnist_half has none" in err
    assert err.count("\n") == 1 and not (tmp_path / "half_patience").exists()


@pytest.mark.needs_data
def test_resume_under_another_config_is_a_one_line_error(tmp_path, capsys):
    common = ["gedi", SMOKE, "--no-progress", "--set", f"out_dir={tmp_path}"]
    assert main(common + ["--set", "optim.max_steps=1"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "smoke").iterdir()}
    assert main(common + ["--set", "optim.max_steps=1", "--set", "model.width=4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was made with model.width = 8, the config now says 4" in err and err.count("\n") == 1
    after = {p.name: p.read_bytes() for p in (tmp_path / "smoke").iterdir()}
    assert after == before  # a refused command changes nothing: config.yaml still tells the truth


def test_standalone_gedi_refuses_overclustering_in_one_line(tmp_path, capsys):
    sets = ["--set", f"out_dir={tmp_path}", "--set", "model.clusters_per_value=2"]
    assert main(["gedi", SMOKE, "--no-progress", *sets]) == 2
    err = capsys.readouterr().err
    assert "model.clusters_per_value = 2: standalone GEDI has no values" in err
    assert err.count("\n") == 1


@pytest.mark.needs_data
def test_concept_supervision_baseline_trains_on_k_labels_per_class(tmp_path):
    assert _train_tiny_half(tmp_path, "half_sup", 4, 14, "supervision.labels_per_class=1") == 0
    log = [json.loads(line) for line in (tmp_path / "half_sup/log.jsonl").read_text().splitlines()]
    assert all(row["concept_ce"] > 0 for row in log)
    sets = ("supervision.labels_per_class=1", "supervision.augment=true")
    assert _train_tiny_half(tmp_path, "half_sup_aug", 4, 14, *sets) == 0
    assert _train_tiny_half(tmp_path, "x", 4, 14, "supervision.labels_per_class=100") == 2


@pytest.mark.needs_data
def test_relabelling_runs_in_the_loop_and_is_logged(tmp_path):
    # 28 sums in batches of 7: 4 steps; relabelling after steps 1, 2 and 3, never after the last
    assert _train_tiny_half(tmp_path, "half_rl", 4, 7, "optim.relabel_every=1") == 0
    log = [json.loads(line) for line in (tmp_path / "half_rl/log.jsonl").read_text().splitlines()]
    rows = [row for row in log if "relabel_proved_after" in row]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert 0.0 <= row["relabel_proved_before"] <= row["relabel_proved_after"] <= 1.0
        assert row["relabel_search_complete"] == 1
    metrics = json.loads((tmp_path / "half_rl/metrics.json").read_text())
    assert metrics["relabels"] == sum("relabel_map" in row for row in rows)


@pytest.mark.needs_data
def test_an_overclustered_network_is_relabelled_cluster_by_cluster(tmp_path):
    sets = ("model.clusters_per_value=2", "optim.relabel_every=1")
    assert _train_tiny_half(tmp_path, "half_oc", 4, 7, *sets) == 0
    log = [json.loads(line) for line in (tmp_path / "half_oc/log.jsonl").read_text().splitlines()]
    rows = [row for row in log if "relabel_proved_after" in row]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:  # 28 sums, 56 training images; a map may prove less to use every value
        assert 0.0 <= row["relabel_min_usage_before"] <= 56 and row["relabel_search_complete"] == 1
        assert 0.0 <= row["relabel_min_usage_after"] <= 56 / 5
        assert sorted(set(row.get("relabel_map", range(5)))) == [0, 1, 2, 3, 4]
    metrics = json.loads((tmp_path / "half_oc/metrics.json").read_text())
    assert len(metrics["concept_map"]) == 5  # evaluated in the 5 values, not the 10 clusters
    state = load_checkpoint(tmp_path / "half_oc/checkpoint.pt")
    value_of_cluster = state["trainer"]["nets"]["digit_net"]["value_of_cluster"].tolist()
    maps = [row["relabel_map"] for row in rows if "relabel_map" in row]
    assert value_of_cluster == (maps[-1] if maps else [0, 1, 2, 3, 4] * 2)  # checkpointed


@pytest.mark.needs_data
def test_swav_joint_method_and_gedi_only_steps(tmp_path, capsys):
    assert _train_tiny_half(tmp_path, "half_swav", 2, 7, "gedi.method=swav", "gedi.w_inv=0.5") == 0
    log = [json.loads(line) for line in (tmp_path / "half_swav/log.jsonl").read_text().splitlines()]
    assert all(row["total"] == pytest.approx(row["logic"] + 0.5 * row["swav"]) for row in log)
    sets = ["gedi.w_gen=0", "gedi.w_inv=0.1", "gedi.w_prior=0.2", "optim.gedi_only_steps=1"]
    assert _train_tiny_half(tmp_path, "half_warm", 2, 7, *sets) == 0
    log = [json.loads(line) for line in (tmp_path / "half_warm/log.jsonl").read_text().splitlines()]
    gedi = [0.1 * row["inv"] + 0.2 * row["prior"] for row in log]
    assert log[0]["total"] == pytest.approx(
        gedi[0]
    )  # step 1: the logic loss is logged, not trained
    assert log[1]["total"] == pytest.approx(log[1]["logic"] + gedi[1])
    assert log[0]["logic"] > 0
    off = ["gedi.w_gen=0", "gedi.w_inv=0", "gedi.w_prior=0", "optim.gedi_only_steps=5"]
    assert _train_tiny_half(tmp_path, "half_bad", 2, 7, *off) == 2
    assert "optim.gedi_only_steps = 5: it must be >= 0, and > 0 only" in capsys.readouterr().err


@pytest.mark.slow  # compiles the 40 column circuits and trains four-digit addition
@pytest.mark.needs_data
def test_four_digit_addition_trains_with_the_column_chain(tmp_path):
    sets = [f"out_dir={tmp_path}", f"logic.cache_dir={tmp_path / 'cc'}", "task.n_train=8",
            "task.n_val=4", "task.n_test=8", "model.width=4", "optim.epochs=1",
            "optim.batch_size=4", "optim.log_every=1", "optim.eval_every=0"]  # fmt: skip
    argv = ["train", str(ROOT / "configs/mnist_addition4.yaml"), "--no-progress"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    metrics = json.loads((tmp_path / "mnist_addition4/metrics.json").read_text())
    assert (metrics["task"], metrics["steps"], metrics["unprovable_train_queries"]) == (
        "mnist_addition_n4",
        2,
        0,
    )  # 8 four-digit sums, batch 4: every one provable
    lines = (tmp_path / "mnist_addition4/log.jsonl").read_text().splitlines()
    log = [json.loads(line) for line in lines]
    # -log P(sum) of an untrained net: about -log(10^-4), far above 0 and finite
    assert all(5.0 < row["logic"] < 30.0 for row in log)
    assert 0.0 <= metrics["test_task_acc"] <= 1.0
