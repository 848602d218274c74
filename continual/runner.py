"""``run_stream``: train a model through a stream with any method, evaluate after every experience.

Two engines share the evaluation, checkpointing and result code:

* ``"native"`` — a plain torch loop (forward → backward → method hook → step → method hook);
  methods ``naive``, ``migu``, ``classp``, ``powerlaw``, ``kcl``, ``gkcl``.
* ``"avalanche"`` — an Avalanche strategy per experience (``strategy.train(exp)``) with our
  plugins for ``migu``/``powerlaw``, the CLASSP optimizer, the kernel strategies, and every
  Avalanche baseline (``naive``, ``ewc``, ``replay``, ``lwf``, ``si``, ``agem``, ``gem``, ``mas``,
  ``cumulative``).

After training experience i the model is evaluated on the test set of every experience j
(R[i, j]); before any training once more (b[j], for forward transfer). Accuracies are computed
with torchmetrics on each experience's own test set; in task-incremental scenarios the logits of
each sample are restricted to the classes of its task (during training as well).

Determinism: every experience re-seeds torch from ``(seed, i)`` and shuffles with its own
generator, so a run resumed from the checkpoint written after experience i gives exactly the same
numbers as an uninterrupted one. Checkpoints are ``torch.save`` dicts of tensors and plain values
only (read back with ``weights_only=True``), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

from ..files import atomic_write
from .classp import CLASSP
from .metrics import AccuracyMatrix, accuracy
from .migu import MIGU
from .powerlaw_replay import PowerLawReplay
from .result import StreamResult
from .streams import check_benchmark, experience_classes, has_task_labels, scenario_of

__all__ = ["run_stream", "METHODS", "AVALANCHE_BASELINES", "evaluate_stream"]

NATIVE_METHODS = ("naive", "migu", "classp", "powerlaw", "kcl", "gkcl")
AVALANCHE_BASELINES = ("naive", "ewc", "replay", "lwf", "si", "agem", "gem", "mas", "cumulative")
METHODS = tuple(sorted(set(NATIVE_METHODS) | set(AVALANCHE_BASELINES)))
ENGINES = ("auto", "native", "avalanche")
CHECKPOINT = "checkpoint.pt"


# --------------------------------------------------------------------------------------------- data
def unpack(batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` or ``(x, y, t)`` batch → tensors on ``device`` (t None when absent)."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError("stream items must be (x, y) or (x, y, task) tuples")
    x, y = batch[0].to(device), batch[1].to(device)
    t = batch[2].to(device) if len(batch) > 2 else None
    return x, y, t


class _Experience:
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


@torch.no_grad()
def evaluate_stream(predict: Callable, test_exps: list, masks: dict | None, batch_size: int, device) -> list[float]:
    """Accuracy on each test experience; ``predict(x, t, j)`` returns logits."""
    accs = []
    for j, exp in enumerate(test_exps):
        preds, targets, n_classes = [], [], 0
        for batch in DataLoader(exp.dataset, batch_size=batch_size, shuffle=False):
            x, y, t = unpack(batch, device)
            logits = predict(x, t, j)
            if logits is None:  # the method cannot predict this task yet (KCL before training it)
                break
            logits = restrict_logits(logits, t, masks, j)
            n_classes = logits.shape[-1]
            preds.append(logits.argmax(-1).cpu())
            targets.append(y.cpu())
        accs.append(accuracy(torch.cat(preds), torch.cat(targets), num_classes=n_classes) if preds else float("nan"))
    return accs


# --------------------------------------------------------------------------------------- methods
class _NativeHooks:
    """Per-method hooks of the native loop (naive: none)."""

    def __init__(self, method=None):
        self.method = method

    def before_experience(self, model: nn.Module, index: int) -> None:
        if isinstance(self.method, MIGU):
            self.method.before_experience(model, index)

    def train_dataset(self, index: int, train_exps: list):
        current = train_exps[index].dataset
        if not isinstance(self.method, PowerLawReplay):
            return current
        picks = self.method.phase_indices(index, len(current))
        parts = [current] + [Subset(train_exps[j].dataset, idx.tolist()) for j, idx in sorted(picks.items())]
        return ConcatDataset(parts)

    def after_backward(self) -> None:
        if isinstance(self.method, MIGU):
            self.method.mask_gradients()

    def after_update(self) -> None:
        if isinstance(self.method, MIGU):
            self.method.after_step()

    def after_experience(self, index: int, train_exps: list) -> None:
        if isinstance(self.method, MIGU):
            self.method.after_experience()
        elif isinstance(self.method, PowerLawReplay):
            self.method.remember(len(train_exps[index].dataset))

    def state_dict(self) -> dict:
        return self.method.state_dict() if isinstance(self.method, PowerLawReplay) else {}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self.method, PowerLawReplay):
            self.method.load_state_dict(state)

    def memory(self) -> dict:
        if isinstance(self.method, PowerLawReplay):
            return {"replay_samples": self.method.memory_samples()}
        return {}


def _method_object(method, options: dict):
    """Method name or object → (name, object or None)."""
    from .gkcl import GKCL
    from .kcl import KCL

    if isinstance(method, (MIGU, PowerLawReplay, KCL, GKCL)):
        if options:
            raise ValueError("method_options only apply to a method given by name; configure the object instead")
        return method.name, method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name ({', '.join(METHODS)}) or a MIGU/PowerLawReplay/KCL/GKCL "
                        f"object, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    factories = {"migu": MIGU, "powerlaw": PowerLawReplay, "kcl": KCL, "gkcl": GKCL}
    if method in factories:
        return method, factories[method](**options)
    return method, None


def _make_optimizer(optimizer, name: str, params: list, lr: float, options: dict) -> torch.optim.Optimizer:
    if name == "classp":
        return CLASSP(params, lr=lr, **options)
    if callable(optimizer):
        return optimizer(params)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {optimizer!r}; valid: 'sgd', 'adam' or a callable params -> Optimizer")


# ---------------------------------------------------------------------------------- checkpoints
def _fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _save_checkpoint(folder: str, state: dict) -> None:
    atomic_write(os.path.join(folder, CHECKPOINT), lambda tmp: torch.save(state, tmp))


def _load_checkpoint(folder: str, config: dict) -> dict | None:
    path = os.path.join(folder, CHECKPOINT)
    if not os.path.exists(path):
        return None
    state = torch.load(path, weights_only=True, map_location="cpu")
    if state["fingerprint"] != _fingerprint(config):
        saved = json.loads(state["config"])
        diff = sorted(k for k in set(saved) | set(config) if json.dumps(saved.get(k), sort_keys=True, default=str)
                      != json.dumps(config.get(k), sort_keys=True, default=str))
        raise ValueError(f"checkpoint {path} was written by a different configuration (differs in: {', '.join(diff)}); "
                         "use another checkpoint_dir or resume=False")
    return state


# ------------------------------------------------------------------------------------ the runner
def _wrap_adapter(model: nn.Module, adapter, adapter_options: dict) -> nn.Module:
    if adapter is None:
        return model
    import lifelong

    return lifelong.wrap(model, adapter, **adapter_options)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter")
    return params


def run_stream(model: nn.Module, stream, method="naive", *, method_options: dict | None = None,
               adapter: str | None = None, adapter_options: dict | None = None, per_task_adapter: bool = False,
               engine: str = "auto",
               optimizer="sgd", epochs: int = 1, lr: float = 0.01, batch_size: int = 32,
               eval_batch_size: int = 512, seed: int = 0, device: str | torch.device = "cpu",
               checkpoint_dir: str | None = None, resume: bool = False, progress: bool = True,
               criterion: nn.Module | None = None) -> StreamResult:
    """Train ``model`` through ``stream`` (an Avalanche benchmark) and return a :class:`StreamResult`.

    Args:
        model: a classifier returning logits (for ``kcl``/``gkcl``: the feature extractor).
        stream: any Avalanche benchmark with aligned ``train_stream``/``test_stream``.
        method: one of ``METHODS`` or a ``MIGU``/``PowerLawReplay``/``KCL``/``GKCL`` object;
            ``method_options`` are passed to the method's constructor (Avalanche baselines:
            to the strategy, e.g. ``{"ewc_lambda": 100}``; ``classp``: to :class:`CLASSP`).
        adapter, adapter_options: a registry adapter put on the model (``lifelong.wrap``), shared
            across tasks; only its parameters train. ``per_task_adapter=True`` keeps one adapter per
            experience instead (``lifelong.adapters.routing.TaskRoutedModel``; native engine): the
            adapter of experience i trains during i, and test experience j is routed to adapter j
            (the experience index is the task id, an oracle in class/domain-incremental streams).
        engine: ``"native"``, ``"avalanche"`` or ``"auto"`` (native for our methods and naive).
        optimizer: ``"sgd"``, ``"adam"`` or a callable ``params -> Optimizer`` (ignored by classp).
        checkpoint_dir, resume: checkpoint after every experience; ``resume=True`` continues from it.
    """
    method_options = dict(method_options or {})
    adapter_options = dict(adapter_options or {})
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if per_task_adapter and adapter is None:
        raise ValueError("per_task_adapter=True needs adapter=<registry name>")
    train_exps, test_exps = check_benchmark(stream)
    name, method_obj = _method_object(method, method_options)
    if engine == "auto":
        engine = "native" if name in NATIVE_METHODS else "avalanche"
    if engine == "native" and name not in NATIVE_METHODS:
        raise ValueError(f"method {name!r} runs only in the Avalanche engine; native methods: {', '.join(NATIVE_METHODS)}")
    if per_task_adapter and (engine != "native" or name in ("kcl", "gkcl")):
        raise ValueError("per_task_adapter=True runs in the native engine with naive, migu, classp or powerlaw")
    device = torch.device(device)
    scenario = scenario_of(stream)
    masks = task_class_masks(train_exps, scenario)
    criterion = criterion or nn.CrossEntropyLoss()

    torch.manual_seed(seed)
    if per_task_adapter:
        from lifelong.adapters.routing import TaskRoutedModel

        model = TaskRoutedModel(model, adapter, **adapter_options).to(device)
    else:
        model = _wrap_adapter(model, adapter, adapter_options).to(device)
    config = {
        "method": name, "method_config": method_obj.config() if method_obj is not None else method_options,
        "engine": engine, "scenario": scenario, "adapter": adapter, "adapter_options": adapter_options,
        "per_task_adapter": per_task_adapter,
        "optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "callable"),
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
        "stream": [[len(e.dataset) for e in train_exps], [len(e.dataset) for e in test_exps]],
        "model": {k: list(v.shape) for k, v in model.state_dict().items()},
    }
    test_sets = [_Experience(e, j) for j, e in enumerate(test_exps)]
    if engine == "avalanche":
        from .avalanche_bridge import AvalancheEngine

        runner = AvalancheEngine(model, name, method_obj, method_options, optimizer, lr, epochs, batch_size,
                                 eval_batch_size, device, criterion, masks, train_exps, seed)
    else:
        train_exps = [_Experience(e, i) for i, e in enumerate(train_exps)]
        runner = _NativeEngine(model, name, method_obj, method_options, optimizer, lr, epochs, batch_size,
                               device, criterion, masks, train_exps, seed)
    return _loop(runner, config, train_exps, test_sets, masks, eval_batch_size, device, seed, checkpoint_dir,
                 resume, progress)


def _loop(runner, config, train_exps, test_exps, masks, eval_batch_size, device, seed, checkpoint_dir, resume,
          progress) -> StreamResult:
    from tqdm.auto import tqdm

    n = len(train_exps)
    matrix = AccuracyMatrix(n)
    start, elapsed, steps, step_time = 0, 0.0, 0, 0.0
    state = _load_checkpoint(checkpoint_dir, config) if resume else None
    if state is not None:
        runner.load_state_dict(state["runner"], train_exps)
        matrix = AccuracyMatrix.from_array(state["matrix"].numpy(), state["initial"].numpy())
        start, elapsed = int(state["completed"]), float(state["elapsed"])
        steps, step_time = int(state["steps"]), float(state["step_time"])
    t0 = time.perf_counter()
    if start == 0:
        torch.manual_seed(experience_seed(seed, -1))
        for j, a in enumerate(evaluate_stream(runner.predict, test_exps, masks, eval_batch_size, device)):
            if not np.isnan(a):
                matrix.record_initial(j, a)
    bar = tqdm(range(start, n), desc=f"{config['method']} ({config['engine']})", disable=not progress,
               initial=start, total=n, unit="exp")
    for i in bar:
        torch.manual_seed(experience_seed(seed, i))
        s, st = runner.train_experience(i, train_exps)
        steps, step_time = steps + s, step_time + st
        torch.manual_seed(experience_seed(seed, i) + 1)
        for j, a in enumerate(evaluate_stream(runner.predict, test_exps, masks, eval_batch_size, device)):
            if not np.isnan(a):
                matrix.record(i, j, a)
        row = matrix.as_array()[i, : i + 1]
        bar.set_postfix(avg_acc=f"{np.nanmean(row):.3f}")
        if checkpoint_dir is not None:
            _save_checkpoint(checkpoint_dir, {
                "fingerprint": _fingerprint(config), "config": json.dumps(config, sort_keys=True, default=str),
                "completed": i + 1, "elapsed": elapsed + time.perf_counter() - t0, "steps": steps,
                "step_time": step_time, "matrix": torch.from_numpy(matrix.as_array()),
                "initial": torch.from_numpy(matrix.initial()), "runner": runner.state_dict()})
    bar.close()
    return StreamResult(
        method=config["method"], engine=config["engine"], scenario=config["scenario"], seed=seed,
        accuracy_matrix=matrix.as_array().tolist(), initial_accuracy=matrix.initial().tolist(),
        wall_time_s=elapsed + time.perf_counter() - t0, train_steps=steps,
        step_time_s=step_time / max(steps, 1), trainable_parameters=runner.trainable_parameters(),
        memory=runner.memory(), config=json.loads(json.dumps(config, default=str)))


class _NativeEngine:
    """The plain torch loop (one experience at a time)."""

    def __init__(self, model, name, method_obj, method_options, optimizer, lr, epochs, batch_size, device,
                 criterion, masks, train_exps, seed):
        self.model, self.name, self.method = model, name, method_obj
        self.epochs, self.batch_size, self.device = epochs, batch_size, device
        self.criterion, self.masks, self.seed = criterion, masks, seed
        self.kernel = hasattr(method_obj, "train_experience")
        self.routed = hasattr(model, "add_task")
        self.optimizer = None
        self._make_opt = lambda: _make_optimizer(optimizer, name, _trainable(model), lr,
                                                 method_options if name == "classp" else {})
        if self.kernel:
            method_obj.setup(model, train_exps, masks, device, seed)
        elif not self.routed:
            self.optimizer = self._make_opt()
        self.hooks = _NativeHooks(method_obj)
        self.lr = lr

    def _route(self, i: int) -> None:
        """Per-task adapters: add and select experience i's adapter; its optimizer is new."""
        if i not in self.model.tasks:
            self.model.add_task(i)
        self.model.set_task(i)
        self.optimizer = self._make_opt()

    def train_experience(self, i: int, train_exps: list) -> tuple[int, float]:
        if self.kernel:
            return self.method.train_experience(self.model, i, train_exps, self.epochs, self.batch_size, self.lr)
        if self.routed:
            self._route(i)
        model, opt = self.model, self.optimizer
        self.hooks.before_experience(model, i)
        data = self.hooks.train_dataset(i, train_exps)
        g = torch.Generator().manual_seed(experience_seed(self.seed, i))
        loader = DataLoader(data, batch_size=self.batch_size, shuffle=True, generator=g)
        model.train()
        steps, step_time = 0, 0.0
        for _ in range(self.epochs):
            for batch in loader:
                x, y, t = unpack(batch, self.device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                logits = restrict_logits(model(x), t, self.masks, i)
                loss = self.criterion(logits, y)
                loss.backward()
                self.hooks.after_backward()
                opt.step()
                self.hooks.after_update()
                step_time += time.perf_counter() - t0
                steps += 1
        self.hooks.after_experience(i, train_exps)
        model.eval()
        return steps, step_time

    def predict(self, x: torch.Tensor, t, j: int) -> torch.Tensor:
        if self.kernel:
            return self.method.predict(self.model, x, j)
        self.model.eval()
        if self.routed:
            return self.model(x, task_id=j) if j in self.model.tasks else None
        return self.model(x)

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "hooks": self.hooks.state_dict()}
        if self.routed:
            state["tasks"] = list(self.model.tasks)
        if self.kernel:
            state["method"] = self.method.state_dict()
        elif self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict, train_exps: list | None = None) -> None:
        if self.routed:  # recreate the adapters of finished experiences before loading their tensors
            for task in state["tasks"]:
                self._route(int(task))
        self.model.load_state_dict(state["model"])
        self.hooks.load_state_dict(state["hooks"])
        if self.kernel:
            self.method.load_state_dict(state["method"])
        elif "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])

    def trainable_parameters(self) -> int:
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if self.kernel:
            n += self.method.extra_trainable_parameters()
        return n

    def memory(self) -> dict:
        return self.method.memory() if self.kernel else self.hooks.memory()
