"""KCL / GKCL: the invariants of gkcl.md §5."""

import math

import pytest
import torch
from torch import nn

from lifelong.continual import GKCL, KCL, ConditionalVAE, kernel_matrix, krr_logits, supcon_loss
from lifelong.continual.methods.kcl import gaussian_kl

torch.set_num_threads(1)


def test_krr_linear_matches_direct_ridge_solve():
    g = torch.Generator().manual_seed(0)
    phi_c = torch.randn(12, 5, generator=g, dtype=torch.float64)
    phi_q = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = nn.functional.one_hot(torch.randint(0, 3, (12,), generator=g), 3).double()
    rho = 0.3
    ours = krr_logits(phi_c, y, phi_q, rho)
    dual = phi_q @ phi_c.T @ torch.linalg.inv(phi_c @ phi_c.T + rho * torch.eye(12, dtype=torch.float64)) @ y
    primal = phi_q @ torch.linalg.inv(phi_c.T @ phi_c + rho * torch.eye(5, dtype=torch.float64)) @ phi_c.T @ y
    torch.testing.assert_close(ours, dual, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, primal, rtol=1e-8, atol=1e-10)
    scaled = krr_logits(phi_c, y, phi_q, rho, gamma=2.5, beta=-0.5)
    torch.testing.assert_close(scaled, 2.5 * dual - 0.5, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", ["rbf", "laplacian_l1", "poly"])
def test_interpolation_with_small_ridge(kernel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (10,), generator=g)
    y = nn.functional.one_hot(labels, 3).double()
    pred = krr_logits(x, y, x, 1e-8, kernel=kernel).argmax(1)
    assert torch.equal(pred, labels)


def test_kernels_by_hand():
    a = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(kernel_matrix(a, b, "rbf", lengthscale=2.0),
                               torch.tensor([[math.exp(-1 / 8)], [math.exp(-4 / 8)]]))
    torch.testing.assert_close(kernel_matrix(a, b, "laplacian_l1"), torch.tensor([[math.exp(-0.25)], [math.exp(-0.5)]]))
    torch.testing.assert_close(kernel_matrix(a, b, "poly"), torch.tensor([[1.0], [8.0]]))
    with pytest.raises(ValueError, match="valid"):
        kernel_matrix(a, b, "cosine")


def test_gradients_flow_through_the_solve():
    g = torch.Generator().manual_seed(2)
    phi_c = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    phi_q = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = nn.functional.one_hot(torch.randint(0, 2, (6,), generator=g), 2).double()
    scal = torch.tensor([0.1, 1.0, 0.0], dtype=torch.float64, requires_grad=True)

    def f(c, q, s):
        return krr_logits(c, y, q, s[0].abs() + 0.01, s[1], s[2], kernel="rbf")

    assert torch.autograd.gradcheck(f, (phi_c, phi_q, scal))


def test_vrf_features_approximate_gaussian_kernel():
    kcl = KCL(kernel="vrf", rff_dim=8192)
    g = torch.Generator().manual_seed(3)
    kcl.register_buffer("phase", torch.rand(8192, generator=g) * 2 * math.pi)
    ell = 1.5
    omega = torch.randn(8192, 3, generator=g) / ell
    h = torch.randn(5, 3, generator=g) * 0.7
    phi = kcl._rff(h, omega)
    exact = kernel_matrix(h, h, "rbf", lengthscale=ell)
    assert (phi @ phi.T - exact).abs().max() < 0.05


def _backbone():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))


class _Exp:
    def __init__(self, x, y, i):
        from torch.utils.data import TensorDataset

        self.dataset = TensorDataset(x, y)
        self.classes_in_this_experience = sorted(set(y.tolist()))
        self.current_experience = i
        self.task_labels = [i]


def _two_tasks():
    g = torch.Generator().manual_seed(4)
    exps = []
    for t in range(2):
        y = torch.arange(2 * t, 2 * t + 2).repeat(30)
        x = torch.randn(60, 4, generator=g) + 2.0 * nn.functional.one_hot(y % 4, 4).float()
        exps.append(_Exp(x, y, t))
    return exps


def test_task_isolation_memory_and_deterministic_eval():
    exps = _two_tasks()
    backbone = _backbone()
    kcl = KCL(samples_per_class=5)
    kcl.setup(backbone, exps, None, "cpu", 0)
    kcl.train_experience(backbone, 0, exps, 1, 10, 0.1)
    task0 = kcl.scalars[0].detach().clone()
    mem0 = kcl.memory()["coreset_samples"]
    kcl.train_experience(backbone, 1, exps, 1, 10, 0.1)
    assert torch.equal(kcl.scalars[0].detach(), task0)  # training task 1 leaves task 0's head alone
    assert kcl.memory()["coreset_samples"] == 2 * mem0 == 20
    x = exps[0].dataset.tensors[0][:7]
    assert torch.equal(kcl.predict(backbone, x, 0), kcl.predict(backbone, x, 0))
    assert kcl.predict(backbone, x, 1) is not None and KCL().predict(backbone, x, 0) is None

    gk = GKCL(samples_per_class=5, gen_epochs=1, latent_dim=4, hidden=16)
    gk.setup(_backbone(), exps, None, "cpu", 0)
    gk.train_experience(_backbone(), 0, exps, 1, 10, 0.1)
    m1 = gk.memory()
    gk.train_experience(_backbone(), 1, exps, 1, 10, 0.1)
    assert gk.memory()["generator_parameters"] == m1["generator_parameters"]  # no growth while training tasks
    assert gk.memory()["coreset_samples"] == 0
    assert torch.equal(gk.predict(backbone, x, 0), gk.predict(backbone, x, 0))  # fixed-seed generated support


def test_same_support_gives_same_logits_in_kcl_and_gkcl():
    exps = _two_tasks()
    backbone = _backbone()
    kcl, gk = KCL(samples_per_class=5), GKCL(samples_per_class=5, gen_epochs=1, latent_dim=4, hidden=16)
    for m in (kcl, gk):
        m.setup(backbone, exps, None, "cpu", 0)
        m.begin_task(0, [0, 1])
    xs, ys = torch.randn(10, 4), torch.tensor([0, 1] * 5)
    h = kcl.features(backbone, torch.cat([xs, torch.randn(3, 4)]))
    a, _ = kcl.head(h[:10], ys, h[10:], 0)
    b, _ = gk.head(h[:10], ys, h[10:], 0)
    assert torch.equal(a, b)


def test_generator_is_class_conditional():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    y = torch.tensor([0, 1]).repeat(100)
    centers = torch.tensor([[3.0, 3.0, 0.0, 0.0], [-3.0, -3.0, 0.0, 0.0]])
    x = centers[y] + 0.3 * torch.randn(200, 4, generator=g)
    vae = ConditionalVAE((4,), 2, latent_dim=2, hidden=32)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        vae.loss(x, y, 1.0, 1.0, 0.1).backward()
        opt.step()
    labels = torch.tensor([0, 1]).repeat(50)
    samples = vae.generate(labels, torch.Generator().manual_seed(0))
    classified = (samples[:, 0] < 0).long()  # fixed reference classifier: sign of the first coordinate
    assert (classified == labels).float().mean() >= 0.9


def test_supcon_and_kl_by_hand():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    # anchors 0 and 1: one positive (sim 1/τ) against {positive, negative (sim 0)}; anchor 2 has none
    tau = 0.5
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 1.0))
    assert supcon_loss(z, y, tau).item() == pytest.approx(expected, rel=1e-6)
    mu_q, lv_q, mu_p, lv_p = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([math.log(4.0)])
    # KL(N(1,1) || N(0,4)) = 0.5 (log 4 + (1 + 1)/4 - 1)
    assert gaussian_kl(mu_q, lv_q, mu_p, lv_p).item() == pytest.approx(0.5 * (math.log(4) + 0.5 - 1))


def test_bad_options():
    with pytest.raises(ValueError, match="kernel"):
        KCL(kernel="sigmoid")
    with pytest.raises(ValueError, match="samples_per_class"):
        KCL(samples_per_class=0)
    with pytest.raises(ValueError, match="sc_space"):
        GKCL(sc_space="pixels")
    exps = _two_tasks()
    unlabelled = _Exp(exps[0].dataset.tensors[0], exps[0].dataset.tensors[1], 0)
    unlabelled.task_labels = []
    with pytest.raises(ValueError, match="task id at test time"):
        KCL().setup(_backbone(), [unlabelled], None, "cpu", 0)
    KCL(oracle_task=True).setup(_backbone(), [unlabelled], None, "cpu", 0)
    kcl = KCL(samples_per_class=30)
    kcl.setup(_backbone(), exps, None, "cpu", 0)
    with pytest.raises(ValueError, match="samples_per_class=30 must leave some"):
        kcl.train_experience(_backbone(), 0, exps, 1, 10, 0.1)
