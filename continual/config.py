"""``RunConfig``: the settings of one continual run, validated once.

``run_stream(model, stream, method, **settings)`` builds a :class:`RunConfig` from its keywords,
and the ``training:`` section of a ``lifelong run`` YAML config is checked against the same
dataclass (its keys are this dataclass's plain-valued fields), so a setting is named, typed and
checked in one place. ``validate`` only looks: it never converts or rewrites a value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

from ..checks import non_negative_int, one_of, positive_int, positive_number
from .registry import ALL_ENGINES, ALL_MODES

__all__ = ["RunConfig", "ENGINES", "ADAPTER_MODES", "OPTIMIZERS", "ROUTES", "TASK_INFERENCE", "SCALAR_KEYS"]

ENGINES = ("auto", *ALL_ENGINES)
ADAPTER_MODES = tuple(mode for mode in ALL_MODES if mode != "none")
OPTIMIZERS = ("sgd", "adam", "adamw")
ROUTES = ("auto", "head", "verbalizer")
TASK_INFERENCE = ("prototype", "confidence")
PRECISIONS = ("fp32", "bf16")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")


@dataclass
class RunConfig:
    """Every setting of ``run_stream`` except the model, the stream, the method and live objects
    (tokenizer, criterion).

    Attributes:
        adapter: a registry adapter name (``lifelong.available()``), a factory
            ``callable(model, experience_index) -> model`` (sequential mode, e.g. a PEFT
            ``get_peft_model`` call), or None (every parameter trains).
        adapter_options: keyword options of the registry adapter.
        adapter_mode: ``shared`` | ``per_task`` | ``sequential`` | ``incremental`` (None: ``shared``).
        task_inference: per-task adapters without the task id at test time: ``prototype`` or
            ``confidence`` (None: the task id routes, an oracle outside task-incremental streams).
        calibration_samples: inputs of earlier experiences that calibrate a sequential adapter.
        engine: ``auto`` | ``native`` | ``avalanche`` | ``trainer``.
        optimizer: ``sgd`` | ``adam`` | ``adamw`` or a callable ``params -> Optimizer``.
        epochs, lr, batch_size, eval_batch_size, seed: the training loop's settings.
        device: where the model trains (``"cpu"``, ``"cuda"``, a ``torch.device``).
        checkpoint_dir, resume: checkpoint after every experience; ``resume`` continues from it.
        progress: show a tqdm bar.
        max_length, template, route: text streams only (tokenizer length, ``"{task}: {text}"``-style
            template, classification head or verbalizer).
        forward_transfer: also evaluate before training and on future experiences (FWT).
        training_args: ``TrainingArguments`` overrides for ``engine="trainer"``.
        tensorboard: a folder for TensorBoard event files of each experience's metrics, or None.
        precision: ``fp32``, or ``bf16`` (``torch.autocast`` around forward passes; adapters keep
            fp32 weights; on CPUs with AVX512-BF16 or AMX this is faster).
        length_buckets: batch text samples of similar length (less padding; text streams only).
        compile: ``torch.compile`` the model's forward (inductor). On text streams each batch is cut to
            its longest sample, so the graph recompiles per width: measured 0.22× the eager speed on
            MiniLM here; it pays only for fixed-shape (tensor) inputs.
        fsdp: under several processes, shard the model with FSDP2 (``fully_shard`` on every block of
            layers and on the backbone): for models too large for one device. Shared adapters or none.
    """

    adapter: Any = None
    adapter_options: dict | None = None
    adapter_mode: str | None = None
    task_inference: str | None = None
    calibration_samples: int = 256
    engine: str = "auto"
    optimizer: Any = "sgd"
    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 32
    eval_batch_size: int = 512
    seed: int = 0
    device: Any = "cpu"
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = True
    max_length: int = 128
    template: str = "{text}"
    route: str = "auto"
    forward_transfer: bool = True
    training_args: dict | None = None
    tensorboard: str | None = None
    precision: str = "fp32"
    length_buckets: bool = False
    compile: bool = False
    fsdp: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "calibration_samples"):
            positive_int(name, getattr(self, name))
        positive_int("max_length (tokens per sequence)", self.max_length)
        non_negative_int("seed", self.seed)
        positive_number("lr", self.lr)
        one_of("precision", self.precision, PRECISIONS)
        for name in ("resume", "progress", "forward_transfer", "length_buckets", "compile", "fsdp"):
            _boolean(name, getattr(self, name))
        one_of("engine", self.engine, ENGINES)
        one_of("route", self.route, ROUTES)
        if self.adapter_mode is not None:
            one_of("adapter_mode", self.adapter_mode, ADAPTER_MODES)
        if self.task_inference is not None:
            one_of("task_inference", self.task_inference, TASK_INFERENCE)
        if not callable(self.optimizer):
            one_of("optimizer", self.optimizer, OPTIMIZERS)
        if not (self.adapter is None or isinstance(self.adapter, str) or callable(self.adapter)):
            raise ValueError(f"adapter must be a registry name, a factory callable(model, experience) -> model or "
                             f"None, got {type(self.adapter).__name__}")
        if self.adapter_options is not None and not isinstance(self.adapter_options, dict):
            raise ValueError(f"adapter_options must be a dict or None, got {type(self.adapter_options).__name__}")
        if self.adapter_options and self.adapter is None:
            raise ValueError("adapter_options are given but no adapter= is set")
        _text("template", self.template)
        if "{text}" not in self.template:
            raise ValueError(f"template must contain '{{text}}' (and may contain '{{task}}'), got {self.template!r}")
        for name in ("checkpoint_dir", "tensorboard"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, bytes)) and not hasattr(value, "__fspath__"):
                raise ValueError(f"{name} must be a folder path or None, got {value!r}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        if self.training_args is not None and self.engine != "trainer":
            raise ValueError("training_args are for engine='trainer'")
        if self.adapter is None and self.adapter_mode not in (None, "shared"):
            raise ValueError(f"adapter_mode={self.adapter_mode!r} needs adapter=<registry name> (or a factory)")
        if self.fsdp and (self.engine == "avalanche" or self.mode not in (None, "shared") or self.compile):
            raise ValueError("fsdp=True shards a fixed set of tensors: it runs with engine 'native' or 'trainer', "
                             f"no adapter or a shared one, and without compile (got engine={self.engine!r}, "
                             f"adapter_mode={self.mode!r}, compile={self.compile})")
        if self.task_inference is not None and self.adapter_mode != "per_task":
            raise ValueError(f"task_inference={self.task_inference!r} routes between per-task adapters: it needs "
                             f"adapter_mode='per_task', got adapter_mode={self.adapter_mode!r}")

    @property
    def mode(self) -> str | None:
        """The adapter mode in force: None without an adapter, else ``adapter_mode`` or ``shared``."""
        if self.adapter is None:
            return None
        return self.adapter_mode or ("sequential" if callable(self.adapter) else "shared")

    def describe(self) -> dict:
        """The settings as JSON-like values (a callable by its name): what a checkpoint fingerprints."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("progress", "checkpoint_dir", "resume", "tensorboard", "device"):
                continue
            out[f.name] = _name_of(value) if callable(value) else value
        return out


def _name_of(value: Callable) -> str:
    return getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or type(value).__name__


#: the settings a YAML config's ``training:`` section may hold (plain values, not objects)
SCALAR_KEYS = tuple(f.name for f in fields(RunConfig)
                    if f.name not in ("adapter", "adapter_options", "device", "checkpoint_dir", "resume",
                                      "progress", "training_args"))
