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
            opts = {**group, **overrides} if overrides else group
            # frozen base weights (PEFT) sit in Avalanche's optimizer without grads
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("CLASSP does not support sparse gradients")
            for same_kind in _by_device_and_dtype(params):
                self._update(same_kind, opts)
        return loss

    def _update(self, params: list[torch.Tensor], o: dict) -> None:
        """One step for tensors on one device with one dtype.

        Small tensors go through a few multi-tensor (foreach) calls at once: on small models the
        per-call overhead, not the arithmetic, is the cost. Large tensors go one at a time, with
        at most two temporaries alive: fresh multi-megabyte temporaries cost page faults that are
        several times the arithmetic.
        """
        if o["reference_compat"]:
            params = [p for p in params if bool((p.grad * p.grad).any()) > o["threshold"]]
        small = [p for p in params if p.numel() < _BATCH_BELOW]
        for chunk in ([small] if small else []) + [[p] for p in params if p.numel() >= _BATCH_BELOW]:
            self._update_tensors(chunk, o)

    def _update_tensors(self, params: list[torch.Tensor], o: dict) -> None:
        sums = [self._grad_sum(p) for p in params]
        grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in params]  # fp32 math
        if o["threshold"] > 0 and not o["reference_compat"]:
            # 1[g² > τ] as sign(max(g² − τ, 0)): g² − τ is 0 exactly when g² = τ
            mask = torch._foreach_mul(grads, grads)
            torch._foreach_sub_(mask, o["threshold"])
            torch._foreach_clamp_min_(mask, 0.0)
            torch._foreach_sign_(mask)
            grads = torch._foreach_mul(grads, mask)
            del mask
        increment = torch._foreach_abs(grads)  # |m·g| = m·|g| for a 0/1 mask
        if o["power"] != 1.0 and not o["reference_compat"]:  # the released code adds |g| whatever p is
            torch._foreach_pow_(increment, o["power"])
        if not o["apply_scaling"]:
            torch._foreach_add_(sums, increment)
            _apply(params, grads, None, o["lr"])
            return
        if o["include_current"]:
            torch._foreach_add_(sums, increment)
            del increment  # freed before the denominator is allocated, so its memory is reused
            denom = torch._foreach_add(sums, o["eps"])
        else:
            denom = torch._foreach_add(sums, o["eps"])
            torch._foreach_add_(sums, increment)
            del increment
        if o["power"] != 1.0:
            torch._foreach_pow_(denom, 1.0 / o["power"])
        _apply(params, grads, denom, o["lr"])

    def _grad_sum(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "grad_sum" not in state:
            state["grad_sum"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return state["grad_sum"]

    def average_grad_sum(self) -> float:
        """Mean of all accumulators (for logging; 0 before the first step)."""
        sums = [st["grad_sum"] for st in self.state.values() if "grad_sum" in st]
        if not sums:
            return 0.0
        total = sum(float(s.sum()) for s in sums)
        return total / sum(s.numel() for s in sums)


_BATCH_BELOW = 1 << 16  # elements; larger tensors are updated one at a time (see CLASSP._update)


def _by_device_and_dtype(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    return list(groups.values())


def _apply(params: list[torch.Tensor], grads: list[torch.Tensor], denom: list[torch.Tensor] | None,
           lr: float) -> None:
    """``w ← w − lr · g / denom`` (``denom`` None: plain SGD); float32 math, cast to w's dtype."""
    if params[0].dtype == torch.float32:
        if denom is None:
            torch._foreach_add_(params, grads, alpha=-lr)
        else:
            torch._foreach_addcdiv_(params, grads, denom, value=-lr)
        return
    updates = grads if denom is None else torch._foreach_div(grads, denom)
    torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(updates, params)], alpha=-lr)


def _validate(**values) -> None:
    if "lr" in values and not values["lr"] >= 0:
        raise ValueError(f"CLASSP: lr must be >= 0, got {values['lr']}")
    if "threshold" in values and not values["threshold"] >= 0:
        raise ValueError(f"CLASSP: threshold must be >= 0 (it is absolute, on g²), got {values['threshold']}")
    if "eps" in values and not values["eps"] >= 0:
        raise ValueError(f"CLASSP: eps must be >= 0, got {values['eps']}")
    if "power" in values and not values["power"] > 0:
        raise ValueError(f"CLASSP: power must be > 0, got {values['power']}")
