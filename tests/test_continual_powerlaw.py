"""Power-law rehearsal environment: the invariants of powerlaw_rehearsal.md §5."""

import numpy as np
import pytest
import torch

from lifelong.continual.methods.powerlaw import PowerLawReplay, largest_remainder, rehearsal_schedule, rehearsal_weights


def test_budgeted_sums_and_structure():
    n = [100, 120, 90, 110, 100, 95]
    f = rehearsal_schedule(n, "powerlaw", alpha=1.5, offset=1.0, ratio=0.3)
    for i in range(len(n)):
        assert f[i, i] == n[i]
        assert (f[i + 1:, i] == 0).all()
        if i == 0:
            assert f[:0, 0].sum() == 0
        else:
            assert f[:i, i].sum() == int(np.floor(0.3 * n[i]))


def test_weights_normalised_and_non_increasing_in_lag():
    for kind in ("powerlaw", "exponential", "uniform"):
        p = rehearsal_weights(6, kind, alpha=2.0, offset=0.5, beta=2.0)
        assert p.sum() == pytest.approx(1.0)
        # index j = task; lag = 6 - j: older tasks (smaller j) have larger lag, so weights increase with j
        assert (np.diff(p) >= -1e-15).all()


def test_power_law_ratio_and_log_linear_slope():
    alpha, c = 1.7, 2.0
    f = rehearsal_schedule([1000] * 8, "powerlaw", alpha=alpha, offset=c, ratio=0.5, real=True)
    col = f[:7, 7]
    lags = 7 - np.arange(7)
    assert col[0] / col[3] == pytest.approx(((lags[3] + c) / (lags[0] + c)) ** alpha, rel=1e-12)
    slope = np.polyfit(np.log(lags + c), np.log(col), 1)[0]
    assert slope == pytest.approx(-alpha, abs=1e-9)


def test_exponential_ratio():
    f = rehearsal_schedule([500] * 5, "exponential", beta=1.5, ratio=0.4, real=True)
    col = f[:4, 4]
    assert col[3] / col[1] == pytest.approx(np.exp(-(1 - 3) / 1.5))


def test_alpha_zero_is_uniform_ratio_zero_is_none_and_all_is_cumulative():
    n = [50, 60, 70, 80]
    assert (rehearsal_schedule(n, "powerlaw", alpha=0.0, ratio=0.5)
            == rehearsal_schedule(n, "uniform", ratio=0.5)).all()
    none = rehearsal_schedule(n, "none")
    assert (rehearsal_schedule(n, "powerlaw", ratio=0.0) == none).all()
    assert (none == np.diag(n)).all()
    full = rehearsal_schedule(n, "all")
    assert (full == np.triu(np.tile(np.array(n)[:, None], (1, 4)))).all()


def test_column_depends_only_on_lag():
    # unrestricted mode: the amount of a past task depends only on its lag
    f = rehearsal_schedule([200] * 7, "powerlaw", alpha=1.0, offset=1.0, mode="unrestricted")
    for i in range(1, 6):
        for j in range(i):
            assert f[j, i] == f[j + 1, i + 1]
    # budgeted mode: the normalised weight ratio of two lags is the same in every column
    p5, p6 = rehearsal_weights(5), rehearsal_weights(6)
    assert p5[-1] / p5[-2] == pytest.approx(p6[-1] / p6[-2])


def test_largest_remainder_exact_sum():
    real = np.array([3.3, 2.5, 1.2, 0.0])
    out = largest_remainder(real, 7)
    assert out.sum() == 7 and (out >= np.floor(real)).all() and (out <= np.ceil(real)).all()


def test_sampling_unique_and_seeded():
    env = PowerLawReplay(ratio=0.5, seed=3)
    for size in (40, 50, 60):
        env.remember(size)
    a = env.phase_indices(3, 100)
    b = PowerLawReplay(ratio=0.5, seed=3)
    b.past_sizes = [40, 50, 60]
    c = PowerLawReplay(ratio=0.5, seed=4)
    c.past_sizes = [40, 50, 60]
    b_idx, c_idx = b.phase_indices(3, 100), c.phase_indices(3, 100)
    assert sum(len(v) for v in a.values()) == 50
    for j, idx in a.items():
        assert len(set(idx.tolist())) == len(idx)
        assert idx.max() < env.past_sizes[j]
        assert torch.equal(idx, b_idx[j])
    assert any(not torch.equal(a[j], c_idx[j]) for j in a)


def test_stochastic_frequencies_converge():
    env = PowerLawReplay(mode="stochastic", ratio=1.0, alpha=1.0, seed=0)
    env.past_sizes = [10_000] * 4
    counts = env.amounts(4, 10_000)
    p = rehearsal_weights(4)
    expected = p * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 16.27  # chi-square, 3 dof, p = 0.001


def test_bad_inputs():
    with pytest.raises(ValueError, match="alpha"):
        PowerLawReplay(alpha=-1.0)
    with pytest.raises(ValueError, match="kind"):
        PowerLawReplay(kind="zipf")
    env = PowerLawReplay(ratio=5.0)
    env.remember(10)
    with pytest.raises(ValueError, match="budget too large"):
        env.phase_indices(1, 100)
