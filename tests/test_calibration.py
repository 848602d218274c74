"""Streamed covariance calibration: formula, padding, batch forms, reuse, errors, hook hygiene."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lifelong as ll
from lifelong.adapters.calibration import CovarianceStats, calibrate


class Tokens(nn.Module):
    """A tiny HF-shaped model: token embeddings, then q/k (same input) and an MLP layer."""

    def __init__(self, vocab: int = 20, d: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.emb(input_ids)
        return self.up(torch.relu(self.q(h) + self.k(h)))


def hand_cov(rows: list[torch.Tensor]) -> torch.Tensor:
    """Σ_j (X_j/|max X_j|)ᵀ(X_j/|max X_j|) / N, written out per call."""
    total = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in rows)
    return total / len(rows)


def test_single_linear_matches_the_formula_and_counts_calls() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(5, 3)
    model = nn.Sequential(layer)
    x = torch.randn(7, 5)
    stats = calibrate(model, [x], ["0"], progress=False)
    torch.testing.assert_close(stats.covariance("0"), hand_cov([x]), rtol=1e-6, atol=1e-7)
    twice = calibrate(model, [x, (x, torch.zeros(7))], ["0"], progress=False)  # a tensor and an (x, y) tuple
    assert twice.calls["0"] == 2 and twice.tokens["0"] == 14
    torch.testing.assert_close(twice.covariance("0"), stats.covariance("0"), rtol=1e-6, atol=1e-7)
    plain = calibrate(model, [x], ["0"], normalize="none", progress=False)
    torch.testing.assert_close(plain.covariance("0"), x.T @ x / 7, rtol=1e-6, atol=1e-6)


def test_padding_rows_are_dropped_and_sequences_weighted_as_single_calls() -> None:
    model = Tokens()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    padded = calibrate(model, [{"input_ids": ids, "attention_mask": mask, "labels": ids}], ["q", "up"], progress=False)
    one_by_one = calibrate(model, [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :2]}], ["q", "up"], progress=False)
    for name in ("q", "up"):
        torch.testing.assert_close(padded.covariance(name), one_by_one.covariance(name), rtol=1e-5, atol=1e-6)
        assert padded.calls[name] == 2 and padded.tokens[name] == 6
    with torch.no_grad():
        h = model.emb(ids)[mask.bool()]
    plain = calibrate(model, [{"input_ids": ids, "attention_mask": mask}], ["q"], normalize="none", progress=False)
    torch.testing.assert_close(plain.covariance("q"), h.T @ h / 6, rtol=1e-5, atol=1e-6)


def test_layers_sharing_one_input_get_identical_covariance() -> None:
    model = Tokens()
    ids = torch.randint(0, 20, (3, 5))
    stats = calibrate(model, [{"input_ids": ids}], ["q", "k"], progress=False)
    alone = calibrate(model, [{"input_ids": ids}], ["k"], progress=False)
    torch.testing.assert_close(stats.sums["q"], stats.sums["k"], rtol=0, atol=0)
    torch.testing.assert_close(stats.sums["k"], alone.sums["k"], rtol=0, atol=0)


def test_an_input_changed_in_place_after_a_layer_is_seen_as_it_was() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.clone()
            out = self.a(h)
            h.mul_(3.0)  # same tensor object, new contents: b must see the tripled rows
            return out + self.b(h)

    x = torch.rand(5, 4) + 0.1
    stats = calibrate(InPlace(), [x], ["a", "b"], normalize="none", progress=False)
    torch.testing.assert_close(stats.sums["a"], x.T @ x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.sums["b"], 9 * x.T @ x, rtol=1e-6, atol=1e-5)


def test_save_load_round_trip_and_shape_check(tmp_path) -> None:
    model = Tokens()
    stats = calibrate(model, [{"input_ids": torch.randint(0, 20, (2, 4))}], ["q", "up"], progress=False)
    stats.save(tmp_path / "cov.safetensors")
    back = CovarianceStats.load(tmp_path / "cov.safetensors")
    assert back.calls == stats.calls and back.tokens == stats.tokens and back.normalize == "max"
    for name in stats.sums:
        assert torch.equal(back.sums[name], stats.sums[name])
    back.check_layers({"q": model.q})
    with pytest.raises(ValueError, match="another model"):
        back.check_layers({"q": nn.Linear(9, 6)})
    with pytest.raises(ValueError, match="no entry for layer"):
        back.check_layers({"k": model.k})


def test_bad_data_gives_clear_errors_and_never_leaves_hooks() -> None:
    model = Tokens()
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], ["q"], progress=False)

    class Nan(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x * float("nan"))

    with pytest.raises(ValueError, match="NaN/inf covariance for layer 'fc'"):
        calibrate(Nan(), [torch.ones(2, 3)], ["fc"], progress=False)

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="never reached targeted layer.*unused"):
        calibrate(Skips(), [torch.ones(2, 3)], ["used", "unused"], progress=False)

    def failing():
        yield {"input_ids": torch.randint(0, 20, (1, 3))}
        yield {"input_ids": torch.full((1, 3), 99)}  # out of vocabulary: the forward raises

    model.train()
    with pytest.raises(IndexError):
        calibrate(model, failing(), ["q", "k", "up"], progress=False)
    assert model.training, "training mode restored"
    assert all(not m._forward_hooks for m in model.modules()), "hooks removed after an error"
    with pytest.raises(TypeError, match="tensors, dicts"):
        calibrate(model, ["not a batch"], ["q"], progress=False)


def test_unmasked_token_batches_count_one_call_per_sequence() -> None:
    model = Tokens()
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(4))
    batched = calibrate(model, [ids], ["q"], progress=False)
    single = calibrate(model, [ids[i:i + 1] for i in range(3)], ["q"], progress=False)
    assert batched.calls["q"] == single.calls["q"] == 3
    torch.testing.assert_close(batched.covariance("q"), single.covariance("q"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["corda", "kore"])
def test_a_bare_tensor_or_dict_as_calibration_says_what_is_allowed(method: str) -> None:
    from conftest import MLP

    model = MLP()
    for bad in (torch.randn(8, 16), {"x": torch.randn(8, 16)}):
        with pytest.raises(TypeError, match=r"iterable of batches.*pass \[batch\]"):
            ll.wrap(model, method, r=4, calibration=bad, progress=False)
    assert not any(isinstance(m, ll.adapters.AdaptedLayer) for m in model.modules())
    ll.wrap(model, method, r=4, calibration=[torch.randn(8, 16)], progress=False, **(
        {"null_tol": 1.0} if method == "kore" else {}))
