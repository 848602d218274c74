"""CorDA: numerical parity with PEFT's CorDA on the real MiniLM, and the spec's invariants."""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
from conftest import _MINILM, minilm
from torch import nn

import lifelong as ll
from lifelong.adapters.calibration import CovarianceStats, calibrate

# Layer 0 of the encoder: every in=384 projection (the 512-token batch makes C full rank there).
PARITY_TARGETS = r"encoder\.layer\.0\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense)"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_matches_peft_corda_on_minilm(mode: str) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig as PeftCorda
    from peft.tuners.lora.corda import preprocess_corda

    base = minilm()
    tokenizer = _MINILM["tokenizer"]
    batch = dict(tokenizer(inspect.getdoc(json), return_tensors="pt", truncation=True, max_length=512))
    reference = copy.deepcopy(base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=PARITY_TARGETS, init_lora_weights="corda",
                        corda_config=PeftCorda(corda_method=mode))
    preprocess_corda(reference, config, run_model=lambda: reference(**batch))
    peft_model = get_peft_model(reference, config)
    ours = ll.wrap(copy.deepcopy(base), "corda", r=8, lora_alpha=16, mode=mode, target_modules=PARITY_TARGETS,
                   calibration=[batch], progress=False)
    peft_layers = dict(peft_model.base_model.model.named_modules())
    layers = list(ours.adapted_layers())
    assert len(layers) == 5
    with torch.no_grad():
        for layer in layers:
            adapter = layer.adapters["default"]
            theirs = peft_layers[adapter.layer_name]
            delta = theirs.scaling["default"] * theirs.lora_B["default"].weight @ theirs.lora_A["default"].weight
            assert rel(adapter.delta_weight(layer.base_layer), delta) < 1e-4, adapter.layer_name
            assert rel(layer.base_layer.weight, theirs.base_layer.weight) < 1e-4, adapter.layer_name
        out = ours(**batch).last_hidden_state
        ref = base(**batch).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def toy(seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))
    data = [torch.randn(40, 12) for _ in range(3)]
    return model, data


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_residual_plus_adapter_is_the_weight_and_output_unchanged(mode: str) -> None:
    model, data = toy()
    original = copy.deepcopy(model)
    adapted = ll.wrap(model, "corda", r=3, mode=mode, target_modules=["0", "2"], calibration=data, progress=False)
    for layer in adapted.adapted_layers():
        a = layer.adapters["default"]
        w = original.get_submodule(a.layer_name).weight
        torch.testing.assert_close(layer.base_layer.weight + a.delta_weight(layer.base_layer), w, rtol=0, atol=1e-6)
        assert a.lora_A.shape == (3, w.shape[1]) and a.lora_B.shape == (w.shape[0], 3)
    with torch.no_grad():
        torch.testing.assert_close(adapted(data[0]), original(data[0]), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in adapted.trainable_parameters()) == 3 * (12 + 10) + 3 * (10 + 6)


def products(adapted) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        layer.adapters["default"].layer_name: (
            layer.adapters["default"].delta_weight(layer.base_layer).detach(), layer.base_layer.weight.detach().clone())
        for layer in adapted.adapted_layers()
    }


def test_scale_of_covariance_and_lora_alpha_do_not_change_the_products() -> None:
    model, data = toy()
    stats = calibrate(model, data, ["0", "2"], progress=False)
    scaled = CovarianceStats({k: v * 256.0 for k, v in stats.sums.items()}, stats.calls, stats.tokens)
    runs = [
        ll.wrap(copy.deepcopy(model), "corda", r=4, mode="kpm", target_modules=["0", "2"], calibration=s,
                lora_alpha=alpha)
        for s, alpha in ((stats, 8.0), (scaled, 8.0), (stats, 2.0))
    ]
    first = products(runs[0])
    for other in runs[1:]:
        for name, (delta, residual) in products(other).items():
            assert rel(delta, first[name][0]) < 1e-4 and rel(residual, first[name][1]) < 1e-4
    a8 = next(runs[0].adapted_layers()).adapters["default"]
    a2 = next(runs[2].adapted_layers()).adapters["default"]
    assert not torch.allclose(a8.lora_A, a2.lora_A)  # the factors do move with alpha


def test_identity_covariance_gives_the_svd_split() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 6))
    eye = CovarianceStats({"0": torch.eye(8)}, {"0": 1}, {"0": 8})
    w = model[0].weight.detach().clone()
    u, s, vh = torch.linalg.svd(w)
    for mode, idx in (("ipm", slice(0, 2)), ("kpm", slice(4, 6))):
        adapted = ll.wrap(copy.deepcopy(model), "corda", r=2, mode=mode, target_modules=["0"], calibration=eye)
        layer = next(adapted.adapted_layers())
        expected = u[:, idx] @ torch.diag(s[idx]) @ vh[idx]
        assert rel(layer.adapters["default"].delta_weight(layer.base_layer), expected) < 1e-5


def test_float64_decomposition_keeps_the_smallest_components_that_float32_loses() -> None:
    """An ill-conditioned covariance (eigenvalues 1 ... 1e-6): KPM in float32 drifts, float64 agrees
    with a hand-written float64 decomposition of the same damped covariance."""
    torch.manual_seed(5)
    d, r = 24, 3
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    cov = (q * torch.logspace(0, -6, d, dtype=torch.float64)) @ q.T
    model = nn.Sequential(nn.Linear(d, 16))
    stats = CovarianceStats({"0": cov.float()}, {"0": 1}, {"0": d})
    c = cov.float().double()
    fixed = c + torch.eye(d, dtype=torch.float64) * torch.diag(c).mean() * 0.01
    w = model[0].weight.detach().double()
    u, sv, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    expected = u[:, -r:] @ torch.diag(sv[-r:]) @ torch.linalg.solve(fixed, vh.T)[:, -r:].T
    errors = {}
    for dtype in ("float32", "float64"):
        adapted = ll.wrap(copy.deepcopy(model), "corda", r=r, mode="kpm", target_modules=["0"], calibration=stats,
                          svd_dtype=dtype)
        layer = next(adapted.adapted_layers())
        errors[dtype] = rel(layer.adapters["default"].delta_weight(layer.base_layer).double(), expected)
        restored = layer.base_layer.weight + layer.adapters["default"].delta_weight(layer.base_layer)
        torch.testing.assert_close(restored, model[0].weight, rtol=0, atol=1e-6)
    assert errors["float64"] < 1e-5
    assert errors["float32"] > 100 * errors["float64"]


def test_saved_statistics_are_reused_without_recalibrating(tmp_path, monkeypatch) -> None:
    model, data = toy()
    direct = ll.wrap(copy.deepcopy(model), "corda", r=2, target_modules=["0", "2"], calibration=data, progress=False)
    calibrate(model, data, ["0", "2"], progress=False).save(tmp_path / "c.safetensors")
    import lifelong.adapters.calibration as calibration

    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: pytest.fail("calibrated twice"))
    reused = ll.wrap(copy.deepcopy(model), "corda", r=2, target_modules=["0", "2"],
                     calibration=str(tmp_path / "c.safetensors"))
    for name, (delta, residual) in products(reused).items():
        assert torch.equal(delta, products(direct)[name][0])


def test_bad_inputs_fail_before_the_model_changes() -> None:
    model, data = toy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="exceeds min"):
        ll.wrap(model, "corda", r=7, target_modules=["2"], calibration=data, progress=False)
    with pytest.raises(ValueError, match="did not converge.*final damp"):
        ll.wrap(model, "corda", r=2, target_modules=["0"], calibration=data, progress=False, inv_tol=1e-30,
                max_doublings=2)
    other = CovarianceStats({"0": torch.eye(5)}, {"0": 1}, {"0": 5})
    with pytest.raises(ValueError, match="another model"):
        ll.wrap(model, "corda", r=2, target_modules=["0"], calibration=other)
    with pytest.raises(ValueError, match="needs calibration"):
        ll.wrap(model, "corda", r=2, target_modules=["0"])
    with pytest.raises(ValueError, match="mode must be one of"):
        ll.wrap(model, "corda", r=2, mode="both", calibration=data)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(m._forward_hooks for m in model.modules())
