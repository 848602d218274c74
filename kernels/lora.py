"""LoRA linear layer with a hand-written backward for a frozen base.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685; fused design
after LoRAFusion (arXiv 2510.00206). With ``X_d = dropout_p(X)``, ``U = X_d Aᵀ`` and the per-rank
scale ``s`` (``scale · s_vec``)::

    Y  = X Wᵀ + b + (U diag(s)) Bᵀ
    dU = (G B) diag(s)     dB = Gᵀ (U diag(s))     dA = dUᵀ X_d
    dX = G W + mask ⊙ (dU A) / (1 − p)

W and b are frozen: no kernel computes dW or db (a base that requires grad runs plain autograd).
Backends: ``torch`` (the formulas above), ``composite`` (in-place ``addmm`` accumulation, fewest
passes), ``triton`` (K1 seeded with the rank-r product for Y and dX, K3 for dU and dB in one read
of G; the shrink ``U`` and ``dA`` stay BLAS calls, as in LoRAFusion).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .common import (apply_dropout, as_grad, autocast_cast, autocast_dtype, base_needs_grad, check_dropout, check_linear,
                     check_shape, dropout_mask, flatten_input, outside_autocast, scale_vector)


def lowrank_forward(backend: str, x2: Tensor, weight: Tensor, bias: Tensor | None, u: Tensor, b_t: Tensor,
                    sv: Tensor) -> Tensor:
    """``X Wᵀ + b + (U diag(s)) R`` with ``R = b_t`` of shape (r, N); shared by LoRA and LaMDA."""
    if backend == "triton":
        from . import triton_kernels as tk

        return tk.gemm_lowrank(x2, weight.t(), lr=(u, b_t, sv), bias=bias)[0]
    us = u * sv.to(u.dtype)
    if backend == "composite":
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        return y.addmm_(us, b_t)
    return F.linear(x2, weight, bias) + us @ b_t


def lowrank_dx(backend: str, g: Tensor, weight: Tensor, du: Tensor, a: Tensor, mask: Tensor | None,
               p: float) -> Tensor:
    """``G W + mask ⊙ (dU A)/(1−p)``: the frozen-base input gradient plus the adapter's."""
    if backend == "triton":
        from . import triton_kernels as tk

        ones = torch.ones(a.shape[0], device=g.device, dtype=torch.float32)
        return tk.gemm_lowrank(g, weight, lr=(du, a, ones), mask=mask, mask_scale=1.0 / (1.0 - p))[0]
    du = du.to(g.dtype)
    if mask is None:
        return torch.mm(g, weight).addmm_(du, a) if backend == "composite" else g @ weight + du @ a
    return g @ weight + apply_dropout(du @ a, mask, p)


def dy_products(backend: str, g: Tensor, b: Tensor | None, u: Tensor | None, sv: Tensor
                ) -> tuple[Tensor | None, Tensor | None]:
    """``((G B) diag(s), Gᵀ (U diag(s)))``; either side is skipped when its operand is None."""
    if backend == "triton":
        from . import triton_kernels as tk

        return tk.dy_pass(g, b, u, sv)
    svd = sv.to(g.dtype)
    du = (g @ b) * svd if b is not None else None
    db = g.t() @ (u * svd) if u is not None else None
    return du, db


class LoRALinearFn(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x2, weight, bias, lora_a, lora_b, sv, mask, p, backend):  # type: ignore[override]
        dtype = x2.dtype
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        xd = apply_dropout(x2, mask, p)
        u = xd @ a.t()
        y = lowrank_forward(backend, x2, weight, bias, u, b.t(), sv)
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        ctx.save_for_backward(weight, a, b, sv, xd if need_a else None, u if need_b else None,
                              mask if need_x else None)
        ctx.p, ctx.backend = p, backend
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gy):  # type: ignore[override]
        weight, a, b, sv, xd, u, mask = ctx.saved_tensors
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        g = gy if gy.stride(-1) == 1 else gy.contiguous()
        du, db = dy_products(ctx.backend, g, b if (need_x or need_a) else None, u if need_b else None, sv)
        dx = lowrank_dx(ctx.backend, g, weight, du, a, mask, ctx.p) if need_x else None
        da = du.to(g.dtype).t() @ xd if need_a else None
        return dx, None, None, as_grad(da, ctx.param_dtypes[0]), as_grad(db, ctx.param_dtypes[1]), None, None, None, None


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float | Tensor, *,
    s_vec: Tensor | None = None, dropout_p: float = 0.0, seed: int | None = None, backend: str | None = None,
) -> Tensor:
    """``y = x Wᵀ + b + scale · (dropout(x) Aᵀ diag(s_vec)) Bᵀ`` for ``A: (r, in)``, ``B: (out, r)``.

    ``backend``: ``"auto"`` (default: see :mod:`lifelong.kernels.dispatch`), ``"torch"``,
    ``"composite"`` or ``"triton"``. ``seed`` fixes the dropout mask. Output in x's dtype; A and B
    may be stored in another dtype (they are cast to x's, their grads come back in their own).
    Under ``torch.autocast`` x, W and b are cast to the autocast dtype first, as for ``F.linear``.
    """
    op = "lora_linear"
    amp = autocast_dtype(x)
    if amp is not None:
        x, weight, bias = autocast_cast(amp, x, weight, bias)
        return outside_autocast(x, lambda: lora_linear(x, weight, bias, lora_a, lora_b, scale, s_vec=s_vec,
                                                       dropout_p=dropout_p, seed=seed, backend=backend))
    out_f, in_f = check_linear(op, x, weight, bias)
    if lora_a.dim() != 2 or lora_a.shape[1] != in_f:
        raise ValueError(f"{op}: lora_a has shape {tuple(lora_a.shape)}, expected (r, {in_f}) to chain with "
                         f"weight {tuple(weight.shape)}")
    r = lora_a.shape[0]
    check_shape(op, "lora_b", lora_b, (out_f, r), f"(out, r) to chain with lora_a {tuple(lora_a.shape)}")
    p = check_dropout(op, dropout_p)
    x2 = flatten_input(op, x, in_f)
    sv = scale_vector(op, scale, s_vec, r, x.device)
    if base_needs_grad(weight, bias):
        mask = dropout_mask(x2, p, seed)
        u = apply_dropout(x2, mask, p) @ lora_a.to(x.dtype).t()
        y = F.linear(x2, weight, bias) + (u * sv.to(x.dtype)) @ lora_b.to(x.dtype).t()
        return y.reshape(*x.shape[:-1], out_f)
    chosen = dispatch.resolve(backend, op, (x2,), (x2.shape[0], in_f, out_f, r))
    mask = dropout_mask(x2, p, seed)

    def run(b: str) -> Tensor:
        return LoRALinearFn.apply(x2, weight, bias, lora_a, lora_b, sv, mask, p, b)

    y = dispatch.run_with_fallback(op, lambda: run(chosen), lambda: run("composite")) if chosen == "triton" \
        else run(chosen)
    return y.reshape(*x.shape[:-1], out_f)
