"""The Flower app of examples/flower_app (LoRA on MiniLM over AG News), run without Ray or a network."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("lifelong.federated.flower", reason="needs the lifelong[federated] extra")
from flwr.app import Context, RecordDict  # noqa: E402

from flower_doubles import DirectGrid  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "flower_app"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cl_benchmark"
TOML = APP / "pyproject.toml"


def app_config(**overrides) -> dict:
    import tomllib

    cfg = tomllib.loads(TOML.read_text())["tool"]["flwr"]["app"]["config"]
    return {**cfg, **overrides}


@pytest.fixture(scope="module")
def apps():
    sys.path.insert(0, str(APP))
    try:
        from afa_app import client_app, server_app
        yield client_app, server_app
    finally:
        sys.path.remove(str(APP))


def run_app(apps, capsys, nodes: int, **overrides) -> dict:
    client_app, server_app = apps
    cfg = app_config(**overrides)
    grid = DirectGrid(client_app.app, nodes, run_config=cfg)
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("AFA-RESULT ")][-1]
    return json.loads(line[len("AFA-RESULT "):])


@pytest.mark.skipif(not DATA.is_dir(), reason="needs the shared cl_benchmark folder")
@pytest.mark.parametrize("mode, algorithm", [("async", "afa_cs"), ("round", "afa_cd")])
def test_minilm_lora_app_runs_on_agnews(apps, capsys, mode, algorithm):
    out = run_app(apps, capsys, 2, **{"data-folder": str(DATA), "n-train": 2, "n-test": 2, "num-server-steps": 3,
                                      "mode": mode, "algorithm": algorithm, "buffer-size": 2, "concurrency": 2,
                                      "max-local-steps": 2, "participation": 1.0, "eval-every": 3})
    assert out["task"] == "agnews" and out["nodes"] == 2 and out["steps"] == 3
    # only the LoRA (rank 8 on query and value of the top layer: 2 × (A, B) × 8·384) and head travel
    assert out["upload-bytes"] == (2 * 2 * 8 * 384 + 4 * 384 + 4) * 4
    assert 0.0 <= out["accuracy"] <= 1.0


def test_digits_app_still_runs(apps, capsys):
    out = run_app(apps, capsys, 3, task="digits", **{"num-server-steps": 4, "local-lr": 0.1, "concurrency": 2})
    assert out["steps"] == 4 and out["upload-bytes"] == (64 * 10 + 10) * 4 and out["accuracy"] > 0.1


def test_unknown_task_fails_clearly(apps):
    from afa_app.task import task

    with pytest.raises(ValueError, match="task must be 'agnews' or 'digits'"):
        task({"task": "mnist"})
