"""Avalanche's other baselines, run by name on the Avalanche engine (``engine="auto"`` picks it).

SI (Zenke et al. 2017), A-GEM (Chaudhry et al. 2019), GEM (Lopez-Paz & Ranzato 2017), MAS
(Aljundi et al. 2018) and cumulative training exist in Avalanche as strategies; lifelong runs
them as they are. Options go to the strategy's constructor (e.g. ``{"si_lambda": 1.0}``).
"""

from __future__ import annotations

from typing import Any

from ..hooks import ContinualMethod
from ..registry import register_method

__all__ = ["AvalancheBaseline"]


class AvalancheBaseline(ContinualMethod):
    """A baseline that exists only as an Avalanche strategy; its options are the strategy's."""

    avalanche_strategy = "naive"

    def __init__(self, **options: Any):
        self.options = dict(options)

    def avalanche_options(self) -> dict:
        return dict(self.options)

    def settings(self) -> dict:
        return dict(self.options)


for _name in ("si", "agem", "gem", "mas", "cumulative"):
    register_method(_name, engines=("avalanche",), adapter_modes=("none", "shared"), combines=False)(
        type(f"Avalanche_{_name}", (AvalancheBaseline,), {"avalanche_strategy": _name,
                                                          "__doc__": f"Avalanche's {_name!r} strategy."}))
