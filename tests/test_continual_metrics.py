"""Metrics of lifelong.continual against cl_metrics.md's worked example and hand-checked cases."""

import math

import numpy as np
import pytest
import torch

from lifelong.continual import metrics as M

R = [[0.80, 0.15, 0.05], [0.90, 0.85, 0.12], [0.60, 0.70, 0.95]]
B = [0.10, 0.10, 0.10]


def test_worked_example():
    s = M.summarize(R, B)
    assert s["acc"] == pytest.approx(0.75)
    assert M.average_accuracy_after(R, 1) == pytest.approx(0.80)
    assert M.average_accuracy_after(R, 2) == pytest.approx(0.875)
    assert s["average_incremental_accuracy"] == pytest.approx(0.808333333)
    assert s["bwt"] == pytest.approx(-0.175)
    assert s["fwt"] == pytest.approx(0.035)
    assert s["forgetting"] == pytest.approx(0.225)
    assert s["avalanche_forgetting"] == pytest.approx(0.175)
    assert s["learning_accuracy"] == pytest.approx(0.866667, abs=1e-6)
    assert s["lower_triangle_accuracy"] == pytest.approx(0.80)


def test_identity_like_matrix():
    r = np.tril(np.ones((4, 4)))
    assert M.average_accuracy(r) == 1.0
    assert M.backward_transfer(r) == 0.0
    assert M.average_forgetting(r) == 0.0


def test_everything_forgotten():
    diag = np.array([0.9, 0.8, 0.7, 0.95])
    r = np.zeros((4, 4))
    for i in range(4):
        r[i, i] = diag[i]
    assert M.backward_transfer(r) == pytest.approx(-diag[:-1].mean())
    assert M.average_forgetting(r) == pytest.approx(diag[:-1].mean())


def test_prefix_metrics_depend_only_on_submatrix():
    rng = np.random.default_rng(0)
    r = rng.uniform(size=(5, 5))
    r2 = r.copy()
    r2[3:, :] = rng.uniform(size=(2, 5))
    r2[:, 3:] = rng.uniform(size=(5, 2))
    for k in (1, 2, 3):
        assert M.average_accuracy_after(r, k) == M.average_accuracy_after(r2, k)
        f1, f2 = M.forgetting_after(r, k), M.forgetting_after(r2, k)
        assert (math.isnan(f1) and math.isnan(f2)) or f1 == f2


def test_single_task_and_missing_cells_are_nan():
    s = M.summarize([[0.7]], [0.1])
    assert s["acc"] == pytest.approx(0.7)
    assert all(math.isnan(s[k]) for k in ("bwt", "fwt", "forgetting"))
    assert math.isnan(M.forward_transfer(R, [math.nan] * 3))
    r = np.array(R)
    r[2, 0] = np.nan
    assert math.isnan(M.average_accuracy(r))


def test_accuracy_matrix_record_and_errors():
    m = M.AccuracyMatrix(3)
    for i in range(3):
        for j in range(3):
            m.record(i, j, R[i][j])
        m.record_initial(i, B[i])
    assert m.summary()["forgetting"] == pytest.approx(0.225)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.record(0, 0, 1.5)
    with pytest.raises(IndexError, match="outside"):
        m.record(3, 0, 0.5)
    with pytest.raises(ValueError, match="positive"):
        M.AccuracyMatrix(0)


def test_accuracy_is_micro_and_matches_direct_count():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 5.0]])
    target = torch.tensor([0, 1, 0, 0])
    assert M.accuracy(logits, target) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        M.accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
