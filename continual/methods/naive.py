"""Naive: plain sequential fine-tuning, every hook a no-op (the lower bound every method is compared with)."""

from __future__ import annotations

from ..hooks import ContinualMethod
from ..registry import ALL_MODES, register_method

__all__ = ["Naive"]


@register_method("naive", shards=True, adapter_modes=ALL_MODES)
class Naive(ContinualMethod):
    """Fine-tune on each experience in turn; nothing protects earlier experiences."""

    avalanche_strategy = "naive"
