"""MIGU — MagnItude-based Gradient Updating (framework-free core).

Wenyu Du, Shuang Cheng, Tongxu Luo, Zihan Qiu, Zeyu Huang, Ka Chun Cheung, Reynold Cheng, Jie Fu.
*Unlocking Continual Learning Abilities in Language Models.* Findings of EMNLP 2024
(arXiv 2406.17245). Reference code: ``wenyudu/MIGU``.

For every targeted linear layer with torch weight ``W ∈ R^{d_out×d_in}`` the forward hooks
accumulate, over every training forward since the last optimizer step,

    m_j = Σ_n |H_{n,j}|                     (normalize="none", the reference)
    m_j = Σ_n |H_{n,j}| / Σ_j' |H_{n,j'}|   (normalize="token", the paper's wording)

with ``H`` the layer output (bias included) flattened to ``(N, d_out)``. After ``backward()``
the ``t = ⌊T·d_out⌋`` rows with the smallest ``m_j`` get their gradient zeroed (``T`` =
``mask_ratio`` = fraction MASKED; ties broken by a stable descending sort, lower index kept):

    grad(W)[j, :] ← 1[j ∈ top_{d_out - t}(m)] · grad(W)[j, :]

Adapter-wrapped layers (any module with a ``base_layer`` — PEFT LoRA layers and lifelong's
``AdaptedLayer``): the frozen base has nothing to mask; an adapter ``nn.Linear`` whose output size
is the wrapped layer's ``d_out`` ("up" factor, e.g. ``lora_B``) is masked with the magnitudes of
the FULL wrapped-layer output; any other adapter ``nn.Linear`` ("down" factor, e.g. ``lora_A``)
with its own output (paper §3.3). Adapters that hold raw 2-D parameters (lifelong's CorDA/KORE/
LaMDA ``lora_A (r, d_in)``/``lora_B (d_out, r)``): a parameter with ``d_out`` rows is an up factor
(full output); one with ``d_in`` columns is a down factor whose own output ``x Pᵀ`` is recomputed
from the wrapped layer's input (without the adapter's dropout). Other adapter tensors (LaMDA's
``lora_S``, Bone blocks, SSF scales) cannot be attributed to output units and are left unmasked
(listed in ``MIGU.unmasked``).

Call order per optimizer step: forwards → ``backward()`` → ``mask_gradients()`` → (clip) →
``optimizer.step()`` → ``after_step()``. Under several processes (``torchrun``) the magnitudes are
summed over the processes before the mask is chosen, so every replica masks the same rows (those
of the global batch).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...checks import fraction, non_negative_int, one_of
from ..distributed import all_reduce_sum
from ..hooks import Context, ContinualMethod, MethodConfig
from ..registry import ALL_MODES, register_method

__all__ = ["MIGU", "migu_mask", "match_modules"]

_NORMALIZE = ("none", "token")


def dropped_rows(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` smallest entries of each row of ``magnitudes`` (rows, d): a stable
    descending sort, so among equal magnitudes the lower index is kept."""
    d = magnitudes.shape[1]
    return torch.argsort(magnitudes, dim=1, descending=True, stable=True)[:, d - count:]


def keep_mask(d_out: int, dropped: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Boolean mask over ``d_out`` rows, False at the ``dropped`` indices (None: keep all)."""
    mask = torch.ones(d_out, dtype=torch.bool, device=device)
    if dropped is not None:
        mask[dropped] = False
    return mask


def migu_mask(magnitudes: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Boolean keep-mask: the ``d_out - ⌊T·d_out⌋`` largest magnitudes (stable; lower index wins ties)."""
    d = magnitudes.numel()
    return keep_mask(d, dropped_rows(magnitudes.reshape(1, d), int(mask_ratio * d))[0], magnitudes.device)


def match_modules(model: nn.Module, target_modules) -> list[tuple[str, nn.Module]]:
    """Modules selected like PEFT: ``"all-linear"``, a regex (full match) or a list of name suffixes."""
    if target_modules == "all-linear":  # the root counts too: a bare nn.Linear is its own target ""
        return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    named = [(n, m) for n, m in model.named_modules() if n]
    if isinstance(target_modules, str):
        return [(n, m) for n, m in named if re.fullmatch(target_modules, n)]
    if isinstance(target_modules, (list, tuple, set)):
        suffixes = list(target_modules)
        return [(n, m) for n, m in named if any(n == s or n.endswith("." + s) for s in suffixes)]
    raise TypeError(f"target_modules must be 'all-linear', a regex string or a list of name suffixes, "
                    f"got {type(target_modules).__name__}")


@dataclass
class _Target:
    name: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    source: nn.Module  # module whose forward gives the magnitudes
    from_input: bool = False  # raw "down" factor P: magnitudes of x Pᵀ from the wrapper's input

    @property
    def key(self) -> int:
        return id(self.weight) if self.from_input else id(self.source)


@dataclass
class _WidthGroup:
    """The accumulators of one output width (and device at attach time): one float32 row per key,
    allocated on first use and again if the model moves."""
    width: int
    keys: list[int]
    buffer: torch.Tensor | None = None


def _width_groups(targets: list[_Target]) -> list[_WidthGroup]:
    groups: dict[tuple, _WidthGroup] = {}
    for t in targets:
        width = t.weight.shape[0] if t.from_input else _out_features(t.source)
        group = groups.setdefault((width, t.weight.device), _WidthGroup(width, []))
        if t.key not in group.keys:
            group.keys.append(t.key)
    return list(groups.values())


def _is_wrapper(module: nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def _out_features(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    inner = getattr(layer, "base_layer", None)
    if inner is not None:
        return _out_features(inner)
    raise TypeError(f"MIGU handles nn.Linear layers only, got {type(layer).__name__} "
                    "(GPT-2 Conv1D stores (in, out) weights and is not supported)")


def _tied_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


@dataclass
class MIGUConfig(MethodConfig):
    """MIGU's settings.

    Args:
        mask_ratio: T, the fraction of output units whose gradient is masked, in [0, 1].
        normalize: ``"none"`` (reference: plain |output| sums) or ``"token"`` (L1-normalise per token).
        start_task: 0-based index of the first experience that is masked (reference: 1, task 0 is
            plain fine-tuning); used by :meth:`before_experience`.
        mask_bias: also mask bias entries of masked rows (reference: False).
        target_modules: ``"all-linear"`` (every ``nn.Linear``, tied LM heads skipped), a regex or suffixes.
        freeze_masked_updates: restore masked rows after the optimizer step (so momentum/weight decay
            cannot move them); the reference does not (False).
    """

    mask_ratio: float = 0.7
    normalize: str = "none"
    start_task: int = 1
    mask_bias: bool = False
    target_modules: Any = "all-linear"
    freeze_masked_updates: bool = False

    def validate(self) -> None:
        fraction("mask_ratio", self.mask_ratio)
        one_of("normalize", self.normalize, _NORMALIZE)
        non_negative_int("start_task", self.start_task)


@register_method("migu", adapter_modes=ALL_MODES)
class MIGU(ContinualMethod):
    """Gradient masking by output magnitude; attach to a model, call the three step hooks.

    Options are the fields of :class:`MIGUConfig` (or pass one as ``config``).
    """

    Config = MIGUConfig

    def __init__(self, config: MIGUConfig | None = None, **options):
        self.configure(config, options)
        self.targets: list[_Target] = []
        self.unmasked: list[str] = []
        self._groups: list[_WidthGroup] = []
        self._rows: dict[int, torch.Tensor] = {}  # accumulator key -> its row in a group buffer
        self._seen: set[int] = set()  # keys with magnitudes from this step's forwards
        self._handles: list = []
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # -- configuration -------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _collect(self, model: nn.Module) -> list[_Target]:
        tied = _tied_weights(model)
        wrappers = [(n, m) for n, m in model.named_modules() if _is_wrapper(m)]
        inside_wrapper = {id(sub) for _, w in wrappers for sub in w.modules() if sub is not w}
        targets: list[_Target] = []
        done: set[int] = set()
        for name, module in match_modules(model, self.target_modules):
            if _is_wrapper(module):
                targets += self._adapter_targets(name, module)
                done.add(id(module))
            elif id(module) in inside_wrapper:
                continue  # adapter factors / frozen base inside a wrapper: handled with the wrapper
            elif isinstance(module, nn.Linear):
                if id(module.weight) in tied:
                    warnings.warn(f"MIGU: skipping {name}: its weight is tied to an nn.Embedding "
                                  "(masking its rows would mask embedding rows)", stacklevel=3)
                elif module.weight.requires_grad:
                    targets.append(_Target(name, module.weight, module.bias, module))
            elif self.target_modules != "all-linear":
                raise TypeError(f"MIGU: target {name!r} is a {type(module).__name__}; only nn.Linear layers "
                                "and adapter-wrapped linears are supported")
        # Adapter wrappers are not nn.Linear themselves: "all-linear" covers every one of them.
        if self.target_modules == "all-linear":
            for name, wrapper in wrappers:
                if id(wrapper) not in done:
                    targets += self._adapter_targets(name, wrapper)
        return targets

    def _adapter_targets(self, name: str, wrapper: nn.Module) -> list[_Target]:
        d_out = _out_features(wrapper.base_layer)
        base_params = {id(p) for p in wrapper.base_layer.parameters()}
        targets, covered = [], set()
        for sub_name, sub in wrapper.named_modules():
            if sub is wrapper or sub is wrapper.base_layer or not isinstance(sub, nn.Linear):
                continue
            if not sub.weight.requires_grad or id(sub.weight) in base_params:
                continue
            source = wrapper if sub.out_features == d_out else sub
            targets.append(_Target(f"{name}.{sub_name}", sub.weight, sub.bias, source))
            covered.update({id(sub.weight), id(sub.bias)})
        d_in = getattr(wrapper.base_layer, "in_features", None)
        for p_name, p in wrapper.named_parameters():
            if id(p) in covered or id(p) in base_params or not p.requires_grad:
                continue
            leaf = p_name.rsplit(".", 1)[-1].lower()
            up = p.dim() == 2 and p.shape[0] == d_out and not ("lora_a" in leaf or "down" in leaf)
            down = p.dim() == 2 and p.shape[1] == d_in and not up
            if up or down:
                targets.append(_Target(f"{name}.{p_name}", p, None, wrapper, from_input=down))
            else:
                self.unmasked.append(f"{name}.{p_name}")
        return targets

    # -- hooks -----------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "MIGU":
        """Install forward hooks on every source module; idempotent per model."""
        if self.attached:
            self.detach()
        self.unmasked = []
        self.targets = self._collect(model)
        if not self.targets:
            extra = (f"; these adapter tensors cannot be attributed to output units: {self.unmasked}"
                     if self.unmasked else "")
            raise ValueError(f"MIGU: no trainable linear layer matches target_modules={self.target_modules!r}{extra}")
        self._groups = _width_groups(self.targets)
        self._rows = {}
        self._seen = set()
        sources: dict[int, tuple[nn.Module, list[_Target]]] = {}
        for t in self.targets:
            sources.setdefault(id(t.source), (t.source, []))[1].append(t)
        for module, group in sources.values():
            down = [t for t in group if t.from_input]
            own = any(not t.from_input for t in group)
            self._handles.append(module.register_forward_hook(self._make_hook(id(module), own, down)))
        return self

    def _row(self, key: int, device: torch.device) -> torch.Tensor:
        """The float32 accumulator of ``key``: a row of its width group's buffer, so that one sort
        per width ranks every layer of that width without stacking."""
        row = self._rows.get(key)
        if row is None or row.device != device:
            group = next(g for g in self._groups if key in g.keys)
            group.buffer = torch.zeros(len(group.keys), group.width, device=device)
            self._rows.update(zip(group.keys, group.buffer))
            self._seen.difference_update(group.keys)
            row = self._rows[key]
        return row

    def _add(self, key: int, h: torch.Tensor) -> None:
        """Add one forward's |output| column sums to ``key``'s row (called under ``no_grad``)."""
        row = self._row(key, h.device)
        if h.shape[-1] != row.numel():
            raise RuntimeError(f"MIGU: a hooked layer produced {h.shape[-1]} output features, expected "
                               f"{row.numel()} (the layer's out_features)")
        h = h.abs()  # exact in any dtype; the sum accumulates in float32 so fp16 outputs cannot overflow
        if self.normalize == "token":
            h = h / h.sum(dim=-1, keepdim=True, dtype=torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
        if h.dim() == 1:  # an unbatched forward
            h = h.unsqueeze(0)
        dims = tuple(range(h.dim() - 1))
        if key in self._seen:
            row.add_(h.sum(dim=dims, dtype=torch.float32))
        else:  # the first forward of a step overwrites last step's values: no zeroing pass
            torch.sum(h, dim=dims, dtype=torch.float32, out=row)
            self._seen.add(key)

    def _make_hook(self, key: int, own: bool, down: list[_Target]):
        def hook(module, inputs, output):
            # Evaluation forwards and no_grad generation must not pollute the magnitudes.
            if not (module.training and torch.is_grad_enabled()):
                return
            with torch.no_grad():  # cheaper than a detach() call per output
                if own:
                    self._add(key, output[0] if isinstance(output, tuple) else output)
                for t in down:  # raw down factor: its own output x Pᵀ (dropout not applied here)
                    self._add(t.key, torch.nn.functional.linear(inputs[0].to(t.weight.dtype), t.weight))
        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._rows = {}
        self._seen = set()

    def magnitudes(self) -> dict[str, torch.Tensor]:
        """Accumulated magnitude vector per target name (for inspection and tests)."""
        return {t.name: self._rows[t.key].clone() for t in self.targets if t.key in self._seen}

    def _dropped_rows(self) -> dict[int, torch.Tensor]:
        """Indices of the ``⌊T·d_out⌋`` smallest magnitudes per accumulator key seen this step:
        one sort per output width (a transformer has a handful of widths but dozens of layers, and
        per-call overhead, not FLOPs, is what this costs on small models)."""
        dropped = {}
        for g in self._groups:
            masked = int(self.mask_ratio * g.width)
            if masked == 0 or g.buffer is None:
                continue
            all_reduce_sum(g.buffer)  # several processes: the magnitudes of the whole global batch
            keys = [k for k in g.keys if k in self._seen]
            if not keys:
                continue
            mags = g.buffer if len(keys) == len(g.keys) else torch.stack([self._rows[k] for k in keys])
            dropped.update(zip(keys, dropped_rows(mags, masked)))
        return dropped

    def masks(self) -> dict[str, torch.Tensor]:
        """Keep-masks per target from the magnitudes accumulated so far (valid until ``after_step``)."""
        dropped = self._dropped_rows()
        return {t.name: keep_mask(self._rows[t.key].numel(), dropped.get(t.key), self._rows[t.key].device)
                for t in self.targets if t.key in self._seen}

    def mask_gradients(self) -> None:
        """Zero the gradient rows outside the top-k; call after backward, before clipping/step.

        :meth:`masks` tells which rows were kept, until :meth:`after_step` resets the magnitudes.
        """
        self._saved = []
        if not self.attached:
            return
        dropped = self._dropped_rows()
        for t in self.targets:
            rows = dropped.get(t.key)
            if rows is None or t.weight.grad is None:
                continue
            # a fill, not a multiply by a 0/1 mask: a masked inf/NaN gradient row becomes 0 too
            t.weight.grad.index_fill_(0, rows, 0.0)
            masked_bias = self.mask_bias and t.bias is not None
            if masked_bias and t.bias.grad is not None:
                t.bias.grad.index_fill_(0, rows, 0.0)
            if self.freeze_masked_updates:
                self._saved.append((t.weight, rows, t.weight.detach()[rows].clone()))
                if masked_bias:
                    self._saved.append((t.bias, rows, t.bias.detach()[rows].clone()))

    def after_step(self, ctx: Context | None = None) -> None:
        """Reset the accumulators (and restore masked rows when ``freeze_masked_updates``)."""
        with torch.no_grad():
            for param, rows, values in self._saved:
                param[rows] = values
        self._saved = []
        self._seen = set()

    # -- the hook protocol (every engine) ------------------------------------------------------------
    def before_experience(self, ctx: Context) -> None:
        if ctx.experience >= self.start_task:
            self.attach(ctx.model)

    def after_backward(self, ctx: Context) -> None:
        self.mask_gradients()

    def after_experience(self, ctx: Context) -> None:
        self.detach()
