"""The bench runner: trial configs, the report on hand-made results, and a tiny real bench."""

from __future__ import annotations

import csv
import fcntl
import io
import json
from pathlib import Path

import pytest
import torch

from gedi_nesy.bench.plan import BenchConfig, Trial, bench_methods, trial_config, trials
from gedi_nesy.bench.report import (
    mean_std,
    results_csv,
    select_restarts,
    summary_table,
    write_report,
)
from gedi_nesy.bench.trial import Outcome, run_trial
from gedi_nesy.cli import main
from gedi_nesy.errors import ConfigError
from gedi_nesy.schema import from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cfg(tmp_path, **kw) -> BenchConfig:
    raw = {
        "name": "b",
        "out_dir": str(tmp_path),
        "base": {"task": {"name": "mnist_half"}, "gedi": {"w_inv": 0.1}},
        "methods": {"dpl": {"gedi.w_inv": 0, "gedi.w_prior": 0}, "gedi": {"gedi": {"w_gen": 0}}},
        "seeds": [3, 4],
    }
    raw.update(kw)
    return from_dict(BenchConfig, raw)


def test_trials_run_methods_then_sizes_then_seeds(tmp_path):
    cfg = _cfg(tmp_path, size_key="task.n_train_per_world", sizes=[10, 20])
    names = [t.name for t in trials(cfg)]
    assert names == ["dpl-n10-s3", "dpl-n10-s4", "dpl-n20-s3", "dpl-n20-s4",
                     "gedi-n10-s3", "gedi-n10-s4", "gedi-n20-s3", "gedi-n20-s4"]  # fmt: skip


def test_trial_config_merges_dotted_and_nested_overrides_and_sets_seed_and_size(tmp_path):
    cfg = _cfg(tmp_path, size_key="task.n_train_per_world", sizes=[10])
    raw = trial_config(cfg, Trial("gedi", 10, 4))
    assert raw["gedi"] == {"w_inv": 0.1, "w_gen": 0}
    assert raw["task"] == {"name": "mnist_half", "seed": 4, "n_train_per_world": 10}
    assert raw["optim"] == {"seed": 4}
    assert raw["name"] == "gedi-n10-s4" and raw["out_dir"] == str(tmp_path / "b" / "trials")
    dpl = trial_config(cfg, Trial("dpl", 10, 3))
    assert dpl["gedi"] == {"w_inv": 0, "w_prior": 0}
    assert cfg.base["gedi"] == {"w_inv": 0.1}  # the base is not modified


@pytest.mark.parametrize(
    "change, message",
    [
        ({"methods": {}}, "has no methods"),
        ({"seeds": [1, 1]}, "give distinct seeds"),
        ({"sizes": [10]}, "give both"),
        ({"size_key": "task.n_train_per_world"}, "give both"),
        (
            {"methods": {"x": {"gedi.w_invv": 1}}},
            "bench trial x-s3: unknown config key 'gedi.w_invv'",
        ),
        ({"methods": {"x": 3}}, "a method is a mapping of overrides"),
        ({"restarts": 2, "select_by": "acc_c"}, "select_by = 'acc_c' reads concept labels"),
        ({"select_by": "ood_digit_net.ece_c"}, "'ood_digit_net.ece_c' reads concept labels"),
    ],
)
def test_bad_bench_configs_are_refused_before_any_trial_runs(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        trials(_cfg(tmp_path, **change))


def test_restarts_vary_the_model_seed_and_keep_the_data_seed(tmp_path):
    cfg = _cfg(tmp_path, restarts=3, methods={"dpl": {}})
    assert [t.name for t in trials(cfg)] == ["dpl-s3", "dpl-s3-r1", "dpl-s3-r2", "dpl-s4",
                                             "dpl-s4-r1", "dpl-s4-r2"]  # fmt: skip
    raw = trial_config(cfg, Trial("dpl", None, 4, 2))
    assert (raw["task"]["seed"], raw["optim"]["seed"]) == (4, 2004)  # seed + 1000 r
    assert trial_config(cfg, Trial("dpl", None, 4, 0))["optim"]["seed"] == 4
    with pytest.raises(ConfigError, match="bench restarts = 0; give 1"):
        trials(_cfg(tmp_path, restarts=0))
    with pytest.raises(ConfigError, match="unknown config key 'optim.sed'"):
        trials(_cfg(tmp_path, restarts=2, restart_key="optim.sed"))


def test_select_restarts_keeps_the_highest_label_free_score_per_seed():
    rows = [
        (Trial("m", None, 0, 0), {"u": 0.01, "acc_c": 0.43}),  # a shortcut: a value unused
        (Trial("m", None, 0, 1), {"u": 0.71, "acc_c": 0.99}),
        (Trial("m", None, 0, 2), {"u": 0.71, "acc_c": 0.98}),  # a tie: the earlier restart stays
        (Trial("m", None, 1, 0), {"acc_c": 0.5}),  # no score: loses to any score
        (Trial("m", None, 1, 1), {"u": 0.0, "acc_c": 0.42}),
        (Trial("m", None, 2, 0), {"acc_c": 0.7}),  # the only restart of seed 2: kept
        (Trial("m", None, 3, 0), {"u": float("nan")}),  # NaN counts as no score
        (Trial("m", None, 3, 1), {"u": 0.1}),
    ]
    kept = select_restarts(rows, "u")
    assert [t.name for t, _ in kept] == ["m-s0-r1", "m-s1-r1", "m-s2", "m-s3-r1"]


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([0.5]) == (0.5, 0.0)


def _metrics(acc_y: float, acc_c: float, concept_map: list[int]) -> dict:
    return {"test_task_acc": acc_y, "acc_c": acc_c, "concept_map": concept_map,
            "acc_c_per_class": [1.0, 0.0], "confusion": {"ignored": 1}}  # fmt: skip


ROWS = [
    (Trial("dpl", None, 0), _metrics(0.98, 0.40, [0, 1, 3, 2, 3])),
    (Trial("dpl", None, 1), _metrics(0.96, 0.44, [0, 1, 3, 2, 3])),
    (Trial("gedi", None, 0), _metrics(0.97, 0.99, [0, 1, 2, 3, 4])),
    (Trial("gedi", None, 1), _metrics(0.85, 0.50, [0, 1, 3, 2, 3])),
]


def test_summary_table_gives_mean_std_rs_rate_and_maps():
    table = summary_table(ROWS, {"test_task_acc": "Acc(Y)", "acc_c": "raw Acc(C)"})
    lines = table.splitlines()
    assert lines[0] == "| method | seeds | Acc(Y) | raw Acc(C) | RS rate | concept maps (ID) |"
    # dpl: Acc(Y) 0.97 ± 0.01414, raw Acc(C) 0.42 ± 0.02828; both seeds are shortcuts
    assert lines[2] == "| dpl | 2 | 0.970 ± 0.014 | 0.420 ± 0.028 | 1.00 | `0 1 3 2 3` ×2 |"
    # gedi: seed 1 has Acc(Y) 0.85 < 0.9, so it is not counted as a shortcut: RS rate 0/2
    assert lines[3].startswith("| gedi | 2 | 0.910 ± 0.085 | 0.745 ± 0.346 | 0.00 |")


def test_results_csv_has_one_row_per_trial_and_skips_nested_values():
    rows = list(csv.reader(io.StringIO(results_csv(ROWS))))
    assert rows[0] == ["trial", "method", "size", "seed", "restart", "acc_c", "acc_c_per_class",
                       "concept_map", "test_task_acc"]  # fmt: skip
    assert rows[1] == ["dpl-s0", "dpl", "", "0", "0", "0.4", "1.0 0.0", "0 1 3 2 3", "0.98"]
    assert len(rows) == 5


def test_report_sums_confusions_over_seeds_and_plots_accuracy_against_size(tmp_path):
    cfg = _cfg(tmp_path, size_key="task.n_train_per_world", sizes=[10, 20])
    for t in trials(cfg)[:6]:  # gedi-n20-* not finished
        folder = tmp_path / "b" / "trials" / t.name
        folder.mkdir(parents=True)
        acc = 0.5 if t.size == 10 else 0.9
        m = {"test_task_acc": 1.0, "acc_c": acc, "acc_c_matched": 1.0, "concept_map": [0, 1]}
        (folder / "metrics.json").write_text(json.dumps(m))
        (folder / "confusion_digit_net.json").write_text(json.dumps([[2, 0], [1, 1]]))
        if t.method == "dpl":  # a step log for dpl's trials only
            (folder / "log.jsonl").write_text('{"step": 1, "logic": 2.0}\n')
    summary = write_report(cfg, {"n_maps": 3, "n_bijections": 1})
    assert "6 of 8 trials finished" in summary
    assert "3 deterministic concept maps fit the training data, 1 of them bijections" in summary
    for name in ["results.csv", "summary.md", "concept_acc_vs_size.png", "confusion_dpl_n10.png",
                 "confusion_dpl_n20.png", "confusion_gedi_n10.png"]:  # fmt: skip
        assert (tmp_path / "b" / name).is_file(), name
    assert not (tmp_path / "b" / "confusion_gedi_n20.png").exists()
    assert sorted(p.name for p in (tmp_path / "b").glob("curves_*")) == [
        "curves_dpl_n10.png", "curves_dpl_n20.png"]  # fmt: skip
    assert "[curves_dpl_n10.png](curves_dpl_n10.png)" in summary
    assert "| dpl | 20 | 2 | 1.000 ± 0.000 | 0.900 ± 0.000 |" in summary


def test_report_with_restarts_gives_the_selected_and_every_restart(tmp_path):
    cfg = _cfg(tmp_path, restarts=2, methods={"gedi": {}})
    usage = {"gedi-s3": 0.0, "gedi-s3-r1": 0.7, "gedi-s4": 0.6, "gedi-s4-r1": 0.2}
    for t in trials(cfg):
        folder = tmp_path / "b" / "trials" / t.name
        folder.mkdir(parents=True)
        acc = 0.43 if usage[t.name] < 0.5 else 0.99
        m = {"test_task_acc": 0.98, "acc_c": acc, "train_min_usage_c": usage[t.name]}
        (folder / "metrics.json").write_text(json.dumps(m))
    cfg.columns = {"acc_c": "raw Acc(C)"}
    summary = write_report(cfg)
    selected, every = summary.split("Every restart as its own run")
    assert "2 restarts per seed (optim.seed = seed + 1000 r)" in selected
    assert "| gedi | 2 | 0.990 ± 0.000 | 0.00 |" in selected  # s3-r1 and s4 kept
    assert "| gedi | 4 | 0.710 ± 0.323 | 0.50 |" in every


def _tiny_bench(tmp_path, methods: str) -> str:
    config = tmp_path / "bench.yaml"
    config.write_text(
        f"name: tiny\nout_dir: {tmp_path}\nseeds: [0, 1]\n"
        "base:\n"
        "  task: {name: mnist_half, n_train_per_world: 2, n_val_per_world: 1,\n"
        "         n_test_per_world: 1}\n"
        "  model: {width: 4}\n"
        "  optim: {batch_size: 7}\n"
        f"  logic: {{cache_dir: {tmp_path / 'cc'}}}\n"
        f"methods: {methods}\n"
    )
    return str(config)


@pytest.mark.slow  # about a minute: four real trials in two processes
@pytest.mark.needs_data
def test_bench_runs_trials_in_parallel_skips_finished_ones_and_reports_failures(tmp_path, capsys):
    config = _tiny_bench(tmp_path, "{dpl: {gedi.w_inv: 0, gedi.w_prior: 0}, gedi: {}}")
    assert main(["bench", config, "--jobs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 trials finished" in out and "1 of them bijections" in out
    folder = tmp_path / "tiny"
    first = json.loads((folder / "trials/gedi-s1/metrics.json").read_text())
    assert first["steps"] == 2
    assert (folder / "confusion_dpl.png").is_file() and (folder / "audit.json").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("trials/*/metrics.json")}
    (folder / "trials/gedi-s1/metrics.json").unlink()  # as if killed after its last checkpoint
    assert main(["bench", config, "--no-progress"]) == 0
    again = json.loads((folder / "trials/gedi-s1/metrics.json").read_text())
    assert "--resume" in (folder / "trials/gedi-s1/argv.txt").read_text()
    assert again["test_task_acc"] == first["test_task_acc"] and again["acc_c"] == first["acc_c"]
    for path, stamp in stamps.items():
        if "gedi-s1" not in str(path):
            assert path.stat().st_mtime_ns == stamp, path  # finished trials did not run again
    assert main(["bench", config, "--no-progress", "--set", "base.model.width=5"]) == 2
    err = capsys.readouterr().err
    assert "bench trial dpl-s0 finished with model.width = 4, the bench now says 5" in err
    # a trial (and a checkpoint) from before a setting existed still counts: it had the default
    saved = folder / "trials/dpl-s0/config.yaml"
    saved.write_text(saved.read_text().replace("  relabel_every: 0\n", ""))
    ckpt_path = folder / "trials/gedi-s1/checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    del ckpt["config"]["optim"]["relabel_every"]
    torch.save(ckpt, ckpt_path)
    (folder / "trials/gedi-s1/metrics.json").unlink()
    assert main(["bench", config, "--no-progress"]) == 0
    assert (folder / "trials/dpl-s0/metrics.json").stat().st_mtime_ns == stamps[
        folder / "trials/dpl-s0/metrics.json"
    ]
    resumed = json.loads((folder / "trials/gedi-s1/metrics.json").read_text())
    assert resumed["acc_c"] == first["acc_c"]
    bad = _tiny_bench(tmp_path, "{dpl: {gedi.w_inv: 0, gedi.w_prior: 0}, "
                                "sup: {supervision.labels_per_class: 100}}")  # fmt: skip
    assert main(["bench", bad, "--no-progress", "--set", "seeds=[0]"]) == 2
    err = capsys.readouterr().err
    assert "trial sup-s0 failed" in err and "lower labels_per_class" in err
    assert "1 of 2 trials failed" in err


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("bench_*.yaml")))
def test_every_shipped_bench_config_gives_valid_trial_configs(name):
    cfg = load_config(CONFIGS / name, BenchConfig)
    planned = trials(cfg)  # raises if a trial config is one `gedi-nesy train` would refuse
    assert len(planned) == len(bench_methods(cfg)) * len(cfg.seeds) * max(1, len(cfg.sizes)) * (
        cfg.restarts
    )


def test_a_trial_finished_since_the_bench_planned_it_is_not_run_again(tmp_path):
    cfg = _cfg(tmp_path)
    trial = trials(cfg)[0]
    folder = tmp_path / "b/trials" / trial.name
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("{}")  # another bench process finished it meanwhile
    assert run_trial(cfg, trial, "n1") == Outcome(trial.name, "done", "n1")
    assert not (tmp_path / f"b/trials/{trial.name}.log").exists()  # no process was started
    assert (folder / "metrics.json").read_text() == "{}"


def test_a_trial_another_process_holds_is_left_to_it(tmp_path):
    cfg = _cfg(tmp_path)
    trial = trials(cfg)[0]
    folder = tmp_path / "b/trials"
    folder.mkdir(parents=True)
    with open(folder / f"{trial.name}.lock", "a") as held:  # as another driver or node would
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_trial(cfg, trial).status == "elsewhere"
        assert not (folder / f"{trial.name}.log").exists()  # no process was started
    (folder / trial.name).mkdir()
    (folder / trial.name / "metrics.json").write_text("{}")  # it finished, then let go
    assert run_trial(cfg, trial).status == "done"


def test_a_trial_that_fails_on_its_own_reports_its_last_line_and_is_not_retried(tmp_path):
    cfg = _cfg(tmp_path, base={"task": {"name": "no_such_task"}})
    outcome = run_trial(cfg, trials(cfg)[0], cwd=str(tmp_path))  # a real, failing train process
    log = tmp_path / "b/trials/dpl-s3.log"
    assert outcome.status == "failed"
    assert outcome.error.startswith(f"trial dpl-s3 failed ({log}): error: task.name = ")
    assert "'no_such_task' is unknown" in outcome.error


def test_bench_names_the_trials_another_process_still_runs(tmp_path, capsys):
    config = _tiny_bench(tmp_path, "{dpl: {}}")
    folder = tmp_path / "tiny/trials"
    (folder / "dpl-s1").mkdir(parents=True)
    (folder / "dpl-s1/metrics.json").write_text('{"test_task_acc": 0.5, "acc_c": 0.25}')
    with open(folder / "dpl-s0.lock", "a") as held:  # the Ray task finds it held
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["bench", config, "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "1 of 2 trials finished" in out and not (folder / "dpl-s0.log").exists()
    assert "still running in another process, so left to it: dpl-s0; rerun" in err
