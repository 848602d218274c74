"""Plain-torch pieces shared by the Bone / MiSS kernels and their references (arXiv 2409.15371).

Each op's torch reference (the oracle and the CPU path) lives beside its kernel in
:mod:`lifelong.kernels`; these two helpers are what several of them share.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def shard_sum(x: Tensor, r: int) -> Tensor:
    """Sum of the r-wide input shards of ``x`` (zero-padded on the right to a multiple of r)."""
    rem = x.shape[-1] % r
    if rem:
        x = F.pad(x, (0, r - rem))
    return x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(dim=-2)


def bat_delta(weight: Tensor, blocks: Tensor) -> Tensor:
    """Bone "bat" update ``ΔW_{p,q} = W_{p,q} T_p + T_p`` (T indexed by output row block p)."""
    r = blocks.shape[-1]
    out_f, in_f = weight.shape
    w = weight.reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)  # (in/r, out/r, r, r)
    delta = w @ blocks + blocks
    return delta.permute(1, 2, 0, 3).reshape(out_f, in_f)


__all__ = ["bat_delta", "shard_sum"]
