"""The Avalanche engine and bridges (Avalanche 0.6); importing this module imports avalanche (seconds).

* :class:`MethodPlugin` runs any continual method (or several) inside any Avalanche strategy
  through the hook protocol: ``before_train_dataset_adaptation`` (Avalanche's first per-experience
  event) → ``before_experience``, the adapted dataset
  → ``train_dataset`` (subsets and concatenations of the experiences' datasets are rebuilt as
  Avalanche datasets), ``before_backward`` → ``loss``, ``after_backward`` → ``after_backward``,
  ``after_update`` → ``after_step``, ``after_training_exp`` → ``after_experience``.
  ``MIGUPlugin(**options)`` and ``PowerLawReplayPlugin(**options)`` are that plugin with one method.
* ``engine="avalanche"`` runs a method that Avalanche implements (EWC, LwF, Replay and the other
  baselines) as Avalanche's own strategy, and every other method as ``Naive`` with the plugin.
* CLASSP: pass ``optimizer=CLASSP(...)`` and never ``reset_optimizer_state=True``.
* :class:`KCLStrategy`: a ``SupervisedTemplate`` whose forward solves the per-task kernel ridge
  regression on the support set (coreset or generated); its optimizer is re-created per task.
* :class:`TaskMaskPlugin`: task-incremental training with a single head (logits outside each
  sample's task classes set to −inf after the forward).
"""

from __future__ import annotations

import math
import time

import torch
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_optimizers import update_optimizer
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, DataLoader, Subset

from ..hooks import Context, ContinualMethod, HookList
from ..loop import experience_seed, make_optimizer, restrict_logits, set_candidates, shuffled_loader, trainable
from ..methods.kcl import KCL
from ..methods.migu import MIGU
from ..methods.powerlaw import PowerLawReplay
from ..streams import experience_classes
from .base import Engine

__all__ = ["AvalancheEngine", "KCLStrategy", "MIGUPlugin", "MethodPlugin", "PowerLawReplayPlugin", "TaskMaskPlugin",
           "make_strategy"]


def silent_evaluator() -> EvaluationPlugin:
    """No metrics, no loggers: lifelong evaluates per experience itself (never pooled accuracy)."""
    return EvaluationPlugin(loggers=[])


def as_avalanche(dataset, original: AvalancheDataset | None = None):
    """A dataset built from Avalanche datasets with ``Subset`` / ``ConcatDataset`` → an AvalancheDataset."""
    if isinstance(dataset, AvalancheDataset):
        return dataset
    if isinstance(dataset, Subset):
        return as_avalanche(dataset.dataset).subset(list(dataset.indices))
    if isinstance(dataset, ConcatDataset):
        parts = [as_avalanche(d) for d in dataset.datasets]
        out = parts[0]
        for part in parts[1:]:
            out = out.concat(part)
        return out
    raise TypeError(f"a method's train_dataset returned {type(dataset).__name__}; inside Avalanche it must be built "
                    "from the experiences' datasets with torch Subset / ConcatDataset")


class MethodPlugin(SupervisedPlugin):
    """Continual methods (the hook protocol) inside any Avalanche strategy.

    ``experiences`` (the stream's training experiences) is needed by methods that look at earlier
    data (rehearsal); ``masks`` by methods whose extra passes use the task-masked loss (EWC)."""

    def __init__(self, methods: ContinualMethod | list, experiences: list | None = None, masks: dict | None = None):
        super().__init__()
        self.hooks = HookList(methods if isinstance(methods, (list, tuple)) else [methods])
        self.experiences, self.masks = experiences, masks
        self.ctx: Context | None = None
        self._seen: list = []

    @property
    def methods(self) -> list:
        return self.hooks.hooks

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        i = strategy.experience.current_experience
        if self.experiences is None:  # a strategy driven by hand: remember the experiences as they come
            self._seen = self._seen[:i] + [strategy.experience]
        experiences = self.experiences if self.experiences is not None else self._seen
        self.ctx = ctx = Context(model=strategy.model, experience=i, experiences=experiences,
                                 optimizer=strategy.optimizer, device=torch.device(strategy.device),
                                 masks=self.masks, batch_size=strategy.train_mb_size)
        ctx.batch_loss = lambda batch: self._batch_loss(strategy, ctx, batch)
        self.hooks.call("before_experience", ctx)

    def _batch_loss(self, strategy, ctx: Context, batch) -> torch.Tensor:
        x, y = batch[0].to(ctx.device), batch[1].to(ctx.device)
        t = batch[2].to(ctx.device) if len(batch) > 2 else None
        return strategy._criterion(restrict_logits(strategy.model(x), t, self.masks, ctx.experience), y)

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        self.ctx.experiences = list(self.ctx.experiences)
        self.ctx.experiences[self.ctx.experience] = _WithDataset(strategy.adapted_dataset)
        strategy.adapted_dataset = as_avalanche(self.hooks.train_dataset(self.ctx))
        self.ctx.total_steps = strategy.train_epochs * math.ceil(len(strategy.adapted_dataset) / strategy.train_mb_size)

    def after_forward(self, strategy, **kwargs):
        if strategy.is_training:  # the raw logits, before TaskMaskPlugin (which comes after this plugin)
            self.ctx.inputs, self.ctx.targets, self.ctx.logits = strategy.mb_x, strategy.mb_y, strategy.mb_output

    def before_backward(self, strategy, **kwargs):
        strategy.loss = self.hooks.loss(self.ctx, strategy.loss)

    def after_backward(self, strategy, **kwargs):
        if strategy.is_training:
            self.hooks.call("after_backward", self.ctx)

    def after_update(self, strategy, **kwargs):
        self.ctx.step += 1
        self.hooks.call("after_step", self.ctx)

    def after_training_exp(self, strategy, **kwargs):
        self.ctx.experiences[self.ctx.experience] = strategy.experience
        self.ctx.inputs = self.ctx.targets = self.ctx.logits = None
        self.hooks.call("after_experience", self.ctx)


class _WithDataset:
    """An experience stand-in whose ``dataset`` is the strategy's adapted dataset."""

    def __init__(self, dataset):
        self.dataset = dataset


class MIGUPlugin(MethodPlugin):
    """MIGU gradient masking inside any Avalanche strategy (``MIGUPlugin(mask_ratio=0.7)``)."""

    def __init__(self, migu: MIGU | None = None, **options):
        super().__init__(migu if migu is not None else MIGU(**options))
        self.migu = self.methods[0]


class PowerLawReplayPlugin(MethodPlugin):
    """Power-law (or exponential/uniform/none/all) rehearsal inside any Avalanche strategy."""

    def __init__(self, environment: PowerLawReplay | None = None, **options):
        super().__init__(environment if environment is not None else PowerLawReplay(**options))
        self.env = self.methods[0]


class TaskMaskPlugin(SupervisedPlugin):
    """Restricts training logits to each sample's task classes (task-incremental, single head)."""

    def __init__(self, masks: dict[int, list[int]]):
        super().__init__()
        self.masks = masks

    def after_forward(self, strategy, **kwargs):
        t = strategy.mbatch[2] if len(strategy.mbatch) > 2 else None
        strategy.mb_output = restrict_logits(strategy.mb_output, t, self.masks,
                                             strategy.experience.current_experience)


class _StepTimer(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.steps, self.seconds, self._t0 = 0, 0.0, 0.0

    def before_training_iteration(self, strategy, **kwargs):
        self._t0 = time.perf_counter()

    def after_training_iteration(self, strategy, **kwargs):
        self.seconds += time.perf_counter() - self._t0
        self.steps += 1


class KCLStrategy(SupervisedTemplate):
    """KCL/GKCL as an Avalanche strategy; ``model`` is the feature extractor.

    The task id is the experience index (``current_experience``). ``num_classes`` sizes the
    one-hot support labels; ``n_tasks`` the number of experiences (GKCL's generator conditions). Evaluation through ``strategy.eval`` uses the task's head.
    """

    def __init__(self, model: nn.Module, kcl: KCL, num_classes: int, example_x: torch.Tensor, lr: float = 0.1,
                 train_mb_size: int = 10, train_epochs: int = 1, eval_mb_size: int = 256, device="cpu",
                 plugins=None, evaluator=None, seed: int = 0, n_tasks: int = 1):
        kcl.n_tasks = n_tasks  # GKCL's generator has one condition per (task, class)
        kcl.build(model, num_classes, example_x, device, seed)
        self.kcl, self.base_lr, self.seed = kcl, lr, seed
        optimizer = kcl.make_optimizer(model, 0, lr) if kcl.scalars else torch.optim.SGD(model.parameters(), lr=lr)
        super().__init__(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
                         train_mb_size=train_mb_size, train_epochs=train_epochs, eval_mb_size=eval_mb_size,
                         device=device, plugins=plugins, evaluator=evaluator or silent_evaluator())
        self._loss = None

    @property
    def task_index(self) -> int:
        return self.experience.current_experience

    def train_dataset_adaptation(self, **kwargs):
        self.kcl.check_task_labels(self.experience)
        self.kcl.begin_task(self.task_index, experience_classes(self.experience))
        self.adapted_dataset = self.kcl.prepare_task(self.task_index, self.experience.dataset.train(), self.model)

    def make_train_dataloader(self, shuffle=True, **kwargs):
        g = torch.Generator().manual_seed(experience_seed(self.seed, self.task_index))
        self.dataloader = DataLoader(self.adapted_dataset, batch_size=self.train_mb_size, shuffle=shuffle, generator=g)

    def make_optimizer(self, **kwargs):
        # Fresh SGD per task over the backbone and this task's scalars (reference protocol).
        self.optimizer = self.kcl.make_optimizer(self.model, self.task_index, self.base_lr)
        self.optimized_param_id = {}

    def model_adaptation(self, model=None):
        return self.model

    def forward(self):
        if not self.is_training:
            return self.kcl.predict(self.model, self.mb_x, self.task_index)
        logits, self._loss = self.kcl.training_loss(self.model, self.mb_x, self.mb_y, self.task_index)
        return logits

    def criterion(self):
        if self.is_training:
            return self._loss
        return F.cross_entropy(self.mb_output, self.mb_y)


def make_strategy(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, criterion=None,
                  train_mb_size: int = 32, train_epochs: int = 1, eval_mb_size: int = 256, device="cpu",
                  plugins=None, options: dict | None = None):
    """An Avalanche baseline strategy by name (``naive``, ``ewc``, ``replay``, ``lwf``, ``si``, ``agem``,
    ``gem``, ``mas``, ``cumulative``); ``options`` go to its constructor (defaults below)."""
    from avalanche.training import supervised as sv

    defaults = {
        "naive": (sv.Naive, {}),
        "ewc": (sv.EWC, {"ewc_lambda": 100.0}),
        "replay": (sv.Replay, {"mem_size": 200}),
        "lwf": (sv.LwF, {"alpha": 1.0, "temperature": 2.0}),
        "si": (sv.SynapticIntelligence, {"si_lambda": 1.0}),
        "agem": (sv.AGEM, {"patterns_per_exp": 100, "sample_size": 64}),
        "gem": (sv.GEM, {"patterns_per_exp": 100}),
        "mas": (sv.MAS, {"lambda_reg": 1.0}),
        "cumulative": (sv.Cumulative, {}),
    }
    if name not in defaults:
        raise ValueError(f"unknown Avalanche baseline {name!r}; valid: {', '.join(sorted(defaults))}")
    cls, kwargs = defaults[name]
    kwargs = {**kwargs, **(options or {})}
    return cls(model=model, optimizer=optimizer, criterion=criterion or nn.CrossEntropyLoss(),
               train_mb_size=train_mb_size, train_epochs=train_epochs, eval_mb_size=eval_mb_size,
               device=device, plugins=plugins, evaluator=silent_evaluator(), **kwargs)


class AvalancheEngine(Engine):
    """Runs one experience at a time through an Avalanche strategy (``run_stream(engine="avalanche")``).

    The strategy's data loader is replaced by the engine's seeded one, so a method run natively and
    as Avalanche's strategy sees the same batches in the same order."""

    def setup(self, train_exps: list) -> None:
        self.timer = _StepTimer()
        plugins: list = [self.timer]
        if self.masks is not None:
            plugins.insert(0, TaskMaskPlugin(self.masks))
        if self.owner is not None:
            num_classes = max(max(experience_classes(e)) for e in train_exps) + 1
            self.strategy = KCLStrategy(self.model, self.owner, num_classes, train_exps[0].dataset[0][0], lr=self.lr,
                                        train_mb_size=self.batch_size, train_epochs=self.epochs,
                                        eval_mb_size=self.settings.eval_batch_size, device=self.device,
                                        plugins=plugins, seed=self.seed, n_tasks=len(train_exps))
            return
        own = [m for m in self.methods if getattr(m, "avalanche_strategy", "naive") != "naive"]
        if len(own) > 1:
            raise ValueError(f"methods {[m.name for m in own]} each run as their own Avalanche strategy; "
                             "combine at most one of them on the Avalanche engine")
        self.native = own[0] if own else None
        hooked = [self.mode, *[m for m in self.methods if m is not self.native]]
        self.plugin = MethodPlugin(hooked, train_exps, self.masks)
        plugins.insert(0, self.plugin)
        self.hooks = HookList(hooked)
        opt = make_optimizer(self.settings.optimizer, trainable(self.model), self.lr, self.hooks)
        name = self.native.avalanche_strategy if self.native else "naive"
        options = self.native.avalanche_options() if self.native else {}
        self.strategy = make_strategy(name, self.model, opt, criterion=self.criterion, train_mb_size=self.batch_size,
                                      train_epochs=self.epochs, eval_mb_size=self.settings.eval_batch_size,
                                      device=self.device, plugins=plugins, options=options)
        self.strategy.make_train_dataloader = lambda **kw: self._loader()

    def _loader(self) -> None:
        i = self.strategy.experience.current_experience
        self.strategy.dataloader = shuffled_loader(self.strategy.adapted_dataset, self.batch_size,
                                                   experience_seed(self.seed, i))

    def train_experience(self, i: int, train_exps: list) -> tuple[int, float]:
        steps, seconds = self.timer.steps, self.timer.seconds
        set_candidates(self.model, train_exps, self.masks, seen=i)
        self.strategy.train(train_exps[i])
        self.model.eval()
        return self.timer.steps - steps, self.timer.seconds - seconds

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.strategy.optimizer.state_dict(),
                "methods": self.hooks.state_dict() if self.owner is None else self.owner.state_dict()}

    def load_state_dict(self, state: dict, train_exps: list) -> None:
        if self.owner is None and self.native is not None:
            raise ValueError(f"resume is not supported for {self.native.name!r} on the Avalanche engine (Avalanche's "
                             f"plugin state is not serialisable without pickle); run it with engine='native'")
        self.model.load_state_dict(state["model"])
        if self.owner is not None:
            self.owner.load_state_dict(state["methods"])
            return
        self.hooks.load_state_dict(state["methods"])
        # Register the parameters the way Avalanche's first make_optimizer would, then restore the state,
        # so the next experience keeps it (CLASSP's accumulator is its memory).
        self.strategy.optimized_param_id = update_optimizer(self.strategy.optimizer, dict(self.model.named_parameters()),
                                                            None, reset_state=True)
        self.strategy.optimizer.load_state_dict(state["optimizer"])

    def memory(self) -> dict:
        if self.owner is not None:
            return self.owner.memory()
        if self.native is not None and self.native.name == "replay":
            return {"replay_samples": _replay_size(self.strategy)}
        return self.hooks.memory()


def _replay_size(strategy) -> int:
    from avalanche.training.plugins import ReplayPlugin

    for p in strategy.plugins:
        if isinstance(p, ReplayPlugin):
            return len(p.storage_policy.buffer)
    return 0
