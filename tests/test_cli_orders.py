"""`lifelong run` over several task orders: one run per (method, order, seed), a 95 % CI over all of them,
TensorBoard event folders per run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lifelong.experiment import ConfigError, load_config, run_experiment


def write_task(root: Path, name: str, labels: list[str], prefix: str) -> None:
    folder = root / "TC" / name
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    rows = [{"sentence": f"{prefix} {label} item {i}", "label": label} for label in labels for i in range(6)]
    (folder / "train.json").write_text(json.dumps(rows))
    (folder / "test.json").write_text(json.dumps(rows[::2]))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "bench"
    write_task(root, "news", ["World", "Sports"], "news about")
    write_task(root, "mood", ["Good", "Bad"], "a review that is")
    return root


def config(folder: Path, **change) -> dict:
    return {"kind": "continual", "name": "orders", "seeds": [0, 1],
            "stream": {"name": "cl_benchmark", "options": {"folder": str(folder), "n_train": 4, "n_test": 2}},
            "orders": [["news", "mood"], ["mood", "news"]],
            "model": {"name": "minilm"}, "adapter": {"name": "lora", "options": {"r": 4}},
            "methods": ["naive"],
            "training": {"epochs": 1, "lr": 0.001, "optimizer": "adam", "batch_size": 4, "max_length": 16,
                         "forward_transfer": False, "tensorboard": "tb"}, **change}


def test_orders_and_seeds_each_run_and_the_report_gives_a_confidence_interval(folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(folder)))
    results = run_experiment(load_config(path), tmp_path / "out", progress=False)
    cells = sorted(p.name for p in (tmp_path / "out" / "cells").glob("*.json"))
    assert cells == ["naive__order0__seed0.json", "naive__order0__seed1.json", "naive__order1__seed0.json",
                     "naive__order1__seed1.json"]
    acc = results["summary"]["naive"]["acc"]
    assert acc["n"] == 4 and acc["ci95"] is not None and acc["ci95"] >= 0
    names = {tuple(c["result"]["task_names"]) for c in results["cells"]}
    assert names == {("news", "mood"), ("mood", "news")}
    assert sorted(p.name for p in (tmp_path / "out" / "tb").iterdir()) == [c[:-5] for c in cells]
    assert "95 % confidence" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("change, message", [
    ({"orders": []}, "orders must be a non-empty list"),
    ({"orders": [["news", 3]]}, r"orders\[0\] must be a preset name or a list of task names"),
    ({"orders": [["news", "nope"]]}, "nope"),
])
def test_bad_orders_fail_before_anything_is_written(folder: Path, tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(folder, **change)))
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    bad = config(folder)
    bad["stream"]["options"]["tasks"] = ["news"]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="either as stream.options.tasks or as orders"):
        load_config(path)
    digits = {"kind": "continual", "stream": {"name": "split_digits"}, "methods": ["naive"], "orders": [["a"]]}
    path.write_text(yaml.safe_dump(digits))
    with pytest.raises(ConfigError, match="orders: task orders are for the cl_benchmark stream"):
        load_config(path)


@pytest.mark.parametrize("method, message", [
    ({"name": "ewc", "options": {"ewc_lambda": -1.0}}, r"methods\[0\] \(ewc\)\.options: ewc: ewc_lambda must be"),
    ({"name": "olora", "options": {"lambda": 0.5}}, r"methods\[0\] \(olora\)\.options: olora: unknown option"),
])
def test_method_options_are_checked_before_anything_is_written(folder: Path, tmp_path: Path, method, message) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(folder, methods=[method])))
    with pytest.raises(ConfigError, match=message):
        load_config(path)
