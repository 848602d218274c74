"""The method registry: ``@register_method("name")`` on a :class:`ContinualMethod` subclass.

As the adapters have ``lifelong.wrap(model, "<name>")``, continual methods run by name:
``run_stream(model, stream, "migu")`` or ``method=["migu", "ewc"]``. Each registration declares
what the method can run with (:class:`Capabilities`); ``run_stream`` checks a run against them
before training and its error messages are generated from them, so a method defined outside the
library is one class and one decorator::

    @register_method("my_reg", adapter_modes=ALL_MODES)
    class MyReg(ContinualMethod):
        def loss(self, ctx, loss):
            return loss + 0.1 * sum(p.square().sum() for p in ctx.model.parameters() if p.requires_grad)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .hooks import ContinualMethod

__all__ = ["ALL_ENGINES", "ALL_MODES", "Capabilities", "available_methods", "build_methods", "capabilities_of",
           "check_run", "method_class", "register_method"]

ALL_ENGINES = ("native", "avalanche", "trainer")
#: adapter modes; "none" = no adapter (every parameter trains)
ALL_MODES = ("none", "shared", "per_task", "sequential", "incremental")
ALL_STREAMS = ("tensor", "text")

_METHODS: dict[str, type[ContinualMethod]] = {}


@dataclass(frozen=True)
class Capabilities:
    """What a registered method runs with.

    Attributes:
        engines: the engines that can drive it.
        adapter_modes: the adapter modes it supports (``"none"``: no adapter).
        streams: ``"tensor"`` (Avalanche benchmarks of tensors) and/or ``"text"`` (text streams).
        needs_task_ids: it needs task-incremental streams (the task id at training and test time).
        owns_loop: it trains an experience itself (``train_experience`` / ``predict``), as the
            kernel methods do, instead of the engine's batch loop.
        combines: it may be combined with other methods in one run.
        shards: it runs on a model sharded by FSDP2 (``fsdp=True``): its hooks only touch what every
            process holds whole (data, losses of the model's output), not sharded tensors.
    """

    engines: tuple[str, ...] = ALL_ENGINES
    adapter_modes: tuple[str, ...] = ("none", "shared", "per_task", "sequential")
    streams: tuple[str, ...] = ALL_STREAMS
    needs_task_ids: bool = False
    owns_loop: bool = False
    combines: bool = True
    shards: bool = False

    def __post_init__(self) -> None:
        for name, values, allowed in (("engines", self.engines, ALL_ENGINES),
                                      ("adapter_modes", self.adapter_modes, ALL_MODES),
                                      ("streams", self.streams, ALL_STREAMS)):
            bad = sorted(set(values) - set(allowed))
            if bad or not values:
                raise ValueError(f"register_method: {name} must be a non-empty subset of {allowed}, got {values}")


def register_method(name: str, **capabilities: Any) -> Callable[[type[ContinualMethod]], type[ContinualMethod]]:
    """Class decorator: register a :class:`ContinualMethod` subclass under ``name``."""
    caps = Capabilities(**capabilities)

    def decorate(cls: type[ContinualMethod]) -> type[ContinualMethod]:
        if not (isinstance(cls, type) and issubclass(cls, ContinualMethod)):
            raise TypeError(f"register_method({name!r}) decorates a ContinualMethod subclass, got {cls!r}")
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"a continual method named {name!r} is already registered ({_METHODS[name].__name__})")
        cls.name, cls.capabilities = name, caps
        _METHODS[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    """The registered method names, sorted (the library's own register when ``lifelong.continual``
    is imported)."""
    return sorted(_METHODS)


def method_class(name: str) -> type[ContinualMethod]:
    if name not in _METHODS:
        raise ValueError(f"unknown continual method {name!r}; valid: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def build_methods(method: Any, options: dict | None = None) -> list[ContinualMethod]:
    """A name, a method object, or a list of them → method objects.

    ``options`` configure a single method given by name; for a list, pass configured objects (or
    ``{"name": ..., "options": {...}}`` dicts)."""
    options = dict(options or {})
    items = method if isinstance(method, (list, tuple)) else [method]
    if not items:
        raise ValueError("method=[] names no method; pass 'naive' for plain fine-tuning")
    if len(items) > 1 and options:
        raise ValueError("method_options configure a single method; for a list pass {'name': ..., 'options': {...}} "
                         "items or configured method objects")
    methods = [_one(item, options) for item in items]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method list {names} names a method twice")
    if len(methods) > 1:
        alone = [m.name for m in methods if not capabilities_of(m).combines]
        if alone:
            raise ValueError(f"method(s) {alone} cannot be combined with other methods")
    return methods


def _one(item: Any, options: dict) -> ContinualMethod:
    if isinstance(item, ContinualMethod):
        if options:
            raise ValueError("method_options only apply to a method given by name; configure the object instead")
        return item
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"name", "options"})
        if "name" not in item or unknown:
            raise ValueError(f"a method given as a dict has keys 'name' and 'options', got {sorted(item)}")
        return method_class(item["name"])(**dict(item.get("options") or {}))
    if not isinstance(item, str):
        raise TypeError(f"method must be a registered name ({', '.join(available_methods())}) or a ContinualMethod "
                        f"object, got {type(item).__name__}")
    return method_class(item)(**options)


def capabilities_of(method: ContinualMethod) -> Capabilities:
    """What ``method`` declared at registration (an unregistered object: the defaults)."""
    return method.capabilities or Capabilities()


def check_run(methods: list[ContinualMethod], *, engine: str, mode: str | None, stream: str, scenario: str,
              fsdp: bool = False) -> None:
    """Refuse, before training, a method combined with what it does not declare."""
    for m in methods:
        caps = capabilities_of(m)
        asked = {"engine": engine, "adapter mode": mode or "none", "stream": stream}
        allowed = {"engine": caps.engines, "adapter mode": caps.adapter_modes, "stream": caps.streams}
        for what, value in asked.items():
            if value not in allowed[what]:
                raise ValueError(f"method {m.name!r} does not run with {what} {value!r}; it supports {what}s: "
                                 f"{', '.join(allowed[what])}")
        if caps.needs_task_ids and scenario != "task-incremental":
            raise ValueError(f"method {m.name!r} needs task ids (a task-incremental stream); this stream is {scenario}")
        if fsdp and not caps.shards:
            able = sorted(n for n, cls in _METHODS.items() if cls.capabilities.shards)
            raise ValueError(f"method {m.name!r} does not run on an FSDP-sharded model (fsdp=True): its hooks read or "
                             f"write sharded tensors; methods that shard: {', '.join(able)}")
        if caps.owns_loop and len(methods) > 1:
            raise ValueError(f"method {m.name!r} trains experiences itself and cannot be combined with other methods")

