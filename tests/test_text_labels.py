"""Labels and texts of text streams (issue #20 items 3 and 4): numeric labels in numeric order,
one class per value, clear errors for anything that is not a text or a label, dicts of plain lists
and Hugging Face ``Dataset`` objects, and the ``{task}`` placeholder of the instruction template."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _MINILM, minilm

import lifelong.continual as lc

TRAIN = ["a", "b", "c", "d"]
TEST = ["e", "f"]


def one_task(train_labels, test_labels, *label_list, train=TRAIN, test=TEST) -> lc.TextStream:
    return lc.text_stream([(train, train_labels, test, test_labels, *label_list)])


def test_int_labels_sort_numerically_one_class_per_value() -> None:
    stream = one_task([10, 2, -1, 2], [10, -1])
    assert stream.class_names == ["-1", "2", "10"]  # as text: ['-1', '10', '2']
    assert stream.tasks[0].train_labels == [2, 1, 0, 1] and stream.tasks[0].test_labels == [2, 0]
    numpy_ints = one_task(np.array([3, 1, 3, 1]), [np.int64(1), np.int64(3)])
    assert numpy_ints.class_names == ["1", "3"] and numpy_ints.tasks[0].train_labels == [1, 0, 1, 0]


def test_float_labels_sort_numerically_and_tensors_give_their_values() -> None:
    stream = one_task([0.5, 10.0, 2.25, 0.5], [2.25, 10.0])
    assert stream.class_names == ["0.5", "2.25", "10.0"] and stream.tasks[0].train_labels == [0, 2, 1, 0]
    tensor = one_task(torch.tensor([1, 0, 1, 0]), torch.tensor([0, 1]))
    assert tensor.class_names == ["0", "1"] and tensor.tasks[0].test_labels == [0, 1]  # not 'tensor(1)'


def test_ints_with_a_list_of_label_texts_index_it_and_int_label_lists_keep_their_order() -> None:
    named = one_task([1, 0, 1, 0], [0, 1], ["neg", "pos"])
    assert named.class_names == ["neg", "pos"] and named.tasks[0].train_labels == [1, 0, 1, 0]
    ordered = one_task([2, 10, 2, 10], [10, 2], [10, 2])
    assert ordered.class_names == ["10", "2"] and ordered.tasks[0].train_labels == [1, 0, 1, 0]
    with pytest.raises(ValueError, match=r"labels \[2\] are not among its label texts \['neg', 'pos'\]"):
        one_task([1, 0, 2, 0], [0, 1], ["neg", "pos"])


def test_second_task_ids_follow_the_first_tasks_classes() -> None:
    stream = lc.text_stream([(TRAIN, [1, 0, 1, 0], TEST, [0, 1]), (TRAIN, [9, 11, 9, 11], TEST, [11, 9])])
    assert stream.class_names == ["0", "1", "9", "11"] and stream.tasks[1].classes == [2, 3]
    assert stream.tasks[1].train_labels == [2, 3, 2, 3]


@pytest.mark.parametrize(("train_labels", "test_labels", "label_list", "error", "message"), [
    ([0.0, 1, 0.0, 1], [1, 0.0], None, ValueError,
     r"task 0 train labels mix types: float \(0.0 at 0\), int \(1 at 1\).*0 and 0.0 are not merged"),
    ([0, 1, 0, 1], [1.0, 0.0], None, ValueError, "the train labels are ints and the test labels floats"),
    ([0, None, 0, 1], [1, 0], None, TypeError, "task 0 train label 1 is None: a label is a str, an int"),
    ([0, 1, 0, 1], [math.nan, 0.0], None, ValueError, "task 0 test label 0 is nan"),
    ("abcd", [0, 1], None, TypeError, r"train labels must be a list, got a single str 'abcd' \(wrap it in a list\)"),
    ([0, 1, 0, 1], [1, 0], [0.0, 1.0], ValueError, r"the labels are ints but the label list \[0.0, 1.0\] holds floats"),
    ([0, 1, 0, 1], [1, 0], ["x", "x"], ValueError, "the label texts must be distinct"),
])
def test_bad_labels_are_refused(train_labels, test_labels, label_list, error, message) -> None:
    extra = () if label_list is None else (label_list,)
    with pytest.raises(error, match=message):
        one_task(train_labels, test_labels, *extra)


@pytest.mark.parametrize(("train", "test", "message"), [
    ("abcd", TEST, r"task 1 train texts must be a list, got a single str 'abcd'"),
    (["a", "b", 5, None], TEST, "task 1 train text 2 is int 5, expected a str"),
    (TRAIN, ["e", b"f"], "task 1 test text 1 is bytes b'f', expected a str"),
])
def test_texts_must_be_str_and_errors_name_task_and_index(train, test, message) -> None:
    good = (TRAIN, ["x", "y", "x", "y"], TEST, ["x", "y"])
    with pytest.raises(TypeError, match=message):
        lc.text_stream([good, (train, [0, 1, 0, 1], test, [0, 1])])


def test_dicts_of_plain_lists_are_tasks() -> None:
    stream = lc.text_stream([
        {"name": "plain", "train": {"text": TRAIN, "label": [2, 10, 2, 10]}, "test": {"text": TEST, "label": [10, 2]}},
        {"name": "named", "train": {"sentence": TRAIN, "label": [1, 0, 0, 1]}, "test": {"sentence": TEST, "label": [0, 1]},
         "labels": ["bad", "good"]},
    ])
    assert stream.names == ["plain", "named"] and stream.class_names == ["2", "10", "bad", "good"]
    assert stream.tasks[0].train_labels == [0, 1, 0, 1] and stream.tasks[1].train_labels == [3, 2, 2, 3]
    with pytest.raises(ValueError, match=r"task 0 train: a dataset needs a 'sentence' or 'text' column .* \['txt', 'label'\]"):
        lc.text_stream([{"train": {"txt": TRAIN, "label": [0] * 4}, "test": {"text": TEST, "label": [0, 0]}}])
    with pytest.raises(TypeError, match="task 0 test: expected a datasets.Dataset or a dict of lists"):
        lc.text_stream([{"train": {"text": TRAIN, "label": [0] * 4}, "test": [("e", 0)]}])


def test_hugging_face_datasets_with_and_without_class_label() -> None:
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    named = {"name": "hf", "train": Dataset.from_dict({"text": TRAIN, "label": [1, 0, 0, 1]}, features=features),
             "test": Dataset.from_dict({"text": TEST, "label": [1, 0]}, features=features)}
    numeric = {"name": "ints", "train": Dataset.from_dict({"sentence": TRAIN, "label": [10, 2, 2, 10]}),
               "test": Dataset.from_dict({"sentence": TEST, "label": [2, 10]})}
    stream = lc.text_stream([named, numeric])
    assert stream.class_names == ["neg", "pos", "2", "10"]
    assert stream.tasks[0].train_labels == [1, 0, 0, 1] and stream.tasks[1].train_labels == [3, 2, 2, 3]
    assert stream.tasks[1].train_texts == TRAIN


def test_cl_benchmark_reads_int_labels_by_value_or_as_indices(tmp_path: Path) -> None:
    def write(name: str, labels: list, train: list, test: list) -> None:
        folder = tmp_path / "G" / name
        folder.mkdir(parents=True)
        (folder / "labels.json").write_text(json.dumps(labels))
        (folder / "train.json").write_text(json.dumps([{"sentence": f"t{i}", "label": v} for i, v in enumerate(train)]))
        (folder / "test.json").write_text(json.dumps([{"sentence": f"s{i}", "label": v} for i, v in enumerate(test)]))

    write("numbers", [10, 2], [2, 10, 2], [10])
    write("indexed", ["neg", "pos"], [1, 0, 1], [0])
    write("broken", ["neg", "pos"], [1, None], [0])
    stream = lc.cl_benchmark(tmp_path, tasks=["numbers", "indexed"])
    assert stream.class_names == ["10", "2", "neg", "pos"]
    assert stream.tasks[0].train_labels == [1, 0, 1] and stream.tasks[1].train_labels == [3, 2, 3]
    with pytest.raises(TypeError, match=r"broken/train.json: item 1 is None: a label is a str"):
        lc.cl_benchmark(tmp_path, tasks=["broken"])


def test_template_fills_the_task_name() -> None:
    minilm()
    tok = _MINILM["tokenizer"]
    stream = lc.text_stream([(["a fine film", "a dull film"], ["good", "bad"], ["fine"], ["good"])], names=["sst2"])
    bm = stream.to_benchmark(tok, max_length=16, template="{task}: {text}")
    x, _, _ = bm.train_stream[0].dataset[0]
    expected = tok("sst2: a fine film", truncation=True, max_length=16)["input_ids"]
    assert x[0, : len(expected)].tolist() == expected and int(x[1].sum()) == len(expected)
    assert bm.lifelong_text["template"] == "{task}: {text}"
    with pytest.raises(ValueError, match=r"names \['label'\]; it may only name \{text\} and \{task\}"):
        stream.to_benchmark(tok, template="{label}: {text}")
    with pytest.raises(ValueError, match="is not a valid format string"):
        stream.to_benchmark(tok, template="{text} {")
    with pytest.raises(ValueError, match=r"names \{task\}: pass the task's name"):
        lc.text.tokenize(tok, ["x"], 8, "{task}: {text}")
