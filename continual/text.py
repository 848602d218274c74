"""Text streams: real classification tasks in sequence, kept as text until a tokenizer is given.

``cl_benchmark(folder, tasks=[...])`` reads the layout of the continual-learning benchmark used by
O-LoRA (Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning", EMNLP
Findings 2023) and MIGU (Du et al., "Unlocking Continual Learning Abilities in Language Models",
EMNLP Findings 2024): ``<folder>/**/<task>/{train,test,labels}.json`` where ``train.json`` and
``test.json`` are lists of ``{"sentence": ..., "label": ...}`` and ``labels.json`` lists the
task's label texts. ``text_stream(tasks)`` builds the same stream from memory (lists, or dicts of
plain lists) or from Hugging Face ``datasets.Dataset`` objects.

Labels: a task's labels are all ``str``, all ``int``, all ``float`` or all ``bool``. Without a
given label list, numbers sort numerically (``[10, 2, -1]`` gives the classes -1, 2, 10) and texts
as text; each distinct value is one class, shown by ``str(value)``. A task that mixes ints and
floats (``0`` and ``0.0``) is refused rather than merged: in practice it means that the labels went
through a float column (pandas with missing values) or that two sources disagree, and silently
choosing either one class or two would hide that. ``None``, NaN and other objects are refused.
With a given label list (the fifth item of a task tuple, a dict's ``"labels"``, ``labels.json``
or a ``ClassLabel`` feature) the classes keep its order; int labels with a list of texts index it
(the ``ClassLabel`` convention), otherwise labels and list must have one type. Texts must be
``str``; a single ``str`` where a list of texts or labels belongs is refused (it is not split into
characters).

Every task's labels are mapped into one global class space, in stream order (task 0's labels get
ids 0..k0-1, task 1's the next ones, ...); ``share_labels=True`` gives equal label texts of
different tasks one id (SST-2's and IMDB's "Good" become one class, as in the generative setup of
those papers, where the model writes the label text). A :class:`TextStream` turns into an
Avalanche benchmark with :meth:`TextStream.to_benchmark` once a tokenizer is chosen; each sample
is then one ``(2, L)`` integer tensor holding the token ids and the attention mask (padded to the
stream's longest sequence), so Avalanche strategies, replay buffers and the native loop batch it
like any tensor, and :class:`lifelong.continual.text_model.TextClassifier` unpacks it.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..checks import optional, positive_int

__all__ = ["TextTask", "TextStream", "cl_benchmark", "text_stream", "ORDERS", "find_tasks"]

# The task orders of the papers' scripts (O-LoRA and MIGU use orders 1-3 on the standard CL
# benchmark and 4-6 on the long 15-task sequence).
ORDERS: dict[str, list[str]] = {
    "order1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "order2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "order3": ["yahoo", "amazon", "agnews", "dbpedia"],
    "order4": ["MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2", "dbpedia",
               "agnews", "MultiRC", "yahoo"],
    "order5": ["MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
               "yelp", "amazon", "yahoo"],
    "order6": ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "yahoo",
               "MultiRC", "BoolQA", "WiC"],
    # Four sentiment/topic tasks that the shared copy of the benchmark holds (the library's benchmark).
    "text4": ["agnews", "amazon", "SST-2", "IMDB"],
}
HELD_OUT = 0.2  # fraction of a task's train file held out as its test set when it has no test.json
TEMPLATE_FIELDS = ("text", "task")  # the placeholders an instruction template may name


@dataclass
class TextTask:
    """One task: texts and global class ids for train and test, and the global ids it uses."""

    name: str
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    classes: list[int]


@dataclass
class TextStream:
    """Tasks in order, the text of every global class, and the scenario they form."""

    tasks: list[TextTask]
    class_names: list[str]
    task_incremental: bool = True
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def scenario(self) -> str:
        if self.task_incremental:
            return "task-incremental"
        sets = [set(t.classes) for t in self.tasks]
        disjoint = all(a.isdisjoint(b) for i, a in enumerate(sets) for b in sets[i + 1:])
        return "class-incremental" if disjoint else "domain-incremental"

    def fingerprint(self) -> str:
        """A hash of every text and label, in order: two streams with equal data hash equally."""
        h = hashlib.sha256()
        for task in self.tasks:
            h.update(json.dumps([task.name, task.classes, task.train_labels, task.test_labels]).encode())
            for text in (*task.train_texts, *task.test_texts):
                h.update(text.encode())
                h.update(b"\0")
        h.update(json.dumps([self.class_names, self.task_incremental]).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"tasks": self.names, "train": [len(t.train_texts) for t in self.tasks],
                "test": [len(t.test_texts) for t in self.tasks], "classes": len(self.class_names),
                "scenario": self.scenario, "fingerprint": self.fingerprint()}

    def to_benchmark(self, tokenizer, max_length: int = 128, template: str = "{text}"):
        """Tokenize every task once and return an Avalanche benchmark of packed ``(2, L)`` samples.
        ``template`` formats each text: ``{text}`` is the text, ``{task}`` the task's name (e.g.
        ``"{task}: {text}"``, as the papers' prompts name the task)."""
        from .streams import benchmark_from_tensors

        check_max_length(max_length)
        check_template(template)
        train_ids = [tokenize(tokenizer, t.train_texts, max_length, template, task=t.name) for t in self.tasks]
        test_ids = [tokenize(tokenizer, t.test_texts, max_length, template, task=t.name) for t in self.tasks]
        width = max(len(seq) for part in (*train_ids, *test_ids) for seq in part)
        train = [(pack(ids, width), torch.tensor(t.train_labels)) for ids, t in zip(train_ids, self.tasks)]
        test = [(pack(ids, width), torch.tensor(t.test_labels)) for ids, t in zip(test_ids, self.tasks)]
        bm = benchmark_from_tensors(train, test, task_labels=self.task_incremental, scenario=self.scenario)
        bm.lifelong_text = {"class_names": list(self.class_names), "fingerprint": self.fingerprint(),
                            "tokenizer": tokenizer_identity(tokenizer), "max_length": max_length,
                            "template": template, "tasks": self.names}
        return bm


# ---- tokenization ------------------------------------------------------------------------------

def check_max_length(max_length: Any) -> None:
    positive_int("max_length (tokens per sequence)", max_length)


def template_fields(template: str) -> set[str]:
    """The placeholders a format string names (``{text}``, ``{task}``, ...)."""
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise ValueError(f"template {template!r} is not a valid format string ({err}); write a literal brace "
                         "as '{{' or '}}'") from None


def check_template(template: Any) -> None:
    if not isinstance(template, str) or "{text}" not in template:
        raise ValueError(f"template must be a str containing '{{text}}' (and optionally '{{task}}'), got {template!r}")
    unknown = sorted(template_fields(template) - set(TEMPLATE_FIELDS))
    if unknown:
        raise ValueError(f"template {template!r} names {unknown}; it may only name {{text}} and {{task}}")


def tokenize(tokenizer, texts: list[str], max_length: int, template: str = "{text}",
             task: str | None = None) -> list[list[int]]:
    """Token ids of each text formatted by ``template`` (truncated to ``max_length``, unpadded);
    ``task`` fills a ``{task}`` placeholder."""
    if "task" in template_fields(template) and task is None:
        raise ValueError(f"template {template!r} names {{task}}: pass the task's name (task=...)")
    if not texts:
        return []
    encoded = tokenizer([template.format(text=t, task=task) for t in texts], truncation=True, max_length=max_length)
    return [list(ids) for ids in encoded["input_ids"]]


def pack(ids: list[list[int]], width: int) -> torch.Tensor:
    """Right-padded ``(N, 2, width)`` tensor: row 0 the token ids (pad 0), row 1 the attention mask."""
    out = torch.zeros(len(ids), 2, width, dtype=torch.long)
    for i, seq in enumerate(ids):
        out[i, 0, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        out[i, 1, : len(seq)] = 1
    return out


def tokenizer_identity(tokenizer) -> dict:
    """What identifies a tokenizer in a checkpoint: its class, source and vocabulary size."""
    return {"class": type(tokenizer).__name__, "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": int(len(tokenizer))}


# ---- the benchmark folder ----------------------------------------------------------------------

def find_tasks(folder: str | os.PathLike) -> dict[str, Path]:
    """Task name → its folder, for every folder below ``folder`` that holds a ``train.json``."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"cl_benchmark: {str(root)!r} is not a folder")
    found: dict[str, Path] = {}
    for train in sorted(root.rglob("train.json")):
        name = train.parent.name
        if name in found:
            raise ValueError(f"cl_benchmark: task {name!r} appears twice under {str(root)!r}: "
                             f"{found[name]} and {train.parent}")
        found[name] = train.parent
    return found


def _read_items(path: Path) -> list[tuple[str, Any]]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list of {{'sentence', 'label'}} items, "
                         f"got {'an empty list' if items == [] else type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("sentence"), str) or "label" not in item:
            raise ValueError(f"{path}: item {i} must be a mapping with a str 'sentence' and a 'label', got {item!r:.200}")
        out.append((item["sentence"], item["label"]))
    return out


def _read_labels(path: Path) -> list[Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every task folder needs labels.json, the list of its label texts)")
    labels = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(labels, list) or not labels or len(set(map(str, labels))) != len(labels):
        raise ValueError(f"{path}: expected a non-empty list of distinct label texts, got {labels!r:.200}")
    return labels


def _stratified(labels: np.ndarray, per_class: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``per_class`` items of each label (all when None), in file order."""
    if per_class is None:
        return np.arange(len(labels))
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def _split(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A stratified held-out split (``HELD_OUT`` of each label) of a task that has no test file."""
    test = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[: max(1, int(round(HELD_OUT * len(idx))))])
    test_idx = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test_idx), test_idx



def cl_benchmark(folder: str | os.PathLike, tasks: Sequence[str] | str, n_train: int | None = None,
                 n_test: int | None = None, seed: int = 0, task_incremental: bool = True,
                 share_labels: bool = False) -> TextStream:
    """Read ``tasks`` (names, or a preset of :data:`ORDERS`) from a CL_Benchmark folder.

    Args:
        folder: the benchmark folder; a task is found by its folder name anywhere below it.
        tasks: task names in stream order, or a preset name such as ``"order1"`` or ``"text4"``.
        n_train, n_test: items per class kept from each task's train / test set (seeded,
            stratified; None keeps all). A task without ``test.json`` holds out a stratified
            20% of its train file as its test set first.
        task_incremental: attach task ids (evaluation restricted to each task's classes); False
            gives a class-incremental stream (domain-incremental when labels are shared).
        share_labels: equal label texts of different tasks are one global class.
    """
    if isinstance(tasks, str):
        if tasks not in ORDERS:
            raise ValueError(f"cl_benchmark: unknown preset {tasks!r}; presets: {', '.join(ORDERS)} "
                             "(or pass a list of task names)")
        tasks = ORDERS[tasks]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("cl_benchmark: tasks is empty (name at least one task)")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"cl_benchmark: a task appears twice in {tasks}")
    optional(positive_int, "n_train (items per class)", n_train)
    optional(positive_int, "n_test (items per class)", n_test)
    found = find_tasks(folder)
    missing = [t for t in tasks if t not in found]
    if missing:
        raise ValueError(f"cl_benchmark: task(s) {missing} not found under {str(folder)!r}; "
                         f"tasks found: {', '.join(sorted(found)) or 'none'}")
    raw = []
    for i, name in enumerate(tasks):
        path = found[name]
        given = _read_labels(path / "labels.json")
        labels, train = _file_labels(path / "train.json", _read_items(path / "train.json"), given)
        test_file = path / "test.json"
        test = _file_labels(test_file, _read_items(test_file), given)[1] if test_file.is_file() else None
        rng = np.random.default_rng([seed, i])
        y = np.array([labels.index(label) for _, label in train])
        if test is None:
            tr_idx, te_idx = _split(y, rng)
            test = [train[k] for k in te_idx]
            train = [train[k] for k in tr_idx]
            y = y[tr_idx]
        y_test = np.array([labels.index(label) for _, label in test])
        train = [train[k] for k in _stratified(y, n_train, rng)]
        test = [test[k] for k in _stratified(y_test, n_test, rng)]
        raw.append((name, labels, train, test))
    return _build(raw, task_incremental, share_labels, {"folder": str(folder), "seed": seed,
                                                       "n_train": n_train, "n_test": n_test})


def _file_labels(path: Path, items: list[tuple[str, Any]], given: list[Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """A benchmark file's items with their labels as class texts, and the task's class texts."""
    kind, values = label_values([label for _, label in items], f"{path}: item", "label")
    text_of = class_texts(kind, given, str(path.parent / "labels.json"))
    for j, value in enumerate(values):
        if value not in text_of:
            raise ValueError(f"{path}: item {j} has label {items[j][1]!r}, which is not in labels.json {given}")
    return list(text_of.values()), [(sentence, text_of[v]) for (sentence, _), v in zip(items, values)]


# ---- labels ------------------------------------------------------------------------------------

LABEL_TYPES = {"str": str, "bool": bool, "int": int, "float": float}  # a label's kind -> its plain value


def _label_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "str"
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return "float"
    return None


def as_list(values: Any, where: str) -> list:
    """A list of the items of ``values`` (a list, tuple, array, tensor or any iterable), refusing a bare str."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{where} must be a list, got a single {type(values).__name__} {values!r:.60} "
                        "(wrap it in a list)")
    if isinstance(values, (np.ndarray, torch.Tensor)):
        return values.tolist()
    try:
        return list(values)
    except TypeError:
        raise TypeError(f"{where} must be a list, got {type(values).__name__}") from None


def label_values(labels: Any, where: str, noun: str = "label") -> tuple[str | None, list]:
    """Labels as plain str / int / float / bool values and their one kind (None when empty);
    ``where`` + `` <index>`` names a bad item."""
    labels = as_list(labels, f"{where}s")
    first: dict[str, int] = {}
    for i, value in enumerate(labels):
        kind = _label_kind(value)
        if kind is None:
            error = ValueError if isinstance(value, numbers.Real) else TypeError
            raise error(f"{where} {i} is {value!r}: a {noun} is a str, an int, a float or a bool (not None or NaN)")
        first.setdefault(kind, i)
    if len(first) > 1:
        found = ", ".join(f"{kind} ({labels[i]!r} at {i})" for kind, i in first.items())
        raise ValueError(f"{where}s mix types: {found}; give a task's {noun}s one type (an int and a float such as "
                         "0 and 0.0 are not merged into one class)")
    kind = next(iter(first), None)
    return kind, [LABEL_TYPES[kind](v) for v in labels]


def class_texts(kind: str | None, given: Any, where: str, values: list | None = None) -> dict[Any, str]:
    """Label value -> class text, in class order: the ``given`` label list's, or (``given`` None)
    the sorted distinct ``values`` (numbers numerically). Ints with a list of texts index it."""
    if given is None:
        return {v: str(v) for v in sorted(set(values or []))}
    given_kind, names = label_values(given, f"{where} label text", "label text")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: the label texts must be distinct, got {names}")
    if given_kind == "str" and kind == "int":  # the ClassLabel convention: an int is a position in the list
        return dict(enumerate(names))
    if kind is not None and kind != given_kind:
        raise ValueError(f"{where}: the labels are {kind}s but the label list {names} holds {given_kind}s; "
                         "give both one type (ints may also index a list of label texts)")
    return {v: str(v) for v in names}


def _build(raw: list[tuple[str, list[str], list, list]], task_incremental: bool, share_labels: bool,
           metadata: dict) -> TextStream:
    """Map each task's label texts into one global class space and build the stream."""
    class_names: list[str] = []
    tasks = []
    for name, labels, train, test in raw:
        ids = {}
        for label in labels:
            if share_labels and label in class_names:
                ids[label] = class_names.index(label)
            else:
                ids[label] = len(class_names)
                class_names.append(label)
        tasks.append(TextTask(name, [s for s, _ in train], [ids[lab] for _, lab in train],
                              [s for s, _ in test], [ids[lab] for _, lab in test], [ids[lab] for lab in labels]))
    return TextStream(tasks, class_names, task_incremental, metadata)


# ---- streams from memory or Hugging Face datasets ----------------------------------------------

def _columns(data: Any, where: str) -> tuple[Any, Any, list | None]:
    """Texts, labels and (for a ``ClassLabel`` feature) the label texts of a ``datasets.Dataset``
    or of a dict of plain lists."""
    if isinstance(data, Mapping):
        names = list(data)
    elif hasattr(data, "column_names"):
        names = list(data.column_names)
    else:
        raise TypeError(f"{where}: expected a datasets.Dataset or a dict of lists "
                        f"({{'text': [...], 'label': [...]}}), got {type(data).__name__}")
    text_col = next((c for c in ("sentence", "text") if c in names), None)
    if text_col is None or "label" not in names:
        raise ValueError(f"{where}: a dataset needs a 'sentence' or 'text' column and a 'label' column, "
                         f"got columns {names}")
    features = getattr(data, "features", None)
    feature = features.get("label") if isinstance(features, Mapping) else None
    label_names = list(feature.names) if hasattr(feature, "names") else None
    return data[text_col], data["label"], label_names


def _texts(texts: Any, where: str) -> list[str]:
    texts = as_list(texts, f"{where} texts")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"{where} text {bad} is {type(texts[bad]).__name__} {texts[bad]!r:.60}, expected a str")
    return [str(t) for t in texts]


def _task_parts(spec: Any, where: str, index: int) -> tuple[str, Any, Any, Any, Any, Any]:
    """``(name, train texts, train labels, test texts, test labels, label list or None)`` of one task."""
    if isinstance(spec, Mapping) and {"train", "test"} <= set(spec):
        tr_x, tr_y, names = _columns(spec["train"], f"{where} train")
        te_x, te_y, _ = _columns(spec["test"], f"{where} test")
        given = spec.get("labels")
        return str(spec.get("name") or f"task{index}"), tr_x, tr_y, te_x, te_y, names if given is None else given
    if isinstance(spec, (tuple, list)) and len(spec) in (4, 5):
        return (f"task{index}", *spec[:4], spec[4] if len(spec) == 5 else None)
    raise TypeError(f"{where}: expected (train_texts, train_labels, test_texts, test_labels[, label_texts]) "
                    f"or {{'name', 'train': Dataset or dict of lists, 'test': ...[, 'labels']}}, "
                    f"got {type(spec).__name__}")


def _task_from(spec: Any, index: int) -> tuple[str, list[str], list, list]:
    where = f"text_stream: task {index}"
    name, tr_x, tr_y, te_x, te_y, given = _task_parts(spec, where, index)
    tr_x, te_x = _texts(tr_x, f"{where} train"), _texts(te_x, f"{where} test")
    tr_kind, tr_y = label_values(tr_y, f"{where} train label")
    te_kind, te_y = label_values(te_y, f"{where} test label")
    if len(tr_x) != len(tr_y) or len(te_x) != len(te_y):
        raise ValueError(f"{where}: {len(tr_x)} train texts but {len(tr_y)} labels, "
                         f"{len(te_x)} test texts but {len(te_y)} labels")
    if not tr_x or not te_x:
        raise ValueError(f"{where}: the train and the test part each need at least one text")
    if tr_kind != te_kind:
        raise ValueError(f"{where}: the train labels are {tr_kind}s and the test labels {te_kind}s; give both one type")
    text_of = class_texts(tr_kind, given, where, tr_y + te_y)
    unknown = sorted(set(tr_y + te_y) - set(text_of))
    if unknown:
        raise ValueError(f"{where}: labels {unknown} are not among its label texts {list(text_of.values())}")
    return (name, list(text_of.values()), [(x, text_of[y]) for x, y in zip(tr_x, tr_y)],
            [(x, text_of[y]) for x, y in zip(te_x, te_y)])


def text_stream(tasks: Sequence[Any], names: Sequence[str] | None = None, task_incremental: bool = True,
                share_labels: bool = False) -> TextStream:
    """A :class:`TextStream` from in-memory tasks or Hugging Face datasets.

    Each task is ``(train_texts, train_labels, test_texts, test_labels)`` (labels as texts or
    numbers, see the module docstring; a fifth item lists the task's labels in class order) or
    ``{"name": ..., "train": ..., "test": ...[, "labels": [...]]}`` whose parts are Hugging Face
    ``datasets.Dataset`` objects or dicts of plain lists, each with a ``sentence``/``text`` column
    and a ``label`` column (a ``ClassLabel`` feature gives the label texts).
    """
    if not tasks:
        raise ValueError("text_stream: no tasks given")
    raw = [_task_from(spec, i) for i, spec in enumerate(tasks)]
    if names is not None:
        if len(names) != len(raw):
            raise ValueError(f"text_stream: {len(names)} names for {len(raw)} tasks")
        raw = [(str(n), *rest) for n, (_, *rest) in zip(names, raw)]
    if len({r[0] for r in raw}) != len(raw):
        raise ValueError(f"text_stream: task names must be distinct, got {[r[0] for r in raw]}")
    return _build(raw, task_incremental, share_labels, {})
