"""SSF: init, exact merges into Linear / Conv / norms, channel axis, counts and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lifelong as ll


def randomise(model: ll.AdaptedModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapted_layers():
            a = layer.adapters["default"]
            a.scale.copy_(1 + 0.3 * torch.randn(a.scale.shape, generator=g))
            a.shift.copy_(0.3 * torch.randn(a.shift.shape, generator=g))


def test_identity_init_is_exact_and_normal_init_has_the_reference_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4096))
    x = torch.randn(3, 64)
    y = model(x)
    assert torch.equal(ll.wrap(model, "ssf", init="identity", target_modules=["0"])(x), y)
    torch.manual_seed(1)
    a = next(ll.wrap(nn.Sequential(nn.Linear(64, 4096)), "ssf", init="normal",
                     target_modules=["0"]).adapted_layers()).adapters["default"]
    assert abs(a.scale.mean().item() - 1) < 2e-3 and abs(a.scale.std().item() - 0.02) < 2e-3
    assert abs(a.shift.mean().item()) < 2e-3 and abs(a.shift.std().item() - 0.02) < 2e-3


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (4, 3, 6)),
    "linear-nobias": (lambda: nn.Linear(6, 5, bias=False), (4, 6)),
    "conv": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), (2, 3, 9, 9)),
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), (2, 4, 7, 7)),
    "layernorm": (lambda: nn.LayerNorm(6), (2, 5, 6)),
    "layernorm-noaffine": (lambda: nn.LayerNorm(6, elementwise_affine=False), (2, 5, 6)),
    "batchnorm": (lambda: nn.BatchNorm2d(3), (2, 3, 5, 5)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_merge_is_exact_and_unmerge_restores(kind: str) -> None:
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    model = nn.Sequential(make()).eval()
    if isinstance(model[0], nn.BatchNorm2d):
        model[0].running_mean.uniform_(-1, 1)
        model[0].running_var.uniform_(0.5, 2)
    original = {k: v.clone() for k, v in model[0].state_dict().items()}
    m = ll.wrap(model, "ssf", target_modules=["0"])
    randomise(m)
    x = torch.randn(*shape)
    live = m(x)
    m.merge()
    torch.testing.assert_close(m(x), live, rtol=0, atol=1e-5)
    m.unmerge()
    restored = m.base_model[0].base_layer.state_dict()
    assert restored.keys() == original.keys()
    for k in original:
        torch.testing.assert_close(restored[k], original[k], rtol=0, atol=0)
    plain = m.merge_and_unload()
    assert type(plain[0]) is type(make())
    torch.testing.assert_close(plain(x), live, rtol=0, atol=1e-5)


def test_channel_axis_comes_from_the_module_not_the_shape() -> None:
    # Width equals the channel count: a shape heuristic would scale the last axis.
    conv = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False))
    m = ll.wrap(conv, "ssf", init="identity", target_modules=["0"])
    a = next(m.adapted_layers()).adapters["default"]
    with torch.no_grad():
        a.scale.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.randn(1, 2, 3, 4)
    y = m(x)
    base = conv[0].base_layer(x)
    for c in range(4):
        torch.testing.assert_close(y[:, c], base[:, c] * (c + 1))


def test_trainable_count_and_no_weight_decay_group() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.qkv, self.proj = nn.LayerNorm(8), nn.Linear(8, 24), nn.Linear(8, 8)
            self.norm2, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 32), nn.Linear(32, 8)
            self.head = nn.Linear(8, 3)

    m = ll.wrap(Block(), "ssf", modules_to_save=["head"])
    # Per block as in the spec's ViT count: 2·(C + 3C + C + C + 4C + C) with C = 8, plus the head.
    assert m.get_nb_trainable_parameters()[0] == 2 * (8 + 24 + 8 + 8 + 32 + 8) + (8 * 3 + 3)
    assert all(p.dim() == 1 for n, p in m.named_trainable_parameters() if "copies" not in n)


def test_rmsnorm_shift_cannot_be_merged_and_nothing_changes() -> None:
    model = ll.models.tiny_llama()
    m = ll.wrap(model, "ssf", init="normal", target_modules=["input_layernorm", "q_proj"])
    before = {n: p.clone() for n, p in m.base_model.named_parameters()}
    with pytest.raises(ValueError, match="no bias to absorb the SSF shift"):
        m.merge()
    for n, p in m.base_model.named_parameters():
        assert torch.equal(p, before[n]), n
    with torch.no_grad():
        for layer in m.adapted_layers():
            layer.adapters["default"].shift.zero_()
    ids = torch.randint(0, 128, (1, 5))
    live = m(input_ids=ids).logits
    m.merge()
    torch.testing.assert_close(m(input_ids=ids).logits, live, rtol=0, atol=1e-5)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="init must be one of"):
        ll.wrap(nn.Sequential(nn.Linear(2, 2)), "ssf", init="zeros", target_modules=["0"])
    with pytest.raises(ValueError, match="is a ReLU; adapter 'ssf' supports"):
        ll.wrap(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "ssf", target_modules=["1"])


def test_shift_into_a_bias_free_hf_layer_is_refused_not_silently_lost(tmp_path) -> None:
    """A bias created by the merge is dropped by save_pretrained/from_pretrained (Llama's config
    has no bias), so the merge is refused; a plain torch model keeps its new bias and merges."""
    from transformers import AutoModelForCausalLM

    model = ll.models.tiny_llama()
    m = ll.wrap(model, "ssf", init="normal", target_modules=["q_proj", "down_proj"])
    before = {n: p.clone() for n, p in m.base_model.named_parameters()}
    with pytest.raises(ValueError, match="save_pretrained"):
        m.merge_and_unload()
    assert all(torch.equal(p, before[n]) for n, p in m.base_model.named_parameters())
    with torch.no_grad():  # a zero shift needs no bias: the merge is exact and survives a save
        for layer in m.adapted_layers():
            layer.adapters["default"].shift.zero_()
    ids = torch.randint(0, 128, (1, 5))
    live = m(input_ids=ids).logits
    m.merge_and_unload().save_pretrained(tmp_path)
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=ids).logits, live,
                               rtol=0, atol=1e-5)


def test_default_init_is_the_identity() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 5), nn.Linear(5, 2))
    x = torch.randn(3, 6)
    y = model(x)
    m = ll.wrap(model, "ssf")
    assert m.configs["default"].init == "identity" and len(list(m.adapted_layers())) == 3
    assert torch.equal(m(x), y)
