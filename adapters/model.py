"""The model-level wrapper: :class:`AdaptedModel`, :func:`wrap` and :func:`load`.

``wrap(model, "bone", r=64, target_modules=[...])`` finds the target layers, lets the method
prepare (calibrate, allocate ranks), builds every per-layer adapter and only then swaps the
layers in, so a failure leaves the model untouched. The base model is frozen; only the active
adapter's tensors (and its ``modules_to_save`` copies) train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..files import atomic_write
from .base import RESIDUAL_BUFFERS, Adapter, full_tensor, original_weights, restore_weights
from ..checks import one_of
from .config import RUNTIME_ONLY_FIELDS, AdapterConfig
from .layers import AdaptedLayer, SavedModule, unwrap
from .registry import get_method, lora_shaped_methods, make_config
from .signature import plain_class, rebuild, signature_class
from .targeting import (Conv1DLinear, adaptable, find_targets, in_layers, iter_layers, name_matches, original_layer,
                        set_submodule)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SAVED_PREFIX = "modules_to_save."
FORMAT_VERSION = 1
COMBINATIONS = ("linear", "cat")


class AdaptedModel(nn.Module):
    """A base model carrying one or more named adapters (PEFT's ``PeftModel`` counterpart).

    The instance's class is a subclass made for the base model's class whose ``forward`` shows
    the base's signature (see :mod:`.signature`), so the Hugging Face Trainer keeps the dataset
    columns and finds the label names as it does for the base model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, AdaptedModel):
            raise TypeError("model is already an AdaptedModel; call add_adapter on it instead")
        check_not_adapted(model)
        self.base_model = model
        self.__class__ = signature_class(type(self), type(model))
        self.configs: dict[str, AdapterConfig] = {}
        self.active_adapters: list[str] = []
        for p in model.parameters():
            p.requires_grad_(False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # The signature class is made at run time: rebuild it from the plain class and base class.
        return rebuild, (plain_class(type(self)), type(self.base_model)), self.__dict__

    # ---- PEFT-compatible names ---------------------------------------------------------------
    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its adapted layers), as PEFT's ``get_base_model``."""
        return self.base_model

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        """Adapter name -> config, as PEFT's ``peft_config``."""
        return self.configs

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """PEFT's name for :meth:`merge`: of the active adapters, or of ``adapter_names`` (which
        then become the active ones)."""
        if adapter_names is not None and list(adapter_names) != self.active_adapters:
            self.set_adapter(list(adapter_names))
        self.merge()

    def unmerge_adapter(self) -> None:
        """PEFT's name for :meth:`unmerge`."""
        self.unmerge()

    # ---- adapters ------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    def add_adapter(
        self,
        adapter_name: str,
        method: str | AdapterConfig,
        *,
        _state: dict[str, Tensor] | None = None,
        **options: Any,
    ) -> "AdaptedModel":
        """Add a new adapter (inactive unless it is the first). ``method`` is a registered name or
        a config object; keyword options set config fields."""
        check_adapter_name(adapter_name, self.configs)
        config = make_config(method, **options)
        spec = get_method(config.method)
        target_spec = config.target_modules or spec.adapter_cls.default_targets(self.base_model)
        targets = find_targets(
            self.base_model, target_spec, config.exclude_modules, spec.adapter_cls.supported_types(config), spec.name
        )
        if config.layers_to_transform is not None:
            targets = in_layers(targets, config.layers_to_transform, config.layers_pattern)
        init = _state is None
        views = self._linear_views(targets, spec.adapter_cls.supported_types(config))
        try:
            contexts = spec.adapter_cls.prepare(self.base_model, targets, config) if init else {}
            built = {
                name: spec.adapter_cls(unwrap(module), config, name, contexts.get(name), init)
                for name, module in targets.items()
            }
            saved = self._saved_module_names(config)
            if _state is not None:
                load_tensors(adapter_name, built, saved, _state)
            spec.adapter_cls.link(built)
            fixed = rebuilt_from_config(self.base_model)
            for adapter in built.values():
                adapter.fixed_architecture = fixed
            for name, adapter in built.items():
                self._layer_for(name, targets[name]).add(adapter_name, adapter)
            for name in saved:
                self._saved_for(name).add(adapter_name)
            if _state is not None:
                self._load_saved_modules(adapter_name, saved, _state)
        except BaseException:
            self._discard(adapter_name)  # leave the model as it was before this call
            for name in views:
                module = self.base_model.get_submodule(name)
                if isinstance(module, Conv1DLinear):
                    set_submodule(self.base_model, name, module.conv)
            raise
        self.configs[adapter_name] = config
        if not self.active_adapters:
            self.set_adapter(adapter_name)
        else:
            self._refresh_trainable()
        return self

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make one adapter (or several, composed in order) the running and trainable one(s)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            check_has_adapter(name, self.configs)
        if any(layer.merged for layer in self.adapted_layers()):
            raise RuntimeError("unmerge() before switching adapters")
        self.active_adapters = names
        for layer in self.adapted_layers():
            layer.active = [n for n in names if n in layer.adapters]
        for module in self.saved_modules():
            module.active = names[0]
        self._refresh_trainable()

    def _linear_views(self, targets: dict[str, nn.Module], types: tuple[type[nn.Module], ...]) -> list[str]:
        """Put a Linear view in place of each targeted Conv1D the method adapts as a Linear (so
        calibration hooks on the view see its inputs); returns the names swapped."""
        swapped = []
        for name, module in targets.items():
            view = module if isinstance(module, AdaptedLayer) else adaptable(module, types)
            if isinstance(view, Conv1DLinear) and view is not module:
                set_submodule(self.base_model, name, view)
                targets[name] = view
                swapped.append(name)
        return swapped

    def _discard(self, adapter_name: str) -> None:
        """Remove a partly installed adapter and unwrap the layers it left empty."""
        for name, module in list(iter_layers(self.base_model)):
            if isinstance(module, AdaptedLayer) and adapter_name in module.adapters:
                module.remove(adapter_name)
                if not module.adapters:
                    set_submodule(self.base_model, name, original_layer(module.base_layer))
            elif isinstance(module, SavedModule) and adapter_name in module.copies:
                del module.copies[adapter_name]
                if not module.copies:
                    set_submodule(self.base_model, name, module.original)
        self.configs.pop(adapter_name, None)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        check_has_adapter(adapter_name, self.configs)
        for layer in self.adapted_layers():
            if adapter_name in layer.adapters:
                layer.remove(adapter_name)
        for module in self.saved_modules():
            if adapter_name in module.copies:
                del module.copies[adapter_name]
        del self.configs[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    @torch.no_grad()
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear") -> None:
        """Add ``adapter_name``, a weighted combination of LoRA-shaped adapters (PEFT's LoRA
        ``add_weighted_adapter``). With ``ΔW_i = s_i B_i A_i`` the update of adapter i on a layer:

        - ``"cat"``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]`` (rank Σ r_i), so
          the new update is exactly ``Σ w_i ΔW_i``;
        - ``"linear"`` (equal ranks on each layer): ``A = Σ sign(w_i)·√|w_i s_i| A_i`` and
          ``B = Σ √|w_i s_i| B_i``, as PEFT; not ``Σ w_i ΔW_i`` in general (cross terms), but
          exact for one adapter, which PEFT (and this) always combines with "linear".

        The new adapter is of the first adapter's method (its config with the new per-layer ranks
        in ``rank_pattern``), inactive, and saves and loads like any other. Adapters that leave a
        residual base (CorDA, KORE, LaMDA's SVD init) can only be combined where all of them left
        the same residual on a layer: the new adapter then keeps that residual, so that
        ``w = [1]`` reproduces the adapter. A layer that only some adapters cover gets the update
        of those. ``modules_to_save`` are not combined."""
        one_of("combination_type", combination_type, COMBINATIONS)
        adapters, weights = list(adapters), list(weights)
        if not adapters or len(weights) != len(adapters):
            raise ValueError(f"add_weighted_adapter needs one weight per adapter, got adapters {adapters} and "
                             f"weights {weights}")
        for name in adapters:
            check_has_adapter(name, self.configs)
        bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)]
        if bad:
            raise ValueError(f"weights must be finite numbers, got {weights!r}")
        check_adapter_name(adapter_name, self.configs)
        methods = {name: self.configs[name].method for name in adapters}
        shaped = lora_shaped_methods()
        other = {n: m for n, m in methods.items() if m not in shaped}
        if other:
            raise ValueError(f"add_weighted_adapter combines LoRA-shaped adapters (methods {shaped}); "
                             f"{other} are not")
        saving = [n for n in adapters if self.configs[n].modules_to_save]
        if saving:
            raise ValueError(f"adapters {saving} have modules_to_save; add_weighted_adapter does not combine them")
        if any(layer.merged for layer in self.adapted_layers()):
            raise RuntimeError("unmerge() before add_weighted_adapter")
        if len(adapters) == 1:
            combination_type = "linear"  # PEFT's rule; exact for one adapter
        plan: dict[str, tuple[AdaptedLayer, Tensor, Tensor, Adapter | None]] = {}
        for layer in self.adapted_layers():
            present = [(n, layer.adapters[n], w) for n, w in zip(adapters, weights) if n in layer.adapters]
            if not present:
                continue
            name = present[0][1].layer_name
            plan[name] = (layer, *combine_lora(name, present, combination_type), residual_source(name, present))
        first = self.configs[adapters[0]]
        changes: dict[str, Any] = {
            "r": max(a.shape[0] for _, a, _, _ in plan.values()),
            "rank_pattern": {name: a.shape[0] for name, (_, a, _, _) in plan.items()},
            "target_modules": sorted(plan), "exclude_modules": None, "layers_to_transform": None,
            "layers_pattern": None, "modules_to_save": None,
        }
        fields = {f.name for f in dataclasses.fields(first)}
        changes.update({f: None for f in RUNTIME_ONLY_FIELDS if f in fields})
        if "alpha_pattern" in fields:
            changes["alpha_pattern"] = {}
        config = first.replace(**changes)
        spec = get_method(config.method)
        built = {name: spec.adapter_cls(layer.base_layer, config, name, None, False)
                 for name, (layer, _, _, _) in plan.items()}
        fixed = rebuilt_from_config(self.base_model)
        for name, adapter in built.items():
            _, a, b, source = plan[name]
            adapter.set_lora_factors(a, b)
            if source is not None:
                adapter.set_residual(source.residual_up, source.residual_down)
            adapter.fixed_architecture = fixed
        spec.adapter_cls.link(built)
        for name, adapter in built.items():
            plan[name][0].add(adapter_name, adapter)
        self.configs[adapter_name] = config
        self._refresh_trainable()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the original base model inside the ``with`` block."""
        modules = [*self.adapted_layers(), *self.saved_modules()]
        for module in modules:
            module.disabled = True
        try:
            yield
        finally:
            for module in modules:
                module.disabled = False

    # ---- parameters ------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def _refresh_trainable(self) -> None:
        for layer in self.adapted_layers():
            for name, adapter in layer.adapters.items():
                adapter.set_trainable(name in self.active_adapters)
        for module in self.saved_modules():
            for name, clone in module.copies.items():
                for p in clone.parameters():
                    p.requires_grad_(name in self.active_adapters)

    # ---- training-time schedules (LaMDA's PMB freezing) ---------------------------------------
    def after_backward(self) -> None:
        """Call after every (micro-batch) backward: adapters with per-backward rules apply them."""
        for adapter in self._running_adapters():
            adapter.after_backward()

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call after every ``optimizer.step()``; pass the optimizer so adapters can drop
        parameters they have frozen for good (and free their state)."""
        for adapter in self._running_adapters():
            adapter.after_optimizer_step(optimizer)

    def _running_adapters(self) -> Iterator[Adapter]:
        for layer in self.adapted_layers():
            for name in layer.active:
                yield layer.adapters[name]

    # ---- merging ---------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the active adapters into the base weights (forward output is unchanged)."""
        self._check_mergeable()
        for layer in self.adapted_layers():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.adapted_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and return the plain base model without adapter modules."""
        self.merge()
        return self._unload()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model."""
        self.unmerge()
        return self._unload()

    def _unload(self) -> nn.Module:
        for name, module in list(iter_layers(self.base_model)):
            if isinstance(module, AdaptedLayer):
                for adapter_name, adapter in module.adapters.items():
                    if adapter_name not in module.merged:
                        adapter.detach_from(module.base_layer)
                set_submodule(self.base_model, name, original_layer(module.base_layer))
            elif isinstance(module, SavedModule):
                set_submodule(self.base_model, name, module.current())
        self.configs.clear()
        self.active_adapters = []
        return self.base_model

    def _check_mergeable(self) -> None:
        for layer in self.adapted_layers():
            for name in layer.active:
                reason = layer.adapters[name].merge_blocker(layer.base_layer)
                if reason is not None:
                    raise ValueError(f"cannot merge adapter {name!r} on {layer.adapters[name].layer_name!r}: {reason}")

    # ---- save / load -------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        """The tensors of one adapter only: ``<layer>.<tensor>`` and ``modules_to_save.<module>.<param>``."""
        adapter_name = adapter_name or self.active_adapter
        check_has_adapter(adapter_name, self.configs)
        state: dict[str, Tensor] = {}
        for layer in self.adapted_layers():
            if adapter_name in layer.adapters:
                adapter = layer.adapters[adapter_name]
                for key, tensor in adapter.state_dict().items():
                    state[f"{adapter.layer_name}.{key}"] = tensor
        for name, module in self._named_saved_modules():
            if adapter_name in module.copies:
                for key, tensor in module.copies[adapter_name].state_dict().items():
                    state[f"{SAVED_PREFIX}{name}.{key}"] = tensor
        return state

    def save_pretrained(self, save_directory: str | os.PathLike, adapter_names: list[str] | None = None,
                        is_main_process: bool = True) -> None:
        """Write each adapter's config (JSON) and tensors (safetensors): ``default`` at the top of
        the folder, any other adapter in a sub-folder named after it (PEFT's layout).

        Sharded tensors (FSDP2's ``fully_shard`` makes parameters DTensors) are gathered first,
        which is a collective: under FSDP every process calls this, with
        ``is_main_process=(rank == 0)`` so that one process writes (Hugging Face's convention).
        """
        root = Path(save_directory)
        if is_main_process and root.exists() and not root.is_dir():
            raise NotADirectoryError(f"save_pretrained: {str(root)!r} exists and is not a directory")
        for name in adapter_names or list(self.configs):
            check_has_adapter(name, self.configs)
            tensors = {k: full_tensor(v).cpu().contiguous().clone() for k, v in self.adapter_state_dict(name).items()}
            if not is_main_process:
                continue
            folder = root if name == "default" else root / name
            folder.mkdir(parents=True, exist_ok=True)
            meta = {
                "format_version": FORMAT_VERSION,
                "library": "lifelong",
                "method": self.configs[name].method,
                "adapter_name": name,
                "config": self.configs[name].to_dict(),
            }
            atomic_write(folder / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata={"method": meta["method"]}))
            atomic_write(folder / CONFIG_FILE, lambda path: path.write_text(json.dumps(meta, indent=2, sort_keys=True)))

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """Add an adapter saved by :meth:`save_pretrained` under ``adapter_name``."""
        meta, tensors = read_checkpoint(directory)
        config = get_method(meta["method"]).config_cls.from_dict(meta["config"])
        self.add_adapter(adapter_name, config, _state=tensors)
        if not is_trainable:
            for layer in self.adapted_layers():
                if adapter_name in layer.adapters:
                    layer.adapters[adapter_name].set_trainable(False)
            for module in self.saved_modules():
                if adapter_name in module.copies:
                    module.copies[adapter_name].requires_grad_(False)

    @torch.no_grad()
    def load_adapter_weights(self, directory: str | os.PathLike) -> list[str]:
        """Copy the tensors saved by :meth:`save_pretrained` into this model's existing adapters of
        the same names, in place (the optimizer keeps its parameters): resuming a run. Returns
        the adapter names read. Keys, shapes and methods are checked before anything is copied."""
        folders = adapter_folders(Path(directory))
        plan = []
        for name, folder in folders.items():
            meta, tensors = read_checkpoint(folder)
            if name not in self.configs or self.configs[name].method != meta["method"]:
                raise ValueError(
                    f"{str(folder)!r} holds a {meta['method']!r} adapter {name!r}, but this model's adapters are "
                    f"{ {n: c.method for n, c in self.configs.items()} }"
                )
            current = self.adapter_state_dict(name)
            missing, unknown = sorted(set(current) - set(tensors)), sorted(set(tensors) - set(current))
            wrong = [k for k in current if k in tensors and tensors[k].shape != current[k].shape]
            if missing or unknown or wrong:
                raise ValueError(f"checkpoint {str(folder)!r} does not fit adapter {name!r}: missing {missing[:5]}, "
                                 f"unexpected {unknown[:5]}, shape mismatch {wrong[:5]}")
            plan.append((name, current, tensors))
        if any(layer.merged for layer in self.adapted_layers()):
            raise RuntimeError("unmerge() before loading adapter weights")
        for name, current, tensors in plan:
            layers = [layer for layer in self.adapted_layers() if name in layer.adapters]
            for layer in layers:  # a changed residual must move the base weight with it
                layer.adapters[name].detach_from(layer.base_layer)
            for key, target in current.items():
                target.copy_(tensors[key].to(target.device, target.dtype))
            for layer in layers:
                layer.adapters[name].attach(layer.base_layer)
        self._refresh_trainable()  # loaded state may freeze tensors (LaMDA's frozen PMB columns)
        return list(folders)

    def _load_saved_modules(self, adapter_name: str, names: list[str], state: dict[str, Tensor]) -> None:
        for name in names:
            prefix = f"{SAVED_PREFIX}{name}."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            self._saved_for(name).copies[adapter_name].load_state_dict(sub, strict=True)

    # ---- helpers ------------------------------------------------------------------------------
    def adapted_layers(self) -> Iterator[AdaptedLayer]:
        return (m for _, m in iter_layers(self.base_model) if isinstance(m, AdaptedLayer))

    def saved_modules(self) -> Iterator[SavedModule]:
        return (m for _, m in self._named_saved_modules())

    def _named_saved_modules(self) -> Iterator[tuple[str, SavedModule]]:
        return ((n, m) for n, m in iter_layers(self.base_model) if isinstance(m, SavedModule))

    def _layer_for(self, name: str, module: nn.Module) -> AdaptedLayer:
        if isinstance(module, AdaptedLayer):
            return module
        layer = AdaptedLayer(module)
        set_submodule(self.base_model, name, layer)
        return layer

    def _saved_module_names(self, config: AdapterConfig) -> list[str]:
        if not config.modules_to_save:
            return []
        names = [n for n, _ in iter_layers(self.base_model) if n and name_matches(n, list(config.modules_to_save))]
        if not names:
            raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module of the model")
        return names

    def _saved_for(self, name: str) -> SavedModule:
        module = self.base_model.get_submodule(name)
        if isinstance(module, SavedModule):
            return module
        saved = SavedModule(module)
        set_submodule(self.base_model, name, saved)
        return saved


def check_not_adapted(model: nn.Module) -> None:
    """Refuse a model whose layers already carry lifelong adapters (re-running ``ll.wrap(base, ...)``
    on the same base would overwrite them and lose their residual bases)."""
    held = sorted({name for m in model.modules() if isinstance(m, AdaptedLayer) for name in m.adapters}
                  | {name for m in model.modules() if isinstance(m, SavedModule) for name in m.copies})
    layers = sum(isinstance(m, (AdaptedLayer, SavedModule)) for m in model.modules())
    if layers:
        raise ValueError(
            f"this model already carries lifelong adapters {held} on {layers} layers (it was wrapped before); "
            "add another with adapted.add_adapter(name, method, ...) on the model ll.wrap returned, or first "
            "remove them with adapted.unload() (or merge_and_unload())"
        )


def rebuilt_from_config(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face PreTrainedModel (its save/load rebuilds the layers
    from the config, so only the parameters the config declares survive)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def check_adapter_name(name: str, existing: dict[str, Any]) -> None:
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise ValueError(f"adapter name must be a non-empty string without '.' or '/', got {name!r}")
    if name in existing:
        raise ValueError(
            f"the model already has an adapter named {name!r}; pass adapter_name=<another name> "
            f"or delete_adapter({name!r}) first (adapters: {sorted(existing)})"
        )


def combine_lora(layer_name: str, present: list[tuple[str, Adapter, float]], combination_type: str) -> tuple[Tensor, Tensor]:
    """The combined ``(A, B)`` (scale folded in, fp32) of the adapters on one layer (see
    :meth:`AdaptedModel.add_weighted_adapter`)."""
    factors = [(n, *adapter.lora_factors(), w) for n, adapter, w in present]
    if combination_type == "cat":
        a = torch.cat([w * s * a.float() for _, a, _, s, w in factors], dim=0)
        b = torch.cat([b.float() for _, _, b, _, _ in factors], dim=1)
        return a, b
    ranks = {n: a.shape[0] for n, a, _, _, _ in factors}
    if len(set(ranks.values())) > 1:
        raise ValueError(f"combination_type='linear' needs adapters of equal rank on each layer; on {layer_name!r} "
                         f"the ranks are {ranks}: use combination_type='cat'")
    a = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * a.float() for _, a, _, s, w in factors)
    b = sum(math.sqrt(abs(w * s)) * b.float() for _, _, b, s, w in factors)
    return a, b


def residual_source(layer_name: str, present: list[tuple[str, Adapter, float]]) -> Adapter | None:
    """The adapter whose residual base the combination keeps on one layer (None: no residual);
    refuses adapters that left different residuals (the combination would have no single base)."""
    with_residual = [(n, a) for n, a, _ in present if a.has_residual]
    if not with_residual:
        return None
    without = [n for n, a, _ in present if not a.has_residual]
    if without:
        raise ValueError(
            f"cannot combine on {layer_name!r}: adapters {[n for n, _ in with_residual]} left a residual base "
            f"W - R in the layer and {without} did not; their updates are relative to different base weights"
        )
    first_name, first = with_residual[0]
    ref = first.residual_weight(torch.float32)
    tol = 1e-5 * max(1.0, float(ref.abs().max()))
    differ = [n for n, a in with_residual[1:] if not torch.allclose(a.residual_weight(torch.float32), ref, rtol=0, atol=tol)]
    if differ:
        raise ValueError(
            f"cannot combine on {layer_name!r}: adapters {differ} left a different residual base than {first_name!r} "
            "(each initialised from the weight differently), so their updates are relative to different base "
            "weights; combine adapters made with the same initialisation (or a non-residual init)"
        )
    return first


def check_has_adapter(name: str, existing: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the model's adapters when ``name`` is not one of them."""
    if name not in existing:
        raise ValueError(f"no adapter named {name!r}; adapters: {sorted(existing)}")


def load_tensors(
    adapter_name: str, built: dict[str, Adapter], saved: list[str], state: dict[str, Tensor]
) -> None:
    """Copy checkpoint tensors into freshly built adapters, checking keys and shapes first."""
    expected = {f"{layer}.{key}": (adapter, key) for layer, adapter in built.items() for key in adapter.state_dict()}
    residual_keys = {f"{layer}.{key}": (adapter, key) for layer, adapter in built.items() for key in RESIDUAL_BUFFERS}
    saved_keys = {k for k in state if k.startswith(SAVED_PREFIX)}
    unknown = sorted(set(state) - set(expected) - set(residual_keys) - saved_keys)
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        raise ValueError(
            f"checkpoint does not fit adapter {adapter_name!r} on this model: "
            f"missing tensors {missing[:5]}, unexpected tensors {unknown[:5]}"
        )
    for key, (adapter, attr) in expected.items():
        current = adapter.state_dict()[attr]
        if current.shape != state[key].shape:
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(state[key].shape)}, model {tuple(current.shape)}")
    for key, (adapter, attr) in residual_keys.items():
        if key in state:
            adapter.register_buffer(attr, torch.empty_like(state[key]))
    with torch.no_grad():
        for key, (adapter, attr) in {**expected, **residual_keys}.items():
            if key in state:
                target = dict(adapter.named_parameters()).get(attr)
                target = target if target is not None else dict(adapter.named_buffers())[attr]
                device = next(iter(adapter.state_dict().values())).device
                target.copy_(state[key].to(device))


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    folder = Path(directory)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a lifelong adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"adapter config {str(config_path)!r} is not valid JSON ({err}); the adapter folder is "
                         "damaged: save the adapter again or restore the folder from a good copy") from err
    if not isinstance(meta, dict) or meta.get("library") != "lifelong" or "method" not in meta:
        raise ValueError(f"{str(config_path)!r} was not written by lifelong's save_pretrained")
    try:
        return meta, load_file(str(weights_path))
    except SafetensorError as err:
        raise ValueError(f"adapter weights {str(weights_path)!r} cannot be read ({err}); the adapter folder is "
                         "damaged: save the adapter again or restore the folder from a good copy") from err


def adapter_folders(root: Path) -> dict[str, Path]:
    """Adapter name -> folder: ``default`` at the top of ``root``, any other in a sub-folder."""
    folders = {"default": root} if (root / CONFIG_FILE).is_file() else {}
    if root.is_dir():
        folders.update({p.name: p for p in sorted(root.iterdir()) if (p / CONFIG_FILE).is_file()})
    if not folders:
        hint = ""
        if (root / "model.safetensors").is_file():
            hint = (": it holds a full model state dict, as the plain transformers Trainer writes for a model it does "
                    "not know; train with lifelong.adapters.callbacks.AdapterTrainer (or call "
                    "model.save_pretrained) to save the adapter")
        raise FileNotFoundError(f"no saved adapter in {str(root)!r} (expected {CONFIG_FILE}){hint}")
    return folders


def wrap(model: nn.Module, method: str | AdapterConfig, *, adapter_name: str = "default", **options: Any) -> AdaptedModel:
    """Put an adapter on ``model``: ``wrap(model, "bone", r=64, target_modules=["query"])``.

    ``method`` is a registered name (see :func:`lifelong.available`) or a config object. An
    :class:`AdaptedModel` gets the adapter added (under a new ``adapter_name``).
    """
    get_method(method.method if isinstance(method, AdapterConfig) else method)
    if isinstance(model, AdaptedModel):
        return model.add_adapter(adapter_name, method, **options)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    adapted = AdaptedModel(model)
    try:
        return adapted.add_adapter(adapter_name, method, **options)
    except BaseException:
        for p, flag in flags:  # leave the user's model as it was given
            p.requires_grad_(flag)
        raise


def load(model: nn.Module, directory: str | os.PathLike, *, adapter_name: str | None = None, is_trainable: bool = False) -> AdaptedModel:
    """Rebuild the adapted model saved by ``save_pretrained`` on a fresh copy of the base model.

    Loads the adapter at the top of ``directory`` (as ``default``) and every adapter saved in a
    sub-folder; ``adapter_name`` picks one of them only. When one of them fails to load, the
    model is left exactly as given: layers, ``requires_grad`` flags and weights bit for bit.
    """
    root = Path(directory)
    folders = adapter_folders(root)
    if adapter_name is not None:
        if adapter_name not in folders:
            raise ValueError(f"no adapter {adapter_name!r} in {str(root)!r}; found {sorted(folders)}")
        folders = {adapter_name: folders[adapter_name]}
    if isinstance(model, AdaptedModel):
        adapted, flags = model, None
    else:
        flags = [(p, p.requires_grad) for p in model.parameters()]
        adapted = AdaptedModel(model)
    loaded: list[str] = []
    with original_weights() as originals:
        try:
            for name, folder in folders.items():
                adapted.load_adapter(folder, name, is_trainable=is_trainable)
                loaded.append(name)
        except BaseException:
            for name in reversed(loaded):  # leave the model exactly as it was given
                adapted._discard(name)
            restore_weights(originals)  # residual bases added back are off by rounding
            if flags is not None:
                for p, flag in flags:
                    p.requires_grad_(flag)
            raise
    return adapted
