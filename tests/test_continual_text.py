"""Text streams and continual fine-tuning of Hugging Face models (real MiniLM, tiny random Llama)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lifelong.continual as lc
from conftest import _MINILM, minilm
from lifelong.continual.text import pack, tokenize
from lifelong.continual.text_model import TextClassifier, VerbalizerLoss, unpack_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl_benchmark"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared CL benchmark folder {SHARED} is absent")


def tokenizer():
    minilm()
    return _MINILM["tokenizer"]


def write_task(root: Path, group: str, name: str, labels: list[str], train: list, test: list | None = None) -> None:
    folder = root / group / name
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    (folder / "train.json").write_text(json.dumps(train))
    if test is not None:
        (folder / "test.json").write_text(json.dumps(test))


def items(labels: list[str], per_label: int, prefix: str) -> list[dict]:
    return [{"sentence": f"{prefix} {label} number {i}", "label": label} for label in labels for i in range(per_label)]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_task(tmp_path, "TC", "topics", ["World", "Sports"], items(["World", "Sports"], 6, "news"),
               items(["World", "Sports"], 3, "test news"))
    write_task(tmp_path, "SC", "mood", ["Good", "Bad"], items(["Good", "Bad"], 10, "review"))  # no test.json
    return tmp_path


def tiny_stream(task_incremental: bool = True) -> lc.TextStream:
    pos = ["a wonderful film", "great acting and a fine story", "I loved every minute", "superb and moving"]
    neg = ["a dull film", "terrible acting and a weak story", "I hated every minute", "boring and empty"]
    sport = ["the team won the cup final", "a late goal decided the match", "the striker scored twice"]
    world = ["the minister met leaders abroad", "elections were held in the capital", "the summit ended in talks"]
    return lc.text_stream([
        (pos + neg, ["Good"] * 4 + ["Bad"] * 4, pos[:2] + neg[:2], ["Good"] * 2 + ["Bad"] * 2),
        (sport + world, ["Sports"] * 3 + ["World"] * 3, sport[:2] + world[:2], ["Sports"] * 2 + ["World"] * 2),
    ], names=["sentiment", "topic"], task_incremental=task_incremental)


# ---- streams -----------------------------------------------------------------------------------

def test_cl_benchmark_maps_labels_into_one_class_space_and_splits_a_task_without_test_file(folder):
    stream = lc.cl_benchmark(folder, tasks=["topics", "mood"], seed=0)
    assert stream.names == ["topics", "mood"]
    assert stream.class_names == ["World", "Sports", "Good", "Bad"]
    assert [t.classes for t in stream.tasks] == [[0, 1], [2, 3]]
    assert stream.tasks[0].train_labels.count(0) == 6 and len(stream.tasks[0].test_texts) == 6
    mood = stream.tasks[1]
    assert len(mood.test_texts) == 4 and len(mood.train_texts) == 16  # 20% of each label held out
    assert sorted(mood.test_labels) == [2, 2, 3, 3]
    assert not set(mood.test_texts) & set(mood.train_texts)
    again = lc.cl_benchmark(folder, tasks=["topics", "mood"], seed=0)
    other = lc.cl_benchmark(folder, tasks=["topics", "mood"], seed=1)
    assert again.fingerprint() == stream.fingerprint() and other.fingerprint() != stream.fingerprint()
    assert set(other.tasks[1].test_texts) != set(mood.test_texts)


def test_cl_benchmark_counts_per_class_and_shared_labels(folder):
    stream = lc.cl_benchmark(folder, tasks=["topics", "mood"], n_train=2, n_test=1, seed=0, share_labels=True)
    assert [len(t.train_texts) for t in stream.tasks] == [4, 4]
    assert [len(t.test_texts) for t in stream.tasks] == [2, 2]
    write_task(folder, "X", "mood2", ["Good", "Bad"], items(["Good", "Bad"], 3, "more"), items(["Bad"], 1, "t"))
    shared = lc.cl_benchmark(folder, tasks=["mood", "mood2"], share_labels=True, task_incremental=False)
    assert shared.class_names == ["Good", "Bad"] and shared.scenario == "domain-incremental"
    split = lc.cl_benchmark(folder, tasks=["mood", "mood2"], task_incremental=False)
    assert split.class_names == ["Good", "Bad", "Good", "Bad"] and split.scenario == "class-incremental"


@pytest.mark.parametrize("break_it, message", [
    (lambda f: None, r"task\(s\) \['nope'\] not found .* tasks found: mood, topics"),
    (lambda f: (f / "SC/mood/train.json").write_text("[]"), r"mood/train.json: expected a non-empty list"),
    (lambda f: (f / "SC/mood/train.json").write_text('[{"sentence": "x", "label": "Good"}, {"text": "y"}]'),
     r"mood/train.json: item 1 must be a mapping"),
    (lambda f: (f / "SC/mood/train.json").write_text('[{"sentence": "x", "label": "Meh"}]'),
     r"mood/train.json: item 0 has label 'Meh', which is not in labels.json"),
    (lambda f: (f / "SC/mood/train.json").write_text("{not json"), r"mood/train.json: not valid JSON"),
])
def test_cl_benchmark_bad_folders_are_reported_with_the_file_and_item(folder, break_it, message):
    break_it(folder)
    tasks = ["topics", "nope"] if "nope" in message else ["topics", "mood"]
    with pytest.raises(ValueError, match=message):
        lc.cl_benchmark(folder, tasks=tasks)


def test_cl_benchmark_rejects_bad_arguments(folder):
    with pytest.raises(ValueError, match="unknown preset 'order9'"):
        lc.cl_benchmark(folder, tasks="order9")
    with pytest.raises(ValueError, match="n_train \\(items per class\\) must be None or a positive integer"):
        lc.cl_benchmark(folder, tasks=["mood"], n_train=0)
    with pytest.raises(ValueError, match="appears twice"):
        lc.cl_benchmark(folder, tasks=["mood", "mood"])


@needs_shared
def test_shared_benchmark_text4_preset():
    stream = lc.cl_benchmark(SHARED, tasks="text4", n_train=5, n_test=3, seed=0)
    assert stream.names == ["agnews", "amazon", "SST-2", "IMDB"]
    assert len(stream.class_names) == 4 + 5 + 2 + 2
    assert [len(t.train_texts) for t in stream.tasks] == [20, 25, 10, 10]
    assert [len(t.test_texts) for t in stream.tasks] == [12, 15, 6, 6]
    assert stream.tasks[3].classes == [11, 12] and stream.class_names[11:] == ["Good", "Bad"]
    with pytest.raises(ValueError, match="not found .* tasks found: .*BoolQA"):
        lc.cl_benchmark(SHARED, tasks="order1")


def test_text_stream_from_memory_and_from_dataset_objects():
    class FakeLabel:
        names = ["neg", "pos"]

    class FakeDataset:  # the parts of datasets.Dataset that text_stream reads
        def __init__(self, texts, labels):
            self.data = {"text": texts, "label": labels}
            self.column_names = ["text", "label"]
            self.features = {"label": FakeLabel()}

        def __getitem__(self, column):
            return self.data[column]

    stream = lc.text_stream([
        (["a", "b", "c"], ["x", "y", "x"], ["d"], ["y"]),
        {"name": "hf", "train": FakeDataset(["e", "f"], [1, 0]), "test": FakeDataset(["g"], [1])},
    ])
    assert stream.names == ["task0", "hf"] and stream.class_names == ["x", "y", "neg", "pos"]
    assert stream.tasks[1].train_labels == [3, 2] and stream.tasks[1].test_labels == [3]
    with pytest.raises(ValueError, match=r"labels \['z'\] are not among its label texts"):
        lc.text_stream([(["a"], ["z"], ["b"], ["x"], ["x", "y"])])
    with pytest.raises(TypeError, match="expected \\(train_texts"):
        lc.text_stream(["not a task"])


def test_to_benchmark_packs_ids_and_masks_like_the_tokenizer():
    tok = tokenizer()
    stream = tiny_stream()
    bm = stream.to_benchmark(tok, max_length=6)
    x, y, t = bm.train_stream[1].dataset[0]
    expected = tok(stream.tasks[1].train_texts[0], truncation=True, max_length=6)["input_ids"]
    assert x.shape == (2, 6) and x[0, : len(expected)].tolist() == expected
    assert x[1].tolist() == [1] * len(expected) + [0] * (6 - len(expected))
    assert int(y) == stream.tasks[1].train_labels[0] and int(t) == 1
    assert bm.lifelong_text["tokenizer"]["vocab_size"] == len(tok)
    with pytest.raises(ValueError, match="max_length .* must be a positive integer"):
        stream.to_benchmark(tok, max_length=0)
    with pytest.raises(ValueError, match="template must be a str containing"):
        stream.to_benchmark(tok, template="no placeholder")


# ---- the classifier routes ---------------------------------------------------------------------

def test_head_route_pools_the_unpadded_tokens_and_ignores_padding():
    tok = tokenizer()
    torch.manual_seed(0)
    clf = TextClassifier(minilm(), 3).eval()
    ids = tokenize(tok, ["a short text", "a somewhat longer text than the other one"], 32)
    narrow, wide = pack(ids, max(map(len, ids))), pack(ids, 40)
    with torch.no_grad():
        a, b = clf(narrow), clf(wide)
        hidden = clf.backbone(**unpack_text(narrow[:1])).last_hidden_state[0]
        manual = clf.head(hidden[: len(ids[0])].mean(0))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0], manual, rtol=1e-5, atol=1e-5)


def test_sequence_classification_model_with_a_wrong_head_is_refused():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16, num_labels=3))
    with pytest.raises(ValueError, match="head has 3 labels but the stream has 4 classes"):
        TextClassifier(model, 4)
    assert TextClassifier(model, 3).head is None


def _llama():
    from lifelong.models import tiny_llama

    return tiny_llama(seed=0, vocab=len(tokenizer()))


def test_verbalizer_scores_are_the_label_log_likelihood_after_the_prompt():
    tok = tokenizer()
    labels = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in ("good", "very bad indeed")]
    clf = TextClassifier(_llama(), 2, "verbalizer", labels).eval()
    prompts = tokenize(tok, ["the film was", "a much longer prompt about the film was"], 16)
    with torch.no_grad():
        scores = clf(pack(prompts, 20))
        for i, prompt in enumerate(prompts):
            for c, label in enumerate(labels):
                seq = torch.tensor([prompt + label])
                logp = torch.log_softmax(clf.backbone(input_ids=seq).logits[0].double(), -1)
                ref = sum(logp[len(prompt) + k - 1, tok_id] for k, tok_id in enumerate(label))
                assert abs(float(scores[i, c]) - float(ref)) < 1e-4
        clf.candidates = [1]
        only = clf(pack(prompts, 20))
    assert torch.isinf(only[:, 0]).all() and torch.allclose(only[:, 1], scores[:, 1])
    loss = VerbalizerLoss([1, 3])(scores, torch.tensor([0, 1]))
    torch.testing.assert_close(loss, -(scores[0, 0] / 1 + scores[1, 1] / 3) / 2)


def test_seq2seq_verbalizer_matches_a_teacher_forced_forward():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer()), d_model=16, d_kv=4, d_ff=32,
                                             num_layers=1, num_heads=2, decoder_start_token_id=0)).eval()
    tok = tokenizer()
    labels = [tok(w, add_special_tokens=False)["input_ids"] for w in ("yes", "no way")]
    clf = TextClassifier(t5, 2, "verbalizer", labels)
    prompts = tokenize(tok, ["is it true", "maybe"], 8)
    with torch.no_grad():
        scores = clf(pack(prompts, 8))
        seq = torch.tensor([prompts[1]])
        dec = torch.tensor([[0] + labels[1][:-1]])
        logp = torch.log_softmax(t5(input_ids=seq, decoder_input_ids=dec).logits[0].double(), -1)
    ref = sum(logp[k, t] for k, t in enumerate(labels[1]))
    assert abs(float(scores[1, 1]) - float(ref)) < 1e-4


# ---- run_stream on Hugging Face models --------------------------------------------------------

def _run(model, stream, method="naive", **kw):
    options = dict(tokenizer=tokenizer(), max_length=16, lr=0.05, batch_size=4, progress=False, seed=0)
    options.update(kw)
    return lc.run_stream(model, stream, method, **options)


def test_minilm_with_an_adapter_learns_a_text_stream_and_is_deterministic():
    stream = tiny_stream()
    base = minilm()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    a = _run(base, stream, adapter="bone", adapter_options={"r": 8}, epochs=3, optimizer="adam", lr=1e-3)
    b = _run(minilm(), stream, adapter="bone", adapter_options={"r": 8}, epochs=3, optimizer="adam", lr=1e-3)
    assert a.accuracy_matrix == b.accuracy_matrix
    r = np.asarray(a.accuracy_matrix)
    assert r[0, 0] > 0.5 and r[1, 1] > 0.5  # two-way tasks: above chance after training
    # the frozen base weights never move; only the adapter and the head train
    after = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items()}
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert a.trainable_parameters < 100_000 and a.config["text"]["route"] == "head"


@pytest.mark.parametrize("method, options", [("ewc", {"ewc_lambda": 10.0}), ("replay", {"mem_size": 4}),
                                             ("lwf", {}), ("migu", {"start_task": 0}), ("classp", {}),
                                             ("powerlaw", {"ratio": 0.5})])
def test_every_method_runs_on_the_text_path(method, options):
    res = _run(minilm(), tiny_stream(), method, method_options=options, adapter="bone", adapter_options={"r": 8})
    r = np.asarray(res.accuracy_matrix)
    assert r.shape == (2, 2) and np.all((r >= 0) & (r <= 1))
    # 8 + 6 samples, batch 4; power-law replays 2 samples, replay's buffer adds its 4
    assert res.train_steps == 2 + 2 + (1 if method in ("powerlaw", "replay") else 0)
    if method in ("replay", "powerlaw"):
        assert res.memory["replay_samples"] > 0


def test_decoder_route_trains_the_label_likelihood():
    stream = tiny_stream()
    losses: list[float] = []
    lm_loss = VerbalizerLoss([len(tokenizer()(" " + n, add_special_tokens=False)["input_ids"])
                              for n in stream.class_names])

    def recorded(scores, y):
        loss = lm_loss(scores, y)
        losses.append(float(loss))
        return loss

    res = _run(_llama(), stream, epochs=5, optimizer="adam", lr=0.01, criterion=recorded)
    assert res.config["text"]["route"] == "verbalizer"
    first, last = np.mean(losses[:2]), np.mean(losses[8:10])  # task 0: 2 steps per epoch, 5 epochs
    assert last < 0.6 * first
    assert np.asarray(res.accuracy_matrix)[0, 0] >= 0.75  # 4 test samples; a random decoder starts at chance


def test_text_bad_input_fails_before_training():
    stream = tiny_stream()
    with pytest.raises(ValueError, match="a text stream needs tokenizer"):
        lc.run_stream(minilm(), stream, progress=False)
    with pytest.raises(ValueError, match="max_length .* must be a positive integer"):
        _run(minilm(), stream, max_length=0)
    blank = lc.text_stream([(["a", "b"], ["ok", " "], ["c"], ["ok"])])
    with pytest.raises(ValueError, match="maps the label text ' ' .* to no token"):
        _run(_llama(), blank)
    dup = lc.text_stream([(["a"], ["Good"], ["b"], ["Good"]), (["c"], ["Good"], ["d"], ["Good"])],
                         task_incremental=False)
    with pytest.raises(ValueError, match=r"label texts \['Good'\] name several classes"):
        _run(_llama(), dup)
    with pytest.raises(ValueError, match="tokenizer= is for text streams"):
        lc.run_stream(nn.Linear(64, 10), lc.split_digits(2), tokenizer=tokenizer(), progress=False)


def interrupt_after(steps: int):
    """A cross-entropy criterion that interrupts the run at step ``steps + 1`` (in the second task here)."""
    calls = {"n": 0}

    def criterion(logits, y):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(logits, y)

    return criterion


def test_resume_equals_an_uninterrupted_run_and_refuses_another_stream(tmp_path):
    stream = tiny_stream()
    full = _run(minilm(), stream, "migu", method_options={"start_task": 0}, adapter="bone",
                adapter_options={"r": 8}, checkpoint_dir=str(tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        _run(minilm(), stream, "migu", method_options={"start_task": 0}, adapter="bone", adapter_options={"r": 8},
             checkpoint_dir=str(tmp_path / "b"), criterion=interrupt_after(3))
    resumed = _run(minilm(), stream, "migu", method_options={"start_task": 0}, adapter="bone",
                   adapter_options={"r": 8}, checkpoint_dir=str(tmp_path / "b"), resume=True)
    assert resumed.accuracy_matrix == full.accuracy_matrix
    other = lc.text_stream([(t.train_texts[::-1], [stream.class_names[c] for c in t.train_labels[::-1]],
                             t.test_texts, [stream.class_names[c] for c in t.test_labels]) for t in stream.tasks],
                           names=stream.names)
    with pytest.raises(ValueError, match="different configuration \\(differs in: text\\)"):
        _run(minilm(), other, "migu", method_options={"start_task": 0}, adapter="bone", adapter_options={"r": 8},
             checkpoint_dir=str(tmp_path / "a"), resume=True)
    with pytest.raises(ValueError, match="differs in: .*text"):
        _run(minilm(), stream, "migu", method_options={"start_task": 0}, adapter="bone", adapter_options={"r": 8},
             checkpoint_dir=str(tmp_path / "a"), resume=True, max_length=12)


def test_sequential_kore_starts_each_task_from_the_merged_model_and_resumes(tmp_path):
    from lifelong.adapters.model import AdaptedModel
    from lifelong.continual.adapter_modes import make_mode
    from lifelong.continual.hooks import Context
    from lifelong.continual.loop import Experience

    stream = tiny_stream()
    bm = stream.to_benchmark(tokenizer(), max_length=16)
    exps = [Experience(e, i) for i, e in enumerate(bm.train_stream)]
    torch.manual_seed(0)
    clf = TextClassifier(minilm(), len(stream.class_names))
    seq = make_mode("sequential", clf, "kore", {"r": 4, "progress": False}, [1, 1], calibration_samples=4,
                    batch_size=2, seed=0, as_inputs=unpack_text)
    x = exps[0].dataset.tensors[0][:4]
    seq.before_experience(Context(model=clf, experience=0, experiences=exps))
    with torch.no_grad():  # train the first adapter a little by hand
        for p in clf.backbone.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        trained = clf(x)
    seq.before_experience(Context(model=clf, experience=1, experiences=exps))
    assert isinstance(clf.backbone, AdaptedModel) and list(clf.backbone.configs) == ["default"]
    with torch.no_grad():  # the new adapter starts from the merged model: same outputs
        torch.testing.assert_close(clf(x), trained, rtol=1e-4, atol=1e-4)

    def run(**kw):
        return _run(minilm(), stream, adapter="kore", adapter_mode="sequential", calibration_samples=4,
                    adapter_options={"r": 4, "progress": False}, **kw)

    full = run(checkpoint_dir=str(tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint_dir=str(tmp_path / "b"), criterion=interrupt_after(3))
    assert run(checkpoint_dir=str(tmp_path / "b"), resume=True).accuracy_matrix == full.accuracy_matrix
    with pytest.raises(ValueError, match="needs a calibrated adapter"):
        _run(minilm(), stream, adapter="bone", adapter_mode="sequential")


def test_trainer_engine_equals_the_native_loop():
    stream = tiny_stream()
    models, results = {}, {}
    for engine in ("native", "trainer"):
        models[engine] = minilm()
        results[engine] = _run(models[engine], stream, "migu", method_options={"start_task": 0}, adapter="bone",
                               adapter_options={"r": 8}, engine=engine, epochs=2, lr=0.2)
    assert results["trainer"].accuracy_matrix == results["native"].accuracy_matrix
    assert results["trainer"].train_steps == results["native"].train_steps == 8
    native = dict(models["native"].named_parameters())
    for name, p in models["trainer"].named_parameters():
        torch.testing.assert_close(p, native[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not run with engine 'trainer'"):
        _run(minilm(), stream, "si", engine="trainer")


# ---- the stdlib stream and text configs (the main job) -----------------------------------------

def test_stdlib_stream_is_real_docstrings_labelled_by_module():
    import inspect
    import math

    stream = lc.stdlib_stream(per_class=12, seed=0)
    assert stream.names == ["numbers", "files", "time", "network"]
    assert stream.class_names[:3] == ["math", "statistics", "random"] and len(stream.class_names) == 12
    numbers = stream.tasks[0]
    math_docs = {" ".join(inspect.getdoc(f).split("\n\n")[0].split())
                 for f in vars(math).values() if callable(f) and f.__doc__}
    labelled_math = [t for t, y in zip(numbers.train_texts + numbers.test_texts,
                                       numbers.train_labels + numbers.test_labels) if y == 0]
    assert len(labelled_math) == 12 and all(t in math_docs for t in labelled_math)
    texts = [t for task in stream.tasks for t in task.train_texts + task.test_texts]
    assert len(texts) == len(set(texts))  # no text carries two labels
    assert all(numbers.train_labels.count(c) + numbers.test_labels.count(c) == 12 for c in numbers.classes)
    assert lc.stdlib_stream(per_class=12, seed=0).fingerprint() == stream.fingerprint()
    assert lc.stdlib_stream(per_class=12, seed=1).fingerprint() != stream.fingerprint()
    with pytest.raises(ValueError, match="unknown or no areas \\['poetry'\\]"):
        lc.stdlib_stream(areas=["poetry"])


def test_text_config_validation_names_what_is_wrong(tmp_path):
    from lifelong.experiment import ConfigError, validate

    base = {"kind": "continual", "stream": {"name": "stdlib_text"}, "methods": ["naive"], "model": {"name": "minilm"}}
    validate(dict(base))
    with pytest.raises(ConfigError, match="stream 'stdlib_text' is text: model.name must be one of"):
        validate({**base, "model": {"name": "mlp"}})
    with pytest.raises(ConfigError, match="stream 'split_digits' holds digits images"):
        validate({**base, "stream": {"name": "split_digits"}})
    with pytest.raises(ConfigError, match="needs stream.options.folder"):
        validate({**base, "stream": {"name": "cl_benchmark", "options": {"tasks": "text4"}}})
    with pytest.raises(ConfigError, match="training.max_length must be int"):
        validate({**base, "training": {"max_length": "long"}})


def test_text_config_runs_end_to_end_and_writes_the_report(tmp_path):
    from lifelong.experiment import run_experiment, validate

    config = validate({"kind": "continual", "name": "tiny", "seeds": [0],
                       "stream": {"name": "stdlib_text", "options": {"per_class": 6, "areas": ["numbers", "time"]}},
                       "model": {"name": "minilm"}, "adapter": {"name": "bone", "options": {"r": 4}},
                       "methods": ["naive", "migu"],
                       "training": {"epochs": 1, "lr": 0.001, "optimizer": "adam", "batch_size": 8,
                                    "max_length": 24, "forward_transfer": False}})
    out = tmp_path / "run"
    results = run_experiment(config, out, progress=False)
    cells = sorted(p.name for p in (out / "cells").glob("*.json"))
    assert cells == ["migu__seed0.json", "naive__seed0.json"]
    report = (out / "report.md").read_text()
    assert "| naive |" in report and "| migu |" in report
    cell = json.loads((out / "cells" / "naive__seed0.json").read_text())["result"]
    assert cell["config"]["text"]["tokenizer"]["class"].startswith("BertTokenizer")
    assert np.asarray(cell["accuracy_matrix"], dtype=float).shape == (2, 2)
    assert results is not None


def test_one_adapter_per_task_never_forgets_on_text():
    res = _run(minilm(), tiny_stream(), adapter="bone", adapter_mode="per_task", adapter_options={"r": 8},
               optimizer="adam", lr=1e-3, epochs=2)
    r = np.asarray(res.accuracy_matrix)
    # task 0's adapter is untouched while task 1 trains, and the shared head's rows of task 0's
    # classes get no gradient under the task mask: its column is constant
    assert r[1, 0] == r[0, 0] and res.forgetting == 0.0
    assert res.config["adapter_mode"] == "per_task"


# ---- the trained model: result.model -----------------------------------------------------------
@pytest.mark.parametrize("mode, adapter", [("shared", "bone"), ("per_task", "lora"), ("sequential", "kore"),
                                           ("incremental", "lora"), (None, None)])
def test_result_model_predicts_saves_and_loads(mode, adapter, tmp_path):
    stream = tiny_stream()
    options = {} if adapter is None else {"adapter": adapter, "adapter_mode": mode,
                                          "adapter_options": {"r": 4, **({"progress": False} if adapter == "kore" else {})}}
    res = _run(minilm(), stream, epochs=2, optimizer="adam", lr=1e-3, calibration_samples=4, **options)
    model = res.model
    r = np.asarray(res.accuracy_matrix)
    for j, task in enumerate(stream.tasks):  # predict on a task's test texts reproduces that task's cell
        pred = model.predict(task.test_texts, task=j)
        acc = float((pred == torch.tensor(task.test_labels)).float().mean())
        assert acc == pytest.approx(r[-1, j])
        assert set(pred.tolist()) <= set(task.classes if hasattr(task, "classes") else pred.tolist())
    texts = stream.tasks[1].test_texts
    before = model.logits(texts, task=stream.names[1])
    model.save_pretrained(tmp_path / "m")
    loaded = lc.load_model(minilm(), tmp_path / "m")  # the tokenizer travels with the model
    after = loaded.logits(texts, task=1)
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    if mode == "per_task":
        with pytest.raises(ValueError, match="one adapter per task: pass task="):
            model.predict(texts)
    else:
        assert model.predict(texts).shape == (len(texts),)  # no task: every class of the stream
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        model.predict(texts, task="nope")
    with pytest.raises(TypeError, match="list of strings"):
        model.predict("one string")


def test_load_model_refuses_what_is_not_a_saved_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="continual_model.json"):
        lc.load_model(minilm(), tmp_path)
    (tmp_path / "continual_model.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lc.load_model(minilm(), tmp_path)
