"""Task vectors for aTLAS: building them (``θ_i − θ_0`` from models, state dicts or files, or
a lifelong adapter's merged update), saving and loading them (safetensors), and checking and
reading the ``task_vectors`` option of :class:`~.atlas.AtlasConfig`.

A task vector is a plain dict ``parameter name -> tensor``, under the parameter names of the
unadapted model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..files import atomic_write
from .layers import SavedModule, unwrap
from .targeting import iter_layers, original_layer

TaskVector = dict[str, Tensor]

__all__ = ["TaskVector", "check_task_vectors", "load_task_vector", "load_task_vectors", "save_task_vector",
           "task_vector", "task_vector_from_adapter"]


def _named_items(values: Any) -> list[tuple[str, Any]]:
    if isinstance(values, Mapping) and values and all(isinstance(v, Tensor) for v in values.values()):
        raise ValueError("task_vectors must be a list (or a dict name -> task vector), got a single task vector; wrap it in [ ]")
    if isinstance(values, Mapping):
        return [(str(name), tv) for name, tv in values.items()]
    if isinstance(values, (list, tuple)):
        return [(f"tv{i}", tv) for i, tv in enumerate(values)]
    raise ValueError(f"task_vectors must be a list (or a dict name -> task vector), got {type(values).__name__}")


def _kept_items(values: Any, exclude: Iterable[str] | None) -> list[tuple[str, Any]]:
    items = _named_items(values)
    dropped = set(exclude or ())
    unknown = sorted(dropped - {name for name, _ in items})
    if unknown:
        raise ValueError(f"exclude names {unknown} are not task vectors; names: {[name for name, _ in items]}")
    kept = [(name, tv) for name, tv in items if name not in dropped]
    if not kept:
        raise ValueError("atlas needs at least one task vector (all were excluded or none given)")
    return kept


def _check_entries(name: str, tv: Any) -> None:
    if not isinstance(tv, Mapping):
        raise ValueError(f"task vector {name!r} must be a dict parameter name -> tensor or a safetensors path, got {type(tv).__name__}")
    bad = [k for k, v in tv.items() if not isinstance(v, Tensor) or not v.is_floating_point()]
    if bad:
        raise ValueError(f"task vector {name!r} has non-floating or non-tensor entries {bad[:5]}; build it with task_vector()")


def check_task_vectors(values: Any, exclude: Iterable[str] | None) -> None:
    """Check the ``task_vectors`` option as given (files are not read: :func:`load_task_vectors` does)."""
    for name, tv in _kept_items(values, exclude):
        if not isinstance(tv, (str, os.PathLike)):
            _check_entries(name, tv)


def load_task_vectors(
    values: Any, exclude: Iterable[str] | None, dtype: torch.dtype
) -> tuple[dict[str, TaskVector], list[str | None]]:
    """Named task vectors ``{name: {param: tensor in dtype}}`` with ``exclude`` dropped (files
    read), and the absolute file each came from (None for one given in memory)."""
    out: dict[str, TaskVector] = {}
    files: list[str | None] = []
    for name, tv in _kept_items(values, exclude):
        files.append(str(Path(tv).resolve()) if isinstance(tv, (str, os.PathLike)) else None)
        if isinstance(tv, (str, os.PathLike)):
            tv = load_task_vector(tv)
        _check_entries(name, tv)
        out[name] = {k: v.detach().to(dtype) for k, v in tv.items()}
    return out, files


def _float_state(source: nn.Module | Mapping[str, Tensor] | str | os.PathLike) -> dict[str, Tensor]:
    if isinstance(source, nn.Module):
        return {k: v.detach() for k, v in source.named_parameters()}
    if isinstance(source, (str, os.PathLike)):
        source = load_file(str(source))
    if not isinstance(source, Mapping):
        raise TypeError(f"expected an nn.Module, a state dict or a safetensors path, got {type(source).__name__}")
    return {k: v.detach() for k, v in source.items() if isinstance(v, Tensor) and v.is_floating_point()}


def task_vector(
    finetuned: nn.Module | Mapping[str, Tensor] | str | os.PathLike,
    pretrained: nn.Module | Mapping[str, Tensor] | str | os.PathLike,
    dtype: torch.dtype = torch.float32,
) -> TaskVector:
    """``θ_i − θ_0`` by parameter name from two models, state dicts or safetensors checkpoints
    (modules contribute their parameters; state dicts their floating entries)."""
    ft, pre = _float_state(finetuned), _float_state(pretrained)
    if set(ft) != set(pre):
        raise ValueError(
            f"fine-tuned and pretrained parameters differ by name: only fine-tuned {sorted(set(ft) - set(pre))[:5]}, "
            f"only pretrained {sorted(set(pre) - set(ft))[:5]}"
        )
    bad = [k for k in ft if ft[k].shape != pre[k].shape]
    if bad:
        raise ValueError(f"shape mismatch between fine-tuned and pretrained for {bad[:5]}")
    return {k: (ft[k].double() - pre[k].double().to(ft[k].device)).to(dtype) for k in ft}


@torch.no_grad()
def task_vector_from_adapter(adapted: nn.Module, adapter_name: str | None = None, dtype: torch.dtype = torch.float32) -> TaskVector:
    """The merged update of one lifelong adapter as a task vector: every base parameter that merging
    changes (ΔW, Δb, ...) plus ``modules_to_save`` copies minus their originals, under the
    original parameter names."""
    name = adapter_name or adapted.active_adapter
    previous = list(adapted.active_adapters)
    adapted.set_adapter(name)
    try:
        before = dict(original_parameters(adapted.base_model))
        snapshot = {k: v.detach().clone() for k, v in before.items()}
        adapted.merge()
        try:
            tv = {k: (before[k].double() - snapshot[k].double()).to(dtype) for k in before}
        finally:
            adapted.unmerge()
        for module_name, module in iter_layers(adapted.base_model):
            if isinstance(module, SavedModule) and name in module.copies:
                copy = dict(module.copies[name].named_parameters())
                for key, original in module.original.named_parameters():
                    tv[f"{module_name}.{key}"] = (copy[key].double() - original.double()).to(dtype)
    finally:
        adapted.set_adapter(previous)
    return {k: v for k, v in tv.items() if bool(v.ne(0).any())}


def save_task_vector(tv: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Write a task vector to a safetensors file atomically (temp file, then rename)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tv.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"format": "lifelong-task-vector"}))


def load_task_vector(path: str | os.PathLike) -> TaskVector:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no task vector file at {str(path)!r}")
    return load_file(str(path))


def original_parameters(model: nn.Module, buffers: bool = False) -> Iterable[tuple[str, Tensor]]:
    """Parameters (or buffers) under their names in the unadapted model, adapter internals excluded."""
    for name, module in iter_layers(model):
        recurse = isinstance(module, SavedModule)
        module = original_layer(unwrap(module))
        module = module.original if isinstance(module, SavedModule) else module
        tensors = module.named_buffers(recurse=recurse) if buffers else module.named_parameters(recurse=recurse)
        for key, t in tensors:
            yield f"{name}.{key}" if name else key, t
