"""KORE null-space init: exact init, projector form, the null-space guarantee under training."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lifelong as ll
from lifelong.adapters.calibration import calibrate
from lifelong.adapters.kore import null_space_leakage, null_space_report

IN, OUT, SUB, R = 16, 8, 6, 4  # old inputs live in a 6-dim subspace of R^16, so C has an exact 10-dim null space


def old_and_new(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(IN, SUB, generator=g))[0]
    old = torch.randn(200, SUB, generator=g) @ basis.T
    new = torch.randn(200, IN, generator=g)
    return old, new


def layer_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, OUT))


def test_exact_init_and_projector_form() -> None:
    old, _ = old_and_new()
    model = layer_model()
    w = model[0].weight.detach().clone()
    adapted = ll.wrap(copy.deepcopy(model), "kore", r=R, target_modules=["0"], calibration=[old], progress=False)
    layer = next(adapted.adapted_layers())
    a = layer.adapters["default"]
    cov = calibrate(model, [old], ["0"], progress=False).covariance("0").double()
    lam, q = torch.linalg.eigh(cov)
    p = q[:, :R] @ q[:, :R].T
    torch.testing.assert_close(a.delta_weight(layer.base_layer).double(), w.double() @ p, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight.double(), w.double() @ (torch.eye(IN, dtype=torch.float64) - p),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(a.lora_A.double() @ p, a.lora_A.double(), rtol=0, atol=1e-5)  # rows of A in span(Q_n)
    with torch.no_grad():
        torch.testing.assert_close(adapted(old[:5]), model(old[:5]), rtol=0, atol=1e-5)
    assert [n for n, _ in adapted.named_trainable_parameters()] == ["base_model.0.adapters.default.lora_B"]
    report = null_space_report(adapted)
    assert report[0]["tokens"] == 200 and report[0]["in_features"] == IN and report[0]["null_mass"] < 1e-6


def train(adapted: nn.Module, data: torch.Tensor, steps: int = 60) -> None:
    target = torch.randn(data.shape[0], OUT, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(adapted.parameters() if not hasattr(adapted, "trainable_parameters")
                           else adapted.trainable_parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        ((adapted(data) - target) ** 2).mean().backward()
        opt.step()


def effective_weight(model: nn.Module) -> torch.Tensor:
    merged = copy.deepcopy(model).merge_and_unload()
    return merged[0].weight.detach() if isinstance(merged, nn.Sequential) else merged.base_model.model[0].weight.detach()


def test_training_b_keeps_old_knowledge_outputs_while_lora_drifts() -> None:
    from peft import LoraConfig, get_peft_model

    old, new = old_and_new()
    model = layer_model()
    w0 = model[0].weight.detach().clone()
    cov = calibrate(model, [old], ["0"], progress=False).covariance("0")
    kore = ll.wrap(copy.deepcopy(model), "kore", r=R, target_modules=["0"], calibration=[old], progress=False)
    train(kore, new)
    delta_kore = effective_weight(kore) - w0
    with torch.no_grad():
        drift_old = float((kore(old) - model(old)).norm() / model(old).norm())
        drift_new = float((kore(new) - model(new)).norm() / model(new).norm())
    assert drift_old < 1e-5 and drift_new > 1e-2

    torch.manual_seed(0)
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=R, lora_alpha=R, target_modules=["0"], init_lora_weights=False))
    train(lora, new)
    delta_lora = lora.merge_and_unload()[0].weight.detach() - w0
    leak_kore, leak_lora = null_space_leakage(delta_kore, cov), null_space_leakage(delta_lora, cov)
    assert leak_kore < 1e-3 * leak_lora, (leak_kore, leak_lora)

    ab = ll.wrap(copy.deepcopy(model), "kore", r=R, target_modules=["0"], calibration=[old], progress=False,
                 train="AB")
    train(ab, new)
    assert null_space_leakage(effective_weight(ab) - w0, cov) > 100 * leak_kore  # why A stays frozen


def test_warns_when_the_null_space_is_not_null_and_reports_it() -> None:
    _, new = old_and_new()  # isotropic data excites every direction
    with pytest.warns(UserWarning, match="far from null"):
        ll.wrap(layer_model(), "kore", r=R, target_modules=["0"], calibration=[new], progress=False)


def test_zero_b_init_and_shared_statistics_with_corda(monkeypatch) -> None:
    old, _ = old_and_new()
    model = layer_model()
    stats = calibrate(model, [old], ["0"], progress=False)
    import lifelong.adapters.calibration as calibration

    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: pytest.fail("calibrated twice"))
    zero = ll.wrap(copy.deepcopy(model), "kore", r=R, target_modules=["0"], calibration=stats, init="zero_b")
    a = next(zero.adapted_layers()).adapters["default"]
    torch.testing.assert_close(a.lora_A @ a.lora_A.T, torch.eye(R), rtol=0, atol=1e-5)
    assert not a.lora_B.any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ll.wrap(copy.deepcopy(model), "corda", r=R, mode="kpm", target_modules=["0"], calibration=stats)


def test_bad_inputs() -> None:
    old, _ = old_and_new()
    model = layer_model()
    with pytest.raises(ValueError, match="exceeds min"):
        ll.wrap(model, "kore", r=OUT + 1, target_modules=["0"], calibration=[old], progress=False)
    with pytest.raises(ValueError, match="empty"):
        ll.wrap(model, "kore", r=R, target_modules=["0"], calibration=[], progress=False)
    with pytest.raises(ValueError, match="train must be one of"):
        ll.wrap(model, "kore", r=R, target_modules=["0"], calibration=[old], train="C")
    assert isinstance(model[0], nn.Linear) and not any(m._forward_hooks for m in model.modules())
