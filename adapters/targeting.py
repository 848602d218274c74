"""Which modules of a model an adapter goes on (PEFT's ``target_modules`` rules)."""

from __future__ import annotations

import re
from typing import Iterator

from torch import Tensor, nn

from .layers import AdaptedLayer, SavedModule, unwrap

ALL_LINEAR = "all-linear"  # nn.Linear and transformers' Conv1D, as PEFT
ALL_SUPPORTED = "all"  # every module of a type the method supports, except the output head
# Names PEFT and common models give their output heads; "all-linear" never targets them.
HEAD_NAMES = ("lm_head", "classifier", "score", "head", "output_head", "fc_out")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, GPT-J...): a linear layer whose weight is stored (in, out)."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2 and hasattr(module, "nf")


class Conv1DLinear(nn.Linear):
    """An ``nn.Linear`` view of a transformers ``Conv1D`` (PEFT's ``fan_in_fan_out`` case).

    ``weight`` is the transposed view ``conv.weight.T`` (out, in) of the very same storage, so an
    adapter reads it, and merges / residuals write into it, exactly as for an ``nn.Linear``; the
    forward is the Conv1D's own. Unloading puts the Conv1D back (:func:`original_layer`).
    """

    def __init__(self, conv: nn.Module):
        nn.Module.__init__(self)  # no parameters of its own: they stay the Conv1D's
        self.conv = conv
        self.in_features, self.out_features = conv.weight.shape

    @property  # type: ignore[override]
    def weight(self) -> Tensor:
        return self.conv.weight.t()

    @property  # type: ignore[override]
    def bias(self) -> Tensor | None:
        return self.conv.bias

    @bias.setter
    def bias(self, value: Tensor | None) -> None:
        self.conv.bias = value

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "conv":
                raise
            return getattr(self.conv, name)  # nf, nx, ... as the model expects


def adaptable(layer: nn.Module, layer_types: tuple[type[nn.Module], ...]) -> nn.Module | None:
    """``layer`` if a method with ``layer_types`` adapts it, else its Linear view when it is a
    Conv1D the method adapts as a Linear, else None."""
    if isinstance(layer, layer_types):
        return layer
    if is_conv1d(layer):
        view = Conv1DLinear(layer)
        if isinstance(view, layer_types):
            return view
    return None


def original_layer(layer: nn.Module) -> nn.Module:
    """The model's own module behind a view (the Conv1D behind :class:`Conv1DLinear`)."""
    return layer.conv if isinstance(layer, Conv1DLinear) else layer


def name_matches(name: str, pattern: list[str] | str) -> bool:
    """A regex string must match the whole name; a list entry must equal a dotted suffix."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in pattern)


def iter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that sees through adapted layers: yields each adapted layer once under
    its original name and never descends into adapter internals."""

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        yield prefix, module
        if isinstance(module, (AdaptedLayer, SavedModule)):
            return
        for child_name, child in module.named_children():
            yield from walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    yield from walk("", model)


def output_head_names(model: nn.Module) -> set[str]:
    """The output head(s): HF output embeddings, modules named like heads, else the last Linear."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    linear_names = []
    for name, module in iter_layers(model):
        layer = unwrap(module)
        if out_emb is not None and (module is out_emb or layer is out_emb):
            heads.add(name)
        if isinstance(layer, nn.Linear) or is_conv1d(layer):
            linear_names.append(name)
            if name.rsplit(".", 1)[-1] in HEAD_NAMES:
                heads.add(name)
    if not heads and out_emb is None and linear_names and not hasattr(model, "config"):
        heads.add(linear_names[-1])  # a plain torch model: its last Linear is the classifier
    return heads


def find_targets(
    model: nn.Module,
    target_modules: list[str] | str,
    exclude_modules: list[str] | str | None,
    layer_types: tuple[type[nn.Module], ...],
    method: str,
) -> dict[str, nn.Module]:
    """Map full module name -> module (an adapted layer stays wrapped) for every target.

    Raises ``ValueError`` when nothing matches (listing existing names) or when a matched module
    is of a type the method cannot adapt.
    """
    everything = target_modules in (ALL_LINEAR, ALL_SUPPORTED)
    heads = output_head_names(model) if everything else set()
    found: dict[str, nn.Module] = {}
    for name, module in iter_layers(model):
        if not name:
            continue
        layer = unwrap(module)
        if everything:
            wanted = (nn.Linear,) if target_modules == ALL_LINEAR else layer_types
            if adaptable(layer, wanted) is None or name in heads:
                continue
        elif not name_matches(name, target_modules):
            continue
        if exclude_modules is not None and name_matches(name, exclude_modules):
            continue
        if adaptable(layer, layer_types) is None:
            if isinstance(target_modules, str):
                continue  # a regex may also match containers; only leaves of a known type count
            allowed = ", ".join(t.__name__ for t in layer_types)
            raise ValueError(
                f"module {name!r} is a {type(layer).__name__}; adapter {method!r} supports: {allowed}"
            )
        found[name] = module
    if not found:
        leaves = [n for n, m in iter_layers(model) if n and adaptable(unwrap(m), layer_types) is not None]
        shown = ", ".join(leaves[:40]) + (" ..." if len(leaves) > 40 else "")
        raise ValueError(
            f"target_modules={target_modules!r} matched no module the {method!r} adapter supports; "
            f"candidate modules: {shown or '(none of a supported type)'}"
        )
    return found


def default_lora_targets(model: nn.Module) -> list[str] | str:
    """PEFT's default LoRA targets for a Hugging Face model type, else ``"all-linear"``."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in mapping:
        return list(mapping[model_type])
    return ALL_LINEAR


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def resolve_rank(rank_pattern: dict[str, int], name: str, default: int) -> int:
    """Per-layer rank from ``rank_pattern`` (exact name first, then the longest matching suffix)."""
    if name in rank_pattern:
        return rank_pattern[name]
    suffixes = [k for k in rank_pattern if name.endswith("." + k)]
    return rank_pattern[max(suffixes, key=len)] if suffixes else default


LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")  # PEFT's COMMON_LAYERS_PATTERN


def layer_index(name: str, patterns: list[str] | tuple[str, ...]) -> int | None:
    """The number after ``<pattern>.`` in a dotted module name (``model.layers.3.mlp`` -> 3)."""
    for pattern in patterns:
        found = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if found:
            return int(found.group(1))
    return None


def in_layers(targets: dict[str, nn.Module], layers: list[int], patterns: list[str] | None) -> dict[str, nn.Module]:
    """PEFT's ``layers_to_transform``: keep the targets whose layer index is listed."""
    patterns = patterns or LAYER_PATTERNS
    kept = {n: m for n, m in targets.items() if layer_index(n, patterns) in set(layers)}
    if not kept:
        found = sorted({i for n in targets if (i := layer_index(n, patterns)) is not None})
        raise ValueError(
            f"layers_to_transform={layers} kept none of the {len(targets)} targets; layer indices found after "
            f"{list(patterns)}: {found or 'none'} (set layers_pattern to the name part before the index)"
        )
    return kept
