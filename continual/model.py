"""The trained model of a continual run: ``result.model``, ``predict``, ``save_pretrained``, ``load_model``.

``run_stream`` returns the model it trained as a :class:`ContinualModel`: the adapted network
with its head, the stream's class names, the route and the tokenizer. ``predict(texts, task=None)``
gives global class ids (a task given in task-incremental runs restricts the answer to its classes
and, with per-task adapters, picks its adapter); ``save_pretrained(dir)`` writes

    continual_model.json      class names, task names and classes, route, template, scenario,
                              adapter name / mode / options, tokenizer identity
    adapters/                 the adapters (``AdaptedModel.save_pretrained``) when an adapter mode
                              keeps them apart from the base (shared, per_task, incremental)
    head.safetensors          the classifier head (and any other tensor outside the backbone)
    model.safetensors         instead of adapters/: the whole model with any adapter merged in
                              (no adapter, or sequential adapters merged experience by experience)
    tokenizer/                the tokenizer (text streams)

and ``load_model(fresh_base, dir)`` rebuilds it on a freshly loaded base model with identical
predictions. Everything is safetensors and JSON: nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import umask

__all__ = ["ContinualModel", "load_model"]

CONFIG = "continual_model.json"
FORMAT = "lifelong.continual_model/1"


class ContinualModel:
    """A trained continual model (see the module docstring)."""

    def __init__(self, module: nn.Module, info: dict, tokenizer=None, router=None):
        self.module, self.info, self.tokenizer, self.router = module, info, tokenizer, router

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_run(cls, engine, text, tokenizer, settings, scenario: str, masks: dict | None) -> "ContinualModel":
        mode = settings.mode
        text_info = text.info if text is not None else None
        info = {
            "format": FORMAT, "scenario": scenario, "masks": {str(k): v for k, v in (masks or {}).items()},
            "adapter": settings.adapter if isinstance(settings.adapter, str) else None,
            "adapter_mode": mode, "adapter_options": _jsonable(settings.adapter_options or {}),
            "text": text_info, "route": text.route if text is not None else None,
            "num_classes": text.num_classes if text is not None else None,
            "label_ids": text.label_ids if text is not None else None,
        }
        return cls(engine.model, info, tokenizer, getattr(engine.mode, "task_router", None))

    # ---- prediction ------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list((self.info["text"] or {}).get("tasks", []))

    def _task_index(self, task: Any) -> int | None:
        if task is None:
            return None
        if isinstance(task, str):
            if task not in self.task_names:
                raise ValueError(f"unknown task {task!r}; tasks: {self.task_names}")
            return self.task_names.index(task)
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"task must be a task index or name, got {task!r}")
        count = len(self.task_names) if self.task_names else None
        if task < 0 or (count is not None and task >= count):
            raise ValueError(f"task index {task} is out of range; the stream has {count} tasks")
        return task

    def encode(self, texts: Sequence[str], task: int | None = None) -> torch.Tensor:
        """Tokenize texts as the run did (template, max length) into packed ``(N, 2, L)`` samples."""
        from .text import pack, tokenize

        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("predict(texts): texts must be a list of strings")
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass tokenizer= to run_stream or load_model")
        text = self.info["text"]
        template = text["template"]
        if "{task}" in template:
            if task is None:
                raise ValueError(f"the run's template {template!r} names the task: pass task=...")
            template = template.replace("{task}", self.task_names[task])
        ids = tokenize(self.tokenizer, list(texts), text["max_length"], template)
        return pack(ids, max(len(s) for s in ids))

    @torch.no_grad()
    def logits(self, inputs, task: Any = None) -> torch.Tensor:
        """Scores over the global classes (``-inf`` outside the task's classes when a task is given
        in a task-incremental run)."""
        from .loop import restrict_logits

        index = self._task_index(task)
        x = self.encode(inputs, index) if self.info["text"] is not None else inputs
        device = next(self.module.parameters()).device
        x = x.to(device)
        self.module.eval()
        masks = {int(k): v for k, v in self.info["masks"].items()} or None
        if hasattr(self.module, "candidates"):
            self.module.candidates = masks[index] if masks and index is not None else None
        if self.info["adapter_mode"] == "per_task":
            out = self._per_task(x, index)
        else:
            out = self.module(x)
        if masks and index is not None:
            out = restrict_logits(out, None, masks, index)
        return out

    def _per_task(self, x: torch.Tensor, index: int | None) -> torch.Tensor:
        if index is not None:
            return self.module(x, task_id=index)
        if self.router is None:
            raise ValueError("this model has one adapter per task: pass task=... (or train with "
                             "task_inference='prototype' to route by content)")
        return self.router.route_and_run(x)

    def predict(self, inputs, task: Any = None) -> torch.Tensor:
        """Global class ids (a ``LongTensor``) of ``inputs`` (texts, or tensors for tensor streams)."""
        return self.logits(inputs, task).argmax(-1).cpu()

    # ---- save / load -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the model (see the module docstring) atomically: into a temporary folder, then renamed.

        Under several processes call it on every process: a sharded model's tensors are gathered
        (a collective), rank 0 writes, the others wait for it."""
        from .distributed import barrier, is_main

        target, main = Path(directory), is_main()
        tmp = None
        if main:
            if target.exists() and not target.is_dir():
                raise NotADirectoryError(f"save_pretrained: {str(target)!r} exists and is not a folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp"))
        try:
            self._write(tmp or target, write=main)
            if main:
                _replace_folder(tmp, target)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        barrier()

    def _write(self, folder: Path, write: bool) -> None:
        """Gather what is sharded (every process) and write the files (``write``: this process only)."""
        from .adapter_modes import adapted_model

        adapted = adapted_model(self.module)
        info = dict(self.info)
        if adapted is not None and info["adapter_mode"] in ("shared", "per_task", "incremental"):
            adapted.save_pretrained(folder / "adapters", is_main_process=write)
            info["adapters"] = list(adapted.peft_config)
            info["active"] = list(adapted.active_adapters)
            info["task_ids"] = {k: v for k, v in getattr(adapted, "task_ids", {}).items()}
            name, state = "head.safetensors", {k: v for k, v in self.module.state_dict().items()
                                                if not k.startswith("backbone.")}
        else:
            name, state = "model.safetensors", _full_state(self.module)
            info["adapters"] = None
        if not write:
            return
        save_file(_contiguous(state), str(folder / name))
        if self.router is not None:
            info["task_inference"] = {"kind": self.router.kind,
                                      "classes": {str(k): v for k, v in self.router.classes.items()}}
            if self.router.kind == "prototype":
                save_file(_contiguous(self.router.router.state_dict()), str(folder / "router.safetensors"))
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        (folder / CONFIG).write_text(json.dumps(info, indent=2, sort_keys=True))


def _replace_folder(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` folder to ``target`` (replacing an earlier one), mode by the umask."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    os.chmod(target, 0o777 & ~umask())


def _full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors: gathered when FSDP shards them (a collective), else with any
    adapter merged in."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p.data, DTensor) for p in module.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _merged_state(module)


def _contiguous(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _merged_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state with any adapter on its backbone merged in (a PEFT model's too)."""
    backbone = getattr(module, "backbone", None)
    if backbone is None or not hasattr(backbone, "merge_and_unload"):
        return module.state_dict()
    clone = copy.deepcopy(module)
    clone.backbone = clone.backbone.merge_and_unload()
    return clone.state_dict()


def _jsonable(options: dict) -> dict:
    """The adapter options JSON can hold (a calibration loader is not kept)."""
    out = {}
    for k, v in options.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def read_info(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"load_model: {str(path)!r} does not exist; save with result.model.save_pretrained(dir)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"load_model: {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"load_model: {str(path)!r} is not a lifelong continual model ({FORMAT})")
    return info


def load_model(base: nn.Module, directory: str | os.PathLike, tokenizer=None) -> ContinualModel:
    """Rebuild a model saved by :meth:`ContinualModel.save_pretrained` on a fresh ``base`` model."""
    from .adapter_modes import Backbone

    folder = Path(directory)
    info = read_info(folder)
    if info["adapters"] is not None:
        base = _load_adapters(base, folder / "adapters", info)
    if info["text"] is not None:
        from .text_model import TextClassifier

        module = TextClassifier(base, info["num_classes"], info["route"], info["label_ids"])
    else:
        module = Backbone(base)
    state = load_file(str(folder / ("model.safetensors" if info["adapters"] is None else "head.safetensors")))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or (info["adapters"] is None and missing):
        raise ValueError(f"load_model: {str(folder)!r} does not fit this base model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    if tokenizer is None and (folder / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    model = ContinualModel(module, info, tokenizer, _task_inference(module, folder, info))
    module.eval()
    return model


def _task_inference(module: nn.Module, folder: Path, info: dict):
    """The saved task inference of a per-task model, or None."""
    saved = info.get("task_inference")
    if saved is None:
        return None
    from .task_inference import TaskInference

    inference = TaskInference(module, saved["kind"], {int(k): v for k, v in saved["classes"].items()})
    if saved["kind"] == "prototype":
        inference.router.load_state_dict(load_file(str(folder / "router.safetensors")))
    return inference


def _load_adapters(base: nn.Module, folder: Path, info: dict) -> nn.Module:
    from lifelong.adapters.model import AdaptedModel
    from lifelong.adapters.routing import TaskRoutedModel

    per_task = info["adapter_mode"] == "per_task"
    adapted = TaskRoutedModel(base) if per_task else AdaptedModel(base)
    for name in info["adapters"]:
        adapted.load_adapter(folder if name == "default" else folder / name, name)
    if per_task:
        adapted.task_ids = {k: v for k, v in info["task_ids"].items()}
        adapted.set_task(adapted.task_ids[info["active"][0]])
    else:
        adapted.set_adapter(info["active"])
    for p in adapted.parameters():
        p.requires_grad_(False)
    return adapted
