"""O-LoRA — orthogonal subspace learning for language-model continual learning (incremental adapters).

Xiao Wang, Tianze Chen, Qiming Ge, Han Xia, Rong Bao, Rui Zheng, Qi Zhang, Tao Gui, Xuanjing Huang.
*Orthogonal Subspace Learning for Language Model Continual Learning.* Findings of EMNLP 2023
(arXiv 2310.14152). Reference code: ``cmnfriend/O-LoRA`` (``src/uie_trainer_lora.py``).

With ``adapter_mode="incremental"`` experience t trains a new LoRA adapter (A_t, B_t) while the
earlier adapters stay frozen and active. O-LoRA adds, per batch,

    L + λ1 · Σ_layers Σ_{j,k} |(A_{<t} A_tᵀ)_{jk}|  +  λ2 · Σ_{θ ∈ {A_t, B_t} of every layer} ‖θ‖₂

where A_{<t} stacks the frozen A matrices of experiences 0..t−1 of that layer (rows: their ranks).
We follow the authors' code, which differs from the paper's equation in two places: the overlap is
the sum of absolute entries (the paper writes a squared Frobenius norm) and the L2 term uses
un-squared Frobenius norms of each new tensor (the paper writes ‖·‖²). Defaults as the code:
λ1 = 0.5, λ2 = 0. Experience 0 has nothing to be orthogonal to (only the λ2 term applies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...checks import non_negative_number
from ..adapter_modes import experience_index as _index
from ..hooks import Context, ContinualMethod, MethodConfig
from ..registry import register_method

__all__ = ["OLoRA", "OLoRAConfig", "olora_penalty", "orthogonality"]


def orthogonality(a_prev: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """``Σ_jk |(A_prev A_tᵀ)_jk|`` for ``A_prev`` (r_prev, d) and ``A_t`` (r, d)."""
    return (a_prev @ a_t.T).abs().sum()


def incremental_layers(model: nn.Module, current: str):
    """Per adapted layer: the earlier adapters' A (stacked, detached) and the current adapter."""
    for module in model.modules():
        adapters = getattr(module, "adapters", None)
        if not isinstance(adapters, nn.ModuleDict) or current not in adapters:
            continue
        earlier = [adapters[n].lora_A for n in adapters if n.startswith("exp_") and _index(n) < _index(current)]
        stacked = torch.cat([a.detach() for a in earlier], 0) if earlier else None
        yield stacked, adapters[current]


def olora_penalty(model: nn.Module, current: str, lambda1: float, lambda2: float) -> torch.Tensor:
    """λ1 · Σ |A_{<t} A_tᵀ| + λ2 · Σ ‖θ_t‖₂ over the layers holding adapter ``current``."""
    total = None
    for stacked, adapter in incremental_layers(model, current):
        term = lambda2 * (adapter.lora_A.norm() + adapter.lora_B.norm()) if lambda2 else 0.0
        if stacked is not None and lambda1:
            term = term + lambda1 * orthogonality(stacked.to(adapter.lora_A.dtype), adapter.lora_A)
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"olora: no layer holds the adapter {current!r}; O-LoRA needs adapter_mode='incremental' "
                         "with a LoRA-shaped adapter")
    return total if isinstance(total, torch.Tensor) else torch.tensor(float(total))


@dataclass
class OLoRAConfig(MethodConfig):
    """``lambda1``: weight of the orthogonality term; ``lambda2``: weight of the new adapter's L2 norms."""

    lambda1: float = 0.5
    lambda2: float = 0.0

    def validate(self) -> None:
        non_negative_number("olora: lambda1", self.lambda1)
        non_negative_number("olora: lambda2", self.lambda2)


@register_method("olora", adapter_modes=("incremental",))
class OLoRA(ContinualMethod):
    """O-LoRA's orthogonality (and L2) regulariser on the incremental adapters (see the module docstring)."""

    Config = OLoRAConfig

    def loss(self, ctx: Context, loss: torch.Tensor) -> torch.Tensor:
        return loss + olora_penalty(ctx.model, f"exp_{ctx.experience}", self.lambda1, self.lambda2).to(loss.dtype)
