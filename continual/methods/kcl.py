"""KCL — Kernel Continual Learning (feature extractor + per-task kernel ridge classifier on a coreset).

Mohammad Mahdi Derakhshani, Xiantong Zhen, Ling Shao, Cees G. M. Snoek. *Kernel Continual
Learning.* ICML 2021 (arXiv 2107.05757). Reference code: ``mmderakhshani/KCL``.

Per task t a coreset ``(X_c, Y_c)`` (``samples_per_class`` per class, removed from the training
data, ``Y_c`` one-hot over all classes) is stored. With features ``Φ = norm(f_θ(x))`` and a kernel k:

    K_cc = k(Φ_c, Φ_c);   K_cq = k(Φ_c, Φ_q)
    A    = (K_cc + (|λ_t| + 0.01) I)^{-1} Y_c
    logits = γ_t · K_cqᵀ A + β_t

``λ_t, γ_t, β_t`` are per-task learnable scalars (init 0.1, 1, 0), trained with θ by SGD
(momentum 0.8, lr_t = max(lr · 0.5^t, 5e-5), optimizer re-created per task). Kernels: ``linear``
``h·h'``; ``rbf`` exp(−‖h−h'‖²/2ℓ²) (Gaussian); ``laplacian_l1`` exp(−0.25‖h−h'‖₁) (what KCL's code
calls "rbf"); ``poly`` (h·h'+1)³; ``vrf`` variational random Fourier features
φ(h) = sqrt(2/D) cos(Ωh + b), Ω's rows ~ N(μ, σ²) with (μ, log σ²) from an amortised network of
the mean coreset feature and a prior network of the mean batch feature, loss CE + τ·KL(q‖p).

Choices of ours where the reference code differs: features are L2-normalised per row
(``feature_norm="minmax"`` reproduces the reference's batch-wide min–max); the support set goes
through the backbone concatenated with the query batch (one forward, so batch-norm sees one
batch); evaluation uses task s's scalars (``reference_indexing=True``
reproduces the reference's use of the current task's); VRF evaluation uses the mean basis
Ω = μ (deterministic). The task id at test time is required: streams without task labels are refused
unless ``oracle_task=True``; the runner passes the experience index as the task id.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from ...checks import fraction, non_negative_number, one_of, positive_int, positive_number
from ..hooks import ContinualMethod, MethodConfig
from ..registry import register_method

__all__ = ["KCL", "kernel_matrix", "krr_logits"]

KERNELS = ("linear", "rbf", "laplacian_l1", "poly", "vrf")
FEATURE_NORMS = ("l2", "minmax", "none")
RIDGE_FLOOR = 0.01  # keeps K + ρI well conditioned in float32 (reference: |λ| + 0.01)


def kernel_matrix(a: torch.Tensor, b: torch.Tensor, kernel: str = "linear", lengthscale: float = 1.0) -> torch.Tensor:
    """k(a_i, b_j) for row sets ``a (n, d)`` and ``b (m, d)`` (``vrf`` expects feature maps φ)."""
    if kernel in ("linear", "vrf"):
        return a @ b.T
    if kernel == "rbf":
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * lengthscale ** 2))
    if kernel == "laplacian_l1":
        return torch.exp(-0.25 * torch.cdist(a, b, p=1))
    if kernel == "poly":
        return (a @ b.T + 1).pow(3)
    raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")


def krr_logits(support: torch.Tensor, support_onehot: torch.Tensor, query: torch.Tensor, ridge,
               gamma=1.0, beta=0.0, kernel: str = "linear", lengthscale: float = 1.0) -> torch.Tensor:
    """Closed-form kernel ridge regression logits ``γ · K_cqᵀ (K_cc + ρI)^{-1} Y_c + β``."""
    k_cc = kernel_matrix(support, support, kernel, lengthscale)
    k_cq = kernel_matrix(support, query, kernel, lengthscale)
    eye = torch.eye(k_cc.shape[0], dtype=k_cc.dtype, device=k_cc.device)
    alpha = torch.linalg.solve(k_cc + ridge * eye, support_onehot.to(k_cc.dtype))
    return gamma * (k_cq.T @ alpha) + beta


def _normalise(h: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "l2":
        return F.normalize(h, dim=1)
    if mode == "minmax":
        return (h - h.min()) / (h.max() - h.min()).clamp_min(1e-12)
    return h


def _targets(dataset) -> torch.Tensor:
    """Class label of every item (fast paths for TensorDataset and Avalanche's ``targets``)."""
    if hasattr(dataset, "tensors"):
        return dataset.tensors[1].long().cpu()
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(list(targets), dtype=torch.long)
    return torch.tensor([int(dataset[k][1]) for k in range(len(dataset))])


def _inputs(dataset, indices: torch.Tensor) -> torch.Tensor:
    if hasattr(dataset, "tensors"):
        return dataset.tensors[0][indices]
    return torch.stack([dataset[k][0] for k in indices.tolist()])


class _Amortised(nn.Module):
    """3-layer ELU network: mean feature → (μ, log σ²) of the random-feature basis distribution."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ELU(), nn.Linear(dim, dim), nn.ELU(), nn.Linear(dim, 2 * dim))

    def forward(self, h_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(h_mean).chunk(2, dim=-1)
        return mu, logvar


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """KL(N(μ_q, σ_q²) ‖ N(μ_p, σ_p²)) for diagonal Gaussians, summed over the last dimension."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1).sum(-1)


@dataclass
class KCLConfig(MethodConfig):
    """KCL's settings: the kernel, the coreset size and the reference's optimisation schedule.

    ``lambda_init``, ``gamma_init`` and ``beta_init`` start each task's ridge and scaling scalars;
    ``rff_dim`` and ``tau_kl`` apply to the random-Fourier-feature kernel; ``momentum``,
    ``lr_decay`` and ``min_lr`` are the reference's SGD schedule; ``oracle_task`` lets an unlabelled
    stream use the experience index as the task id.
    """

    kernel: str = "linear"
    samples_per_class: int = 20
    lambda_init: float = 0.1
    gamma_init: float = 1.0
    beta_init: float = 0.0
    feature_norm: str = "l2"
    lengthscale: float = 1.0
    rff_dim: int = 1024
    tau_kl: float = 1e-4
    momentum: float = 0.8
    lr_decay: float = 0.5
    min_lr: float = 5e-5
    reference_indexing: bool = False
    oracle_task: bool = False

    def validate(self) -> None:
        one_of("kernel", self.kernel, KERNELS)
        one_of("feature_norm", self.feature_norm, FEATURE_NORMS)
        positive_int("samples_per_class", self.samples_per_class)
        positive_number("lengthscale", self.lengthscale)
        positive_int("rff_dim", self.rff_dim)
        non_negative_number("tau_kl", self.tau_kl)
        fraction("momentum", self.momentum)
        fraction("lr_decay", self.lr_decay, open_low=True)
        non_negative_number("min_lr", self.min_lr)


@register_method("kcl", engines=("native", "avalanche"), adapter_modes=("none", "shared"), streams=("tensor",),
                 owns_loop=True, combines=False)
class KCL(nn.Module, ContinualMethod):
    """Kernel continual learning with a stored coreset; the user's model is the feature extractor.

    Options are the fields of :class:`KCLConfig` (or pass one as ``config``)."""

    Config = KCLConfig

    def __init__(self, config: KCLConfig | None = None, **options):
        super().__init__()
        self.configure(config, options)
        self.scalars = nn.ParameterList()
        self.task_classes: list[list[int]] = []
        self.coreset_x: list[torch.Tensor] = []
        self.coreset_y: list[torch.Tensor] = []
        self.current_task = -1

    # -- setup -------------------------------------------------------------------------------------
    def setup(self, backbone: nn.Module, train_exps: list, masks, device, seed: int) -> None:
        """Runner entry point: size the heads from the stream (classes, feature dimension)."""
        from ..streams import experience_classes

        for e in train_exps:
            self.check_task_labels(e)
        num_classes = max(max(experience_classes(e)) for e in train_exps) + 1
        self.build(backbone, num_classes, train_exps[0].dataset[0][0], device, seed)

    def check_task_labels(self, experience) -> None:
        """KCL needs the task id at test time: refuse unlabelled streams unless ``oracle_task``."""
        from ..streams import has_task_labels

        if not self.oracle_task and not has_task_labels(experience):
            raise ValueError(f"{type(self).__name__} needs the task id at test time but the stream has no task labels; "
                             "use a task-labelled stream (split_digits(task_incremental=True), "
                             "permuted_digits(task_labels=True)) or oracle_task=True (experience index as task id)")

    def build(self, backbone: nn.Module, num_classes: int, example_x: torch.Tensor, device, seed: int) -> None:
        """Create the method's modules for ``num_classes`` classes and the backbone's feature size."""
        self.device, self.seed, self.num_classes = torch.device(device), seed, num_classes
        with torch.no_grad():
            was_training = backbone.training
            backbone.to(device).eval()
            self.feature_dim = backbone(example_x.unsqueeze(0).to(device)).reshape(1, -1).shape[1]
            backbone.train(was_training)
        if self.kernel == "vrf":
            g = torch.Generator().manual_seed(seed + 1)
            self.register_buffer("phase", torch.rand(self.rff_dim, generator=g) * 2 * math.pi)
            torch.manual_seed(seed + 2)
            self.posterior_net = _Amortised(self.feature_dim)
            self.prior_net = _Amortised(self.feature_dim)
        self.to(self.device)

    def begin_task(self, index: int, classes: list[int]) -> None:
        self._add_task(index)
        self.current_task = index
        self.task_classes[index] = list(classes)

    def _add_task(self, index: int) -> None:
        while len(self.scalars) <= index:
            self.scalars.append(nn.Parameter(torch.tensor([self.lambda_init, self.gamma_init, self.beta_init], device=self.device)))
            self.task_classes.append([])

    def method_parameters(self, index: int) -> list[nn.Parameter]:
        params = [self.scalars[index]]
        if self.kernel == "vrf":
            params += list(self.posterior_net.parameters()) + list(self.prior_net.parameters())
        return params

    def make_optimizer(self, backbone: nn.Module, index: int, lr: float) -> torch.optim.Optimizer:
        """SGD with momentum, lr_t = max(lr · decay^t, min_lr), re-created per task (reference)."""
        lr_t = max(lr * self.lr_decay ** index, self.min_lr)
        params = [p for p in backbone.parameters() if p.requires_grad] + self.method_parameters(index)
        return torch.optim.SGD(params, lr=lr_t, momentum=self.momentum)

    def training_loss(self, backbone: nn.Module, x: torch.Tensor, y: torch.Tensor, index: int):
        """(masked logits, loss) of one training batch of task ``index``."""
        xs, ys = self.support(index, training=True)
        h = self.features(backbone, torch.cat([xs, x]))  # one forward: BN sees one batch
        logits, kl = self.head(h[: len(xs)], ys, h[len(xs):], index, sample=True)
        logits = self._mask(logits, index)
        return logits, F.cross_entropy(logits, y) + self.tau_kl * kl

    # -- features and heads ----------------------------------------------------------------------
    def features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _normalise(backbone(x).reshape(x.shape[0], -1), self.feature_norm)

    def _rff(self, h: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2.0 / self.rff_dim) * torch.cos(h @ omega.T + self.phase)

    def head(self, h_support, y_support, h_query, task: int, sample: bool = False):
        """KRR logits of ``task`` and the VRF KL term (0 for fixed kernels)."""
        lam, gamma, beta = self.scalars[task]
        onehot = F.one_hot(y_support, self.num_classes).float()
        kl = h_query.new_zeros(())
        if self.kernel == "vrf":
            mu, logvar = self.posterior_net(h_support.mean(0))
            if sample:
                omega = mu + (0.5 * logvar).exp() * torch.randn(self.rff_dim, mu.shape[0], device=mu.device)
                mu_p, logvar_p = self.prior_net(h_query.mean(0))
                kl = gaussian_kl(mu, logvar, mu_p, logvar_p)
            else:
                omega = mu.expand(self.rff_dim, -1)
            h_support, h_query = self._rff(h_support, omega), self._rff(h_query, omega)
        ridge = lam.abs() + RIDGE_FLOOR
        logits = krr_logits(h_support, onehot, h_query, ridge, gamma, beta, self.kernel, self.lengthscale)
        return logits, kl

    # -- support sets (KCL: stored coreset; GKCL overrides) -----------------------------------------
    def _split_coreset(self, index: int, dataset, seed: int) -> Subset:
        ys = _targets(dataset)
        g = torch.Generator().manual_seed(seed)
        picked = []
        for c in sorted(set(ys.tolist())):
            idx = (ys == c).nonzero().squeeze(1)
            if len(idx) <= self.samples_per_class:
                raise ValueError(f"KCL: class {c} of experience {index} has {len(idx)} training samples; "
                                 f"samples_per_class={self.samples_per_class} must leave some for training")
            picked.append(idx[torch.randperm(len(idx), generator=g)[: self.samples_per_class]])
        core = torch.cat(picked).sort().values
        self.coreset_x.append(_inputs(dataset, core).to(self.device))
        self.coreset_y.append(ys[core].to(self.device))
        rest = sorted(set(range(len(dataset))) - set(core.tolist()))
        return Subset(dataset, rest)

    def support(self, task: int, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.coreset_x[task], self.coreset_y[task]

    def prepare_task(self, index: int, dataset, backbone: nn.Module):
        """Returns the data the feature extractor trains on for this task."""
        return self._split_coreset(index, dataset, self.seed * 1009 + index)

    # -- runner interface ------------------------------------------------------------------------
    def train_experience(self, backbone: nn.Module, index: int, train_exps: list, epochs: int, batch_size: int,
                         lr: float) -> tuple[int, float]:
        from ..streams import experience_classes

        self.begin_task(index, experience_classes(train_exps[index]))
        data = self.prepare_task(index, train_exps[index].dataset, backbone)
        opt = self.make_optimizer(backbone, index, lr)
        g = torch.Generator().manual_seed(self.seed * 7919 + index)
        loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=g)
        backbone.train()
        steps, step_time = 0, 0.0
        for _ in range(epochs):
            for batch in loader:
                x, y = batch[0].to(self.device), batch[1].to(self.device)
                t0 = time.perf_counter()
                _, loss = self.training_loss(backbone, x, y, index)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step_time += time.perf_counter() - t0
                steps += 1
        backbone.eval()
        return steps, step_time

    def _mask(self, logits: torch.Tensor, task: int) -> torch.Tensor:
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        allowed[self.task_classes[task]] = True
        return logits.masked_fill(~allowed, float("-inf"))

    @torch.no_grad()
    def predict(self, backbone: nn.Module, x: torch.Tensor, task: int) -> torch.Tensor | None:
        """Logits of ``x`` under task ``task``'s head; None if that task was not trained yet."""
        if task >= len(self.scalars) or not self.task_classes[task]:
            return None
        backbone.eval()
        xs, ys = self.support(task, training=False)
        h = self.features(backbone, torch.cat([xs, x]))
        head_task = self.current_task if self.reference_indexing else task
        logits, _ = self.head(h[: len(xs)], ys, h[len(xs):], head_task, sample=False)
        return self._mask(logits, task)

    def extra_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def memory(self) -> dict:
        n = sum(len(c) for c in self.coreset_x)
        nbytes = sum(c.numel() * c.element_size() for c in self.coreset_x)
        return {"coreset_samples": n, "stored_bytes": nbytes + 3 * 4 * len(self.scalars)}

    def state_dict(self, *args, **kwargs) -> dict:
        state = {"module": super().state_dict(), "task_classes": [list(c) for c in self.task_classes],
                 "current_task": self.current_task, "coreset_x": list(self.coreset_x),
                 "coreset_y": list(self.coreset_y)}
        return state

    def load_state_dict(self, state: dict, strict: bool = True):
        for index in range(len(state["task_classes"])):
            self._add_task(index)
        super().load_state_dict(state["module"], strict=strict)
        self.task_classes = [list(c) for c in state["task_classes"]]
        self.current_task = int(state["current_task"])
        self.coreset_x = [c.to(self.device) for c in state["coreset_x"]]
        self.coreset_y = [c.to(self.device) for c in state["coreset_y"]]
