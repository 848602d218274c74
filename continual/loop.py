"""The pieces every continual training loop shares: batches, task masks, evaluation, optimizers, checkpoints.

The native loop (:mod:`.runner`), the Avalanche engine (:mod:`.avalanche_bridge`) and the Hugging
Face ``Trainer`` route (:mod:`.hf_bridge`) build on these, so that all three seed, mask and
evaluate in the same way.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .. import checkpoint
from ..checkpoint import fingerprint
from .metrics import accuracy
from .streams import experience_classes, has_task_labels

CHECKPOINT = "checkpoint.pt"


# --------------------------------------------------------------------------------------------- data
def unpack(batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` or ``(x, y, t)`` batch → tensors on ``device`` (t None when absent)."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError("stream items must be (x, y) or (x, y, task) tuples")
    x, y = batch[0].to(device), batch[1].to(device)
    t = batch[2].to(device) if len(batch) > 2 else None
    return x, y, t


class Experience:
    """An experience whose data was copied into tensors once (Avalanche item access is slow)."""

    def __init__(self, exp, index: int):
        self.dataset = materialize(exp.dataset)
        self.classes_in_this_experience = experience_classes(exp)
        self.task_labels = list(exp.task_labels) if has_task_labels(exp) else []
        self.current_experience = index


def materialize(dataset) -> TensorDataset:
    """All items of a map-style dataset as one TensorDataset (same item order and tuple layout)."""
    columns: list[list[torch.Tensor]] | None = None
    for batch in DataLoader(dataset, batch_size=1024, shuffle=False):
        if columns is None:
            columns = [[] for _ in batch]
        for col, part in zip(columns, batch):
            col.append(torch.as_tensor(part))
    if columns is None:
        raise ValueError("an experience has an empty dataset")
    return TensorDataset(*[torch.cat(c) for c in columns])


class _Shuffle(torch.utils.data.Sampler):
    """A new permutation from ``generator`` at every pass, as ``RandomSampler`` draws it.

    Its own class, so that wrappers which swap a ``RandomSampler`` for a re-seeded one
    (accelerate, under ``transformers.Trainer``) keep this order."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size, self.generator = size, generator

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        yield from torch.randperm(self.size, generator=self.generator).tolist()


def shuffled_loader(data, batch_size: int, seed: int, buckets: bool = False) -> DataLoader:
    """Batches of ``data`` in an order fixed by ``seed`` (a new permutation each epoch).

    ``buckets=True`` (packed text samples only): batches of similar token counts, so that a batch
    pads to less (see :class:`_LengthBuckets`)."""
    g = torch.Generator().manual_seed(seed)
    if buckets:
        return DataLoader(data, batch_sampler=_LengthBuckets(token_counts(data), batch_size, g))
    return DataLoader(data, batch_size=batch_size, sampler=_Shuffle(len(data), g), generator=g)


def token_counts(data) -> torch.Tensor:
    """Tokens of each packed ``(2, L)`` text sample (its attention mask's sum)."""
    first = data[0][0]
    if not (isinstance(first, torch.Tensor) and first.dim() == 2 and first.shape[0] == 2):
        raise ValueError("length buckets need packed text samples (2, L); this stream holds other inputs")
    return torch.stack([data[i][0][1].sum() for i in range(len(data))])


class _LengthBuckets(torch.utils.data.Sampler):
    """Batches of similar length: each pass shuffles the samples, cuts the permutation into windows
    of 50 batches, sorts each window by token count, cuts it into batches and shuffles the batches
    (the "bucket by sequence length" of the Hugging Face Trainer's ``group_by_length``)."""

    WINDOW = 50

    def __init__(self, lengths: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator)
        span = self.WINDOW * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            window = order[start:start + span]
            window = window[torch.argsort(self.lengths[window], descending=True, stable=True)]
            batches += [window[k:k + self.batch_size].tolist() for k in range(0, len(window), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]


def experience_seed(seed: int, index: int) -> int:
    return seed * 100_003 + index * 7_919 + 17


def task_class_masks(train_exps: list, scenario: str) -> dict[int, list[int]] | None:
    """Task label → classes of that task (task-incremental only; None means no masking)."""
    if scenario != "task-incremental":
        return None
    masks: dict[int, list[int]] = {}
    for i, exp in enumerate(train_exps):
        label = int(exp.task_labels[0]) if has_task_labels(exp) else i
        masks.setdefault(label, [])
        masks[label] = sorted(set(masks[label]) | set(experience_classes(exp)))
    return masks


def restrict_logits(logits: torch.Tensor, t: torch.Tensor | None, masks: dict | None, fallback: int) -> torch.Tensor:
    """Set the logits of classes outside each sample's task to -inf (task-incremental)."""
    if masks is None:
        return logits
    allowed = torch.zeros(max(masks) + 1, logits.shape[-1], dtype=torch.bool, device=logits.device)
    for label, classes in masks.items():
        allowed[label, classes] = True
    labels = t if t is not None else torch.full((logits.shape[0],), fallback, device=logits.device)
    return logits.masked_fill(~allowed[labels.long()], float("-inf"))


def set_candidates(model: nn.Module, experiences: list | None, masks: dict | None, seen: int | None = None,
                   task: int | None = None) -> None:
    """Which classes a label-scoring text classifier scores (other models are left alone).

    Training experience ``seen``: every class of experiences 0..seen (replayed samples included).
    Evaluating task ``task``: its classes in task-incremental runs, else every class.
    """
    if not hasattr(model, "candidates"):
        return
    if task is not None:
        model.candidates = masks[task] if masks is not None and task in masks else None
    else:
        model.candidates = sorted({c for e in experiences[: seen + 1] for c in experience_classes(e)})


@torch.no_grad()
def evaluate_stream(predict: Callable, test_exps: list, masks: dict | None, batch_size: int, device,
                    split: bool = True) -> list[float]:
    """Accuracy on each test experience; ``predict(x, t, j)`` returns logits.

    Under several processes each evaluates its share of every test set (rows ``rank::world``) and
    the predictions are gathered, so every process returns the same accuracies; ``split=False``
    (a sharded model, whose forward is a collective) has every process evaluate every sample."""
    from .distributed import all_gather_objects, rank, world_size

    split = split and world_size() > 1
    accs = []
    for j, exp in enumerate(test_exps):
        preds, targets, n_classes = [], [], 0
        data = exp.dataset
        if split:
            data = torch.utils.data.Subset(data, list(range(rank(), len(data), world_size())))
        for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
            x, y, t = unpack(batch, device)
            logits = predict(x, t, j)
            if logits is None:  # the method cannot predict this task yet (KCL before training it)
                break
            logits = restrict_logits(logits, t, masks, j)
            n_classes = logits.shape[-1]
            preds.append(logits.argmax(-1).cpu())
            targets.append(y.cpu())
        if split:
            parts = all_gather_objects((preds, targets, n_classes))
            preds = [p for part in parts for p in part[0]]
            targets = [y for part in parts for y in part[1]]
            n_classes = max(part[2] for part in parts)
        accs.append(accuracy(torch.cat(preds), torch.cat(targets), num_classes=n_classes) if preds else float("nan"))
    return accs


# ---------------------------------------------------------------------------------- checkpoints
#: what a continual checkpoint holds (``runner``: model, optimizer and method states, all finite)
CHECKPOINT_KEYS = ("fingerprint", "config", "completed", "elapsed", "steps", "step_time", "matrix", "initial", "runner")


def save_checkpoint(folder: str, state: dict) -> None:
    """Write ``folder/checkpoint.pt`` atomically with its digest (:mod:`lifelong.checkpoint`)."""
    checkpoint.save(os.path.join(folder, CHECKPOINT), state)


def load_checkpoint(folder: str, config: dict, *, experiences: int | None = None) -> dict | None:
    """The state saved in ``folder``, or None when there is none to resume from.

    A damaged checkpoint (cut short, empty, another file, edited or flipped bytes, NaN or infinite
    weights, keys missing, ``completed`` outside ``0..experiences`` when ``experiences`` is given)
    is not resumed: a ``RuntimeWarning`` names the file and why, and the run starts over from the
    first experience (as the federated simulator does). A whole checkpoint of another
    configuration is a ``ValueError``: starting over would overwrite that run's work.
    """
    path = os.path.join(folder, CHECKPOINT)
    if not os.path.exists(path):
        return None
    try:
        state = checkpoint.load(path, finite=("runner",))
        check_contents(path, state, experiences)
    except checkpoint.CheckpointError as err:
        warnings.warn(f"checkpoint {str(err.path)!r} {err.reason}; starting the stream over from the first experience",
                      RuntimeWarning, stacklevel=3)
        return None
    if state["fingerprint"] != fingerprint(config):
        saved = json.loads(state["config"])
        diff = sorted(k for k in set(saved) | set(config) if json.dumps(saved.get(k), sort_keys=True, default=str)
                      != json.dumps(config.get(k), sort_keys=True, default=str))
        raise ValueError(f"checkpoint {path} was written by a different configuration (differs in: {', '.join(diff)}); "
                         "use another checkpoint_dir or resume=False")
    return state


def check_contents(path: str, state: dict, experiences: int | None) -> None:
    """Raise :class:`~lifelong.checkpoint.CheckpointError` unless ``state`` holds every key of
    :data:`CHECKPOINT_KEYS` and a ``completed`` count the stream can have."""
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise checkpoint.damaged(path, f"is not a continual checkpoint (missing {missing})")
    completed = state["completed"]
    if isinstance(completed, bool) or not isinstance(completed, int) or completed < 0:
        raise checkpoint.damaged(path, f"holds completed={completed!r}, not a count of experiences")
    if experiences is not None and completed > experiences:
        raise checkpoint.damaged(path, f"holds completed={completed}, but the stream has {experiences} experiences")
    try:
        json.loads(state["config"])
    except (TypeError, ValueError) as err:
        raise checkpoint.damaged(path, f"holds a config that is not JSON ({err})") from err


def make_optimizer(optimizer, params: list, lr: float, method=None) -> torch.optim.Optimizer:
    """The method's own optimizer if it has one (CLASSP), else ``"sgd"``, ``"adam"`` or a callable."""
    own = method.make_optimizer(params, lr) if method is not None else None
    if own is not None:
        return own
    if callable(optimizer):
        return optimizer(params)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise ValueError(f"unknown optimizer {optimizer!r}; valid: 'sgd', 'adam', 'adamw' or a callable params -> Optimizer")


def trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter")
    return params


