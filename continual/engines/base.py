"""What every engine shares: the hook calls around an experience, the optimizer, prediction, state.

An engine trains one experience at a time. :class:`Engine` does everything but the batch loop:
``start_experience`` calls ``before_experience`` on every hook (the adapter mode first, then the
methods in order), (re)builds the optimizer when the trainable tensors changed, and asks the hooks
for the training set; ``step_loss`` computes one batch's loss (forward, task masking, criterion,
then every ``loss`` hook); ``end_experience`` calls ``after_experience``. The native loop, the
Avalanche strategy and the ``transformers.Trainer`` each run the batch loop their own way and
call ``after_backward`` / ``after_step`` at the same points.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..adapter_modes import AdapterMode
from ..distributed import ShardedLoader, all_reduce_sum, rank, world_size
from ..hooks import Context, ContinualMethod, HookList
from ..registry import capabilities_of
from ..loop import experience_seed, make_optimizer, restrict_logits, set_candidates, shuffled_loader, trainable, unpack

__all__ = ["Engine"]


class Engine:
    """Shared engine machinery (see the module docstring).

    Args:
        model: the module that trains (text classifier or :class:`Backbone` holder).
        methods: the run's methods, hooks called in order.
        mode: the adapter mode's hook object (called before the methods).
        settings: the run's :class:`~lifelong.continual.config.RunConfig`.
        criterion, masks, scenario: the loss of (logits, targets), task class masks, scenario name.
        device: a ``torch.device``.
    """

    def __init__(self, model: nn.Module, methods: list[ContinualMethod], mode: AdapterMode, settings, criterion,
                 masks: dict | None, scenario: str, device: torch.device):
        self.model, self.methods, self.mode, self.settings = model, methods, mode, settings
        self.hooks = HookList([mode, *methods])
        self.criterion, self.masks, self.scenario, self.device = criterion, masks, scenario, device
        self.epochs, self.batch_size, self.seed, self.lr = (settings.epochs, settings.batch_size, settings.seed,
                                                            settings.lr)
        self.owner = methods[0] if capabilities_of(methods[0]).owns_loop else None
        self.optimizer: torch.optim.Optimizer | None = None
        self._optimized: list[int] = []
        self.world, self.rank = world_size(), rank()
        self.forward = torch.compile(model, dynamic=True) if settings.compile else model

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.methods)

    def setup(self, train_exps: list) -> None:
        """Once, before the first experience: what the engine builds from the whole stream
        (the native engine sizes a method that owns its loop, the Avalanche one its strategy)."""

    # ---- FSDP2 --------------------------------------------------------------------------------------
    def shard(self) -> None:
        """FSDP2: ``fully_shard`` every block of every layer list of the backbone, then the backbone.

        What stays outside (a text classifier's head) is replicated: :meth:`sync_replicated` averages
        its gradients (the Trainer does the same for tensors FSDP does not manage)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if self.world < 2:
            raise ValueError("fsdp=True shards the model over several processes: launch with torchrun "
                             "--nproc_per_node N (one process has nothing to shard over)")
        mesh = init_device_mesh(self.device.type, (self.world,))
        backbone = self.model.backbone
        for blocks in [m for m in backbone.modules() if isinstance(m, nn.ModuleList)]:
            for block in blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(backbone, mesh=mesh)
        self.model.is_distributed_loading_by_transformers = True  # the Trainer: no DDP around it

    def sync_replicated(self) -> None:
        """Average over the processes the gradients of the trainable tensors FSDP does not shard."""
        from torch.distributed.tensor import DTensor

        for p in self.model.parameters():
            if p.requires_grad and p.grad is not None and not isinstance(p.data, DTensor):
                all_reduce_sum(p.grad).div_(self.world)

    # ---- one experience ----------------------------------------------------------------------
    def context(self, i: int, train_exps: list) -> Context:
        ctx = Context(model=self.model, experience=i, experiences=train_exps, optimizer=self.optimizer,
                      device=self.device, scenario=self.scenario, masks=self.masks, batch_size=self.batch_size)
        ctx.batch_loss = lambda batch: self.batch_loss(ctx, batch)
        return ctx

    def start_experience(self, i: int, train_exps: list) -> tuple[Context, Any]:
        ctx = self.context(i, train_exps)
        set_candidates(self.model, train_exps, self.masks, seen=i)
        self.hooks.call("before_experience", ctx)
        ctx.optimizer = self.ensure_optimizer()
        data = self.hooks.train_dataset(ctx)
        ctx.total_steps = self.epochs * math.ceil(len(data) / self.batch_size)
        return ctx, data

    def ensure_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the trainable tensors; rebuilt only when that set changed (a new
        adapter), so optimizer state (Adam moments, CLASSP's accumulator) persists otherwise."""
        params = trainable(self.model)
        ids = [id(p) for p in params]
        if self.optimizer is None or ids != self._optimized:
            self.optimizer = make_optimizer(self.settings.optimizer, params, self.lr, self.hooks)
            self._optimized = ids
            if self.world > 1 and self.distributes and not self.settings.fsdp:  # gradients averaged over the processes
                from torch.nn.parallel import DistributedDataParallel

                self.forward = DistributedDataParallel(self.model, find_unused_parameters=True)
        return self.optimizer

    #: whether this engine wraps the model in DistributedDataParallel itself (the Trainer does its own)
    distributes = True

    def autocast(self):
        """``torch.autocast`` in bf16 when the run asks for it, else a no-op context."""
        enabled = self.settings.precision == "bf16"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def loader(self, data, i: int):
        """Experience i's seeded global batches (length-bucketed when asked); under several processes,
        this process's rows of each."""
        loader = shuffled_loader(data, self.batch_size, experience_seed(self.seed, i), self.settings.length_buckets)
        return ShardedLoader(loader, self.world, self.rank) if self.world > 1 else loader

    def batch_loss(self, ctx: Context, batch, forward: nn.Module | None = None) -> torch.Tensor:
        """The training loss of one batch (forward, task masking, criterion); fills ctx's batch fields.
        ``forward``: the module to call (a wrapper of the model, e.g. the Trainer's DDP one)."""
        x, y, t = unpack(batch, self.device)
        with self.autocast():
            logits = (forward or self.forward)(x)
        logits = logits.float()
        ctx.inputs, ctx.targets, ctx.task_ids, ctx.logits = x, y, t, logits
        return self.criterion(restrict_logits(logits, t, self.masks, ctx.experience), y)

    def step_loss(self, ctx: Context, batch, forward: nn.Module | None = None) -> torch.Tensor:
        """``batch_loss`` followed by every method's ``loss`` hook."""
        return self.hooks.loss(ctx, self.batch_loss(ctx, batch, forward))

    def end_experience(self, ctx: Context) -> None:
        ctx.inputs = ctx.targets = ctx.task_ids = ctx.logits = None
        self.hooks.call("after_experience", ctx)
        self.model.eval()

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, t, j: int) -> torch.Tensor | None:
        if self.owner is not None:
            return self.owner.predict(self.model, x, j)
        self.model.eval()
        set_candidates(self.model, None, self.masks, task=j)
        with self.hooks.evaluating(self.model, j), self.autocast():
            out = self.mode.predict(x, j)
        return None if out is None else out.float()

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Model, methods, adapter structure and optimizer; a sharded model's tensors gathered whole
        (a collective: every process calls it)."""
        keep = self.optimizer is not None and self.mode.keeps_optimizer  # other modes rebuild it next experience
        if self.settings.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model, optimizer = get_state_dict(self.model, [self.optimizer] if keep else [], options=options)
        else:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict() if keep else None
        state = {"model": model, "methods": self.hooks.state_dict(), "structure": self.mode.structure()}
        if keep:
            state["optimizer"] = optimizer
        return state

    def load_state_dict(self, state: dict, train_exps: list) -> None:
        self.mode.rebuild(state["structure"], train_exps)
        self.model.to(self.device)
        self.hooks.load_state_dict(state["methods"])
        if self.settings.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            optimizer = self.ensure_optimizer()
            set_state_dict(self.model, [optimizer] if "optimizer" in state else [], model_state_dict=state["model"],
                           optim_state_dict=state.get("optimizer", {}),
                           options=StateDictOptions(full_state_dict=True))
            return
        self.model.load_state_dict(state["model"])
        if "optimizer" in state and self.owner is None:
            self.ensure_optimizer().load_state_dict(state["optimizer"])

    def trainable_parameters(self) -> int:
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if self.owner is not None:
            n += self.owner.extra_trainable_parameters()
        return n

    def memory(self) -> dict:
        return self.hooks.memory()
