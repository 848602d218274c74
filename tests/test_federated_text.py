"""Federated fine-tuning of the real MiniLM with adapters on real text (AG News, SST-2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import lifelong.federated as fl
from conftest import _MINILM, minilm
from lifelong.continual import cl_benchmark
from lifelong.continual.text import tokenize

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cl_benchmark"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs the shared cl_benchmark folder")


def tokenizer():
    minilm()
    return _MINILM["tokenizer"]


@pytest.fixture(scope="module")
def agnews():
    stream = cl_benchmark(DATA, tasks=["agnews"], n_train=4, n_test=3, seed=0)
    return fl.text_data(stream, tokenizer(), max_length=24)


@pytest.fixture(scope="module")
def two_tasks():
    stream = cl_benchmark(DATA, tasks=["agnews", "SST-2"], n_train=4, n_test=2, seed=0)
    return fl.text_data(stream, tokenizer(), max_length=24)


@pytest.fixture(scope="module")
def cached(agnews):
    """Hidden states entering MiniLM's last layer, for the fast tail models."""
    enc = minilm()
    return (fl.encode_prefix(enc, agnews.train.tensors[0], 5),
            fl.encode_prefix(enc, agnews.test.tensors[0], 5), enc)


class DictSet(Dataset):
    """Samples as dicts, the way a tokenized Hugging Face dataset hands them out."""

    def __init__(self, inputs: dict, labels: torch.Tensor):
        self.inputs, self.labels = inputs, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.inputs.items()}, "label": self.labels[i]}


def tail_model(enc, adapter="lora", num_classes=4, **options):
    torch.manual_seed(0)
    tail = fl.EncoderTail(enc, 5, num_classes)
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(tail, LoraConfig(r=4, target_modules=["query", "value"]))
        for p in model.base_model.model.head.parameters():
            p.requires_grad_(True)
        return model
    model = fl.federate_adapter(tail, adapter, target_modules=["query", "value"], **options)
    for p in model.base_model.head.parameters():
        p.requires_grad_(True)
    return model


def adapter_and_head_bytes(model) -> int:
    """Independent count: LoRA/registry adapter tensors plus the classification head."""
    total = 0
    for name, p in model.named_parameters():
        if ("lora_" in name or ".adapters." in name or name.split(".")[-2] == "head") and p.requires_grad:
            total += p.numel() * p.element_size()
    return total


def test_minilm_lora_federation_sends_only_adapter_and_head(agnews):
    model = fl.text_classifier(minilm(), agnews.num_classes, "lora", r=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = fl.trainable_params(model)
    per_upload = adapter_and_head_bytes(model)
    lora = 6 * 2 * 2 * (4 * 384) * 4        # 6 layers × (query, value) × (A, B) × r·384 floats
    assert per_upload == fl.adapter_bytes(model) == lora + (4 * 384 + 4) * 4
    res = fl.simulate(model, agnews.train, fl.AFACD(local_lr=0.5, server_lr=1.0, buffer_size=2),
                      num_workers=4, steps=2, test_data=agnews.test, partition=fl.IID(),
                      local_steps=fl.FixedSteps(1), batch_size=4, max_concurrent=2, eval_every=2,
                      record_arrivals=True, progress=False)
    assert res.steps == 2
    assert res.history[-1]["uplink_bytes"] == len(res.arrivals) * per_upload
    assert res.history[-1]["downlink_bytes"] == sum(res.jobs_started) * per_upload
    for name, value in model.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    moved = [n for n in start if not torch.equal(start[n], res.final_params[n])]
    assert any("lora_B" in n for n in moved) and any("head" in n for n in moved)


@pytest.mark.parametrize("adapter, options", [("bone", {"r": 4}), ("ssf", {})])
def test_registry_adapters_federate_on_the_cached_tail(agnews, cached, adapter, options):
    train_cache, test_cache, enc = cached
    model = tail_model(enc, adapter, **options)
    per_upload = adapter_and_head_bytes(model)
    assert per_upload == fl.adapter_bytes(model) > (4 * 384 + 4) * 4
    train = DictSet(train_cache, agnews.train.tensors[1])
    res = fl.simulate(model, train, fl.AFACS(local_lr=0.5, server_lr=1.0), num_workers=4, steps=3,
                      test_data=DictSet(test_cache, agnews.test.tensors[1]), local_steps=fl.FixedSteps(2),
                      batch_size=4, eval_every=3, record_arrivals=True, progress=False)
    assert res.steps == 3 and res.history[-1]["uplink_bytes"] == len(res.arrivals) * per_upload


def test_cached_tail_equals_the_full_model_with_the_same_adapter(agnews):
    from peft import LoraConfig, get_peft_model

    from lifelong.continual.text_model import TextClassifier

    enc = minilm()
    x = agnews.test.tensors[0]
    cache = fl.encode_prefix(enc, x, 5)
    config = dict(r=4, target_modules=r".*layer\.0\.attention\.self\.(query|value)")
    tail = get_peft_model(fl.EncoderTail(enc, 5, 4), LoraConfig(**config))
    full = TextClassifier(get_peft_model(enc, LoraConfig(r=4, target_modules=r".*layer\.5\.attention\.self\.(query|value)")), 4)
    torch.manual_seed(1)
    tail_lora = {n: p for n, p in tail.named_parameters() if "lora_" in n}
    full_lora = {n: p for n, p in full.named_parameters() if "lora_" in n}
    assert len(tail_lora) == len(full_lora) == 4
    with torch.no_grad():
        for (_, a), (_, b) in zip(sorted(tail_lora.items()), sorted(full_lora.items())):
            a.normal_()
            b.copy_(a)
        full.head.load_state_dict(tail.base_model.model.head.state_dict())
    full.eval(), tail.eval()
    with torch.no_grad():
        want, got = full(x), tail(**cache)
    assert want.abs().max() > 0.1   # the random LoRA makes a difference the tail must reproduce
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_hugging_face_dict_samples_train_like_a_hand_written_loop(agnews, cached):
    """Variable-length tokenized dicts (as a HF dataset yields them) against a manual SGD loop."""
    from transformers import AutoModelForSequenceClassification

    from lifelong.models import minilm_path

    texts = [t for t in cl_benchmark(DATA, tasks=["agnews"], n_train=4, n_test=3, seed=0).tasks[0].train_texts]
    ids = tokenize(tokenizer(), texts, 64)
    assert len({len(s) for s in ids}) > 1
    items = [{"input_ids": torch.tensor(s), "label": int(y)} for s, y in zip(ids, agnews.train.tensors[1])]
    inputs, labels = fl.dataset_tensors(items)
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["attention_mask"].sum(1).tolist() == [len(s) for s in ids]

    def build():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=4)
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"],
                                                modules_to_save=["classifier"]))
    model = build()
    trainer = fl.LocalTrainer(model, inputs, labels, batch_size=4)
    base = fl.trainable_params(model)
    idx = np.arange(0, 16, 2)
    g, _ = trainer.run(base, idx, 2, 0.5, seed=3)
    # reference: the same two SGD steps written out by hand on a fresh copy
    ref = build()
    params = [p for _, p in ref.named_parameters() if p.requires_grad]
    rng = np.random.default_rng(3)
    ref.train()
    torch.manual_seed(3)
    for _ in range(2):
        batch = idx[rng.permutation(len(idx))[:4]]
        width = int(inputs["attention_mask"][batch].sum(1).max())
        out = ref(input_ids=inputs["input_ids"][batch, :width], attention_mask=inputs["attention_mask"][batch, :width])
        loss = torch.nn.functional.cross_entropy(out.logits, labels[batch])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p.sub_(0.5 * gr)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    for n, p in zip(names, params):
        torch.testing.assert_close(g[n], (base[n] - p.detach()) / (0.5 * 2), atol=1e-5, rtol=1e-4)


def test_label_dirichlet_and_task_partitions_of_a_text_stream(two_tasks):
    labels = two_tasks.train.tensors[1].numpy()
    for over in ("classes", "workers"):
        parts = fl.Dirichlet(0.5, min_size=1, over=over).split(labels, 4, 0)
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    part = two_tasks.by_task()
    parts = part.split(labels, 5, 0)
    tasks = part.worker_tasks(5)
    assert tasks == [0, 0, 0, 1, 1]
    for w, p in enumerate(parts):
        assert len(p) and set(two_tasks.train_tasks[p]) == {tasks[w]}
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    assert [p.tolist() for p in part.split(labels, 5, 0)] == [p.tolist() for p in parts]
    with pytest.raises(ValueError, match="cannot hold 2 tasks"):
        part.split(labels, 1, 0)


def test_federated_continual_run_reports_accuracy_per_task(two_tasks):
    enc = minilm()
    tr = fl.encode_prefix(enc, two_tasks.train.tensors[0], 5)
    te = fl.encode_prefix(enc, two_tasks.test.tensors[0], 5)
    model = tail_model(enc, "lora", num_classes=two_tasks.num_classes)
    kwargs = dict(num_workers=4, steps=4, test_data=DictSet(te, two_tasks.test.tensors[1]),
                  partition=two_tasks.by_task(), local_steps=fl.UniformSteps(1, 2), batch_size=4,
                  eval_every=2, eval_groups=two_tasks.test_tasks, progress=False)
    a = fl.simulate(model, DictSet(tr, two_tasks.train.tensors[1]), fl.AFACD(local_lr=0.5, buffer_size=2), **kwargs)
    b = fl.simulate(tail_model(enc, "lora", num_classes=two_tasks.num_classes),
                    DictSet(tr, two_tasks.train.tensors[1]), fl.AFACD(local_lr=0.5, buffer_size=2), **kwargs)
    last = a.history[-1]
    assert set(last["group_accuracy"]) == {"0", "1"}
    hits = np.array([last["group_accuracy"]["0"] * 8, last["group_accuracy"]["1"] * 4])   # 8 + 4 test samples
    assert abs(hits.sum() / 12 - last["accuracy"]) < 1e-6
    assert all(set(h) <= set(range(4)) for h in a.label_histograms[:2])        # agnews workers
    assert all(set(h) <= set(range(4, 6)) for h in a.label_histograms[2:])     # SST-2 workers
    for n in a.final_params:   # deterministic under a seed
        assert torch.equal(a.final_params[n], b.final_params[n])


def test_faulty_workers_on_the_text_path_are_rejected_and_counted(agnews, cached):
    train_cache, test_cache, enc = cached
    faults = fl.Faults(0.3, kinds=("crash", "nan", "inf"))
    res = fl.simulate(tail_model(enc), DictSet(train_cache, agnews.train.tensors[1]),
                      fl.AFACD(local_lr=0.5, buffer_size=2), num_workers=10, steps=6,
                      test_data=DictSet(test_cache, agnews.test.tensors[1]), local_steps=fl.FixedSteps(1),
                      batch_size=2, faults=faults, eval_every=3, record_arrivals=True, progress=False)
    assert res.steps == 6 and not res.stopped_early
    kinds = faults.kind_of
    assert len(kinds) == 3 and set(kinds.values()) == {"crash", "nan", "inf"}
    poisoned = [a for a in res.arrivals if kinds.get(a["worker"]) in ("nan", "inf")]
    assert poisoned and all(a["status"] == "rejected" for a in poisoned)
    assert res.rejected == {"nonfinite": len(poisoned)}
    assert res.history[-1]["rejected"] == len(poisoned)
    crashed = [a for a in res.arrivals if a["status"] == "crashed"]
    assert crashed and {a["worker"] for a in crashed} <= {w for w, k in kinds.items() if k == "crash"}
    # a crash is counted when the job dies; its (missing) arrival is logged when it was due
    assert len(crashed) <= res.crashed <= len(crashed) + 3
    assert all(bool(torch.isfinite(t).all()) for t in res.final_params.values())
    healthy = [a for a in res.arrivals if a["worker"] not in kinds]
    assert all(a["status"] in ("accepted", "dropped_stale") for a in healthy)


def test_bad_input_fails_before_the_first_step(agnews, cached):
    train_cache, test_cache, enc = cached
    train = DictSet(train_cache, agnews.train.tensors[1])
    run = dict(num_workers=4, steps=1, local_steps=fl.FixedSteps(1), batch_size=2, progress=False)

    class Leaky(fl.Partitioner):
        def split(self, labels, num_workers, seed):
            parts = fl.IID().split(labels, num_workers, seed)
            parts[2] = parts[2][:0]
            return parts

        def describe(self):
            return {"kind": "Leaky"}

    calls = []
    model = tail_model(enc)
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"leaves worker\(s\) 2 of 4 with no data"):
        fl.simulate(model, train, fl.AFACD(buffer_size=1), partition=Leaky(), **run)
    assert not calls   # nothing ran
    small_head = tail_model(enc, num_classes=3)
    with pytest.raises(ValueError, match=r"head does not fit the label space.*\(2, 3\).*4 classes"):
        fl.simulate(small_head, train, fl.AFACD(buffer_size=1), **run)
    frozen = tail_model(enc)
    for name, p in frozen.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    with pytest.raises(ValueError, match="none of their tensors is trainable"):
        fl.simulate(frozen, train, fl.AFACD(buffer_size=1), **run)
    with pytest.raises(TypeError, match="without logits"):   # a bare encoder has no head
        fl.simulate(fl.text_classifier(minilm(), 4, "lora").backbone, TensorDataset(
            agnews.train.tensors[0][:, 0], agnews.train.tensors[1]), fl.AFACD(buffer_size=1), **run)


def test_mifa_cohort_size_caps_the_uploads_of_a_round():
    from sklearn.datasets import load_digits

    d = load_digits()
    train = TensorDataset(torch.tensor(d.data[:400] / 16.0, dtype=torch.float32), torch.tensor(d.target[:400]))
    torch.manual_seed(0)
    res = fl.simulate(torch.nn.Linear(64, 10), train, fl.MIFA(local_lr=0.1, min_fraction=0.0, cohort_size=3),
                      num_workers=20, steps=5, local_steps=fl.FixedSteps(1), eval_every=5, progress=False)
    assert res.steps == 5 and res.history[-1]["updates_received"] == 15   # 3 of the 20 available per round
    assert fl.MIFA().config() == {k: v for k, v in fl.MIFA(cohort_size=None).config().items()}
    assert fl.MIFA(cohort_size=3).config()["cohort_size"] == 3
    with pytest.raises(ValueError, match="cohort_size"):
        fl.MIFA(cohort_size=0)


def test_label_correlated_participation_by_min_or_dominant_label():
    labels = np.array([0, 1, 1, 1, 3, 3, 2, 2])
    parts = [np.array([0, 1, 2, 3]), np.array([4, 5, 6]), np.array([7])]
    np.testing.assert_allclose(fl.label_correlated(labels, parts, beta=0.9), [0.1, 0.1 + 0.9 * 2 / 3, 0.1 + 0.9 * 2 / 3])
    np.testing.assert_allclose(fl.label_correlated(labels, parts, beta=0.9, by="dominant"),
                               [0.1 + 0.9 / 3, 1.0, 0.1 + 0.9 * 2 / 3])
    with pytest.raises(ValueError, match="by must be"):
        fl.label_correlated(labels, parts, by="max")


def test_text_federation_resumes_bit_identically_from_a_checkpoint(agnews, cached, tmp_path):
    train_cache, test_cache, enc = cached
    train, test = DictSet(train_cache, agnews.train.tensors[1]), DictSet(test_cache, agnews.test.tensors[1])
    kwargs = dict(num_workers=4, test_data=test, local_steps=fl.UniformSteps(1, 2), batch_size=2, eval_every=2,
                  eval_groups="labels", progress=False)
    full = fl.simulate(tail_model(enc), train, fl.AFACS(local_lr=0.5, min_new=2), steps=4, **kwargs)
    ckpt = tmp_path / "fed.pt"
    fl.simulate(tail_model(enc), train, fl.AFACS(local_lr=0.5, min_new=2), steps=2, checkpoint=ckpt, **kwargs)
    resumed = fl.simulate(tail_model(enc), train, fl.AFACS(local_lr=0.5, min_new=2), steps=4, checkpoint=ckpt,
                          **kwargs)
    assert [h["accuracy"] for h in resumed.history] == [h["accuracy"] for h in full.history]
    assert set(full.history[-1]["group_accuracy"]) == {"0", "1", "2", "3"}
    for n in full.final_params:
        assert torch.equal(full.final_params[n], resumed.final_params[n])
    with pytest.raises(ValueError, match="one integer group id per test sample"):
        fl.simulate(tail_model(enc), train, fl.AFACS(), steps=1, **{**kwargs, "eval_groups": [0, 1]})


def test_tail_and_prefix_reject_models_and_layers_they_cannot_split(agnews):
    enc = minilm()
    with pytest.raises(ValueError, match=r"layer index in 0\.\.5, got 6"):
        fl.EncoderTail(enc, 6, 4)
    with pytest.raises(ValueError, match=r"layer index in 0\.\.5, got -1"):
        fl.encode_prefix(enc, agnews.test.tensors[0], -1)
    with pytest.raises(TypeError, match="BERT-family encoder"):
        fl.EncoderTail(torch.nn.Linear(4, 4), 0, 4)
    tail = fl.EncoderTail(enc, 4, 4)
    assert len(tail.layer) == 2 and tail.layer[0] is not enc.encoder.layer[4]   # a copy, not shared
    assert [n for n, p in tail.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
