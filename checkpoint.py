"""Checkpoints of long runs: one file, written atomically, that is read back only when whole.

A checkpoint file is a header line followed by the payload, the ``torch.save`` bytes of a dict::

    lifelong-checkpoint 1 sha256=<64 hex digits of the payload>\\n<payload>

:func:`load` reads it with ``torch.load(weights_only=True)`` (no code from the file runs) after
checking the digest, so a file cut short, emptied, replaced, or with flipped bytes is refused
before anything trusts it, and it refuses non-finite tensors where the caller asks. Every error
is a :class:`CheckpointError` naming the file and what to do. What a damaged checkpoint means is
the caller's choice: the continual loop and the federated simulator warn and start over.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write_bytes, fingerprint

__all__ = ["CheckpointError", "check_finite", "fingerprint", "load", "save"]

MAGIC = b"lifelong-checkpoint 1 sha256="
HEADER_SIZE = len(MAGIC) + 64 + 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted; the message names the file and what to do.
    ``path`` is the file and ``reason`` says what is wrong with it (callers that recover word
    their own advice with them)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {str(path)!r} {reason}; delete it to start the run over, or restore a good "
                         "copy to resume")
        self.path, self.reason = path, reason


def save(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists and dicts of them) to ``path`` atomically,
    with the SHA-256 digest of its bytes in the header."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = MAGIC + hashlib.sha256(payload).hexdigest().encode("ascii") + b"\n"
    atomic_write_bytes(path, header + payload)


def load(path: str | os.PathLike, *, finite: Iterable[str] = ()) -> dict:
    """The state saved by :func:`save` at ``path`` (tensors on the CPU).

    ``finite`` names top-level keys whose tensors must hold no NaN or infinity. Raises
    ``FileNotFoundError`` when there is no file and :class:`CheckpointError` when it is
    unreadable, damaged, not a checkpoint or holds non-finite values where ``finite`` forbids them.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise damaged(path, f"cannot be read ({err.strerror or err})") from err
    payload = _payload(path, data)
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as err:  # the digest matched: a file written by another torch, or by hand
        raise damaged(path, f"holds data torch cannot read safely ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise damaged(path, f"holds a {type(state).__name__}, not a checkpoint's dict")
    for key in finite:
        check_finite(path, key, state.get(key))
    return state


def _payload(path: Path, data: bytes) -> bytes:
    """The payload of a checkpoint file's bytes, after the header and digest checks."""
    if not data:
        raise damaged(path, "is empty (an interrupted copy or a full disk)")
    if not data.startswith(MAGIC) or len(data) < HEADER_SIZE or data[HEADER_SIZE - 1:HEADER_SIZE] != b"\n":
        raise damaged(path, "is not a lifelong checkpoint (no 'lifelong-checkpoint' header: another file, "
                            "or one written by an older version)")
    stored = data[len(MAGIC):HEADER_SIZE - 1].decode("ascii", errors="replace")
    payload = data[HEADER_SIZE:]
    if hashlib.sha256(payload).hexdigest() != stored:
        raise damaged(path, "does not match its SHA-256 digest (the file was cut short, edited or has "
                            "damaged bytes)")
    return payload


def check_finite(path: str | os.PathLike, key: str, value: Any) -> None:
    """Raise :class:`CheckpointError` when a float tensor or number in ``value`` is NaN or infinite."""
    for where, item in _leaves(key, value):
        if isinstance(item, torch.Tensor) and item.is_floating_point() and not bool(torch.isfinite(item).all()):
            raise damaged(path, f"holds NaN or infinite values in {where}")
        if isinstance(item, float) and not math.isfinite(item):
            raise damaged(path, f"holds a non-finite number in {where} ({item})")


def _leaves(where: str, value: Any) -> Iterator[tuple[str, Any]]:
    """``(dotted key, leaf)`` for every leaf of nested dicts, lists and tuples."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(f"{where}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(f"{where}[{i}]", item)
    else:
        yield where, value


def damaged(path: str | os.PathLike, why: str) -> CheckpointError:
    """The error for the checkpoint at ``path``: what is wrong and what to do."""
    return CheckpointError(Path(path), why)
