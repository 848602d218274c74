"""Deterministic non-IID partitioning of a labelled dataset among workers.

Same semantics as flwr-datasets' partitioners (``IidPartitioner``,
``DirichletPartitioner``, ``ShardPartitioner``), in numpy, for any in-memory dataset:

* `IID` — a seeded permutation cut into M near-equal parts.
* `Dirichlet(α)` — label skew (NIID-Bench): for every class c draw
  ``q_c ~ Dir(α·1_M)`` and split the class-c indices in proportions ``q_c``;
  redraw until every worker holds at least ``min_size`` samples. Smaller α means
  more skew. As in NIID-Bench's code, a worker that already holds more than N/M
  samples gets no share of the next classes (``balance=True``; flwr-datasets calls
  this ``self_balancing``). With many workers and small α this per-class split
  leaves workers empty; ``over="workers"`` then draws each worker's label mix
  ``p_i ~ Dir(α·1_C)`` instead and fills equal-sized workers from the class pools
  (Hsu, Qi & Brown 2019, "Measuring the effects of non-identical data distribution").
* `Shards(shards_per_worker)` — McMahan et al. 2017: sort by label, cut into
  ``M·shards_per_worker`` equal shards, deal them out at random.
* `ClassesPerWorker(k)` — every worker holds samples of exactly k classes (the
  AFL / Yang et al. "p classes per worker" split).

Every partitioner returns a list of M sorted index arrays that cover disjoint
subsets of the data.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..checks import positive_int, positive_number


def _check_workers(num_workers: int, n: int) -> None:
    positive_int("num_workers", num_workers)
    if num_workers > n:
        raise ValueError(f"cannot split {n} samples among {num_workers} workers "
                         "(every worker needs at least one sample)")


class Partitioner:
    def split(self, labels: np.ndarray, num_workers: int, seed: int) -> list[np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": type(self).__name__, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class IID(Partitioner):
    def split(self, labels: np.ndarray, num_workers: int, seed: int) -> list[np.ndarray]:
        _check_workers(num_workers, len(labels))
        perm = np.random.default_rng(seed).permutation(len(labels))
        return [np.sort(p) for p in np.array_split(perm, num_workers)]


@dataclass(frozen=True)
class Dirichlet(Partitioner):
    alpha: float
    min_size: int = 2
    balance: bool = True
    over: str = "classes"
    max_tries: int = 1000

    def __post_init__(self) -> None:
        if self.over not in ("classes", "workers"):
            raise ValueError(f"over must be 'classes' or 'workers', got {self.over!r}")
        positive_number("Dirichlet alpha", self.alpha)
        positive_int("min_size", self.min_size)

    def split(self, labels: np.ndarray, num_workers: int, seed: int) -> list[np.ndarray]:
        _check_workers(num_workers, len(labels))
        if self.min_size * num_workers > len(labels):
            raise ValueError(f"min_size={self.min_size} × {num_workers} workers exceeds the "
                             f"{len(labels)} samples")
        rng = np.random.default_rng(seed)
        classes = np.unique(labels)
        if self.over == "workers":
            return self._per_worker(labels, classes, num_workers, rng)
        for _ in range(self.max_tries):
            parts: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
            for c in classes:
                idx = rng.permutation(np.flatnonzero(labels == c))
                q = rng.dirichlet(np.full(num_workers, self.alpha))
                if self.balance:
                    sizes = np.array([sum(len(c) for c in p) for p in parts])
                    capped = q * (sizes < len(labels) / num_workers)
                    q = capped / capped.sum() if capped.sum() > 0 else q
                cuts = (np.cumsum(q)[:-1] * len(idx)).astype(int)
                for w, chunk in enumerate(np.split(idx, cuts)):
                    parts[w].append(chunk)
            out = [np.sort(np.concatenate(p)) for p in parts]
            if min(len(p) for p in out) >= self.min_size:
                return out
        raise ValueError(f"Dirichlet(alpha={self.alpha}) found no split giving every one of "
                         f"{num_workers} workers >= {self.min_size} samples in {self.max_tries} "
                         "tries; lower min_size, raise alpha or use fewer workers")


    def _per_worker(self, labels: np.ndarray, classes: np.ndarray, num_workers: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
        pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
        sizes = [len(p) for p in np.array_split(np.arange(len(labels)), num_workers)]
        out = []
        for size in sizes:
            mix = rng.dirichlet(np.full(len(classes), self.alpha))
            taken: list[int] = []
            while len(taken) < size:
                left = np.array([len(p) > 0 for p in pools], dtype=float)
                weights = mix * left
                weights = weights / weights.sum() if weights.sum() > 0 else left / left.sum()
                c = int(rng.choice(len(classes), p=weights))
                taken.append(pools[c].pop())
            out.append(np.sort(np.array(taken)))
        return out


@dataclass(frozen=True)
class Shards(Partitioner):
    shards_per_worker: int = 2

    def __post_init__(self) -> None:
        positive_int("shards_per_worker", self.shards_per_worker)

    def split(self, labels: np.ndarray, num_workers: int, seed: int) -> list[np.ndarray]:
        _check_workers(num_workers, len(labels))
        num_shards = num_workers * self.shards_per_worker
        if num_shards > len(labels):
            raise ValueError(f"{num_workers} workers × {self.shards_per_worker} shards = "
                             f"{num_shards} shards, more than the {len(labels)} samples")
        order = np.argsort(labels, kind="stable")
        shards = np.array_split(order, num_shards)
        deal = np.random.default_rng(seed).permutation(num_shards).reshape(num_workers, -1)
        return [np.sort(np.concatenate([shards[s] for s in row])) for row in deal]


@dataclass(frozen=True)
class ClassesPerWorker(Partitioner):
    classes: int

    def __post_init__(self) -> None:
        positive_int("classes (per worker)", self.classes)

    def split(self, labels: np.ndarray, num_workers: int, seed: int) -> list[np.ndarray]:
        _check_workers(num_workers, len(labels))
        all_classes = np.unique(labels)
        if not (1 <= self.classes <= len(all_classes)):
            raise ValueError(f"classes per worker must be in 1..{len(all_classes)} "
                             f"(the number of classes), got {self.classes!r}")
        # worker w takes classes w, w+1, ..., w+k-1 (mod C): every class is used evenly
        owners: dict[int, list[int]] = {int(c): [] for c in all_classes}
        for w in range(num_workers):
            for j in range(self.classes):
                owners[int(all_classes[(w + j) % len(all_classes)])].append(w)
        rng = np.random.default_rng(seed)
        parts: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
        for c, workers in owners.items():
            if not workers:
                continue
            idx = rng.permutation(np.flatnonzero(labels == c))
            if len(idx) < len(workers):
                raise ValueError(f"class {c} has {len(idx)} samples for {len(workers)} workers")
            for w, chunk in zip(workers, np.array_split(idx, len(workers))):
                parts[w].append(chunk)
        return [np.sort(np.concatenate(p)) for p in parts]


def label_histograms(labels: np.ndarray, parts: list[np.ndarray]) -> list[dict[int, int]]:
    """Per-worker label counts, reported with every run."""
    out = []
    for p in parts:
        values, counts = np.unique(labels[p], return_counts=True)
        out.append({int(v): int(c) for v, c in zip(values, counts)})
    return out
