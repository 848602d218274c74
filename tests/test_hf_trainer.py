"""Adapted models with the Hugging Face ``Trainer``: default arguments, eval loss, adapter-only
saving, resuming, bf16, and the README's Trainer example run as written."""

from __future__ import annotations

import copy
import inspect
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import minilm, minilm_batches
from torch import nn
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import lifelong as ll
from lifelong.adapters import get_method
from lifelong.adapters.callbacks import AdapterTrainer
from lifelong.adapters.routing import TaskRoutedModel

README = Path(__file__).resolve().parents[1] / "README.md"
hf_logging.set_verbosity_error()


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(ll.models.minilm_path(), num_labels=2)


def dataset(n: int = 16) -> list[dict]:
    minilm()
    from conftest import _MINILM

    texts = ["a good film", "a bad film", "great acting", "awful plot"] * (n // 4)
    enc = _MINILM["tokenizer"](texts, padding="max_length", max_length=12, truncation=True)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": i % 2}
            for i in range(n)]


def logits(model: nn.Module, data: list[dict]) -> torch.Tensor:
    batch = {k: torch.tensor([d[k] for d in data]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def wrapped(method: str = "bone", **extra) -> nn.Module:
    options = {"r": 4, "target_modules": ["query", "value"], "modules_to_save": ["classifier"], **extra}
    return ll.wrap(classifier(), method, **options)


def test_forward_signature_is_the_base_models() -> None:
    model = wrapped()
    base = inspect.signature(type(model.base_model).forward)
    assert inspect.signature(type(model).forward) == base
    assert "labels" in inspect.signature(model.forward).parameters
    routed = TaskRoutedModel(nn.Sequential(nn.Linear(4, 4)), "bone", r=2)
    assert list(inspect.signature(routed.forward).parameters) == ["input", "task_id"]


def test_signature_class_survives_deepcopy_and_pickle() -> None:
    model = ll.wrap(nn.Sequential(nn.Linear(4, 4)), "bone", r=2, target_modules=["0"])
    x = torch.randn(2, 4)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone) is type(model) and isinstance(clone, ll.adapters.AdaptedModel)
        assert torch.equal(clone(x), model(x))


def test_plain_trainer_with_default_arguments_trains_and_reports_eval_loss(tmp_path) -> None:
    model = wrapped()
    data = dataset()
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), max_steps=2), train_dataset=data,
                      eval_dataset=data[:4])
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0


def test_load_of_a_full_state_dict_folder_says_what_to_use(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="AdapterTrainer"):
        ll.load(classifier(), tmp_path)


def test_adapter_trainer_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path) -> None:
    data = dataset()
    model = wrapped("lamda", total_steps=4)  # LaMDA: B leaves the optimizer mid-run
    args = TrainingArguments(str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, save_steps=2)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])
    trainer.train()
    assert "eval_loss" in trainer.evaluate()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "final"):
        assert (folder / "adapter_model.safetensors").stat().st_size < 2_000_000
        assert not (folder / "model.safetensors").exists()
    reloaded = ll.load(classifier(), tmp_path / "final")
    assert torch.equal(logits(reloaded, data[:4]), logits(model, data[:4]))

    resumed = wrapped("lamda", total_steps=4)
    args = TrainingArguments(str(tmp_path / "again"), max_steps=4, per_device_train_batch_size=4, save_strategy="no")
    AdapterTrainer(model=resumed, args=args, train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert torch.allclose(logits(resumed, data[:4]), logits(model, data[:4]), atol=1e-6)


@pytest.mark.parametrize("method", ["bone", "corda", "kore", "lamda", "ssf"])
def test_trainer_bf16_runs_every_adapter(method: str, tmp_path) -> None:
    base = classifier()
    extra = dict(get_method(method).adapter_cls.example_options(base, minilm_batches(1)))
    if method == "kore":
        extra["null_tol"] = 1.0
    if method == "lamda":
        extra["total_steps"] = 2
    options = {"modules_to_save": ["classifier"], **extra}
    if method != "ssf":
        options.update(r=4, target_modules=["query", "value"])
    model = ll.wrap(base, method, **options)
    before = {n: p.detach().clone() for n, p in model.named_trainable_parameters()}
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, bf16=True, use_cpu=not torch.cuda.is_available(),
                             save_strategy="no", learning_rate=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = AdapterTrainer(model=model, args=args, train_dataset=dataset(8)).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    moved = [n for n, p in model.named_trainable_parameters() if not torch.equal(p, before[n])]
    assert moved and all(p.dtype == torch.float32 for p in model.parameters())


def readme_trainer_example() -> str:
    text = README.read_text()
    section = text[text.index("### With the Hugging Face Trainer"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_trainer_example_runs_with_default_arguments(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = dataset()
    code = readme_trainer_example()
    assert "TrainingArguments(\"out\", max_steps=20)" in code  # default arguments but the length
    code = code.replace("max_steps=20", "max_steps=3")
    scope = {"ll": ll, "train": data, "test": data[:4]}
    exec(compile(code, str(README), "exec"), scope)
    assert sorted(p.name for p in (tmp_path / "out" / "final").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "training_args.bin"]
    assert torch.equal(logits(scope["model"], data[:4]), logits(scope["trainer"].model, data[:4]))


def test_schedule_callback_takes_lamdas_total_steps_from_the_trainer(tmp_path) -> None:
    with pytest.warns(UserWarning, match="needs total_steps"):
        model = wrapped("lamda")
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, save_strategy="no")
    AdapterTrainer(model=model, args=args, train_dataset=dataset(8)).train()
    assert model.configs["default"].total_steps == 3
    assert all(bool(layer.adapters["default"].frozen_columns.all()) for layer in model.adapted_layers())
