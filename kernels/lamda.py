"""LaMDA linear layer with a hand-written backward that never needs x.

Azizi, Kundu, Pedram, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional
Adaptation", arXiv 2406.12832. With ``U = X_d Aᵀ`` (A frozen), ``V = U Sᵀ`` and scale ``s``::

    Y  = X Wᵀ + b + s · V Bᵀ          (run as the LoRA kernel with B_eff = B S)
    dV = s · G B      dB = s · Gᵀ V      dS = dVᵀ U      dU = dV S
    dX = G W + mask ⊙ (dU A) / (1 − p)

Because A is frozen only ``U`` (M×r) is saved, which is LaMDA's activation-memory saving; ``X_d``
is kept only if A is made trainable. The triton backend reuses the LoRA kernels (K1 forward and
dX, K3 for dV and dB in one read of G).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .common import (apply_dropout, as_grad, autocast_cast, autocast_dtype, base_needs_grad, check_dropout, check_linear,
                     check_shape, dropout_mask, flatten_input, outside_autocast, scale_vector)
from .lora import dy_products, lowrank_dx, lowrank_forward


class LaMDALinearFn(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x2, weight, bias, lora_a, lora_s, lora_b, sv, mask, p, backend):  # type: ignore[override]
        dtype = x2.dtype
        a, s, b = lora_a.to(dtype), lora_s.to(dtype), lora_b.to(dtype)
        xd = apply_dropout(x2, mask, p)
        u = xd @ a.t()
        y = lowrank_forward(backend, x2, weight, bias, u, (b @ s).t(), sv)
        need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        ctx.save_for_backward(weight, a, s, b, sv, u, xd if need_a else None, mask if need_x else None)
        ctx.p, ctx.backend = p, backend
        ctx.param_dtypes = (lora_a.dtype, lora_s.dtype, lora_b.dtype)
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gy):  # type: ignore[override]
        weight, a, s, b, sv, u, xd, mask = ctx.saved_tensors
        need_x, _, _, need_a, need_s, need_b = ctx.needs_input_grad[:6]
        g = gy if gy.stride(-1) == 1 else gy.contiguous()
        need_dv = need_x or need_a or need_s
        v = u @ s.t() if need_b else None
        dv, db = dy_products(ctx.backend, g, b if need_dv else None, v, sv)
        ds = (dv.t() @ u.to(dv.dtype)) if need_s else None
        du = dv @ s.to(dv.dtype) if (need_x or need_a) else None
        dx = lowrank_dx(ctx.backend, g, weight, du, a, mask, ctx.p) if need_x else None
        da = du.to(g.dtype).t() @ xd if need_a else None
        la, ls, lb = ctx.param_dtypes
        return dx, None, None, as_grad(da, la), as_grad(ds, ls), as_grad(db, lb), None, None, None, None


def lamda_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_s: Tensor, lora_b: Tensor,
    scale: float | Tensor, *, dropout_p: float = 0.0, seed: int | None = None, backend: str | None = None,
) -> Tensor:
    """``y = x Wᵀ + b + scale · ((dropout(x) Aᵀ) Sᵀ) Bᵀ``; A: (r, in), S: (r, r), B: (out, r).
    Under ``torch.autocast`` x, W and b are cast to the autocast dtype first, as for ``F.linear``."""
    op = "lamda_linear"
    amp = autocast_dtype(x)
    if amp is not None:
        x, weight, bias = autocast_cast(amp, x, weight, bias)
        return outside_autocast(x, lambda: lamda_linear(x, weight, bias, lora_a, lora_s, lora_b, scale,
                                                        dropout_p=dropout_p, seed=seed, backend=backend))
    out_f, in_f = check_linear(op, x, weight, bias)
    if lora_a.dim() != 2 or lora_a.shape[1] != in_f:
        raise ValueError(f"{op}: lora_a has shape {tuple(lora_a.shape)}, expected (r, {in_f}) to chain with "
                         f"weight {tuple(weight.shape)}")
    r = lora_a.shape[0]
    check_shape(op, "lora_s", lora_s, (r, r), f"(r, r) for lora_a {tuple(lora_a.shape)}")
    check_shape(op, "lora_b", lora_b, (out_f, r), f"(out, r) to chain with lora_a {tuple(lora_a.shape)}")
    p = check_dropout(op, dropout_p)
    x2 = flatten_input(op, x, in_f)
    sv = scale_vector(op, scale, None, r, x.device)
    mask = dropout_mask(x2, p, seed)
    if base_needs_grad(weight, bias):
        dt = x.dtype
        u = apply_dropout(x2, mask, p) @ lora_a.to(dt).t()
        y = F.linear(x2, weight, bias) + ((u @ lora_s.to(dt).t()) * sv.to(dt)) @ lora_b.to(dt).t()
        return y.reshape(*x.shape[:-1], out_f)
    chosen = dispatch.resolve(backend, op, (x2,), (x2.shape[0], in_f, out_f, r))

    def run(b: str) -> Tensor:
        return LaMDALinearFn.apply(x2, weight, bias, lora_a, lora_s, lora_b, sv, mask, p, b)

    y = dispatch.run_with_fallback(op, lambda: run(chosen), lambda: run("composite")) if chosen == "triton" \
        else run(chosen)
    return y.reshape(*x.shape[:-1], out_f)
