"""Bone / Bat / MiSS: shard-sharing block adapters.

Paper: Jiale Kang (and Qingyu Yin), "Bone: Block-Affine Adaptation of Large Language Models",
later "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing", arXiv 2409.15371.
PEFT implements it as ``MissConfig`` (formerly ``BoneConfig``); our tensors are interchangeable.

Variants (``r`` = shard size, ``W ∈ R^{out×in}``):

- ``bone`` (MiSS default): one trainable ``B ∈ R^{r×out}`` shared by every r-wide input shard,
  ``y = W x + b + (Σ_j x[j·r:(j+1)·r]) B``, i.e. ``ΔW[o, i] = B[i mod r, o]`` (x zero-padded
  when ``in % r != 0``).
- ``mini``: ``B = M.repeat(1, out // mini_r)`` with ``M ∈ R^{r×mini_r}``.
- ``bat`` (the paper's first, weight-guided form): per r×r block, ``ΔW_{p,q} = W_{p,q} T_p + T_p``
  with ``T ∈ R^{(out/r)×r×r}`` indexed by the output row block p; several bat adapters on one
  layer compose sequentially on W (PEFT's fixed multi-adapter behaviour).

All start at zero, so the adapted model equals the base model at init, and all merge exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import bat_delta, bone_linear, shard_sum
from .base import Adapter
from ..checks import one_of, positive_int
from .config import AdapterConfig, check_dropout
from .registry import register
from .targeting import resolve_rank

VARIANTS = ("bone", "bat", "mini")
PEFT_INIT_WEIGHTS = {True: "bone", "bat": "bat", "mini": "mini"}


@dataclass
class BoneConfig(AdapterConfig):
    """``r``: shard size; ``variant``: bone / bat / mini; ``init``: ``"zeros"`` (identity at init)
    or ``"random"`` (PEFT's ``init_weights=False``, tests only); ``mini_r`` for mini;
    ``dropout`` on the adapter branch's input; ``init_weights`` accepts PEFT's spelling."""

    r: int = 64
    variant: str = "bone"
    init: str = "zeros"
    mini_r: int = 1
    dropout: float = 0.0
    init_weights: bool | str | None = None

    def resolve_aliases(self) -> None:
        """PEFT's ``init_weights`` (False -> ``init="random"``, True / "bat" / "mini" -> ``variant``)."""
        super().resolve_aliases()
        if self.init_weights is False:
            self.init, self.init_weights = "random", None
        elif isinstance(self.init_weights, (bool, str)) and self.init_weights in PEFT_INIT_WEIGHTS:
            self.variant, self.init_weights = PEFT_INIT_WEIGHTS[self.init_weights], None

    def validate(self) -> None:
        super().validate()
        if self.init_weights is not None:  # a spelling resolve_aliases does not know
            raise ValueError(f"init_weights must be True, False, 'bat' or 'mini', got {self.init_weights!r}")
        positive_int("r", self.r)
        positive_int("mini_r", self.mini_r)
        one_of("variant", self.variant, VARIANTS)
        one_of("init", self.init, ("zeros", "random"))
        check_dropout(self.dropout)


@register("bone", BoneConfig)
class BoneAdapter(Adapter):
    def __init__(self, base: nn.Linear, config: BoneConfig, layer_name: str, context: Any, init: bool):
        super().__init__(base, config, layer_name, context, init)
        out_f, in_f = base.out_features, base.in_features
        r = resolve_rank(config.rank_pattern, layer_name, config.r)
        positive_int(f"r for {layer_name!r}", r)
        self.r, self.variant, self.out_features = r, config.variant, out_f
        self.rewrites_weight = self.variant == "bat"
        if r > in_f:
            raise ValueError(f"r={r} is larger than in_features={in_f} of layer {layer_name!r}; use r <= {in_f}")
        if self.variant == "bat" and (in_f % r or out_f % r):
            raise ValueError(
                f"bone variant 'bat' needs in_features and out_features divisible by r: layer {layer_name!r} "
                f"is {in_f}->{out_f}, r={r}; pick r dividing both (e.g. {math.gcd(in_f, out_f)}) or variant 'bone'"
            )
        if self.variant == "mini" and out_f % config.mini_r:
            raise ValueError(f"mini_r={config.mini_r} must divide out_features={out_f} of layer {layer_name!r}")
        shape = {"bone": (r, out_f), "bat": (out_f // r, r, r), "mini": (r, config.mini_r)}[self.variant]
        self.block = nn.Parameter(torch.zeros(shape, device=base.weight.device, dtype=base.weight.dtype))
        if init and config.init == "random":
            nn.init.kaiming_uniform_(self.block, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def shared_block(self) -> Tensor:
        """The (r, out) block every input shard uses (mini's block tiled along the output)."""
        if self.variant == "mini":
            return self.block.repeat(1, self.out_features // self.block.shape[1])
        return self.block

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        block = self.shared_block()
        return y + (shard_sum(self.dropout(x).to(block.dtype), self.r) @ block).to(y.dtype)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        if self.rewrites_weight or (self.training and isinstance(self.dropout, nn.Dropout)):
            return None
        return bone_linear(x, base.weight, base.bias, self.shared_block(), r=self.r)

    def rewrite_weight(self, weight: Tensor) -> Tensor:
        return weight + bat_delta(weight, self.block.to(weight.dtype))

    def delta_weight(self, base: nn.Module) -> Tensor:
        in_f = base.in_features
        block_t = self.shared_block().float().T  # (out, r)
        return block_t.repeat(1, -(-in_f // self.r))[:, :in_f]

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        if not self.rewrites_weight:
            return super().merge(base)
        weight = base.weight.float()
        base.weight.copy_(weight + bat_delta(weight, self.block.float()))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if not self.rewrites_weight:
            return super().unmerge(base)
        # W' = W (I + T) + T blockwise, so W = (W' - T)(I + T)^{-1}; the inverse is done in fp32.
        t = self.block.float()
        r, (out_f, in_f) = self.r, base.weight.shape
        merged = base.weight.float().reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)
        eye = torch.eye(r, device=t.device)
        original = (merged - t) @ torch.linalg.inv(eye + t)
        base.weight.copy_(original.permute(1, 2, 0, 3).reshape(out_f, in_f))
