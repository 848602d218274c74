"""GKCL — Generative Kernel Continual Learning: KCL with a class-conditional VAE instead of a coreset.

Mohammad Mahdi Derakhshani, Xiantong Zhen, Ling Shao, Cees G. M. Snoek. *Generative Kernel
Continual Learning.* arXiv 2112.13410 (2021); base method KCL (ICML 2021). No complete reference
code exists (``mmderakhshani/KCL``'s ``main_kernel_vae.py`` is a stub).

Generator: encoder q_φ(z|x) = N(μ_φ(x), σ²_φ(x)), conditional prior p(z|c) = N(μ_c, σ²_c)
(learnable per condition c = (task, class), so domain-incremental tasks that share classes get
their own generators), decoder x̂ = g_ψ([z, onehot(c)]) with a Gaussian likelihood. Per task t:

    L_gen = ‖x − x̂‖² + β_kl · KL(q_φ(z|x) ‖ p(z|y)) + λ_sc · L_SC(normalize(μ_φ(x)), y)
    L_SC  = Σ_i −1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) )     (Khosla et al. 2020)

trained on the real task-t data plus, 1:1 per batch, samples of the old classes drawn from a
frozen copy of the previous generator (generative replay, on the generator only). The feature
extractor and the per-task KRR head are then trained exactly as in KCL, with the support set =
``samples_per_class`` generated samples per class of task t (fresh every step). Evaluation of task
s generates its support with a fixed seed (deterministic). Memory: the generator and 3 scalars
per task. The generator is sized once for the stream (``n_tasks`` × classes conditions, each
costing ``2·latent_dim + hidden`` floats in the prior and the decoder's first layer) and does not
grow while training; KCL's coreset grows by ``samples_per_class`` inputs per class and task.

Design decisions of ours (the paper gives no details of them): input-space generation with
MLP encoder/decoder for flattened inputs; decoder input ``[z, onehot(y)]``; SupCon applied to the
latent means (``sc_space="latent"``; ``"feature"`` applies it to the generated support features f_θ(x̃) during the KRR phase);
condition on (task, class) (the summary's p(x | z, y, t)); replayed conditions uniform over the
old (task, class) pairs; latent 32, β_kl 1, λ_sc 1, τ_sc 0.1, Adam 1e-3 for the
generator, ``gen_epochs`` epochs of generator training per task.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ...checks import non_negative_number, one_of, positive_int, positive_number
from ..registry import register_method
from .kcl import KCL, KCLConfig, gaussian_kl

__all__ = ["GKCL", "ConditionalVAE", "supcon_loss"]


def supcon_loss(z: torch.Tensor, y: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss on L2-normalised rows of ``z`` (anchors without positives skipped)."""
    z = F.normalize(z, dim=1)
    sim = z @ z.T / temperature
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (y.unsqueeze(0) == y.unsqueeze(1)) & ~self_mask
    counts = pos.sum(1)
    has = counts > 0
    if not has.any():
        return z.new_zeros(())
    per_anchor = -(log_prob.masked_fill(~pos, 0.0).sum(1)[has]) / counts[has]
    return per_anchor.mean()


class ConditionalVAE(nn.Module):
    """MLP VAE with a learnable conditional Gaussian prior; works on flattened inputs.

    ``num_classes`` is the number of conditions (GKCL uses one per (task, class) pair)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, latent_dim: int = 32, hidden: int = 128):
        super().__init__()
        self.input_shape, self.num_classes, self.latent_dim = tuple(input_shape), num_classes, latent_dim
        d = 1
        for s in input_shape:
            d *= s
        self.encoder = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.enc_mu, self.enc_logvar = nn.Linear(hidden, latent_dim), nn.Linear(hidden, latent_dim)
        self.decoder = nn.Sequential(nn.Linear(latent_dim + num_classes, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d))
        self.prior_mu = nn.Parameter(torch.randn(num_classes, latent_dim) * 0.5)
        self.prior_logvar = nn.Parameter(torch.zeros(num_classes, latent_dim))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x.reshape(x.shape[0], -1))
        return self.enc_mu(h), self.enc_logvar(h)

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.decoder(torch.cat([z, F.one_hot(y, self.num_classes).float()], dim=1))
        return out.reshape(z.shape[0], *self.input_shape)

    def loss(self, x, y, beta_kl: float, lambda_sc: float, tau_sc: float, generator=None) -> torch.Tensor:
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device) if generator is not None \
            else torch.randn_like(mu)
        z = mu + (0.5 * logvar).exp() * eps
        recon = (self.decode(z, y) - x).pow(2).reshape(x.shape[0], -1).sum(1).mean()
        kl = gaussian_kl(mu, logvar, self.prior_mu[y], self.prior_logvar[y]).mean()
        sc = supcon_loss(mu, y, tau_sc) if lambda_sc > 0 else x.new_zeros(())
        return recon + beta_kl * kl + lambda_sc * sc

    @torch.no_grad()
    def generate(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(len(y), self.latent_dim, generator=generator).to(self.prior_mu.device)
        z = self.prior_mu[y] + (0.5 * self.prior_logvar[y]).exp() * eps
        return self.decode(z, y)


@dataclass
class GKCLConfig(KCLConfig):
    """GKCL's settings: KCL's, and the class-conditional VAE that generates the support sets.

    ``latent_dim`` and ``hidden`` size the VAE; ``beta_kl`` weighs its KL term; ``lambda_sc`` and
    ``tau_sc`` weigh and temper the supervised-contrastive term, computed in ``sc_space``
    (``"latent"`` or ``"feature"``); ``gen_epochs``, ``gen_lr`` and ``gen_batch_size`` train it.
    """

    latent_dim: int = 32
    hidden: int = 128
    beta_kl: float = 1.0
    lambda_sc: float = 1.0
    tau_sc: float = 0.1
    sc_space: str = "latent"
    gen_epochs: int = 30
    gen_lr: float = 1e-3
    gen_batch_size: int = 64

    def validate(self) -> None:
        super().validate()
        one_of("sc_space", self.sc_space, ("latent", "feature"))
        for name in ("latent_dim", "hidden", "gen_epochs", "gen_batch_size"):
            positive_int(name, getattr(self, name))
        for name in ("beta_kl", "lambda_sc"):
            non_negative_number(name, getattr(self, name))
        positive_number("tau_sc", self.tau_sc)
        positive_number("gen_lr", self.gen_lr)


@register_method("gkcl", engines=("native", "avalanche"), adapter_modes=("none", "shared"), streams=("tensor",),
                 owns_loop=True, combines=False)
class GKCL(KCL):
    """KCL whose support sets come from a class-conditional VAE trained with generative replay.

    Options are the fields of :class:`GKCLConfig` (or pass one as ``config``)."""

    Config = GKCLConfig

    def __init__(self, config: GKCLConfig | None = None, **options):
        super().__init__(config, **options)
        self._step = 0
        self.n_tasks = 1

    def setup(self, backbone, train_exps, masks, device, seed) -> None:
        self.n_tasks = len(train_exps)
        super().setup(backbone, train_exps, masks, device, seed)

    def build(self, backbone, num_classes, example_x, device, seed) -> None:
        super().build(backbone, num_classes, example_x, device, seed)
        torch.manual_seed(seed + 3)
        shape = tuple(example_x.shape)
        conditions = self.n_tasks * self.num_classes  # one per (task, class): domain-IL tasks share classes
        self.generator = ConditionalVAE(shape, conditions, self.latent_dim, self.hidden).to(self.device)

    def _condition(self, task: int, y: torch.Tensor) -> torch.Tensor:
        if task >= self.n_tasks:
            raise ValueError(f"GKCL was built for {self.n_tasks} tasks (n_tasks); got task index {task}")
        return task * self.num_classes + y

    def _train_generator(self, index: int, dataset) -> None:
        old_classes = [t * self.num_classes + c for t in range(index) for c in self.task_classes[t]]
        frozen = copy.deepcopy(self.generator).eval() if old_classes else None
        opt = torch.optim.Adam(self.generator.parameters(), lr=self.gen_lr)
        g = torch.Generator().manual_seed(self.seed * 31 + index)
        loader = DataLoader(dataset, batch_size=self.gen_batch_size, shuffle=True, generator=g)
        lsc = self.lambda_sc if self.sc_space == "latent" else 0.0
        self.generator.train()
        for _ in range(self.gen_epochs):
            for batch in loader:
                x, y = batch[0].to(self.device), self._condition(index, batch[1].to(self.device))
                if frozen is not None:  # 1:1 generative replay of the old (task, class) conditions
                    old = torch.as_tensor(old_classes, device=self.device)
                    y_old = old[torch.randint(len(old_classes), (len(y),), generator=g).to(self.device)]
                    x = torch.cat([x, frozen.generate(y_old, g)])
                    y = torch.cat([y, y_old])
                loss = self.generator.loss(x, y, self.beta_kl, lsc, self.tau_sc)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.generator.eval()

    def prepare_task(self, index: int, dataset, backbone):
        self._train_generator(index, dataset)
        return dataset  # nothing is stored: the whole task trains the feature extractor

    def support(self, task: int, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        classes = torch.as_tensor(self.task_classes[task], device=self.device)
        y = classes.repeat_interleave(self.samples_per_class)
        cond = self._condition(task, y)
        if training:  # fresh samples every step, seeded by the step counter
            self._step += 1
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._step)
        else:  # evaluation support is fixed per task
            g = torch.Generator().manual_seed(self.seed * 7_777 + task)
        self.generator.eval()
        return self.generator.generate(cond, g), y

    def head(self, h_support, y_support, h_query, task: int, sample: bool = False):
        logits, kl = super().head(h_support, y_support, h_query, task, sample)
        if sample and self.sc_space == "feature" and self.lambda_sc > 0:
            kl = kl + self.lambda_sc / max(self.tau_kl, 1e-12) * supcon_loss(h_support, y_support, self.tau_sc)
        return logits, kl

    def memory(self) -> dict:
        n_gen = sum(p.numel() for p in self.generator.parameters())
        return {"generator_parameters": n_gen, "coreset_samples": 0,
                "stored_bytes": n_gen * 4 + 3 * 4 * len(self.scalars)}

    def state_dict(self, *args, **kwargs) -> dict:
        state = super().state_dict()
        state["step"] = self._step
        return state

    def load_state_dict(self, state: dict, strict: bool = True):
        super().load_state_dict(state, strict=strict)
        self._step = int(state["step"])
