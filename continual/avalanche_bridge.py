"""Avalanche 0.6.0 bridges: plugins for MIGU and power-law rehearsal, a KCL/GKCL strategy, baselines.

Importing this module imports avalanche (seconds); :mod:`lifelong.continual` loads it lazily.

* ``MIGUPlugin(migu)``: ``before_training_exp`` installs the hooks (from ``start_task`` on),
  ``after_backward`` masks, ``after_update`` resets, ``after_training_exp`` removes the hooks.
* ``PowerLawReplayPlugin(env)``: ``after_training_exp`` keeps the finished experience's dataset;
  ``after_train_dataset_adaptation`` replaces ``strategy.adapted_dataset`` by the current data
  concatenated with the environment's subsets of every past experience.
* CLASSP needs no plugin: pass ``optimizer=CLASSP(...)`` and never ``reset_optimizer_state=True``.
* ``KCLStrategy``: a ``SupervisedTemplate`` whose forward solves the per-task kernel ridge
  regression on the support set (coreset or generated) and whose optimizer is re-created per task.
* ``TaskMaskPlugin``: task-incremental training with a single head (logits outside each sample's
  task classes set to −inf after the forward).
"""

from __future__ import annotations

import time

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_optimizers import update_optimizer
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .kcl import KCL
from .migu import MIGU
from .powerlaw_replay import PowerLawReplay
from .loop import experience_seed, make_optimizer, restrict_logits, set_candidates, trainable
from .streams import experience_classes

__all__ = ["MIGUPlugin", "PowerLawReplayPlugin", "TaskMaskPlugin", "KCLStrategy", "make_strategy", "AvalancheEngine"]

RESUMABLE = ("naive", "migu", "classp", "powerlaw", "kcl", "gkcl")


def silent_evaluator() -> EvaluationPlugin:
    """No metrics, no loggers: lifelong evaluates per experience itself (never pooled accuracy)."""
    return EvaluationPlugin(loggers=[])


class MIGUPlugin(SupervisedPlugin):
    """MIGU gradient masking inside any Avalanche strategy."""

    def __init__(self, migu: MIGU | None = None, **options):
        super().__init__()
        self.migu = migu if migu is not None else MIGU(**options)

    def before_training_exp(self, strategy, **kwargs):
        self.migu.before_experience(strategy.model, strategy.experience.current_experience)

    def after_backward(self, strategy, **kwargs):
        if strategy.is_training:
            self.migu.mask_gradients()

    def after_update(self, strategy, **kwargs):
        self.migu.after_step()

    def after_training_exp(self, strategy, **kwargs):
        self.migu.detach()


class PowerLawReplayPlugin(SupervisedPlugin):
    """Power-law (or exponential/uniform/none/all) rehearsal environment inside any strategy."""

    def __init__(self, environment: PowerLawReplay | None = None, **options):
        super().__init__()
        self.env = environment if environment is not None else PowerLawReplay(**options)
        self.datasets: list = []

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        current = strategy.adapted_dataset
        phase = len(self.datasets)
        if phase == 0:
            return
        picks = self.env.phase_indices(phase, len(current))
        for j, idx in sorted(picks.items()):
            current = current.concat(self.datasets[j].subset(idx.tolist()))
        strategy.adapted_dataset = current

    def after_training_exp(self, strategy, **kwargs):
        ds = strategy.experience.dataset.train()
        self.datasets.append(ds)
        self.env.remember(len(ds))

    def restore(self, experiences: list) -> None:
        """Re-attach the datasets of finished experiences (after loading the environment's state)."""
        self.datasets = [e.dataset.train() for e in experiences[: len(self.env.past_sizes)]]


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


class AvalancheEngine:
    """Runs one experience at a time through an Avalanche strategy (used by ``run_stream``)."""

    def __init__(self, model, method, optimizer, lr, epochs, batch_size, eval_batch_size, device, criterion, masks,
                 train_exps, seed):
        self.model, self.method, self.name, self.seed = model, method, method.name, seed
        self.masks = masks
        self.timer = _StepTimer()
        plugins: list = [self.timer]
        if masks is not None:
            plugins.insert(0, TaskMaskPlugin(masks))
        self.kernel = method.owns_loop
        if self.kernel:
            num_classes = max(max(experience_classes(e)) for e in train_exps) + 1
            self.strategy = KCLStrategy(model, method, num_classes, train_exps[0].dataset[0][0], lr=lr,
                                        train_mb_size=batch_size, train_epochs=epochs, eval_mb_size=eval_batch_size,
                                        device=device, plugins=plugins, seed=seed, n_tasks=len(train_exps))
            return
        self.plugin = method.avalanche_plugin()
        if self.plugin is not None:
            plugins.insert(0, self.plugin)
        opt = make_optimizer(optimizer, trainable(model), lr, method)
        self.strategy = make_strategy(method.strategy, model, opt, criterion=criterion, train_mb_size=batch_size,
                                      train_epochs=epochs, eval_mb_size=eval_batch_size, device=device,
                                      plugins=plugins, options=method.config() if not method.native else {})

    def train_experience(self, i: int, train_exps: list) -> tuple[int, float]:
        steps, seconds = self.timer.steps, self.timer.seconds
        set_candidates(self.model, train_exps, self.masks, seen=i)
        self.strategy.train(train_exps[i])
        self.model.eval()
        return self.timer.steps - steps, self.timer.seconds - seconds

    @torch.no_grad()
    def predict(self, x: torch.Tensor, t, j: int):
        if self.kernel:
            return self.method.predict(self.model, x, j)
        self.model.eval()
        set_candidates(self.model, None, self.masks, task=j)
        return self.model(x)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.strategy.optimizer.state_dict(),
                "method": self.method.state_dict()}

    def load_state_dict(self, state: dict, train_exps: list | None = None) -> None:
        if self.name not in RESUMABLE:
            raise ValueError(f"resume is not supported for the Avalanche baseline {self.name!r} (its plugin state "
                             f"is not serialisable without pickle); resumable: {', '.join(RESUMABLE)}")
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        if self.kernel:
            return
        # Register the parameters the way Avalanche's first make_optimizer would, then restore the state,
        # so the next experience keeps it (CLASSP's accumulator is its memory).
        self.strategy.optimized_param_id = update_optimizer(self.strategy.optimizer, dict(self.model.named_parameters()),
                                                            None, reset_state=True)
        self.strategy.optimizer.load_state_dict(state["optimizer"])
        restore = getattr(self.plugin, "restore", None)
        if restore is not None:
            restore(train_exps)

    def trainable_parameters(self) -> int:
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return n + (self.method.extra_trainable_parameters() if self.kernel else 0)

    def memory(self) -> dict:
        if self.name == "replay":
            return {"replay_samples": _replay_size(self.strategy)}
        return self.method.memory()


def _replay_size(strategy) -> int:
    from avalanche.training.plugins import ReplayPlugin

    for p in strategy.plugins:
        if isinstance(p, ReplayPlugin):
            return len(p.storage_policy.buffer)
    return 0
