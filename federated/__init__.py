"""Anarchic federated learning: AFA-CD, AFA-CS, baselines and an in-process simulator.

Servers work on dicts of trainable tensors (only those travel) and take their settings as
keywords or as a validated config dataclass (`AFACDConfig`, ...); `simulate` runs a
federation of anarchic workers on a virtual clock, on any torch model or a Hugging Face
transformer with an adapter (`lifelong.federated.text`: tokenized streams, partitions by label or
by task, the frozen-prefix cache that makes hundreds of MiniLM workers affordable on a CPU). The
Flower bridge lives in
`lifelong.federated.flower` and imports `flwr` only when that module is imported.
"""
from .adapter import adapter_bytes, check_adapter_trainable, federate_adapter
from .afa_cd import AFACD, AFACDConfig
from .afa_cs import AFACS, AFACSConfig, MemoryConfig, default_server_lr, rotation_bound
from .fedavg import FedAvg, FedAvgConfig
from .fedbuff import FedBuff, FedBuffConfig
from .heterogeneity import (Faults, FixedSteps, LocalSteps, PerWorkerSteps, Restarts, Speed, TimeBudget,
                            UniformSteps)
from .mifa import MIFA, MIFAConfig
from .params import ParamSpec, nbytes, trainable_params
from .participation import Bernoulli, MarkovOnOff, Participation, Periodic, Trace, label_correlated
from .partition import IID, ClassesPerWorker, Dirichlet, Partitioner, Shards, label_histograms
from .result import SimulationResult
from .server import Server, ServerConfig, Update, polynomial_staleness
from .simulator import FederationStalled, default_max_stall, simulate
from .text import ByTask, EncoderTail, TextData, encode_prefix, text_classifier, text_data
from .worker import LocalTrainer, WorkerCrash, dataset_tensors

__all__ = [
    "AFACD", "AFACS", "FedAvg", "FedBuff", "MIFA", "Server", "Update", "polynomial_staleness",
    "ServerConfig", "AFACDConfig", "AFACSConfig", "MemoryConfig", "FedAvgConfig", "FedBuffConfig", "MIFAConfig",
    "simulate", "SimulationResult", "FederationStalled", "default_max_stall", "Restarts",
    "rotation_bound", "default_server_lr", "LocalTrainer", "WorkerCrash", "dataset_tensors",
    "IID", "Dirichlet", "Shards", "ClassesPerWorker", "Partitioner", "label_histograms",
    "Bernoulli", "MarkovOnOff", "Periodic", "Trace", "Participation", "label_correlated",
    "FixedSteps", "UniformSteps", "PerWorkerSteps", "TimeBudget", "LocalSteps", "Speed", "Faults",
    "ParamSpec", "trainable_params", "nbytes", "adapter_bytes", "federate_adapter",
    "check_adapter_trainable", "ByTask", "TextData", "text_data", "text_classifier", "EncoderTail",
    "encode_prefix",
]
