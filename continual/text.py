"""Text streams: real classification tasks in sequence, kept as text until a tokenizer is given.

``cl_benchmark(folder, tasks=[...])`` reads the layout of the continual-learning benchmark used by
O-LoRA (Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning", EMNLP
Findings 2023) and MIGU (Du et al., "Unlocking Continual Learning Abilities in Language Models",
EMNLP Findings 2024): ``<folder>/**/<task>/{train,test,labels}.json`` where ``train.json`` and
``test.json`` are lists of ``{"sentence": ..., "label": ...}`` and ``labels.json`` lists the
task's label texts. ``text_stream(tasks)`` builds the same stream from memory or from Hugging
Face ``datasets.Dataset`` objects.

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
import os
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
        """Tokenize every task once and return an Avalanche benchmark of packed ``(2, L)`` samples."""
        from .streams import benchmark_from_tensors

        check_max_length(max_length)
        check_template(template)
        train_ids = [tokenize(tokenizer, t.train_texts, max_length, template) for t in self.tasks]
        test_ids = [tokenize(tokenizer, t.test_texts, max_length, template) for t in self.tasks]
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


def check_template(template: Any) -> None:
    if not isinstance(template, str) or "{text}" not in template:
        raise ValueError(f"template must be a str containing '{{text}}', got {template!r}")


def tokenize(tokenizer, texts: list[str], max_length: int, template: str = "{text}") -> list[list[int]]:
    """Token ids of each text (truncated to ``max_length``, unpadded)."""
    if not texts:
        return []
    encoded = tokenizer([template.format(text=t) for t in texts], truncation=True, max_length=max_length)
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


def _read_items(path: Path) -> list[tuple[str, str]]:
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
        out.append((item["sentence"], str(item["label"])))
    return out


def _read_labels(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every task folder needs labels.json, the list of its label texts)")
    labels = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(labels, list) or not labels or len(set(map(str, labels))) != len(labels):
        raise ValueError(f"{path}: expected a non-empty list of distinct label texts, got {labels!r:.200}")
    return [str(label) for label in labels]


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
        labels = _read_labels(path / "labels.json")
        train = _read_items(path / "train.json")
        test = _read_items(path / "test.json") if (path / "test.json").is_file() else None
        for file, items in (("train.json", train), ("test.json", test or [])):
            for j, (_, label) in enumerate(items):
                if label not in labels:
                    raise ValueError(f"{path / file}: item {j} has label {label!r}, which is not in "
                                     f"labels.json {labels}")
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

def _columns(dataset, where: str) -> tuple[list[str], list[str], list[str] | None]:
    """Texts, label texts and (when the dataset names them) every label text of a ``datasets.Dataset``."""
    names = list(getattr(dataset, "column_names", []))
    text_col = next((c for c in ("sentence", "text") if c in names), None)
    if text_col is None or "label" not in names:
        raise ValueError(f"{where}: a dataset needs a 'sentence' or 'text' column and a 'label' column, "
                         f"got columns {names}")
    labels = list(dataset["label"])
    feature = getattr(dataset, "features", {}).get("label")
    label_names = list(feature.names) if hasattr(feature, "names") else None
    if label_names is not None:
        labels = [label_names[int(v)] for v in labels]
    return [str(t) for t in dataset[text_col]], [str(v) for v in labels], label_names


def _task_from(spec: Any, index: int) -> tuple[str, list[str], list, list]:
    where = f"text_stream: task {index}"
    if isinstance(spec, dict) and {"train", "test"} <= set(spec):
        name = str(spec.get("name", f"task{index}"))
        tr_x, tr_y, names = _columns(spec["train"], f"{where} train")
        te_x, te_y, _ = _columns(spec["test"], f"{where} test")
        labels = names if names is not None else sorted(set(tr_y) | set(te_y))
    elif isinstance(spec, (tuple, list)) and len(spec) in (4, 5):
        tr_x, tr_y, te_x, te_y = (list(part) for part in spec[:4])
        tr_y, te_y = [str(v) for v in tr_y], [str(v) for v in te_y]
        labels = [str(v) for v in spec[4]] if len(spec) == 5 else sorted(set(tr_y) | set(te_y))
        name = f"task{index}"
    else:
        raise TypeError(f"{where}: expected (train_texts, train_labels, test_texts, test_labels[, label_texts]) "
                        f"or {{'name', 'train': Dataset, 'test': Dataset}}, got {type(spec).__name__}")
    if len(tr_x) != len(tr_y) or len(te_x) != len(te_y):
        raise ValueError(f"{where}: {len(tr_x)} train texts but {len(tr_y)} labels, "
                         f"{len(te_x)} test texts but {len(te_y)} labels")
    if not tr_x or not te_x:
        raise ValueError(f"{where}: the train and the test part each need at least one text")
    unknown = sorted((set(tr_y) | set(te_y)) - set(labels))
    if unknown:
        raise ValueError(f"{where}: labels {unknown} are not among its label texts {labels}")
    return name, labels, list(zip(map(str, tr_x), tr_y)), list(zip(map(str, te_x), te_y))


def text_stream(tasks: Sequence[Any], names: Sequence[str] | None = None, task_incremental: bool = True,
                share_labels: bool = False) -> TextStream:
    """A :class:`TextStream` from in-memory tasks or Hugging Face datasets.

    Each task is ``(train_texts, train_labels, test_texts, test_labels)`` (labels as texts or ints;
    a fifth item lists the task's label texts in order) or ``{"name": ..., "train": Dataset,
    "test": Dataset}`` with a ``sentence``/``text`` column and a ``label`` column (a ``ClassLabel``
    feature gives the label texts).
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
