"""Helpers shared by the op modules: input flattening, shape checks, dropout masks, scales."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def flatten_input(op: str, x: Tensor, in_features: int) -> Tensor:
    """View ``x`` of shape (..., in) as (M, in); a non-unit inner stride gets one copy."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)} but the weight expects (..., {in_features})")
    x2 = x.reshape(-1, in_features)
    return x2 if x2.stride(-1) == 1 or in_features <= 1 else x2.contiguous()


def check_shape(op: str, name: str, t: Tensor | None, shape: tuple[int, ...], meaning: str) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {shape} ({meaning})")


def check_linear(op: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[int, int]:
    """(out, in) of the frozen base; x, weight and bias must share one floating dtype."""
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    check_shape(op, "bias", bias, (out_f,), "one entry per output feature")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: x must be floating point, got {x.dtype}")
    return out_f, in_f


def check_dropout(op: str, p: float) -> float:
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {p!r}")
    return float(p)


def dropout_mask(x2: Tensor, p: float, seed: int | None) -> Tensor | None:
    """Keep-mask (bool, x2's shape) for inverted dropout, or None when p == 0. ``seed`` makes it
    reproducible without touching the global RNG."""
    if p == 0.0:
        return None
    gen = None
    if seed is not None:
        gen = torch.Generator(device=x2.device)
        gen.manual_seed(int(seed))
    return torch.rand(x2.shape, device=x2.device, generator=gen) >= p


def apply_dropout(x2: Tensor, mask: Tensor | None, p: float) -> Tensor:
    return x2 if mask is None else x2 * mask / (1.0 - p)


def scale_vector(op: str, scale: float | Tensor, s_vec: Tensor | None, r: int, device: torch.device) -> Tensor:
    """The per-rank-column scale ``s · s_vec`` as an fp32 vector of length r (a constant)."""
    if isinstance(scale, Tensor) and scale.requires_grad or s_vec is not None and s_vec.requires_grad:
        raise ValueError(f"{op}: scale and s_vec are constants; pass tensors without requires_grad")
    base = torch.as_tensor(scale, dtype=torch.float32, device=device).detach()
    if base.dim() != 0:
        raise ValueError(f"{op}: scale must be a scalar, got shape {tuple(base.shape)}; use s_vec for per-rank scales")
    if s_vec is None:
        return base.expand(r).contiguous()
    if tuple(s_vec.shape) != (r,):
        raise ValueError(f"{op}: s_vec has shape {tuple(s_vec.shape)}, expected ({r},) (one scale per rank column)")
    return (base * s_vec.detach().to(device=device, dtype=torch.float32)).contiguous()


def base_needs_grad(weight: Tensor, bias: Tensor | None) -> bool:
    """The fused Functions assume a frozen base; a trainable one takes plain autograd instead."""
    return torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))


def as_grad(g: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A parameter's gradient in the parameter's own dtype."""
    return None if g is None else g.to(dtype)


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a linear layer in for ``x``'s device, or None outside it."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def autocast_cast(dtype: torch.dtype, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast as autocast casts a linear layer's operands: floating tensors except float64."""
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def outside_autocast(x: Tensor, fn: Callable[[], T]) -> T:
    """Run ``fn`` with autocast off on x's device.

    The hand-written backward passes run outside any autocast region, so an op that let autocast
    pick dtypes inside its forward would save operands its backward cannot multiply (a bf16
    gradient against an fp32 weight). Ops therefore cast their operands once at entry, as autocast
    would for ``F.linear``, and run the whole Function in that one dtype.
    """
    with torch.autocast(x.device.type, enabled=False):
        return fn()
