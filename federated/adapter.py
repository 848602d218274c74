"""Federated adapters: any registry adapter (``lifelong.wrap``) as the trained part.

The simulator and the servers federate a model's *trainable* parameters only. After
``lifelong.wrap`` those are exactly the adapter tensors (the base model is frozen),
so the workers share one frozen base model and every upload, aggregate and byte
count covers the adapter alone. AFA is linear in that vector;
note that averaging factorised adapters (e.g. LoRA's A and B) separately is not the
average of their product — a known bias of federated LoRA that AFA does not change.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .params import nbytes, trainable_params


def federate_adapter(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """``lifelong.wrap(model, method, **options)``, checked to leave every base weight frozen."""
    import lifelong

    base = {id(p): n for n, p in model.named_parameters()}
    adapted = lifelong.wrap(model, method, **options)
    leaked = sorted(base[id(p)] for p in adapted.trainable_parameters() if id(p) in base)
    if leaked:
        raise ValueError(f"after wrapping with {method!r} the base weights {leaked[:5]} are still "
                         "trainable; only adapter tensors may travel (freeze them first)")
    return adapted


def adapter_bytes(model: nn.Module) -> int:
    """Bytes one upload carries for ``model``: the size of its trainable (adapter) tensors."""
    return nbytes(trainable_params(model))


def _adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that carry adapter tensors: registry ``AdaptedLayer``s and PEFT tuner layers."""
    import sys

    from ..adapters import AdaptedLayer

    kinds: tuple[type, ...] = (AdaptedLayer,)
    if "peft" in sys.modules:
        from peft.tuners.tuners_utils import BaseTunerLayer

        kinds = (*kinds, BaseTunerLayer)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def check_adapter_trainable(model: nn.Module) -> None:
    """Raise when ``model`` carries adapters none of whose tensors is trainable.

    Federating such a model would only train (and send) whatever else is trainable, e.g. a head,
    while the adapter stays at its initial value: almost always a mistake (a frozen adapter, a
    PEFT model loaded for inference).
    """
    layers = _adapter_layers(model)
    if not layers:
        return
    trainable = [p for _, layer in layers for name, p in layer.named_parameters()
                 if "base_layer" not in name.split(".") and p.requires_grad]   # base_layer: the wrapped weights
    if not trainable:
        raise ValueError(f"the model carries adapters ({len(layers)} adapted layers, e.g. {layers[0][0]!r}) but "
                         "none of their tensors is trainable, so federated training would never change them; "
                         "unfreeze the adapter (requires_grad=True) or pass the model without it")
