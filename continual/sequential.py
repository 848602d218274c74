"""Sequential calibrated adapters: before experience t, a new adapter calibrated on experiences < t.

KORE's null-space initialisation (Jiang et al., arXiv 2510.19316) and CorDA's knowledge-preserved
mode (Yang et al., NeurIPS 2024) build an adapter whose updates avoid the input subspace of the
data they are calibrated on. In a stream this gives a natural continual method, which is our
composition (neither paper runs it on a task sequence): before experience t the adapter of
experience t−1 is merged into the base, and a fresh adapter is calibrated on inputs of experiences
0..t−1, so what experience t learns leaves the earlier experiences' activations (almost) unchanged.

Experience 0 has no earlier data: it calibrates on the ``calibration`` the user put in the adapter
options (general text whose behaviour should be kept) or, when none is given, on its own inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..checks import positive_int

__all__ = ["SequentialAdapters", "Backbone", "CALIBRATED"]

CALIBRATED = ("kore", "corda")


class SequentialAdapters:
    """Builds experience ``t``'s adapter on ``holder.backbone`` (merging the previous one first).

    Args:
        holder: a module with a ``backbone`` attribute that the loop calls through.
        method, options: the registry adapter and its options (``calibration`` is used for t = 0).
        samples: inputs taken from each earlier experience (seeded), in batches of ``batch_size``.
        as_inputs: turns a batch of stream inputs into what the backbone takes (dicts for text).
    """

    def __init__(self, holder: nn.Module, method: str, options: dict[str, Any], samples: int, batch_size: int,
                 seed: int, as_inputs=lambda x: x):
        if method not in CALIBRATED:
            raise ValueError(f"adapter_mode='sequential' needs a calibrated adapter ({', '.join(CALIBRATED)}), "
                             f"got {method!r}")
        positive_int("calibration_samples", samples)
        self.holder, self.method, self.samples, self.batch_size, self.seed = holder, method, samples, batch_size, seed
        self.options = {k: v for k, v in options.items() if k != "calibration"}
        self.first_calibration = options.get("calibration")
        self.as_inputs = as_inputs

    def before_experience(self, index: int, experiences: list) -> None:
        import lifelong
        from lifelong.adapters.model import AdaptedModel

        backbone = self.holder.backbone
        if isinstance(backbone, AdaptedModel):
            backbone = backbone.merge_and_unload()
        if index == 0 and self.first_calibration is not None:
            calibration = self.first_calibration
        else:
            calibration = list(self._batches(experiences[:index] if index > 0 else experiences[:1]))
        self.holder.backbone = lifelong.wrap(backbone, self.method, calibration=calibration, **self.options)

    def _batches(self, experiences: list) -> Iterator[Any]:
        device = next(self.holder.parameters()).device
        for j, exp in enumerate(experiences):
            data = exp.dataset
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
            picks = torch.randperm(len(data), generator=g)[: self.samples]
            for start in range(0, len(picks), self.batch_size):
                x = torch.stack([data[int(i)][0] for i in picks[start:start + self.batch_size]]).to(device)
                yield self.as_inputs(x)


class Backbone(nn.Module):
    """Holds a tensor model as ``backbone`` so that its adapter can be replaced between experiences."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.backbone(x, **kwargs)
