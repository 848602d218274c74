"""The adapter core: registry, targeting, several adapters, save/load and clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import MLP
from torch import nn

import lifelong as ll
from lifelong.adapters import AdaptedLayer, SavedModule


def test_available_is_sorted_and_unknown_names_list_the_valid_ones() -> None:
    names = ll.available()
    assert names == sorted(names) and {"bone", "lamda", "ssf"} <= set(names)
    with pytest.raises(ValueError, match=r"unknown adapter method 'boen'; available: \['"):
        ll.wrap(MLP(), "boen")


def test_unknown_option_lists_the_allowed_ones() -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rank'\] for adapter 'bone'; allowed: .*'r'"):
        ll.wrap(MLP(), "bone", rank=4)


def test_config_object_is_accepted_and_not_modified() -> None:
    config = ll.adapters.LaMDAConfig(r=2, adaptive_rank=True, target_modules=["fc1", "fc2"])
    m = ll.wrap(MLP(), config)
    assert config.rank_pattern == {} and m.configs["default"].rank_pattern


def test_target_matching_nothing_names_the_candidates() -> None:
    with pytest.raises(ValueError, match=r"matched no module.*candidate modules: fc1, fc2, head"):
        ll.wrap(MLP(), "bone", r=4, target_modules=["query"])


def test_suffix_regex_and_all_linear_targets() -> None:
    def targets(**options) -> list[str]:
        m = ll.wrap(MLP(), "bone", r=4, **options)
        return sorted(l.adapters["default"].layer_name for l in m.adapted_layers())

    assert targets(target_modules=["fc2"]) == ["fc2"]
    assert targets(target_modules=r"fc\d") == ["fc1", "fc2"]
    assert targets(target_modules="all-linear") == ["fc1", "fc2"]  # the head is excluded
    assert targets(target_modules="all-linear", exclude_modules=["fc1"]) == ["fc2"]
    llama = ll.wrap(ll.models.tiny_llama(), "bone", r=4, target_modules="all-linear")
    names = {l.adapters["default"].layer_name for l in llama.adapted_layers()}
    assert "lm_head" not in names and len(names) == 2 * 7


def test_default_targets_follow_peft_for_hf_models() -> None:
    m = ll.wrap(ll.models.tiny_llama(), "bone", r=4)
    names = {l.adapters["default"].layer_name.rsplit(".", 1)[-1] for l in m.adapted_layers()}
    assert names == {"q_proj", "v_proj"}


def test_print_trainable_parameters_uses_peft_wording(capsys) -> None:
    m = ll.wrap(MLP(), "bone", r=4, target_modules=["fc1"])
    m.print_trainable_parameters()
    total = sum(p.numel() for p in MLP().parameters()) + 4 * 32
    assert capsys.readouterr().out.strip() == (
        f"trainable params: 128 || all params: {total:,d} || trainable%: {100 * 128 / total:.4f}"
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_is_preserved(dtype: torch.dtype) -> None:
    model = MLP().to(dtype)
    m = ll.wrap(model, "lamda", r=4, target_modules=["fc1"])
    x = torch.randn(2, 16, dtype=dtype)
    assert m(x).dtype == dtype
    assert all(p.dtype == dtype for p in m.parameters())


def test_modules_to_save_are_per_adapter_copies_saved_and_merged(tmp_path) -> None:
    torch.manual_seed(0)
    model = MLP()
    head0 = model.head.weight.detach().clone()
    m = ll.wrap(model, "bone", r=4, target_modules=["fc1"], modules_to_save=["head"])
    assert isinstance(m.base_model.head, SavedModule)
    m.add_adapter("b", "bone", r=4, target_modules=["fc1"], modules_to_save=["head"])
    with torch.no_grad():
        m.base_model.head.copies["default"].weight.add_(1.0)
    x = torch.randn(3, 16)
    y_default = m(x)
    m.set_adapter("b")
    assert not torch.allclose(m(x), y_default)
    m.set_adapter("default")
    m.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "adapter_config.json").is_file()
    torch.manual_seed(0)
    reloaded = ll.load(MLP(), tmp_path)
    assert sorted(reloaded.configs) == ["b", "default"]
    torch.testing.assert_close(reloaded(x), y_default)
    plain = m.merge_and_unload()
    assert isinstance(plain.head, nn.Linear)
    torch.testing.assert_close(plain.head.weight, head0 + 1.0)


def test_several_adapters_compose_when_set_together() -> None:
    torch.manual_seed(0)
    model = MLP()
    m = ll.wrap(model, "bone", r=4, target_modules=["fc1"])
    m.add_adapter("scale", "ssf", target_modules=["fc1"])
    with torch.no_grad():
        next(m.adapted_layers()).adapters["default"].block.normal_()
    x = torch.randn(3, 16)
    m.set_adapter(["default", "scale"])
    layer = m.base_model.fc1
    a, s = layer.adapters["default"], layer.adapters["scale"]
    expected = (layer.base_layer(x) + a.forward(x, torch.zeros(3, 32), layer.base_layer)) * s.scale + s.shift
    torch.testing.assert_close(layer(x), expected)
    live = m(x)
    m.merge()
    torch.testing.assert_close(m(x), live, rtol=0, atol=1e-5)
    m.unmerge()
    with pytest.raises(RuntimeError, match="unmerge"):
        m.merge(); m.set_adapter("default")


def test_load_rejects_checkpoints_that_do_not_fit(tmp_path) -> None:
    m = ll.wrap(MLP(), "bone", r=4, target_modules=["fc1"])
    m.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="shape mismatch"):
        ll.load(MLP(hidden=40), tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["method"], meta["config"] = "ssf", {"target_modules": ["fc1"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not fit adapter"):
        ll.load(MLP(), tmp_path)
    model = MLP()
    with pytest.raises(FileNotFoundError, match="no saved adapter"):
        ll.load(model, tmp_path / "missing")
    assert not any(isinstance(x, AdaptedLayer) for x in model.modules())


def test_save_into_a_file_fails_and_failed_writes_leave_nothing(tmp_path, monkeypatch) -> None:
    m = ll.wrap(MLP(), "bone", r=4, target_modules=["fc1"])
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        m.save_pretrained(file)
    import lifelong.adapters.model as model_module

    def broken(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model_module, "save_file", broken)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        m.save_pretrained(out)
    assert list(out.iterdir()) == []


def test_delete_and_unload_restore_the_base() -> None:
    torch.manual_seed(0)
    model = MLP()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    m = ll.wrap(model, "lamda", r=4, target_modules=["fc1", "fc2"])  # SVD residual in the base
    m.add_adapter("two", "lamda", r=2, target_modules=["fc2"])
    m.delete_adapter("two")
    plain = m.unload()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=1e-5)


def snapshot(model: nn.Module) -> tuple[dict, dict, list]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [type(m).__name__ for m in model.modules()])


def assert_unchanged(model: nn.Module, before: tuple[dict, dict, list]) -> None:
    state, flags, types = snapshot(model)
    assert types == before[2] and flags == before[1] and state.keys() == before[0].keys()
    for k, v in state.items():
        assert torch.equal(v, before[0][k]), k


def test_merging_additive_then_weight_rewriting_composition_matches_the_forward() -> None:
    """[bone, welore]: the forward rewrites W (WeLore) and then adds bone's term, so the merge
    must apply WeLore first; merging bone first would be overwritten by WeLore's up·down."""
    torch.manual_seed(0)
    m = ll.wrap(MLP(), "bone", r=4, target_modules=["fc1", "fc2"])
    m.add_adapter("low", "welore", ratio=0.3, target_modules=["fc1", "fc2"])
    assert any(layer.adapters["low"].rewrites_weight for layer in m.adapted_layers())
    m.set_adapter(["default", "low"])
    with torch.no_grad():
        for layer in m.adapted_layers():
            layer.adapters["default"].block.normal_(0, 0.3)
    x = torch.randn(5, 16)
    live = m(x)
    weights = [layer.base_layer.weight.clone() for layer in m.adapted_layers()]
    m.merge()
    torch.testing.assert_close(m(x), live, rtol=0, atol=1e-5)
    m.unmerge()
    for layer, w in zip(m.adapted_layers(), weights):
        torch.testing.assert_close(layer.base_layer.weight, w, rtol=0, atol=1e-6)


def test_wrapping_an_already_wrapped_base_again_raises_and_changes_nothing(tmp_path) -> None:
    """Re-running ``m = ll.wrap(base, ...)`` in a notebook: the base holds CorDA's residual."""
    torch.manual_seed(0)
    base = MLP()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    calibration = [torch.randn(8, 16) for _ in range(2)]
    m = ll.wrap(base, "corda", r=4, target_modules=["fc1", "fc2"], calibration=calibration, progress=False)
    m.save_pretrained(tmp_path)
    before = snapshot(base)
    with pytest.raises(ValueError, match="already carries lifelong adapters"):
        ll.wrap(base, "bone", r=4, target_modules=["fc1"])
    with pytest.raises(ValueError, match="already carries lifelong adapters"):
        ll.load(base, tmp_path)
    assert_unchanged(base, before)
    m.delete_adapter("default")
    plain = m.unload()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=1e-5)


def test_failed_load_leaves_the_model_exactly_as_given(tmp_path) -> None:
    m = ll.wrap(MLP(), "bone", r=4, target_modules=["fc1"], modules_to_save=["head"])
    m.add_adapter("two", "ssf", target_modules=["fc2"])
    m.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "two" / "adapter_config.json").read_text())
    meta["config"]["target_modules"] = ["fc1", "fc2"]  # "two" no longer fits its tensors
    (tmp_path / "two" / "adapter_config.json").write_text(json.dumps(meta))
    fresh = MLP()
    fresh.head.weight.requires_grad_(False)  # the user's own flags come back too
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="does not fit"):
        ll.load(fresh, tmp_path)  # "default" loads first, then "two" fails
    assert_unchanged(fresh, before)
    adapted = ll.wrap(MLP(), "ssf", target_modules=["fc2"])
    with pytest.raises(ValueError, match="does not fit"):
        ll.load(adapted, tmp_path, adapter_name="two")
    assert list(adapted.configs) == ["default"] and len(list(adapted.adapted_layers())) == 1


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=16)).eval()


@pytest.mark.parametrize("method", ["bone", "corda", "kore", "lamda", "welore", "ssf"])
def test_gpt2_conv1d_layers_are_adapted_as_linears(method: str, tmp_path) -> None:
    """GPT-2 stores its projections as transformers' Conv1D (weight (in, out)): "all-linear" and
    PEFT's default "c_attn" reach them, and the merged model is a GPT-2 with Conv1D again."""
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    base = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    calibration = [{"input_ids": ids}]
    options = {"corda": {"r": 4, "calibration": calibration, "progress": False},
               "kore": {"r": 4, "calibration": calibration, "progress": False, "null_tol": 1.0},
               "lamda": {"r": 4, "total_steps": 4}, "bone": {"r": 4}, "welore": {"ratio": 0.3},
               "ssf": {"init": "identity"}}[method]
    targets = {} if method == "ssf" else {"target_modules": "all-linear"}
    m = ll.wrap(copy.deepcopy(base), method, **targets, **options)
    conv_layers = [layer for layer in m.adapted_layers() if isinstance(getattr(layer.base_layer, "conv", None), Conv1D)]
    assert len(conv_layers) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in each of 2 blocks
    if method != "welore":  # WeLore's adapted model is the compressed one
        torch.testing.assert_close(m(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    live = m(input_ids=ids).logits.detach()
    m.save_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(ll.load(copy.deepcopy(base), tmp_path / "adapter")(input_ids=ids).logits, live,
                               rtol=0, atol=0)
    plain = m.merge_and_unload()
    assert type(plain.transformer.h[0].attn.c_attn) is Conv1D
    plain.save_pretrained(tmp_path / "merged")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(again(input_ids=ids).logits, live, rtol=0, atol=1e-5)


def test_gpt2_default_targets_follow_peft() -> None:
    m = ll.wrap(tiny_gpt2(), "bone", r=4)
    assert sorted(layer.adapters["default"].layer_name for layer in m.adapted_layers()) == [
        "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_peft_compatible_names() -> None:
    """get_base_model, peft_config, merge_adapter / unmerge_adapter, layers_to_transform and
    alpha_pattern mean what they mean in PEFT."""
    model = ll.models.tiny_llama()
    m = ll.wrap(model, "bone", r=4, layers_to_transform=1)
    assert m.get_base_model() is model and m.peft_config is m.configs
    assert sorted(layer.adapters["default"].layer_name for layer in m.adapted_layers()) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.normal_(0, 0.1)
    ids = torch.randint(0, 128, (1, 5))
    live = m(input_ids=ids).logits
    m.merge_adapter()
    assert all(layer.merged == ["default"] for layer in m.adapted_layers())
    torch.testing.assert_close(m(input_ids=ids).logits, live, rtol=0, atol=1e-5)
    m.unmerge_adapter()
    assert not any(layer.merged for layer in m.adapted_layers())
    with pytest.raises(ValueError, match="layers_to_transform=\\[5\\] kept none"):
        ll.wrap(ll.models.tiny_llama(), "bone", r=4, layers_to_transform=[5])
    with pytest.raises(ValueError, match="layers_to_transform must be"):
        ll.wrap(ll.models.tiny_llama(), "bone", r=4, layers_to_transform="1")


@pytest.mark.parametrize("method", ["corda", "lamda"])
def test_alpha_pattern_sets_the_scale_per_layer_and_survives_save(method: str, tmp_path) -> None:
    model = ll.models.tiny_llama()
    extra = {"calibration": [{"input_ids": torch.randint(0, 128, (2, 7))}], "progress": False} \
        if method == "corda" else {"total_steps": 4}
    m = ll.wrap(model, method, r=4, lora_alpha=8.0, alpha_pattern={"v_proj": 2.0}, **extra)
    scales = {layer.adapters["default"].layer_name.rsplit(".", 1)[1]: layer.adapters["default"].scale
              for layer in m.adapted_layers()}
    assert scales == {"q_proj": 2.0, "v_proj": 0.5}
    m.save_pretrained(tmp_path)
    again = ll.load(ll.models.tiny_llama(), tmp_path)
    assert [layer.adapters["default"].scale for layer in again.adapted_layers()] == [
        layer.adapters["default"].scale for layer in m.adapted_layers()]
    with pytest.raises(ValueError, match="alpha_pattern must map"):
        ll.wrap(ll.models.tiny_llama(), method, r=4, alpha_pattern={"v_proj": -1.0}, **extra)


def test_adapter_and_kernel_modules_import_without_cycles() -> None:
    """No module of adapters/ or kernels/ imports (at top level or inside a function) a module
    that imports it back; the package __init__ files, which import their own modules, aside."""
    import ast
    from pathlib import Path

    root = Path(ll.__file__).parent
    graph: dict[str, set[str]] = {}
    for pkg in ("adapters", "kernels"):
        for path in sorted((root / pkg).glob("*.py")):
            if path.name == "__init__.py":
                continue
            deps = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                    deps.add(f"{pkg}.{node.module.split('.')[0]}")
            graph[f"{pkg}.{path.stem}"] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"
    assert "adapters.base" not in graph["adapters.targeting"]


@pytest.mark.parametrize("method", ll.available())
def test_validate_never_changes_a_config(method) -> None:
    """``validate`` only checks: calling it again leaves every field as it was, and accepted
    spellings (a tuple of names, one layer index, one pattern) are resolved once, when the config
    is made."""
    from lifelong.adapters.task_vectors import task_vector

    cls = ll.adapters.get_method(method).config_cls
    options = {"target_modules": ("fc1", "fc2"), "layers_to_transform": 1, "layers_pattern": "layers"}
    if method == "atlas":
        options["task_vectors"] = [task_vector(MLP(), MLP())]
    config = cls(**options)
    assert config.target_modules == ["fc1", "fc2"] and config.layers_to_transform == [1]
    assert config.layers_pattern == ["layers"]
    before = {k: v for k, v in vars(config).items() if k != "task_vectors"}
    config.validate()
    assert {k: v for k, v in vars(config).items() if k != "task_vectors"} == before
    config.layers_to_transform = 1  # the stored form is a list; validate does not convert
    with pytest.raises(ValueError, match="layers_to_transform must be"):
        config.validate()


@pytest.mark.parametrize(("method", "options", "message"), [
    ("bone", {"r": True}, "r must be a positive integer, got True"),
    ("bone", {"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ("lamda", {"pmb_freeze_fraction": 0.0}, r"pmb_freeze_fraction must be a number in \(0, 1\], got 0.0"),
    ("lamda", {"r_max": 0}, "r_max must be None or a positive integer, got 0"),
    ("corda", {"lora_alpha": float("nan")}, "lora_alpha must be a finite number > 0, got nan"),
    ("corda", {"damp_growth": 1.0}, "damp_growth must be > 1, got 1.0"),
    ("kore", {"null_tol": 0}, "null_tol must be a finite number > 0, got 0"),
    ("ssf", {"init_std": -1.0}, "init_std must be a finite number >= 0, got -1.0"),
    ("clr", {"reg_lambda": -0.5}, "reg_lambda must be a finite number >= 0, got -0.5"),
    ("welore", {"threshold": 1.5}, r"threshold \(tau\) must be None or a number in \[0, 1\], got 1.5"),
])
def test_config_checks_use_the_shared_wording(method, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        ll.adapters.get_method(method).config_cls(**options)


# ---- add_weighted_adapter ------------------------------------------------------------------------
def _two_loras(r_b: int = 2, **options) -> ll.AdaptedModel:
    """An MLP with two LoRA-shaped adapters ("a": LaMDA, "b": LaMDA or KORE...) moved off their init."""
    torch.manual_seed(0)
    m = ll.wrap(MLP(), "lamda", adapter_name="a", r=2, init="lora", pmb_schedule="none",
                target_modules=["fc1", "fc2"], lora_alpha=4)
    m.add_adapter("b", "lamda", r=r_b, init="lora", pmb_schedule="none", target_modules=["fc2"], lora_alpha=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in m.adapted_layers():
            for adapter in layer.adapters.values():
                for p in (adapter.lora_A, adapter.lora_S, adapter.lora_B):
                    p.copy_(torch.randn(p.shape, generator=g))
    return m


def _delta(m: ll.AdaptedModel, adapter_name: str, layer_name: str) -> torch.Tensor:
    layer = m.base_model.get_submodule(layer_name)
    return layer.adapters[adapter_name].delta_weight(layer.base_layer).float()


def test_add_weighted_adapter_cat_is_exact_and_saves(tmp_path) -> None:
    m = _two_loras(r_b=3)
    m.add_weighted_adapter(["a", "b"], [0.7, -1.3], "mix", combination_type="cat")
    assert m.active_adapters == ["a"] and m.configs["mix"].rank_pattern == {"fc1": 2, "fc2": 5}
    for name in ("fc1", "fc2"):
        want = 0.7 * _delta(m, "a", name) + (-1.3 * _delta(m, "b", name) if name == "fc2" else 0)
        torch.testing.assert_close(_delta(m, "mix", name), want, rtol=1e-5, atol=1e-5)
    # the forward of the new adapter is the base layer plus Σ w_i ΔW_i
    x = torch.randn(4, 16)
    m.set_adapter("mix")
    fc1 = m.base_model.fc1.base_layer
    torch.testing.assert_close(m.base_model.fc1(x), torch.nn.functional.linear(x, fc1.weight + 0.7 * _delta(m, "a", "fc1"),
                                                                             fc1.bias), rtol=1e-5, atol=1e-5)
    out = m(x)
    m.save_pretrained(tmp_path)
    back = ll.load(MLP_copy_of(m), tmp_path, adapter_name="mix")
    torch.testing.assert_close(back(x), out, rtol=0, atol=1e-6)


def MLP_copy_of(m: ll.AdaptedModel) -> nn.Module:
    """A fresh MLP with the same base weights as ``m``'s base model."""
    torch.manual_seed(0)
    fresh = MLP()
    with torch.no_grad():
        for name, module in fresh.named_children():
            original = m.base_model.get_submodule(name)
            original = getattr(original, "base_layer", original)
            module.load_state_dict(original.state_dict())
    return fresh


@pytest.mark.parametrize("combination_type", ["linear", "cat"])
def test_add_weighted_adapter_matches_peft(combination_type) -> None:
    """The same LoRA factors in a PEFT model: PEFT's add_weighted_adapter gives the same ΔW."""
    from peft import LoraConfig, get_peft_model

    m = _two_loras(r_b=2)
    m.add_weighted_adapter(["a", "b"], [0.6, -0.4], "mix", combination_type=combination_type)
    peft_model = get_peft_model(MLP_copy_of(m), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]), "a")
    peft_model.add_adapter("b", LoraConfig(r=2, lora_alpha=3, target_modules=["fc2"]))
    with torch.no_grad():
        for layer in m.adapted_layers():
            theirs = peft_model.base_model.model.get_submodule(layer.adapters["a"].layer_name)
            for name in ("a", "b"):
                if name in layer.adapters:
                    a, b, scale = layer.adapters[name].lora_factors()
                    assert theirs.scaling[name] == pytest.approx(scale)
                    theirs.lora_A[name].weight.copy_(a)
                    theirs.lora_B[name].weight.copy_(b)
    peft_model.add_weighted_adapter(["a", "b"], [0.6, -0.4], "mix", combination_type=combination_type)
    for name in ("fc1", "fc2"):
        theirs = peft_model.base_model.model.get_submodule(name).get_delta_weight("mix")
        torch.testing.assert_close(_delta(m, "mix", name), theirs.float(), rtol=1e-5, atol=1e-5)


def test_add_weighted_adapter_keeps_a_shared_residual_and_refuses_different_ones() -> None:
    torch.manual_seed(0)
    base = MLP()
    batches = [torch.randn(8, 16) for _ in range(3)]
    m = ll.wrap(copy.deepcopy(base), "corda", adapter_name="a", r=2, target_modules=["fc1"], calibration=batches)
    m.add_adapter("b", "corda", r=2, target_modules=["fc1"], calibration=batches)  # same init: same residual
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in m.adapted_layers():
            for adapter in layer.adapters.values():
                adapter.lora_B.add_(0.1 * torch.randn(adapter.lora_B.shape, generator=g))
    x = torch.randn(5, 16)
    m.set_adapter("b")
    only_b = m(x)
    m.add_weighted_adapter(["b"], [1.0], "copy_of_b")
    m.set_adapter("copy_of_b")
    torch.testing.assert_close(m(x), only_b, rtol=0, atol=1e-5)
    m.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mixed", combination_type="cat")
    m.set_adapter("mixed")
    layer = m.base_model.fc1
    with m.disable_adapter():
        original = layer(x)
    residual = layer.adapters["a"].residual_weight(torch.float32)
    want = original + torch.nn.functional.linear(x, 0.5 * _delta(m, "a", "fc1") + 0.5 * _delta(m, "b", "fc1") - residual)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5)
    # a residual adapter with a LoRA-init one (no residual) on the same layer: refused
    m.add_adapter("plain", "lamda", r=2, init="lora", pmb_schedule="none", target_modules=["fc1"])
    with pytest.raises(ValueError, match="left a residual base .* did not"):
        m.add_weighted_adapter(["a", "plain"], [1.0, 1.0], "bad", combination_type="cat")
    # two residual adapters from different initialisations: refused
    m.add_adapter("c", "corda", r=2, target_modules=["fc1"], calibration=[torch.randn(8, 16) * 3 for _ in range(3)])
    with pytest.raises(ValueError, match="different residual base"):
        m.add_weighted_adapter(["a", "c"], [1.0, 1.0], "bad", combination_type="cat")
    assert "bad" not in m.configs


def test_add_weighted_adapter_bad_input() -> None:
    m = _two_loras(r_b=3)
    m.add_adapter("bone", "bone", r=4, target_modules=["fc1"])
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        m.add_weighted_adapter(["a", "nope"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="equal rank.*'fc2'.*use combination_type='cat'"):
        m.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="linear")
    with pytest.raises(ValueError, match=r"LoRA-shaped adapters .*\{'bone': 'bone'\} are not"):
        m.add_weighted_adapter(["a", "bone"], [1.0, 1.0], "mix", combination_type="cat")
    with pytest.raises(ValueError, match="one weight per adapter"):
        m.add_weighted_adapter(["a", "b"], [1.0], "mix", combination_type="cat")
    with pytest.raises(ValueError, match="weights must be finite"):
        m.add_weighted_adapter(["a", "b"], [1.0, float("nan")], "mix", combination_type="cat")
    with pytest.raises(ValueError, match="combination_type must be one of"):
        m.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="svd")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        m.add_weighted_adapter(["a"], [1.0], "b")
    assert "mix" not in m.configs and sorted(m.configs) == ["a", "b", "bone"]


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_failed_load_after_a_corda_adapter_restores_the_base_weights_bit_for_bit(tmp_path, damage: str) -> None:
    """CorDA leaves W - up @ down in the base; adding the residual back is off by rounding, so a
    failed load must put the saved original back exactly."""
    torch.manual_seed(0)
    calibration = [torch.randn(8, 16) for _ in range(4)]
    m = ll.wrap(MLP(), "corda", r=4, target_modules=["fc1", "fc2"], calibration=calibration, progress=False)
    m.add_adapter("two", "bone", r=4, target_modules=["fc2"])
    m.save_pretrained(tmp_path)
    if damage == "config":  # the second adapter no longer fits its tensors
        meta = json.loads((tmp_path / "two" / "adapter_config.json").read_text())
        meta["config"]["target_modules"] = ["fc1", "fc2"]
        (tmp_path / "two" / "adapter_config.json").write_text(json.dumps(meta))
    else:
        (tmp_path / "two" / "adapter_model.safetensors").write_bytes(b"\0" * 40)
    fresh = MLP()
    before = snapshot(fresh)
    message = "does not fit" if damage == "config" else "two.adapter_model.safetensors' cannot be read"
    with pytest.raises(ValueError, match=message):
        ll.load(fresh, tmp_path)
    assert_unchanged(fresh, before)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe"])
def test_an_invalid_json_adapter_config_names_the_file(tmp_path, text: str) -> None:
    ll.wrap(MLP(), "bone", r=4, target_modules=["fc1"]).save_pretrained(tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_bytes(text.encode("latin-1"))
    model = MLP()
    with pytest.raises(ValueError, match="adapter config .*adapter_config.json' is not valid JSON") as err:
        ll.load(model, tmp_path)
    assert "save the adapter again" in str(err.value)
    assert not any(isinstance(x, AdaptedLayer) for x in model.modules())
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match="was not written by lifelong's save_pretrained"):
        ll.load(MLP(), tmp_path)
