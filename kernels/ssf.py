"""SSF after a linear layer, with a hand-written backward for the frozen base.

Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning",
NeurIPS 2022, arXiv 2210.08823::

    Z = X Wᵀ + b,   Y = γ ⊙ Z + β
    dβ = Σ_m G[m, :]     dγ = Σ_m G[m, :] ⊙ Z[m, :]     dX = (G ⊙ γ) W

``save="z"`` keeps Z for dγ; ``save="recompute"`` keeps Y instead and recovers ``Z = (Y − β)/γ``
(less memory, unsafe when some γ is near 0, so it is opt-in). The triton backend runs K1 with the
affine epilogue (storing Z), a column-reduction kernel for dγ and dβ, and K1 with the rows of W
scaled by γ on load for dX. The composite forward without grads folds γ into W (one pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .common import (as_grad, autocast_cast, autocast_dtype, base_needs_grad, check_linear, check_shape, flatten_input,
                     outside_autocast)

SAVE_MODES = ("z", "recompute")


def _forward(backend: str, x2: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor,
             keep_z: bool) -> tuple[Tensor, Tensor | None]:
    if backend == "triton":
        from . import triton_kernels as tk

        return tk.gemm_lowrank(x2, weight.t(), bias=bias, affine=(gamma, beta), store_z=keep_z)
    if backend == "composite" and not keep_z:
        folded_bias = gamma * bias + beta if bias is not None else beta
        return F.linear(x2, gamma[:, None] * weight, folded_bias), None
    z = F.linear(x2, weight, bias)
    return torch.addcmul(beta, z, gamma), (z if keep_z else None)


def _backward(backend: str, g: Tensor, z: Tensor | None, weight: Tensor, gamma: Tensor, need_x: bool,
              need_gb: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    if backend == "triton":
        from . import triton_kernels as tk

        dbeta, dgamma = tk.colsum2(g, z) if need_gb else (None, None)
        dx = tk.gemm_lowrank(g, weight, kscale=gamma)[0] if need_x else None
        return dx, dgamma, dbeta
    acc = torch.promote_types(g.dtype, torch.float32)  # fp32 sums for half inputs, fp64 stays fp64
    dbeta = g.sum(0, dtype=acc) if need_gb else None
    dgamma = (g.to(acc) * z.to(acc)).sum(0) if z is not None else None
    dx = (g * gamma) @ weight if need_x else None
    return dx, dgamma, dbeta


class SSFLinearFn(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x2, weight, bias, gamma, beta, save, backend):  # type: ignore[override]
        need_gamma = ctx.needs_input_grad[3]
        y, z = _forward(backend, x2, weight, bias, gamma, beta, need_gamma and save == "z")
        ctx.save_for_backward(weight, gamma, beta, z, y if need_gamma and save == "recompute" else None)
        ctx.backend, ctx.dtypes = backend, (gamma.dtype, beta.dtype)
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gy):  # type: ignore[override]
        weight, gamma, beta, z, y = ctx.saved_tensors
        need_x, _, _, need_gamma, need_beta = ctx.needs_input_grad[:5]
        if y is not None:
            acc = torch.promote_types(y.dtype, torch.float32)
            z = (y.to(acc) - beta.to(acc)) / gamma.to(acc)
        g = gy if gy.stride(-1) == 1 else gy.contiguous()
        dx, dgamma, dbeta = _backward(ctx.backend, g, z if need_gamma else None, weight, gamma, need_x,
                                      need_gamma or need_beta)
        return (dx, None, None, as_grad(dgamma, ctx.dtypes[0]) if need_gamma else None,
                as_grad(dbeta, ctx.dtypes[1]) if need_beta else None, None, None)


def ssf_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor, *, save: str = "z",
    backend: str | None = None,
) -> Tensor:
    """``y = γ ⊙ (x Wᵀ + b) + β`` with γ, β of shape (out,) in x's dtype. Under ``torch.autocast``
    every operand is cast to the autocast dtype first (γ and β get their gradients back in theirs)."""
    op = "ssf_linear"
    amp = autocast_dtype(x)
    if amp is not None:
        x, weight, bias, gamma, beta = autocast_cast(amp, x, weight, bias, gamma, beta)
        return outside_autocast(x, lambda: ssf_linear(x, weight, bias, gamma, beta, save=save, backend=backend))
    out_f, in_f = check_linear(op, x, weight, bias)
    if save not in SAVE_MODES:
        raise ValueError(f"{op}: save must be one of {SAVE_MODES}, got {save!r}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        check_shape(op, name, t, (out_f,), "one entry per output feature")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    x2 = flatten_input(op, x, in_f)
    if base_needs_grad(weight, bias):
        return (F.linear(x2, weight, bias) * gamma + beta).reshape(*x.shape[:-1], out_f)
    chosen = dispatch.resolve(backend, op, (x2,), (x2.shape[0], in_f, out_f, 1))

    def run(b: str) -> Tensor:
        return SSFLinearFn.apply(x2, weight, bias, gamma, beta, save, b)

    y = dispatch.run_with_fallback(op, lambda: run(chosen), lambda: run("composite")) if chosen == "triton" \
        else run(chosen)
    return y.reshape(*x.shape[:-1], out_f)
