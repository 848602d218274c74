"""The hook protocol: what every continual method (and every adapter mode) offers to a training loop.

A method is a small object whose hooks the engines (native torch loop, Avalanche, Hugging Face
``Trainer``) call at fixed points, in the manner of Avalanche's plugins, and never ask which
method it is. Every engine calls them in the same order::

    before_experience(ctx)              experience ctx.experience starts (MIGU attaches, adapters are added)
    train_dataset(ctx) -> dataset       the data it trains on (rehearsal adds old samples; ctx.dataset so far)
    (the engine (re)builds the optimizer when the trainable parameters changed; make_optimizer)
    per batch:  loss(ctx, loss) -> loss     add a regulariser (EWC, LwF, O-LoRA); ctx.inputs/targets/logits
                backward
                after_backward(ctx)     gradients exist, the step has not run (MIGU masks, LaMDA freezes)
                optimizer step
                after_step(ctx)         the parameters moved
    after_experience(ctx)               the experience is done (EWC importances, LwF's teacher)
    evaluating(model, j)                a context in which the model predicts experience j (per-task weights)
    state_dict() / load_state_dict()    what a checkpoint keeps (tensors and plain values only)
    memory()                            what the method holds besides the model (samples, floats)

Every hook of :class:`ContinualMethod` does nothing, so the class itself is plain fine-tuning
("naive"). Several methods combine (``method=["migu", "ewc"]``): :class:`HookList` calls each
hook of each method in order, chains ``train_dataset`` and ``loss``, and names the method and
the hook when one raises.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn

__all__ = ["Context", "ContinualMethod", "HookError", "HookList", "MethodConfig"]


@dataclass
class Context:
    """What a hook sees. The engine fills the batch fields inside a step and clears them after.

    Attributes:
        model: the module being trained (a text classifier, an adapted model, a plain classifier).
        experience: index of the experience training now.
        experiences: the stream's training experiences (each has ``.dataset``); those up to
            ``experience`` have been seen.
        optimizer: the optimizer in use (None before it is built).
        device: where the model trains.
        scenario: ``task-incremental``, ``class-incremental`` or ``domain-incremental``.
        masks: task label → its classes (task-incremental), else None.
        dataset: inside ``train_dataset``: the data chosen so far by earlier methods.
        batch_size: the training batch size.
        batch_loss: ``batch_loss(batch) -> loss``: the engine's training loss of one batch of the
            stream (forward, task masking, criterion), for methods that need extra passes (EWC).
        step: optimizer steps taken in this experience; total_steps: steps it will take.
        inputs, targets, task_ids, logits: the current batch (logits as the model returned them,
            before task masking).
    """

    model: nn.Module
    experience: int
    experiences: list
    optimizer: torch.optim.Optimizer | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scenario: str = "class-incremental"
    masks: dict | None = None
    dataset: Any = None
    batch_size: int = 32
    batch_loss: Callable[[Any], torch.Tensor] | None = None
    step: int = 0
    total_steps: int = 0
    inputs: Any = None
    targets: torch.Tensor | None = None
    task_ids: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    @property
    def seen(self) -> list:
        """The experiences trained so far, the current one included."""
        return self.experiences[: self.experience + 1]


@dataclass
class MethodConfig:
    """A method's settings: a dataclass whose ``validate()`` checks every field (and changes none)."""

    def validate(self) -> None:
        pass


class HookError(RuntimeError):
    """A method's hook raised; the message names the method and the hook.

    The error raised is also an instance of the original exception's class (a ``ValueError`` from a
    hook stays catchable as ``ValueError``) whenever Python can combine the two classes."""


def _hook_error(err: Exception, message: str) -> Exception:
    try:
        cls = type(f"HookError[{type(err).__name__}]", (HookError, type(err)), {})
        out = cls(message)
    except TypeError:  # a class whose layout or constructor cannot be combined
        out = HookError(message)
    return out


class ContinualMethod:
    """Plain fine-tuning, and the base of every method: each hook does nothing.

    A subclass declares ``Config`` (a :class:`MethodConfig` dataclass); ``Method(config)`` or
    ``Method(**options)`` validates it once and copies its fields onto attributes
    (``migu.mask_ratio``). Register the class with :func:`lifelong.continual.register_method` to
    run it by name.
    """

    name = "naive"
    Config: type[MethodConfig] = MethodConfig
    capabilities = None  # set by register_method

    def __init__(self, config: MethodConfig | None = None, **options: Any):
        self.configure(config, options)

    def configure(self, config: MethodConfig | None, options: dict[str, Any]) -> None:
        """Set the settings from a ``Config`` or from keyword options, checked once by ``validate``.

        The fields become attributes of the method (a changed attribute is what the next step uses,
        and what :meth:`settings` reports)."""
        if config is not None:
            if options:
                raise ValueError(f"{self.name}: pass a {self.Config.__name__} or keyword options, not both")
            if not isinstance(config, self.Config):
                raise TypeError(f"{self.name}: config must be a {self.Config.__name__}, got {type(config).__name__}")
        else:
            allowed = [f.name for f in fields(self.Config)]
            unknown = sorted(set(options) - set(allowed))
            if unknown:
                valid = ", ".join(allowed) if allowed else "none (this method has no options)"
                raise ValueError(f"{self.name}: unknown option(s) {unknown}; valid: {valid}")
            config = self.Config(**options)
        config.validate()
        for f in fields(config):
            setattr(self, f.name, getattr(config, f.name))

    def settings(self) -> dict[str, Any]:
        """The current settings, validated, as a plain dict (what results and checkpoints record)."""
        config = self.Config(**{f.name: getattr(self, f.name) for f in fields(self.Config)})
        config.validate()
        return asdict(config)

    # ---- the hooks ------------------------------------------------------------------------
    def before_experience(self, ctx: Context) -> None:
        pass

    def train_dataset(self, ctx: Context):
        return ctx.dataset

    def make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer | None:
        """An optimizer of the method's own (CLASSP), or None for the run's optimizer."""
        return None

    def loss(self, ctx: Context, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def after_backward(self, ctx: Context) -> None:
        pass

    def after_step(self, ctx: Context) -> None:
        pass

    def after_experience(self, ctx: Context) -> None:
        pass

    def evaluating(self, model: nn.Module, experience: int) -> ContextManager:
        """A context in which ``model`` predicts experience ``experience`` (default: as it is)."""
        return nullcontext()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def memory(self) -> dict:
        return {}


class HookList:
    """Several methods (and adapter-mode hooks) called as one, in order."""

    def __init__(self, hooks: list):
        self.hooks = list(hooks)

    def _call(self, hook: str, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except HookError:
            raise
        except Exception as err:
            owner = getattr(fn, "__self__", None)
            name = getattr(owner, "name", type(owner).__name__)
            raise _hook_error(err, f"method {name!r} raised in its {hook} hook: {type(err).__name__}: {err}") from err

    def call(self, hook: str, ctx: Context) -> None:
        for h in self.hooks:
            self._call(hook, getattr(h, hook), ctx)

    def train_dataset(self, ctx: Context):
        ctx.dataset = ctx.experiences[ctx.experience].dataset
        for h in self.hooks:
            ctx.dataset = self._call("train_dataset", h.train_dataset, ctx)
        return ctx.dataset

    def loss(self, ctx: Context, loss: torch.Tensor) -> torch.Tensor:
        for h in self.hooks:
            loss = self._call("loss", h.loss, ctx, loss)
        return loss

    def make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer | None:
        own = [(h, opt) for h in self.hooks if (opt := h.make_optimizer(params, lr)) is not None]
        if len(own) > 1:
            raise ValueError(f"methods {[h.name for h, _ in own]} each bring their own optimizer; combine at most one")
        return own[0][1] if own else None

    @contextmanager
    def evaluating(self, model: nn.Module, experience: int) -> Iterator[None]:
        with ExitStack() as stack:
            for h in self.hooks:
                stack.enter_context(h.evaluating(model, experience))
            yield

    def task_states(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per-experience tensors kept by a method (per-task fine-tuning), if any."""
        for h in self.hooks:
            states = getattr(h, "task_states", None)
            if states is not None:
                return states()
        return {}

    def state_dict(self) -> dict:
        return {str(i): h.state_dict() for i, h in enumerate(self.hooks)}

    def load_state_dict(self, state: dict) -> None:
        for i, h in enumerate(self.hooks):
            h.load_state_dict(state[str(i)])

    def memory(self) -> dict:
        out: dict = {}
        for h in self.hooks:
            for key, value in h.memory().items():
                out[key] = out.get(key, 0) + value
        return out
