"""Projection of a weight onto, or out of, a k-dim input subspace (CorDA / KORE null spaces).

With an orthonormal basis ``Q ∈ R^{d×k}`` of the input space (``W ∈ R^{N×d}``)::

    onto(W) = (W Q) Qᵀ        out(W) = W − (W Q) Qᵀ        onto + out = W

Two GEMMs, always in ``compute_dtype`` (fp32 by default): with bf16 operands the rounding of W
(~2⁻⁹‖W‖) would leak into the result at the size of the component being removed.
``out`` is one fused ``addmm`` (β=1, α=−1); w itself is never written. Differentiable in W (it is linear).
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("out", "onto")


def subspace_project(w: Tensor, basis: Tensor, *, mode: str = "out",
                     compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """Project the rows of ``w`` (N, d) onto / out of span(``basis``) (d, k); result in w's dtype."""
    if mode not in MODES:
        raise ValueError(f"subspace_project: mode must be one of {MODES}, got {mode!r}")
    if w.dim() != 2 or basis.dim() != 2 or basis.shape[0] != w.shape[1]:
        raise ValueError(f"subspace_project: w {tuple(w.shape)} and basis {tuple(basis.shape)} do not chain: "
                         "need w (N, d) and basis (d, k)")
    if not compute_dtype.is_floating_point:
        raise TypeError(f"subspace_project: compute_dtype must be floating point, got {compute_dtype}")
    q = basis.to(compute_dtype)
    wc = w.to(compute_dtype)
    t = wc @ q
    if mode == "onto":
        return (t @ q.t()).to(w.dtype)
    return torch.addmm(wc, t, q.t(), alpha=-1.0).to(w.dtype)
