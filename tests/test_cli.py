"""`lifelong run` end to end on tiny configs, config validation, resume; `lifelong adapters`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lifelong.cli import main
from lifelong.experiment import ConfigError, load_config, run_experiment

CONTINUAL = {
    "kind": "continual", "name": "tiny", "seeds": [0, 1],
    "stream": {"name": "split_digits", "options": {"n_tasks": 2}},
    "model": {"name": "mlp", "options": {"hidden": 16}},
    "methods": ["naive", {"name": "migu", "options": {"mask_ratio": 0.5}, "label": "migu-half"}],
    "training": {"epochs": 1, "lr": 0.1, "batch_size": 64},
}
FEDERATED = {
    "kind": "federated", "name": "fed", "seeds": [3],
    "model": {"name": "mlp", "options": {"hidden": 8}},
    "federation": {"num_workers": 5, "steps": 6, "batch_size": 16, "eval_every": 3},
    "partition": {"name": "dirichlet", "options": {"alpha": 0.5}},
    "participation": {"name": "bernoulli", "options": {"p": 0.5}},
    "algorithms": ["afa-cs", "fedavg"],
}


def write(tmp_path: Path, config: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_continual_run_writes_the_report_and_matches_the_python_api(tmp_path: Path) -> None:
    from lifelong.continual import run_stream, split_digits
    from lifelong.models import digits_model

    out = tmp_path / "out"
    assert main(["run", str(write(tmp_path, CONTINUAL)), "--output", str(out), "training.epochs=1"]) == 0
    for name in ("results.json", "report.md", "accuracy_matrix.png", "accuracy_over_stream.png", "forgetting.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert {c["label"] for c in results["cells"]} == {"naive", "migu-half"} and len(results["cells"]) == 4
    report = (out / "report.md").read_text()
    assert "| migu-half |" in report and "![accuracy_matrix.png](accuracy_matrix.png)" in report
    direct = run_stream(digits_model("mlp", 1, hidden=16), split_digits(n_tasks=2), method="migu",
                        method_options={"mask_ratio": 0.5}, seed=1, epochs=1, lr=0.1, batch_size=64, progress=False)
    cell = next(c for c in results["cells"] if c["label"] == "migu-half" and c["seed"] == 1)
    assert cell["result"]["accuracy_matrix"] == direct.to_dict()["accuracy_matrix"]
    summary = results["summary"]["naive"]["acc"]
    accs = [c["result"]["metrics"]["acc"] for c in results["cells"] if c["label"] == "naive"]
    assert math.isclose(summary["mean"], sum(accs) / 2)


def test_resume_after_an_interruption_skips_finished_cells(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {**CONTINUAL, "seeds": [0]}))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "a", progress=False, stop_after=1)
    finished = sorted(p.name for p in (tmp_path / "a" / "cells").glob("*.json"))
    assert len(finished) == 1 and not (tmp_path / "a" / "report.md").exists()
    before = (tmp_path / "a" / "cells" / finished[0]).stat().st_mtime_ns
    with pytest.raises(ConfigError, match="--resume"):
        run_experiment(config, tmp_path / "a", progress=False)
    resumed = run_experiment(config, tmp_path / "a", progress=False, resume=True)
    assert (tmp_path / "a" / "cells" / finished[0]).stat().st_mtime_ns == before, "finished cell recomputed"
    fresh = run_experiment(config, tmp_path / "b", progress=False)
    def numbers(results: dict) -> dict:  # wall times differ between runs; everything else must not
        return {label: {k: v for k, v in s.items() if k != "wall_time_s"} for label, s in results["summary"].items()}

    assert numbers(resumed) == numbers(fresh)


def test_federated_run(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    assert main(["run", str(write(tmp_path, FEDERATED)), "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("accuracy_vs_steps.png", "accuracy_vs_bytes.png", "staleness.png"):
        assert (out / name).is_file()
    assert {c["label"] for c in results["cells"]} == {"afa-cs", "fedavg"}
    for cell in results["cells"]:
        assert 0.0 <= cell["result"]["metrics"]["final_accuracy"] <= 1.0
        assert cell["result"]["metrics"]["uplink_mb"] > 0


@pytest.mark.parametrize(("change", "message"), [
    ({"stream": {"name": "split_mnist"}}, r"stream.name: unknown 'split_mnist'; allowed: \['cl_benchmark', 'permuted_digits'"),
    ({"methods": ["naive", "magic"]}, r"methods\[1\].name: unknown 'magic'; allowed:"),
    ({"trainig": {}}, r"unknown key\(s\) \['trainig'\]"),
    ({"training": {"lr": "fast"}}, r"training.lr must be float"),
    ({"seeds": []}, "seeds must be"),
    ({"adapter": {"name": "clr"}}, "needs task ids"),
    ({"adapter": {"name": "no_such_adapter"}}, r"unknown adapter 'no_such_adapter'"),
    ({"methods": ["naive", "naive"]}, "distinct 'label'"),
])
def test_config_errors_name_the_key(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, {**CONTINUAL, **change}))


def test_unreadable_configs_and_occupied_outputs(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed")
    assert main(["run", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert main(["run", str(write(tmp_path, CONTINUAL)), "--output", str(occupied)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_adapters_command_lists_every_adapter(capsys) -> None:
    import lifelong as ll

    assert main(["adapters", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    for name in ll.available():
        assert f"\n{name} " in out
    assert "26,784 parameters" in out
