"""CorDA: context-oriented decomposition adaptation.

Paper: Yibo Yang, Xiaojie Li, Zhongzhu Zhou, Shuaiwen Leon Song, Jianlong Wu, Liqiang Nie,
Bernard Ghanem, "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for
Task-Aware Parameter-Efficient Fine-tuning", NeurIPS 2024, arXiv 2406.05223. Reference code:
iboing/CorDA and PEFT (``init_lora_weights="corda"``); ours matches PEFT numerically.

With the layer's input covariance C (see :mod:`.calibration`), damped until its inverse is good,

    C_d = C + damp · mean(diag C) · I,   ‖C_d C_d⁻¹ − I‖_F < inv_tol   (damp = 0.01, doubled)
    U S Vhᵀ = svd(W C_d),   V̂ = (Vh C_d⁻¹)ᵀ,   so W = U diag(S) V̂ᵀ
    IPM: the r largest components,  KPM: the r smallest
    A = diag(√(S_r/s)) V̂_rᵀ,  B = U_r diag(√(S_r/s)),  W_res = W − s·B A

with ``s = lora_alpha / r`` (or ``/√r`` with rsLoRA). The residual is taken from the original W,
so the adapted layer equals the base layer at init; A and B train, W_res stays frozen.
``parity=True`` (default) collects C with PEFT's per-call ``|max|`` normalisation; ``False``
uses the plain token-averaged ``XᵀX`` (CorDA's products do not change with C's overall scale,
but they do with the per-sequence weighting).

Precision (ours): PEFT runs the inverse and the SVD in float32. For KPM that is not enough on
real models: the r smallest singular values of ``W C_d`` sit near float32's rounding floor. On
MiniLM (128 × 128 calibration tokens) s·B·A of the worst layer is 2.1e-1 (relative Frobenius)
away from the float64 decomposition of the same data, for PEFT and for us alike, while the
float32 covariance is within 3e-5 of the float64 one (``benchmarks/calibration_speed.py``).
``svd_dtype="float64"`` decomposes in float64 (1.2e-4 there); the default ``"float32"`` keeps
PEFT's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import lora_linear
from .base import Adapter
from .calibration import COV_DTYPES, CovarianceStats, resolve_statistics
from ..checks import one_of, positive_int, positive_number
from .config import AdapterConfig, check_alpha_pattern, check_dropout, lora_scaling
from .layers import unwrap
from .registry import register
from .targeting import resolve_rank

MODES = ("ipm", "kpm")


@dataclass
class CordaConfig(AdapterConfig):
    """``mode``: ``"ipm"`` (largest r components, covariance of the task) or ``"kpm"`` (smallest
    r, covariance of the knowledge to keep). ``calibration``: an iterable of batches, a
    :class:`CovarianceStats` or the path of a saved one (runtime only). Damping follows PEFT:
    start ``damp_init``, multiply by ``damp_growth`` until the inverse error is below ``inv_tol``,
    at most ``max_doublings`` times. ``svd_dtype``: precision of the inverse and SVD (float32 as
    PEFT, or float64; see the module docstring)."""

    r: int = 8
    lora_alpha: float = 8.0
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    mode: str = "ipm"
    dropout: float = 0.0
    parity: bool = True
    cov_dtype: str = "float32"
    damp_init: float = 0.01
    damp_growth: float = 2.0
    inv_tol: float = 0.05
    max_doublings: int = 30
    svd_dtype: str = "float32"
    progress: bool = True
    calibration: Any = None

    def validate(self) -> None:
        super().validate()
        positive_int("r", self.r)
        check_alpha_pattern(self.alpha_pattern)
        positive_int("max_doublings", self.max_doublings)
        one_of("mode", self.mode, MODES)
        one_of("cov_dtype", self.cov_dtype, tuple(COV_DTYPES))
        one_of("svd_dtype", self.svd_dtype, tuple(COV_DTYPES))
        positive_number("lora_alpha", self.lora_alpha)
        positive_number("damp_init", self.damp_init)
        positive_number("inv_tol", self.inv_tol)
        positive_number("damp_growth", self.damp_growth)
        if not self.damp_growth > 1:
            raise ValueError(f"damp_growth must be > 1, got {self.damp_growth!r}")
        check_dropout(self.dropout)

    @property
    def normalize(self) -> str:
        return "max" if self.parity else "none"

    def scaling(self, r: int, layer_name: str = "") -> float:
        """The layer's LoRA scale, with ``alpha_pattern`` overriding ``lora_alpha`` per layer (PEFT's)."""
        alpha = resolve_rank(self.alpha_pattern, layer_name, self.lora_alpha) if layer_name else self.lora_alpha
        return lora_scaling(alpha, r, self.use_rslora)


@dataclass
class Decomposition:
    """Selected components of one layer: ``W ≈ U diag(S) Vᵀ`` restricted to the chosen r."""

    U: Tensor  # out × r
    S: Tensor  # r
    V: Tensor  # in × r (V̂, not orthonormal)
    damp: float


def damped_inverse(cov: Tensor, config: CordaConfig, layer_name: str) -> tuple[Tensor, Tensor, float]:
    """PEFT's damping loop: returns ``(C_d, C_d⁻¹, damp)`` or raises with the final damping."""
    # torch.diag (a contiguous copy) and the vector form of the damping term reproduce PEFT's
    # rounding exactly; a strided diagonal sums in another order and the inverse amplifies that.
    mean_diag = torch.mean(torch.diag(cov))
    if not bool(mean_diag > 0):
        raise ValueError(f"covariance of layer {layer_name!r} is zero: the layer saw only zero inputs")
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    ones = torch.ones(cov.shape[0], dtype=cov.dtype, device=cov.device)
    damp = config.damp_init
    for _ in range(config.max_doublings + 1):
        fixed = cov + torch.diag(ones * mean_diag * damp)
        inv = torch.linalg.inv(fixed)
        err = float(torch.dist(fixed @ inv, eye))
        if err < config.inv_tol:
            return fixed, inv, damp
        damp *= config.damp_growth
    raise ValueError(
        f"CorDA damping did not converge for layer {layer_name!r}: inverse error {err:.3g} >= inv_tol="
        f"{config.inv_tol} after {config.max_doublings} doublings (final damp={damp / config.damp_growth:.3g}); "
        f"raise max_doublings or inv_tol, or calibrate with more varied data"
    )


def decompose(weight: Tensor, cov: Tensor, r: int, config: CordaConfig, layer_name: str) -> Decomposition:
    """Context-oriented SVD of one layer and selection of r components (``config.svd_dtype``)."""
    dtype = COV_DTYPES[config.svd_dtype]
    fixed, inv, damp = damped_inverse(cov.to(dtype), config, layer_name)
    u, s, vh = torch.linalg.svd(weight.to(dtype) @ fixed, full_matrices=False)
    v = (vh @ inv).T
    idx = slice(0, r) if config.mode == "ipm" else slice(s.shape[0] - r, s.shape[0])
    picked = (u[:, idx], s[idx], v[:, idx])
    return Decomposition(*(t.float().contiguous() for t in picked), damp)


def check_rank(layer_name: str, r: int, weight: Tensor) -> None:
    positive_int(f"r for {layer_name!r}", r)
    if r > min(weight.shape):
        raise ValueError(f"r={r} exceeds min(in, out)={min(weight.shape)} of layer {layer_name!r}")


def layer_weight(module: nn.Module) -> Tensor:
    """The layer's original weight: an adapted layer's base plus the residuals its adapters took out."""
    base = unwrap(module)
    weight = base.weight.detach()
    adapters = getattr(module, "adapters", {})
    taken = [a for name, a in adapters.items() if a.has_residual and name not in getattr(module, "merged", [])]
    if not taken:
        return weight
    return weight.float() + sum(a.residual_weight(torch.float32) for a in taken)


class LowRankResidualAdapter(Adapter):
    """A LoRA-shaped adapter ``y = W_res x + b + s·B A x`` whose init leaves ``W − s·B₀A₀`` in the base.

    Shared by CorDA and KORE; subclasses fill ``lora_A``/``lora_B`` and call ``set_residual``.
    """

    def _build(self, base: nn.Linear, r: int, scale: float, dropout: float) -> None:
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.r, self.scale = r, scale
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        u = self.dropout(x) @ self.lora_A.T.to(x.dtype)
        return y + (self.scale * (u @ self.lora_B.T.to(x.dtype))).to(y.dtype)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        if self.training and isinstance(self.dropout, nn.Dropout):
            return None
        return lora_linear(x, base.weight, base.bias, self.lora_A.to(x.dtype), self.lora_B.to(x.dtype), self.scale)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_A.detach(), self.lora_B.detach(), float(self.scale)

    @torch.no_grad()
    def set_lora_factors(self, a: Tensor, b: Tensor) -> None:
        self.lora_A.copy_(a)
        self.lora_B.copy_(b.float() / self.scale)

    @staticmethod
    def calibrated_statistics(model: nn.Module, targets: dict[str, nn.Module], config: Any) -> CovarianceStats:
        """Check every layer's rank, then calibrate (or reuse given statistics): both happen
        before any weight of the model changes."""
        for name, module in targets.items():
            check_rank(name, resolve_rank(config.rank_pattern, name, config.r), layer_weight(module))
        return resolve_statistics(
            config.calibration, model, targets, normalize=config.normalize, cov_dtype=config.cov_dtype,
            progress=config.progress,
        )


@register("corda", CordaConfig)
class CordaAdapter(LowRankResidualAdapter):
    @classmethod
    def prepare(cls, model: nn.Module, targets: dict[str, nn.Module], config: CordaConfig) -> dict[str, Any]:
        stats = cls.calibrated_statistics(model, targets, config)
        return {
            name: decompose(
                layer_weight(module), stats.covariance(name), resolve_rank(config.rank_pattern, name, config.r),
                config, name,
            )
            for name, module in targets.items()
        }

    @classmethod
    def example_options(cls, model: nn.Module, batches: list[Any]) -> dict[str, Any]:
        return {"calibration": list(batches), "progress": False}

    def __init__(self, base: nn.Linear, config: CordaConfig, layer_name: str, context: Any, init: bool):
        super().__init__(base, config, layer_name, context, init)
        r = resolve_rank(config.rank_pattern, layer_name, config.r)
        check_rank(layer_name, r, base.weight)
        self._build(base, r, config.scaling(r, layer_name), config.dropout)
        if init:
            if not isinstance(context, Decomposition):
                raise ValueError(f"CorDA layer {layer_name!r} has no decomposition; pass calibration=...")
            self._initialise(context)

    @torch.no_grad()
    def _initialise(self, dec: Decomposition) -> None:
        root = (dec.S / self.scale).sqrt()
        a = dec.V.T * root.unsqueeze(1)
        b = dec.U * root
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.damp = dec.damp
        self.set_residual((self.scale * b).to(self.lora_B.dtype), a.to(self.lora_A.dtype))


__all__ = ["CordaAdapter", "CordaConfig", "CovarianceStats", "Decomposition", "decompose", "damped_inverse"]
