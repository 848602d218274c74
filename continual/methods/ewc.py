"""EWC — Elastic Weight Consolidation, through the loss hook (every engine).

James Kirkpatrick et al. *Overcoming catastrophic forgetting in neural networks.* PNAS 2017
(arXiv 1612.00796). After experience e the diagonal empirical Fisher of the trainable parameters,

    F_e = (1/B) Σ_b (∇_θ L_b(θ*_e))²          (B = number of mini-batches of experience e's data)

is stored with θ*_e, and every later step minimises

    L(θ) + λ Σ_{e<t} Σ_i F_{e,i} (θ_i − θ*_{e,i})²          (mode="separate")

As Avalanche's ``EWCPlugin`` (which ``engine="avalanche"`` runs for ``ewc``): the Fisher is the
squared mini-batch gradient averaged over the unshuffled training batches, computed in eval mode,
with no ½ in front of λ; ``mode="online"`` keeps one Fisher, ``F ← γ F_old + F_new``, and penalises
against the last θ* only. One difference: in task-incremental runs the Fisher is computed on the
task-masked loss that training minimised (Avalanche's pass uses unmasked logits); in class- and
domain-incremental runs the two are the same computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ...checks import non_negative_number, one_of
from ..hooks import Context, ContinualMethod, MethodConfig
from ..registry import ALL_MODES, register_method

__all__ = ["EWC", "EWCConfig"]


@dataclass
class EWCConfig(MethodConfig):
    """``ewc_lambda``: penalty weight λ; ``mode``: ``separate`` | ``online``; ``decay_factor`` γ (online)."""

    ewc_lambda: float = 100.0
    mode: str = "separate"
    decay_factor: float | None = None

    def validate(self) -> None:
        non_negative_number("ewc: ewc_lambda", self.ewc_lambda)
        one_of("ewc: mode", self.mode, ("separate", "online"))
        if (self.mode == "online") != (self.decay_factor is not None):
            raise ValueError("ewc: decay_factor is required with mode='online' and only allowed there, got "
                             f"mode={self.mode!r}, decay_factor={self.decay_factor!r}")
        if self.decay_factor is not None and not 0 <= self.decay_factor <= 1:
            raise ValueError(f"ewc: decay_factor must be in [0, 1], got {self.decay_factor!r}")


@register_method("ewc", adapter_modes=ALL_MODES)
class EWC(ContinualMethod):
    """Elastic weight consolidation (see the module docstring)."""

    Config = EWCConfig
    avalanche_strategy = "ewc"

    def __init__(self, config: EWCConfig | None = None, **options):
        super().__init__(config, **options)
        self.anchors: list[dict[str, torch.Tensor]] = []  # θ*_e per kept experience
        self.fishers: list[dict[str, torch.Tensor]] = []  # F_e

    def avalanche_options(self) -> dict:
        return self.settings()

    def loss(self, ctx: Context, loss: torch.Tensor) -> torch.Tensor:
        if not self.anchors:
            return loss
        params = dict(ctx.model.named_parameters())
        penalty = loss.new_zeros(())
        for anchor, fisher in zip(self.anchors, self.fishers):
            for name, star in anchor.items():
                p = params.get(name)
                if p is not None and p.requires_grad and p.shape == star.shape:
                    penalty = penalty + (fisher[name] * (p - star).pow(2)).sum()
        return loss + self.ewc_lambda * penalty

    def after_experience(self, ctx: Context) -> None:
        fisher = self._fisher(ctx)
        anchor = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}
        if self.mode == "online" and self.fishers:
            old = self.fishers[-1]
            fisher = {n: f + self.decay_factor * old[n] if n in old and old[n].shape == f.shape else f
                      for n, f in fisher.items()}
            self.anchors, self.fishers = [], []
        self.anchors.append(anchor)
        self.fishers.append(fisher)

    def _fisher(self, ctx: Context) -> dict[str, torch.Tensor]:
        model = ctx.model
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        loader = DataLoader(ctx.experiences[ctx.experience].dataset, batch_size=ctx.batch_size, shuffle=False)
        was_training = model.training
        model.eval()
        for batch in loader:
            model.zero_grad(set_to_none=True)
            ctx.batch_loss(batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().pow(2)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return {n: f / max(len(loader), 1) for n, f in fisher.items()}

    def state_dict(self) -> dict:
        return {"anchors": self.anchors, "fishers": self.fishers}

    def load_state_dict(self, state: dict) -> None:
        self.anchors, self.fishers = list(state["anchors"]), list(state["fishers"])

    def memory(self) -> dict:
        return {"stored_floats": sum(t.numel() for d in self.anchors + self.fishers for t in d.values())}
