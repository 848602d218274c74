"""CLASSP — Continual Learning through Adjustment Suppression and Sparsity Promotion (optimizer).

Oswaldo Ludwig. *CLASSP: a Biologically-Inspired Approach to Continual Learning through
Adjustment Suppression and Sparsity Promotion.* arXiv 2405.09637 (2024). Reference code:
``oswaldoludwig/CLASSP``.

Per parameter element i, with gradient g_i, learning rate α, threshold τ (absolute, on g²),
ε ≥ 0 and power p > 0:

    m_i = 1[g_i² > τ]
    S_i ← S_i + m_i · |g_i|^p                       (S starts at 0 and is kept for the whole run)
    w_i ← w_i − α · m_i · g_i / (ε + S_i)^{1/p}     (apply_scaling=True)
    w_i ← w_i − α · m_i · g_i                       (apply_scaling=False)

The denominator includes the current gradient (the README's pseudo-code; AdaGrad-style).
``include_current=False`` uses the paper equation's exclusive sum (k ≤ t−1), whose first step is
``α g / ε^{1/p}`` and typically diverges; it is offered for completeness only.

``reference_compat=True`` reproduces the released ``CLASSP.py`` instead: the threshold test is
per tensor, ``bool(any(g² != 0)) > τ`` (true for every τ < 1 once any element is nonzero, never
for τ ≥ 1), and the accumulator sums ``|g|`` whatever p is (its ``** power`` result is discarded).

The accumulator is the method's memory: it persists across tasks, through ``state_dict()`` and
through Avalanche (never pass ``reset_optimizer_state=True``). State is created lazily because
Avalanche may replace ``optimizer.state`` with a fresh dict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["CLASSP"]


class CLASSP(torch.optim.Optimizer):
    """CLASSP optimizer; per-call overrides: ``step(closure, lr=..., threshold=..., ...)``."""

    name = "classp"

    def __init__(self, params: Iterable, lr: float = 0.2, threshold: float = 0.5, eps: float = 1e-5,
                 power: float = 1.0, apply_scaling: bool = True, include_current: bool = True,
                 reference_compat: bool = False):
        _validate(lr=lr, threshold=threshold, eps=eps, power=power)
        defaults = dict(lr=lr, threshold=threshold, eps=eps, power=power, apply_scaling=apply_scaling,
                        include_current=include_current, reference_compat=reference_compat)
        super().__init__(params, defaults)

    def set_mode(self, **options) -> None:
        """Change group options for the following steps (e.g. ``apply_scaling`` at a task boundary)."""
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ValueError(f"CLASSP.set_mode: unknown option(s) {sorted(unknown)}; valid: {sorted(self.defaults)}")
        _validate(**{k: v for k, v in options.items() if k in ("lr", "threshold", "eps", "power")})
        for group in self.param_groups:
            group.update(options)

    @torch.no_grad()
    def step(self, closure: Callable | None = None, **overrides):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(f"CLASSP.step: unknown override(s) {sorted(unknown)}; valid: {sorted(self.defaults)}")
        _validate(**{k: v for k, v in overrides.items() if k in ("lr", "threshold", "eps", "power")})
        for group in self.param_groups:
            opts = {**group, **overrides}
            for p in group["params"]:
                if p.grad is None:
                    continue  # frozen base weights (PEFT) sit in Avalanche's optimizer without grads
                if p.grad.is_sparse:
                    raise RuntimeError("CLASSP does not support sparse gradients")
                self._update(p, opts)
        return loss

    def _update(self, p: torch.Tensor, o: dict) -> None:
        state = self.state[p]
        if "grad_sum" not in state:
            state["grad_sum"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        s = state["grad_sum"]
        g = p.grad if p.grad.dtype == torch.float32 else p.grad.float()  # math in float32 for bf16/fp16
        if o["reference_compat"]:
            if not bool((g * g).any()) > o["threshold"]:
                return
            mask, increment = None, g.abs()
        elif o["threshold"] > 0:
            mask = (g * g > o["threshold"]).to(g.dtype)
            increment = mask * g.abs().pow(o["power"])
        else:
            # τ = 0: an element with g = 0 adds nothing and moves by 0, so no mask is needed
            mask, increment = None, g.abs().pow(o["power"]) if o["power"] != 1.0 else g.abs()
        masked_g = g if mask is None else mask * g
        if not o["apply_scaling"]:
            s.add_(increment)
            p.add_(masked_g.to(p.dtype), alpha=-o["lr"])
            return
        if o["include_current"]:
            s.add_(increment)
            denom = s.add(o["eps"])
        else:
            denom = s.add(o["eps"])
            s.add_(increment)
        if o["power"] != 1.0:
            denom.pow_(1.0 / o["power"])
        update = masked_g / denom
        p.add_(update.to(p.dtype), alpha=-o["lr"])

    def average_grad_sum(self) -> float:
        """Mean of all accumulators (for logging; 0 before the first step)."""
        sums = [st["grad_sum"] for st in self.state.values() if "grad_sum" in st]
        if not sums:
            return 0.0
        total = sum(float(s.sum()) for s in sums)
        return total / sum(s.numel() for s in sums)


def _validate(**values) -> None:
    if "lr" in values and not values["lr"] >= 0:
        raise ValueError(f"CLASSP: lr must be >= 0, got {values['lr']}")
    if "threshold" in values and not values["threshold"] >= 0:
        raise ValueError(f"CLASSP: threshold must be >= 0 (it is absolute, on g²), got {values['threshold']}")
    if "eps" in values and not values["eps"] >= 0:
        raise ValueError(f"CLASSP: eps must be >= 0, got {values['eps']}")
    if "power" in values and not values["power"] > 0:
        raise ValueError(f"CLASSP: power must be > 0, got {values['power']}")
