"""run_stream: every method through a 3-task digits stream in the native loop and inside Avalanche,
determinism, resume = uninterrupted, JSON round trip, and bad input."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lifelong.continual as lc
from lifelong.continual.streams import scenario_of

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="module")
def split3():
    return lc.split_digits(3, test_size=0.3, seed=0)


@pytest.fixture(scope="module")
def split3_task():
    return lc.split_digits(3, task_incremental=True, seed=0)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _backbone():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32))


FAST = {"gkcl": {"gen_epochs": 2, "samples_per_class": 5}, "kcl": {"samples_per_class": 5},
        "classp": {"threshold": 0.0}, "powerlaw": {"ratio": 0.3}}


def _run(method, stream, engine="native", **kw):
    model = _backbone() if method in ("kcl", "gkcl") else _mlp()
    opts = kw.pop("method_options", FAST.get(method))
    return lc.run_stream(model, stream, method, engine=engine, epochs=1, lr=0.05, batch_size=32,
                         seed=0, progress=False, method_options=opts, **kw)


def test_streams_shapes_and_alignment():
    bm = lc.split_digits(5, task_incremental=True)
    assert len(bm.train_stream) == len(bm.test_stream) == 5
    classes = [sorted(set(bm.train_stream[i].dataset.targets)) for i in range(5)]
    assert classes == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert bm.train_stream[3].dataset[0][2] == 3
    p = lc.permuted_digits(3, seed=0)
    x0, x1 = p.train_stream[0].dataset[0][0], p.train_stream[1].dataset[0][0]
    assert torch.equal(torch.sort(x0).values, torch.sort(x1).values) and not torch.equal(x0, x1)
    r = lc.rotated_digits(angles=[0.0, 90.0], as_image=True)
    assert r.train_stream[1].dataset[0][0].shape == (1, 8, 8)
    assert scenario_of(p) == "domain-incremental" and scenario_of(bm) == "task-incremental"
    assert scenario_of(lc.split_digits(2)) == "class-incremental"


@pytest.mark.parametrize("method", ["naive", "migu", "classp", "powerlaw", "kcl", "gkcl"])
def test_native_methods_run_three_tasks(method, split3, split3_task):
    stream = split3_task if method in ("kcl", "gkcl") else split3
    res = _run(method, stream)
    r = np.asarray(res.accuracy_matrix)
    assert r.shape == (3, 3)
    assert not np.isnan(np.tril(r)).any()
    assert 0.0 <= res.acc <= 1.0 and res.train_steps > 0 and res.trainable_parameters > 0
    assert res.acc == pytest.approx(np.mean(r[2]))
    assert res.engine == "native" and res.method == method
    if method in ("kcl", "gkcl"):
        # task-incremental kernel heads on 2-class tasks (chance 0.5); GKCL here trains its generator 2 epochs
        assert res.acc > (0.8 if method == "kcl" else 0.6)
    if method == "powerlaw":
        assert res.memory["replay_samples"] > 0


@pytest.mark.parametrize("method", ["naive", "migu", "classp", "powerlaw", "kcl", "ewc", "replay", "lwf"])
def test_avalanche_engine_runs_three_tasks(method, split3, split3_task):
    stream = split3_task if method == "kcl" else split3
    res = _run(method, stream, engine="avalanche")
    r = np.asarray(res.accuracy_matrix)
    assert r.shape == (3, 3) and not np.isnan(np.tril(r)).any()
    assert res.engine == "avalanche" and res.train_steps > 0


def test_deterministic_under_seed(split3):
    a, b = _run("migu", split3), _run("migu", split3)
    assert a.accuracy_matrix == b.accuracy_matrix


@pytest.mark.parametrize("method,engine", [("migu", "native"), ("classp", "native"), ("powerlaw", "native"),
                                           ("gkcl", "native"), ("classp", "avalanche"),
                                           ("powerlaw", "avalanche")])
def test_resume_equals_uninterrupted(method, engine, split3, split3_task, tmp_path):
    stream = split3_task if method == "gkcl" else split3
    full = _run(method, stream, engine=engine, checkpoint_dir=str(tmp_path / "full"))

    class Interrupt(nn.Module):
        """Cross-entropy that stops the run partway through the second experience."""

        def __init__(self, after):
            super().__init__()
            self.calls, self.after = 0, after

        def forward(self, logits, y):
            self.calls += 1
            if self.calls > self.after:
                raise KeyboardInterrupt
            return nn.functional.cross_entropy(logits, y)

    first = len(split3.train_stream[0].dataset) // 32 + 1
    part = str(tmp_path / "part")
    if method == "gkcl":  # kernel methods have their own loss: interrupt through the generator instead
        calls = {"n": 0}
        original = lc.GKCL.prepare_task

        def prepare(self, index, dataset, backbone):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return original(self, index, dataset, backbone)

        lc.GKCL.prepare_task = prepare
        try:
            with pytest.raises(KeyboardInterrupt):
                _run(method, stream, engine=engine, checkpoint_dir=part)
        finally:
            lc.GKCL.prepare_task = original
    else:
        with pytest.raises(KeyboardInterrupt):
            _run(method, stream, engine=engine, checkpoint_dir=part, criterion=Interrupt(first + 2))
    resumed = _run(method, stream, engine=engine, checkpoint_dir=part, resume=True)
    np.testing.assert_array_equal(resumed.accuracy_matrix, full.accuracy_matrix)  # NaN cells compare equal
    np.testing.assert_array_equal(resumed.initial_accuracy, full.initial_accuracy)
    assert resumed.train_steps == full.train_steps


def test_checkpoint_from_other_configuration_is_refused(split3, tmp_path):
    _run("naive", split3, checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match="different configuration.*lr"):
        lc.run_stream(_mlp(), split3, "naive", epochs=1, lr=0.5, batch_size=32, progress=False,
                      checkpoint_dir=str(tmp_path), resume=True)


def test_json_round_trip(split3, tmp_path):
    res = _run("naive", split3)
    path = tmp_path / "res.json"
    res.to_json(str(path))
    data = json.loads(path.read_text())
    assert data["accuracy_matrix"][0][1] == res.accuracy_matrix[0][1]
    back = lc.StreamResult.from_json(str(path))
    assert back.acc == res.acc and back.forgetting == res.forgetting
    assert back.accuracy_matrix == res.accuracy_matrix


def test_kcl_unseen_tasks_are_nan(split3_task):
    res = _run("kcl", split3_task)
    r = np.asarray(res.accuracy_matrix)
    assert np.isnan(r[0, 1]) and np.isnan(r[1, 2])
    assert math.isnan(res.fwt)


def test_bad_inputs(split3):
    from avalanche.benchmarks.scenarios import benchmark_from_datasets

    with pytest.raises(ValueError, match="valid: .*ewc.*naive"):
        lc.run_stream(_mlp(), split3, "sgd-magic", progress=False)
    with pytest.raises(ValueError, match="no experiences"):
        lc.run_stream(_mlp(), benchmark_from_datasets(train=[], test=[]), "naive", progress=False)
    with pytest.raises(TypeError, match="Avalanche benchmark"):
        lc.run_stream(_mlp(), [1, 2, 3], "naive", progress=False)
    with pytest.raises(ValueError, match="does not run with engine 'native'; it supports engines: avalanche"):
        lc.run_stream(_mlp(), split3, "si", engine="native", progress=False)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        lc.run_stream(_mlp(), split3, "naive", resume=True, progress=False)
    with pytest.raises(ValueError, match="mask_ratio"):
        lc.run_stream(_mlp(), split3, "migu", method_options={"mask_ratio": 1.5}, progress=False)
    with pytest.raises(ValueError, match="alpha"):
        lc.run_stream(_mlp(), split3, "powerlaw", method_options={"alpha": -1.0}, progress=False)
    with pytest.raises(ValueError, match="budget too large"):
        lc.run_stream(_mlp(), split3, "powerlaw", method_options={"ratio": 10.0}, progress=False)


def test_per_task_adapters_never_forget_and_resume(split3_task, tmp_path):
    def run(**kw):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        return lc.run_stream(base, split3_task, "migu", method_options={"mask_ratio": 0.5, "start_task": 0},
                             adapter="lamda", adapter_mode="per_task",
                             adapter_options={"r": 4, "target_modules": ["0", "2"]}, epochs=2, lr=0.05,
                             progress=False, **kw)

    res = run(checkpoint_dir=str(tmp_path / "a"))
    r = np.asarray(res.accuracy_matrix)
    for j in range(3):  # task j's adapter is never trained again: its column is constant
        assert (r[j:, j] == r[j, j]).all()
    assert res.forgetting == 0.0 and res.bwt == 0.0
    calls = {"n": 0}

    def stop_in_second_task(logits, y):
        calls["n"] += 1
        if calls["n"] > 2 * (len(split3_task.train_stream[0].dataset) // 32 + 1) + 3:
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(logits, y)

    part = str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint_dir=part, criterion=stop_in_second_task)
    resumed = run(checkpoint_dir=part, resume=True)
    np.testing.assert_array_equal(resumed.accuracy_matrix, res.accuracy_matrix)
    with pytest.raises(ValueError, match="adapter_mode='per_task' needs adapter"):
        lc.run_stream(_mlp(), split3_task, "naive", adapter_mode="per_task", progress=False)


def test_user_built_avalanche_benchmark():
    from avalanche.benchmarks.scenarios import benchmark_from_datasets
    from avalanche.benchmarks.utils import DataAttribute, make_avalanche_dataset
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)

    def ds(n, shift):
        x = torch.randn(n, 64, generator=g) + shift
        y = torch.randint(0, 10, (n,), generator=g)
        return make_avalanche_dataset(TensorDataset(x, y), data_attributes=[DataAttribute(y.tolist(), "targets")])

    bm = benchmark_from_datasets(train=[ds(60, t) for t in range(2)], test=[ds(30, t) for t in range(2)])
    assert scenario_of(bm) == "domain-incremental"
    for method in ("naive", "ewc"):
        res = lc.run_stream(_mlp(), bm, method, epochs=1, batch_size=16, progress=False)
        assert np.asarray(res.accuracy_matrix).shape == (2, 2) and not np.isnan(res.acc)
