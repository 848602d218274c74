"""LoRA: low-rank adaptation.

Paper: Edward J. Hu, Yelong Shen, Phillip Wallis, Zeyuan Allen-Zhu, Yuanzhi Li, Shean Wang, Lu Wang,
Weizhu Chen, "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv 2106.09685.
Reference implementations: microsoft/LoRA (``loralib``) and PEFT's ``LoraConfig``; ours equals
PEFT's LoRA layer on the same weights (forward, merged weights, unmerge and export).

For a frozen linear layer ``h = W₀ x + b`` (paper, eq. 3, with the scaling of its section 4.1):

    h = W₀ x + b + s · B A dropout(x),    ΔW = s · B A,    s = lora_alpha / r
    A ∈ R^{r×in}: kaiming-uniform (a = √5, as ``nn.Linear``'s default and PEFT's),  B ∈ R^{out×r}: 0

so the adapted layer equals the base at init and only A and B train. ``use_rslora`` takes rsLoRA's
``s = lora_alpha / √r`` (Kalajdzievski, arXiv 2312.03732); ``alpha_pattern`` / ``rank_pattern``
override alpha and r per layer as in PEFT. ``init`` also offers PEFT's other choices:
``"gaussian"`` (A ~ N(0, 1/r²), B = 0) and ``"random"`` (PEFT's ``init_lora_weights=False``:
A and B both kaiming-uniform, so the layer is not the base at init; for tests). PEFT's spelling
``init_lora_weights=True / "gaussian" / False`` is accepted too. Unlike CorDA and KORE, plain LoRA
leaves the base weight untouched (no residual), so its PEFT export is the factors as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checks import one_of, positive_int, positive_number
from .config import AdapterConfig, check_alpha_pattern, check_dropout, lora_scaling
from .corda import LowRankResidualAdapter
from .registry import register
from .targeting import resolve_rank

INITS = ("kaiming", "gaussian", "random")
PEFT_INIT_LORA_WEIGHTS = {True: "kaiming", "gaussian": "gaussian", False: "random"}


@dataclass
class LoraConfig(AdapterConfig):
    """PEFT's names and defaults: ``r`` (rank), ``lora_alpha`` (scale numerator),
    ``lora_dropout`` (on the adapter branch's input), ``use_rslora``, ``alpha_pattern``;
    ``init``: ``"kaiming"`` (default), ``"gaussian"`` or ``"random"``; ``init_lora_weights``:
    PEFT's spelling of ``init``."""

    r: int = 8
    lora_alpha: float = 8.0
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    init_lora_weights: bool | str | None = None

    def resolve_aliases(self) -> None:
        """PEFT's ``init_lora_weights`` (True / "gaussian" / False) becomes ``init``."""
        super().resolve_aliases()
        if isinstance(self.init_lora_weights, (bool, str)) and self.init_lora_weights in PEFT_INIT_LORA_WEIGHTS:
            self.init, self.init_lora_weights = PEFT_INIT_LORA_WEIGHTS[self.init_lora_weights], None

    def validate(self) -> None:
        super().validate()
        if self.init_lora_weights is not None:  # a spelling resolve_aliases does not know
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        positive_int("r", self.r)
        positive_number("lora_alpha", self.lora_alpha)
        check_alpha_pattern(self.alpha_pattern)
        check_dropout(self.lora_dropout, "lora_dropout")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {self.use_rslora!r}")
        one_of("init", self.init, INITS)

    def scaling(self, r: int, layer_name: str) -> float:
        """The layer's LoRA scale, with ``alpha_pattern`` overriding ``lora_alpha`` per layer (PEFT's)."""
        return lora_scaling(resolve_rank(self.alpha_pattern, layer_name, self.lora_alpha), r, self.use_rslora)


@register("lora", LoraConfig)
class LoraAdapter(LowRankResidualAdapter):
    """``y = W x + b + s·B A dropout(x)``; A and B train, the base weight is never changed."""

    @classmethod
    def exact_at_init(cls, config: LoraConfig) -> bool:
        return config.init != "random"

    def __init__(self, base: nn.Linear, config: LoraConfig, layer_name: str, context: Any, init: bool):
        super().__init__(base, config, layer_name, context, init)
        r = resolve_rank(config.rank_pattern, layer_name, config.r)
        positive_int(f"r for {layer_name!r}", r)
        self._build(base, r, config.scaling(r, layer_name), config.lora_dropout)
        if init:
            self._initialise(config.init)

    @torch.no_grad()
    def _initialise(self, init: str) -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "random":
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))


__all__ = ["LoraAdapter", "LoraConfig"]
