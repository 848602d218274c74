"""PEFT export: CorDA, KORE and LaMDA checkpoints load in ``peft.PeftModel`` with the same outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import MODELS, run

from peft import PeftModel

import lifelong as ll
from lifelong.adapters.peft_export import RESIDUAL_FILE, export_peft, load_in_peft


def options(method: str, batches: list) -> dict:
    return {
        "corda": {"calibration": batches, "progress": False, "mode": "kpm", "lora_alpha": 3.0,
                  "rank_pattern": {"fc2": 2}},
        "kore": {"calibration": batches, "progress": False, "null_tol": 1.0},
        "lamda": {"total_steps": 10, "use_rslora": True},
    }[method]


@pytest.mark.parametrize("residual", ["base", "convert"])
@pytest.mark.parametrize("kind", ["mlp", "llama"])
@pytest.mark.parametrize("method", ["corda", "kore", "lamda"])
def test_exported_checkpoint_reproduces_outputs_in_peft(method: str, kind: str, residual: str, tmp_path) -> None:
    """``residual="base"``: rank r plus the residual base weights (load_in_peft applies them).
    ``residual="convert"`` (default, PEFT's PiSSA/CorDA conversion): a plain
    ``PeftModel.from_pretrained`` on a fresh base is exact."""
    spec = MODELS[kind]
    batches = spec.batches(2)
    probes = batches + spec.batches(2, seed=7)  # KORE leaves its calibration inputs unchanged by design
    reference = spec.make()
    adapted = ll.wrap(copy.deepcopy(reference), method, r=4, **options(method, batches))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained adapter, not the init
        for p in adapted.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        live = [run(adapted, b) for b in probes]
    if residual == "base":
        export_peft(adapted, tmp_path, residual="base")
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and (tmp_path / RESIDUAL_FILE).is_file()
        peft_model = load_in_peft(copy.deepcopy(reference), tmp_path)
    else:
        export_peft(adapted, tmp_path)
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and not (tmp_path / RESIDUAL_FILE).exists()
        peft_model = PeftModel.from_pretrained(copy.deepcopy(reference), str(tmp_path))
    with torch.no_grad():
        for ours, batch in zip(live, probes):
            torch.testing.assert_close(run(peft_model, batch), ours, rtol=0, atol=1e-5)
        changed = any(not torch.allclose(run(reference, b), o, atol=1e-4) for b, o in zip(probes, live))
    assert changed, "the exported adapter is not a no-op"


def test_export_rejects_other_methods_and_merged_adapters(tmp_path) -> None:
    spec = MODELS["mlp"]
    bone = ll.wrap(spec.make(), "bone", r=4)
    with pytest.raises(ValueError, match="supports adapters"):
        export_peft(bone, tmp_path)
    kore = ll.wrap(spec.make(), "kore", r=4, **options("kore", spec.batches(2)))
    kore.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        export_peft(kore, tmp_path)


def test_composed_adapters_are_not_silently_exported_as_the_first(tmp_path) -> None:
    spec = MODELS["mlp"]
    model = ll.wrap(spec.make(), "lamda", r=4, total_steps=10)
    model.add_adapter("kore", "kore", r=4, **options("kore", spec.batches(2)))
    model.set_adapter(["default", "kore"])
    with pytest.raises(ValueError, match="active together"):
        export_peft(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    export_peft(model, tmp_path, adapter_name="kore")  # one of them, named, is fine
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_converted_export_overwrites_a_stale_residual_file(tmp_path) -> None:
    spec = MODELS["mlp"]
    model = ll.wrap(spec.make(), "lamda", r=4, total_steps=10)
    export_peft(model, tmp_path, residual="base")
    export_peft(model, tmp_path)
    assert not (tmp_path / RESIDUAL_FILE).exists()
    with pytest.raises(ValueError, match="residual must be one of"):
        export_peft(model, tmp_path, residual="keep")


@pytest.mark.parametrize("method", ["corda", "lamda"])
def test_gpt2_conv1d_export_loads_in_plain_peft(method: str, tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16)).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    extra = {"corda": {"calibration": [{"input_ids": ids}], "progress": False}, "lamda": {"total_steps": 4}}[method]
    adapted = ll.wrap(copy.deepcopy(base), method, r=4, target_modules="all-linear", **extra)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        live = adapted(input_ids=ids).logits
    export_peft(adapted, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, live, rtol=0, atol=1e-5)
