"""Bone / Bat / MiSS: closed forms, parameter counts, errors and parity with PEFT's MiSS."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import minilm, minilm_batches
from torch import nn

import lifelong as ll


def single_layer(out_f: int, in_f: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_f, out_f))


def adapter_of(model: ll.AdaptedModel):
    return next(model.adapted_layers()).adapters["default"]


def test_bone_delta_is_the_tiled_block_and_equals_lora_form() -> None:
    m = ll.wrap(single_layer(10, 9), "bone", r=4, target_modules=["0"])
    a = adapter_of(m)
    with torch.no_grad():
        a.block.copy_(torch.randn(4, 10))
    delta = a.delta_weight(m.base_model[0].base_layer)
    tiled = torch.cat([a.block.T, a.block.T, a.block.T[:, :1]], dim=1)  # in = 9 = 4 + 4 + 1
    torch.testing.assert_close(delta, tiled, rtol=0, atol=0)
    lora_a = torch.tensor([[1.0 if i % 4 == j else 0.0 for i in range(9)] for j in range(4)])
    torch.testing.assert_close(delta, a.block.T @ lora_a, rtol=0, atol=1e-6)


def test_bone_forward_with_padding_equals_merged_weight() -> None:
    model = single_layer(10, 9)
    m = ll.wrap(model, "bone", r=4, target_modules=["0"])
    with torch.no_grad():
        adapter_of(m).block.normal_()
    x = torch.randn(5, 9)
    live = m(x)
    m.merge()
    torch.testing.assert_close(m(x), live, rtol=0, atol=1e-5)


def test_bat_delta_matches_explicit_block_loop() -> None:
    r, out_f, in_f = 4, 8, 12
    m = ll.wrap(single_layer(out_f, in_f), "bone", r=r, variant="bat", target_modules=["0"])
    a = adapter_of(m)
    with torch.no_grad():
        a.block.normal_(0, 0.1)
    w = m.base_model[0].base_layer.weight.detach()
    expected = torch.zeros_like(w)
    for p in range(out_f // r):
        for q in range(in_f // r):
            blk = w[p * r : (p + 1) * r, q * r : (q + 1) * r]
            expected[p * r : (p + 1) * r, q * r : (q + 1) * r] = blk @ a.block[p] + a.block[p]
    torch.testing.assert_close(a.rewrite_weight(w) - w, expected, rtol=0, atol=1e-6)


def test_mini_tiles_its_block_along_the_output() -> None:
    m = ll.wrap(single_layer(12, 8), "bone", r=4, variant="mini", mini_r=3, target_modules=["0"])
    a = adapter_of(m)
    with torch.no_grad():
        a.block.normal_()
    full = a.shared_block()
    assert full.shape == (4, 12)
    for o in range(12):
        torch.testing.assert_close(full[:, o], a.block[:, o % 3])


@pytest.mark.parametrize("variant", ["bone", "bat"])
def test_gradient_at_zero_init_is_nonzero(variant: str) -> None:
    m = ll.wrap(single_layer(8, 8), "bone", r=4, variant=variant, target_modules=["0"])
    m(torch.randn(3, 8)).pow(2).sum().backward()
    assert adapter_of(m).block.grad.abs().sum() > 0


@pytest.mark.parametrize(("variant", "options", "expected"), [
    ("bone", {}, 262_144), ("bat", {}, 262_144), ("mini", {"mini_r": 64}, 4_096)
])
def test_parameter_counts_of_the_spec(variant: str, options: dict, expected: int) -> None:
    layer = nn.Sequential(nn.Linear(4096, 4096, device="meta"))
    m = ll.wrap(layer, "bone", r=64, variant=variant, target_modules=["0"], **options)
    assert m.get_nb_trainable_parameters()[0] == expected


@pytest.mark.parametrize(("variant", "expected"), [("bone", 7_340_032), ("mini", 229_376)])
def test_llama_3b_q_v_counts(variant: str, expected: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    m = ll.wrap(model, "bone", r=64, variant=variant, mini_r=64, target_modules=["q_proj", "v_proj"])
    assert m.get_nb_trainable_parameters()[0] == expected


def test_bat_unmerge_recovers_weight() -> None:
    m = ll.wrap(single_layer(8, 12), "bone", r=4, variant="bat", target_modules=["0"])
    w0 = m.base_model[0].base_layer.weight.detach().clone()
    with torch.no_grad():
        adapter_of(m).block.normal_(0, 0.1)
    m.merge()
    assert not torch.allclose(m.base_model[0].base_layer.weight, w0)
    m.unmerge()
    torch.testing.assert_close(m.base_model[0].base_layer.weight, w0, rtol=0, atol=1e-5)


def test_peft_init_weights_alias() -> None:
    assert ll.adapters.BoneConfig(init_weights="bat").variant == "bat"
    assert ll.adapters.BoneConfig(init_weights=False).init == "random"
    with pytest.raises(ValueError, match="init_weights must be"):
        ll.adapters.BoneConfig(init_weights="pissa")


def test_validate_only_checks_the_alias() -> None:
    """The PEFT alias is resolved when the config is made; ``validate`` never rewrites it later."""
    config = ll.adapters.BoneConfig(r=4)
    config.init_weights = False
    with pytest.raises(ValueError, match="init_weights must be"):
        config.validate()
    assert config.init == "zeros" and config.init_weights is False


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 16}, "larger than in_features=9"),
    ({"r": 4, "variant": "bat"}, "divisible by r"),
    ({"r": 3, "variant": "mini", "mini_r": 4}, "mini_r=4 must divide out_features=10"),
    ({"r": 4, "variant": "diagonal"}, "variant must be one of"),
])
def test_bad_configs_fail_clearly(kwargs: dict, message: str) -> None:
    model = single_layer(10, 9)
    with pytest.raises(ValueError, match=message):
        ll.wrap(model, "bone", target_modules=["0"], **kwargs)
    assert not any(isinstance(m, ll.adapters.AdaptedLayer) for m in model.modules()), "nothing half-done"
    assert all(p.requires_grad for p in model.parameters())


# ---- parity with PEFT's MiSS on the real MiniLM -------------------------------------------------

PEFT_VARIANT = {"bone": True, "bat": "bat", "mini": "mini"}


@pytest.mark.parametrize("variant", ["bone", "bat", "mini"])
def test_parity_with_peft_miss_on_minilm(variant: str) -> None:
    from peft import MissConfig, get_peft_model

    r, mini_r, targets = 64, 32, ["query", "value"]
    ours = ll.wrap(minilm(), "bone", r=r, variant=variant, mini_r=mini_r, target_modules=targets)
    theirs = get_peft_model(minilm(), MissConfig(r=r, mini_r=mini_r, init_weights=PEFT_VARIANT[variant],
                                                 target_modules=targets))
    theirs_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "miss_block")}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in ours.adapted_layers():
            a = layer.adapters["default"]
            block = torch.randn(a.block.shape, generator=g) * (0.05 if variant == "bat" else 0.5)
            a.block.copy_(block)
            peft_block = theirs_layers[a.layer_name].miss_block["default"]
            assert peft_block.shape == block.shape
            peft_block.copy_(block)
    batch = minilm_batches(1)[0]
    tol = 1e-5 if variant == "bat" else 1e-6
    with torch.no_grad():
        y_ours, y_theirs = ours(**batch).last_hidden_state, theirs(**batch).last_hidden_state
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=tol * 10)  # 6 layers of accumulation

    def weights(model: nn.Module) -> dict[str, torch.Tensor]:
        return {n.removeprefix("base_model.model.").replace(".base_layer", ""): p.detach().clone()
                for n, p in model.named_parameters() if n.endswith("weight") and ("query" in n or "value" in n)}

    ours.merge(); theirs.merge_adapter()
    merged_ours, merged_theirs = weights(ours.base_model), weights(theirs)
    assert merged_ours.keys() == merged_theirs.keys() and merged_ours
    for name in merged_ours:
        torch.testing.assert_close(merged_ours[name], merged_theirs[name], rtol=0, atol=tol)
    ours.unmerge(); theirs.unmerge_adapter()
    unmerged_ours, unmerged_theirs = weights(ours.base_model), weights(theirs)
    for name in unmerged_ours:
        torch.testing.assert_close(unmerged_ours[name], unmerged_theirs[name], rtol=0, atol=tol)
    reference = weights(minilm())
    for name in unmerged_ours:
        torch.testing.assert_close(unmerged_ours[name], reference[name], rtol=0, atol=tol)
