"""The result of one continual-learning run: accuracy matrix, metrics, cost, configuration (JSON-savable)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .metrics import summarize

from ..files import atomic_write_text

__all__ = ["StreamResult"]


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return value


def _none_to_nan(value):
    if value is None:
        return math.nan
    if isinstance(value, list):
        return [_none_to_nan(v) for v in value]
    return value


@dataclass
class StreamResult:
    """Outcome of :func:`lifelong.continual.run_stream`.

    ``accuracy_matrix[i][j]`` = accuracy on experience j after training experience i (fractions;
    NaN where not measured); ``initial_accuracy[j]`` = before any training. ``forgetting`` is
    Chaudhry's max-based average forgetting; ``bwt``/``fwt`` follow Lopez-Paz & Ranzato.
    """

    method: str
    engine: str
    scenario: str
    seed: int
    accuracy_matrix: list[list[float]]
    initial_accuracy: list[float]
    wall_time_s: float
    train_steps: int
    step_time_s: float
    trainable_parameters: int
    memory: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.metrics:
            self.metrics = summarize(np.asarray(self.accuracy_matrix, dtype=float),
                                     np.asarray(self.initial_accuracy, dtype=float))

    @property
    def acc(self) -> float:
        return self.metrics["acc"]

    @property
    def forgetting(self) -> float:
        return self.metrics["forgetting"]

    @property
    def bwt(self) -> float:
        return self.metrics["bwt"]

    @property
    def fwt(self) -> float:
        return self.metrics["fwt"]

    def to_dict(self) -> dict:
        return _nan_to_none(asdict(self))

    def to_json(self, path: str | None = None) -> str:
        """JSON text (NaN written as null); written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str) -> "StreamResult":
        text = text_or_path
        if os.path.exists(text_or_path):
            with open(text_or_path) as f:
                text = f.read()
        data = json.loads(text)
        data["accuracy_matrix"] = _none_to_nan(data["accuracy_matrix"])
        data["initial_accuracy"] = _none_to_nan(data["initial_accuracy"])
        data["metrics"] = {k: math.nan if v is None else v for k, v in data.get("metrics", {}).items()}
        return cls(**data)
