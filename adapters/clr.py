"""CLR: Channel-wise Lightweight Reprogramming for task-incremental continual learning.

Paper: Yunhao Ge, Yuecheng Li, Shuo Ni, Jiaping Zhao, Ming-Hsuan Yang, Laurent Itti, "CLR:
Channel-wise Lightweight Reprogramming for Continual Learning", ICCV 2023, arXiv 2307.11386.
Reference code: gyhandy/Channel-wise-Lightweight-Reprogramming (``network/ReGhos_Block.py``).

A frozen CNN is the anchor. For task t, after a convolution ``z = conv_ℓ(x)`` (C channels) the
output is re-mapped channel by channel by a depthwise k×k kernel ``K_{t,ℓ} ∈ R^{C×1×k×k}``:

    CLR_{t,ℓ}(z)[b, c, h, w] = Σ_{u,v} K_{t,ℓ}[c, 0, u, v] · z_pad[b, c, h+u, w+v]     (zero padding k//2)

initialised to the Dirac identity (``K[c, 0, k//2, k//2] = 1``), so a new task starts as the
anchor. Variants (reference names): ``"clr"`` (``Ghost_reduced_v1``, default) after every conv
whose kernel is not 1×1; ``"clr-full"`` (``Ghost``) after every conv; ``"reduced-v2"`` a k×k CLR
after k×k convs and a 1×1 depthwise (per-channel scale) after 1×1 convs.

Per task, as in the reference code: the CLR kernels, every BatchNorm (affine AND running
statistics: ``train_bn=True``; the BN modules become ``modules_to_save`` copies swapped with the
adapter) and a new head ``Linear(F, num_classes)`` replacing the model's output head (a copy of it
when ``num_classes`` is None). Use one adapter per task; :class:`CLRModel` does that and routes a
batch by task id (one id, or one per sample).

Merging: a k×k CLR after a conv is not a conv on the border (CLR pads the conv OUTPUT), so it is
refused (``mergeable = False``); a 1×1 scale CLR (reduced-v2) folds exactly, ``W'[o] = K[o] W[o]``.
Loss of the reference: CE + ``reg_lambda · Σ_p ‖p‖₂`` (plain norm, not squared) over the task's
trainable tensors — :meth:`CLRModel.regularization`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter
from .layers import AdaptedLayer, SavedModule, unwrap
from ..checks import non_negative_number, one_of, optional, positive_int
from .config import AdapterConfig
from .registry import register
from .routing import TaskRoutedModel
from .targeting import iter_layers, output_head_names

VARIANTS = ("clr", "clr-full", "reduced-v2")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class CLRConfig(AdapterConfig):
    """``variant``: clr / clr-full / reduced-v2 (see the module docstring); ``kernel_size``: odd k
    of the CLR kernels; ``train_bn``: task-specific BatchNorm (reference); ``head``: ``"linear"``
    (a task head replaces the output head) or ``"none"``; ``head_module``: the head's module name
    (default: the model's output head); ``num_classes``: the task head's size (None = the base
    head's); ``init``: ``"dirac"`` (identity) or ``"random"`` (tests); ``reg_lambda``: weight of
    the L2-norm penalty."""

    variant: str = "clr"
    kernel_size: int = 3
    train_bn: bool = True
    head: str = "linear"
    head_module: str | None = None
    num_classes: int | None = None
    init: str = "dirac"
    reg_lambda: float = 1e-5

    def validate(self) -> None:
        super().validate()
        one_of("variant", self.variant, VARIANTS)
        one_of("head", self.head, ("linear", "none"))
        one_of("init", self.init, ("dirac", "random"))
        positive_int("kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the CLR layer keeps the spatial size), got {self.kernel_size}")
        optional(positive_int, "num_classes", self.num_classes)
        non_negative_number("reg_lambda", self.reg_lambda)


def _is_1x1(conv: nn.Conv2d) -> bool:
    return tuple(conv.kernel_size) == (1, 1)


def clr_kernel_size(conv: nn.Conv2d, config: CLRConfig) -> int | None:
    """The CLR kernel size after ``conv`` under the variant, or None for no CLR layer."""
    if not _is_1x1(conv):
        return config.kernel_size
    return {"clr": None, "clr-full": config.kernel_size, "reduced-v2": 1}[config.variant]


@register("clr", CLRConfig)
class CLRAdapter(Adapter):
    """On a Conv2d: the task's reprogramming kernel. On the output head: the task's head."""

    layer_types = (nn.Conv2d,)

    @classmethod
    def supported_types(cls, config: CLRConfig) -> tuple[type[nn.Module], ...]:
        return (nn.Conv2d, nn.Linear)

    @classmethod
    def default_targets(cls, model: nn.Module) -> str:
        return ".*"  # every Conv2d (and the head); prepare keeps what the variant asks for

    @classmethod
    def exact_at_init(cls, config: CLRConfig) -> bool:
        return config.init == "dirac" and (config.head == "none" or config.num_classes is None)

    @classmethod
    def prepare(cls, model: nn.Module, targets: dict[str, nn.Module], config: CLRConfig) -> dict[str, Any]:
        layers = {n: unwrap(m) for n, m in targets.items()}
        convs = [n for n, m in layers.items() if isinstance(m, nn.Conv2d) and clr_kernel_size(m, config)]
        if not any(isinstance(m, nn.Conv2d) for m in layers.values()):
            raise ValueError(f"CLR reprograms nn.Conv2d layers; none among the targeted modules {sorted(layers)[:10]}")
        if not convs:
            raise ValueError(f"variant {config.variant!r} puts no CLR layer on the targeted convolutions (all 1×1)")
        keep = list(convs)
        if config.head == "linear":
            config.head_module = config.head_module or _find_head(model)
            if config.head_module not in layers:
                head = model.get_submodule(config.head_module) if config.head_module in dict(iter_layers(model)) else None
                if not isinstance(head, (nn.Linear, AdaptedLayer)):
                    raise ValueError(f"head_module={config.head_module!r} is not an nn.Linear of the model")
                targets[config.head_module] = head
            keep.append(config.head_module)
        for name in [n for n in targets if n not in keep]:
            del targets[name]  # the core builds adapters only for what remains
        config.target_modules = keep
        if config.train_bn:
            norms = [n for n, m in iter_layers(model) if n and isinstance(_unsaved(m), BATCH_NORMS)]
            config.modules_to_save = sorted(set(config.modules_to_save or []) | set(norms))
        return {}

    def __init__(self, base: nn.Module, config: CLRConfig, layer_name: str, context: Any, init: bool):
        super().__init__(base, config, layer_name, context, init)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.is_head = isinstance(base, nn.Linear)
        self.mergeable = self.is_head
        if self.is_head:
            classes = config.num_classes or base.out_features
            self.mergeable = classes == base.out_features
            fresh = nn.Linear(base.in_features, classes, **factory)
            if config.num_classes is None:
                with torch.no_grad():
                    fresh.weight.copy_(base.weight)
                    fresh.bias.copy_(base.bias if base.bias is not None else torch.zeros_like(fresh.bias))
            self.weight, self.bias = fresh.weight, fresh.bias
            return
        k = clr_kernel_size(base, config)
        channels = base.out_channels
        self.kernel = nn.Parameter(torch.zeros(channels, 1, k, k, **factory))
        self.mergeable = k == 1
        with torch.no_grad():
            self.kernel[:, 0, k // 2, k // 2] = 1.0
            if init and config.init == "random":
                self.kernel.add_(0.1 * torch.randn_like(self.kernel))

    def reprogram(self, z: Tensor) -> Tensor:
        k = self.kernel.shape[-1]
        return F.conv2d(z, self.kernel.to(z.dtype), padding=k // 2, groups=self.kernel.shape[0])

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        if self.is_head:
            return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))
        return self.reprogram(base(x))

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        if self.is_head:
            return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))  # the task head replaces it
        return self.reprogram(y)

    def merge_blocker(self, base: nn.Module) -> str | None:
        if self.mergeable:
            return None
        if self.is_head:
            return f"the task head on {self.layer_name!r} has another number of classes than the base head"
        return (f"a {self.kernel.shape[-1]}×{self.kernel.shape[-1]} CLR kernel after {self.layer_name!r} is not a conv on "
                "the border (CLR zero-pads the conv output); only 1×1 scale CLR layers (reduced-v2) merge exactly")

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        if not self.mergeable:
            raise ValueError(f"CLR on {self.layer_name!r} cannot be merged exactly (k×k kernel or resized head)")
        self._original = (base.weight.detach().clone(), None if base.bias is None else base.bias.detach().clone())
        if self.is_head:
            base.weight.copy_(self.weight)
            if base.bias is not None:
                base.bias.copy_(self.bias)
            return
        scale = self.kernel.reshape(-1).to(base.weight.dtype)
        base.weight.mul_(scale.view(-1, 1, 1, 1))
        if base.bias is not None:
            base.bias.mul_(scale)

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        weight, bias = self._original
        base.weight.copy_(weight)
        if bias is not None:
            base.bias.copy_(bias)
        del self._original


def _unsaved(module: nn.Module) -> nn.Module:
    return module.original if isinstance(module, SavedModule) else module


def _find_head(model: nn.Module) -> str:
    heads = sorted(output_head_names(model))
    if len(heads) != 1:
        raise ValueError(f"cannot tell the output head of this model (candidates {heads}); pass head_module=<name> or head='none'")
    return heads[0]


def clr_parameter_count(model: nn.Module, adapter_name: str) -> dict[str, int]:
    """Per-task counts: CLR kernels (and layers), BN affine, BN running statistics, head."""
    counts = {"clr_layers": 0, "clr": 0, "bn_affine": 0, "bn_stats": 0, "head": 0}
    for layer in model.adapted_layers():
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if isinstance(adapter, CLRAdapter):
            key = "head" if adapter.is_head else "clr"
            counts[key] += sum(p.numel() for p in adapter.parameters())
            counts["clr_layers"] += not adapter.is_head
    for module in model.saved_modules():
        if adapter_name in module.copies and isinstance(module.original, BATCH_NORMS):
            copy = module.copies[adapter_name]
            counts["bn_affine"] += sum(p.numel() for p in copy.parameters())
            counts["bn_stats"] += copy.running_mean.numel() + copy.running_var.numel()
    return counts


class CLRModel(TaskRoutedModel):
    """A frozen CNN anchor with one CLR adapter (kernels, BN, head) per task.

        model = CLRModel(resnet18(), variant="clr")
        model.add_task(0, num_classes=2); model.set_task(0)   # train task 0 ...
        logits = model(x, task_id=torch.tensor([0, 1, 1, 0]))  # per-sample routing
    """

    def __init__(self, model: nn.Module, **options: Any):
        if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
            raise ValueError("CLR reprograms nn.Conv2d layers; this model has none")
        super().__init__(model, "clr", **options)

    def add_task(self, task_id: Any, num_classes: int | None = None, **options: Any) -> str:
        """Add task ``task_id`` with a head of ``num_classes`` outputs (None: the model's head size)."""
        return super().add_task(task_id, num_classes=num_classes, **options)

    def regularization(self, task_id: Any = None) -> Tensor:
        """``reg_lambda · Σ_p ‖p‖₂`` over the task's trainable tensors (reference loss term)."""
        name = self.adapter_name(task_id) if task_id is not None else self.active_adapter
        params = [p for n, p in self.named_parameters() if p.requires_grad and f".{name}." in f".{n}."]
        if not params:
            raise ValueError(f"task adapter {name!r} has no trainable tensors; call set_task first")
        return self.configs[name].reg_lambda * torch.stack([p.norm() for p in params]).sum()

    def train(self, mode: bool = True) -> "CLRModel":
        super().train(mode)
        # A shared (non task-specific) BatchNorm must not update its running statistics.
        for _, module in iter_layers(self.base_model):
            if isinstance(module, BATCH_NORMS):
                module.eval()
        return self
