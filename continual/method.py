"""The method protocol: the hooks every continual-learning method offers to a training loop.

A method is a small object; the loops (the native torch loop, the Avalanche engine, the Hugging
Face ``Trainer`` route) call its hooks at fixed points and never ask which method it is, in the
manner of Avalanche's plugin callbacks:

    before_experience(model, i)      before experience i trains (MIGU attaches its hooks)
    train_dataset(i, experiences)    the data experience i trains on (rehearsal adds old samples)
    make_optimizer(params, lr)       an optimizer of the method's own (CLASSP), or None
    after_backward()                 gradients exist, the step has not run (MIGU masks)
    after_update()                   the optimizer stepped (MIGU resets its accumulators)
    after_experience(i, experiences) experience i is done (rehearsal stores its size)
    state_dict() / load_state_dict() what a checkpoint must keep (plain tensors and values)
    memory()                         what the method holds besides the model (samples, floats)

Every hook is a no-op here, so :class:`ContinualMethod` itself is plain fine-tuning ("naive").
Methods that own their whole training loop (the kernel methods KCL and GKCL) set ``owns_loop``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

__all__ = ["ContinualMethod", "AvalancheBaseline", "MethodConfig"]


@dataclass
class MethodConfig:
    """A method's settings: a dataclass whose ``validate()`` checks every field (and changes none)."""

    def validate(self) -> None:
        pass


class ContinualMethod:
    """Plain fine-tuning, and the base of every method: each hook does nothing."""

    name = "naive"
    owns_loop = False  # True: the method trains an experience itself (train_experience, predict)
    native = True  # False: the method exists only as an Avalanche strategy
    strategy = "naive"  # the Avalanche strategy the method's plugin runs inside
    Config: type[MethodConfig] = MethodConfig

    def configure(self, config: MethodConfig | None, options: dict[str, Any]) -> None:
        """Set the settings from a ``Config`` or from keyword options, checked once by ``validate``.

        The settings become attributes of the method (a changed attribute is what the next step
        uses, and what :meth:`config` reports)."""
        if config is not None:
            if options:
                raise ValueError(f"{self.name}: pass a {self.Config.__name__} or keyword options, not both")
            if not isinstance(config, self.Config):
                raise TypeError(f"{self.name}: config must be a {self.Config.__name__}, got {type(config).__name__}")
        else:
            allowed = [f.name for f in fields(self.Config)]
            unknown = sorted(set(options) - set(allowed))
            if unknown:
                raise ValueError(f"{self.name}: unknown option(s) {unknown}; valid: {', '.join(allowed)}")
            config = self.Config(**options)
        config.validate()
        for f in fields(config):
            setattr(self, f.name, getattr(config, f.name))

    def settings(self) -> MethodConfig:
        """The current settings as a (validated) ``Config``."""
        config = self.Config(**{f.name: getattr(self, f.name) for f in fields(self.Config)})
        config.validate()
        return config

    def config(self) -> dict[str, Any]:
        return asdict(self.settings())

    def before_experience(self, model: nn.Module, index: int) -> None:
        pass

    def train_dataset(self, index: int, experiences: list):
        return experiences[index].dataset

    def make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer | None:
        return None

    def after_backward(self) -> None:
        pass

    def after_update(self) -> None:
        pass

    def after_experience(self, index: int | None = None, experiences: list | None = None) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def memory(self) -> dict:
        return {}

    def avalanche_plugin(self):
        """An Avalanche plugin that runs this method inside a strategy (None: nothing to add)."""
        return None


class AvalancheBaseline(ContinualMethod):
    """A baseline that exists as an Avalanche strategy (EWC, Replay, LwF, ...), with its options."""

    native = False

    def __init__(self, name: str, **options: Any):
        self.name = self.strategy = name
        self.options = options

    def config(self) -> dict[str, Any]:
        return dict(self.options)
