"""Parameter dicts that travel between server and workers.

Only the *trainable* parameters of a model take part in federated arithmetic:
buffers (BatchNorm statistics, counters) and frozen weights (the base model under
an adapter) never enter it, so they are never averaged, sent or counted. A `ParamSpec`
records the names, shapes and dtypes of those tensors once, so that servers can
work on one flat vector ``x ∈ R^d`` (cheap sums, one memory slot per worker) and
convert back to a named dict whenever tensors leave the server.

Bytes on the wire are counted as ``Σ numel · itemsize`` of the transmitted tensors
(payload only; no protocol overhead).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

Params = dict[str, torch.Tensor]


def trainable_params(model: nn.Module) -> Params:
    """Detached copies of the parameters with ``requires_grad=True``, by name."""
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters: federated training needs at "
            "least one parameter with requires_grad=True (e.g. an adapter from lifelong.wrap)"
        )
    return params


def nbytes(params: Mapping[str, torch.Tensor]) -> int:
    """Bytes needed to send ``params``: the sum of numel · itemsize."""
    return sum(t.numel() * t.element_size() for t in params.values())


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and dtypes of the trainable tensors, in a fixed order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor]) -> "ParamSpec":
        for name, t in params.items():
            if not t.is_floating_point():
                raise ValueError(
                    f"parameter {name!r} has dtype {t.dtype}; only floating-point tensors can be "
                    "federated (leave integer buffers out of the trainable set)"
                )
        return cls(
            names=tuple(params),
            shapes=tuple(tuple(t.shape) for t in params.values()),
            dtypes=tuple(t.dtype for t in params.values()),
        )

    @property
    def numel(self) -> int:
        return sum(_prod(s) for s in self.shapes)

    @property
    def flat_dtype(self) -> torch.dtype:
        """The widest dtype among the tensors; the flat vector is kept in it."""
        out = self.dtypes[0]
        for d in self.dtypes[1:]:
            out = torch.promote_types(out, d)
        return out

    @property
    def nbytes(self) -> int:
        return sum(_prod(s) * torch.empty((), dtype=d).element_size()
                   for s, d in zip(self.shapes, self.dtypes))

    def check(self, params: Mapping[str, torch.Tensor]) -> str | None:
        """Why ``params`` does not fit this spec (``"keys"``/``"shape"``/``"nonfinite"``), or None."""
        if set(params) != set(self.names):
            return "keys"
        for name, shape in zip(self.names, self.shapes):
            t = params[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                return "shape"
            if not t.is_floating_point():
                return "dtype"
        for t in params.values():
            if not bool(torch.isfinite(t).all()):
                return "nonfinite"
        return None

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.flat_dtype
        return torch.cat([params[n].detach().reshape(-1).to(dtype) for n in self.names])

    def unflatten(self, vec: torch.Tensor) -> Params:
        out: Params = {}
        offset = 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            n = _prod(shape)
            out[name] = vec[offset:offset + n].reshape(shape).to(dtype).clone()
            offset += n
        return out

    def describe(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "dtypes": [str(d) for d in self.dtypes]}


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short content hash, used to recognise a checkpoint's configuration."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
