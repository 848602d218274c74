"""The base configuration shared by every adapter method.

A method's config is a dataclass that subclasses :class:`AdapterConfig`; the registry knows it by
the method name. Configs round-trip through JSON (``to_dict`` / ``from_dict``) so that a saved
adapter can be rebuilt with exactly the same settings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..checks import non_negative_number, one_of, positive_int, positive_number

__all__ = ["AdapterConfig", "check_alpha_pattern", "check_dropout", "check_fields", "lora_scaling"]

# Fields that describe the data used at init, not the adapter: they are never written to JSON.
RUNTIME_ONLY_FIELDS = ("calibration", "task_vectors")


@dataclass
class AdapterConfig:
    """Settings every adapter understands (PEFT's names).

    Attributes:
        target_modules: module-name suffixes (``["query", "value"]``), a regular expression
            matched against the full module name, ``"all-linear"`` (every ``nn.Linear`` but the
            output head) or None for the method's default.
        exclude_modules: suffixes or a regex of modules never to adapt.
        modules_to_save: suffixes of extra modules (e.g. a classification head) that are trained
            in full and saved with the adapter; each adapter gets its own copy.
        rank_pattern: per-layer overrides of ``r`` (full module name or suffix -> rank). Methods
            that choose ranks themselves write their choice here so a saved adapter reloads.
        layers_to_transform: PEFT's option: only targets in these layer indices (an int or a list),
            the index being the number after one of ``layers_pattern`` in the module name
            (default PEFT's ``layers``, ``h``, ``block``, ``blocks``, ``layer``).
    """

    method: ClassVar[str] = ""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        self.resolve_aliases()
        self.validate()

    def resolve_aliases(self) -> None:
        """Turn the other accepted spellings of a setting into its one stored form (a tuple of
        names into a list, a single layer index into a list, PEFT's option names into ours).
        Runs once, when the config is made; methods with aliases extend this."""
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = [self.layers_pattern]

    def validate(self) -> None:
        """Raise ``ValueError`` for settings outside their allowed range (methods extend this).
        Only checks: it never changes a setting, reads a file or touches a model."""
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list, tuple)):
                raise ValueError(f"{name} must be a list of name suffixes, a regex string or None, got {value!r}")
        layers = self.layers_to_transform
        if layers is not None and (not isinstance(layers, (list, tuple)) or not layers
                                   or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)):
            raise ValueError(f"layers_to_transform must be a layer index or a non-empty list of them (ints >= 0), "
                             f"got {layers!r}")
        patterns = self.layers_pattern
        if patterns is not None and (not isinstance(patterns, (list, tuple))
                                     or not all(isinstance(p, str) and p for p in patterns)):
            raise ValueError(f"layers_pattern must be a module name part or a list of them, got {patterns!r}")
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, (list, tuple)):
            raise ValueError(f"modules_to_save must be a list of module-name suffixes, got {self.modules_to_save!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings, without runtime-only data such as calibration loaders."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in RUNTIME_ONLY_FIELDS:
                continue
            out[f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AdapterConfig":
        check_fields(cls, values)
        return cls(**values)

    def replace(self, **changes: Any) -> "AdapterConfig":
        check_fields(type(self), changes)
        return dataclasses.replace(self, **changes)


def check_fields(cls: type[AdapterConfig], values: dict[str, Any]) -> None:
    """Reject unknown config keys with a message listing the allowed ones."""
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for adapter {cls.method!r}; allowed: {sorted(allowed)}"
        )


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """LoRA's ``alpha / r``, or rsLoRA's ``alpha / √r`` (Kalajdzievski, arXiv 2312.03732)."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def check_alpha_pattern(values: dict[str, float]) -> None:
    try:
        if not isinstance(values, dict):
            raise ValueError
        for name, value in values.items():
            positive_number(f"alpha_pattern[{name!r}]", value)
    except ValueError:
        raise ValueError(f"alpha_pattern must map module names to positive lora_alpha values, got {values!r}") from None


def check_dropout(value: Any, name: str = "dropout") -> None:
    """A dropout probability: a number in [0, 1)."""
    non_negative_number(name, value)
    if not value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
