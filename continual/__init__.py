"""Continual learning: streams, the hook protocol, registered methods, engines, metrics, ``run_stream``.

Streams are Avalanche benchmarks of tensors (the digits streams) or text streams of real tasks
(``cl_benchmark``, ``text_stream``) that ``run_stream`` trains any Hugging Face transformer on.

Layout: :mod:`.hooks` (the protocol every method and adapter mode implements), :mod:`.registry`
(``@register_method``), :mod:`.methods` (one file per method), :mod:`.adapter_modes`,
:mod:`.engines` (native, Avalanche, ``transformers.Trainer``), :mod:`.runner` (``run_stream``) and
:mod:`.model` (the trained model: ``result.model``, ``load_model``). The Avalanche and Trainer
bridges (``MIGUPlugin``, ``MethodPlugin``, ``KCLStrategy``, ``ContinualCallback``, ...) are loaded on
first access, because ``import avalanche`` takes seconds.
"""

from __future__ import annotations

import importlib

from .adapter_modes import osf_factory
from .config import RunConfig
from .hooks import Context, ContinualMethod, HookError, MethodConfig
from .methods.classp import CLASSP, ClasspMethod
from .methods.ewc import EWC
from .methods.gkcl import GKCL, ConditionalVAE, supcon_loss
from .methods.kcl import KCL, kernel_matrix, krr_logits
from .methods.lwf import LwF
from .methods.migu import MIGU, migu_mask
from .methods.naive import Naive
from .methods.powerlaw import PowerLawReplay, rehearsal_schedule, rehearsal_weights
from .methods.replay import Replay
from .metrics import (AccuracyMatrix, accuracy, average_accuracy, average_forgetting, avalanche_forgetting,
                      backward_transfer, forward_transfer, summarize)
from .model import ContinualModel, load_model
from .registry import available_methods, register_method
from .result import StreamResult
from .runner import run_stream
from .stdlib_text import stdlib_stream
from .streams import benchmark_from_tensors, permuted_digits, rotated_digits, split_digits
from .text import ORDERS, TextStream, TextTask, cl_benchmark, text_stream
from .text_model import TextClassifier, VerbalizerLoss

_LAZY = {
    "MethodPlugin": "engines.avalanche",
    "MIGUPlugin": "engines.avalanche",
    "PowerLawReplayPlugin": "engines.avalanche",
    "TaskMaskPlugin": "engines.avalanche",
    "KCLStrategy": "engines.avalanche",
    "make_strategy": "engines.avalanche",
    "ContinualCallback": "engines.trainer",
    "ContinualTrainer": "engines.trainer",
}

__all__ = [
    "AccuracyMatrix", "CLASSP", "ClasspMethod", "ConditionalVAE", "Context", "ContinualMethod", "ContinualModel",
    "EWC", "GKCL", "HookError", "KCL", "LwF", "MIGU", "MethodConfig", "Naive", "ORDERS", "PowerLawReplay", "Replay",
    "RunConfig", "StreamResult", "TextClassifier", "TextStream", "TextTask", "VerbalizerLoss", "accuracy",
    "available_methods", "average_accuracy", "average_forgetting", "avalanche_forgetting", "backward_transfer",
    "benchmark_from_tensors", "cl_benchmark", "forward_transfer", "kernel_matrix", "krr_logits", "load_model",
    "migu_mask", "osf_factory", "permuted_digits", "register_method", "rehearsal_schedule", "rehearsal_weights", "rotated_digits",
    "run_stream", "split_digits", "stdlib_stream", "summarize", "supcon_loss", "text_stream", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
