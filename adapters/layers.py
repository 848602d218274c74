"""The modules the library puts in place of a model's own: :class:`AdaptedLayer` (a frozen base
layer plus named adapters) and :class:`SavedModule` (``modules_to_save`` copies).

Composition on one layer (PEFT's rule after its per-adapter ``miss_fn`` fix): adapters that
rewrite the weight (``rewrites_weight``, e.g. Bone "bat") are applied first, in order, to W;
every other active adapter then maps the layer output ``y -> adapter(x, y)`` in order (additive
methods add a term, SSF scales and shifts). Merging applies the same order to the weights and
unmerging undoes it in reverse. Idle adapters with a residual base add it back (see
:class:`~.base.Adapter`), so the layer computes the original base output.

This module depends on nothing else in the package, so that model walks (:mod:`.targeting`)
and adapters (:mod:`.base`) can both use it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


def unwrap(module: nn.Module) -> nn.Module:
    """The base layer inside an :class:`AdaptedLayer`, else ``module`` itself."""
    return module.base_layer if isinstance(module, AdaptedLayer) else module


class AdaptedLayer(nn.Module):
    """A frozen base layer plus named adapters; replaces the base layer inside the model."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # weight, in_features, ... as the model expects

    def add(self, name: str, adapter: nn.Module) -> None:
        if name in self.adapters:  # replacing it would lose its residual base
            raise ValueError(f"layer {adapter.layer_name!r} already has an adapter named {name!r}")
        self.adapters[name] = adapter
        adapter.attach(self.base_layer)

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged in layer {self.adapters[name].layer_name!r}; unmerge first")
        self.adapters[name].detach_from(self.base_layer)
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disabled and self.merged:
            self.unmerge()
        running = [] if self.disabled else [n for n in self.active if n not in self.merged]
        idle = [a for n, a in self.adapters.items() if a.has_residual and (self.disabled or n not in self.active)]
        if not running:
            y = self.base_layer(x, *args, **kwargs)
        elif len(running) == 1 and not self.merged and not idle and not args and not kwargs:
            y = self.adapters[running[0]].fused_forward(x, self.base_layer)
            if y is None:
                y = self._compose(x, running, args, kwargs)
            return y
        else:
            y = self._compose(x, running, args, kwargs)
        for adapter in idle:
            y = y + adapter.residual_output(x)
        return y

    def _compose(self, x: Tensor, running: list[str], args: tuple, kwargs: dict) -> Tensor:
        adapters = [self.adapters[n] for n in running]
        rewriters = [a for a in adapters if a.rewrites_weight]
        if rewriters:
            weight = self.base_layer.weight
            for adapter in rewriters:
                weight = adapter.rewrite_weight(weight)
            bias = self.base_layer.bias
            y = F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
        else:
            y = self.base_layer(x, *args, **kwargs)
        for adapter in adapters:
            if not adapter.rewrites_weight:
                y = adapter(x, y, self.base_layer)
        return y

    def merge(self) -> None:
        """Merge the active adapters in the order the forward applies them: weight rewriters
        first, then the output-side adapters (merging an additive ΔW before a rewrite would lose
        it)."""
        order = [n for n in self.active if self.adapters[n].rewrites_weight]
        order += [n for n in self.active if not self.adapters[n].rewrites_weight]
        for name in order:
            if name not in self.merged:
                self.adapters[name].merge(self.base_layer)
                self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            self.adapters[self.merged.pop()].unmerge(self.base_layer)


class SavedModule(nn.Module):
    """``modules_to_save``: a frozen original plus one fully trainable copy per adapter."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original":
                raise
            return getattr(self.original, name)

    def add(self, name: str) -> None:
        clone = copy.deepcopy(self.original)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone

    def current(self) -> nn.Module:
        if self.disabled or self.active not in self.copies:
            return self.original
        return self.copies[self.active]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)
