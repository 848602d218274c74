"""lifelong: continual learning with parameter-efficient adapters, alone or across an anarchic
federation of workers.

    import lifelong as ll
    model = ll.wrap(model, "bone", r=64, target_modules=["query", "value"])
    ll.continual.run_stream(...)       # streams, continual methods, metrics
    ll.federated.simulate(...)         # anarchic federated learning

``continual``, ``federated`` and ``kernels`` are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import models
from .adapters import AdaptedModel, AdapterConfig, available, load, wrap

__version__ = "0.1.0"

_SUBMODULES = ("continual", "federated", "kernels")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AdaptedModel", "AdapterConfig", "available", "continual", "federated", "kernels", "load", "models",
           "wrap", "__version__"]
