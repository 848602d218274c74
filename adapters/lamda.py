"""LaMDA / LaMDA++: spectrally decomposed low-dimensional adaptation.

Paper: Seyedarmin Azizi, Souvik Kundu, Massoud Pedram, "LaMDA: Large Model Fine-Tuning via
Spectrally Decomposed Low-Dimensional Adaptation", Findings of EMNLP 2024, arXiv 2406.12832.
Reference code: ArminAzizi98/LaMDA.

    y = W_res x + b + α · B S A x,      ΔW = α B S A,     α = lora_alpha / r (or /√r, rsLoRA)

A (r×in, "PMA") is frozen, S (r×r, "LDA") always trains, B (out×r, "PMB") trains early and is
frozen column by column. Because A is frozen the backward pass never needs x itself.

Choices that are ours (the released code does not pin them):

- ``init="svd"`` (default): ``W = U Σ Vᵀ``; ``A = V_rᵀ``, ``B = U_r``, ``S = Σ_r / α`` and the
  frozen base becomes ``W_res = W − U_r Σ_r V_rᵀ``, so the layer equals the base at init.
  ``init="lora"`` follows the code's ``--lora_init`` path (A kaiming, B zeros, S kaiming).
- ``pmb_schedule="linear"``: with ``T_f = round(pmb_freeze_fraction · total_steps)``, column j
  (descending σ) is frozen from optimizer step ``ceil((j+1)·T_f/r)``; freezing is hard (the
  forward uses a snapshot of frozen columns, so momentum or weight decay cannot move them) and at
  ``T_f`` B leaves the optimizer (in a multi-process DDP / accelerate run it stays there,
  unread and with zero gradients, so the gradient reducer keeps a fixed parameter set).
  ``"reference"`` reproduces the code's rule after each micro-batch backward (``t = floor(step / (η·max_steps·grad_accum))``; zero the first t columns'
  gradients; freeze B once t ≥ r); ``"none"`` trains B throughout; ``"frozen"`` never trains B.
  Drive the schedule with :meth:`AdaptedModel.after_backward` and
  :meth:`AdaptedModel.after_optimizer_step` (or ``adapters.callbacks.AdapterScheduleCallback``
  with the Hugging Face Trainer).
- LaMDA++ (``adaptive_rank=True``): per-layer ranks from the normalised spectrum ``p_i = σ_i²/Σσ²``;
  ``energy_deficit`` gives layer l a share of the budget ``L·r`` proportional to ``1 − Σ_{i≤r} p_i``
  (flatter spectrum, more rank), ``energy_share`` proportional to ``Σ_{i≤r} p_i``. Unverified
  against the paper, whose rule is not public.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..kernels import lamda_linear
from .base import Adapter, full_tensor, local_tensor
from ..checks import fraction, one_of, optional, positive_int
from .config import AdapterConfig, check_alpha_pattern, check_dropout, lora_scaling
from .layers import unwrap
from .registry import register
from .targeting import resolve_rank

SCHEDULES = ("linear", "reference", "none", "frozen")
RANK_RULES = ("energy_deficit", "energy_share")


@dataclass
class LaMDAConfig(AdapterConfig):
    """See the module docstring. ``total_steps`` (optimizer steps) is required by the ``linear``
    and ``reference`` schedules; ``grad_accum`` only by ``reference``."""

    r: int = 16
    lora_alpha: float = 16.0
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    dropout: float = 0.0
    init: str = "svd"
    pmb_schedule: str = "linear"
    pmb_freeze_fraction: float = 0.3
    total_steps: int | None = None
    grad_accum: int = 1
    adaptive_rank: bool = False
    rank_rule: str = "energy_deficit"
    r_min: int = 1
    r_max: int | None = None

    def validate(self) -> None:
        super().validate()
        positive_int("r", self.r)
        check_alpha_pattern(self.alpha_pattern)
        positive_int("r_min", self.r_min)
        positive_int("grad_accum", self.grad_accum)
        one_of("init", self.init, ("svd", "lora"))
        one_of("pmb_schedule", self.pmb_schedule, SCHEDULES)
        one_of("rank_rule", self.rank_rule, RANK_RULES)
        fraction("pmb_freeze_fraction", self.pmb_freeze_fraction, open_low=True)
        optional(positive_int, "total_steps", self.total_steps)
        optional(positive_int, "r_max", self.r_max)
        if self.r_max is not None and self.r_max < self.r_min:
            raise ValueError(f"r_max={self.r_max} is below r_min={self.r_min}")
        check_dropout(self.dropout)

    def scaling(self, r: int, layer_name: str = "") -> float:
        """The layer's LoRA scale, with ``alpha_pattern`` overriding ``lora_alpha`` per layer (PEFT's)."""
        alpha = resolve_rank(self.alpha_pattern, layer_name, self.lora_alpha) if layer_name else self.lora_alpha
        return lora_scaling(alpha, r, self.use_rslora)


def allocate_ranks(
    spectra: dict[str, Tensor], r: int, rule: str | Callable[[Tensor, int], float], r_min: int, r_max: int,
    caps: dict[str, int],
) -> dict[str, int]:
    """LaMDA++: split the budget ``len(spectra)·r`` over layers by their normalised spectra.

    ``rule`` maps (singular values, mean rank) to a non-negative score; ranks are proportional to
    the scores, clipped to ``[r_min, min(r_max, cap)]``, and rounding is repaired so the total
    equals the budget whenever the bounds allow it.
    """
    score_fn = RULES[rule] if isinstance(rule, str) else rule
    names = list(spectra)
    scores = torch.tensor([float(score_fn(spectra[n], r)) for n in names], dtype=torch.float64)
    if scores.sum() <= 0:
        scores = torch.ones_like(scores)
    budget = r * len(names)
    ideal = budget * scores / scores.sum()
    upper = {n: min(r_max, caps[n]) for n in names}
    ranks = {n: int(min(max(round(float(v)), r_min), upper[n])) for n, v in zip(names, ideal)}
    order = sorted(range(len(names)), key=lambda i: float(ideal[i] - ranks[names[i]]), reverse=True)
    while sum(ranks.values()) != budget:
        step = 1 if sum(ranks.values()) < budget else -1
        movable = [names[i] for i in (order if step > 0 else order[::-1])
                   if r_min <= ranks[names[i]] + step <= upper[names[i]]]
        if not movable:
            break
        ranks[movable[0]] += step
    return ranks


def _energy_captured(sigma: Tensor, r: int) -> float:
    p = sigma.double() ** 2
    return float(p[:r].sum() / p.sum())


RULES: dict[str, Callable[[Tensor, int], float]] = {
    "energy_deficit": lambda sigma, r: 1.0 - _energy_captured(sigma, r),
    "energy_share": _energy_captured,
}


@register("lamda", LaMDAConfig)
class LaMDAAdapter(Adapter):
    @classmethod
    def prepare(cls, model: nn.Module, targets: dict[str, nn.Module], config: LaMDAConfig) -> dict[str, Any]:
        if config.pmb_schedule in ("linear", "reference") and config.total_steps is None:
            warnings.warn(
                f"LaMDA pmb_schedule={config.pmb_schedule!r} needs total_steps (the run's optimizer steps) to freeze B; "
                "the first after_backward() will raise without it. Pass total_steps=..., train with "
                "lifelong.adapters.callbacks.AdapterTrainer / AdapterScheduleCallback (they set it from the Trainer's "
                "max_steps), or use pmb_schedule='none'",
                stacklevel=4,
            )
        if not config.adaptive_rank:
            return {}
        layers = {n: unwrap(m) for n, m in targets.items()}
        spectra = {n: torch.linalg.svdvals(layer.weight.detach().float()) for n, layer in layers.items()}
        caps = {n: min(layer.weight.shape) for n, layer in layers.items()}
        r_max = config.r_max if config.r_max is not None else 4 * config.r
        config.rank_pattern = allocate_ranks(spectra, config.r, config.rank_rule, config.r_min, r_max, caps)
        return {}

    @classmethod
    def exact_at_init(cls, config: LaMDAConfig) -> bool:
        return True  # the SVD residual reproduces W up to float round-off

    def __init__(self, base: nn.Linear, config: LaMDAConfig, layer_name: str, context: Any, init: bool):
        super().__init__(base, config, layer_name, context, init)
        out_f, in_f = base.out_features, base.in_features
        r = resolve_rank(config.rank_pattern, layer_name, config.r)
        positive_int(f"r for {layer_name!r}", r)
        if r > min(in_f, out_f):
            raise ValueError(f"r={r} exceeds min(in, out)={min(in_f, out_f)} of layer {layer_name!r}")
        self.r, self.scale = r, config.scaling(r, layer_name)
        self.schedule = config.pmb_schedule
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer("lora_A", torch.zeros(r, in_f, **factory))
        self.lora_S = nn.Parameter(torch.zeros(r, r, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, **factory))
        # Hard PMB freezing: frozen columns of B are read from this snapshot (see module docstring).
        self.register_buffer("B_frozen", torch.zeros(out_f, r, **factory))
        self.register_buffer("frozen_columns", torch.zeros(r, dtype=torch.bool, device=base.weight.device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if init:
            self._initialise(base.weight.detach(), config)

    @torch.no_grad()
    def _initialise(self, weight: Tensor, config: LaMDAConfig) -> None:
        if config.init == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_S, a=math.sqrt(5))
            return
        u, sigma, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        u, sigma, vh = u[:, : self.r], sigma[: self.r], vh[: self.r]
        self.lora_A.copy_(vh)
        self.lora_B.copy_(u)
        self.lora_S.copy_(torch.diag(sigma) / self.scale)
        self.set_residual(u * sigma, vh)

    # ---- forward / merge -----------------------------------------------------------------------
    def effective_B(self) -> Tensor:
        if not bool(self.frozen_columns.any()):
            return self.lora_B
        return torch.where(self.frozen_columns, self.B_frozen, self.lora_B)

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        a = self.lora_A.to(x.dtype)
        u = self.dropout(x) @ a.T
        return y + (self.scale * (u @ self.lora_S.T.to(x.dtype)) @ self.effective_B().T.to(x.dtype)).to(y.dtype)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        if self.training and isinstance(self.dropout, nn.Dropout):
            return None
        return lamda_linear(x, base.weight, base.bias, self.lora_A, self.lora_S, self.effective_B(), self.scale)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return self.scale * self.effective_B().float() @ self.lora_S.float() @ self.lora_A.float()

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        """S folded into B: ``(A, B·S, s)``; frozen PMB columns of B enter as frozen."""
        b = self.effective_B().detach().float() @ self.lora_S.detach().float()
        return self.lora_A.detach(), b.to(self.lora_A.dtype), float(self.scale)

    @torch.no_grad()
    def set_lora_factors(self, a: Tensor, b: Tensor) -> None:
        """``A = a``, ``S = I / s``, ``B = b``: no column of B frozen yet."""
        self.lora_A.copy_(a)
        self.lora_S.copy_(torch.eye(self.r, device=self.lora_S.device) / self.scale)
        self.lora_B.copy_(b)
        self.frozen_columns.fill_(False)
        self.B_frozen.zero_()

    # ---- trainability and the PMB schedule ------------------------------------------------------
    def set_trainable(self, trainable: bool) -> None:
        self.lora_S.requires_grad_(trainable)
        released = bool(self.frozen_columns.all()) and not distributed()
        self.lora_B.requires_grad_(trainable and self.schedule != "frozen" and not released)

    def release_B(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Every column of B is frozen: stop training B. In a multi-process run (DDP, accelerate)
        B keeps ``requires_grad`` and stays in the optimizer instead: each process's gradient
        reducer was built for a fixed set of parameters, and a parameter that stops receiving
        gradients mid-run breaks its next step. B is then no longer read (the forward uses the
        frozen snapshot), so it only receives zero gradients."""
        self.frozen_columns.fill_(True)
        if distributed():
            return
        self.lora_B.requires_grad_(False)
        self.lora_B.grad = None
        if optimizer is not None:
            drop_from_optimizer(optimizer, self.lora_B)

    def after_backward(self) -> None:
        """``reference`` schedule: the released code's rule after each micro-batch backward. Both
        schedules check ``total_steps`` here, so a run without it stops before its first step."""
        cfg = self.config
        if self.schedule in ("linear", "reference") and cfg.total_steps is None:
            raise ValueError(f"pmb_schedule={self.schedule!r} needs total_steps (the run's optimizer steps)")
        if self.schedule != "reference" or not self.lora_B.requires_grad or bool(self.frozen_columns.all()):
            return
        self.steps += 1
        t = math.floor(int(self.steps) / (cfg.pmb_freeze_fraction * cfg.total_steps * cfg.grad_accum))
        if t >= self.r:
            with torch.no_grad():
                self.B_frozen.copy_(full_tensor(self.lora_B))
            self.release_B(None)
        elif t > 0 and self.lora_B.grad is not None:
            local_tensor(self.lora_B.grad)[:, :t] = 0  # FSDP2 shards rows: every shard has all columns

    @torch.no_grad()
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """``linear`` schedule: freeze the columns due at this optimizer step."""
        if self.schedule != "linear" or bool(self.frozen_columns.all()):
            return
        cfg = self.config
        if cfg.total_steps is None:
            raise ValueError("pmb_schedule='linear' needs total_steps (the run's optimizer steps)")
        self.steps += 1
        due = frozen_column_count(int(self.steps), self.r, round(cfg.pmb_freeze_fraction * cfg.total_steps))
        newly = torch.zeros_like(self.frozen_columns)
        newly[:due] = True
        newly &= ~self.frozen_columns
        self.B_frozen[:, newly] = full_tensor(self.lora_B)[:, newly]  # gathered when FSDP2 shards B
        self.frozen_columns |= newly
        if due >= self.r:
            self.release_B(optimizer)


def distributed() -> bool:
    """Whether this process is one of several in a torch.distributed run."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def frozen_column_count(step: int, r: int, t_freeze: int) -> int:
    """Columns frozen at optimizer step ``step``: ``#{j : ceil((j+1)·T_f / r) <= step}``."""
    if t_freeze <= 0:
        return r
    return sum(1 for j in range(r) if math.ceil((j + 1) * t_freeze / r) <= step)


def drop_from_optimizer(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> None:
    """Remove ``param`` from every parameter group and free its optimizer state."""
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if p is not param]
    optimizer.state.pop(param, None)
