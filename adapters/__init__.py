"""Adapters: the registry, the shared per-layer machinery and one module per method.

Importing this package registers every built-in method.
"""

from . import atlas, bone, clr, corda, kore, lamda, lora, ssf, welore  # noqa: F401  (registration side effects)
from .base import AdaptedLayer, Adapter, SavedModule
from .bone import BoneConfig
from .config import AdapterConfig
from .lamda import LaMDAConfig
from .lora import LoraConfig
from .model import AdaptedModel, load, wrap
from .registry import available, get_method, register
from .ssf import SSFConfig

__all__ = [
    "AdaptedLayer",
    "AdaptedModel",
    "Adapter",
    "AdapterConfig",
    "BoneConfig",
    "LaMDAConfig",
    "LoraConfig",
    "SSFConfig",
    "SavedModule",
    "available",
    "get_method",
    "load",
    "register",
    "wrap",
]
