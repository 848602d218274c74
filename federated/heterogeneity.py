"""Effort, speed and faults of anarchic workers.

* Local-step policies pick the K a worker runs for a job: `FixedSteps(K)`,
  `UniformSteps(lo, hi)` (new draw per job), `PerWorkerSteps(lo, hi)` (drawn once
  per worker), `TimeBudget(B)` (worker-chosen: ``K = max(1, ⌊B / c_i⌋)``, so slow
  devices do fewer steps). The server never assumes K: every upload reports it.
* `Speed`: per-worker step time ``c_i = c0·exp(σ·z_i)`` (log-normal), per-job
  jitter, latency and bandwidth. A job lasts ``2·latency + bytes/bandwidth +
  K·c_i``; staleness emerges from the clock.
* `Faults`: a fraction of workers is faulty; each of their jobs, with
  probability ``prob``, crashes mid-update, uploads NaN or inf, uploads a
  tensor of the wrong shape, or (kind ``"huge"``, not in the default kinds) uploads
  finite values of 3e38 that overflow any sum.
* `Restarts`: how a worker's next job is scheduled once one lands — an optional
  exponential wait (``jitter``) and the order in which jobs waiting for a free
  slot (``max_concurrent``) are served (``"fifo"`` or ``"random"``). With the defaults
  (no wait, first-in first-out) busy workers refresh in a near-fixed rotation; the
  random variants break it, so an effect of the arrival process can be told apart
  from an effect of the algorithm.

All draws come from streams keyed by (seed, tag, worker[, job]).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..checks import fraction, non_negative_number, optional, positive_int, positive_number
from .params import Params

_STEPS, _SPEED, _JITTER, _FAULT_SET, _FAULT_JOB, _RESTART_WAIT, _RESTART_ORDER = 21, 22, 23, 24, 25, 26, 27
DEFAULT_FAULT_KINDS = ("crash", "nan", "inf", "shape")
FAULT_KINDS = (*DEFAULT_FAULT_KINDS, "huge")
HUGE = 3e38   # finite in float32, but the sum of two overflows
RESTART_ORDERS = ("fifo", "random")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _check_steps(lo: int, hi: int) -> None:
    positive_int("local steps (low)", lo)
    positive_int("local steps (high)", hi)
    if lo > hi:
        raise ValueError(f"local steps need low <= high, got ({lo!r}, {hi!r})")


class LocalSteps:
    def bind(self, num_workers: int, seed: int, step_times: np.ndarray) -> None:
        self.seed = seed
        self.step_times = step_times

    def steps(self, worker: int, job: int) -> int:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": type(self).__name__, **asdict(self)}  # type: ignore[call-overload]


@dataclass
class FixedSteps(LocalSteps):
    k: int

    def __post_init__(self) -> None:
        _check_steps(self.k, self.k)

    def steps(self, worker: int, job: int) -> int:
        return self.k


@dataclass
class UniformSteps(LocalSteps):
    low: int
    high: int

    def __post_init__(self) -> None:
        _check_steps(self.low, self.high)

    def steps(self, worker: int, job: int) -> int:
        return int(_rng(self.seed, _STEPS, worker, job).integers(self.low, self.high + 1))


@dataclass
class PerWorkerSteps(LocalSteps):
    low: int
    high: int

    def __post_init__(self) -> None:
        _check_steps(self.low, self.high)

    def bind(self, num_workers: int, seed: int, step_times: np.ndarray) -> None:
        super().bind(num_workers, seed, step_times)
        self.per_worker = _rng(seed, _STEPS).integers(self.low, self.high + 1, num_workers)

    def steps(self, worker: int, job: int) -> int:
        return int(self.per_worker[worker])


@dataclass
class TimeBudget(LocalSteps):
    budget: float
    max_steps: int | None = None

    def __post_init__(self) -> None:
        positive_number("time budget", self.budget)
        optional(positive_int, "max_steps", self.max_steps)

    def steps(self, worker: int, job: int) -> int:
        k = max(1, int(math.floor(self.budget / self.step_times[worker])))
        return k if self.max_steps is None else min(k, self.max_steps)


@dataclass
class Speed:
    step_time: float = 1.0      # c0: virtual seconds per local step
    sigma: float = 0.0          # log-normal spread of the per-worker step time
    jitter: float = 0.0         # log-normal spread per job
    latency: float = 0.0        # per message, each direction
    bandwidth: float | None = None  # bytes per virtual second; None = free communication

    def __post_init__(self) -> None:
        positive_number("step_time", self.step_time)
        for name in ("sigma", "jitter", "latency"):
            non_negative_number(name, getattr(self, name))
        optional(positive_number, "bandwidth", self.bandwidth)

    def bind(self, num_workers: int, seed: int) -> np.ndarray:
        z = _rng(seed, _SPEED).standard_normal(num_workers)
        self.seed = seed
        self.step_times = self.step_time * np.exp(self.sigma * z)
        return self.step_times

    def duration(self, worker: int, job: int, steps: int, down_bytes: int, up_bytes: int) -> float:
        compute = steps * self.step_times[worker]
        if self.jitter > 0:
            compute *= math.exp(self.jitter * _rng(self.seed, _JITTER, worker, job).standard_normal())
        comm = 2 * self.latency
        if self.bandwidth is not None:
            comm += (down_bytes + up_bytes) / self.bandwidth
        return float(compute + comm)

    def describe(self) -> dict:
        return asdict(self)


@dataclass
class Faults:
    fraction: float = 0.3
    kinds: tuple[str, ...] = DEFAULT_FAULT_KINDS
    prob: float = 1.0

    def __post_init__(self) -> None:
        fraction("faulty fraction", self.fraction)
        fraction("fault probability (prob)", self.prob)
        bad = [k for k in self.kinds if k not in FAULT_KINDS]
        if bad or not self.kinds:
            raise ValueError(f"fault kinds must be a non-empty subset of {FAULT_KINDS}, got {self.kinds!r}")
        self.kinds = tuple(self.kinds)

    def bind(self, num_workers: int, seed: int) -> None:
        self.seed = seed
        faulty = _rng(seed, _FAULT_SET).permutation(num_workers)[:round(self.fraction * num_workers)]
        # faulty workers cycle through the kinds, so each kind is exercised
        self.kind_of = {int(w): self.kinds[k % len(self.kinds)] for k, w in enumerate(faulty)}

    def draw(self, worker: int, job: int, steps: int) -> tuple[str | None, int]:
        """(fault kind for this job or None, local step at which a crash happens)."""
        kind = self.kind_of.get(worker)
        if kind is None:
            return None, 0
        rng = _rng(self.seed, _FAULT_JOB, worker, job)
        if rng.random() >= self.prob:
            return None, 0
        return kind, int(rng.integers(0, steps))

    @staticmethod
    def corrupt(delta: Params, kind: str) -> Params:
        """The upload a faulty worker sends instead of ``delta``."""
        out = dict(delta)
        name = next(iter(out))
        t = out[name].clone()
        if kind == "nan":
            t.reshape(-1)[0] = float("nan")
        elif kind == "inf":
            t.reshape(-1)[-1] = float("inf")
        elif kind == "shape":
            t = torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
        elif kind == "huge":
            t = torch.full_like(t, HUGE)
        out[name] = t
        return out

    def describe(self) -> dict:
        return {"fraction": self.fraction, "kinds": list(self.kinds), "prob": self.prob}


@dataclass
class Restarts:
    """How workers restart: ``jitter`` is the mean of an exponential wait (virtual time) a worker
    adds before its next job after one lands (0: none); ``order`` is which waiting job gets a
    freed slot when ``max_concurrent`` is reached (``"fifo"``: the longest waiting, ``"random"``:
    any, uniformly). Draws come from streams keyed by (seed, worker, job) and by the event
    sequence number, so runs stay deterministic and resumable."""

    jitter: float = 0.0
    order: str = "fifo"

    def __post_init__(self) -> None:
        non_negative_number("restart jitter", self.jitter)
        if self.order not in RESTART_ORDERS:
            raise ValueError(f"restart order must be one of {list(RESTART_ORDERS)}, got {self.order!r}")

    def bind(self, seed: int) -> None:
        self.seed = seed

    @property
    def is_default(self) -> bool:
        return self.jitter == 0 and self.order == "fifo"

    def wait(self, worker: int, job: int) -> float:
        """Extra wait before ``worker`` starts job number ``job``."""
        if self.jitter == 0:
            return 0.0
        return float(_rng(self.seed, _RESTART_WAIT, worker, job).exponential(self.jitter))

    def pick(self, waiting: int, seq: int) -> int:
        """Index, in the waiting queue of length ``waiting``, of the job that starts next."""
        if self.order == "fifo" or waiting == 1:
            return 0
        return int(_rng(self.seed, _RESTART_ORDER, seq).integers(waiting))

    def describe(self) -> dict:
        return asdict(self)
