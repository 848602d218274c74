"""Quick start: put every registered adapter on the real MiniLM and fine-tune a few steps.

The task is real and offline: tell which standard-library module (``json``, ``math``,
``os.path``, ``string``, ``random``) a function's docstring comes from. A linear head on the
mean-pooled MiniLM embedding is trained with each adapter (``modules_to_save=["head"]``).

    python examples/quickstart.py [--steps 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os.path
import random
import string
import time

import torch
from torch import nn

import lifelong as ll
from lifelong.adapters import get_method

MODULES = [json, math, os.path, string, random]


def docstring_dataset(seed: int) -> tuple[list[str], torch.Tensor]:
    texts, labels = [], []
    for label, module in enumerate(MODULES):
        for name, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if doc and (getattr(obj, "__module__", None) or "").split(".")[0] in module.__name__:
                texts.append(doc.split("\n\n")[0][:200])
                labels.append(label)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [texts[i] for i in order], torch.tensor([labels[i] for i in order])


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def fine_tune(method: str, batches: list[dict], labels: list[torch.Tensor], steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    encoder, _ = ll.models.load_minilm()
    model = Classifier(encoder, len(MODULES))
    spec = get_method(method)
    options = {"modules_to_save": ["head"], **spec.adapter_cls.example_options(model, batches)}
    if method != "ssf" and "target_modules" not in options:
        options["target_modules"] = ["query", "value"]
    adapted = ll.wrap(model, method, **options)
    trainable, total = adapted.get_nb_trainable_parameters()
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=2e-3)
    adapted.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        i = step % len(batches)
        loss = nn.functional.cross_entropy(adapted(**batches[i]), labels[i])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"method": method, "trainable": trainable, "percent": 100 * trainable / total,
            "first": losses[0], "last": losses[-1], "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    texts, y = docstring_dataset(args.seed)
    _, tokenizer = ll.models.load_minilm()
    batches, labels = [], []
    for start in range(0, min(len(texts), 4 * args.batch_size), args.batch_size):
        chunk = texts[start : start + args.batch_size]
        batches.append(dict(tokenizer(chunk, padding=True, truncation=True, max_length=64, return_tensors="pt")))
        labels.append(y[start : start + len(chunk)])
    print(f"task: {len(texts)} stdlib docstrings, {len(MODULES)} modules; {args.steps} AdamW steps, batch {args.batch_size}\n")
    rows = []
    encoder_layers = list(ll.models.load_minilm()[0].modules())
    for method in ll.available():
        layer_types = get_method(method).adapter_cls.layer_types
        if not any(isinstance(m, layer_types) for m in encoder_layers):
            print(f"{method}: skipped (adapts {', '.join(t.__name__ for t in layer_types)} only; MiniLM has none)")
            continue
        rows.append(fine_tune(method, batches, labels, args.steps, args.seed))
    header = f"{'adapter':<8} {'trainable':>11} {'%':>8} {'loss@1':>8} {'loss@end':>9} {'time s':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['method']:<8} {r['trainable']:>11,d} {r['percent']:>8.3f} {r['first']:>8.3f} {r['last']:>9.3f} {r['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
