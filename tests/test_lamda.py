"""LaMDA / LaMDA++: SVD init, PMB freezing schedules, rank allocation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lifelong as ll
from lifelong.adapters.lamda import allocate_ranks, frozen_column_count
from lifelong.kernels import lora_linear


def one_layer(out_f: int = 12, in_f: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_f, out_f))


def adapter_of(m: ll.AdaptedModel):
    return next(m.adapted_layers()).adapters["default"]


def test_svd_init_reproduces_the_layer_and_has_orthonormal_factors() -> None:
    model = one_layer()
    w = model[0].weight.detach().clone()
    x = torch.randn(5, 10)
    y = model(x)
    m = ll.wrap(model, "lamda", r=4, lora_alpha=8, target_modules=["0"])
    a = adapter_of(m)
    torch.testing.assert_close(m(x), y, rtol=1e-4, atol=1e-5)
    w_res = m.base_model[0].base_layer.weight
    torch.testing.assert_close(w_res + a.scale * a.lora_B @ a.lora_S @ a.lora_A, w, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.lora_A @ a.lora_A.T, torch.eye(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(a.lora_B.T @ a.lora_B, torch.eye(4), rtol=0, atol=1e-5)
    assert not a.lora_A.requires_grad and "lora_A" not in dict(a.named_parameters())


def test_lora_init_is_exact_and_only_B_gets_gradient_first() -> None:
    model = one_layer()
    x = torch.randn(5, 10)
    y = model(x)
    m = ll.wrap(model, "lamda", r=4, init="lora", target_modules=["0"])
    assert torch.equal(m(x), y)
    m(x).pow(2).sum().backward()
    a = adapter_of(m)
    assert torch.count_nonzero(a.lora_S.grad) == 0 and torch.count_nonzero(a.lora_B.grad) > 0


def test_trainable_counts_before_and_after_freezing() -> None:
    m = ll.wrap(one_layer(), "lamda", r=4, total_steps=10, target_modules=["0"])
    assert m.get_nb_trainable_parameters()[0] == 4 * 4 + 12 * 4
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
    for _ in range(3):  # T_f = round(0.3 · 10) = 3
        m(torch.randn(2, 10)).sum().backward()
        opt.step(); opt.zero_grad(); m.after_optimizer_step(opt)
    a = adapter_of(m)
    assert m.get_nb_trainable_parameters()[0] == 4 * 4
    assert a.lora_B.grad is None and a.lora_B not in opt.state
    assert all(p is not a.lora_B for g in opt.param_groups for p in g["params"])


def test_frozen_column_counts_follow_the_linear_rule() -> None:
    r, t_f = 4, 10  # columns freeze at steps ceil(10/4)=3, 5, ceil(30/4)=8, 10
    assert [frozen_column_count(k, r, t_f) for k in range(11)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4]


def test_frozen_columns_stay_bitwise_fixed_under_adamw_decay() -> None:
    m = ll.wrap(one_layer(), "lamda", r=4, total_steps=20, pmb_freeze_fraction=0.5, target_modules=["0"])
    a = adapter_of(m)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    snapshots = {}
    for step in range(1, 11):
        m(torch.randn(3, 10)).pow(2).sum().backward()
        opt.step(); opt.zero_grad(); m.after_optimizer_step(opt)
        frozen = frozen_column_count(step, 4, 10)
        assert int(a.frozen_columns.sum()) == frozen
        b_eff = a.effective_B().detach()
        for j in range(frozen):
            snapshots.setdefault(j, b_eff[:, j].clone())
            assert torch.equal(b_eff[:, j], snapshots[j])
    assert not a.lora_B.requires_grad


def test_reference_schedule_reproduces_the_released_rule() -> None:
    m = ll.wrap(one_layer(), "lamda", r=8, pmb_schedule="reference", total_steps=100, target_modules=["0"])
    a = adapter_of(m)
    seen = {}
    for step in range(1, 101):
        m(torch.randn(2, 10)).pow(2).sum().backward()
        m.after_backward()
        seen[step] = int((a.lora_B.grad.abs().sum(0) == 0).sum())
        m.zero_grad()
    t = lambda k: math.floor(k / (0.3 * 100))  # noqa: E731
    assert (seen[29], seen[31], seen[61], seen[91]) == (t(29), t(31), t(61), t(91)) == (0, 1, 2, 3)
    assert a.lora_B.requires_grad, "with eta=0.3 the reference never freezes B fully (r=8)"


def test_schedule_without_total_steps_fails_clearly() -> None:
    m = ll.wrap(one_layer(), "lamda", r=4, target_modules=["0"])
    with pytest.raises(ValueError, match="needs total_steps"):
        m.after_optimizer_step()


def test_folding_S_into_B_gives_an_identical_lora() -> None:
    m = ll.wrap(one_layer(), "lamda", r=4, target_modules=["0"])
    a = adapter_of(m)
    with torch.no_grad():
        a.lora_S.add_(0.1 * torch.randn(4, 4))
        a.lora_B.add_(0.1 * torch.randn(12, 4))
    x = torch.randn(5, 10)
    base = m.base_model[0].base_layer
    lora = lora_linear(x, base.weight, base.bias, a.lora_A, a.lora_B @ a.lora_S, a.scale)
    torch.testing.assert_close(lora, m(x), rtol=0, atol=1e-5)


def test_lamda_plus_plus_budget_bounds_and_monotonicity() -> None:
    torch.manual_seed(0)
    steep = torch.tensor([10.0, 5, 1, 0.5, 0.1, 0.05, 0.01, 0.01])
    flat = torch.ones(8)
    middle = torch.linspace(3, 1, 8)
    spectra = {"steep": steep, "flat": flat, "middle": middle}
    ranks = allocate_ranks(spectra, 3, "energy_deficit", 1, 6, {k: 8 for k in spectra})
    assert sum(ranks.values()) == 9
    assert all(1 <= v <= 6 for v in ranks.values())
    assert ranks["flat"] >= ranks["middle"] >= ranks["steep"]


def test_adaptive_rank_is_saved_and_reloaded(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.logspace(0, -4, 16)))  # steep spectrum
    m = ll.wrap(model, "lamda", r=4, adaptive_rank=True, target_modules=["0", "1"])
    ranks = {l.adapters["default"].layer_name: l.adapters["default"].r for l in m.adapted_layers()}
    assert sum(ranks.values()) == 8 and ranks["1"] > ranks["0"]
    x = torch.randn(3, 16)
    y = m(x)
    m.save_pretrained(tmp_path)
    fresh = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in m.unload().state_dict().items()})
    torch.testing.assert_close(ll.load(fresh, tmp_path)(x), y, rtol=0, atol=1e-5)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="exceeds min"):
        ll.wrap(one_layer(), "lamda", r=11, target_modules=["0"])
    with pytest.raises(ValueError, match="pmb_schedule must be one of"):
        ll.wrap(one_layer(), "lamda", pmb_schedule="cosine", target_modules=["0"])


def test_without_total_steps_warns_at_wrap_and_stops_before_the_first_step() -> None:
    with pytest.warns(UserWarning, match="needs total_steps"):
        m = ll.wrap(one_layer(), "lamda", r=4, target_modules=["0"])
    m(torch.randn(3, 10)).sum().backward()
    with pytest.raises(ValueError, match="needs total_steps"):
        m.after_backward()  # before optimizer.step(): nothing has been updated yet


def test_reference_schedule_keeps_the_trained_B_when_it_freezes_fully() -> None:
    m = ll.wrap(one_layer(), "lamda", r=2, pmb_schedule="reference", total_steps=2, pmb_freeze_fraction=0.5,
                target_modules=["0"])
    a = adapter_of(m)
    with torch.no_grad():
        a.lora_B.add_(0.3)
    x = torch.randn(4, 10)
    before = m(x).detach()
    for _ in range(2):  # t = floor(step / (0.5 * 2)) reaches r = 2
        m.after_backward()
    assert bool(a.frozen_columns.all()) and not a.lora_B.requires_grad
    torch.testing.assert_close(m(x), before, rtol=0, atol=1e-6)
