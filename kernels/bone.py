"""Bone / MiSS linear layer (default, "mini" and "bat" forms) with a hand-written backward.

Kang, "Bone: Block-Affine Adaptation of Large Language Models" / "MiSS: Balancing LoRA
Performance and Efficiency with Simple Shard Sharing", arXiv 2409.15371 (PEFT ``MissConfig``).
With ``X̃ = Σ_j pad_r(X_d)[:, j·r:(j+1)·r]`` (M×r; zero padding when ``in % r != 0``) and the
shared block ``D`` (r×out)::

    Y  = X Wᵀ + b + X̃ D
    dD = X̃ᵀ G      V = G Dᵀ (M×r)      dX = G W + mask ⊙ tile_r(V)[:, :in] / (1 − p)

where column k of ``tile_r(V)`` is ``V[:, k mod r]``. This is LoRA with a fixed ``A = [I_r … I_r]``:
the triton backend runs K1 with ``L = X̃`` for Y, K3 for V and dDᵀ in one read of G, and K1 with
the tiled-add epilogue for dX. "mini" tiles ``D = Dm.repeat(1, out/mini_r)`` (autograd sums the
gradient back); "bat" materialises ``W' = W + bat_delta(W, T)`` (composite only: the update depends on W itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lifelong.checks import positive_int  # absolute: see kernels/__init__.py
from . import dispatch
from .common import (apply_dropout, as_grad, autocast_cast, autocast_dtype, base_needs_grad, check_dropout, check_linear,
                     check_shape, dropout_mask, flatten_input, outside_autocast)
from .lora import dy_products, lowrank_forward
from .reference import bat_delta, shard_sum

VARIANTS = ("bone", "mini", "bat")


def tiled_dx(backend: str, g: Tensor, weight: Tensor, v: Tensor, mask: Tensor | None, p: float) -> Tensor:
    """``G W + mask ⊙ tile_r(V)[:, :in]/(1−p)``."""
    if backend == "triton":
        from . import triton_kernels as tk

        return tk.gemm_lowrank(g, weight, tadd=v, mask=mask, mask_scale=1.0 / (1.0 - p))[0]
    in_f, r = weight.shape[1], v.shape[1]
    tiled = v.to(g.dtype).repeat(1, -(-in_f // r))[:, :in_f]
    return g @ weight + apply_dropout(tiled, mask, p)


class BoneLinearFn(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x2, weight, bias, block, r, mask, p, backend):  # type: ignore[override]
        d = block.to(x2.dtype)
        xt = shard_sum(apply_dropout(x2, mask, p), r)
        ones = torch.ones(r, device=x2.device, dtype=torch.float32)
        y = lowrank_forward(backend, x2, weight, bias, xt, d, ones)
        ctx.save_for_backward(weight, d, ones, xt if ctx.needs_input_grad[3] else None,
                              mask if ctx.needs_input_grad[0] else None)
        ctx.p, ctx.backend, ctx.block_dtype = p, backend, block.dtype
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gy):  # type: ignore[override]
        weight, d, ones, xt, mask = ctx.saved_tensors
        need_x, need_d = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        g = gy if gy.stride(-1) == 1 else gy.contiguous()
        v, dd_t = dy_products(ctx.backend, g, d.t() if need_x else None, xt if need_d else None, ones)
        dx = tiled_dx(ctx.backend, g, weight, v, mask, ctx.p) if need_x else None
        dd = as_grad(dd_t.t(), ctx.block_dtype) if need_d else None
        return dx, None, None, dd, None, None, None, None


def bone_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, block: Tensor, *, r: int, variant: str = "bone",
    mini_r: int | None = None, dropout_p: float = 0.0, seed: int | None = None, backend: str | None = None,
) -> Tensor:
    """Bone/MiSS layer output. ``block``: D (r, out) for ``bone``; Dm (r, mini_r) for ``mini``;
    T (out/r, r, r) for ``bat``. Output in x's dtype (the autocast dtype under ``torch.autocast``)."""
    op = "bone_linear"
    amp = autocast_dtype(x)
    if amp is not None:
        x, weight, bias = autocast_cast(amp, x, weight, bias)
        return outside_autocast(x, lambda: bone_linear(x, weight, bias, block, r=r, variant=variant, mini_r=mini_r,
                                                       dropout_p=dropout_p, seed=seed, backend=backend))
    if variant not in VARIANTS:
        raise ValueError(f"{op}: variant must be one of {VARIANTS}, got {variant!r}")
    out_f, in_f = check_linear(op, x, weight, bias)
    positive_int(f"{op}: r", r)
    if r > in_f:
        raise ValueError(f"{op}: r must be <= in_features={in_f}, got {r!r}")
    p = check_dropout(op, dropout_p)
    if variant == "bat":
        return _bat_linear(op, x, weight, bias, block, r, p)
    if variant == "mini":
        mini_r = block.shape[-1] if mini_r is None else mini_r
        check_shape(op, "block", block, (r, mini_r), "(r, mini_r) for variant 'mini'")
        if out_f % mini_r:
            raise ValueError(f"{op}: mini_r={mini_r} must divide out={out_f}")
        block = block.repeat(1, out_f // mini_r)
    check_shape(op, "block", block, (r, out_f), "(r, out) shared by every r-wide input shard")
    x2 = flatten_input(op, x, in_f)
    mask = dropout_mask(x2, p, seed)
    if base_needs_grad(weight, bias):
        xt = shard_sum(apply_dropout(x2, mask, p), r)
        return (F.linear(x2, weight, bias) + xt @ block.to(x.dtype)).reshape(*x.shape[:-1], out_f)
    chosen = dispatch.resolve(backend, op, (x2,), (x2.shape[0], in_f, out_f, r))

    def run(b: str) -> Tensor:
        return BoneLinearFn.apply(x2, weight, bias, block, r, mask, p, b)

    y = dispatch.run_with_fallback(op, lambda: run(chosen), lambda: run("composite")) if chosen == "triton" \
        else run(chosen)
    return y.reshape(*x.shape[:-1], out_f)


def _bat_linear(op: str, x: Tensor, weight: Tensor, bias: Tensor | None, blocks: Tensor, r: int, p: float) -> Tensor:
    out_f, in_f = weight.shape
    if in_f % r or out_f % r:
        raise ValueError(f"{op}: variant 'bat' needs in={in_f} and out={out_f} divisible by r={r}")
    check_shape(op, "block", blocks, (out_f // r, r, r), "(out/r, r, r) for variant 'bat'")
    if p:
        raise ValueError(f"{op}: variant 'bat' rewrites the weight and has no dropout; got dropout_p={p}")
    w = weight + bat_delta(weight, blocks.to(weight.dtype))
    return F.linear(x, w, bias)
