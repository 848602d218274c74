"""KORE (constraint half): null-space adapter initialisation from old-knowledge covariance.

Paper: Kailin Jiang, Hongbo Jiang, Ning Jiang, Zhi Gao, Jinhe Bi, Yuchen Ren, Bin Li, Yuntao Du,
Lei Liu, Qing Li, "KORE: Enhancing Knowledge Injection for Large Multimodal Models via
Knowledge-Oriented Augmentations and Constraints", arXiv 2510.19316 (2025). Reference code:
KORE-LMM/KORE (``lora_null/``, forked from LoRA-Null, arXiv 2503.02659).

With C the input covariance of a layer on the knowledge to keep (:mod:`.calibration`), eigenvalues
ascending ``λ_1 ≤ … ≤ λ_in`` and eigenvectors Q:

    Q_n = Q[:, :r]                 the r least-excited input directions ("null space")
    W Q_n = U' S' Rᵀ               (thin SVD, never forming the in×in projector P = Q_n Q_nᵀ)
    B = U' √S',  A = √S' (Q_n R)ᵀ  so  B A = W P
    W_res = W − B A = W (I − P)    frozen; the layer equals the base at init

Only B trains by default (``train="B"``, the reference LLaVA recipe), so every update
``ΔW = ΔB·A`` has its rows in span(Q_n) and ``‖ΔW C‖ ≤ ‖ΔB‖ ‖A‖ λ_max(selected)``: old-knowledge
activations are (almost) untouched. ``train="AB"`` (LoRA-Null v1) and ``"A"`` (the reference's
Qwen path) lose that guarantee and warn. ``init="zero_b"`` starts from ``A = Q_nᵀ, B = 0``.
Scaling is 1 (the reference has no alpha). The eigendecomposition runs in float64 (``eigh``,
equivalent to the reference's SVD of the PSD C up to the basis inside degenerate eigenspaces).

Per layer we log the token count against in-features (fewer tokens than inputs gives an exact but
data-poor null space) and the eigenvalue mass the chosen space holds, and warn when
``λ_max(selected)/λ_max`` exceeds ``null_tol``: the "null space" is then far from null.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .calibration import COV_DTYPES
from ..checks import one_of, positive_int, positive_number
from .config import AdapterConfig, check_dropout
from .corda import LowRankResidualAdapter, check_rank, layer_weight
from .registry import register
from .targeting import resolve_rank

log = logging.getLogger(__name__)

INITS = ("project_weight", "zero_b")
TRAIN = ("B", "AB", "A")


@dataclass
class KoreConfig(AdapterConfig):
    """``r``: null-space dimension (adapter rank). ``calibration``: batches of the knowledge to
    keep, a :class:`CovarianceStats` or a saved file (runtime only; share one with CorDA-KPM).
    ``parity``: PEFT/reference per-call ``|max|`` normalisation (else plain ``XᵀX``)."""

    r: int = 8
    init: str = "project_weight"
    train: str = "B"
    dropout: float = 0.0
    parity: bool = True
    cov_dtype: str = "float32"
    null_tol: float = 1e-2
    progress: bool = True
    calibration: Any = None

    def validate(self) -> None:
        super().validate()
        positive_int("r", self.r)
        one_of("init", self.init, INITS)
        one_of("train", self.train, TRAIN)
        one_of("cov_dtype", self.cov_dtype, tuple(COV_DTYPES))
        check_dropout(self.dropout)
        positive_number("null_tol", self.null_tol)
        if self.train != "B":
            warnings.warn(
                f"KORE train={self.train!r}: the down-projection A trains, so updates can leave the null space "
                f"of the old knowledge (only train='B' keeps the guarantee)",
                stacklevel=3,
            )

    @property
    def normalize(self) -> str:
        return "max" if self.parity else "none"


@dataclass
class NullSpace:
    """The selected basis of one layer and the numbers reported about it."""

    basis: Tensor  # in × r, orthonormal columns, eigenvectors of the r smallest eigenvalues
    tokens: int
    in_features: int
    mass: float  # Σ selected λ / Σ λ
    ratio: float  # λ_max(selected) / λ_max
    down: Tensor | None = None  # A = √S' (Q_n R)ᵀ, r × in (float64)
    up: Tensor | None = None  # B = U' √S', out × r (float64)

    def factorise(self, weight: Tensor) -> "NullSpace":
        """``W Q_n = U' S' Rᵀ`` → B, A with ``B A = W Q_n Q_nᵀ`` (no in×in projector)."""
        u, s, rt = torch.linalg.svd(weight.double() @ self.basis, full_matrices=False)
        root = s.sqrt()
        self.up = u * root
        self.down = (self.basis @ rt.T * root).T
        return self


def null_space(cov: Tensor, r: int, tokens: int, layer_name: str, tol: float) -> NullSpace:
    """Eigenvectors of the r smallest eigenvalues of C (float64) and how null they are."""
    lam, q = torch.linalg.eigh(cov.double())  # ascending
    lam = lam.clamp_min(0)
    top = float(lam[-1])
    if top <= 0:
        raise ValueError(f"covariance of layer {layer_name!r} is zero: the layer saw only zero inputs")
    ns = NullSpace(q[:, :r].contiguous(), tokens, cov.shape[0], float(lam[:r].sum() / lam.sum()), float(lam[r - 1]) / top)
    log.info(
        "KORE %s: %d tokens / %d in-features, null-space eigenvalue mass %.3g, lambda_max(sel)/lambda_max %.3g",
        layer_name, tokens, ns.in_features, ns.mass, ns.ratio,
    )
    if ns.ratio > tol:
        warnings.warn(
            f"KORE layer {layer_name!r}: the chosen {r}-dim null space is far from null "
            f"(lambda_max(selected)/lambda_max = {ns.ratio:.3g} > null_tol={tol}); lower r or calibrate on "
            f"data that does not excite every input direction",
            stacklevel=2,
        )
    return ns


@register("kore", KoreConfig)
class KoreAdapter(LowRankResidualAdapter):
    @classmethod
    def prepare(cls, model: nn.Module, targets: dict[str, nn.Module], config: KoreConfig) -> dict[str, Any]:
        stats = cls.calibrated_statistics(model, targets, config)
        return {
            name: null_space(
                stats.covariance(name), resolve_rank(config.rank_pattern, name, config.r), stats.tokens[name], name,
                config.null_tol,
            ).factorise(layer_weight(module))
            for name, module in targets.items()
        }

    @classmethod
    def example_options(cls, model: nn.Module, batches: list[Any]) -> dict[str, Any]:
        return {"calibration": list(batches), "progress": False, "null_tol": 1.0}

    def __init__(self, base: nn.Linear, config: KoreConfig, layer_name: str, context: Any, init: bool):
        super().__init__(base, config, layer_name, context, init)
        r = resolve_rank(config.rank_pattern, layer_name, config.r)
        check_rank(layer_name, r, base.weight)
        self._build(base, r, 1.0, config.dropout)
        self.train_mode = config.train
        self.report: NullSpace | None = None
        if init:
            if not isinstance(context, NullSpace):
                raise ValueError(f"KORE layer {layer_name!r} has no null space; pass calibration=...")
            self.report = context
            self._initialise(context, config.init)

    @torch.no_grad()
    def _initialise(self, ns: NullSpace, init: str) -> None:
        if init == "zero_b":
            self.lora_A.copy_(ns.basis.T)
            return
        self.lora_A.copy_(ns.down)
        self.lora_B.copy_(ns.up)
        self.set_residual(ns.up.to(self.lora_B.dtype), ns.down.to(self.lora_A.dtype))

    def set_trainable(self, trainable: bool) -> None:
        self.lora_B.requires_grad_(trainable and "B" in self.train_mode)
        self.lora_A.requires_grad_(trainable and "A" in self.train_mode)


def null_space_report(model: nn.Module, adapter_name: str = "default") -> list[dict[str, Any]]:
    """Per-layer table: tokens, in-features, eigenvalue mass and ratio of the chosen null space."""
    rows = []
    for layer in model.adapted_layers():
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if isinstance(adapter, KoreAdapter) and adapter.report is not None:
            ns = adapter.report
            rows.append({"layer": adapter.layer_name, "tokens": ns.tokens, "in_features": ns.in_features,
                         "r": adapter.r, "null_mass": ns.mass, "lambda_ratio": ns.ratio})
    return rows


def null_space_leakage(delta: Tensor, cov: Tensor) -> float:
    """``‖ΔW C‖_F / (‖ΔW‖_F ‖C‖_2)``: how much a weight update moves old-knowledge activations."""
    return float((delta.double() @ cov.double()).norm() / (delta.double().norm() * torch.linalg.matrix_norm(cov.double(), 2)))


__all__ = ["KoreAdapter", "KoreConfig", "NullSpace", "null_space", "null_space_leakage", "null_space_report"]
