"""WeLore: data-agnostic low-rank compression with fine-tunable low-rank components.

Paper: Ajay Jaiswal, Lu Yin, Zhenyu Zhang, Shiwei Liu, Jiawei Zhao, Yuandong Tian, Zhangyang
Wang, "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients",
arXiv 2407.11239 (2024). Reference code: VITA-Group/WeLore.

Per targeted matrix W (m×n, R = min(m, n), singular values σ descending):

    σ̂_i = (σ_i − min σ) / (max σ − min σ)       (flat spectrum: nothing dropped)
    p_W(τ) = #{i : σ̂_i < τ},   k_W = R − p_W      one global threshold τ for all matrices

A matrix becomes a low-rank component (LRC) when factoring saves parameters, ``k(m+n) < mn``
(default ``min_ratio=None``; the reference's rule ``p/R > min_ratio``, e.g. 0.4999, is available),
and is replaced by ``up = U_k √σ_k`` (m×k), ``down = √σ_k V_kᵀ`` (k×n), the best rank-k
approximation (bias kept, unlike the reference). Non-LRCs stay dense, frozen and untouched.
Only the LRC factors train. τ is not read from the reference's hand-tuned tables: it is found by
bisection over the candidate thresholds so that the fraction of the targeted layers' weight
parameters removed, ``Σ_LRC (mn − k(m+n)) / Σ mn``, is nearest to ``ratio`` (or pass
``threshold`` to fix τ). The adapted model therefore equals the *compressed* model, not the base;
``merge_and_unload()`` writes ``up @ down`` into the dense weights and :func:`to_low_rank`
returns a model whose LRCs are real two-factor layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter
from .layers import AdaptedLayer, unwrap
from ..checks import fraction, one_of, optional
from .config import AdapterConfig
from .registry import register
from .targeting import iter_layers, resolve_rank, set_submodule

log = logging.getLogger(__name__)


@dataclass
class WeLoreConfig(AdapterConfig):
    """``ratio``: fraction of the targeted weights' parameters to remove, in (0, 1).
    ``threshold``: an explicit τ in [0, 1] instead (ratio is then ignored). ``min_ratio``: None
    (factor iff it saves parameters) or the reference's cut-off on p/R. ``svd_dtype``:
    ``"float32"`` (reference) or ``"float64"``."""

    ratio: float = 0.3
    threshold: float | None = None
    min_ratio: float | None = None
    svd_dtype: str = "float32"

    def validate(self) -> None:
        super().validate()
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise ValueError(f"WeLore ratio must be a fraction of parameters to remove in (0, 1), got {self.ratio!r}")
        optional(fraction, "threshold (tau)", self.threshold)
        if self.min_ratio is not None and not 0.0 <= self.min_ratio < 1.0:
            raise ValueError(f"min_ratio must be None or in [0, 1), got {self.min_ratio!r}")
        one_of("svd_dtype", self.svd_dtype, ("float32", "float64"))


def layer_svd(name: str, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD of one layer's weight; a ``ValueError`` naming the layer when the weight holds
    NaN or infinite values or the SVD does not converge."""
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"welore: layer {name!r} has {bad} NaN or infinite weight value(s); WeLore factors the "
                         "weight by SVD and needs a finite one (check the model or the checkpoint it came from)")
    try:
        return torch.linalg.svd(weight.to(dtype), full_matrices=False)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"welore: the SVD of layer {name!r}'s weight did not converge ({err}); try "
                         "svd_dtype='float64'") from err


def normalized_spectrum(sigma: Tensor) -> Tensor:
    """Min-max normalised singular values; a flat spectrum maps to all ones (nothing dropped)."""
    lo, hi = sigma.min(), sigma.max()
    if float(hi - lo) <= 0:
        return torch.ones_like(sigma)
    return (sigma - lo) / (hi - lo)


def dropped(norm_sigma: Tensor, tau: float) -> int:
    return int((norm_sigma < tau).sum())


def is_lrc(k: int, rank: int, shape: tuple[int, int], min_ratio: float | None) -> bool:
    m, n = shape
    if min_ratio is None:
        return k * (m + n) < m * n
    return (rank - k) / rank > min_ratio


def plan(spectra: dict[str, Tensor], shapes: dict[str, tuple[int, int]], tau: float,
         min_ratio: float | None) -> dict[str, int]:
    """Kept rank per layer at threshold τ; 0 marks a dense (non-LRC) layer."""
    ranks = {}
    for name, norm in spectra.items():
        rank = norm.shape[0]
        k = rank - dropped(norm, tau)
        ranks[name] = k if is_lrc(k, rank, shapes[name], min_ratio) else 0
    return ranks


def removed_fraction(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> float:
    total = sum(m * n for m, n in shapes.values())
    return sum(m * n - ranks[name] * (m + n) for name, (m, n) in shapes.items() if ranks[name] > 0) / total


def solve_threshold(spectra: dict[str, Tensor], shapes: dict[str, tuple[int, int]], ratio: float,
                    min_ratio: float | None) -> float:
    """Bisection over the sorted candidate thresholds for the removed fraction nearest ``ratio``.

    The removed fraction only changes where τ passes a normalised singular value, so the search
    runs on those values (τ = midpoint between neighbours, robust to the strict ``<``).
    """
    values = torch.unique(torch.cat([s.double() for s in spectra.values()]))
    candidates = [0.0] + [float(v) for v in (values[:-1] + values[1:]) / 2] + [1.0]

    def frac(i: int) -> float:
        return removed_fraction(plan(spectra, shapes, candidates[i], min_ratio), shapes)

    lo, hi = 0, len(candidates) - 1
    if frac(hi) < ratio:
        return candidates[hi]
    while hi - lo > 1:  # kept true by each step: frac(lo) < ratio <= frac(hi) (frac is non-decreasing)
        mid = (lo + hi) // 2
        if frac(mid) < ratio:
            lo = mid
        else:
            hi = mid
    return candidates[lo] if abs(frac(lo) - ratio) <= abs(frac(hi) - ratio) else candidates[hi]


@dataclass
class LowRankPlan:
    k: int
    up: Tensor | None
    down: Tensor | None


@register("welore", WeLoreConfig)
class WeLoreAdapter(Adapter):
    @classmethod
    def prepare(cls, model: nn.Module, targets: dict[str, nn.Module], config: WeLoreConfig) -> dict[str, Any]:
        dtype = torch.float64 if config.svd_dtype == "float64" else torch.float32
        svds = {name: layer_svd(name, unwrap(module).weight.detach(), dtype) for name, module in targets.items()}
        spectra = {name: normalized_spectrum(s) for name, (_, s, _) in svds.items()}
        shapes = {name: tuple(unwrap(m).weight.shape) for name, m in targets.items()}
        tau = config.threshold if config.threshold is not None else solve_threshold(
            spectra, shapes, config.ratio, config.min_ratio)
        ranks = plan(spectra, shapes, tau, config.min_ratio)
        config.rank_pattern = dict(ranks)
        config.threshold = float(tau)
        for row in compression_report(ranks, shapes):
            log.info("WeLore %(layer)s: kept rank %(k)d, parameters removed %(removed)d (%(fraction).3f)", row)
        contexts = {}
        for name, (u, s, vh) in svds.items():
            k = ranks[name]
            root = s[:k].sqrt()
            contexts[name] = LowRankPlan(k, (u[:, :k] * root), (vh[:k] * root.unsqueeze(1))) if k else LowRankPlan(0, None, None)
        return contexts

    @classmethod
    def example_options(cls, model: nn.Module, batches: list[Any]) -> dict[str, Any]:
        return {"ratio": 0.2}

    @classmethod
    def exact_at_init(cls, config: WeLoreConfig) -> bool:
        return False  # the adapted model is the compressed model

    def __init__(self, base: nn.Linear, config: WeLoreConfig, layer_name: str, context: Any, init: bool):
        super().__init__(base, config, layer_name, context, init)
        k = context.k if init else resolve_rank(config.rank_pattern, layer_name, -1)
        if k < 0:
            raise ValueError(f"WeLore checkpoint has no rank for layer {layer_name!r} in rank_pattern")
        self.k, self.shape = k, tuple(base.weight.shape)
        self.rewrites_weight = k > 0
        self._dense: Tensor | None = None
        if k:
            factory = {"device": base.weight.device, "dtype": base.weight.dtype}
            self.up = nn.Parameter(torch.zeros(base.out_features, k, **factory))
            self.down = nn.Parameter(torch.zeros(k, base.in_features, **factory))
            if init:
                with torch.no_grad():
                    self.up.copy_(context.up)
                    self.down.copy_(context.down)

    # ---- forward: an LRC ignores the dense weight; a non-LRC is the untouched base ---------------
    def rewrite_weight(self, weight: Tensor) -> Tensor:
        return self.up @ self.down

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        return y  # non-LRC: dense and frozen

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        if not self.k:
            return None
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype), base.bias)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        if self.k:
            self._dense = base.weight.detach().clone()
            base.weight.copy_((self.up.float() @ self.down.float()).to(base.weight.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if self.k and self._dense is not None:
            base.weight.copy_(self._dense)
            self._dense = None


def compression_report(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Per layer and in total: kept rank and weight parameters removed (0 for dense layers)."""
    rows = []
    for name, (m, n) in shapes.items():
        k = ranks[name]
        removed = m * n - k * (m + n) if k else 0
        rows.append({"layer": name, "k": k, "rank": min(m, n), "params": m * n, "removed": removed,
                     "fraction": removed / (m * n)})
    total = sum(r["params"] for r in rows)
    gone = sum(r["removed"] for r in rows)
    rows.append({"layer": "TOTAL", "k": -1, "rank": -1, "params": total, "removed": gone, "fraction": gone / total})
    return rows


def welore_report(model: nn.Module, adapter_name: str = "default") -> list[dict[str, Any]]:
    """:func:`compression_report` for an adapted model."""
    ranks, shapes = {}, {}
    for layer in model.adapted_layers():
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if isinstance(adapter, WeLoreAdapter):
            ranks[adapter.layer_name], shapes[adapter.layer_name] = adapter.k, adapter.shape
    return compression_report(ranks, shapes)


class LowRankLinear(nn.Module):
    """``y = up(down(x)) + b``: the factored layer of a compressed model."""

    def __init__(self, up: Tensor, down: Tensor, bias: Tensor | None):
        super().__init__()
        self.down = nn.Linear(down.shape[1], down.shape[0], bias=False, device=down.device, dtype=down.dtype)
        self.up = nn.Linear(up.shape[1], up.shape[0], bias=bias is not None, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            self.down.weight.copy_(down)
            self.up.weight.copy_(up)
            if bias is not None:
                self.up.bias.copy_(bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


def to_low_rank(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Unload a WeLore-adapted model into a plain model whose LRCs are :class:`LowRankLinear`."""

    if model.configs.get(adapter_name) is None or model.configs[adapter_name].method != "welore":
        raise ValueError(f"adapter {adapter_name!r} is not a WeLore adapter")
    model.unmerge()
    swaps = {}
    for name, layer in iter_layers(model.base_model):
        if isinstance(layer, AdaptedLayer) and adapter_name in layer.adapters:
            adapter = layer.adapters[adapter_name]
            if adapter.k:
                swaps[name] = LowRankLinear(adapter.up.detach(), adapter.down.detach(), layer.base_layer.bias)
    plain = model.unload()
    for name, module in swaps.items():
        set_submodule(plain, name, module)
    return plain


__all__ = ["LowRankLinear", "WeLoreAdapter", "WeLoreConfig", "compression_report", "solve_threshold",
           "to_low_rank", "welore_report"]
