"""Offline continual-learning streams built from scikit-learn's shipped handwritten digits.

The data: 1,797 grey 8×8 images (values 0..16, scaled here to [0, 1]), 10 classes, shipped inside
scikit-learn (no download). One stratified, seeded train/test split is made first; every stream
derives its experiences from it, so train and test experiences are aligned by index.

* ``split_digits``: the 10 classes split into ``n_tasks`` groups (class-incremental: one shared
  label space, no task id; task-incremental: task labels attached, evaluation restricted to the
  task's classes).
* ``permuted_digits``: domain-incremental; task t applies a fixed random pixel permutation
  (task 0 is the identity, as in KCL's Permuted MNIST).
* ``rotated_digits``: domain-incremental; task t rotates every image by ``angles[t]`` degrees.

All are returned as Avalanche benchmarks (``CLScenario`` with ``train_stream``/``test_stream``),
so every function of :mod:`lifelong.continual` that takes a stream also accepts any Avalanche
benchmark a user builds. Avalanche is imported inside the functions (``import avalanche`` costs
seconds).
"""

from __future__ import annotations

import numpy as np
import torch

from ..checks import positive_int

__all__ = [
    "split_digits",
    "permuted_digits",
    "rotated_digits",
    "benchmark_from_tensors",
    "check_benchmark",
    "scenario_of",
]

_SCENARIOS = ("class-incremental", "task-incremental", "domain-incremental")


def _digits(test_size: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte)


def _shape(x: torch.Tensor, as_image: bool) -> torch.Tensor:
    return x.reshape(-1, 1, 8, 8) if as_image else x.reshape(-1, 64)


def benchmark_from_tensors(train: list[tuple[torch.Tensor, torch.Tensor]],
                           test: list[tuple[torch.Tensor, torch.Tensor]],
                           task_labels: bool = False, scenario: str | None = None):
    """Avalanche benchmark with one experience per ``(x, y)`` pair (train and test aligned).

    ``task_labels=True`` attaches task label t to experience t (items become ``(x, y, t)``).
    ``scenario`` (optional) is recorded on the benchmark as ``lifelong_scenario``.
    """
    from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_task_labels
    from avalanche.benchmarks.utils import ConstantSequence, DataAttribute
    from avalanche.benchmarks.utils.classification_dataset import TaskAwareSupervisedClassificationDataset
    from torch.utils.data import TensorDataset

    if len(train) == 0:
        raise ValueError("benchmark_from_tensors: no experiences given (train is empty)")
    if len(train) != len(test):
        raise ValueError(f"benchmark_from_tensors: {len(train)} train experiences but {len(test)} test ones")
    if scenario is not None and scenario not in _SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; valid: {', '.join(_SCENARIOS)}")

    def as_av(x: torch.Tensor, y: torch.Tensor, t: int):
        # Python ints for targets: tensors break classes_in_this_experience (avalanche#655).
        # Without task labels every sample still carries task 0 (not returned by __getitem__): some
        # Avalanche plugins (LwF) read targets_task_labels unconditionally.
        attrs = [DataAttribute(y.tolist(), "targets"),
                 DataAttribute(ConstantSequence(t if task_labels else 0, len(y)), "targets_task_labels",
                               use_in_getitem=task_labels)]
        # The task-aware classification type carries task_set, which LwF-style plugins need.
        return TaskAwareSupervisedClassificationDataset([TensorDataset(x, y)], data_attributes=attrs)

    bm = benchmark_from_datasets(train=[as_av(x, y, t) for t, (x, y) in enumerate(train)],
                                 test=[as_av(x, y, t) for t, (x, y) in enumerate(test)])
    if task_labels:
        bm = with_task_labels(bm)
    if scenario is not None:
        bm.lifelong_scenario = scenario
    return bm


def split_digits(n_tasks: int = 5, task_incremental: bool = False, test_size: float = 0.3, seed: int = 0,
                 class_order: list[int] | None = None, as_image: bool = False):
    """Split-digits stream: classes ``class_order`` (default 0..9) cut into ``n_tasks`` groups."""
    positive_int("split_digits: n_tasks", n_tasks)
    if n_tasks > 10:
        raise ValueError(f"split_digits: n_tasks must be at most 10 (one class per task), got {n_tasks!r}")
    order = list(range(10)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(10)):
        raise ValueError(f"split_digits: class_order must be a permutation of 0..9, got {class_order!r}")
    xtr, ytr, xte, yte = _digits(test_size, seed)
    groups = np.array_split(np.asarray(order), n_tasks)

    def pick(x, y, classes):
        keep = torch.isin(y, torch.as_tensor(classes))
        return _shape(x[keep], as_image), y[keep]

    train = [pick(xtr, ytr, g) for g in groups]
    test = [pick(xte, yte, g) for g in groups]
    scenario = "task-incremental" if task_incremental else "class-incremental"
    return benchmark_from_tensors(train, test, task_labels=task_incremental, scenario=scenario)


def permuted_digits(n_tasks: int = 10, test_size: float = 0.3, seed: int = 0, task_labels: bool = False,
                    as_image: bool = False):
    """Permuted-digits stream (domain-incremental); task 0 keeps the original pixel order."""
    positive_int("permuted_digits: n_tasks", n_tasks)
    xtr, ytr, xte, yte = _digits(test_size, seed)
    g = torch.Generator().manual_seed(seed)
    perms = [torch.arange(64)] + [torch.randperm(64, generator=g) for _ in range(n_tasks - 1)]
    train = [(_shape(xtr[:, p], as_image), ytr) for p in perms]
    test = [(_shape(xte[:, p], as_image), yte) for p in perms]
    return benchmark_from_tensors(train, test, task_labels=task_labels, scenario="domain-incremental")


def rotated_digits(n_tasks: int = 5, angles: list[float] | None = None, test_size: float = 0.3, seed: int = 0,
                   task_labels: bool = False, as_image: bool = False):
    """Rotated-digits stream (domain-incremental); default angles evenly spaced over [0°, 90°]."""
    from torchvision.transforms.functional import InterpolationMode, rotate

    if angles is None:
        positive_int("rotated_digits: n_tasks", n_tasks)
        angles = np.linspace(0.0, 90.0, n_tasks).tolist()
    if len(angles) == 0:
        raise ValueError("rotated_digits: angles is empty (need at least one experience)")
    xtr, ytr, xte, yte = _digits(test_size, seed)

    def rot(x, angle):
        img = rotate(x.reshape(-1, 1, 8, 8), float(angle), interpolation=InterpolationMode.BILINEAR)
        return _shape(img, as_image)

    train = [(rot(xtr, a), ytr) for a in angles]
    test = [(rot(xte, a), yte) for a in angles]
    return benchmark_from_tensors(train, test, task_labels=task_labels, scenario="domain-incremental")


def check_benchmark(benchmark) -> tuple[list, list]:
    """Validate an Avalanche benchmark and return its (train, test) experience lists, aligned by index."""
    for name in ("train_stream", "test_stream"):
        if not hasattr(benchmark, name):
            raise TypeError(f"expected an Avalanche benchmark with train_stream and test_stream; "
                            f"{type(benchmark).__name__} has no {name}")
    train, test = list(benchmark.train_stream), list(benchmark.test_stream)
    if len(train) == 0:
        raise ValueError("the stream has no experiences (train_stream is empty)")
    if len(test) != len(train):
        raise ValueError(f"train_stream has {len(train)} experiences but test_stream has {len(test)}: "
                         "they must be aligned one test experience per training experience")
    return train, test


def has_task_labels(experience) -> bool:
    try:
        return len(experience.task_labels) > 0
    except AttributeError:
        return False


def scenario_of(benchmark) -> str:
    """The scenario recorded on the benchmark, else inferred: task labels → task-incremental,
    disjoint class sets → class-incremental, otherwise domain-incremental."""
    recorded = getattr(benchmark, "lifelong_scenario", None)
    if recorded is not None:
        return recorded
    train, _ = check_benchmark(benchmark)
    labels = {tuple(e.task_labels) for e in train if has_task_labels(e)}
    if len(labels) > 1:
        return "task-incremental"
    class_sets = [frozenset(experience_classes(e)) for e in train]
    disjoint = all(a.isdisjoint(b) for i, a in enumerate(class_sets) for b in class_sets[i + 1:])
    return "class-incremental" if disjoint and len(class_sets) > 1 else "domain-incremental"


def experience_classes(experience) -> list[int]:
    """Sorted class ids present in an experience (from its ``targets`` attribute or by iterating)."""
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is not None:
        return sorted(int(c) for c in classes)
    ds = experience.dataset
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = [item[1] for item in ds]
    return sorted({int(t) for t in targets})
