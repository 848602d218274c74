"""Shared machinery for every adapter method: the per-layer :class:`Adapter` and the
:class:`AdaptedLayer` that runs a frozen base layer together with its adapters.

A method only writes an ``Adapter`` subclass (its trainable tensors, its forward contribution
and its merge rule); this module handles composition, merging, disabling and residual bases.

Composition on one layer (PEFT's rule after its per-adapter ``miss_fn`` fix): adapters that
rewrite the weight (``rewrites_weight``, e.g. Bone "bat") are applied first, in order, to W;
every other active adapter then maps the layer output ``y -> adapter(x, y)`` in order (additive
methods add a term, SSF scales and shifts). Merging applies the same order to the weights and
unmerging undoes it in reverse.

Residual bases: methods that initialise from the weight (LaMDA's SVD, CorDA, KORE) leave a
residual ``W_res = W - up @ down`` in the base layer. The factors are kept (and saved) as the
buffers ``residual_up`` / ``residual_down`` so the original W can always be recovered: a layer
whose adapter is disabled or inactive adds ``x downᵀ upᵀ`` back and computes the original base.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdapterConfig
from .targeting import default_lora_targets

RESIDUAL_BUFFERS = ("residual_up", "residual_down")


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor, detached: a sharded DTensor (FSDP2's parameters) is gathered from every
    process, so every process must call this for it."""
    t = t.detach()
    dtensor = _dtensor_type()
    return t.full_tensor() if dtensor is not None and isinstance(t, dtensor) else t


def local_tensor(t: Tensor) -> Tensor:
    """This process's shard of a DTensor (rows, for FSDP2's dim-0 sharding), else ``t`` itself."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


class Adapter(nn.Module):
    """One adapter on one base layer. Subclasses register with ``@register(name, Config)``.

    Constructor contract: ``__init__(base, config, layer_name, context, init)`` creates the
    adapter's tensors on the base weight's device and dtype and must not modify ``base``. With
    ``init=False`` (loading a checkpoint) it only needs the right shapes; the values are loaded
    afterwards. ``context`` is what :meth:`prepare` returned for this layer (or None).
    """

    method: ClassVar[str] = ""
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)
    rewrites_weight: ClassVar[bool] = False
    mergeable: ClassVar[bool] = True
    # Set by the model wrapper: the model is rebuilt from its config when loaded (a Hugging Face
    # PreTrainedModel), so a parameter that a merge adds (a new bias) is dropped by save_pretrained.
    fixed_architecture: bool = False

    def __init__(self, base: nn.Module, config: AdapterConfig, layer_name: str, context: Any, init: bool):
        super().__init__()
        self.config = config
        self.layer_name = layer_name

    # ---- hooks a method may override -------------------------------------------------------
    @classmethod
    def prepare(cls, model: nn.Module, targets: dict[str, nn.Module], config: AdapterConfig) -> dict[str, Any]:
        """Model-level work before the layers are built (calibration, rank allocation).

        Returns a per-layer context keyed by module name. It may also write resolved choices into
        ``config`` (e.g. ``rank_pattern``) so that a saved adapter reloads with the same shapes.
        """
        return {}

    @classmethod
    def link(cls, adapters: dict[str, "Adapter"]) -> None:
        """Model-level step once every layer's adapter of one adapter name is built (and, when
        loading, filled): e.g. share tensors between layers. Runs before the layers change."""

    @classmethod
    def supported_types(cls, config: AdapterConfig) -> tuple[type[nn.Module], ...]:
        return cls.layer_types

    @classmethod
    def default_targets(cls, model: nn.Module) -> list[str] | str:
        return default_lora_targets(model)

    @classmethod
    def example_options(cls, model: nn.Module, batches: list[Any]) -> dict[str, Any]:
        """Options that put this method on an arbitrary small ``model`` (e.g. calibration data
        built from ``batches``, sample inputs of the model). The contract test suite and the
        ``lifelong adapters`` command use it; methods needing data at init override it."""
        return {}

    @classmethod
    def exact_at_init(cls, config: AdapterConfig) -> bool:
        """Whether the adapted model equals the base model at init (tests rely on it)."""
        return True

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        """Map the output so far ``y`` (of input ``x``) to the adapted output."""
        raise TypeError(f"{type(self).__name__} rewrites the weight; it has no output-side forward")

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        """The whole layer output in one op when this adapter is the only one running, else None."""
        return None

    def rewrite_weight(self, weight: Tensor) -> Tensor:
        """For ``rewrites_weight`` methods: the adapted weight as a function of ``weight``."""
        raise TypeError(f"{type(self).__name__} does not rewrite the weight")

    def merge_blocker(self, base: nn.Module) -> str | None:
        """Why this adapter cannot be merged into ``base`` right now, or None if it can."""
        return None if self.mergeable else f"adapter {self.method!r} cannot be merged into the weights"

    def delta_weight(self, base: nn.Module) -> Tensor:
        """Additive weight update ``ΔW`` used by the default merge/unmerge."""
        raise TypeError(f"adapter {self.method!r} cannot be merged into the weights")

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        base.weight.add_(self.delta_weight(base).to(base.weight.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        base.weight.sub_(self.delta_weight(base).to(base.weight.dtype))

    def set_trainable(self, trainable: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(trainable)

    # ---- residual bases ----------------------------------------------------------------------
    def set_residual(self, up: Tensor, down: Tensor) -> None:
        """Declare that attaching this adapter replaces W by ``W - up @ down``."""
        self.register_buffer("residual_up", up.detach().clone().contiguous())
        self.register_buffer("residual_down", down.detach().clone().contiguous())

    @property
    def has_residual(self) -> bool:
        return hasattr(self, "residual_up")

    def residual_weight(self, dtype: torch.dtype) -> Tensor:
        up, down = self.residual_up.float(), self.residual_down.float()
        return (up @ down).to(dtype)

    @torch.no_grad()
    def attach(self, base: nn.Module) -> None:
        """Called once the adapter is installed (or loaded): leave the residual in the base."""
        if self.has_residual:
            base.weight.sub_(self.residual_weight(base.weight.dtype))

    @torch.no_grad()
    def detach_from(self, base: nn.Module) -> None:
        """Undo :meth:`attach` (the adapter is removed without merging)."""
        if self.has_residual:
            base.weight.add_(self.residual_weight(base.weight.dtype))

    def residual_output(self, x: Tensor) -> Tensor:
        """``x (up @ down)ᵀ``: what the residual base misses of the original layer output."""
        return F.linear(F.linear(x, self.residual_down.to(x.dtype)), self.residual_up.to(x.dtype))


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

    def add(self, name: str, adapter: Adapter) -> None:
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
