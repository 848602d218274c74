"""Who takes part, and when: per-worker participation models on a virtual clock.

Every model answers two questions, deterministically from
the run seed (each answer draws from its own seeded stream, so results never
depend on the order in which the simulator asks):

* ``next_start(i, t, job)`` — event-driven engine: the earliest virtual time
  ``≥ t`` at which worker i starts its job number ``job`` (None: never again);
* ``available_mask(t, round)`` — round-based engine: which workers can be
  sampled in round ``round`` starting at time ``t``.

Models: `Bernoulli` (each wake-up tick succeeds with probability p_i),
`MarkovOnOff` (exponential on/off sessions), `Periodic` (diurnal duty cycle with a
per-worker phase) and `Trace` (replay of recorded ``(t_on, t_off)`` windows).
"""
from __future__ import annotations

import bisect
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..checks import fraction, positive_number

# stream tags: keep every random decision in its own seeded stream
_BERNOULLI_WAIT, _BERNOULLI_ROUND, _MARKOV, _PERIODIC = 11, 12, 13, 14


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class Participation:
    def bind(self, num_workers: int, seed: int) -> None:
        self.num_workers = num_workers
        self.seed = seed

    def next_start(self, worker: int, t: float, job: int) -> float | None:
        raise NotImplementedError

    def available_mask(self, t: float, round_: int) -> np.ndarray:
        raise NotImplementedError

    def exhausted(self, t: float) -> bool:
        """True when no worker can ever be available again after time ``t``."""
        return False

    def describe(self) -> dict:
        raise NotImplementedError


class Bernoulli(Participation):
    """Worker i wakes every ``interval`` time units and joins with probability ``p_i``."""

    def __init__(self, p: float | Sequence[float] = 1.0, interval: float = 1.0):
        probs = np.atleast_1d(np.asarray(p, dtype=float))
        if probs.size == 0 or not np.all((probs >= 0) & (probs <= 1)):
            raise ValueError(f"participation probabilities must lie in [0, 1], got {p!r}")
        positive_number("interval", interval)
        self.p = probs
        self.interval = float(interval)

    def bind(self, num_workers: int, seed: int) -> None:
        super().bind(num_workers, seed)
        if self.p.size not in (1, num_workers):
            raise ValueError(f"Bernoulli got {self.p.size} probabilities for {num_workers} workers")
        self.probs = np.broadcast_to(self.p, (num_workers,)).copy()

    def next_start(self, worker: int, t: float, job: int) -> float | None:
        p = self.probs[worker]
        if p <= 0:
            return None
        waits = _rng(self.seed, _BERNOULLI_WAIT, worker, job).geometric(p) - 1
        return t + waits * self.interval

    def available_mask(self, t: float, round_: int) -> np.ndarray:
        return _rng(self.seed, _BERNOULLI_ROUND, round_).random(self.num_workers) < self.probs

    def describe(self) -> dict:
        return {"kind": "Bernoulli", "p": self.p.tolist(), "interval": self.interval}


class MarkovOnOff(Participation):
    """Two-state chain per worker: on and off periods with exponential durations."""

    def __init__(self, mean_on: float, mean_off: float):
        positive_number("mean_on", mean_on)
        positive_number("mean_off", mean_off)
        self.mean_on = float(mean_on)
        self.mean_off = float(mean_off)

    def bind(self, num_workers: int, seed: int) -> None:
        super().bind(num_workers, seed)
        # switch times are a pure function of (seed, worker); the cache can be rebuilt any time
        self._switches: dict[int, list[float]] = {}
        self._starts_on: dict[int, bool] = {}

    def _extend(self, worker: int, t: float) -> list[float]:
        if worker not in self._switches:
            start = _rng(self.seed, _MARKOV, worker, 0).random()
            self._starts_on[worker] = start < self.mean_on / (self.mean_on + self.mean_off)
            self._switches[worker] = [0.0]
        times = self._switches[worker]
        while times[-1] <= t:
            k = len(times)
            on = self._starts_on[worker] == (k % 2 == 1)  # segment k-1 state
            mean = self.mean_on if on else self.mean_off
            times.append(times[-1] + _rng(self.seed, _MARKOV, worker, k).exponential(mean))
        return times

    def _is_on(self, worker: int, t: float) -> tuple[bool, float]:
        """(state at t, time of the next switch)."""
        times = self._extend(worker, t)
        seg = bisect.bisect_right(times, t) - 1
        on = self._starts_on[worker] == (seg % 2 == 0)
        return on, times[seg + 1]

    def next_start(self, worker: int, t: float, job: int) -> float | None:
        on, switch = self._is_on(worker, t)
        return t if on else switch

    def available_mask(self, t: float, round_: int) -> np.ndarray:
        return np.array([self._is_on(w, t)[0] for w in range(self.num_workers)])

    def describe(self) -> dict:
        return {"kind": "MarkovOnOff", "mean_on": self.mean_on, "mean_off": self.mean_off}


class Periodic(Participation):
    """Diurnal availability: on for ``duty·period`` of every period, with a per-worker phase."""

    def __init__(self, period: float = 24.0, duty: float = 0.5, random_phase: bool = True):
        positive_number("period", period)
        fraction("duty", duty, open_low=True)
        self.period = float(period)
        self.duty = float(duty)
        self.random_phase = random_phase

    def bind(self, num_workers: int, seed: int) -> None:
        super().bind(num_workers, seed)
        self.phase = (_rng(seed, _PERIODIC).uniform(0, self.period, num_workers)
                      if self.random_phase else np.zeros(num_workers))

    def _position(self, worker: int, t: float) -> float:
        return math.fmod(t + self.phase[worker], self.period)

    def next_start(self, worker: int, t: float, job: int) -> float | None:
        pos = self._position(worker, t)
        return t if pos < self.duty * self.period else t + (self.period - pos)

    def available_mask(self, t: float, round_: int) -> np.ndarray:
        pos = np.fmod(t + self.phase, self.period)
        return pos < self.duty * self.period

    def describe(self) -> dict:
        return {"kind": "Periodic", "period": self.period, "duty": self.duty,
                "random_phase": self.random_phase}


@dataclass
class Trace(Participation):
    """Replay recorded availability windows ``{worker: [(t_on, t_off), ...]}``.

    Workers absent from the trace are never available.
    """

    windows: Mapping[int, Sequence[tuple[float, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean: dict[int, list[tuple[float, float]]] = {}
        for worker, spans in self.windows.items():
            spans = sorted((float(a), float(b)) for a, b in spans)
            for a, b in spans:
                if not (b > a >= 0):
                    raise ValueError(f"trace window ({a}, {b}) of worker {worker} must satisfy "
                                     "0 <= t_on < t_off")
            clean[int(worker)] = spans
        self.windows = clean

    @classmethod
    def from_file(cls, path: str | Path) -> "Trace":
        """Read a JSON ``{"worker": [[t_on, t_off], ...]}`` or a CSV ``worker,t_on,t_off``."""
        path = Path(path)
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
            return cls({int(w): [tuple(s) for s in spans] for w, spans in raw.items()})
        if path.suffix == ".csv":
            windows: dict[int, list[tuple[float, float]]] = {}
            with path.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    windows.setdefault(int(row["worker"]), []).append(
                        (float(row["t_on"]), float(row["t_off"])))
            return cls(windows)
        raise ValueError(f"trace file must end in .json or .csv, got {path.name!r}")

    def bind(self, num_workers: int, seed: int) -> None:
        super().bind(num_workers, seed)
        unknown = sorted(w for w in self.windows if not 0 <= w < num_workers)
        if unknown:
            raise ValueError(f"the participation trace names unknown workers {unknown[:10]}; "
                             f"workers are numbered 0..{num_workers - 1}")

    def next_start(self, worker: int, t: float, job: int) -> float | None:
        for a, b in self.windows.get(worker, ()):
            if b > t:
                return max(a, t)
        return None

    def exhausted(self, t: float) -> bool:
        return all(b <= t for spans in self.windows.values() for _, b in spans)

    def available_mask(self, t: float, round_: int) -> np.ndarray:
        mask = np.zeros(self.num_workers, dtype=bool)
        for worker, spans in self.windows.items():
            mask[worker] = any(a <= t < b for a, b in spans)
        return mask

    def describe(self) -> dict:
        return {"kind": "Trace", "windows": {str(w): [list(s) for s in spans]
                                             for w, spans in self.windows.items()}}


def label_correlated(labels: np.ndarray, parts: Sequence[np.ndarray], beta: float = 0.1,
                     by: str = "min") -> np.ndarray:
    """MIFA/FLGo availability ``p_i = β·label_i/(C−1) + (1−β)``: arrivals correlated with data.

    ``by="min"`` uses the smallest label worker i holds (MIFA's rule, Gu et al. 2021);
    ``by="dominant"`` its most frequent label, which keeps the skew when most workers hold a
    few samples of every class (a Dirichlet split with α ≳ 1 gives nearly every worker a
    class-0 sample, and the min rule then makes participation almost uniform).
    """
    fraction("beta", beta)
    if by not in ("min", "dominant"):
        raise ValueError(f"by must be 'min' or 'dominant', got {by!r}")
    num_classes = int(labels.max()) + 1
    if by == "min":
        label = np.array([labels[p].min() for p in parts], dtype=float)
    else:
        label = np.array([np.bincount(labels[p], minlength=num_classes).argmax() for p in parts], dtype=float)
    return beta * label / max(num_classes - 1, 1) + (1 - beta)
