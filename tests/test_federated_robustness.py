"""AFA-CS's derived server step, slot ages, randomised restarts, and faults that never hang or
overflow a federation (Anarchic Federated Learning, Yang et al., ICML 2022, AFA-CS).

The stability rule: with slots refreshed in rotation, AFA-CS's step is a P-step moving average of
past gradients (P = M / min_new); on a quadratic of curvature λ it is stable iff
η·η_L·λ < c(P)/P (`rotation_bound`), and the default η = min(1, c(P)/(2P)) keeps that whenever
local SGD at η_L is stable (η_L·λ < 2).
"""
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import lifelong.federated as fl
from lifelong.federated import AFACD, AFACS, MIFA, FedAvg, FedBuff, Update


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(d.target)))
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)[perm]
    y = torch.tensor(d.target)[perm]
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


# -- the stability rule -------------------------------------------------------------------------

def test_rotation_bound_hand_worked_values():
    # P = 1 is gradient descent (a < 2); P = 2: z² − (1 − a/2)z + a/2 is stable iff a/2 < 1, so c = 4;
    # P = 3 and 4: a root pair reaches |z| = 1 at a/P = 3/2 and 4 − 2√2, i.e. c = 4.5 and 16 − 8√2
    assert fl.rotation_bound(1) == pytest.approx(2.0, abs=1e-9)
    assert fl.rotation_bound(2) == pytest.approx(4.0, abs=1e-9)
    assert fl.rotation_bound(3) == pytest.approx(4.5, abs=1e-9)
    assert fl.rotation_bound(4) == pytest.approx(16 - 8 * math.sqrt(2), abs=1e-9)
    values = [fl.rotation_bound(p) for p in (5, 10, 20, 64, 500)]
    assert values == sorted(values) and 4.9 < values[2] < 4.93 and values[-1] == values[-2]
    assert fl.default_server_lr(100, 5) == pytest.approx(fl.rotation_bound(20) / 40)
    assert fl.default_server_lr(2, 1) == fl.default_server_lr(5, 5) == 1.0
    with pytest.raises(ValueError, match="period"):
        fl.rotation_bound(0)


def _rotating_quadratic(period: int, m: int, a: float, lam: float, steps: int, server_lr=None) -> float:
    """AFA-CS on f_i = λ/2‖x − c_i‖², group t mod P refreshing at step t, uploads at the current x.
    ``a`` = η·η_L·λ; returns ‖x_T − mean(c)‖ / ‖x_0 − mean(c)‖."""
    lr, num = 0.1, period * m
    c = torch.tensor(np.random.default_rng(0).normal(size=(num, 2)), dtype=torch.float64)
    eta = a / (lr * lam) if server_lr is None else server_lr
    cs = AFACS(local_lr=lr, server_lr=eta, min_new=m, cs_init="warm_start", max_staleness=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cs.init({"x": torch.zeros(2, dtype=torch.float64)}, num)
    cs.warm_start(Update(i, {"x": lam * (torch.zeros(2, dtype=torch.float64) - c[i])}, 0, 1) for i in range(num))
    for t in range(steps):
        x = cs.params["x"]
        if float(x.abs().max()) > 1e12:
            break
        for i in range((t % period) * m, (t % period) * m + m):
            assert cs.submit(Update(i, {"x": lam * (x - c[i])}, cs.version, 1)) == (i == (t % period) * m + m - 1)
    return float((cs.params["x"] - c.mean(0)).norm() / c.mean(0).norm())


@pytest.mark.parametrize("period", [1, 2, 5, 20])
def test_stability_rule_holds_on_a_quadratic(period):
    bound = fl.rotation_bound(period) / period     # a = η·η_L·λ must stay below c(P)/P
    assert _rotating_quadratic(period, 2, 0.9 * bound, 1.0, 3000) < 1e-3      # just under: converges
    assert _rotating_quadratic(period, 2, 1.2 * bound, 1.0, 3000) > 1e3       # well over: diverges


@pytest.mark.parametrize("period", [1, 3, 20])
def test_default_step_converges_whenever_local_sgd_is_stable(period):
    # the steepest curvature local SGD survives: η_L·λ = 1.9 < 2
    lam = 1.9 / 0.1
    eta = fl.default_server_lr(2 * period, 2)
    assert _rotating_quadratic(period, 2, 0.0, lam, 4000, server_lr=eta) < 1e-2
    # and η = 1 (the old default) diverges there once P > 2
    if period > 2:
        assert _rotating_quadratic(period, 2, 0.0, lam, 4000, server_lr=1.0) > 1e3


def test_a_given_server_lr_over_the_rule_warns_and_the_default_does_not():
    with pytest.warns(UserWarning, match=r"P = 20.*server_lr=None"):
        AFACS(local_lr=0.3, server_lr=1.0, min_new=5).init({"x": torch.zeros(3)}, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cs = AFACS(local_lr=0.3, min_new=5).init({"x": torch.zeros(3)}, 100)
        AFACS(local_lr=0.3, server_lr=0.1, min_new=5).init({"x": torch.zeros(3)}, 100)
    assert cs.server_step == pytest.approx(fl.rotation_bound(20) / 40)
    assert cs.config()["server_lr"] is None and cs.config()["server_lr_derived"] == cs.server_step
    with pytest.raises(RuntimeError, match="init"):
        _ = AFACS().server_step


def _rotating_run(digits, server, steps, **kw):
    train, test = digits
    return fl.simulate(mlp(), train, server, num_workers=100, steps=steps, test_data=test,
                       partition=fl.Dirichlet(100.0), local_steps=fl.UniformSteps(1, 3), max_concurrent=20,
                       batch_size=16, eval_every=steps // 4, seed=0, progress=False, record_arrivals=True, **kw)


def test_rotating_refresh_federation_converges_with_afa_cs_defaults(digits):
    """The issue's setting: digits MLP, 100 workers, 5 uploads per step, K ∈ {1..3}, η_L = 0.3,
    FIFO restarts (slots refresh in rotation). η = 1 rises and collapses; the default converges."""
    default = _rotating_run(digits, AFACS(local_lr=0.3, min_new=5), 800)
    assert default.final_accuracy > 0.9
    accuracy = [h["accuracy"] for h in default.history]
    assert accuracy[-1] >= max(accuracy) - 0.02                    # still at its best at the end
    with pytest.warns(UserWarning, match="rotating-memory bound"):
        eta1 = _rotating_run(digits, AFACS(local_lr=0.3, server_lr=1.0, min_new=5), 800)
    assert eta1.final_accuracy < 0.6
    # the ages of the averaged slots are recorded: every step averages all 100 slots once full
    assert default.slot_age_max is not None and 0 < default.slot_age_mean < default.slot_age_max
    assert sum(default.slot_age_histogram.values()) <= 100 * default.steps


def _refresh_gap_cv(result) -> float:
    """Median over workers of the coefficient of variation of the gaps between their arrivals."""
    times: dict[int, list[float]] = {}
    for a in result.arrivals:
        times.setdefault(a["worker"], []).append(a["time"])
    cvs = [np.std(np.diff(t)) / np.mean(np.diff(t)) for t in times.values() if len(t) > 3]
    return float(np.median(cvs))


def test_random_restarts_break_the_rotation_and_tell_the_arrival_process_apart(digits):
    fifo = _rotating_run(digits, AFACD(local_lr=0.3, buffer_size=5), 200)
    random = _rotating_run(digits, AFACD(local_lr=0.3, buffer_size=5), 200,
                           restarts=fl.Restarts(jitter=20.0, order="random"))
    assert _refresh_gap_cv(fifo) < 0.3 < 0.5 < _refresh_gap_cv(random)
    assert random.config["restarts"] == {"jitter": 20.0, "order": "random"} and "restarts" not in fifo.config
    again = _rotating_run(digits, AFACD(local_lr=0.3, buffer_size=5), 200,
                          restarts=fl.Restarts(jitter=20.0, order="random"))
    assert again.history == random.history                        # deterministic under the seed
    # same server step η = 1: the collapse is the rotation's (arrival process), not AFA-CS's memory alone
    with pytest.warns(UserWarning):
        shuffled = _rotating_run(digits, AFACS(local_lr=0.3, server_lr=1.0, min_new=5), 800,
                                 restarts=fl.Restarts(jitter=20.0, order="random"))
    assert shuffled.final_accuracy > 0.9


# -- slots: fresher uploads, ages, expiry ------------------------------------------------------

def test_an_upload_over_the_bound_is_kept_when_fresher_than_its_slot():
    cs = AFACS(local_lr=0.1, server_lr=0.5, max_staleness=2).init({"x": torch.zeros(2)}, 3)
    for _ in range(6):
        assert cs.submit(Update(0, {"x": torch.ones(2)}, cs.version, 1))
    assert cs.version == 6
    assert cs.submit(Update(1, {"x": torch.ones(2)}, 1, 1))         # τ = 5 > 2, slot empty: kept
    assert cs.memory_version[1] == 1 and cs.stats["kept_fresher_than_slot"] == 1
    assert cs.submit(Update(1, {"x": torch.ones(2)}, 3, 1))         # τ = 4 > 2, newer than slot (1): kept
    assert not cs.submit(Update(1, {"x": torch.ones(2)}, 2, 1))     # τ = 6, older than slot (3): dropped
    assert cs.memory_version[1] == 3 and cs.stats["dropped_stale"] == 1
    assert cs.stats["kept_fresher_than_slot"] == 2
    # AFA-CD has no slot: the delay bound still drops
    cd = AFACD(buffer_size=1, max_staleness=0).init({"x": torch.zeros(2)}, 3)
    cd.submit(Update(0, {"x": torch.ones(2)}, 0, 1))
    assert not cd.submit(Update(1, {"x": torch.ones(2)}, 0, 1)) and cd.stats["dropped_stale"] == 1


def test_slot_ages_are_recorded_and_max_slot_age_expires_old_slots():
    lr, eta = 0.1, 0.5
    cs = AFACS(local_lr=lr, server_lr=eta, max_staleness=None, max_slot_age=2).init({"x": torch.zeros(1)}, 2)
    cs.submit(Update(0, {"x": torch.tensor([4.0])}, 0, 1))          # step 1: slot 0 (age 0)
    for _ in range(3):                                              # steps 2..4: only worker 1 reports
        cs.submit(Update(1, {"x": torch.tensor([1.0])}, cs.version, 1))
    # ages averaged: step 1 {0}, step 2 {1 (w0), 0}, step 3 {2, 0}, step 4: w0's age 3 > 2 expired
    assert cs.stats["slot_age"] == {0: 4, 1: 1, 2: 1} and cs.stats["expired_slots"] == 1
    expected = -lr * eta * (4.0 + 2.5 + 2.5 + 1.0)
    assert cs.params["x"].item() == pytest.approx(expected)
    assert sorted(cs.memory) == [1]


# -- faults never hang -------------------------------------------------------------------------

def test_mifa_waiting_for_a_device_that_always_fails_stops_within_the_bound(digits):
    train, test = digits
    with pytest.raises(fl.FederationStalled, match=r"no server step in 40 rounds.*min_fraction=1\.0") as err:
        fl.simulate(nn.Linear(64, 10), train, MIFA(local_lr=0.1), num_workers=20, steps=10,
                    faults=fl.Faults(fraction=0.05), test_data=test, progress=False, max_stall=40)
    assert "crashed" in str(err.value)
    assert fl.default_max_stall(20) == 300
    with pytest.warns(RuntimeWarning, match="on_stall='stop'"):
        res = fl.simulate(nn.Linear(64, 10), train, MIFA(local_lr=0.1), num_workers=20, steps=10,
                          faults=fl.Faults(fraction=0.05), test_data=test, progress=False, max_stall=40,
                          on_stall="stop")
    assert res.stopped_early and res.steps == 0 and res.crashed == 40   # the faulty worker, each round


@pytest.mark.parametrize("algorithm", [AFACD(local_lr=0.1, buffer_size=3), FedBuff(local_lr=0.1, buffer_size=3),
                                       AFACS(local_lr=0.1), FedAvg(local_lr=0.1, cohort_size=4)],
                         ids=lambda a: a.name)
def test_a_server_rejecting_every_upload_stops_with_a_clear_error(digits, algorithm):
    train, test = digits
    with pytest.raises(fl.FederationStalled, match=r"no server step in 60 .*'nonfinite'"):
        fl.simulate(nn.Linear(64, 10), train, algorithm, num_workers=10, steps=5, test_data=test,
                    faults=fl.Faults(fraction=1.0, kinds=("nan",)), progress=False, max_stall=60)


def test_a_job_whose_loss_raises_is_a_failed_job_and_the_run_goes_on(digits):
    train, test = digits
    calls = {"n": 0}

    def flaky_loss(logits, labels):
        calls["n"] += 1
        if calls["n"] % 7 == 0:
            raise RuntimeError("loss exploded on this batch")
        return nn.functional.cross_entropy(logits, labels)

    res = fl.simulate(nn.Linear(64, 10), train, AFACD(local_lr=0.1, buffer_size=3), num_workers=10, steps=8,
                      test_data=test, loss_fn=flaky_loss, local_steps=fl.FixedSteps(2), progress=False,
                      eval_every=4, record_arrivals=True)
    assert res.steps == 8 and res.failed > 0 and not res.stopped_early
    assert res.errors and "RuntimeError: loss exploded on this batch" in res.errors[0]
    assert res.history[-1]["failed"] == res.failed

    def training_fails(logits, labels):   # evaluation (no grad) works, every training step raises
        if torch.is_grad_enabled():
            raise ZeroDivisionError("division by zero")
        return nn.functional.cross_entropy(logits, labels)

    with pytest.raises(fl.FederationStalled, match="first job error: worker .*ZeroDivisionError"):
        fl.simulate(nn.Linear(64, 10), train, AFACD(local_lr=0.1, buffer_size=3), num_workers=4, steps=2,
                    test_data=test, loss_fn=training_fails, progress=False, max_stall=20)


# -- faults never overflow ---------------------------------------------------------------------

SERVERS = {"fedavg": lambda **kw: FedAvg(local_lr=0.1, cohort_size=5, **kw),
           "mifa": lambda **kw: MIFA(local_lr=0.1, min_fraction=0.0, **kw),
           "afa_cd": lambda **kw: AFACD(local_lr=0.1, buffer_size=3, **kw),
           "afa_cs": lambda **kw: AFACS(local_lr=0.1, **kw),
           "fedbuff": lambda **kw: FedBuff(local_lr=0.1, buffer_size=3, **kw)}


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_huge_finite_uploads_never_make_the_global_model_non_finite(digits, name):
    train, test = digits

    def run(**kw):
        return fl.simulate(nn.Linear(64, 10), train, SERVERS[name](**kw), num_workers=10, steps=6, test_data=test,
                           faults=fl.Faults(fraction=0.2, kinds=("huge",)), local_steps=fl.FixedSteps(3),
                           progress=False, eval_every=3)

    res = run()
    assert res.steps == 6 and all(bool(torch.isfinite(t).all()) for t in res.final_params.values())
    if name in ("fedavg", "mifa", "fedbuff"):   # K·G of 3e38 overflows: refused on arrival
        assert res.rejected.get("overflow", 0) > 0
    bounded = run(max_update_norm=1e6)          # a norm bound keeps huge finite uploads out altogether
    assert bounded.rejected.get("norm", 0) > 0 and "overflow" not in bounded.rejected
    assert all(float(t.abs().max()) < 1e3 for t in bounded.final_params.values())


def test_fedavg_rejects_the_overflowing_upload_and_averages_the_rest():
    lr = 0.5
    fa = FedAvg(local_lr=lr, server_lr=4.0, cohort_size=3).init({"x": torch.zeros(2)}, 3)
    fa.submit(Update(0, {"x": torch.tensor([1.0, 2.0])}, 0, 1))
    fa.submit(Update(1, {"x": torch.tensor([3.0e38, 3.0e38])}, 0, 1))   # finite, K·G finite, sum not
    fa.submit(Update(2, {"x": torch.tensor([3.0e38, -1.0])}, 0, 1))
    assert fa.flush()
    assert fa.stats["rejected"] == {"overflow": 1} and fa.stats["accepted"] == 2
    # averaging all three would step by 2·2e38 (overflow); the largest (worker 1) was rejected and the
    # rest averaged: x = −η·η_L·mean(K·G)
    expected = -4.0 * lr * ((torch.tensor([1.0, 2.0]) + torch.tensor([3.0e38, -1.0])) / 2)
    assert torch.allclose(fa.params["x"], expected, rtol=1e-6)
    assert bool(torch.isfinite(fa.x).all())
    # K·G itself overflows: rejected on arrival
    fa.submit(Update(0, {"x": torch.tensor([3.0e38, 0.0])}, 1, 2))
    assert fa.stats["rejected"] == {"overflow": 2} and fa.round == []


def test_mifa_memory_restores_the_previous_slot_when_an_upload_overflows():
    mifa = MIFA(local_lr=0.1, min_fraction=0.0).init({"x": torch.zeros(1)}, 2)
    mifa.submit(Update(0, {"x": torch.tensor([1.0])}, 0, 1))
    assert mifa.flush()
    mifa.submit(Update(0, {"x": torch.tensor([3.0e38])}, 1, 1))
    mifa.submit(Update(1, {"x": torch.tensor([3.0e38])}, 1, 1))        # the slot sum overflows: refused
    assert mifa.stats["rejected"] == {"overflow": 1}
    assert mifa.flush() and bool(torch.isfinite(mifa.x).all())
    assert torch.equal(mifa.running_sum, sum(mifa.memory.values()))


def test_a_norm_bound_rejects_large_uploads():
    cd = AFACD(local_lr=0.1, buffer_size=1, max_update_norm=5.0).init({"x": torch.zeros(2)}, 2)
    assert not cd.submit(Update(0, {"x": torch.tensor([3.0, 4.5])}, 0, 1))   # ‖G‖ = 5.41
    assert cd.submit(Update(0, {"x": torch.tensor([3.0, 4.0])}, 0, 1))       # ‖G‖ = 5: allowed
    assert cd.stats["rejected"] == {"norm": 1}


def test_the_text_benchmark_reads_its_cache_without_unpickling_code():
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "benchmarks" / "federated_text.py").read_text()
    assert "weights_only=False" not in source and "weights_only=True" in source
