"""The adapter registry: method name -> (config dataclass, per-layer adapter class)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .config import AdapterConfig, check_fields

if TYPE_CHECKING:
    from .base import Adapter


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[AdapterConfig]
    adapter_cls: "type[Adapter]"


_METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type[AdapterConfig]) -> Callable[["type[Adapter]"], "type[Adapter]"]:
    """Class decorator: ``@register("bone", BoneConfig)`` on the method's Adapter subclass."""

    def decorate(adapter_cls: "type[Adapter]") -> "type[Adapter]":
        if name in _METHODS:
            raise ValueError(f"adapter method {name!r} is already registered")
        config_cls.method = name
        adapter_cls.method = name
        _METHODS[name] = Method(name, config_cls, adapter_cls)
        return adapter_cls

    return decorate


def available() -> list[str]:
    """Sorted names of the registered adapter methods."""
    return sorted(_METHODS)


def lora_shaped_methods() -> list[str]:
    """The registered methods whose adapters give LoRA factors (``Adapter.lora_factors``)."""
    from .base import Adapter

    return [n for n in available() if _METHODS[n].adapter_cls.lora_factors is not Adapter.lora_factors]


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown adapter method {name!r}; available: {available()}")
    return _METHODS[name]


def make_config(method: str | AdapterConfig, **options: Any) -> AdapterConfig:
    """Build a method's config from its name and keyword options, or adjust a given config."""
    if isinstance(method, AdapterConfig):
        return method.replace(**options)  # a copy: preparing an adapter never edits the caller's config
    spec = get_method(method)
    check_fields(spec.config_cls, options)
    return spec.config_cls(**options)
