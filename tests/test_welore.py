"""WeLore: threshold rule, ratio by bisection, factor quality, trainable set, compressed export."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import minilm
from torch import nn

import lifelong as ll
from lifelong.adapters.welore import normalized_spectrum, to_low_rank, welore_report


def rule_rank(weight: torch.Tensor, tau: float) -> int:
    """Kept rank written out from the spec: k = R − #{σ̂ < τ}."""
    s = torch.linalg.svdvals(weight.double())
    norm = (s - s.min()) / (s.max() - s.min())
    return s.shape[0] - int((norm < tau).sum())


def test_minilm_ratio_is_met_and_every_lrc_has_the_rule_rank() -> None:
    base = minilm()
    targets = ["query", "value", "attention.output.dense"]
    adapted = ll.wrap(copy.deepcopy(base), "welore", ratio=0.3, target_modules=targets)
    config = adapted.configs["default"]
    rows = welore_report(adapted)
    total = rows[-1]
    assert abs(total["fraction"] - 0.3) <= 0.01 * 0.3, total
    lrcs, expected_trainable = 0, 0
    for layer in adapted.adapted_layers():
        a = layer.adapters["default"]
        k = rule_rank(layer.base_layer.weight, config.threshold)
        m, n = a.shape
        if k * (m + n) < m * n:
            lrcs += 1
            expected_trainable += k * (m + n)
            assert a.k == k and a.up.shape == (m, k) and a.down.shape == (k, n)
        else:
            assert a.k == 0 and not list(a.parameters())
            assert torch.equal(layer.base_layer.weight, base.get_submodule(a.layer_name).weight)
    assert lrcs > 0
    trainable = sum(p.numel() for p in adapted.trainable_parameters())
    assert trainable == expected_trainable


def test_factors_are_the_best_rank_k_approximation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20))
    adapted = ll.wrap(copy.deepcopy(model), "welore", threshold=0.5, target_modules=["0"], svd_dtype="float64")
    a = next(adapted.adapted_layers()).adapters["default"]
    w = model[0].weight.detach().double()
    s = torch.linalg.svdvals(w)
    k = a.k
    assert k == rule_rank(model[0].weight, 0.5) and k > 0
    err = w - (a.up.double() @ a.down.double()).detach()
    assert abs(float(err.norm() ** 2) - float((s[k:] ** 2).sum())) < 1e-4 * float((s ** 2).sum())
    torch.testing.assert_close(a.up.double().T @ a.up.double(), torch.diag(s[:k]), rtol=0, atol=1e-4)
    x = torch.randn(3, 24)
    with torch.no_grad():
        expected = x @ (a.up @ a.down).T + model[0].bias  # the bias is kept
        torch.testing.assert_close(adapted(x), expected, rtol=0, atol=1e-5)


def test_spectrum_rule_invariances_and_non_uniformity() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(30, 30, generator=g)
    q1 = torch.linalg.qr(torch.randn(30, 30, generator=g))[0]
    q2 = torch.linalg.qr(torch.randn(30, 30, generator=g))[0]
    for tau in (0.1, 0.3):
        assert rule_rank(w, tau) == rule_rank(3.0 * w, tau) == rule_rank(q1 @ w @ q2, tau)
    low = torch.randn(30, 3, generator=g) @ torch.randn(3, 30, generator=g) + 0.01 * torch.randn(30, 30, generator=g)
    assert (30 - rule_rank(low, 0.175)) > 2 * (30 - rule_rank(w, 0.175))
    assert torch.equal(normalized_spectrum(torch.ones(4)), torch.ones(4))  # flat: nothing dropped


def test_merge_and_unload_and_low_rank_export_give_the_compressed_model() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(5, 32)
    dense = sum(p.numel() for p in model.parameters())
    adapted = ll.wrap(model, "welore", ratio=0.4, target_modules=["0", "2"])
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.mul_(1.1)
        live = adapted(x)
    low = to_low_rank(copy.deepcopy(adapted))
    with torch.no_grad():
        torch.testing.assert_close(low(x), live, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in low.parameters()) < dense
    assert any(type(m).__name__ == "LowRankLinear" for m in low.modules())
    merged = adapted.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), live, rtol=0, atol=1e-5)


def test_save_load_keeps_the_ranks(tmp_path) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    adapted = ll.wrap(copy.deepcopy(model), "welore", ratio=0.3, target_modules=["0", "2"])
    adapted.save_pretrained(tmp_path)
    back = ll.load(copy.deepcopy(model), tmp_path)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x), adapted(x), rtol=0, atol=0)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval_fails(ratio: float) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"ratio must be a fraction of parameters to remove in \(0, 1\)"):
        ll.wrap(model, "welore", ratio=ratio)
    assert isinstance(model[0], nn.Linear)



@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_fails_naming_the_layer(bad: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight[1, 3] = bad
    with pytest.raises(ValueError, match=r"welore: layer '2' has 1 NaN or infinite weight value\(s\)"):
        ll.wrap(model, "welore", ratio=0.2, target_modules=["0", "2"])
    assert not any(isinstance(m, ll.adapters.AdaptedLayer) for m in model.modules())
