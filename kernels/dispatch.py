"""Backend selection for the ops of :mod:`lifelong.kernels`.

Backends: ``torch`` (plain torch, hand-written backward: the oracle and the CPU path),
``composite`` (the same maths arranged as few BLAS calls as possible, accumulating in place) and
``triton`` (fused kernels). ``auto`` resolves per call:

- CUDA tensors, triton importable, compute capability ≥ 8.0, and the op's shape bucket marked
  ``"triton"`` in the tuned table for this GPU (``kernels/tuned/<gpu name>.json``, written by
  ``benchmarks/kernel_speed.py --write-table``) → ``triton``; other CUDA tensors → ``composite``;
- CPU tensors while ``TRITON_INTERPRET=1`` was set before triton was imported → ``triton`` run by
  the interpreter (tests only; slow);
- everything else → ``torch``.

The process-wide default comes from ``LIFELONG_KERNEL_BACKEND`` and can be overridden in a block
with :func:`use_backend`; an explicit ``backend=`` argument wins over both.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "composite", "triton")
# The Triton kernels pad the rank to a power of two held in registers; above this they spill.
MAX_TRITON_RANK = 256
TUNED_DIR = Path(__file__).resolve().parent / "tuned"

log = logging.getLogger(__name__)
_override: list[str] = []
_warned: set[str] = set()


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the ops inside the block with ``backend`` unless a call names its own."""
    _override.append(check_backend(backend))
    try:
        yield
    finally:
        _override.pop()


def default_backend() -> str:
    if _override:
        return _override[-1]
    return check_backend(os.environ.get("LIFELONG_KERNEL_BACKEND", "auto"))


def interpreting() -> bool:
    """True when triton's interpreter runs the kernels (env var set before kernels were decorated)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def strict() -> bool:
    """Under ``LIFELONG_KERNELS_STRICT=1`` Triton errors propagate instead of falling back."""
    return os.environ.get("LIFELONG_KERNELS_STRICT") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # any import failure means "no triton", never a crash of lifelong
        return False
    return True


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def rank_pad(r: int) -> int:
    """``R_PAD = max(16, next_pow2(r))``: tl.dot wants every dimension ≥ 16."""
    return max(16, next_pow2(r))


def bucket_key(op: str, m: int, k: int, n: int, r: int, dtype: torch.dtype) -> str:
    return f"{op}|{min(next_pow2(max(m, 1)), 8192)}|{k}|{n}|{rank_pad(r)}|{str(dtype).removeprefix('torch.')}"


@functools.lru_cache(maxsize=None)
def tuned_table(device_name: str) -> dict[str, str]:
    path = TUNED_DIR / (device_name.replace(" ", "_") + ".json")
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _cuda_triton_ok(device: torch.device) -> bool:
    return triton_available() and torch.cuda.get_device_capability(device)[0] >= 8


def resolve(backend: str | None, op: str, tensors: tuple[Tensor, ...], shape: tuple[int, int, int, int]) -> str:
    """The backend that runs ``op`` for these tensors; ``shape`` is (M, K, N, r) for the bucket."""
    backend = check_backend(backend if backend is not None else default_backend())
    device = tensors[0].device
    dtype = tensors[0].dtype
    m, k, n, r = shape
    if backend == "auto":
        if device.type == "cuda":
            if not _cuda_triton_ok(device) or r > MAX_TRITON_RANK or dtype == torch.float64:
                return "composite"
            key = bucket_key(op, m, k, n, r, dtype)
            return "triton" if tuned_table(torch.cuda.get_device_name(device)).get(key) == "triton" else "composite"
        if device.type == "cpu" and interpreting() and triton_available():
            return "triton"
        return "torch"
    if backend != "triton":
        return backend
    if device.type == "cpu" and not interpreting():
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
            f"(tests only); got tensors on {device}. Use backend='auto', 'torch' or 'composite'."
        )
    if device.type not in ("cpu", "cuda") or not triton_available():
        raise ValueError(f"backend='triton' is not available for tensors on {device} (is triton installed?)")
    if r > MAX_TRITON_RANK:
        warn_once(f"rank:{op}", f"{op}: r={r} exceeds the Triton limit {MAX_TRITON_RANK}; using 'composite'")
        return "composite"
    if dtype == torch.float64 and device.type == "cuda":
        warn_once(f"fp64:{op}", f"{op}: float64 has no Triton path on CUDA; using 'composite'")
        return "composite"
    return "triton"


def run_with_fallback(op: str, triton_fn, composite_fn):  # type: ignore[no-untyped-def]
    """Run ``triton_fn``; on a Triton error log once and use ``composite_fn`` (unless strict)."""
    try:
        return triton_fn()
    except Exception as err:  # a compile/launch failure must not kill training: fall back loudly
        if strict() or interpreting():
            raise
        warn_once(f"error:{op}", f"{op}: Triton kernel failed ({err!r}); using 'composite' instead")
        return composite_fn()

