"""Continual learning: streams, methods (MIGU, CLASSP, power-law rehearsal, KCL/GKCL), metrics, runner.

Streams are Avalanche benchmarks of tensors (the digits streams) or text streams of real tasks
(``cl_benchmark``, ``text_stream``) that ``run_stream`` trains any Hugging Face transformer on.

The framework-free cores import only torch; the Avalanche bridges (``MIGUPlugin``,
``PowerLawReplayPlugin``, ``KCLStrategy``, ...) live in :mod:`lifelong.continual.avalanche_bridge`
and are loaded on first access, because ``import avalanche`` takes seconds. The Hugging Face
``MIGUCallback`` is loaded the same way.
"""

from __future__ import annotations

import importlib

from .classp import CLASSP, ClasspMethod
from .gkcl import GKCL, ConditionalVAE, supcon_loss
from .kcl import KCL, kernel_matrix, krr_logits
from .method import AvalancheBaseline, ContinualMethod
from .metrics import (AccuracyMatrix, accuracy, average_accuracy, average_forgetting, avalanche_forgetting,
                      backward_transfer, forward_transfer, summarize)
from .migu import MIGU, migu_mask
from .powerlaw_replay import PowerLawReplay, rehearsal_schedule, rehearsal_weights
from .result import StreamResult
from .runner import ADAPTER_MODES, AVALANCHE_BASELINES, METHODS, method_object, run_stream
from .streams import benchmark_from_tensors, permuted_digits, rotated_digits, split_digits
from .stdlib_text import stdlib_stream
from .text import ORDERS, TextStream, TextTask, cl_benchmark, text_stream
from .text_model import TextClassifier, VerbalizerLoss

_LAZY = {
    "MIGUPlugin": "avalanche_bridge",
    "PowerLawReplayPlugin": "avalanche_bridge",
    "TaskMaskPlugin": "avalanche_bridge",
    "KCLStrategy": "avalanche_bridge",
    "make_strategy": "avalanche_bridge",
    "MIGUCallback": "hf_bridge",
    "ContinualTrainer": "hf_bridge",
}

__all__ = [
    "ADAPTER_MODES", "AVALANCHE_BASELINES", "METHODS", "ORDERS", "AccuracyMatrix", "AvalancheBaseline", "CLASSP",
    "ClasspMethod", "ConditionalVAE", "ContinualMethod", "GKCL", "KCL", "MIGU", "TextClassifier", "TextStream",
    "TextTask", "VerbalizerLoss", "cl_benchmark", "method_object", "stdlib_stream", "text_stream",
    "PowerLawReplay", "StreamResult", "accuracy", "average_accuracy", "average_forgetting",
    "avalanche_forgetting", "backward_transfer", "benchmark_from_tensors", "forward_transfer", "kernel_matrix",
    "krr_logits", "migu_mask", "permuted_digits", "rehearsal_schedule", "rehearsal_weights", "rotated_digits",
    "run_stream", "split_digits", "summarize", "supcon_loss", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
