"""lifelong: continual learning with parameter-efficient adapters, alone or across an anarchic
federation of workers.

    import lifelong as ll
    model = ll.wrap(model, "bone", r=64, target_modules=["query", "value"])
"""

from . import models
from .adapters import AdaptedModel, AdapterConfig, available, load, wrap

__version__ = "0.1.0"

__all__ = ["AdaptedModel", "AdapterConfig", "available", "load", "wrap", "__version__"]
