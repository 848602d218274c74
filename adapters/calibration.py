"""Calibration: streamed input-activation covariance of many linear layers in one pass.

One pass of user data through the model collects, for every targeted layer at once,

    C = (1/N) Σ_j w_j X_jᵀ X_j          (un-centred, no mean subtraction)

where ``X_j`` (T_j × in) are the layer's input rows of one sequence (padding rows dropped with the
batch's ``attention_mask``), accumulated in float32 (or float64) through
:func:`lifelong.kernels.cov_product`. Two weightings (CorDA, arXiv 2406.05223, and KORE, arXiv 2510.19316, collect
the same statistic; PEFT's CorDA code fixes the per-call one):

- ``normalize="max"`` (CorDA / KORE / PEFT parity): ``w_j = 1/|max(X_j)|²`` with the *signed* max
  over all entries of one sequence, and N = number of sequences. PEFT's hook sees one unpadded
  sequence per call (batch size 1); treating each sequence of a padded batch as its own call
  gives exactly the same C as running the sequences one by one. A 2-D layer input
  (tokens × in, e.g. an MLP batch) is one call, as in PEFT. Guard (ours): when the signed max is
  0 we use ``max|X_j|`` instead, and an all-zero sequence is given weight 1 (it adds nothing),
  where PEFT would divide by zero.
- ``normalize="none"``: ``w_j = 1`` and N = number of tokens, the plain second moment ``E[x xᵀ]``.

Memory is one in×in matrix per layer, never per-sample storage. Layers that receive the very same
input tensor in a forward pass (q/k/v projections) compute ``X̃ᵀX̃`` once and share it.
Statistics save to and load from safetensors so KORE and CorDA-KPM reuse one calibration.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..files import atomic_write
from ..kernels import cov_product
from .layers import unwrap

NORMALIZATIONS = ("max", "none")
COV_DTYPES = {"float32": torch.float32, "float64": torch.float64}
FORMAT = "lifelong.covariance.v1"


@dataclass
class CovarianceStats:
    """Summed covariances per layer and their counts.

    ``sums[name]`` is ``Σ_j w_j X_jᵀ X_j`` (in×in), ``calls[name]`` the number of sequences
    (calls), ``tokens[name]`` the number of rows that entered the sum.
    """

    sums: dict[str, Tensor]
    calls: dict[str, int]
    tokens: dict[str, int]
    normalize: str = "max"
    meta: dict[str, Any] = field(default_factory=dict)

    def covariance(self, name: str) -> Tensor:
        """Normalised C of one layer: sum / calls (``max``, PEFT) or sum / tokens (``none``)."""
        if name not in self.sums:
            raise KeyError(f"no covariance for layer {name!r}; layers with statistics: {sorted(self.sums)[:20]}")
        count = self.calls[name] if self.normalize == "max" else self.tokens[name]
        return self.sums[name] / count

    def check_layers(self, layers: Mapping[str, nn.Module]) -> None:
        """Raise if a layer is missing or its in-features do not match (a file of another model)."""
        missing = sorted(set(layers) - set(self.sums))
        if missing:
            raise ValueError(
                f"covariance statistics have no entry for layer(s) {missing[:10]}; they were collected for "
                f"{sorted(self.sums)[:10]}{' ...' if len(self.sums) > 10 else ''} (another model or other targets?)"
            )
        for name, module in layers.items():
            in_f = layer_in_features(module)
            shape = tuple(self.sums[name].shape)
            if shape != (in_f, in_f):
                raise ValueError(
                    f"covariance for layer {name!r} has shape {shape} but the layer has {in_f} input "
                    f"features (expected ({in_f}, {in_f})): the statistics belong to another model"
                )

    def save(self, path: str | os.PathLike) -> None:
        """Write all layers to one safetensors file (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "normalize": self.normalize, "calls": self.calls, "tokens": self.tokens,
                "meta": self.meta}
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.sums.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"lifelong": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "CovarianceStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no covariance statistics file at {str(path)!r}")
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw = (f.metadata() or {}).get("lifelong")
            meta = json.loads(raw) if raw else {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{str(path)!r} is not a lifelong covariance file (written by CovarianceStats.save)")
            sums = {name: f.get_tensor(name) for name in f.keys()}
        return cls(sums, meta["calls"], meta["tokens"], meta["normalize"], meta.get("meta", {}))


def layer_in_features(module: nn.Module) -> int:
    layer = unwrap(module)
    if isinstance(layer, nn.Linear):
        return layer.in_features
    weight = getattr(layer, "weight", None)
    if weight is None or weight.dim() != 2:
        raise TypeError(f"calibration supports linear layers only, got {type(layer).__name__}")
    return weight.shape[1]


def resolve_statistics(
    source: Any, model: nn.Module, layers: Mapping[str, nn.Module], *, normalize: str, cov_dtype: str = "float32",
    progress: bool = True,
) -> CovarianceStats:
    """Statistics from a :class:`CovarianceStats`, a saved file path, or an iterable of batches."""
    if source is None:
        raise ValueError("this adapter needs calibration=<iterable of batches | CovarianceStats | path to a saved file>")
    if isinstance(source, CovarianceStats):
        stats = source
    elif isinstance(source, (str, os.PathLike)):
        stats = CovarianceStats.load(source, device=first_device(layers))
    elif isinstance(source, (Tensor, Mapping)):
        # Iterating a tensor gives its rows and a dict gives its keys: neither is a batch.
        what = f"a tensor of shape {tuple(source.shape)}" if isinstance(source, Tensor) else "a dict"
        raise TypeError(
            f"calibration must be an iterable of batches (a list or DataLoader of input tensors, of dicts for "
            f"Hugging Face models, or of (x, y) tuples), a CovarianceStats or a saved file; got {what}: pass "
            f"[batch] for a single batch"
        )
    else:
        return calibrate(model, source, layers, normalize=normalize, cov_dtype=cov_dtype, progress=progress)
    stats.check_layers(layers)
    if stats.normalize != normalize:
        raise ValueError(
            f"covariance statistics were collected with normalize={stats.normalize!r} but this adapter "
            f"asks for {normalize!r}; recalibrate or change the adapter's normalisation setting"
        )
    return stats


def first_device(layers: Mapping[str, nn.Module]) -> torch.device:
    for module in layers.values():
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


class _Collector:
    """Forward hooks that accumulate per-layer covariance for the current batch."""

    def __init__(self, layers: Mapping[str, nn.Module], normalize: str, dtype: torch.dtype):
        self.normalize, self.dtype = normalize, dtype
        self.sums: dict[str, Tensor] = {}
        self.calls = dict.fromkeys(layers, 0)
        self.tokens = dict.fromkeys(layers, 0)
        self.mask: Tensor | None = None
        self._last_input: Tensor | None = None
        self._last_version = -1
        self._scratch: dict[tuple[int, torch.device], Tensor] = {}
        self._last_product: tuple[Tensor, int, int] | None = None
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in layers.items()]
        self.in_features = {name: layer_in_features(m) for name, m in layers.items()}

    def start_batch(self, mask: Tensor | None) -> None:
        # a mask without padding drops nothing: checked once per batch, so no hook pays for it
        self.mask = mask.bool() if mask is not None and not bool(mask.all()) else None
        self._last_input, self._last_product = None, None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._last_input, self._last_product = None, None
        self._scratch = {}

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0]
            # the same tensor, unchanged since (an in-place op bumps _version): reuse its product
            if x is self._last_input and x._version == self._last_version and self._last_product is not None:
                product, calls, tokens = self._last_product
            else:
                product, calls, tokens = self._product(name, x)
                self._last_input, self._last_version, self._last_product = x, x._version, (product, calls, tokens)
            if name in self.sums:
                self.sums[name].add_(product)
            else:
                self.sums[name] = product.clone()
            self.calls[name] += calls
            self.tokens[name] += tokens

        return hook

    def _product(self, name: str, x: Tensor) -> tuple[Tensor, int, int]:
        d = self.in_features[name]
        if x.shape[-1] != d:
            raise ValueError(f"layer {name!r} received inputs with last dimension {x.shape[-1]}, expected {d}")
        x = x.detach()
        if x.dim() >= 3:
            seqs = x.reshape(-1, x.shape[-2], d)  # (sequences, positions, in)
            keep = self._rows_kept(seqs.shape[:2], x.device)
        else:
            seqs = x.reshape(1, -1, d)  # a 2-D input is one call, as in PEFT
            keep = None
        seqs = seqs.to(self.dtype)
        if self.normalize == "max":
            # divide (not multiply by the reciprocal): bit-identical to PEFT's hook, whose results
            # the ill-conditioned CorDA inverse amplifies ~1e5-fold
            seqs = seqs / sequence_scale(seqs, keep).unsqueeze(-1).unsqueeze(-1)
        rows = seqs[keep] if keep is not None else seqs.reshape(-1, d)
        n_seq = int(keep.any(dim=1).sum()) if keep is not None else seqs.shape[0]
        return cov_product(rows, out=self._scratch_for(d, x.device)), n_seq, rows.shape[0]

    def _scratch_for(self, d: int, device: torch.device) -> Tensor:
        """One d×d product buffer per width, reused: the product lives only until the next
        input's product (it is added to the sums at once, or reused by layers sharing the input)."""
        key = (d, device)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(d, d, dtype=self.dtype, device=device)
        return self._scratch[key]

    def _rows_kept(self, shape: torch.Size, device: torch.device) -> Tensor | None:
        """Boolean (sequences, positions) mask from the batch's attention mask, when it fits."""
        if self.mask is None:
            return None
        mask = self.mask.to(device=device)
        if tuple(mask.shape) != tuple(shape):
            return None  # e.g. a pooler input (batch, hidden): no padding positions there
        return mask


def sequence_scale(seqs: Tensor, keep: Tensor | None) -> Tensor:
    """``|max(X_j)|`` per sequence (signed max over valid rows), guarded against zeros."""
    # per-row extremes first (max is exact, so dropping padding rows afterwards changes nothing)
    # and one pass over the activations instead of masked copies of them
    row_min, row_max = torch.aminmax(seqs, dim=2)
    row_abs = torch.maximum(row_max, -row_min)
    if keep is not None:
        row_max = row_max.masked_fill(~keep, float("-inf"))
        row_abs = row_abs.masked_fill(~keep, 0.0)
    signed, absmax = row_max.amax(dim=1), row_abs.amax(dim=1)
    scale = signed.abs()
    scale = torch.where(scale > 0, scale, absmax)  # all entries <= 0: fall back to max|X|
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero sequence adds nothing


def split_batch(batch: Any) -> tuple[tuple, dict, Tensor | None]:
    """Model call arguments and the attention mask for one batch of any supported form."""
    if isinstance(batch, Tensor):
        return (batch,), {}, None
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        kwargs.pop("labels", None)
        return (), kwargs, kwargs.get("attention_mask")
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if isinstance(first, Mapping):
            return split_batch(first)
        if isinstance(first, Tensor):
            return (first,), {}, None
    raise TypeError(
        f"calibration batches must be tensors, dicts of model inputs (HF batches) or (x, y) tuples; "
        f"got {type(batch).__name__}"
    )


def move_to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: move_to(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(move_to(v, device) for v in value)
    return value


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Mapping[str, nn.Module] | list[str] | str,
    *,
    normalize: str = "max",
    cov_dtype: str = "float32",
    progress: bool = True,
) -> CovarianceStats:
    """Run ``batches`` through ``model`` once and return every layer's covariance statistics.

    ``layers`` is a dict name -> module, a list of module names, or a ``target_modules`` value
    (suffixes / regex / ``"all-linear"``). The model runs in eval mode under ``no_grad``; hooks
    are removed and the training mode restored even when a batch fails.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
    if cov_dtype not in COV_DTYPES:
        raise ValueError(f"cov_dtype must be one of {list(COV_DTYPES)}, got {cov_dtype!r}")
    layers = resolve_layers(model, layers)
    from tqdm.auto import tqdm

    device = first_device(layers)
    was_training = model.training
    collector = _Collector(layers, normalize, COV_DTYPES[cov_dtype])
    n_batches = 0
    try:
        model.eval()
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            args, kwargs, mask = split_batch(batch)
            collector.start_batch(mask)
            model(*move_to(args, device), **move_to(kwargs, device))
            n_batches += 1
    finally:
        collector.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("calibration data is empty: the iterable yielded no batch")
    stats = CovarianceStats(collector.sums, collector.calls, collector.tokens, normalize, {"batches": n_batches})
    check_collected(stats, layers)
    return stats


def check_collected(stats: CovarianceStats, layers: Mapping[str, nn.Module]) -> None:
    never = [name for name in layers if stats.tokens[name] == 0]
    if never:
        raise ValueError(
            f"calibration never reached targeted layer(s) {never[:10]}: no input rows passed through them "
            f"(check the targets and that the batches exercise those modules)"
        )
    for name, total in stats.sums.items():
        if not bool(torch.isfinite(total).all()):
            raise ValueError(
                f"calibration produced NaN/inf covariance for layer {name!r}: its input activations are not "
                f"finite (check the data and the model's dtype)"
            )


def resolve_layers(model: nn.Module, layers: Mapping[str, nn.Module] | list[str] | str) -> dict[str, nn.Module]:
    if isinstance(layers, Mapping):
        resolved = dict(layers)
    elif isinstance(layers, list) and layers and all(isinstance(n, str) for n in layers) and all(
        _has_module(model, n) for n in layers
    ):
        resolved = {n: model.get_submodule(n) for n in layers}
    else:
        from .targeting import find_targets

        resolved = find_targets(model, layers, None, (nn.Linear,), "calibration")
    if not resolved:
        raise ValueError("calibration needs at least one target layer")
    return resolved


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
