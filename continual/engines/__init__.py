"""The engines that drive the hook protocol: ``native`` (torch loop), ``avalanche``, ``trainer``.

Each engine module is imported when first used (``import avalanche`` and ``transformers.Trainer``
take seconds)."""

from __future__ import annotations

import importlib

from .base import Engine

__all__ = ["ENGINES", "Engine", "make_engine"]

#: engine name → (module, class)
ENGINES = {"native": ("native", "NativeEngine"), "avalanche": ("avalanche", "AvalancheEngine"),
           "trainer": ("trainer", "TrainerEngine")}


def make_engine(name: str, *args, **kwargs) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; valid: {', '.join(ENGINES)}")
    module, cls = ENGINES[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)(*args, **kwargs)
