"""Export LoRA-shaped adapters (LoRA, CorDA, KORE, LaMDA) as a PEFT ``LoraConfig`` checkpoint.

Each exported layer becomes a plain PEFT LoRA layer ``y = W x + b + s·B A x``:

- LoRA / CorDA / KORE: ``lora_A = A``, ``lora_B = B``, ``s`` = the adapter's scaling (1 for KORE);
- LaMDA: ``lora_A = A``, ``lora_B = B·S`` (S folded into B; frozen PMB columns as frozen).

Per-layer ranks and scalings go into ``rank_pattern`` / ``alpha_pattern`` (``alpha = s·r``,
``use_rslora=False``), so PEFT's scaling equals ours whatever rsLoRA or rank choices were made.

CorDA, KORE and LaMDA initialise from the weight and leave a residual base ``W_res = W − R`` (R =
``residual_up @ residual_down``). By default (``residual="convert"``) the export follows PEFT's
conversion of PiSSA / CorDA / OLoRA adapters (``save_pretrained(...,
path_initial_model_for_weight_conversion=...)``): the update relative to the *original* W,
``s·B A − R``, is written as one LoRA of rank ``r + rank(R)`` with ``A' = [A; R_down]`` and
``B' = [B, −R_up / s]``, so a plain ``PeftModel.from_pretrained(fresh_base, directory)`` is exact.
``residual="base"`` keeps rank r and writes ``residual_weights.safetensors`` (``W_res`` per
layer) instead: load it with :func:`load_in_peft`, or :func:`load_residual_base` then PEFT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .base import Adapter
from .model import AdaptedModel, atomic_write, check_has_adapter
from .registry import get_method, lora_shaped_methods

RESIDUAL_FILE = "residual_weights.safetensors"
RESIDUAL_MODES = ("convert", "base")


def lora_factors(adapter: Adapter) -> tuple[Tensor, Tensor, float]:
    """``(A, B, s)`` of one adapter in PEFT's LoRA form."""
    factors = adapter.lora_factors()
    if factors is None:
        raise ValueError(f"PEFT export supports adapters {lora_shaped_methods()}, not {adapter.method!r}")
    return factors


def original_base_weight(layer: nn.Module, adapter_name: str) -> Tensor:
    """The base weight PEFT must see: the original W minus this adapter's residual only."""
    weight = layer.base_layer.weight.detach().float().clone()
    for name, adapter in layer.adapters.items():
        if name != adapter_name and adapter.has_residual:
            weight += adapter.residual_weight(torch.float32)
    return weight.to(layer.base_layer.weight.dtype)


def converted_factors(adapter: nn.Module, a: Tensor, b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(A', B')`` with ``s·B'A' = s·B A − R``: the update relative to the original weight."""
    up, down = adapter.residual_up.float(), adapter.residual_down.float()
    a2 = torch.cat([a.float(), down], dim=0)
    b2 = torch.cat([b.float(), -up / scale], dim=1)
    return a2.to(a.dtype), b2.to(b.dtype)


def chosen_adapter(model: AdaptedModel, adapter_name: str | None) -> str:
    """The adapter to export: the named one, or the only active one (PEFT loads one LoRA per folder)."""
    if adapter_name is None:
        if len(model.active_adapters) > 1:
            raise ValueError(
                f"adapters {model.active_adapters} are active together; a PEFT LoRA folder holds one adapter: "
                f"export each with export_peft(model, directory, adapter_name=...) (PEFT composes loaded adapters "
                "with add_weighted_adapter), or merge them with lifelong's merge_and_unload"
            )
        adapter_name = model.active_adapter
    check_has_adapter(adapter_name, model.configs)
    return adapter_name


def export_peft(model: AdaptedModel, directory: str | os.PathLike, adapter_name: str | None = None, *,
                residual: str = "convert") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format). ``residual``:
    ``"convert"`` (a LoRA on the original weights; plain ``PeftModel.from_pretrained`` is exact) or
    ``"base"`` (rank r plus ``residual_weights.safetensors``, see the module docstring)."""
    from peft import LoraConfig

    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {list(RESIDUAL_MODES)}, got {residual!r}")
    adapter_name = chosen_adapter(model, adapter_name)
    config = model.configs[adapter_name]
    if get_method(config.method).adapter_cls.lora_factors is Adapter.lora_factors:
        raise ValueError(f"PEFT export supports adapters {lora_shaped_methods()}, not {config.method!r}")
    if config.modules_to_save:
        raise ValueError("PEFT export of modules_to_save is not supported; save those modules separately")
    if any(layer.merged for layer in model.adapted_layers()):
        raise RuntimeError("unmerge() before exporting to PEFT")
    tensors: dict[str, Tensor] = {}
    residuals: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for layer in model.adapted_layers():
        if adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        a, b, scale = lora_factors(adapter)
        name = adapter.layer_name
        if adapter.has_residual and residual == "convert":
            a, b = converted_factors(adapter, a, b, scale)
        elif adapter.has_residual:
            residuals[f"{name}.weight"] = original_base_weight(layer, adapter_name).cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.cpu().contiguous().clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.cpu().contiguous().clone()
        ranks[name], alphas[name] = a.shape[0], scale * a.shape[0]
    r0 = max(ranks.values())
    lora = LoraConfig(
        r=r0, lora_alpha=alphas[next(n for n in ranks if ranks[n] == r0)], target_modules=sorted(ranks),
        rank_pattern=ranks, alpha_pattern=alphas, lora_dropout=float(getattr(config, "lora_dropout", getattr(config, "dropout", 0.0))),
        use_rslora=False, init_lora_weights=True, bias="none",
    )
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "adapter_config.json",
                 lambda p: p.write_text(json.dumps(lora.to_dict(), indent=2, sort_keys=True, default=list)))
    atomic_write(folder / "adapter_model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    if residuals:
        atomic_write(folder / RESIDUAL_FILE, lambda p: save_file(residuals, str(p), metadata={"method": config.method}))
    elif (folder / RESIDUAL_FILE).is_file():
        (folder / RESIDUAL_FILE).unlink()  # left by an earlier export: it would shift this one
    return folder


@torch.no_grad()
def load_residual_base(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Write the exported residual weights into ``model`` (a fresh copy of the base) in place."""
    path = Path(directory) / RESIDUAL_FILE
    if not path.is_file():
        return model  # the method left the base weights unchanged
    state = load_file(str(path))
    params = dict(model.named_parameters())
    for key, value in state.items():
        if key not in params:
            raise ValueError(f"residual weight {key!r} has no parameter in this model: exported for another model?")
        if params[key].shape != value.shape:
            raise ValueError(f"residual weight {key!r} has shape {tuple(value.shape)}, model has {tuple(params[key].shape)}")
        params[key].copy_(value.to(params[key].device, params[key].dtype))
    return model


def load_in_peft(model: nn.Module, directory: str | os.PathLike, **kwargs: Any) -> Any:
    """``PeftModel.from_pretrained`` on ``model`` after applying the exported residual base."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_residual_base(model, directory), str(directory), **kwargs)


__all__ = ["export_peft", "load_in_peft", "load_residual_base"]
