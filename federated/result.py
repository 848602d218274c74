"""The result of a simulated federation: metrics, histograms, JSON and a plot.

Besides accuracy and traffic it records what the analysis of Anarchic Federated Learning
(Yang et al., ICML 2022) bounds: the staleness of every consumed upload and, for memory
servers (AFA-CS, MIFA), the age of every slot averaged by a step (``slot_age_histogram``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..files import atomic_write, atomic_write_bytes
from .params import Params


def gini(counts: list[int]) -> float:
    """Gini coefficient of participation counts (0 = perfectly even)."""
    x = np.sort(np.asarray(counts, dtype=float))
    if x.sum() == 0:
        return 0.0
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum()))


@dataclass
class SimulationResult:
    config: dict
    history: list[dict]                       # step, time, bytes, local steps, accuracy, loss
    staleness_histogram: dict[int, int]       # τ of consumed updates
    staleness_at_arrival: dict[int, int]
    participation: list[int]                  # accepted uploads per worker
    jobs_started: list[int]
    dropped_stale: int
    rejected: dict[str, int]
    crashed: int
    steps: int
    virtual_time: float
    stopped_early: bool
    label_histograms: list[dict[int, int]] = field(default_factory=list)
    arrivals: list[dict] = field(default_factory=list)
    final_params: Params = field(default_factory=dict, repr=False)
    failed: int = 0                           # jobs whose model or loss_fn raised
    errors: list[str] = field(default_factory=list)   # their first distinct messages
    slot_age_histogram: dict[int, int] = field(default_factory=dict)  # memory servers: age t − s of
    # every slot a step averaged, summed over steps
    kept_fresher_than_slot: int = 0           # uploads over τ_max kept because fresher than their slot
    expired_slots: int = 0                    # slots dropped by max_slot_age

    @property
    def final_accuracy(self) -> float | None:
        evaluated = [h["accuracy"] for h in self.history if h.get("accuracy") is not None]
        return evaluated[-1] if evaluated else None

    @property
    def participation_gini(self) -> float:
        return gini(self.participation)

    @property
    def slot_age_max(self) -> int | None:
        """The oldest slot any step averaged (memory servers), else None."""
        return max(self.slot_age_histogram) if self.slot_age_histogram else None

    @property
    def slot_age_mean(self) -> float | None:
        hist = self.slot_age_histogram
        total = sum(hist.values())
        return sum(a * n for a, n in hist.items()) / total if total else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("final_params")
        out["participation_gini"] = self.participation_gini
        out["final_accuracy"] = self.final_accuracy
        out["staleness_histogram"] = {str(k): v for k, v in self.staleness_histogram.items()}
        out["staleness_at_arrival"] = {str(k): v for k, v in self.staleness_at_arrival.items()}
        out["slot_age_histogram"] = {str(k): v for k, v in self.slot_age_histogram.items()}
        out["label_histograms"] = [{str(k): v for k, v in h.items()} for h in self.label_histograms]
        return out

    def save(self, directory: str | Path, plot: bool = True) -> Path:
        """Write ``result.json`` (and ``result.png``) into ``directory``; returns the JSON path."""
        directory = Path(directory)
        path = directory / "result.json"
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1).encode())
        if plot:
            self.plot(directory / "result.png")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SimulationResult":
        raw = json.loads(Path(path).read_text())
        raw.pop("participation_gini")
        raw.pop("final_accuracy")
        raw["staleness_histogram"] = {int(k): v for k, v in raw["staleness_histogram"].items()}
        raw["staleness_at_arrival"] = {int(k): v for k, v in raw["staleness_at_arrival"].items()}
        raw["slot_age_histogram"] = {int(k): v for k, v in raw.get("slot_age_histogram", {}).items()}
        raw["label_histograms"] = [{int(k): v for k, v in h.items()} for h in raw["label_histograms"]]
        return cls(**raw)

    def plot(self, path: str | Path) -> None:
        """Accuracy vs server steps, virtual time and uplink bytes, and the staleness histogram."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = [h for h in self.history if h.get("accuracy") is not None]
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
        for ax, key, label in zip(axes, ("step", "time", "uplink_bytes"),
                                  ("server steps", "virtual time", "uplink bytes")):
            ax.plot([h[key] for h in hist], [h["accuracy"] for h in hist], marker=".")
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy")
            ax.grid(alpha=0.3)
        taus = sorted(self.staleness_histogram)
        axes[3].bar(taus, [self.staleness_histogram[t] for t in taus])
        axes[3].set_xlabel("staleness τ (consumed)")
        axes[3].set_ylabel("updates")
        fig.suptitle(self.config.get("algorithm", {}).get("algorithm", "federation"))
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
        plt.close(fig)
