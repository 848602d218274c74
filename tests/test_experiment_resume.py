"""`lifelong run --resume` on damaged output folders, unwritable outputs, the report's plots and
the report module standing on its own (no import cycle with the experiment runner)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lifelong import experiment, files
from lifelong.cli import main
from lifelong.experiment import ConfigError, load_config, run_experiment

CONFIG = {
    "kind": "continual", "name": "tiny", "seeds": [0, 1],
    "stream": {"name": "split_digits", "options": {"n_tasks": 2}},
    "model": {"name": "mlp", "options": {"hidden": 8}},
    "methods": ["naive"],
    "training": {"epochs": 1, "lr": 0.1, "batch_size": 64},
}


def fake_cell(config: dict, cell, workdir, progress: bool = False) -> dict:
    """A stand-in for training: a fixed 2-task accuracy matrix that depends on the seed."""
    fake_cell.calls.append(cell.key)
    a = 0.5 + 0.1 * cell.seed
    return {"accuracy_matrix": [[a, 0.1], [a - 0.1, a + 0.1]],
            "metrics": {"acc": a, "forgetting": 0.1, "bwt": -0.1, "fwt": None, "wall_time_s": 0.0}}


@pytest.fixture
def fake_runner(monkeypatch):
    fake_cell.calls = []
    monkeypatch.setitem(experiment.RUNNERS, "continual", fake_cell)
    return fake_cell


def write_config(tmp_path: Path, config: dict = CONFIG) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("damage", ["", '{"label": "naive", "seed": 1, "res', "[1, 2]", "\xff\xfe"])
def test_resume_recomputes_an_empty_or_corrupt_cell_and_says_so(tmp_path: Path, capsys, fake_runner, damage) -> None:
    out = tmp_path / "out"
    cfg = write_config(tmp_path)
    assert main(["run", str(cfg), "--output", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())
    kept = out / "cells" / "naive__seed0.json"
    damaged = out / "cells" / "naive__seed1.json"
    kept_mtime = kept.stat().st_mtime_ns
    damaged.write_bytes(damage.encode("latin-1"))
    fake_runner.calls.clear()
    capsys.readouterr()

    assert main(["run", str(cfg), "--output", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and str(damaged) in err and "recomputing" in err and "Traceback" not in err
    assert fake_runner.calls == ["naive__seed1"], "only the damaged cell is recomputed"
    assert kept.stat().st_mtime_ns == kept_mtime
    assert json.loads(damaged.read_text())["seed"] == 1
    again = json.loads((out / "results.json").read_text())
    assert again["summary"] == first["summary"] and len(again["cells"]) == 2


def test_resume_with_a_real_stream_recomputes_a_truncated_cell(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {**CONFIG, "seeds": [0]}))
    fresh = run_experiment(config, tmp_path / "out", progress=False)
    cell = tmp_path / "out" / "cells" / "naive__seed0.json"
    cell.write_text(cell.read_text()[:20])
    with pytest.warns(RuntimeWarning, match="naive__seed0.json.*recomputing"):
        resumed = run_experiment(config, tmp_path / "out", progress=False, resume=True)
    assert resumed["cells"][0]["result"]["accuracy_matrix"] == fresh["cells"][0]["result"]["accuracy_matrix"]


def test_report_skips_leftover_temporary_files_and_warns_on_corrupt_cells(tmp_path: Path, fake_runner) -> None:
    from lifelong.report import read_cells

    config = load_config(write_config(tmp_path))
    run_experiment(config, tmp_path / "out", progress=False)
    cells = tmp_path / "out" / "cells"
    (cells / ".naive__seed0.json.x1y2.tmp.json").write_text('{"label": "naive"')  # a killed atomic write
    assert len(read_cells(tmp_path / "out")) == 2
    (cells / "naive__seed1.json").write_text("")
    with pytest.warns(RuntimeWarning, match="naive__seed1.json' is empty"):
        assert [c["seed"] for c in read_cells(tmp_path / "out")] == [0]


def test_a_corrupt_run_marker_gives_a_clear_error(tmp_path: Path, fake_runner) -> None:
    config = load_config(write_config(tmp_path))
    run_experiment(config, tmp_path / "out", progress=False)
    (tmp_path / "out" / "run.json").write_text('{"fingerp')
    with pytest.raises(ConfigError, match="run.json is empty or corrupt.*--overwrite"):
        run_experiment(config, tmp_path / "out", progress=False, resume=True)
    run_experiment(config, tmp_path / "out", progress=False, overwrite=True)
    marker = json.loads((tmp_path / "out" / "run.json").read_text())
    assert marker["fingerprint"] == files.fingerprint(config)


def make_unwritable(folder: Path, monkeypatch) -> None:
    """chmod the folder read-only; as root (where chmod does not stop writes) simulate a read-only
    file system instead."""
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return
    probe.unlink()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)


@pytest.mark.parametrize("nested", [False, True])
def test_an_unwritable_output_fails_clearly_before_any_work(tmp_path: Path, capsys, monkeypatch, nested) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("a cell ran although the output is not writable")

    monkeypatch.setitem(experiment.RUNNERS, "continual", no_work)
    cfg = write_config(tmp_path)
    folder = tmp_path / "readonly"
    folder.mkdir()
    make_unwritable(folder, monkeypatch)
    out = folder / "run" if nested else folder
    try:
        code = main(["run", str(cfg), "--output", str(out)])
    finally:
        folder.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2
    assert f"output {str(out)!r} is not writable" in err
    assert "Read-only file system" in err or "Permission denied" in err
    assert not (out / "run.json").exists() and not (out / "cells").exists()


def test_accuracy_over_the_stream_has_integer_task_ticks() -> None:
    import matplotlib.pyplot as plt

    from lifelong.report import accuracy_over_stream_figure

    for n_tasks in (2, 3, 5):
        matrix = np.tril(np.full((n_tasks, n_tasks), 0.8))
        fig = accuracy_over_stream_figure({"naive": matrix, "migu": matrix * 0.9})
        fig.canvas.draw()
        ax = fig.axes[0]
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        plt.close(fig)
        assert ticks and all(float(t).is_integer() for t in ticks), (n_tasks, ticks)
        assert set(range(1, n_tasks + 1)) >= set(ticks)


def test_the_report_module_does_not_import_the_experiment_runner() -> None:
    code = ("import sys, lifelong.report as r; r.summarise; r.versions; r.CONTINUAL_METRICS; "
            "assert 'lifelong.experiment' not in sys.modules, 'report imports experiment'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr


def test_one_fingerprint_for_every_configuration() -> None:
    a = {"b": 1, "a": [1, 2], "c": {"y": 2, "x": Path("p")}}
    same = {"c": {"x": Path("p"), "y": 2}, "a": [1, 2], "b": 1}
    assert files.fingerprint(a) == files.fingerprint(same)
    assert files.fingerprint(a) != files.fingerprint({**a, "b": 2})
    assert len(files.fingerprint(a)) == 16 and int(files.fingerprint(a), 16) >= 0
