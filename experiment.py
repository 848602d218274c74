"""Experiments from a YAML config: what ``lifelong run CONFIG.yaml`` does.

A config describes either a continual stream (``kind: continual``: stream, model, optional
adapter, methods, seeds) or a federation (``kind: federated``: data, model, optional adapter,
partition, participation, local steps, algorithms, seeds). Every (method, seed) pair is a *cell*;
each finished cell is stored as JSON under ``cells/`` (and a running cell checkpoints beside it),
so ``--resume`` never recomputes finished work; a cell file that is empty or corrupt (an
interrupted copy, a full disk) is recomputed with a warning naming it. Every value of the config
is checked when it is loaded (types, ranges, finite numbers, distinct seeds; the stream and the
federated objects are built once as a dry run), so a config that cannot run fails before anything
is written. The output folder must be writable: that is checked before any work. The report (``results.json``, ``report.md`` and PNG
plots, see ``lifelong.report``) is written from the cells at the end.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .checks import non_negative_int, positive_int
from .files import atomic_write_text, check_writable, fingerprint, json_text
from .report import CorruptCell, load_cell, write_report

COMMON_KEYS = {"kind", "name", "seeds", "model", "adapter"}
SECTION_KEYS = {
    "continual": COMMON_KEYS | {"stream", "methods", "training", "orders"},
    "federated": COMMON_KEYS | {"data", "federation", "partition", "participation", "local_steps", "speed", "algorithms"},
}
REQUIRED = {"continual": {"stream", "methods"}, "federated": {"algorithms"}}
TEXT_TRAINING_KEYS = ("max_length", "template", "route")
#: ``run_stream`` settings a ``training:`` section may not hold: the seeds are the top-level ``seeds``
NOT_TRAINING_KEYS = ("seed",)
FEDERATION_KEYS = {"num_workers": int, "steps": int, "batch_size": int, "eval_every": int, "max_concurrent": int}


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is allowed."""


# ---- loading and validation ---------------------------------------------------------------------

def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """Read a YAML config, apply ``a.b=value`` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(config).__name__}")
    for item in overrides:
        apply_override(config, item)
    return validate(config)


def apply_override(config: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.subkey=value")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def validate(config: dict) -> dict:
    """Check every key and type; return the config with defaults filled in and methods normalised."""
    kind = config.get("kind")
    if kind not in SECTION_KEYS:
        raise ConfigError(f"kind must be one of {sorted(SECTION_KEYS)}, got {kind!r}")
    check_keys(config, SECTION_KEYS[kind], "config")
    missing = sorted(REQUIRED[kind] - set(config))
    if missing:
        raise ConfigError(f"config of kind {kind!r} is missing {missing}")
    check_finite_numbers(config, "config")
    out = dict(config)
    out.setdefault("name", kind)
    if not isinstance(out["name"], str) or not out["name"]:
        raise ConfigError(f"name must be a non-empty string, got {out['name']!r}")
    out["seeds"] = check_seeds(config.get("seeds", [0]))
    out["model"] = named_section(config.get("model", {"name": "mlp"}), "model")
    out["adapter"] = None if config.get("adapter") is None else named_section(config["adapter"], "adapter")
    if out["adapter"] is not None:
        check_adapter(out["adapter"])
    return validate_continual(out) if kind == "continual" else validate_federated(out)


def check_finite_numbers(value: Any, where: str) -> None:
    """Refuse NaN and infinite numbers anywhere in the config (``lr: .nan`` would train NaN weights)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite_numbers(item, f"{where}.{key}" if where != "config" else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_finite_numbers(item, f"{where}[{i}]")


def check_adapter(adapter: dict) -> None:
    """The adapter is registered and its options make a valid config."""
    import lifelong
    from .adapters.registry import make_config

    if adapter["name"] not in lifelong.available():
        raise ConfigError(f"adapter.name: unknown adapter {adapter['name']!r}; allowed: {lifelong.available()}")
    try:
        make_config(adapter["name"], **adapter["options"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"adapter.options: {err}") from err


def validate_continual(config: dict) -> dict:
    from .continual import available_methods

    config["stream"] = named_section(config["stream"], "stream", allowed=sorted(STREAMS))
    config["methods"] = method_list(config["methods"], "methods", tuple(available_methods()))
    for i, method in enumerate(config["methods"]):
        check_method_options(method, f"methods[{i}]")
    config["training"] = check_training(config.get("training", {}), config["adapter"])
    config["orders"] = check_orders(config.get("orders"), config["stream"])
    check_stream_and_model(config)
    for order in config["orders"] or [None]:
        options = config["stream"]["options"] if order is None else {**config["stream"]["options"], "tasks": order}
        check_stream_options({**config["stream"], "options": options})
    if config["model"]["name"] in DIGITS_MODEL_NAMES:
        check_digits_model(config["model"])
    task_aware = config["stream"]["options"].get("task_incremental") or config["stream"]["options"].get("task_labels")
    if config["adapter"] and config["adapter"]["name"] == "clr" and not task_aware:
        raise ConfigError("adapter 'clr' routes by task id: the stream needs task ids "
                          "(stream.options.task_incremental: true, or task_labels: true)")
    return config


def check_orders(orders: Any, stream: dict) -> list | None:
    """``orders:`` (cl_benchmark streams): several task orders, each a list of task names or a preset
    (``order1`` …); every (method, order, seed) is one run and the report aggregates over all of them."""
    if orders is None:
        return None
    if stream["name"] != "cl_benchmark":
        raise ConfigError(f"orders: task orders are for the cl_benchmark stream, not {stream['name']!r}")
    if not isinstance(orders, list) or not orders:
        raise ConfigError(f"orders must be a non-empty list of task lists or presets, got {orders!r}")
    for k, order in enumerate(orders):
        ok = isinstance(order, str) or (isinstance(order, list) and order and all(isinstance(t, str) for t in order))
        if not ok:
            raise ConfigError(f"orders[{k}] must be a preset name or a list of task names, got {order!r}")
    if "tasks" in stream["options"]:
        raise ConfigError("give the tasks either as stream.options.tasks or as orders:, not both")
    return orders


def check_stream_and_model(config: dict) -> None:
    """Text streams train a Hugging Face model; the digits streams a digits model."""
    stream, model = config["stream"], config["model"]
    text = stream["name"] in TEXT_STREAMS
    if text and model["name"] not in HF_MODELS:
        raise ConfigError(f"stream {stream['name']!r} is text: model.name must be one of {list(HF_MODELS)} "
                          f"(a Hugging Face model), got {model['name']!r}")
    if not text and model["name"] in HF_MODELS:
        raise ConfigError(f"stream {stream['name']!r} holds digits images: model.name must be one of "
                          f"{sorted(DIGITS_MODEL_NAMES)}, got {model['name']!r}")
    if not text and any(k in config["training"] for k in TEXT_TRAINING_KEYS):
        raise ConfigError(f"training keys {list(TEXT_TRAINING_KEYS)} are for text streams only")
    if stream["name"] == "cl_benchmark":
        options = stream["options"]
        if "folder" not in options or ("tasks" not in options and not config.get("orders")):
            raise ConfigError("stream cl_benchmark needs stream.options.folder (the CL_Benchmark folder) and "
                              "stream.options.tasks (names or a preset); e.g. stream.options.folder=../shared/data/"
                              "cl_benchmark")
        if not Path(options["folder"]).is_dir():
            raise ConfigError(f"stream.options.folder: {options['folder']!r} is not a folder")
    if model["name"] == "hf":
        path = model["options"].get("path")
        if not isinstance(path, str) or not Path(path).is_dir():
            raise ConfigError(f"model hf needs model.options.path, a local Hugging Face model folder; got {path!r}")
        check_keys(model["options"], {"path", "auto_class"}, "model.options")
        auto = model["options"].get("auto_class", "AutoModel")
        if auto not in AUTO_CLASSES:
            raise ConfigError(f"model.options.auto_class must be one of {list(AUTO_CLASSES)}, got {auto!r}")


def training_keys() -> tuple[str, ...]:
    """The keys a ``training:`` section may hold: ``RunConfig``'s plain settings but the seed."""
    from .continual.config import SCALAR_KEYS

    return tuple(k for k in SCALAR_KEYS if k not in NOT_TRAINING_KEYS)


def check_training(section: Any, adapter: dict | None) -> dict:
    """Check a ``training:`` section with :class:`lifelong.continual.config.RunConfig`, which
    validates every run setting; its errors become ``ConfigError`` naming ``training.<key>``."""
    from dataclasses import fields

    from .continual.config import RunConfig

    if not isinstance(section, dict):
        raise ConfigError(f"training must be a mapping, got {section!r}")
    check_keys(section, set(training_keys()), "training")
    annotations = {f.name: f.type for f in fields(RunConfig)}
    for key, value in section.items():
        check_annotated_type(f"training.{key}", value, annotations[key])
    try:
        RunConfig(**section, adapter=adapter["name"] if adapter else None,
                  adapter_options=adapter["options"] if adapter else {})
    except (TypeError, ValueError) as err:
        message = str(err)
        named = message.split(" ", 1)[0].split("=", 1)[0] in section
        raise ConfigError(f"training.{message}" if named else f"training: {message}") from err
    return dict(section)


def check_annotated_type(where: str, value: Any, annotation: Any) -> None:
    """``value`` is of the plain type a dataclass field is annotated with (``int``, ``float``,
    ``bool``, ``str``, optionally ``| None``); other annotations are left to the dataclass."""
    text = str(annotation)
    optional = text.endswith(" | None")
    expected = {"int": int, "float": float, "bool": bool, "str": str}.get(text.removesuffix(" | None"))
    if expected is None or (optional and value is None):
        return
    if not is_of_type(value, expected):
        raise ConfigError(f"{where} must be {expected.__name__}{' or null' if optional else ''}, got {value!r}")


def is_of_type(value: Any, expected: type) -> bool:
    """YAML's reading of ``expected``: a bool is only a bool, an int is a float too."""
    if expected is bool:
        return isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected) and not isinstance(value, bool)


def check_stream_options(stream: dict) -> None:
    """The stream's options are parameters of its builder, and building it works (a quick dry
    run: the digits streams take milliseconds), so a bad value fails before anything is written."""
    builder = _streams()[stream["name"]]
    check_options(builder, stream["options"], "stream.options")
    try:
        builder(**stream["options"])
    except (TypeError, ValueError, OSError) as err:
        raise ConfigError(f"stream {stream['name']!r}: {err}") from err


def check_digits_model(model: dict) -> None:
    """A digits model's options are known (``hidden``, ``channels``, ``classes``) and positive integers."""
    from .models import DIGITS_MODELS

    check_options(DIGITS_MODELS[model["name"]], model["options"], "model.options")
    for key, value in model["options"].items():
        checked(positive_int, f"model.options.{key}", value)


def checked(check: Callable[..., None], *args: Any) -> None:
    """Run a :mod:`lifelong.checks` check, its ``ValueError`` becoming a ``ConfigError``."""
    try:
        check(*args)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def validate_federated(config: dict) -> dict:
    from . import federated as fl

    config["data"] = named_section(config.get("data", {"name": "digits"}), "data", allowed=["digits"])
    check_data(config["data"]["options"])
    config["algorithms"] = method_list(config["algorithms"], "algorithms", tuple(ALGORITHMS))
    config["federation"] = typed_section(config.get("federation", {}), FEDERATION_KEYS, "federation")
    for key, value in config["federation"].items():
        checked(positive_int, f"federation.{key}", value)
    for key, table in (("partition", PARTITIONS), ("participation", PARTICIPATIONS), ("local_steps", LOCAL_STEPS)):
        if config.get(key) is not None:
            config[key] = named_section(config[key], key, allowed=sorted(table))
            dry_build(table, config[key], key)
    for spec in config["algorithms"]:
        dry_build(ALGORITHMS, spec, f"algorithms ({spec['label']})")
    if config.get("speed") is not None:
        check_options(fl.Speed, config["speed"], "speed")
        try:
            fl.Speed(**config["speed"])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"speed: {err}") from err
    if config["model"]["name"] not in DIGITS_MODEL_NAMES:
        raise ConfigError(f"model.name must be one of {list(DIGITS_MODEL_NAMES)} for a federation of digits, "
                          f"got {config['model']['name']!r}")
    check_digits_model(config["model"])
    return config


def check_data(options: dict) -> None:
    """``data.options`` of the digits: ``seed`` (an integer >= 0) and ``test_size`` in (0, 1)."""
    check_options(digits_datasets, options, "data.options")
    if "seed" in options:
        checked(non_negative_int, "data.options.seed", options["seed"])
    size = options.get("test_size", 0.3)
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 < size < 1:
        raise ConfigError(f"data.options.test_size must be a number in (0, 1), got {size!r}")


def dry_build(table: dict[str, str], section: dict, where: str) -> None:
    """Build the federated object ``section`` names once, so that bad options fail now."""
    try:
        build(table, section, where)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def check_keys(section: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def check_seeds(seeds: Any) -> list[int]:
    """An integer >= 0 or a non-empty list of distinct ones (a repeated seed would count one run twice)."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                          for s in seeds):
        raise ConfigError(f"seeds must be an integer >= 0 or a non-empty list of them, got {seeds!r}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"seeds must be distinct (each seed is one run), got {seeds!r}: {repeated} repeated")
    return seeds


def named_section(value: Any, where: str, allowed: list[str] | None = None) -> dict:
    """``name`` or ``{name: ..., options: {...}}`` -> ``{"name": ..., "options": {...}}``."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ConfigError(f"{where} must be a name or a mapping with a 'name' key, got {value!r}")
    check_keys(value, {"name", "options", "label"}, where)
    if allowed is not None and value["name"] not in allowed:
        raise ConfigError(f"{where}.name: unknown {value['name']!r}; allowed: {allowed}")
    options = value.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where}.options must be a mapping, got {options!r}")
    return {"name": value["name"], "options": options, "label": value.get("label", value["name"])}


def check_method_options(method: dict, where: str) -> None:
    """A registered method's options make a valid config (built once, as run_stream will)."""
    from .continual.registry import method_class

    try:
        method_class(method["name"])(**method["options"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where} ({method['name']}).options: {err}") from err


def method_list(value: Any, where: str, allowed: tuple[str, ...]) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of names or {{name, options}} mappings")
    methods = [named_section(v, f"{where}[{i}]", allowed=sorted(allowed)) for i, v in enumerate(value)]
    labels = [m["label"] for m in methods]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: repeated entries need distinct 'label's, got {labels}")
    return methods


def typed_section(section: Any, types: dict[str, type], where: str) -> dict:
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping, got {section!r}")
    check_keys(section, set(types), where)
    for key, value in section.items():
        if not is_of_type(value, types[key]):
            raise ConfigError(f"{where}.{key} must be {types[key].__name__}, got {value!r}")
    return dict(section)


def check_options(target: Callable, options: dict, where: str) -> None:
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    check_keys(options, set(params) - {"self"}, where)


# ---- building the pieces ------------------------------------------------------------------------

def _streams() -> dict[str, Callable]:
    from .continual import cl_benchmark, permuted_digits, rotated_digits, split_digits, stdlib_stream

    return {"split_digits": split_digits, "permuted_digits": permuted_digits, "rotated_digits": rotated_digits,
            "stdlib_text": stdlib_stream, "cl_benchmark": cl_benchmark}


TEXT_STREAMS = ("stdlib_text", "cl_benchmark")
STREAMS = ("split_digits", "permuted_digits", "rotated_digits", *TEXT_STREAMS)
HF_MODELS = ("minilm", "hf")
DIGITS_MODEL_NAMES = ("mlp", "cnn")
AUTO_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification")
ALGORITHMS = {"afa-cd": "AFACD", "afa-cs": "AFACS", "fedavg": "FedAvg", "fedbuff": "FedBuff", "mifa": "MIFA"}
PARTITIONS = {"iid": "IID", "dirichlet": "Dirichlet", "shards": "Shards", "classes": "ClassesPerWorker"}
PARTICIPATIONS = {"bernoulli": "Bernoulli", "markov": "MarkovOnOff", "periodic": "Periodic"}
LOCAL_STEPS = {"fixed": "FixedSteps", "uniform": "UniformSteps", "budget": "TimeBudget"}


def build(table: dict[str, str], section: dict, where: str) -> Any:
    from . import federated as fl

    cls = getattr(fl, table[section["name"]])
    check_options(cls, section["options"], f"{where}.options")
    return cls(**section["options"])


def build_hf_model(config: dict):
    """The Hugging Face model and tokenizer of a text config (the shipped MiniLM or a local folder)."""
    import transformers

    from .models import load_minilm

    if config["model"]["name"] == "minilm":
        return load_minilm()
    options = config["model"]["options"]
    auto = getattr(transformers, options.get("auto_class", "AutoModel"))
    return auto.from_pretrained(options["path"]), transformers.AutoTokenizer.from_pretrained(options["path"])


def build_model(config: dict, seed: int):
    from .models import digits_model

    check_options(lambda hidden=0, channels=0, classes=0: None, config["model"]["options"], "model.options")
    return digits_model(config["model"]["name"], seed, **config["model"]["options"])


def digits_datasets(seed: int = 0, test_size: float = 0.3):
    """The shipped digits as (train, test) TensorDatasets, split with ``seed``."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch.utils.data import TensorDataset

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=test_size, random_state=seed, stratify=digits.target)
    return TensorDataset(x[idx_train], y[idx_train]), TensorDataset(x[idx_test], y[idx_test])


# ---- running cells ------------------------------------------------------------------------------

@dataclass
class Cell:
    label: str
    seed: int
    spec: dict
    order: int | None = None  # index into the config's orders (None: the stream's own tasks)

    @property
    def key(self) -> str:
        middle = "" if self.order is None else f"__order{self.order}"
        return f"{self.label}{middle}__seed{self.seed}"


def cells_of(config: dict) -> list[Cell]:
    methods = config["methods"] if config["kind"] == "continual" else config["algorithms"]
    orders = list(range(len(config["orders"]))) if config.get("orders") else [None]
    return [Cell(m["label"], seed, m, order) for m in methods for order in orders for seed in config["seeds"]]


def stream_options(config: dict, cell: Cell) -> dict:
    """The stream's options for ``cell`` (its task order when the config has ``orders``)."""
    options = dict(config["stream"]["options"])
    if cell.order is not None:
        options["tasks"] = config["orders"][cell.order]
    return options


def run_continual_cell(config: dict, cell: Cell, workdir: Path | None, progress: bool = False) -> dict:
    from .continual import run_stream

    stream = _streams()[config["stream"]["name"]](**stream_options(config, cell))
    text = {}
    if config["stream"]["name"] in TEXT_STREAMS:
        model, text["tokenizer"] = build_hf_model(config)
    else:
        model = build_model(config, cell.seed)
    adapter = config["adapter"]
    training = dict(config["training"])
    if training.get("tensorboard") and workdir is not None:  # one event folder per cell, under the output
        training["tensorboard"] = str(workdir.parent.parent / training["tensorboard"] / cell.key)
    result = run_stream(
        model, stream, method=cell.spec["name"], method_options=cell.spec["options"],
        adapter=adapter["name"] if adapter else None, adapter_options=adapter["options"] if adapter else None,
        seed=cell.seed, checkpoint_dir=None if workdir is None else str(workdir), resume=workdir is not None,
        progress=progress, **training, **text,
    )
    out = result.to_dict()
    out["metrics"]["wall_time_s"] = result.wall_time_s
    out["task_names"] = stream_task_names(stream)
    return out


def stream_task_names(stream: Any) -> list[str]:
    """What the report calls each task: a text stream's task names, else the classes of each
    experience (``classes 0, 1``), numbered when every experience has the same classes (permuted
    or rotated digits)."""
    from .continual.streams import experience_classes

    if hasattr(stream, "names"):
        return list(stream.names)
    classes = [sorted(int(c) for c in experience_classes(exp)) for exp in stream.train_stream]
    if all(c == classes[0] for c in classes):
        return [f"task {i + 1}" for i in range(len(classes))]
    return [f"classes {c[0]}–{c[-1]}" if len(c) > 3 and c == list(range(c[0], c[-1] + 1))
            else "classes " + ", ".join(map(str, c)) for c in classes]


def run_federated_cell(config: dict, cell: Cell, workdir: Path | None, progress: bool = False) -> dict:
    import lifelong
    from . import federated as fl

    train, test = digits_datasets(**config["data"]["options"])
    model = build_model(config, cell.seed)
    if config["adapter"]:
        model = lifelong.wrap(model, config["adapter"]["name"], **config["adapter"]["options"])
    fed = {"num_workers": 20, "steps": 50, **config["federation"]}
    optional = {key: build(table, config[key], key) for key, table in
                (("partition", PARTITIONS), ("participation", PARTICIPATIONS), ("local_steps", LOCAL_STEPS))
                if config.get(key) is not None}
    if config.get("speed") is not None:
        optional["speed"] = fl.Speed(**config["speed"])
    algorithm = build(ALGORITHMS, cell.spec, f"algorithm {cell.label}")
    start = time.perf_counter()
    result = fl.simulate(model, train, algorithm, test_data=test, seed=cell.seed, progress=progress,
                         checkpoint=None if workdir is None else workdir / "checkpoint.pt", **fed, **optional)
    out = result.to_dict()
    accuracies = [h["accuracy"] for h in result.history if h.get("accuracy") is not None]
    out["metrics"] = {
        "final_accuracy": result.final_accuracy, "best_accuracy": max(accuracies) if accuracies else None,
        "uplink_mb": result.history[-1]["uplink_bytes"] / 2**20 if result.history else 0.0,
        "dropped_stale": result.dropped_stale, "participation_gini": result.participation_gini,
        "wall_time_s": time.perf_counter() - start,
    }
    return out


RUNNERS = {"continual": run_continual_cell, "federated": run_federated_cell}


LOCK = ".lock"


def check_output(output: Path) -> None:
    """The output is a folder (created if needed) where files can be written."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output {str(output)!r} exists and is not a folder")
    try:
        check_writable(output)
    except OSError as err:
        raise ConfigError(f"output {str(output)!r} is not writable ({err.strerror}); "
                          "pick another --output") from err


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold ``<output>/.lock`` (created with ``O_EXCL``, holding this process's id and host) while
    a run writes there: a second run on the same folder is refused with a ``ConfigError``. A lock
    left by a process of this host that is gone (killed) is taken over with a warning."""
    path = output / LOCK
    if not _create_lock(path):
        holder = _lock_holder(path)
        if not _stale(holder):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            raise ConfigError(f"output {str(output)!r} is in use by another lifelong run (process "
                              f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since {since}); wait for it "
                              f"to finish or pick another --output (if no such run is alive, delete {str(path)!r})")
        warnings.warn(f"{str(path)!r} was left by process {holder['pid']}, which is gone; taking it over",
                      RuntimeWarning, stacklevel=3)
        path.unlink(missing_ok=True)
        if not _create_lock(path):
            raise ConfigError(f"output {str(output)!r} is in use by another lifelong run that started just now; "
                              "pick another --output")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _create_lock(path: Path) -> bool:
    """Create the lock file exclusively; False when it exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, file)
    return True


def _lock_holder(path: Path) -> dict:
    """What the lock file says about its holder (empty when it cannot be read)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict) -> bool:
    """The holder ran on this host and its process is gone."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def prepare_output(output: Path, config: dict, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding another run unless asked to resume it (same config) or overwrite."""
    marker = output / "run.json"
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text(encoding="utf-8"))
            previous_fingerprint = previous["fingerprint"]
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
            if not overwrite:
                raise ConfigError(f"output {str(output)!r}: {marker.name} is empty or corrupt, so the run it "
                                  "holds cannot be recognised; pass --overwrite to replace it") from err
            previous_fingerprint = None
        if overwrite:
            for name in ("cells", "results.json", "report.md", "run.json"):
                target = output / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            for png in output.glob("*.png"):
                png.unlink()
        elif not resume:
            raise ConfigError(f"output {str(output)!r} holds results of a run already; pass --resume to continue "
                              "it or --overwrite to replace it")
        elif previous_fingerprint != fingerprint(config):
            raise ConfigError(f"--resume: output {str(output)!r} holds a run of another configuration; "
                              "use another --output or --overwrite")
    elif any(p.name != LOCK for p in output.iterdir()) and not overwrite:
        raise ConfigError(f"output {str(output)!r} is not empty and holds no lifelong run; pick an empty folder")
    (output / "cells").mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(marker), json_text({"fingerprint": fingerprint(config), "config": config}, indent=2))


def run_experiment(config: dict, output: str | Path, *, resume: bool = False, overwrite: bool = False,
                   progress: bool = True, stop_after: int | None = None) -> dict:
    """Run every cell not finished yet, then write the report. ``stop_after`` (tests) stops the
    run after that many newly computed cells, as an interruption would."""
    output = Path(output)
    check_output(output)
    with output_lock(output):
        prepare_output(output, config, resume, overwrite)
        return run_cells(output, config, progress, stop_after)


def run_cells(output: Path, config: dict, progress: bool, stop_after: int | None) -> dict:
    """Compute the cells not finished yet (``stop_after``: see :func:`run_experiment`), then write the report."""
    from tqdm.auto import tqdm

    cells = cells_of(config)
    computed = 0
    bar = tqdm(cells, desc=config["name"], unit="cell", disable=not progress)
    finished = []
    for cell in bar:
        path = output / "cells" / f"{cell.key}.json"
        if path.is_file():
            try:
                record = load_cell(path)
                if record["label"] != cell.label or record["seed"] != cell.seed or record.get("order") != cell.order:
                    raise CorruptCell(f"cell file {str(path)!r} holds {record['label']!r} seed {record['seed']!r}")
            except CorruptCell as err:
                warnings.warn(f"{err}; recomputing cell {cell.key}", RuntimeWarning, stacklevel=2)
            else:
                finished.append(record)
                continue
        if stop_after is not None and computed >= stop_after:
            raise KeyboardInterrupt(f"stopped after {computed} cells (stop_after)")
        bar.set_postfix_str(cell.key)
        workdir = output / "cells" / f"{cell.key}.work"
        workdir.mkdir(exist_ok=True)
        result = RUNNERS[config["kind"]](config, cell, workdir, progress=progress)
        record = {"label": cell.label, "seed": cell.seed, "order": cell.order, "result": result}
        text = json_text(record)
        atomic_write_text(str(path), text)
        finished.append(json.loads(text))  # as a resumed run reads it back
        shutil.rmtree(workdir, ignore_errors=True)
        computed += 1
    return write_report(output, config, finished)
