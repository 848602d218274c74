"""Power-law rehearsal environments (a training-data schedule, not a learning rule).

Atith Gandhi, Raj Sanjay Shah, Vijay Marupudi, Sashank Varma. *Catastrophic Interference is
Mitigated in Naturalistic Power-Law Learning Environments* (arXiv 2401.10393 v1/v2, 2024); v3
retitled *Natural Mitigation of Catastrophic Interference: Continual Learning in Power-Law
Learning Environments*. No reference code was published with the paper.

Phase i introduces task i and re-exposes every earlier task j < i. With lag Δ = i − j:

    powerlaw:     w(Δ) = (Δ + c)^(−α)          exponential: w(Δ) = exp(−Δ/β)      uniform: w(Δ) = 1
    budgeted:     F[j, i] = R_i · w(i−j) / Σ_{Δ=1}^{i−1} w(Δ),   R_i = ⌊ρ · n_i⌋,
                  rounded by the largest-remainder rule so that Σ_{j<i} F[j, i] = R_i exactly
    unrestricted: F[j, i] = round(n_i · w(Δ) / w(0))             (power law: needs c > 0)
    stochastic:   each rehearsal sample's task drawn from P_i(j) = w(i−j) / Σ w(Δ)

``F[i, i] = n_i`` (all new data), ``F[j, i] = 0`` for j > i. ``kind="none"`` (no rehearsal)
and ``kind="all"`` (cumulative: every sample of every seen task) are the lower/upper controls.
Samples of task j in phase i are drawn without replacement, fresh per phase, from a generator
seeded by ``(seed, i, j)``, so an environment is identical for the same seed. "Uniform" splits the
budget equally with the largest-remainder rule (the lineage code floors, losing samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import warnings

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Subset

from ...checks import non_negative_int, non_negative_number, one_of, positive_number
from ..hooks import Context, ContinualMethod, MethodConfig
from ..registry import ALL_MODES, register_method

__all__ = ["PowerLawReplay", "rehearsal_weights", "rehearsal_schedule", "largest_remainder"]

KINDS = ("powerlaw", "exponential", "uniform", "none", "all")
MODES = ("budgeted", "unrestricted", "stochastic")


def _lag_weight(lag: np.ndarray, kind: str, alpha: float, offset: float, beta: float) -> np.ndarray:
    lag = np.asarray(lag, dtype=float)
    if kind == "powerlaw":
        return (lag + offset) ** (-alpha)
    if kind == "exponential":
        return np.exp(-lag / beta)
    return np.ones_like(lag)


def rehearsal_weights(phase: int, kind: str = "powerlaw", alpha: float = 1.0, offset: float = 1.0,
                      beta: float = 1.0) -> np.ndarray:
    """P_phase(j) for j = 0..phase-1 (0-based phase index); sums to 1, non-increasing in the lag."""
    _check(kind, alpha, offset, beta)
    if phase < 1:
        return np.zeros(0)
    lags = phase - np.arange(phase)  # task j has lag phase - j
    w = _lag_weight(lags, kind, alpha, offset, beta)
    return w / w.sum()


def largest_remainder(real: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to ``total`` closest to ``real`` (floors, then +1 to the largest remainders;
    ties go to the lower index, i.e. the older task in our column layout)."""
    floors = np.floor(real).astype(np.int64)
    short = int(total - floors.sum())
    if short > 0:
        order = np.argsort(-(real - floors), kind="stable")
        floors[order[:short]] += 1
    return floors


def _check(kind: str, alpha: float, offset: float, beta: float) -> None:
    one_of("kind", kind, KINDS)
    non_negative_number("alpha (the power-law exponent)", alpha)
    non_negative_number("offset c", offset)
    positive_number("beta (the exponential scale)", beta)


def rehearsal_schedule(n_new, kind: str = "powerlaw", alpha: float = 1.0, offset: float = 1.0,
                       ratio: float = 0.25, beta: float = 1.0, mode: str = "budgeted",
                       real: bool = False) -> np.ndarray:
    """The matrix F (tasks × phases): ``F[j, i]`` samples of task j in phase i.

    ``n_new``: list of per-task training-set sizes (phase i's new data). ``real=True`` returns the
    unrounded amounts (to check the ratios between tasks).
    """
    _check(kind, alpha, offset, beta)
    if mode not in MODES:
        raise ValueError(f"unknown rehearsal mode {mode!r}; valid: {', '.join(MODES)}")
    if not 0.0 <= ratio:
        raise ValueError(f"ratio (replay fraction) must be >= 0, got {ratio}")
    n = np.asarray(n_new, dtype=np.int64)
    t = len(n)
    f = np.zeros((t, t), dtype=float if real else np.int64)
    for i in range(t):
        f[i, i] = n[i]
        if i == 0 or kind == "none":
            continue
        if kind == "all":
            f[:i, i] = n[:i]
            continue
        if mode == "unrestricted":
            if kind == "powerlaw" and offset == 0:
                raise ValueError("unrestricted power-law mode needs offset c > 0 (w(0) = c^-alpha)")
            lags = i - np.arange(i)
            w0 = _lag_weight(np.zeros(1), kind, alpha, offset, beta)[0]
            amounts = n[i] * _lag_weight(lags, kind, alpha, offset, beta) / w0
            f[:i, i] = amounts if real else np.rint(amounts).astype(np.int64)
        else:
            budget = math.floor(ratio * n[i])
            amounts = budget * rehearsal_weights(i, kind, alpha, offset, beta)
            f[:i, i] = amounts if real else largest_remainder(amounts, budget)
    return f


@dataclass
class PowerLawConfig(MethodConfig):
    """Power-law rehearsal's settings.

    Args:
        kind: ``"powerlaw"``, ``"exponential"``, ``"uniform"``, ``"none"`` or ``"all"``.
        alpha, offset: power-law exponent α ≥ 0 and offset c ≥ 0.
        ratio: ρ, budget per phase = ⌊ρ · n_new⌋ (budgeted and stochastic modes).
        beta: exponential scale.
        mode: ``"budgeted"``, ``"unrestricted"`` or ``"stochastic"``.
        min_per_task: warn when a past task gets fewer samples than this.
        seed: seeds every draw.
    """

    kind: str = "powerlaw"
    alpha: float = 1.0
    offset: float = 1.0
    ratio: float = 0.25
    beta: float = 1.0
    mode: str = "budgeted"
    min_per_task: int = 0
    seed: int = 0

    def validate(self) -> None:
        _check(self.kind, self.alpha, self.offset, self.beta)
        one_of("mode", self.mode, MODES)
        non_negative_number("ratio (the replay fraction)", self.ratio)
        non_negative_int("min_per_task", self.min_per_task)
        non_negative_int("seed", self.seed)


@register_method("powerlaw", shards=True, adapter_modes=ALL_MODES)
class PowerLawReplay(ContinualMethod):
    """Rehearsal environment over past tasks: which samples of each old task go into each phase.

    Framework-free: it sees datasets only through their lengths and returns index arrays; the native
    loop builds ``Subset``/``ConcatDataset`` from them and the Avalanche plugin uses
    ``AvalancheDataset.subset``/``concat``. Lags are counted from the phase in which a task was new.
    Options are the fields of :class:`PowerLawConfig` (or pass one as ``config``).
    """

    Config = PowerLawConfig

    def __init__(self, config: PowerLawConfig | None = None, **options):
        self.configure(config, options)
        self.past_sizes: list[int] = []

    def _rng(self, phase: int, task: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + phase * 1_009 + task)

    def amounts(self, phase: int, n_new: int) -> np.ndarray:
        """Samples of each past task 0..phase-1 in ``phase`` (budgeted/unrestricted/stochastic counts)."""
        if len(self.past_sizes) < phase:
            raise ValueError(f"phase {phase} needs {phase} stored past tasks, {len(self.past_sizes)} are stored")
        sizes = list(self.past_sizes[:phase]) + [n_new]
        if self.mode == "stochastic" and self.kind not in ("none", "all"):
            return self._stochastic_counts(phase, n_new)
        col = rehearsal_schedule(sizes, self.kind, self.alpha, self.offset, self.ratio, self.beta,
                                 "unrestricted" if self.mode == "unrestricted" else "budgeted")[:phase, phase]
        return col

    def _stochastic_counts(self, phase: int, n_new: int) -> np.ndarray:
        budget = math.floor(self.ratio * n_new)
        p = torch.as_tensor(rehearsal_weights(phase, self.kind, self.alpha, self.offset, self.beta))
        draws = torch.multinomial(p, budget, replacement=True, generator=self._rng(phase, -1)) if budget else \
            torch.zeros(0, dtype=torch.long)
        return np.bincount(draws.numpy(), minlength=phase).astype(np.int64)

    def phase_indices(self, phase: int, n_new: int) -> dict[int, torch.Tensor]:
        """Task j → indices into task j's stored dataset for ``phase`` (unique within a task)."""
        counts = self.amounts(phase, n_new)
        out = {}
        for j, k in enumerate(counts):
            k = int(k)
            if k == 0:
                continue
            size = self.past_sizes[j]
            if k > size and self.mode != "stochastic":
                raise ValueError(f"replay budget too large: phase {phase} asks for {k} samples of task {j}, "
                                 f"which has only {size}; lower ratio (now {self.ratio}) or use kind='all'")
            g = self._rng(phase, j)
            if k > size:  # stochastic draws may exceed a small task: sample with replacement then
                out[j] = torch.randint(size, (k,), generator=g)
            else:
                out[j] = torch.randperm(size, generator=g)[:k]
            if k < self.min_per_task:
                warnings.warn(f"PowerLawReplay: task {j} gets {k} samples in phase {phase}, fewer than "
                              f"min_per_task={self.min_per_task}", stacklevel=2)
        return out

    def remember(self, size: int) -> None:
        """Register a finished task's training-set size (its data is kept by the caller)."""
        if size <= 0:
            raise ValueError(f"PowerLawReplay.remember: a task needs at least one sample, got size {size}")
        self.past_sizes.append(int(size))

    def memory_samples(self) -> int:
        """Samples held for rehearsal (all past data: the environment re-exposes from it)."""
        return int(sum(self.past_sizes)) if self.kind != "none" else 0

    # -- the hook protocol ---------------------------------------------------------------------------
    def train_dataset(self, ctx: Context):
        """The data chosen so far followed by this phase's samples of every earlier experience."""
        index, current = ctx.experience, ctx.dataset
        picks = self.phase_indices(index, len(ctx.experiences[index].dataset)) if index > 0 else {}
        parts = [current] + [Subset(ctx.experiences[j].dataset, idx.tolist()) for j, idx in sorted(picks.items())]
        return ConcatDataset(parts) if len(parts) > 1 else current

    def after_experience(self, ctx: Context) -> None:
        self.remember(len(ctx.experiences[ctx.experience].dataset))

    def memory(self) -> dict:
        return {"replay_samples": self.memory_samples()}

    def state_dict(self) -> dict:
        return {"past_sizes": list(self.past_sizes)}

    def load_state_dict(self, state: dict) -> None:
        self.past_sizes = [int(s) for s in state["past_sizes"]]
