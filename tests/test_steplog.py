"""The step log read back and drawn as training curves (`gedi-nesy curves`), and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gedi_nesy.cli import main
from gedi_nesy.errors import ConfigError, StorageError, TrainingError
from gedi_nesy.plots import save_curves_png
from gedi_nesy.train.steplog import log_curves, read_log, save_log_curves

PNG = b"\x89PNG\r\n\x1a\n"
ROWS = [  # as fit logs them: speeds and lr each step, the validation score every second step
    {"step": 1, "lr": 0.1, "queries_per_s": 5.0, "logic": 3.0, "total": 3.5},
    {"step": 2, "lr": 0.1, "queries_per_s": 5.0, "logic": 2.0, "total": 2.5, "val_task_acc": 0.25},
    {"step": 3, "lr": 0.1, "queries_per_s": 5.0, "logic": 1.0, "total": 1.5, "relabelled": True},
    {"step": 4, "lr": 0.1, "queries_per_s": 5.0, "logic": 0.5, "total": 1.0, "val_task_acc": 0.75},
]


def _write(folder: Path, rows: list[dict], tail: str = "") -> Path:
    folder.mkdir(parents=True)
    text = "".join(json.dumps(row) + "\n" for row in rows) + tail
    (folder / "log.jsonl").write_text(text)
    return folder


def test_read_log_drops_a_torn_last_line_and_refuses_a_damaged_one(tmp_path):
    run = _write(tmp_path / "run", ROWS, tail='{"step": 5, "lo')  # killed mid-append
    assert read_log(run) == read_log(run / "log.jsonl") == ROWS
    (run / "log.jsonl").write_text("not json\n" + json.dumps(ROWS[0]) + "\n")
    with pytest.raises(TrainingError, match="line 1 is damaged"):
        read_log(run)
    with pytest.raises(StorageError, match=r"cannot read the step log .*nope.*give a run folder"):
        read_log(tmp_path / "nope")


def test_log_curves_draw_every_logged_number_but_steps_lr_and_speeds(tmp_path):
    curves = log_curves({"a": ROWS})
    assert list(curves) == ["logic", "total", "val_task_acc"]  # first-logged order; no booleans
    assert curves["logic"] == {"a": ([1, 2, 3, 4], [3.0, 2.0, 1.0, 0.5])}
    assert curves["val_task_acc"] == {"a": ([2, 4], [0.25, 0.75])}  # only where it was logged
    two = log_curves({"a": ROWS, "b": ROWS[:1]}, keys=["val_task_acc", "lr"])
    assert two == {"val_task_acc": {"a": ([2, 4], [0.25, 0.75])},  # run b never validated
                   "lr": {"a": ([1, 2, 3, 4], [0.1] * 4), "b": ([1], [0.1])}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"no run logged \['gen'\]; the logs hold \['step', "):
        log_curves({"a": ROWS}, keys=["logic", "gen"])
    with pytest.raises(ConfigError, match="no run logged any value to draw"):
        log_curves({"a": [{"step": 1, "lr": 0.1}]})


def test_save_curves_png_writes_a_png_and_refuses_bad_lines(tmp_path):
    out = save_curves_png({"logic": {"a": ([1, 2], [2.0, 1.0])}}, tmp_path / "c.png", log_y=True)
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="run 'a' in panel 'logic': 2 x values, 1 y values"):
        save_curves_png({"logic": {"a": ([1, 2], [1.0])}}, tmp_path / "d.png")
    with pytest.raises(ValueError, match="at least one line in every panel"):
        save_curves_png({"logic": {}}, tmp_path / "d.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png"]  # nothing written on error


def test_runs_are_named_by_folder_and_given_once(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr("gedi_nesy.train.steplog.save_curves_png",
                        lambda curves, path, log_y: drawn.update(curves) or Path(path))  # fmt: skip
    a, b = _write(tmp_path / "x/seed0", ROWS), _write(tmp_path / "y/seed1", ROWS[:2])
    save_log_curves([a, b / "log.jsonl"], tmp_path / "c.png", ["logic"])
    assert list(drawn["logic"]) == ["seed0", "seed1"]
    c = _write(tmp_path / "z/seed0", ROWS)  # a second folder named seed0: full paths
    save_log_curves([a, c], tmp_path / "c.png", ["logic"])
    assert list(drawn["logic"]) == [str(a), str(c)]
    with pytest.raises(ConfigError, match="name one run twice"):
        save_log_curves([a, a / "log.jsonl"], tmp_path / "c.png")


def test_the_curves_command_draws_and_fails_in_one_line(tmp_path, capsys):
    run = _write(tmp_path / "run", ROWS)
    assert main(["curves", str(run), "--out", str(tmp_path / "c.png"), "--log-y"]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
    assert capsys.readouterr().out == f"wrote {tmp_path / 'c.png'}\n"
    assert main(["curves", str(run), "--keys", "gen", "--out", str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run logged ['gen']") and err.count("\n") == 1
    assert not (tmp_path / "d.png").exists()
