"""`lifelong run`: Ctrl-C says what was kept and how to resume; two runs on one output folder
are kept apart by a lock file; Avalanche's "No loggers specified" warning stays out of the output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lifelong import experiment
from lifelong.cli import main

CONFIG = {
    "kind": "continual", "name": "tiny", "seeds": [0, 1],
    "stream": {"name": "split_digits", "options": {"n_tasks": 2}},
    "model": {"name": "mlp", "options": {"hidden": 8}},
    "methods": ["naive"],
    "training": {"epochs": 1, "lr": 0.1, "batch_size": 64},
}


def write_config(tmp_path: Path, config: dict = CONFIG) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fake_cell(config: dict, cell, workdir, progress: bool = False) -> dict:
    """A stand-in for training that is interrupted (Ctrl-C) at its ``fake_cell.interrupt_at``-th call."""
    fake_cell.calls += 1
    if fake_cell.calls == fake_cell.interrupt_at:
        raise KeyboardInterrupt
    return {"accuracy_matrix": [[0.5, 0.1], [0.4, 0.6]],
            "metrics": {"acc": 0.5, "forgetting": 0.1, "bwt": -0.1, "fwt": None, "wall_time_s": 0.0}}


@pytest.fixture
def fake_runner(monkeypatch):
    fake_cell.calls, fake_cell.interrupt_at = 0, None
    monkeypatch.setitem(experiment.RUNNERS, "continual", fake_cell)
    return fake_cell


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path: Path, capsys, fake_runner) -> None:
    out, config = tmp_path / "out", write_config(tmp_path)
    fake_runner.interrupt_at = 2
    assert main(["run", str(config), "--output", str(out)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "interrupted; 1 finished cell(s) are kept in" in err and str(out / "cells") in err
    assert "--resume" in err
    assert not (out / experiment.LOCK).exists(), "the lock goes with the interrupted run"
    assert main(["run", str(config), "--output", str(out), "--resume"]) == 0
    assert fake_runner.calls == 3, "the finished cell is not recomputed"


def test_ctrl_c_before_the_run_starts(tmp_path: Path, capsys, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "load_config", interrupted)
    assert main(["run", str(write_config(tmp_path)), "--output", str(tmp_path / "out")]) == 130
    assert "interrupted before the run started; nothing was written" in capsys.readouterr().err


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path: Path, capsys,
                                                                            fake_runner) -> None:
    out, config = tmp_path / "out", write_config(tmp_path)
    out.mkdir()
    with experiment.output_lock(out):
        holder = json.loads((out / experiment.LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert main(["run", str(config), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another lifelong run (process {os.getpid()} on" in err
        assert "wait for it to finish or pick another --output" in err
        assert not (out / "run.json").exists() and fake_runner.calls == 0
    assert not (out / experiment.LOCK).exists()
    assert main(["run", str(config), "--output", str(out)]) == 0, "an empty folder but for the lock is free again"
    assert not (out / experiment.LOCK).exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path: Path, capsys, fake_runner) -> None:
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    (out / experiment.LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0}))
    assert main(["run", str(write_config(tmp_path)), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"was left by process {pid}, which is gone; taking it over" in err
    assert not (out / experiment.LOCK).exists()


def test_a_lock_of_another_host_is_respected(tmp_path: Path, capsys, fake_runner) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / experiment.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": 0}))
    assert main(["run", str(write_config(tmp_path)), "--output", str(out)]) == 2
    assert "process 1 on elsewhere.example" in capsys.readouterr().err


def test_avalanche_no_loggers_warning_stays_out_of_the_output(tmp_path: Path, capsys) -> None:
    config = {**CONFIG, "seeds": [0], "methods": ["ewc"]}
    assert main(["run", str(write_config(tmp_path, config)), "--output", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "No loggers specified" not in captured.err + captured.out
