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
from dataclasses import dataclass

import torch

from ..hooks import ContinualMethod, MethodConfig
from ..registry import ALL_MODES, register_method

__all__ = ["CLASSP", "ClasspConfig", "ClasspMethod"]


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
        self._plans: dict[int, _Plan] = {}
        self._buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

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
        for index, group in enumerate(self.param_groups):
            opts = {**group, **overrides} if overrides else group
            # frozen base weights (PEFT) sit in Avalanche's optimizer without grads
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("CLASSP does not support sparse gradients")
            if opts["reference_compat"]:  # its per-tensor test decides which tensors move at all
                for p in params:
                    if bool((p.grad * p.grad).any()) > opts["threshold"]:
                        self._update_one(p, opts)
                continue
            plan = self._plan(index, params)
            for flat in plan.flats:
                flat.step(opts)
            for p in plan.alone:
                self._update_one(p, opts)
        return loss

    def _plan(self, group: int, params: list[torch.Tensor]) -> "_Plan":
        """How this group's tensors are updated; rebuilt when the tensors with gradients change or
        ``self.state`` was replaced (``load_state_dict``, Avalanche), so the sums always live in it."""
        ids = tuple(map(id, params))
        plan = self._plans.get(group)
        if plan is None or plan.ids != ids or plan.state is not self.state:
            small = [p for p in params if p.numel() < _FLAT_BELOW]
            flats = [_Flat(same, self.state) for same in _by_device_and_dtype(small)]
            plan = self._plans[group] = _Plan(ids, self.state, flats, [p for p in params if p.numel() >= _FLAT_BELOW])
        return plan

    def _update_one(self, p: torch.Tensor, o: dict) -> None:
        s, grad = self._grad_sum(p), p.grad
        if p.is_contiguous() and grad.is_contiguous() and s.is_contiguous():
            pieces = zip(*(t.view(-1).split(_CHUNK) for t in (p, grad, s)))
        else:
            pieces = [(p, grad, s)]
        for p_piece, g_piece, s_piece in pieces:
            masked, denom = self._scratch(p_piece)
            g, denom = _rule(s_piece, g_piece.float(), o, masked, denom)
            if denom is None:
                p_piece.add_(g, alpha=-o["lr"])
            elif p.dtype == torch.float32:
                p_piece.addcdiv_(g, denom, value=-o["lr"])
            else:
                p_piece.add_(torch.div(g, denom, out=denom), alpha=-o["lr"])

    def _scratch(self, piece: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two float32 work tensors shaped like ``piece``, from two buffers per device that grow to
        the largest piece: fresh temporaries of megabytes cost page faults on every step (measured
        on MiniLM: 3.5x the arithmetic of the rule)."""
        n = piece.numel()
        buffers = self._buffers.get(piece.device)
        if buffers is None or buffers[0].numel() < n:
            buffers = self._buffers[piece.device] = tuple(
                torch.empty(n, device=piece.device, dtype=torch.float32) for _ in range(2))
        if buffers[0].numel() == n and piece.dim() == 1:
            return buffers  # a full piece: no view calls
        return tuple(b[:n].view(piece.shape) for b in buffers)

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


_FLAT_BELOW = 1 << 16  # elements: smaller tensors share one flat accumulator (_Flat)
# Larger tensors are updated in pieces of this many elements, so the scratch space is two pieces
# (8 MB) rather than two copies of the largest tensor (MiniLM's embedding: 94 MB), at a handful of
# extra calls per piece.
_CHUNK = 1 << 20


class _Flat:
    """Small tensors of one device and dtype updated as one flat float32 vector: on small models
    the number of calls, not the arithmetic, is the cost, so the rule runs once for all of them.

    ``state[p]["grad_sum"]`` of each tensor is a view of one flat accumulator (values copied in
    from any loaded state); gradients are gathered into, and updates scattered from, one flat
    work buffer through views made once.
    """

    def __init__(self, params: list[torch.Tensor], state: dict):
        self.params = params
        sizes = [p.numel() for p in params]
        self.sums = torch.cat([state[p]["grad_sum"].reshape(-1).float() if "grad_sum" in state[p]
                               else p.new_zeros(p.numel(), dtype=torch.float32) for p in params])
        for p, view in zip(params, self.sums.split(sizes)):
            state[p]["grad_sum"] = view.view_as(p)
        self.work, self.masked, self.denom = (torch.empty_like(self.sums) for _ in range(3))
        # per-tensor views of each buffer, keyed by the buffer: the rule returns the masked
        # gradient in ``masked`` when a threshold applies, in ``work`` otherwise
        self.views = {id(buf): [view.view_as(p) for p, view in zip(params, buf.split(sizes))]
                      for buf in (self.work, self.masked, self.denom)}

    def step(self, o: dict) -> None:
        torch._foreach_copy_(self.views[id(self.work)], [p.grad for p in self.params])
        g, denom = _rule(self.sums, self.work, o, self.masked, self.denom)
        if denom is None:
            torch._foreach_add_(self.params, self.views[id(g)], alpha=-o["lr"])
            return
        if denom is not self.denom:  # include_current=False computes it in a fresh tensor
            self.denom.copy_(denom)
        torch._foreach_addcdiv_(self.params, self.views[id(g)], self.views[id(self.denom)], value=-o["lr"])


@dataclass
class _Plan:
    ids: tuple[int, ...]
    state: dict
    flats: list[_Flat]
    alone: list[torch.Tensor]


def _rule(s: torch.Tensor, g: torch.Tensor, o: dict, masked: torch.Tensor, work: torch.Tensor,
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-element rule on one float32 tensor: adds this step's increment to ``s`` in place and
    returns the masked gradient and the denominator ``(ε + S)^{1/p}`` (None without scaling).

    ``masked`` and ``work`` are scratch tensors shaped like ``g`` (not ``g`` itself) that receive
    the masked gradient and the increment, then the denominator: no temporaries are allocated
    (but for ``include_current=False``, which needs the old sum and the increment at once)."""
    if o["threshold"] > 0 and not o["reference_compat"]:
        torch.mul(g, g, out=masked).gt_(o["threshold"]).mul_(g)  # 1[g² > τ] · g
        g = masked
    increment = torch.abs(g, out=work)  # |m·g| = m·|g| for a 0/1 mask
    if o["power"] != 1.0 and not o["reference_compat"]:  # the released code adds |g| whatever p is
        increment.pow_(o["power"])
    if not o["apply_scaling"]:
        s.add_(increment)
        return g, None
    if o["include_current"]:
        s.add_(increment)
        denom = torch.add(s, o["eps"], out=work)
    else:
        denom = s.add(o["eps"])
        s.add_(increment)
    if o["power"] != 1.0:
        denom.pow_(1.0 / o["power"])
    return g, denom


def _by_device_and_dtype(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    return list(groups.values())


def _validate(**values) -> None:
    if "lr" in values and not values["lr"] >= 0:
        raise ValueError(f"CLASSP: lr must be >= 0, got {values['lr']}")
    if "threshold" in values and not values["threshold"] >= 0:
        raise ValueError(f"CLASSP: threshold must be >= 0 (it is absolute, on g²), got {values['threshold']}")
    if "eps" in values and not values["eps"] >= 0:
        raise ValueError(f"CLASSP: eps must be >= 0, got {values['eps']}")
    if "power" in values and not values["power"] > 0:
        raise ValueError(f"CLASSP: power must be > 0, got {values['power']}")


@dataclass
class ClasspConfig(MethodConfig):
    """CLASSP's settings (see :class:`CLASSP`); ``lr`` None uses the run's learning rate (CLASSP's
    step size differs in scale from Adam's, so it is usually set here)."""

    lr: float | None = None
    threshold: float = 0.5
    eps: float = 1e-5
    power: float = 1.0
    apply_scaling: bool = True
    include_current: bool = True
    reference_compat: bool = False

    def validate(self) -> None:
        _validate(threshold=self.threshold, eps=self.eps, power=self.power,
                  **({} if self.lr is None else {"lr": self.lr}))
        for name in ("apply_scaling", "include_current", "reference_compat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CLASSP: {name} must be true or false, got {getattr(self, name)!r}")


@register_method("classp", adapter_modes=ALL_MODES)
class ClasspMethod(ContinualMethod):
    """CLASSP as a continual method: it only supplies the optimizer.

    The accumulated squared gradients are the method's memory, so the engines keep one optimizer
    across experiences (never reset its state between tasks)."""

    Config = ClasspConfig

    def make_optimizer(self, params: list, lr: float) -> CLASSP:
        options = self.settings()
        own_lr = options.pop("lr")
        return CLASSP(params, lr=lr if own_lr is None else own_lr, **options)
