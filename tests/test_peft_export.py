"""PEFT export: CorDA, KORE and LaMDA checkpoints load in ``peft.PeftModel`` with the same outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import MODELS, run

import lifelong as ll
from lifelong.adapters.peft_export import RESIDUAL_FILE, export_peft, load_in_peft


def options(method: str, batches: list) -> dict:
    return {
        "corda": {"calibration": batches, "progress": False, "mode": "kpm", "lora_alpha": 3.0,
                  "rank_pattern": {"fc2": 2}},
        "kore": {"calibration": batches, "progress": False, "null_tol": 1.0},
        "lamda": {"total_steps": 10, "use_rslora": True},
    }[method]


@pytest.mark.parametrize("kind", ["mlp", "llama"])
@pytest.mark.parametrize("method", ["corda", "kore", "lamda"])
def test_exported_checkpoint_reproduces_outputs_in_peft(method: str, kind: str, tmp_path) -> None:
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
    export_peft(adapted, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (tmp_path / RESIDUAL_FILE).is_file()
    peft_model = load_in_peft(copy.deepcopy(reference), tmp_path)
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
