"""`lifelong run` checks every config value before anything is written: negative or non-finite
numbers, mistyped options and repeated seeds fail with the key named and no output folder; the
corrected config then runs. ``results.json`` and the cell files are strict JSON (``null``, never
a bare ``NaN``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from lifelong import experiment
from lifelong.cli import main
from lifelong.experiment import ConfigError, load_config, run_experiment

CONTINUAL = {
    "kind": "continual", "name": "tiny", "seeds": [0],
    "stream": {"name": "split_digits", "options": {"n_tasks": 2}},
    "model": {"name": "mlp", "options": {"hidden": 8}},
    "methods": ["naive"],
    "training": {"epochs": 1, "lr": 0.1, "batch_size": 64},
}
FEDERATED = {
    "kind": "federated", "name": "fed", "seeds": [0],
    "model": {"name": "mlp", "options": {"hidden": 8}},
    "federation": {"num_workers": 4, "steps": 4, "batch_size": 16, "eval_every": 2},
    "partition": {"name": "dirichlet", "options": {"alpha": 0.5}},
    "algorithms": ["fedavg"],
}


def changed(config: dict, dotted: str, value) -> dict:
    """A deep copy of ``config`` with ``a.b.c`` set to ``value``."""
    out = copy.deepcopy(config)
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


BAD_CONTINUAL = [
    ("training.epochs", -1, r"training\.epochs must be a positive integer, got -1"),
    ("training.lr", -0.05, r"training\.lr must be a finite number > 0, got -0\.05"),
    ("training.lr", float("nan"), r"training\.lr must be a finite number, got nan"),
    ("training.batch_size", float("inf"), r"training\.batch_size must be a finite number, got inf"),
    ("training.engine", "warp", r"training\.engine must be one of \['auto', 'native'"),
    ("training.optimizer", "lbfgs", r"training\.optimizer must be one of"),
    ("training.seed", 3, r"training: unknown key\(s\) \['seed'\]"),
    ("training.template", "no text", r"training\.template must contain"),
    ("model.options.hidden", -16, r"model\.options\.hidden must be a positive integer, got -16"),
    ("model.options.hiden", 16, r"model\.options: unknown key\(s\) \['hiden'\]"),
    ("stream.options.n_task", 2, r"stream\.options: unknown key\(s\) \['n_task'\]; allowed: .*'n_tasks'"),
    ("stream.options.n_tasks", 11, r"stream 'split_digits': .*n_tasks must be at most 10"),
    ("seeds", [0, 0], r"seeds must be distinct .*\[0\] repeated"),
    ("seeds", [-1], r"seeds must be an integer >= 0"),
    ("adapter", {"name": "bone", "options": {"r": -4}}, r"adapter\.options: .*r"),
    ("adapter", {"name": "bone", "options": {"rank": 4}}, r"adapter\.options: unknown option"),
    ("name", "", "name must be a non-empty string"),
]
BAD_FEDERATED = [
    ("federation.num_workers", 0, r"federation\.num_workers must be a positive integer, got 0"),
    ("federation.steps", -5, r"federation\.steps must be a positive integer"),
    ("partition.options.alpha", -1.0, r"partition: .*alpha"),
    ("partition.options.alpah", 1.0, r"partition\.options: unknown key\(s\) \['alpah'\]"),
    ("data", {"name": "digits", "options": {"test_size": 2}}, r"data\.options\.test_size must be a number in \(0, 1\)"),
    ("model.options.hidden", -16, r"model\.options\.hidden must be a positive integer"),
    ("algorithms", [{"name": "fedavg", "options": {"local_lr": float("nan")}}],
     r"algorithms\[0\]\.options\.local_lr must be a finite number, got nan"),
]


@pytest.mark.parametrize(("base", "key", "value", "message"),
                         [(CONTINUAL, *case) for case in BAD_CONTINUAL] + [(FEDERATED, *case) for case in BAD_FEDERATED],
                         ids=[f"{c[0]}={c[1]!r}" for c in BAD_CONTINUAL + BAD_FEDERATED])
def test_bad_values_fail_naming_the_key_before_anything_is_written(tmp_path: Path, capsys, base: dict, key: str,
                                                                  value, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(changed(base, key, value)))
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    out = tmp_path / "out"
    assert main(["run", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lifelong run: ") and "Traceback" not in err
    assert not out.exists(), "nothing may be written for a config that cannot run"


def test_the_corrected_config_runs_after_a_refused_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(experiment.RUNNERS, "continual", fake_cell)
    path, out = tmp_path / "config.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(changed(CONTINUAL, "training.epochs", -1)))
    assert main(["run", str(path), "--output", str(out)]) == 2
    path.write_text(yaml.safe_dump(CONTINUAL))
    assert main(["run", str(path), "--output", str(out)]) == 0
    assert (out / "results.json").is_file()


def test_training_keys_are_run_configs_settings() -> None:
    from lifelong.continual.config import SCALAR_KEYS

    assert set(experiment.training_keys()) == set(SCALAR_KEYS) - {"seed"}


def fake_cell(config: dict, cell, workdir, progress: bool = False) -> dict:
    """Training stand-in whose matrix and FWT hold NaN (unmeasured), as forward_transfer=False gives."""
    nan = float("nan")
    return {"accuracy_matrix": [[0.9, nan], [0.8, 0.7]],
            "metrics": {"acc": 0.75, "forgetting": 0.1, "bwt": -0.1, "fwt": nan, "wall_time_s": 0.0}}


def refuse_constant(name: str):
    raise AssertionError(f"bare {name} in a JSON file")


def test_results_and_cells_are_strict_json_with_null_for_missing_values(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(experiment.RUNNERS, "continual", fake_cell)
    config = load_config(_write(tmp_path, changed(CONTINUAL, "seeds", [0, 1])))
    returned = run_experiment(config, tmp_path / "out", progress=False)
    results = json.loads((tmp_path / "out" / "results.json").read_text(), parse_constant=refuse_constant)
    cell = json.loads((tmp_path / "out" / "cells" / "naive__seed0.json").read_text(), parse_constant=refuse_constant)
    assert cell["result"]["accuracy_matrix"][0][1] is None and cell["result"]["metrics"]["fwt"] is None
    assert results["summary"]["naive"]["fwt"] == {"mean": None, "std": None, "ci95": None, "n": 0}
    assert results["summary"]["naive"]["acc"]["n"] == 2
    assert returned["cells"] == results["cells"], "a fresh run reports what a resumed run reads back"


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
