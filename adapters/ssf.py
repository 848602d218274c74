"""SSF: Scaling & Shifting your Features.

Paper: Dongze Lian, Daquan Zhou, Jiashi Feng, Xinchao Wang, "Scaling & Shifting Your Features: A
New Baseline for Efficient Model Tuning", NeurIPS 2022, arXiv 2210.08823.

After each targeted operation (Linear, Conv, LayerNorm / RMSNorm, BatchNorm) the output is mapped
per channel: ``y ← γ ⊙ y + β`` with trainable ``γ, β ∈ R^C``. The channel axis comes from the
module type (last axis for Linear and LayerNorm, axis 1 for Conv and BatchNorm), never from a
shape test as in the reference code. The default ``init="identity"`` (γ = 1, β = 0) starts from
the base model exactly, the point of SSF's re-parameterisation (the trained γ, β fold into the
preceding layer, so the adapted model is the base model plus a change); ``init="normal"`` is the
reference code's ``γ ~ N(1, σ²)``, ``β ~ N(0, σ²)``, σ = 0.02, which moves every output at wrap.

Merge (ours; the reference has none): the affine map folds into the preceding operation's
per-output-channel parameters, ``W'[o] = γ[o] W[o]`` and ``b' = γ ⊙ b + β`` (for a norm the affine
weight plays W). A missing bias is created in a plain torch model; in a Hugging Face model the
merge is refused for such a layer (while β ≠ 0), because ``save_pretrained`` / ``from_pretrained``
rebuild the layer from its config and drop the new bias. A norm with a weight but no bias
(RMSNorm) can only absorb β = 0. Unmerge restores a copy of the original tensors instead of
dividing by γ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import ssf_linear
from .base import Adapter
from ..checks import non_negative_number, one_of
from .config import AdapterConfig
from .registry import register
from .targeting import ALL_SUPPORTED, find_targets

CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class SSFConfig(AdapterConfig):
    """``init``: ``"identity"`` (default, exact start) or ``"normal"`` (the reference code's);
    ``init_std``: σ of the normal init; ``include_norms``: also put SSF after normalisation layers."""

    init: str = "identity"
    init_std: float = 0.02
    include_norms: bool = True

    def validate(self) -> None:
        super().validate()
        one_of("init", self.init, ("normal", "identity"))
        non_negative_number("init_std", self.init_std)


def is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1


class _RMSNormMeta(type):
    def __instancecheck__(cls, module: object) -> bool:
        return isinstance(module, nn.Module) and is_rms_norm(module)


class RMSNorm(metaclass=_RMSNormMeta):
    """Matches Hugging Face RMSNorm modules (LlamaRMSNorm, ...) in ``isinstance`` checks."""


@register("ssf", SSFConfig)
class SSFAdapter(Adapter):
    layer_types = (nn.Linear, nn.Conv1d, nn.Conv2d, *NORMS, RMSNorm)

    @classmethod
    def supported_types(cls, config: SSFConfig) -> tuple[type, ...]:
        return cls.layer_types if config.include_norms else (nn.Linear, nn.Conv1d, nn.Conv2d)

    @classmethod
    def default_targets(cls, model: nn.Module) -> list[str]:
        """Every Linear, Conv and LayerNorm/BatchNorm but the head: the positions SSF merges into
        in a plain torch model (an RMSNorm has no bias to absorb β, so it is only used when named;
        a bias-free layer of a Hugging Face model refuses the merge, see the module docstring)."""
        mergeable = (nn.Linear, nn.Conv1d, nn.Conv2d, *NORMS)
        return list(find_targets(model, ALL_SUPPORTED, None, mergeable, "ssf"))

    @classmethod
    def exact_at_init(cls, config: SSFConfig) -> bool:
        return config.init == "identity"

    def __init__(self, base: nn.Module, config: SSFConfig, layer_name: str, context: Any, init: bool):
        super().__init__(base, config, layer_name, context, init)
        channels = channel_count(base, layer_name)
        self.channel_axis = 1 if isinstance(base, CHANNELS_FIRST) else -1
        reference = next(iter(base.parameters()), None)
        factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        self.scale = nn.Parameter(torch.ones(channels, **factory))
        self.shift = nn.Parameter(torch.zeros(channels, **factory))
        if init and config.init == "normal":
            with torch.no_grad():
                self.scale.normal_(1.0, config.init_std)
                self.shift.normal_(0.0, config.init_std)

    def _view(self, t: Tensor, ndim: int) -> Tensor:
        if self.channel_axis == -1 or ndim == 2:
            return t
        shape = [1] * ndim
        shape[1] = -1
        return t.view(shape)

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        return y * self._view(self.scale, y.dim()).to(y.dtype) + self._view(self.shift, y.dim()).to(y.dtype)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor | None:
        if not isinstance(base, nn.Linear):
            return None
        return ssf_linear(x, base.weight, base.bias, self.scale.to(x.dtype), self.shift.to(x.dtype))

    def merge_blocker(self, base: nn.Module) -> str | None:
        if getattr(base, "bias", None) is not None or not bool(self.shift.ne(0).any()):
            return None
        if is_rms_norm(base):
            return f"{type(base).__name__} has no bias to absorb the SSF shift β; keep this adapter unmerged"
        if self.fixed_architecture:
            return (
                f"{type(base).__name__} {self.layer_name!r} has no bias to absorb the SSF shift β: merging would create "
                "one, which Hugging Face save_pretrained / from_pretrained drop (the model config declares no bias there), "
                "so the saved merged model would silently differ; keep this adapter unmerged, or target layers that "
                "have a bias"
            )
        return None

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
        rms = is_rms_norm(base)
        self._original = tuple(None if t is None else t.detach().clone() for t in (weight, bias))
        if weight is None:  # a norm without affine gets one
            base.weight = nn.Parameter(self.scale.detach().clone(), requires_grad=False)
        else:
            weight.mul_(self.scale.reshape(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
        if bias is not None:
            bias.mul_(self.scale.to(bias.dtype)).add_(self.shift.to(bias.dtype))
        elif not rms:
            base.bias = nn.Parameter(self.shift.detach().clone().to(base.weight.dtype), requires_grad=False)

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        weight, bias = self._original
        for attr, original in (("weight", weight), ("bias", bias)):
            if original is None:
                if getattr(base, attr, None) is not None:
                    setattr(base, attr, None)
            else:
                getattr(base, attr).copy_(original)
        del self._original


def channel_count(base: nn.Module, layer_name: str) -> int:
    if isinstance(base, nn.Linear):
        return base.out_features
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return base.out_channels
    if isinstance(base, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return base.num_features
    if isinstance(base, nn.LayerNorm):
        if len(base.normalized_shape) != 1:
            raise ValueError(f"SSF needs a LayerNorm over one axis; {layer_name!r} normalises {base.normalized_shape}")
        return base.normalized_shape[0]
    if is_rms_norm(base):
        return base.weight.shape[0]
    raise ValueError(f"SSF cannot be placed after {type(base).__name__} ({layer_name!r})")
