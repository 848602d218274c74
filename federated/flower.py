"""Flower bridge: AFA-CD / AFA-CS (or any lifelong server) on Flower 1.42's Message API.

Needs the optional extra ``lifelong[federated]`` (``flwr[simulation]>=1.42,<1.43``);
importing ``lifelong.federated`` never imports ``flwr``, only this module does.
The algorithm math stays in the framework-free servers (`AFACD`, `AFACS`, ...);
this module only moves their tensors through Flower, in one of two ways:

* `AFAStrategy` — a `flwr.serverapp.strategy.Strategy` for ``Strategy.start``:
  the round-based approximation. Each round sampled nodes get the current
  trainable arrays and ``model-version``; every node decides whether to take part
  and how many local steps to run, and replies with its normalised update G.
  All updates of a round are computed on the same model, so there is no delay.
* `run_async` — the event-driven main loop for ``@app.main()``, faithful
  to AFA: nodes are kept busy, every reply is handed to the server with its own
  staleness as soon as it is pulled, and freed nodes get the newest model.
  Staleness then depends on real scheduling and is not reproducible; use
  `lifelong.federated.simulate` for reproducible experiments.
* `FlowerWorker` / `make_client_app` — the ClientApp side: the worker procedure of
  AFA (Yang et al., ICML 2022, Algorithm 1) with worker-chosen participation and K.

Only trainable tensors travel (ArrayRecord keys = the trainable parameter names);
replies are named ``"update"`` so a stock strategy can never mistake a gradient for
model weights (stock strategies average whatever comes back under ``"arrays"``).
"""
from __future__ import annotations

import time
from logging import INFO
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from ..checks import fraction, non_negative_int, optional, positive_int
from .params import Params, nbytes
from .server import Server, Update
from .simulator import FederationStalled, default_max_stall
from .worker import LocalTrainer

ARRAYS, UPDATE, CONFIG, METRICS = "arrays", "update", "config", "metrics"
_PARTICIPATE, _STEPS, _SAMPLE = 41, 42, 43


def params_to_record(params: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in params.items()})


def record_to_params(record: ArrayRecord) -> Params:
    return dict(record.to_torch_state_dict())


def ensure_task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 0) -> None:
    """Flower 1.42 needs a task identity to build a Message outside its runtime (tests, scripts)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # other Flower versions do not have (or need) it
        return
    for name, value in (("run_id", run_id), ("node_id", node_id), ("task_id", task_id)):
        if getattr(TaskIdentity, f"_{name}", None) is None:
            setattr(TaskIdentity, name, value)


def train_message(server: Server, node_id: int, max_local_steps: int, server_round: int = 0) -> Message:
    """One train instruction carrying x_t (trainable tensors only) and its version."""
    config = ConfigRecord({"server-round": server_round, "model-version": server.version,
                           "local-lr": server.local_lr, "max-local-steps": max_local_steps})
    content = RecordDict({ARRAYS: params_to_record(server.params), CONFIG: config})
    return Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def reply_to_update(reply: Message) -> Update | None:
    """The `Update` a reply carries, or None for an error reply or a node that declined.

    Raises ``ValueError`` for a reply whose metrics cannot form an `Update` (missing keys,
    ``local-steps < 1``, negative counts); the loops below count it as a rejected upload.
    """
    if reply.has_error():
        return None
    metrics = reply.content[METRICS]
    try:
        if int(metrics["participated"]) == 0:
            return None
        return Update(worker=int(metrics["partition-id"]), delta=record_to_params(reply.content[UPDATE]),
                      base_version=int(metrics["model-version"]), local_steps=int(metrics["local-steps"]),
                      num_examples=int(metrics["num-examples"]))
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed reply: {type(err).__name__}: {err}") from err


def _update_or_reject(reply: Message, server: Server) -> Update | None:
    """`reply_to_update`, with a malformed reply counted by the server as rejected (``"malformed"``)."""
    try:
        return reply_to_update(reply)
    except ValueError:
        server.stats["received"] += 1
        server.reject("malformed")
        return None


class FlowerWorker:
    """ClientApp train handler: decide, train K steps, reply with G = (x_s − y_K)/(η_L·K).

    ``model_fn()`` builds the model (its trainable params are what the server sends);
    ``data_fn(partition_id, num_partitions)`` returns the node's ``(inputs, labels)``.
    The node joins a round with probability ``participation`` and draws its own K
    uniformly in ``1..max-local-steps``, from streams seeded by
    (seed, partition-id, model-version, job counter kept in ``context.state``).
    """

    def __init__(self, model_fn: Callable[[], nn.Module],
                 data_fn: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], *,
                 batch_size: int = 32, participation: float = 1.0, seed: int = 0,
                 loss_fn: Callable = F.cross_entropy):
        if not 0 <= participation <= 1:
            raise ValueError(f"participation must be in [0, 1], got {participation!r}")
        self.model_fn, self.data_fn = model_fn, data_fn
        self.batch_size, self.participation, self.seed, self.loss_fn = (
            batch_size, participation, seed, loss_fn)
        self._trainers: dict[int, LocalTrainer] = {}

    def _trainer(self, partition: int, num_partitions: int) -> LocalTrainer:
        # one model per partition served by this process (Ray reuses actors across nodes)
        if partition not in self._trainers:
            inputs, labels = self.data_fn(partition, num_partitions)
            self._trainers[partition] = LocalTrainer(self.model_fn(), inputs, labels,
                                                     batch_size=self.batch_size, loss_fn=self.loss_fn)
        return self._trainers[partition]

    def __call__(self, msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
        config = msg.content[CONFIG]
        version = int(config["model-version"])
        state = context.state.config_records.get("afa", ConfigRecord({"jobs": 0}))
        job = int(state["jobs"])
        state["jobs"] = job + 1
        context.state.config_records["afa"] = state
        key = [self.seed, partition, version, job]
        trainer = self._trainer(partition, num_partitions)
        metrics = {"partition-id": partition, "model-version": version,
                   "num-examples": len(trainer.labels)}
        if np.random.default_rng([_PARTICIPATE, *key]).random() >= self.participation:
            content = RecordDict({UPDATE: ArrayRecord(), METRICS: MetricRecord(
                {**metrics, "participated": 0, "local-steps": 0, "train-loss": 0.0})})
            return Message(content=content, reply_to=msg)
        steps = int(np.random.default_rng([_STEPS, *key]).integers(1, int(config["max-local-steps"]) + 1))
        base = record_to_params(msg.content[ARRAYS])
        seed = int(np.random.SeedSequence(key).generate_state(1)[0])
        delta, loss = trainer.run(base, np.arange(len(trainer.labels)), steps,
                                  float(config["local-lr"]), seed)
        content = RecordDict({UPDATE: params_to_record(delta), METRICS: MetricRecord(
            {**metrics, "participated": 1, "local-steps": steps, "train-loss": loss})})
        return Message(content=content, reply_to=msg)


def make_client_app(worker: FlowerWorker) -> ClientApp:
    app = ClientApp()
    app.train()(worker)
    return app


class AFAStrategy(Strategy):
    """Round-based AFA on ``Strategy.start`` (Flower's synchronous round loop).

    ``server`` is any lifelong server (`AFACD`, `AFACS`, `FedAvg`, ...); it is
    initialised from the first round's arrays. A round's replies are submitted in
    node order; synchronous servers are flushed at the end of the round. The round
    returns the new trainable arrays when the server stepped, else None (the global
    model stays).
    """

    def __init__(self, server: Server, *, num_workers: int, fraction_train: float = 1.0,
                 min_train_nodes: int = 1, max_local_steps: int = 5, seed: int = 0):
        fraction("fraction_train", fraction_train, open_low=True)
        positive_int("min_train_nodes", min_train_nodes)
        positive_int("max_local_steps", max_local_steps)
        positive_int("num_workers", num_workers)
        self.server, self.num_workers = server, num_workers
        self.fraction_train, self.min_train_nodes = fraction_train, min_train_nodes
        self.max_local_steps, self.seed = max_local_steps, seed
        self.uplink_bytes = 0

    def summary(self) -> None:
        log(INFO, "\t├── lifelong server: %s", self.server.config() if self.server.spec
            else type(self.server).__name__)
        log(INFO, "\t└── workers: %s, fraction_train: %s, max_local_steps: %s",
            self.num_workers, self.fraction_train, self.max_local_steps)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.server.spec is None:
            self.server.init(record_to_params(arrays), self.num_workers)
        nodes = sorted(grid.get_node_ids())
        size = min(len(nodes), max(self.min_train_nodes, int(len(nodes) * self.fraction_train)))
        # pick positions, not ids: node ids are 64-bit unsigned and numpy would round them
        picks = np.random.default_rng([_SAMPLE, self.seed, server_round]).choice(
            len(nodes), size, replace=False)
        return [train_message(self.server, nodes[i], self.max_local_steps, server_round)
                for i in sorted(picks.tolist())]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        version = self.server.version
        updates = [u for u in (_update_or_reject(r, self.server) for r in replies) if u is not None]
        for update in updates:
            self.uplink_bytes += nbytes(update.delta)
            self.server.submit(update)
        if self.server.synchronous:
            self.server.flush()
        stats = self.server.stats
        metrics = MetricRecord({
            "updates": len(updates), "model-version": self.server.version,
            "mean-local-steps": float(np.mean([u.local_steps for u in updates])) if updates else 0.0,
            "dropped-stale": stats["dropped_stale"], "rejected": sum(stats["rejected"].values()),
            "uplink-bytes": self.uplink_bytes,
        })
        stepped = self.server.version > version
        return (params_to_record(self.server.params) if stepped else None), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []   # evaluate centrally with Strategy.start(evaluate_fn=...)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def run_async(grid: Grid, server: Server, *, num_steps: int, concurrency: int,
              max_local_steps: int = 5, poll_interval: float = 0.05,
              evaluate_fn: Callable[[int, Params], float] | None = None, eval_every: int = 10,
              timeout: float | None = None, min_nodes: int = 1, max_stall: int | None = None) -> dict:
    """Event-driven AFA main loop for ``@app.main()`` (Flower's Grid ``push_messages``/``pull_messages``).

    ``server`` must be initialised. Keeps up to ``concurrency`` nodes training; each
    reply is submitted as soon as it is pulled (staleness = version now − version
    sent), and the freed node is re-dispatched with the newest model. Stops after
    ``num_steps`` server steps or ``timeout`` seconds. Returns a summary dict. When
    ``max_stall`` replies in a row (default ``100 + 10·nodes``, as the simulator) bring no
    server step — every upload rejected, every node failing — it raises `FederationStalled`.
    """
    if server.spec is None:
        raise RuntimeError("initialise the server first: server.init(params, num_workers)")
    positive_int("concurrency", concurrency)
    non_negative_int("num_steps", num_steps)
    positive_int("max_local_steps", max_local_steps)
    positive_int("eval_every", eval_every)
    optional(positive_int, "max_stall", max_stall)
    start = time.monotonic()
    nodes: list[int] = []
    while len(nodes) < min_nodes:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < min_nodes:
            time.sleep(poll_interval)
    idle = list(nodes)
    in_flight: dict[str, int] = {}   # message id -> node id
    history: list[dict] = []
    stall_limit = max_stall if max_stall is not None else default_max_stall(len(nodes))
    stall = 0

    def dispatch() -> None:
        while idle and len(in_flight) < concurrency:
            node = idle.pop(0)
            for mid in grid.push_messages([train_message(server, node, max_local_steps)]):
                in_flight[mid] = node

    dispatch()
    while server.version < num_steps:
        if timeout is not None and time.monotonic() - start > timeout:
            break
        replies = list(grid.pull_messages(list(in_flight)))
        if not replies:
            time.sleep(poll_interval)
            continue
        for reply in replies:
            node = in_flight.pop(reply.metadata.reply_to_message_id)
            idle.append(node)
            update = _update_or_reject(reply, server)
            if server.version >= num_steps:
                continue   # the run is complete: nothing to submit
            if update is None or not server.submit(update):
                stall += 1   # declined, failed, rejected or waiting for more uploads
                if stall >= stall_limit:
                    raise FederationStalled(
                        f"{server.name}: no server step in {stall_limit} replies (max_stall) at step "
                        f"{server.version}; received {server.stats['received']}, accepted "
                        f"{server.stats['accepted']}, rejected {dict(server.stats['rejected'])}. "
                        + server.stall_note())
                continue
            stall = 0
            if evaluate_fn is not None and server.version % eval_every == 0:
                history.append({"step": server.version, "accuracy": evaluate_fn(server.version,
                                                                                server.params)})
        dispatch()
    return {"steps": server.version, "history": history, "seconds": time.monotonic() - start,
            "staleness": dict(sorted(server.stats["staleness_consumed"].items())),
            "dropped_stale": server.stats["dropped_stale"], "pending": len(in_flight)}
