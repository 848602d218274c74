"""Every adapter on a Hugging Face model, trained with the Hugging Face ``Trainer``.

MiniLM with a 5-way classification head learns which standard-library module a docstring comes
from; the head is trained in full (``modules_to_save``), the encoder only through the adapter.
``AdapterTrainer`` runs with default ``TrainingArguments`` (but the length and learning rate),
reports ``eval_loss``, saves the adapter only (reloaded with ``ll.load``) and drives LaMDA's PMB
freezing through ``AdapterScheduleCallback``.

    python examples/hf_trainer_adapters.py [--steps 20] [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, TrainingArguments
from transformers.utils import logging as hf_logging

import lifelong as ll
from lifelong.adapters import get_method
from lifelong.adapters.callbacks import AdapterTrainer

from quickstart import MODULES, docstring_dataset  # noqa: E402  (same folder)


class Encoded(torch.utils.data.Dataset):
    def __init__(self, encodings: dict, labels: torch.Tensor):
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


def fresh_model() -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(ll.models.minilm_path(), num_labels=len(MODULES))


def train(method: str, data: Encoded, steps: int) -> tuple[int, float, float, float]:
    """Train, evaluate, save and reload one adapter: (trainable, train loss, eval loss, reload diff)."""
    model = fresh_model()
    spec = get_method(method)
    sample = [{k: v[:8] for k, v in data.encodings.items()}]
    options = {"modules_to_save": ["classifier"], **spec.adapter_cls.example_options(model, sample)}
    if method != "ssf" and "target_modules" not in options:
        options["target_modules"] = ["query", "value"]
    if method == "lamda":
        options["total_steps"] = steps
    adapted = ll.wrap(model, method, **options)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=steps, learning_rate=2e-3, disable_tqdm=True, seed=0)
        eval_data = torch.utils.data.Subset(data, range(16))
        trainer = AdapterTrainer(model=adapted, args=args, train_dataset=data, eval_dataset=eval_data)
        result = trainer.train()
        eval_loss = trainer.evaluate()["eval_loss"]
        trainer.save_model(out + "/final")
        reloaded = ll.load(fresh_model(), out + "/final").to(adapted.device)
    batch = {k: v[:8].to(adapted.device) for k, v in data.encodings.items()}
    with torch.no_grad():
        diff = float((reloaded.eval()(**batch).logits - adapted.eval()(**batch).logits).abs().max())
    return adapted.get_nb_trainable_parameters()[0], result.training_loss, eval_loss, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="one step per adapter, for tests")
    args = parser.parse_args()
    steps = 1 if args.smoke else args.steps
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    texts, labels = docstring_dataset(0)
    _, tokenizer = ll.models.load_minilm()
    data = Encoded(dict(tokenizer(texts, padding="max_length", truncation=True, max_length=48, return_tensors="pt")),
                   labels)
    encoder_layers = list(ll.models.load_minilm()[0].modules())
    print(f"{'adapter':<8} {'trainable':>10} {'train loss':>11} {'eval loss':>10} {'reload diff':>12}")
    for method in ll.available():
        if not any(isinstance(m, get_method(method).adapter_cls.layer_types) for m in encoder_layers):
            continue  # e.g. clr adapts Conv2d only
        trainable, loss, eval_loss, diff = train(method, data, steps)
        print(f"{method:<8} {trainable:>10,d} {loss:>11.3f} {eval_loss:>10.3f} {diff:>12.1e}")


if __name__ == "__main__":
    main()
