"""The per-layer :class:`Adapter` every method subclasses: its tensors, its forward
contribution, its merge rule and the optional hooks (training schedules, LoRA factors).

Residual bases: methods that initialise from the weight (LaMDA's SVD, CorDA, KORE) leave a
residual ``W_res = W - up @ down`` in the base layer. The factors are kept (and saved) as the
buffers ``residual_up`` / ``residual_down`` so the original W can always be recovered: a layer
whose adapter is disabled or inactive adds ``x downᵀ upᵀ`` back and computes the original base.

The modules that carry adapters inside a model (:class:`AdaptedLayer`, :class:`SavedModule`)
live in :mod:`.layers` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdapterConfig
from .layers import AdaptedLayer, SavedModule, unwrap
from .targeting import default_lora_targets

__all__ = ["RESIDUAL_BUFFERS", "AdaptedLayer", "Adapter", "SavedModule", "full_tensor", "local_tensor",
           "original_weights", "restore_weights", "unwrap"]

RESIDUAL_BUFFERS = ("residual_up", "residual_down")

#: the open :func:`original_weights` records (id of a base weight -> (weight, exact copy))
_RECORDS: list[dict[int, tuple[Tensor, Tensor]]] = []


@contextmanager
def original_weights() -> Iterator[dict[int, tuple[Tensor, Tensor]]]:
    """While open, :meth:`Adapter.attach` keeps an exact copy of each base weight before it first
    subtracts a residual from it, so that :func:`restore_weights` can undo a failed load bit for
    bit (adding the residual back is off by rounding: ``(W - R) + R != W`` in floating point)."""
    record: dict[int, tuple[Tensor, Tensor]] = {}
    _RECORDS.append(record)
    try:
        yield record
    finally:
        _RECORDS.remove(record)


@torch.no_grad()
def restore_weights(record: dict[int, tuple[Tensor, Tensor]]) -> None:
    """Put back the weights an :func:`original_weights` record kept."""
    for weight, original in record.values():
        weight.copy_(original)


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

    def after_backward(self) -> None:
        """Called after every (micro-batch) backward while this adapter runs (e.g. LaMDA's
        per-backward freezing rule). Nothing by default."""

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called after every ``optimizer.step()`` while this adapter runs; ``optimizer`` lets an
        adapter drop parameters it froze for good. Nothing by default."""

    def lora_factors(self) -> tuple[Tensor, Tensor, float] | None:
        """``(A, B, s)`` (detached, A of shape (r, in), B of shape (out, r)) with
        ``delta_weight = s · B @ A`` when this adapter is LoRA-shaped, else None. PEFT export and
        :meth:`~.model.AdaptedModel.add_weighted_adapter` use it; a residual base, if any, is
        separate (:attr:`has_residual`)."""
        return None

    @torch.no_grad()
    def set_lora_factors(self, a: Tensor, b: Tensor) -> None:
        """Set this (freshly built, rank ``a.shape[0]``) adapter's tensors so that
        ``delta_weight = b @ a`` (any scale folded into ``b``): how
        :meth:`~.model.AdaptedModel.add_weighted_adapter` fills the adapter it makes. Only
        LoRA-shaped methods implement it."""
        raise TypeError(f"adapter {self.method!r} is not LoRA-shaped; it cannot be set from LoRA factors")

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
            for record in _RECORDS:
                record.setdefault(id(base.weight), (base.weight, base.weight.detach().clone()))
            base.weight.sub_(self.residual_weight(base.weight.dtype))

    @torch.no_grad()
    def detach_from(self, base: nn.Module) -> None:
        """Undo :meth:`attach` (the adapter is removed without merging)."""
        if self.has_residual:
            base.weight.add_(self.residual_weight(base.weight.dtype))

    def residual_output(self, x: Tensor) -> Tensor:
        """``x (up @ down)ᵀ``: what the residual base misses of the original layer output."""
        return F.linear(F.linear(x, self.residual_down.to(x.dtype)), self.residual_up.to(x.dtype))
