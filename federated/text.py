"""Federated fine-tuning of Hugging Face transformers on text: data, models and a frozen-prefix cache.

* `text_data(stream, tokenizer)` tokenizes a `lifelong.continual.TextStream` once (for example
  ``cl_benchmark(folder, tasks=["agnews"])``) into packed ``(N, 2, L)`` samples (token ids and
  attention mask) for `simulate`, and keeps each sample's task id, so that a federation can be
  split by label (`Dirichlet`) or by task (`ByTask`: each worker holds one task of the stream, a
  federated continual setting).
* `text_classifier(backbone, num_classes, adapter=...)` puts an adapter on a transformers model
  (any registry adapter by name through ``lifelong.wrap``, or PEFT's LoRA with ``"lora"``) and a
  classification head around it (`lifelong.continual.text_model.TextClassifier`). The trainable
  tensors, and so the only ones that travel, are the adapter's and the new head's.
* `EncoderTail` / `encode_prefix`: when the adapter sits only in the top layers of a BERT-family
  encoder, the layers below it are frozen and unadapted, so their output is a constant of each
  sample. `encode_prefix` computes it once (in eval mode, so without dropout in those layers) and
  `EncoderTail` runs only the adapted top layers, the mean pooling and the head on it. The result
  equals the full model's logits (a test checks it) at a fraction of the cost per local step,
  which is what makes hundreds of simulated workers affordable on a CPU.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..files import digest
from .partition import IID, Partitioner, _check_workers

__all__ = ["TextData", "text_data", "ByTask", "text_classifier", "EncoderTail", "encode_prefix"]


@dataclass
class TextData:
    """A tokenized text stream: train/test sets of packed samples and every sample's task id."""

    train: TensorDataset
    test: TensorDataset
    train_tasks: np.ndarray
    test_tasks: np.ndarray
    class_names: list[str]
    task_names: list[str]
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def by_task(self, within: Partitioner | None = None) -> "ByTask":
        """A partitioner giving each worker the samples of one task."""
        return ByTask(tuple(int(t) for t in self.train_tasks), within=within or IID())


def text_data(stream, tokenizer, max_length: int = 128, template: str = "{text}") -> TextData:
    """Tokenize ``stream`` (a `TextStream`) once; all tasks' train (test) samples in one set."""
    from ..continual.text import check_max_length, check_template, pack, tokenize, tokenizer_identity

    check_max_length(max_length)
    check_template(template)
    if not len(stream):
        raise ValueError("text_data: the stream has no tasks")
    train_ids = [tokenize(tokenizer, t.train_texts, max_length, template) for t in stream.tasks]
    test_ids = [tokenize(tokenizer, t.test_texts, max_length, template) for t in stream.tasks]
    width = max(len(s) for part in (*train_ids, *test_ids) for s in part)
    flat_train = [s for part in train_ids for s in part]
    flat_test = [s for part in test_ids for s in part]
    y_train = torch.tensor([y for t in stream.tasks for y in t.train_labels])
    y_test = torch.tensor([y for t in stream.tasks for y in t.test_labels])
    train_tasks = np.concatenate([np.full(len(t.train_texts), i) for i, t in enumerate(stream.tasks)])
    test_tasks = np.concatenate([np.full(len(t.test_texts), i) for i, t in enumerate(stream.tasks)])
    info = {"fingerprint": stream.fingerprint(), "tokenizer": tokenizer_identity(tokenizer),
            "max_length": max_length, "template": template, "width": width}
    return TextData(TensorDataset(pack(flat_train, width), y_train), TensorDataset(pack(flat_test, width), y_test),
                    train_tasks, test_tasks, list(stream.class_names), list(stream.names), info)


@dataclass(frozen=True)
class ByTask(Partitioner):
    """Each worker holds one task: ``tasks[n]`` is sample n's task id.

    Workers are dealt to the tasks in contiguous blocks as even as possible (with 10 workers and 3
    tasks: 4, 3, 3); inside a task, its samples are split among its workers by ``within`` (IID by
    default; a `Dirichlet` adds label skew inside each task).
    """

    tasks: tuple[int, ...]
    within: Partitioner = IID()

    def split(self, labels: np.ndarray, num_workers: int, seed: int) -> list[np.ndarray]:
        tasks = np.asarray(self.tasks)
        if len(tasks) != len(labels):
            raise ValueError(f"ByTask has task ids for {len(tasks)} samples but the dataset has {len(labels)}")
        _check_workers(num_workers, len(labels))
        names = np.unique(tasks)
        if num_workers < len(names):
            raise ValueError(f"{num_workers} workers cannot hold {len(names)} tasks one task each; "
                             f"use at least {len(names)} workers")
        out: list[np.ndarray] = []
        for k, block in enumerate(np.array_split(np.arange(num_workers), len(names))):
            idx = np.flatnonzero(tasks == names[k])
            if len(idx) < len(block):
                raise ValueError(f"task {int(names[k])} has {len(idx)} samples for its {len(block)} workers "
                                 f"({int(block[0])}..{int(block[-1])}); every worker needs at least one")
            for part in self.within.split(labels[idx], len(block), seed + 7919 * k):
                out.append(np.sort(idx[part]))
        return out

    def worker_tasks(self, num_workers: int) -> list[int]:
        """The task id each worker holds."""
        names = np.unique(np.asarray(self.tasks))
        return [int(names[k]) for k, block in enumerate(np.array_split(np.arange(num_workers), len(names)))
                for _ in block]

    def describe(self) -> dict:
        tasks = np.asarray(self.tasks)
        values, counts = np.unique(tasks, return_counts=True)
        return {"kind": "ByTask", "tasks": {str(int(v)): int(c) for v, c in zip(values, counts)},
                "tasks_digest": digest(tasks.astype(np.int64).tobytes()), "within": self.within.describe()}


def text_classifier(backbone: nn.Module, num_classes: int, adapter: str | None = "lora",
                    **options: Any) -> nn.Module:
    """``backbone`` with an adapter and a classification head over ``num_classes`` classes.

    ``adapter``: a registry name (``"bone"``, ``"kore"``, ...; ``lifelong.wrap`` options in
    ``options``), ``"lora"`` for PEFT's ``LoraConfig(**options)`` (default ``r=8`` on
    ``query``/``value``), or None for a head-only model (linear probe).
    """
    from ..continual.text_model import TextClassifier

    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        options = {"r": 8, "target_modules": ["query", "value"], **options}
        backbone = get_peft_model(backbone, LoraConfig(**options))
    elif adapter is not None:
        from .adapter import federate_adapter

        backbone = federate_adapter(backbone, adapter, **options)
    else:
        for p in backbone.parameters():
            p.requires_grad_(False)
    return TextClassifier(backbone, num_classes)


def _encoder(model: nn.Module) -> nn.Module:
    if not (hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer")):
        raise TypeError(f"expected a BERT-family encoder (with .embeddings and .encoder.layer), got "
                        f"{type(model).__name__}")
    return model


@torch.no_grad()
def encode_prefix(encoder: nn.Module, packed: torch.Tensor, start: int, batch_size: int = 64
                  ) -> dict[str, torch.Tensor]:
    """Hidden states entering layer ``start`` of a frozen BERT-family ``encoder`` for packed samples.

    Returns ``{"hidden": (N, L, H), "attention_mask": (N, L)}``, the inputs of `EncoderTail`.
    """
    from ..continual.text_model import unpack_text

    encoder = _encoder(encoder)
    layers = len(encoder.encoder.layer)
    if not 0 <= start < layers:
        raise ValueError(f"start must be a layer index in 0..{layers - 1}, got {start!r}")
    was_training = encoder.training
    encoder.eval()
    hidden = []
    try:
        for i in range(0, len(packed), batch_size):
            chunk = unpack_text(packed[i:i + batch_size])
            out = encoder(**chunk, output_hidden_states=True)
            h = out.hidden_states[start]
            pad = packed.shape[-1] - h.shape[1]
            hidden.append(nn.functional.pad(h, (0, 0, 0, pad)))
    finally:
        encoder.train(was_training)
    return {"hidden": torch.cat(hidden), "attention_mask": packed[:, 1].clone()}


class EncoderTail(nn.Module):
    """Layers ``start..`` of a BERT-family encoder, mean pooling and a linear head, on cached states.

    Takes ``hidden`` (the states entering layer ``start``, from `encode_prefix`) and
    ``attention_mask``, and returns class logits: for the same head this equals
    ``TextClassifier(encoder, num_classes)`` on the token ids, with the layers below ``start``
    frozen. Put the adapter on this module (e.g. ``target_modules=["query", "value"]``).
    """

    def __init__(self, encoder: nn.Module, start: int, num_classes: int):
        super().__init__()
        encoder = _encoder(encoder)
        layers = len(encoder.encoder.layer)
        if not 0 <= start < layers:
            raise ValueError(f"start must be a layer index in 0..{layers - 1}, got {start!r}")
        self.config = encoder.config
        self.start = start
        # a copy: adapters put on the tail must not reach into the encoder that fills the cache
        self.layer = copy.deepcopy(nn.ModuleList(encoder.encoder.layer[start:]))
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        for p in self.layer.parameters():
            p.requires_grad_(False)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # the additive (batch, 1, 1, L) mask every BERT attention implementation accepts
        ext = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.layer:
            out = layer(hidden, attention_mask=ext)
            hidden = out[0] if isinstance(out, tuple) else out
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(pooled)
