"""Plain-torch reference implementations of the adapter matmuls.

These are the oracle and the CPU path of every op in :mod:`lifelong.kernels`: the plain
formulas of LoRA (arXiv 2106.09685), LaMDA (arXiv 2406.12832), Bone / MiSS (arXiv 2409.15371)
and SSF (arXiv 2210.08823). Autograd differentiates them; the frozen base weight never
receives a gradient because it has ``requires_grad=False``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def lora_linear_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float
) -> Tensor:
    """``y = x Wᵀ + b + scale · (x Aᵀ) Bᵀ`` with ``A: (r, in)``, ``B: (out, r)``."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


def lamda_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_s: Tensor,
    lora_b: Tensor,
    scale: float,
) -> Tensor:
    """``y = x Wᵀ + b + scale · ((x Aᵀ) Sᵀ) Bᵀ`` (LaMDA: A frozen, S r×r, B out×r)."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(F.linear(x, lora_a), lora_s), lora_b)


def shard_sum(x: Tensor, r: int) -> Tensor:
    """Sum of the r-wide input shards of ``x`` (zero-padded on the right to a multiple of r)."""
    rem = x.shape[-1] % r
    if rem:
        x = F.pad(x, (0, r - rem))
    return x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(dim=-2)


def bone_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, block: Tensor, *, r: int) -> Tensor:
    """Bone/MiSS default form: ``y = x Wᵀ + b + shard_sum(x) · D`` with ``D: (r, out)``."""
    return F.linear(x, weight, bias) + shard_sum(x, r).to(block.dtype) @ block


def bat_delta(weight: Tensor, blocks: Tensor) -> Tensor:
    """Bone "bat" update ``ΔW_{p,q} = W_{p,q} T_p + T_p`` (T indexed by output row block p)."""
    r = blocks.shape[-1]
    out_f, in_f = weight.shape
    w = weight.reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)  # (in/r, out/r, r, r)
    delta = w @ blocks + blocks
    return delta.permute(1, 2, 0, 3).reshape(out_f, in_f)


def ssf_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor) -> Tensor:
    """SSF after a linear layer: ``y = γ ⊙ (x Wᵀ + b) + β``."""
    return F.linear(x, weight, bias) * gamma + beta


def cov_update_ref(cov: Tensor, x: Tensor) -> Tensor:
    """In place ``C += Xᵀ X`` in C's dtype for ``X`` of shape (tokens, d); returns C."""
    xc = x.to(cov.dtype)
    return cov.addmm_(xc.T, xc)


__all__ = [
    "bat_delta",
    "bone_linear_ref",
    "cov_update_ref",
    "lamda_linear_ref",
    "lora_linear_ref",
    "shard_sum",
    "ssf_linear_ref",
]
