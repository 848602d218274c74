"""Plain LoRA: numerically PEFT's ``LoraConfig`` layer on the same weights (forward, training
forward with dropout, merged / unmerged weights, several adapters, weighted combination and the
PEFT export), on a small ``nn.Sequential`` and on the real MiniLM."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import _MINILM, minilm
from torch import nn

import lifelong as ll
from lifelong.adapters.peft_export import export_peft
from lifelong.adapters.registry import lora_shaped_methods

MINILM_TARGETS = ["query", "key", "value", "dense"]  # every Linear of the encoder and the pooler
SEQ_TARGETS = ["0", "2"]


def sequential() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).eval()


def seq_batch() -> torch.Tensor:
    return torch.randn(5, 12, generator=torch.Generator().manual_seed(1))


def minilm_batch() -> dict[str, torch.Tensor]:
    minilm()
    texts = ["Low-rank adapters train few parameters.", "The river ran past the old mill at dawn."]
    return dict(_MINILM["tokenizer"](texts, padding=True, return_tensors="pt"))


def output(model: nn.Module, batch) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def randomise(model: ll.AdaptedModel, seed: int = 3) -> None:
    """Move A and B off their init (B = 0 would hide every error in A)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def peft_twin(base: nn.Module, ours: ll.AdaptedModel, adapter: str = "default", peft_model=None, **peft_options):
    """PEFT's LoRA on a copy of ``base`` (or one more adapter on ``peft_model``) holding our A and B."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**peft_options)
    if peft_model is None:
        peft_model = get_peft_model(copy.deepcopy(base), config, adapter_name=adapter)
    else:
        peft_model.add_adapter(adapter, config)
    layers = dict(peft_model.base_model.model.named_modules())
    count = 0
    with torch.no_grad():
        for layer in ours.adapted_layers():
            if adapter in layer.adapters:
                ada = layer.adapters[adapter]
                theirs = layers[ada.layer_name]
                assert math.isclose(theirs.scaling[adapter], ada.scale, rel_tol=1e-12), ada.layer_name
                theirs.lora_A[adapter].weight.copy_(ada.lora_A)
                theirs.lora_B[adapter].weight.copy_(ada.lora_B)
                count += 1
    assert count > 0
    return peft_model.eval()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


CASES = {
    "sequential": (sequential, seq_batch, SEQ_TARGETS),
    "minilm": (minilm, minilm_batch, MINILM_TARGETS),
}


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("kind", list(CASES))
def test_forward_merge_unmerge_equal_peft(kind: str, use_rslora: bool) -> None:
    make, batch_of, targets = CASES[kind]
    base, batch = make(), batch_of()
    options = {"r": 4, "lora_alpha": 7.0, "target_modules": targets, "use_rslora": use_rslora}
    ours = ll.wrap(copy.deepcopy(base), "lora", **options).eval()
    randomise(ours)
    theirs = peft_twin(base, ours, **options)
    with torch.no_grad():
        err = max_err(output(ours, batch), output(theirs, batch))
        assert err <= 1e-5, err
        assert max_err(output(ours, batch), output(base, batch)) > 1e-3  # the adapter does something
        ours.merge()
        theirs.merge_adapter()
        peft_layers = dict(theirs.base_model.model.named_modules())
        for layer in ours.adapted_layers():
            name = layer.adapters["default"].layer_name
            assert max_err(layer.base_layer.weight, peft_layers[name].base_layer.weight) <= 1e-6, name
        assert max_err(output(ours, batch), output(theirs, batch)) <= 1e-5
        ours.unmerge()
        for layer in ours.adapted_layers():
            name = layer.adapters["default"].layer_name
            assert max_err(layer.base_layer.weight, base.get_submodule(name).weight) <= 1e-6, name


def test_merged_weights_are_w_plus_scaled_ba_in_float64() -> None:
    base = sequential()
    ours = ll.wrap(copy.deepcopy(base), "lora", r=3, lora_alpha=6.0, target_modules=SEQ_TARGETS,
                   alpha_pattern={"2": 1.5}, rank_pattern={"2": 2})
    randomise(ours)
    factors = {layer.adapters["default"].layer_name: layer.adapters["default"] for layer in ours.adapted_layers()}
    assert (factors["0"].r, factors["0"].scale) == (3, 2.0) and (factors["2"].r, factors["2"].scale) == (2, 0.75)
    plain = ours.merge_and_unload()
    for name, ada in factors.items():
        expected = base.get_submodule(name).weight.double() + ada.scale * ada.lora_B.double() @ ada.lora_A.double()
        assert max_err(plain.get_submodule(name).weight, expected) <= 1e-6, name
        assert type(plain.get_submodule(name)) is nn.Linear


def test_training_forward_with_dropout_and_gradients_equal_peft() -> None:
    base, x = sequential(), seq_batch()
    options = {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.5, "target_modules": SEQ_TARGETS}
    ours = ll.wrap(copy.deepcopy(base), "lora", **options)
    randomise(ours)
    theirs = peft_twin(base, ours, **options)
    ours.train()
    theirs.train()
    torch.manual_seed(11)
    y_ours = ours(x)
    torch.manual_seed(11)
    y_theirs = theirs(x)
    assert max_err(y_ours, y_theirs) <= 1e-6
    with torch.no_grad():
        assert max_err(y_ours, ours.eval()(x)) > 1e-3  # the dropout mask was really applied
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    peft_layers = dict(theirs.base_model.model.named_modules())
    for layer in ours.adapted_layers():
        ada = layer.adapters["default"]
        other = peft_layers[ada.layer_name]
        assert max_err(ada.lora_A.grad, other.lora_A["default"].weight.grad) <= 1e-5
        assert max_err(ada.lora_B.grad, other.lora_B["default"].weight.grad) <= 1e-5


def test_init_is_peft_default_and_the_model_is_the_base() -> None:
    base, x = sequential(), seq_batch()
    torch.manual_seed(5)
    ours = ll.wrap(copy.deepcopy(base), "lora", r=4, target_modules=["0"])
    torch.manual_seed(5)
    expected = torch.empty(4, 12)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5))  # what PEFT's init_lora_weights=True does to A
    ada = next(iter(ours.adapted_layers())).adapters["default"]
    assert torch.equal(ada.lora_A.detach(), expected)
    assert torch.count_nonzero(ada.lora_B) == 0 and ada.scale == 8.0 / 4
    with torch.no_grad():
        assert torch.equal(ours(x), base(x))
    assert sum(p.numel() for p in ours.trainable_parameters()) == 4 * (12 + 10)


@pytest.mark.parametrize(("alias", "init"), [(True, "kaiming"), (False, "random"), ("gaussian", "gaussian")])
def test_peft_spelling_of_init(alias, init: str) -> None:
    config = ll.adapters.LoraConfig(init_lora_weights=alias)
    assert config.init == init and config.init_lora_weights is None
    ours = ll.wrap(sequential(), "lora", r=4, target_modules=["0"], init_lora_weights=alias)
    ada = next(iter(ours.adapted_layers())).adapters["default"]
    assert (torch.count_nonzero(ada.lora_B) == 0) == (init != "random")
    if init == "gaussian":
        assert 0.1 < float(ada.lora_A.detach().std()) < 0.4  # N(0, 1/r²) with r = 4: std 0.25


def test_several_adapters_and_weighted_combination_equal_peft() -> None:
    base, x = sequential(), seq_batch()
    first = {"r": 4, "lora_alpha": 8.0, "target_modules": SEQ_TARGETS}
    second = {"r": 2, "lora_alpha": 3.0, "target_modules": ["2"]}
    ours = ll.wrap(copy.deepcopy(base), "lora", **first)
    ours.add_adapter("b", "lora", **second)
    randomise(ours)
    theirs = peft_twin(base, ours, **first)
    theirs = peft_twin(base, ours, adapter="b", peft_model=theirs, **second)
    with torch.no_grad():
        for active in ("default", "b", ["default", "b"]):
            ours.set_adapter(active)
            theirs.base_model.set_adapter(active)
            assert max_err(ours(x), theirs(x)) <= 1e-6, active
        ours.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type="cat")
        theirs.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type="cat")
        ours.set_adapter("mix")
        theirs.base_model.set_adapter("mix")
        assert max_err(ours(x), theirs(x)) <= 1e-6
    assert "lora" in lora_shaped_methods()


@pytest.mark.parametrize("kind", list(CASES))
def test_peft_export_loads_in_peft_with_equal_outputs(kind: str, tmp_path) -> None:
    from peft import PeftModel

    make, batch_of, targets = CASES[kind]
    base, batch = make(), batch_of()
    ours = ll.wrap(copy.deepcopy(base), "lora", r=4, lora_alpha=5.0, lora_dropout=0.1, target_modules=targets,
                   rank_pattern={targets[-1]: 2}, use_rslora=True).eval()
    randomise(ours)
    export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_dropout"] == 0.1
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        err = max_err(output(loaded, batch), output(ours, batch))
        assert err <= 1e-5, err
        assert max_err(output(loaded, batch), output(base, batch)) > 1e-3


@pytest.mark.parametrize("kind", list(CASES))
def test_save_pretrained_and_load_reproduce_the_model(kind: str, tmp_path) -> None:
    make, batch_of, targets = CASES[kind]
    base, batch = make(), batch_of()
    ours = ll.wrap(copy.deepcopy(base), "lora", r=4, lora_alpha=16.0, target_modules=targets).eval()
    ours.add_adapter("other", "lora", r=2, target_modules=targets[:1])
    randomise(ours)
    ours.save_pretrained(tmp_path)
    saved = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert "lora" in json.dumps(saved)
    loaded = ll.load(copy.deepcopy(base), tmp_path).eval()
    assert loaded.configs["default"] == ours.configs["default"]
    with torch.no_grad():
        assert torch.equal(output(loaded, batch), output(ours, batch))


@pytest.mark.parametrize(("options", "message"), [
    ({"r": 0}, "r must be a positive integer, got 0"),
    ({"r": 2.5}, "r must be a positive integer, got 2.5"),
    ({"lora_alpha": 0}, "lora_alpha must be a finite number > 0, got 0"),
    ({"lora_alpha": -1.0}, "lora_alpha must be a finite number > 0, got -1.0"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\), got 1.0"),
    ({"lora_dropout": -0.1}, "lora_dropout must be a finite number >= 0, got -0.1"),
    ({"use_rslora": "yes"}, "use_rslora must be True or False, got 'yes'"),
    ({"init": "pissa"}, r"init must be one of \['kaiming', 'gaussian', 'random'\], got 'pissa'"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights must be True, False or 'gaussian', got 'pissa'"),
    ({"alpha_pattern": {"0": 0.0}}, "alpha_pattern must map module names to positive lora_alpha values"),
    ({"rank_pattern": {"0": 0}, "target_modules": ["0"]}, "r for '0' must be a positive integer, got 0"),
])
def test_bad_config_values_are_refused(options: dict, message: str) -> None:
    model = sequential()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        ll.wrap(model, "lora", **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
