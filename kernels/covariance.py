"""Streaming input covariance ``C = Σ_t w_t x_t x_tᵀ`` for CorDA / KORE calibration.

CorDA (arXiv 2406.05223) and KORE (arXiv 2510.19316) need the covariance of each adapted layer's
input over a calibration set. ``cov_accumulate_`` adds ``w · X̂ᵀX̂`` (``X̂`` = the rows of X that
``row_mask`` keeps) into an fp32 accumulator, counting tokens and calls on the device so no call
syncs the host; it buffers small calls until ``min_tokens`` rows are waiting, because one update
is memory-bound below ~1 k tokens (too little work per byte of C read and written). ``cov_finalize`` symmetrises
(``triu(C) + triu(C, 1)ᵀ``: the triton kernel updates only the upper-triangle tiles), normalises,
optionally centres (``C/n − μμᵀ``) and checks finiteness once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lifelong.checks import non_negative_int, positive_int  # absolute: see kernels/__init__.py
from . import dispatch

NORMALIZE = ("tokens", "calls", None)


class CovState:
    """Accumulator for one input width ``d``: ``C`` (d×d), ``tokens``/``calls`` (int64, device),
    ``finite`` (bool, device), ``row_sum`` (d, fp32, when ``track_mean``)."""

    def __init__(self, d: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 track_mean: bool = False, min_tokens: int = 2048, backend: str | None = None):
        positive_int("CovState: d", d)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"CovState: dtype must be torch.float32 or torch.float64, got {dtype}")
        non_negative_int("CovState: min_tokens", min_tokens)
        self.d, self.min_tokens, self.backend = d, int(min_tokens), dispatch.check_backend(backend or "auto")
        self.C = torch.zeros(d, d, device=device, dtype=dtype)
        self.tokens = torch.zeros((), device=device, dtype=torch.int64)
        self.calls = torch.zeros((), device=device, dtype=torch.int64)
        self.finite = torch.ones((), device=device, dtype=torch.bool)
        self.row_sum = torch.zeros(d, device=device, dtype=torch.float32) if track_mean else None
        self._buf: Tensor | None = None
        self._buf_mask: Tensor | None = None
        self._filled = 0
        self.weighted = False  # a weighted call makes row_sum's mean inconsistent with C

    @property
    def buffered(self) -> int:
        return self._filled

    def flush(self) -> None:
        """Apply the buffered rows to ``C``."""
        if self._filled:
            n, self._filled = self._filled, 0
            _update(self, self._buf[:n], self._buf_mask[:n], None)

    def _append(self, x2: Tensor, mask: Tensor) -> None:
        m = x2.shape[0]
        if self._buf is None or self._buf.dtype != x2.dtype or self._filled + m > self._buf.shape[0]:
            self.flush()
        if m >= self.min_tokens:
            _update(self, x2, mask, None)
            return
        if self._buf is None or self._buf.dtype != x2.dtype:
            self._buf = torch.empty(self.min_tokens, self.d, device=x2.device, dtype=x2.dtype)
            self._buf_mask = torch.empty(self.min_tokens, device=x2.device, dtype=torch.bool)
        # A copy, not a reference: the caller may reuse or modify its activation tensor.
        self._buf[self._filled:self._filled + m].copy_(x2)
        self._buf_mask[self._filled:self._filled + m].copy_(mask)
        self._filled += m


def _flat(state: CovState, x: Tensor, row_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if x.dim() == 0 or x.shape[-1] != state.d:
        raise ValueError(f"cov_accumulate_: CovState has width d={state.d} but x has shape {tuple(x.shape)} "
                         f"(expected (..., {state.d}))")
    if not x.dtype.is_floating_point:
        raise TypeError(f"cov_accumulate_: x must be floating point, got {x.dtype}")
    x2 = x.reshape(-1, state.d)
    if row_mask is None:
        return x2, torch.ones(x2.shape[0], device=x.device, dtype=torch.bool)
    if tuple(row_mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"cov_accumulate_: row_mask has shape {tuple(row_mask.shape)}, expected x's leading "
                         f"shape {tuple(x.shape[:-1])}")
    return x2, row_mask.reshape(-1).to(device=x.device, dtype=torch.bool)


def _update(state: CovState, x2: Tensor, mask: Tensor, weight: Tensor | None) -> None:
    m, d = x2.shape
    if m == 0:
        return
    chosen = dispatch.resolve(state.backend, "cov_accumulate_", (x2,), (m, d, d, 1))
    if chosen == "triton" and state.C.dtype == torch.float32:
        from . import triton_kernels as tk

        w = weight.to(device=x2.device, dtype=torch.float32).reshape(()) if weight is not None else None
        tk.cov_tri(state.C, x2 if x2.stride(-1) == 1 else x2.contiguous(), row_mask=mask.view(torch.uint8),
                   weight=w, mirror=False)
        return
    # A select, not a product: a dropped padding row may hold NaN, and 0·NaN is NaN.
    xs = torch.where(mask[:, None], x2.to(state.C.dtype), 0.0)
    left = xs
    if weight is not None:
        left = left * weight.to(device=xs.device, dtype=xs.dtype)
    state.C.addmm_(left.t(), xs)


@torch.no_grad()
def cov_accumulate_(state: CovState, x: Tensor, *, row_mask: Tensor | None = None,
                    weight: float | Tensor | None = None) -> None:
    """``C += w · X̂ᵀX̂`` for x of shape (..., d); ``row_mask`` (x's leading shape, bool) drops
    padding rows; ``weight`` (a number or a 0-dim device tensor) scales this call's update."""
    x2, mask = _flat(state, x, row_mask)
    x2 = x2.to(state.C.device)
    mask = mask.to(state.C.device)
    state.calls += 1
    state.tokens += mask.sum()
    state.finite &= (torch.isfinite(x2).all(dim=1) | ~mask).all()
    if state.row_sum is not None:
        state.row_sum += torch.where(mask[:, None], x2.float(), 0.0).sum(0)
    if weight is None:
        state._append(x2, mask)
        return
    state.flush()  # weighted calls are applied at once, after the unweighted rows buffered so far
    state.weighted = True
    _update(state, x2, mask, torch.as_tensor(weight))


@torch.no_grad()
def cov_finalize(state: CovState, *, normalize: str | None = "tokens", center: bool = False) -> Tensor:
    """The symmetric covariance: ``C`` / (tokens | calls | 1), minus ``μμᵀ`` when ``center``."""
    if normalize not in NORMALIZE:
        raise ValueError(f"cov_finalize: normalize must be one of {NORMALIZE}, got {normalize!r}")
    state.flush()
    if not bool(state.finite):
        raise ValueError("cov_finalize: a non-finite value (NaN or inf) was accumulated; check the calibration inputs")
    c = torch.triu(state.C) + torch.triu(state.C, 1).t()
    n = int(state.tokens)
    if center:
        if state.row_sum is None:
            raise ValueError("cov_finalize: center=True needs a CovState created with track_mean=True")
        if normalize == "calls":
            raise ValueError("cov_finalize: center=True needs normalize='tokens' or None")
        if state.weighted:
            raise ValueError("cov_finalize: center=True is undefined after weighted calls (the mean is unweighted)")
        if n == 0:
            raise ValueError("cov_finalize: no tokens were accumulated")
        mean = (state.row_sum / n).to(c.dtype)
        c = c - n * torch.outer(mean, mean)
    if normalize is None:
        return c
    count = n if normalize == "tokens" else int(state.calls)
    if count == 0:
        raise ValueError(f"cov_finalize: no {normalize} were accumulated; cannot normalise")
    return c / count


@torch.no_grad()
def cov_product(x: Tensor, *, out: Tensor | None = None, backend: str | None = None) -> Tensor:
    """``XᵀX`` (full symmetric) for x of shape (tokens, d), in ``out``'s dtype when given (it is
    overwritten: no zeroed accumulator to fill first), else float32 (float64 for float64 x)."""
    d = x.shape[-1]
    if out is None:
        out = torch.empty(d, d, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype, device=x.device)
    if out.dim() != 2 or tuple(out.shape) != (d, d):
        raise ValueError(f"cov_product: out {tuple(out.shape)} and x {tuple(x.shape)} do not chain: need out (d, d)")
    x2 = x.reshape(-1, d)
    chosen = dispatch.resolve(backend, "cov_update_", (x2,), (x2.shape[0], d, d, 1))
    if chosen == "triton" and out.dtype == torch.float32 and out.stride(-1) == 1:
        return cov_update_(out.zero_(), x2, backend="triton")
    xc = x2.to(out.dtype)
    return torch.mm(xc.t(), xc, out=out)


@torch.no_grad()
def cov_update_(cov: Tensor, x: Tensor, *, backend: str | None = None) -> Tensor:
    """In place ``C += XᵀX`` (full symmetric C, C's dtype) for x of shape (tokens, d); returns C."""
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1] or x.shape[-1] != cov.shape[0]:
        raise ValueError(f"cov_update_: C {tuple(cov.shape)} and x {tuple(x.shape)} do not chain: need C (d, d) "
                         "and x (..., d)")
    x2 = x.reshape(-1, cov.shape[0])
    chosen = dispatch.resolve(backend, "cov_update_", (x2,), (x2.shape[0], cov.shape[0], cov.shape[0], 1))
    if chosen == "triton" and cov.dtype == torch.float32 and cov.stride(-1) == 1:
        from . import triton_kernels as tk

        return tk.cov_tri(cov, x2 if x2.stride(-1) == 1 else x2.contiguous(), mirror=True)
    xc = x2.to(cov.dtype)
    return cov.addmm_(xc.t(), xc)
