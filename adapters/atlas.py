"""aTLAS: task vectors composed with learned anisotropic (per-block) scaling.

Paper: Frederic Z. Zhang, Paul Albert, Cristian Rodriguez-Opazo, Anton van den Hengel, Ehsan
Abbasnejad, "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling",
NeurIPS 2024, arXiv 2407.02880. Reference code: fredzzhang/atlas (``src/composition.py``).

A task vector is ``τ_i = θ_i − θ_0`` (fine-tuned minus pretrained), always a plain dict
``parameter name -> tensor``. With blocks ``j = 1..m`` (parameter tensors) and one coefficient per
(task vector, block), initialised to 0:

    θ^(j) = θ_0^(j) + Σ_i λ_i^(j) τ_i^(j)                 granularity="block"   (n·m coefficients)
    θ^(j) = θ_0^(j) + Σ_i λ_i τ_i^(j)                     granularity="global"  (n, isotropic)
    θ^(j) = θ_0^(j) + Σ_i Σ_k λ_{i,j,k} (M_k^(j) ⊙ τ_i^(j))   granularity="partition" (n·m·K, aTLAS ×K)

The forward is a functional call of each frozen module with its composed parameters
(``torch.func.functional_call``), so only λ receives gradients; ``merge`` writes the composed
parameters into the model once.

How aTLAS sits on the per-layer core: every leaf module owning a parameter that some task vector
touches gets one adapter; its blocks are that module's parameters. Task vectors are matched to
blocks by full parameter name (never by position); names that are buffers of the model (BN
statistics in a state-dict difference) are ignored, as in the reference which composes parameters
only. Names that are not in the model, shape mismatches, and parameters owned directly by a
container module (which no per-layer adapter can wrap) are errors naming the offending entries.
``target_modules`` / ``block_filter`` restrict the blocks; task-vector entries outside them are
ignored. A task vector without an entry for a block contributes zero there (e.g. LoRA deltas).

Saving (task vectors are referenced, not duplicated: they can be as large as the model): task vectors given as
safetensors paths (see :func:`save_task_vector`) are referenced by absolute path in the saved
config and re-read lazily by ``ll.load``; the checkpoint holds only λ. Task vectors given in
memory have nothing to refer to, so by default (``save_task_vectors=None`` → auto) they are saved
with λ, in ``tv_dtype``, so that ``ll.load`` still rebuilds from the folder alone. With
``save_task_vectors=False`` only λ is saved and in-memory task vectors must be passed again through
:func:`load_atlas` ``(model, dir, task_vectors=...)``; ``ll.load`` then fails with a message saying
so (likewise when a referenced file is gone). Partition masks are never saved: they are
regenerated from ``partition_seed``.

Helpers: in :mod:`lifelong.adapters.task_vectors`, :func:`task_vector` (from
fine-tuned/pretrained models, state dicts or safetensors files), :func:`task_vector_from_adapter`
(a lifelong adapter's merged update), :func:`save_task_vector` / :func:`load_task_vector`; in
:mod:`.atlas_objectives`, :func:`addition_loss` / :func:`negation_loss` (paper §4 objectives);
here, :func:`coefficients` (λ table) and :func:`blockwise_gradient_selection` (per block, the b
task vectors with the largest |∂L/∂λ|).

Partitions (×K) are stored compactly rather than as the reference's one-hot fp16 masks (K
copies of every block): each block stores an int16 partition id per element and gathers λ. Reference quirks: masks are shared
by blocks of equal shape (``share_masks_by_shape=True``, kept as the default); the reference only
updates 2-D blocks under ×K (1-D and conv kernels get a zero update) — ours updates every block,
``reference_partition=True`` restores the reference rule; the reference casts λ to fp16 before the
einsum — ours composes in the parameter dtype. Linearised task vectors (paper §3.2) are not implemented.
"""

from __future__ import annotations

import os
import os
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..checks import one_of, positive_int
from .base import Adapter
from .config import AdapterConfig
from .layers import unwrap
from .registry import register
from .targeting import iter_layers
from .task_vectors import TaskVector, check_task_vectors, load_task_vectors, original_parameters, save_task_vector

__all__ = ["AtlasAdapter", "AtlasConfig", "CoefficientTable", "blockwise_gradient_selection", "coefficients", "load_atlas",
           "resolve_task_vectors", "tie_global_coefficients"]

GRANULARITIES = ("block", "global", "partition")
TV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
EXAMPLE_BUDGET = 1_000_000


class _LeafWithParameters(type):
    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, nn.Module)  # any module type may be a leaf owning parameters

    def __instancecheck__(cls, module: object) -> bool:
        return (
            isinstance(module, nn.Module)
            and next(module.children(), None) is None
            and next(module.parameters(recurse=False), None) is not None
        )


class LeafWithParameters(metaclass=_LeafWithParameters):
    """Matches, in ``isinstance`` checks, any module without children that owns a parameter."""


@dataclass
class AtlasConfig(AdapterConfig):
    """See the module docstring.

    ``task_vectors``: a list of dicts (named ``tv0, tv1, ...``), a dict ``name -> dict``, or paths
    to safetensors files written by :func:`save_task_vector` (runtime only, never in JSON).
    ``block_filter``: None (every parameter), ``"weights"`` (tensors with >= 2 dims) or a regex
    that must match the full parameter name. ``exclude``: task-vector names to drop (e.g. the
    target's own). ``task_vector_names``, ``blocks`` and ``tied_blocks`` are resolved at wrap time
    and saved, so a checkpoint rebuilds the same shapes. ``tied_blocks`` maps each block that is
    the same tensor as another (tied weights, e.g. GPT-2's ``lm_head.weight`` and
    ``transformer.wte.weight``) to the block that owns its coefficients.
    """

    task_vectors: Any = None
    granularity: str = "block"
    partitions: int = 1
    partition_seed: int = 0
    share_masks_by_shape: bool = True
    reference_partition: bool = False
    block_filter: str | None = None
    coef_init: float = 0.0
    tv_dtype: str = "float16"
    exclude: list[str] | None = None
    save_task_vectors: bool | None = None
    task_vector_names: list[str] = field(default_factory=list)
    task_vector_files: list[str | None] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    tied_blocks: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        one_of("granularity", self.granularity, GRANULARITIES)
        one_of("tv_dtype", self.tv_dtype, tuple(TV_DTYPES))
        positive_int("partitions (K)", self.partitions)
        if self.partitions > 1 and self.granularity != "partition":
            raise ValueError(f"partitions={self.partitions} needs granularity='partition', got {self.granularity!r}")
        if self.partitions > torch.iinfo(torch.int16).max:
            raise ValueError(f"partitions must be <= {torch.iinfo(torch.int16).max}, got {self.partitions}")
        if self.block_filter is not None and not isinstance(self.block_filter, str):
            raise ValueError(f"block_filter must be None, 'weights' or a regex string, got {self.block_filter!r}")
        if self.exclude is not None and not isinstance(self.exclude, (list, tuple)):
            raise ValueError(f"exclude must be a list of task-vector names, got {self.exclude!r}")
        if self.task_vectors is not None:
            check_task_vectors(self.task_vectors, self.exclude)
        elif not self.task_vector_names:
            raise ValueError("atlas needs task_vectors=[{param name: θ_i − θ_0}, ...] (see lifelong.adapters.task_vectors.task_vector)")


def resolve_task_vectors(config: AtlasConfig) -> None:
    """Read the task vectors the config was given (paths are loaded) and record their names and
    files in it; ``save_task_vectors=None`` becomes True when one was given in memory (it has no
    file to refer to). The adapter's prepare step (and :func:`load_atlas`) call this."""
    config.task_vectors, files = load_task_vectors(config.task_vectors, config.exclude, TV_DTYPES[config.tv_dtype])
    config.task_vector_names, config.task_vector_files = list(config.task_vectors), files
    if config.save_task_vectors is None:
        config.save_task_vectors = any(f is None for f in files)


# ---- model structure ------------------------------------------------------------------------


def _leaf_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters aTLAS can compose: those of leaf modules, by original name."""
    return {
        f"{n}.{k}": p
        for n, m in iter_layers(model)
        if n and isinstance(unwrap(m), LeafWithParameters)
        for k, p in unwrap(m).named_parameters(recurse=False)
    }


def _check_names(model: nn.Module, targets: dict[str, nn.Module], tvs: dict[str, TaskVector]) -> dict[str, Tensor]:
    """Map every task-vector entry to a parameter; raise naming entries that do not fit."""
    params = dict(original_parameters(model))
    leaf_owned = {f"{layer}.{k}" for layer, m in targets.items() for k, _ in unwrap(m).named_parameters(recurse=False)}
    all_leaf = set(_leaf_parameters(model))
    buffers = dict(original_parameters(model, buffers=True))
    for tv_name, tv in tvs.items():
        unknown = sorted(k for k in tv if k not in params and k not in buffers)
        if unknown:
            raise ValueError(
                f"task vector {tv_name!r} has entries that are not parameters of this model: {unknown[:5]} "
                f"({len(unknown)} in all); was it built from another architecture? model parameters look like {sorted(params)[:3]}"
            )
        container = sorted(k for k in tv if k in params and k not in all_leaf)
        if container:
            raise ValueError(
                f"task vector {tv_name!r} touches parameters owned directly by container modules {container[:5]}; "
                "aTLAS composes parameters of leaf modules only: drop these entries from the task vector"
            )
        shapes = [f"{k}: task vector {tuple(v.shape)} vs model {tuple(params[k].shape)}"
                  for k, v in tv.items() if k in params and v.shape != params[k].shape]
        if shapes:
            raise ValueError(f"task vector {tv_name!r} does not match the model's shapes: {shapes[:5]}")
    return {k: params[k] for k in leaf_owned}


def _stack_layer(
    tvs: dict[str, TaskVector] | None, prefix: str, attrs: list[str], base: nn.Module, dtype: torch.dtype
) -> dict[str, Tensor] | None:
    """Per block of one layer, the task vectors stacked as (n, *shape) (zeros where absent)."""
    if tvs is None:
        return None
    out = {}
    for attr in attrs:
        param = getattr(base, attr)
        tau = torch.zeros((len(tvs), *param.shape), dtype=dtype, device=param.device)
        for i, tv in enumerate(tvs.values()):
            if prefix + attr in tv:
                tau[i].copy_(tv[prefix + attr])
        out[attr] = tau
    return out


def _read_layer(config: AtlasConfig, prefix: str, attrs: list[str], base: nn.Module) -> dict[str, Tensor]:
    """Load-time: one layer's task vectors read lazily from the files they were given as."""
    files = config.task_vector_files
    if not files or any(f is None for f in files):
        raise ValueError(
            f"this aTLAS checkpoint holds neither its task vectors (save_task_vectors=False) nor files for all of them; "
            f"load it with lifelong.adapters.atlas.load_atlas(model, directory, task_vectors=[...]) giving the task "
            f"vectors {config.task_vector_names}"
        )
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"task vector files {missing} referenced by this aTLAS checkpoint are gone; pass the task vectors to "
            "lifelong.adapters.atlas.load_atlas(model, directory, task_vectors=[...])"
        )
    dtype = TV_DTYPES[config.tv_dtype]
    out = {}
    for attr in attrs:
        param = getattr(base, attr)
        out[attr] = torch.zeros((len(files), *param.shape), dtype=dtype, device=param.device)
    for i, path in enumerate(files):
        with safe_open(path, framework="pt") as handle:
            keys = set(handle.keys())
            for attr in attrs:
                found = [k for k in tie_group(config.tied_blocks, prefix + attr) if k in keys]
                if found:
                    out[attr][i].copy_(handle.get_tensor(found[0]))
    return out


def tie_group(tied: dict[str, str], block: str) -> list[str]:
    """``block`` first, then every block that is the same tensor as it."""
    owner = tied.get(block, block)
    return [block] + [b for b in [owner, *sorted(k for k, v in tied.items() if v == owner)] if b != block]


def _tie_blocks(model: nn.Module, blocks: list[str], targets: dict[str, nn.Module]) -> tuple[list[str], dict[str, str]]:
    """Add every leaf parameter that is the same tensor as a block (tied weights) and map each to
    the first block of its group. Merging writes a tied tensor once for all its modules, so every
    module using it must compose it with the same coefficients; otherwise the unmerged model (each
    module with its own λ, or none) differs from the merged one. Modules added here join
    ``targets`` even outside ``target_modules``: the merge changes them anyway."""
    leaf = _leaf_parameters(model)
    groups: dict[int, list[str]] = {}
    for name, param in leaf.items():
        groups.setdefault(id(param), []).append(name)
    modules = dict(iter_layers(model))
    out, tied = set(blocks), {}
    for block in blocks:
        group = sorted(groups.get(id(leaf[block]), [block])) if block in leaf else [block]
        for name in group[1:]:
            tied[name] = group[0]
            out.add(name)
            layer = name.rpartition(".")[0]
            targets.setdefault(layer, modules[layer])
        out.add(group[0])
    return sorted(out), tied


def _share_tied_entries(tvs: dict[str, TaskVector], tied: dict[str, str]) -> dict[str, TaskVector]:
    """Give every name of a tied group the group's task-vector entry (a state-dict difference
    holds both names, ``named_parameters`` only one); differing entries are an error."""
    if not tied:
        return tvs
    out = {}
    for tv_name, tv in tvs.items():
        tv = dict(tv)
        for owner in sorted(set(tied.values())):
            names = tie_group(tied, owner)
            present = [n for n in names if n in tv]
            if not present:
                continue
            first = tv[present[0]]
            differ = [n for n in present[1:] if not torch.equal(tv[n].to(first.device, first.dtype), first)]
            if differ:
                raise ValueError(
                    f"task vector {tv_name!r} has different entries for the tied parameters {[present[0], *differ]}; "
                    "they are one tensor in this model: keep one entry (or give them equal values)"
                )
            for n in names:
                tv[n] = first
        out[tv_name] = tv
    return out


def _keep(name: str, tensor: Tensor, block_filter: str | None) -> bool:
    if block_filter is None:
        return True
    if block_filter == "weights":
        return tensor.dim() >= 2
    return re.fullmatch(block_filter, name) is not None


def _partition_ids(shape: torch.Size, config: AtlasConfig, block: str, device: torch.device) -> Tensor:
    """A reproducible random group id in [0, K) per element (same shape -> same ids when shared)."""
    key = f"{config.partition_seed}:{tuple(shape)}" if config.share_masks_by_shape else f"{config.partition_seed}:{block}"
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randint(config.partitions, tuple(shape), generator=generator, dtype=torch.int16).to(device)


@register("atlas", AtlasConfig)
class AtlasAdapter(Adapter):
    layer_types = (LeafWithParameters,)

    @classmethod
    def default_targets(cls, model: nn.Module) -> str:
        return ".*"  # every leaf module with parameters; prepare keeps those a task vector touches

    @classmethod
    def exact_at_init(cls, config: AtlasConfig) -> bool:
        return config.coef_init == 0.0

    @classmethod
    def example_options(cls, model: nn.Module, batches: list[Any]) -> dict[str, Any]:
        """Two task vectors made from the model's own parameters (a scaled copy and a rolled one),
        written once to safetensors files in the temp folder (keyed by their content) and passed by
        path, so the saved adapter references them like real checkpoints. To keep the example light
        on big models, blocks are taken in name order up to EXAMPLE_BUDGET elements (the others are
        simply not touched, as with LoRA task vectors)."""
        own, used = {}, 0
        for n, p in sorted(_leaf_parameters(model).items()):
            if p.is_floating_point() and used + p.numel() <= EXAMPLE_BUDGET:
                own[n], used = p.detach(), used + p.numel()
        vectors = [{k: 0.1 * p for k, p in own.items()}, {k: 0.05 * p.flatten().roll(1).view_as(p) for k, p in own.items()}]
        digest = zlib.crc32("".join(f"{k}{tuple(p.shape)}{float(p.double().sum()):.12e}" for k, p in own.items()).encode())
        folder = Path(tempfile.gettempdir()) / "lifelong-atlas-examples"
        folder.mkdir(exist_ok=True)
        paths = []
        for i, tv in enumerate(vectors):
            path = folder / f"{digest:08x}-{i}.safetensors"
            if not path.is_file():
                save_task_vector({k: v.half() for k, v in tv.items()}, path)
            paths.append(str(path))
        return {"task_vectors": paths}

    @classmethod
    def prepare(cls, model: nn.Module, targets: dict[str, nn.Module], config: AtlasConfig) -> dict[str, Any]:
        resolve_task_vectors(config)
        tvs = config.task_vectors
        params = _check_names(model, targets, tvs)
        blocks = sorted(k for k, p in params.items() if any(k in tv for tv in tvs.values()) and _keep(k, p, config.block_filter))
        if not blocks:
            raise ValueError(
                f"no parameter of the targeted modules is touched by the task vectors (block_filter={config.block_filter!r}); "
                f"targeted modules: {sorted(targets)[:10]}"
            )
        blocks, config.tied_blocks = _tie_blocks(model, blocks, targets)
        tvs = _share_tied_entries(tvs, config.tied_blocks)
        config.blocks = blocks
        layers = sorted({b.rpartition(".")[0] for b in blocks})
        for name in [n for n in targets if n not in layers]:
            del targets[name]  # no block there: the core builds adapters only for what remains
        config.target_modules = layers
        shared = None
        if config.granularity == "global":
            ref = params[blocks[0]]
            shared = nn.Parameter(torch.full((len(tvs),), float(config.coef_init), device=ref.device, dtype=ref.dtype))
        contexts = {}
        for layer in layers:
            base = unwrap(targets[layer])
            attrs = [b.rpartition(".")[2] for b in blocks if b.rpartition(".")[0] == layer]
            contexts[layer] = {"global": shared, "tau": _stack_layer(tvs, f"{layer}.", attrs, base, TV_DTYPES[config.tv_dtype])}
        config.task_vectors = None  # the stacked copies now live in the adapters; drop the dicts
        return contexts

    def __init__(self, base: nn.Module, config: AtlasConfig, layer_name: str, context: Any, init: bool):
        super().__init__(base, config, layer_name, context, init)
        prefix = f"{layer_name}."
        self.tied_attrs: set[str] = set()  # blocks whose tensors belong to another layer's adapter (see link)
        self.block_attrs = [b[len(prefix):] for b in config.blocks if b.startswith(prefix) and "." not in b[len(prefix):]]
        context = context or {}
        taus = context.get("tau") or _stack_layer(config.task_vectors, prefix, self.block_attrs, base, TV_DTYPES[config.tv_dtype])
        if taus is None and not config.save_task_vectors:
            taus = _read_layer(config, prefix, self.block_attrs, base)
        ref = next(base.parameters())
        n, device, factory = len(config.task_vector_names), ref.device, {"device": ref.device, "dtype": ref.dtype}
        if config.granularity == "global":
            shared = context.get("global")
            self.coef = shared if shared is not None else nn.Parameter(torch.full((n,), float(config.coef_init), **factory))
        for attr in self.block_attrs:
            param = getattr(base, attr)
            tau = taus[attr] if taus is not None else torch.zeros((n, *param.shape), dtype=TV_DTYPES[config.tv_dtype], device=device)
            self.register_buffer(f"tau_{attr}", tau, persistent=config.save_task_vectors)
            if config.granularity == "global":
                continue
            shape = (n,) if config.granularity == "block" else (n, config.partitions)
            self.register_parameter(f"coef_{attr}", nn.Parameter(torch.full(shape, float(config.coef_init), **factory)))
            if config.granularity == "partition":
                ids = _partition_ids(param.shape, config, f"{prefix}{attr}", device)
                self.register_buffer(f"part_{attr}", ids, persistent=False)

    @classmethod
    def link(cls, adapters: dict[str, Adapter]) -> None:
        """Share tensors across layers: one global λ; and for tied blocks the owner's λ, τ and
        partition ids, with the merge of a tied block left to its owner."""
        if not adapters:
            return
        first = next(iter(adapters.values()))
        config = first.config
        if config.granularity == "global":
            for adapter in adapters.values():
                adapter.coef = first.coef
        for alias, owner in config.tied_blocks.items():
            alias_layer, _, alias_attr = alias.rpartition(".")
            owner_layer, _, owner_attr = owner.rpartition(".")
            if alias_layer not in adapters or owner_layer not in adapters:
                raise ValueError(f"aTLAS tied blocks {alias!r} and {owner!r} must both be adapted")
            source, target = adapters[owner_layer], adapters[alias_layer]
            for kind in ("tau", "coef", "part"):
                key = f"{kind}_{owner_attr}"
                if kind == "coef" and config.granularity != "global":
                    target.register_parameter(f"coef_{alias_attr}", source.get_parameter(key))
                elif kind != "coef" and hasattr(source, key):
                    persistent = key not in source._non_persistent_buffers_set
                    target.register_buffer(f"{kind}_{alias_attr}", source.get_buffer(key), persistent=persistent)
            target.tied_attrs.add(alias_attr)

    def coefficient(self, attr: str) -> Tensor:
        return self.coef if self.config.granularity == "global" else self.get_parameter(f"coef_{attr}")

    def block_delta(self, attr: str, dtype: torch.dtype) -> Tensor:
        """``Σ_i Λ_i τ_i`` for one block, computed in the parameter dtype."""
        tau = self.get_buffer(f"tau_{attr}").to(dtype)
        coef = self.coefficient(attr).to(dtype)
        if coef.dim() == 2:
            if self.config.reference_partition and tau.dim() != 3:
                return torch.zeros_like(tau[0])  # reference ×K path: only 2-D blocks are updated
            coef = coef[:, self.get_buffer(f"part_{attr}").long()]
            return (coef * tau).sum(0)
        return torch.tensordot(coef, tau, dims=1)

    def composed(self, base: nn.Module) -> dict[str, Tensor]:
        return {attr: getattr(base, attr) + self.block_delta(attr, getattr(base, attr).dtype) for attr in self.block_attrs}

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        return torch.func.functional_call(base, self.composed(base), (x,))

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        # Beside other adapters on the same layer: add what the composed parameters change.
        return y + self.fused_forward(x, base) - base(x)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        owned = [a for a in self.block_attrs if a not in self.tied_attrs]  # a tied block is merged by its owner
        self._original = {attr: getattr(base, attr).detach().clone() for attr in owned}
        values = {attr: getattr(base, attr) + self.block_delta(attr, getattr(base, attr).dtype) for attr in owned}
        for attr, value in values.items():
            getattr(base, attr).copy_(value)

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        for attr, value in self._original.items():
            getattr(base, attr).copy_(value)
        del self._original


# ---- model-level helpers ----------------------------------------------------------------------
def _atlas_adapters(model: nn.Module, adapter_name: str | None) -> tuple[str, list[AtlasAdapter]]:
    name = adapter_name or model.active_adapter
    if name not in model.configs or model.configs[name].method != "atlas":
        atlas = [n for n, c in model.configs.items() if c.method == "atlas"]
        raise ValueError(f"{name!r} is not an atlas adapter of this model; atlas adapters: {atlas}")
    return name, [layer.adapters[name] for layer in model.adapted_layers() if name in layer.adapters]


def tie_global_coefficients(model: nn.Module, adapter_name: str | None = None) -> None:
    """After loading a ``granularity="global"`` adapter, make every layer share one λ again."""
    name, adapters = _atlas_adapters(model, adapter_name)
    if model.configs[name].granularity != "global":
        return
    shared = adapters[0].coef
    for adapter in adapters[1:]:
        adapter.coef = shared


def load_atlas(model: nn.Module, directory: str | os.PathLike, task_vectors: Any = None, adapter_name: str = "default") -> nn.Module:
    """Load an aTLAS adapter saved with ``save_pretrained``, supplying task vectors when the
    checkpoint holds only λ (``save_task_vectors=False``); names and shapes are checked first."""
    from .model import AdaptedModel, read_checkpoint
    from .registry import get_method

    meta, tensors = read_checkpoint(directory)
    if meta["method"] != "atlas":
        raise ValueError(f"{str(directory)!r} holds a {meta['method']!r} adapter, not atlas")
    values = dict(meta["config"])
    if task_vectors is not None:
        values["task_vectors"] = task_vectors
    config = get_method("atlas").config_cls.from_dict(values)
    if config.task_vectors is not None:
        resolve_task_vectors(config)
    saved_names = meta["config"]["task_vector_names"]
    if task_vectors is not None and len(config.task_vectors) != len(saved_names):
        raise ValueError(f"checkpoint was trained with {len(saved_names)} task vectors {saved_names}, got {len(config.task_vectors)}")
    adapted = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
    if config.task_vectors is not None:
        targets = {n: m for n, m in iter_layers(adapted.base_model) if n in set(config.target_modules)}
        _check_names(adapted.base_model, targets, config.task_vectors)
    adapted.add_adapter(adapter_name, config, _state=tensors)
    tie_global_coefficients(adapted, adapter_name)
    return adapted


@dataclass
class CoefficientTable:
    """λ per task vector (rows) and block (columns); ``values`` is (n, m) or (n, m, K)."""

    task_vectors: list[str]
    blocks: list[str]
    values: Tensor

    def __str__(self) -> str:
        shown = self.values.float().mean(-1) if self.values.dim() == 3 else self.values.float()
        head = "| task vector | " + " | ".join(self.blocks) + " |"
        rule = "|---" * (len(self.blocks) + 1) + "|"
        rows = [f"| {tv} | " + " | ".join(f"{v:.4f}" for v in shown[i].tolist()) + " |" for i, tv in enumerate(self.task_vectors)]
        return "\n".join([head, rule, *rows])


@torch.no_grad()
def coefficients(model: nn.Module, adapter_name: str | None = None) -> CoefficientTable:
    """The learned λ of an aTLAS adapter as a table (global granularity repeats λ_i per block)."""
    name, adapters = _atlas_adapters(model, adapter_name)
    blocks, columns = [], []
    for adapter in adapters:
        for attr in adapter.block_attrs:
            blocks.append(f"{adapter.layer_name}.{attr}")
            columns.append(adapter.coefficient(attr).detach().float().cpu())
    return CoefficientTable(list(model.configs[name].task_vector_names), blocks, torch.stack(columns, dim=1))


@torch.no_grad()
def blockwise_gradient_selection(model: nn.Module, budget: int, adapter_name: str | None = None) -> dict[str, list[str]]:
    """Budgeted selection (paper §4, memory trick 2): after ``loss.backward()``, per block the
    ``budget`` task vectors with the largest ``|∂L/∂λ_i^(j)|`` (partition coefficients summed over K)."""
    positive_int("budget", budget)
    name, adapters = _atlas_adapters(model, adapter_name)
    names = model.configs[name].task_vector_names
    chosen = {}
    for adapter in adapters:
        for attr in adapter.block_attrs:
            grad = adapter.coefficient(attr).grad
            if grad is None:
                raise ValueError("no gradient on the aTLAS coefficients: run loss.backward() on the adapted model first")
            score = grad.abs().reshape(len(names), -1).sum(-1)
            top = torch.topk(score, min(budget, len(names))).indices.tolist()
            chosen[f"{adapter.layer_name}.{attr}"] = [names[i] for i in top]
    return chosen
