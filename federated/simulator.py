"""In-process anarchic federation on a virtual clock.

A discrete-event simulator: a priority queue of events ordered by (virtual time,
sequence number). When worker i starts a job it downloads ``(t, x_t)``, picks its
K, and its update is computed *eagerly* on the single shared model (it depends
only on x_t, the worker's data and the job's seed); the upload is delivered at
``start + duration_i``. Staleness, arrival order and participation therefore
emerge from the participation model and the speed heterogeneity, never from
wall-clock time, and every random decision is drawn from a stream keyed by
(seed, worker, job) — the same seed gives bit-identical results, with or without
a checkpoint/resume in between.

Synchronous servers (`FedAvg`, `MIFA`) run in rounds instead: the available
workers are drawn from the participation model at the round's start, train on
the current model, and the round lasts as long as its slowest member.

By default a worker starts its next job as soon as one lands and jobs waiting for a
free slot are served first-in first-out, so busy workers refresh in a near-fixed
rotation; `Restarts` adds random waits or a random service order to tell an effect
of that arrival process from an effect of the algorithm.

Faults never hang or abort a run: a job whose ``loss_fn`` or model raises counts as a
failed job (like a failed client in Flower), and a run in which ``max_stall`` events
(rounds, for synchronous servers) pass without a server step stops with
`FederationStalled` naming the reasons (every upload rejected, MIFA waiting for a
device that never delivers, ...), or with a warning and ``stopped_early`` when
``on_stall="stop"``.

A worker is only its data indices, a job counter and a seed, so 1,000 workers
cost one model copy plus the in-flight updates.
"""
from __future__ import annotations

import heapq
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..files import digest, fingerprint as config_fingerprint
from ..checks import non_negative_int, one_of, optional, positive_int
from .heterogeneity import Faults, FixedSteps, LocalSteps, Restarts, Speed
from .params import Params, nbytes, tensor_digest, trainable_params
from .participation import Bernoulli, Participation
from .partition import IID, Partitioner, label_histograms
from ..checkpoint import CheckpointError, load as load_checkpoint, save as save_checkpoint
from .result import SimulationResult
from .server import Server, Update
from .adapter import check_adapter_trainable
from .worker import LocalTrainer, WorkerCrash, dataset_tensors, forward, num_samples, take

_JOB_SEED, _COHORT = 31, 32
_START, _ARRIVE = 0, 1
_MAX_ERRORS = 10   # distinct job error messages kept for the result
STALL_POLICIES = ("raise", "stop")


class FederationStalled(RuntimeError):
    """No server step for ``max_stall`` events (or rounds): the run cannot make progress."""


def default_max_stall(num_workers: int) -> int:
    """Events (rounds for synchronous servers) without a server step before a run is stopped:
    ``100 + 10·M``. A healthy run needs about 2 events per upload, and a step at most a
    buffer of uploads; MIFA's warm-up needs about ``(M/cohort)·ln M`` rounds."""
    return 100 + 10 * num_workers


def _job_seed(seed: int, worker: int, job: int) -> int:
    return int(np.random.SeedSequence([seed, _JOB_SEED, worker, job]).generate_state(1)[0])


@dataclass
class _Job:
    worker: int
    job: int
    base_version: int
    steps: int
    delta: Params | None   # None: the worker crashed, nothing arrives


class _Federation:
    """All mutable state of one simulation; `state_dict` captures it for resume."""

    def __init__(self, server: Server, trainer: LocalTrainer, parts: list[np.ndarray], *,
                 participation: Participation, local_steps: LocalSteps, speed: Speed,
                 faults: Faults | None, max_concurrent: int | None, seed: int,
                 record_arrivals: bool, restarts: Restarts | None = None):
        self.server, self.trainer, self.parts = server, trainer, parts
        self.participation, self.local_steps, self.speed, self.faults = (
            participation, local_steps, speed, faults)
        self.restarts = restarts if restarts is not None else Restarts()
        self.max_concurrent, self.seed, self.record_arrivals = max_concurrent, seed, record_arrivals
        m = server.num_workers
        self.time = 0.0
        self.seq = 0
        self.round = 0
        self.queue: list[tuple[float, int, int, int]] = []   # (time, seq, kind, worker)
        self.inflight: dict[int, _Job] = {}                  # seq of the arrival -> job
        self.jobs = [0] * m
        self.waiting: deque[int] = deque()
        self.busy = 0
        self.counters = {"uplink_bytes": 0, "downlink_bytes": 0, "local_steps": 0, "crashed": 0, "failed": 0}
        self.errors: list[str] = []   # distinct messages of failed jobs (the first few)
        self.stall = 0                # events (or rounds) since the last server step
        self.accepted = [0] * m
        self.history: list[dict] = []
        self.arrivals: list[dict] = []
        self._cache: tuple[int, Params] | None = None

    # -- jobs -------------------------------------------------------------------------------
    def global_params(self) -> Params:
        if self._cache is None or self._cache[0] != self.server.version:
            self._cache = (self.server.version, self.server.params)
        return self._cache[1]

    def run_job(self, worker: int) -> tuple[_Job, float]:
        """Download x_t, train, and return the job and its virtual duration."""
        job = self.jobs[worker]
        self.jobs[worker] += 1
        steps = self.local_steps.steps(worker, job)
        fault, crash_at = self.faults.draw(worker, job, steps) if self.faults else (None, 0)
        spec = self.server.spec
        self.counters["downlink_bytes"] += spec.nbytes
        delta: Params | None
        try:
            delta, _ = self.trainer.run(self.global_params(), self.parts[worker], steps,
                                        self.server.local_lr, _job_seed(self.seed, worker, job),
                                        crash_after=crash_at if fault == "crash" else None)
            self.counters["local_steps"] += steps
        except WorkerCrash:
            delta = None   # counted now; the server only notices that nothing arrives
            self.counters["local_steps"] += crash_at
            self.counters["crashed"] += 1
        except Exception as err:  # noqa: BLE001 - a worker's failure must not end the federation
            delta = None   # a failed job, as Flower counts a failed client
            self.counters["failed"] += 1
            message = f"worker {worker} job {job}: {type(err).__name__}: {err}"
            if len(self.errors) < _MAX_ERRORS and not any(m.split(": ", 1)[1] == message.split(": ", 1)[1]
                                                          for m in self.errors):
                self.errors.append(message)
        if delta is not None and fault in ("nan", "inf", "shape", "huge"):
            delta = Faults.corrupt(delta, fault)
        up = nbytes(delta) if delta is not None else 0
        duration = self.speed.duration(worker, job, steps, spec.nbytes, up)
        return _Job(worker, job, self.server.version, steps, delta), duration

    def deliver(self, job: _Job) -> bool:
        """Hand an arrived job to the server; True when the server stepped."""
        if job.delta is None:
            self._log(job, "crashed", None)
            return False
        self.counters["uplink_bytes"] += nbytes(job.delta)
        stats = self.server.stats
        before = (stats["accepted"], stats["dropped_stale"])
        tau = self.server.version - job.base_version
        stepped = self.server.submit(Update(job.worker, job.delta, job.base_version, job.steps,
                                            len(self.parts[job.worker])))
        if stats["accepted"] > before[0]:
            self.accepted[job.worker] += 1
            status = "accepted"
        else:
            status = "dropped_stale" if stats["dropped_stale"] > before[1] else "rejected"
        self._log(job, status, tau)
        return stepped

    def _log(self, job: _Job, status: str, tau: int | None) -> None:
        if self.record_arrivals:
            self.arrivals.append({"time": self.time, "worker": job.worker, "job": job.job,
                                  "base_version": job.base_version, "staleness": tau,
                                  "local_steps": job.steps, "status": status})

    # -- event-driven engine ----------------------------------------------------------------
    def push(self, time: float, kind: int, worker: int) -> int:
        self.seq += 1
        heapq.heappush(self.queue, (time, self.seq, kind, worker))
        return self.seq

    def schedule_next(self, worker: int) -> None:
        job = self.jobs[worker]
        t = self.participation.next_start(worker, self.time + self.restarts.wait(worker, job), job)
        if t is not None:
            self.push(t, _START, worker)

    def start(self, worker: int) -> None:
        if self.max_concurrent is not None and self.busy >= self.max_concurrent:
            self.waiting.append(worker)
            return
        job, duration = self.run_job(worker)
        self.busy += 1
        seq = self.push(self.time + duration, _ARRIVE, worker)
        self.inflight[seq] = job

    def event(self) -> bool:
        """Process the next event; True when the server took a step. Raises IndexError when idle."""
        time, seq, kind, worker = heapq.heappop(self.queue)
        self.time = max(self.time, time)
        if kind == _START:
            self.start(worker)
            return False
        job = self.inflight.pop(seq)
        self.busy -= 1
        stepped = self.deliver(job)
        self.schedule_next(worker)
        while self.waiting and (self.max_concurrent is None or self.busy < self.max_concurrent):
            pick = self.restarts.pick(len(self.waiting), self.seq)
            self.waiting.rotate(-pick)
            chosen = self.waiting.popleft()
            self.waiting.rotate(pick)
            self.start(chosen)
        return stepped

    # -- round-based engine -----------------------------------------------------------------
    def round_step(self, cohort_size: int | None) -> bool:
        """One synchronous round; True when the server took a step."""
        available = np.flatnonzero(self.participation.available_mask(self.time, self.round))
        if cohort_size is not None and len(available) > cohort_size:
            rng = np.random.default_rng([self.seed, _COHORT, self.round])
            available = np.sort(rng.choice(available, cohort_size, replace=False))
        self.round += 1
        jobs = [self.run_job(int(w)) for w in available]
        self.time += max((d for _, d in jobs), default=_idle_interval(self.participation))
        for job, _ in jobs:
            self.deliver(job)
        return self.server.flush()

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "time": self.time, "seq": self.seq, "round": self.round,
            "queue": [list(e) for e in self.queue],
            "inflight": {seq: _job_state(j) for seq, j in self.inflight.items()},
            "jobs": list(self.jobs), "waiting": list(self.waiting), "busy": self.busy,
            "counters": dict(self.counters), "accepted": list(self.accepted),
            "history": list(self.history), "arrivals": list(self.arrivals),
            "server": self.server.state_dict(), "errors": list(self.errors), "stall": self.stall,
        }

    def load_state_dict(self, state: dict) -> None:
        self.time, self.seq, self.round = float(state["time"]), int(state["seq"]), int(state["round"])
        self.queue = [(float(t), int(s), int(k), int(w)) for t, s, k, w in state["queue"]]
        heapq.heapify(self.queue)
        self.inflight = {int(seq): _Job(**j) for seq, j in state["inflight"].items()}
        self.jobs = [int(j) for j in state["jobs"]]
        self.waiting = deque(int(w) for w in state["waiting"])
        self.busy = int(state["busy"])
        self.counters = {"failed": 0, **state["counters"]}
        self.errors = list(state.get("errors", []))
        self.stall = int(state.get("stall", 0))
        self.accepted = [int(a) for a in state["accepted"]]
        self.history = list(state["history"])
        self.arrivals = list(state["arrivals"])
        self.server.load_state_dict(state["server"])


def _job_state(job: _Job) -> dict:
    return {"worker": job.worker, "job": job.job, "base_version": job.base_version,
            "steps": job.steps, "delta": job.delta}


def _idle_interval(participation: Participation) -> float:
    return participation.interval if isinstance(participation, Bernoulli) else 1.0


def _labels_of(labels: torch.Tensor) -> np.ndarray:
    if labels.dtype.is_floating_point or labels.ndim != 1:
        raise ValueError("partitioning needs integer class labels of shape (N,), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    return labels.cpu().numpy()


def _check_parts(parts: list[np.ndarray], num_workers: int, partition: Partitioner, n: int) -> None:
    """Every worker must hold data: name the empty ones before any work is done."""
    if len(parts) != num_workers:
        raise ValueError(f"{partition.describe()['kind']} returned {len(parts)} parts for {num_workers} workers")
    empty = [w for w, p in enumerate(parts) if len(p) == 0]
    if empty:
        names = ", ".join(map(str, empty[:10])) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise ValueError(f"the partition {partition.describe()['kind']} leaves worker(s) {names} of "
                         f"{num_workers} with no data; every worker needs at least one sample (raise the "
                         "Dirichlet alpha or min_size, or use fewer workers)")
    bad = [w for w, p in enumerate(parts) if len(p) and (int(np.min(p)) < 0 or int(np.max(p)) >= n)]
    if bad:
        raise ValueError(f"the partition gives worker {bad[0]} sample indices outside 0..{n - 1}")


def _check_head(model: nn.Module, inputs, labels: torch.Tensor, test_y: torch.Tensor,
                first: np.ndarray) -> None:
    """One forward pass before the first step: the model must score every class of the data."""
    num_classes = int(max(int(labels.max()), int(test_y.max()))) + 1
    if int(min(int(labels.min()), int(test_y.min()))) < 0:
        raise ValueError("labels must be class ids >= 0")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = forward(model, take(inputs, torch.from_numpy(np.asarray(first[:2]))))
    finally:
        model.train(was_training)
    if out.dim() != 2 or out.shape[1] < num_classes:
        raise ValueError(f"the model's head does not fit the label space: it returns scores of shape "
                         f"{tuple(out.shape)} for a batch, but the labels name {num_classes} classes "
                         f"(0..{num_classes - 1}); give it a head with {num_classes} outputs")


def _groups_of(eval_groups, test_y: torch.Tensor) -> np.ndarray | None:
    if eval_groups is None:
        return None
    if isinstance(eval_groups, str):
        if eval_groups != "labels":
            raise ValueError(f"eval_groups must be None, 'labels' or one group id per test sample, got {eval_groups!r}")
        return test_y.cpu().numpy()
    groups = np.asarray(eval_groups)
    if groups.shape != (len(test_y),) or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"eval_groups needs one integer group id per test sample ({len(test_y)}), "
                         f"got shape {groups.shape} and dtype {groups.dtype}")
    return groups


def simulate(
    model: nn.Module,
    train_data: Dataset,
    algorithm: Server,
    *,
    num_workers: int,
    steps: int,
    test_data: Dataset | None = None,
    partition: Partitioner = IID(),
    participation: Participation | None = None,
    local_steps: LocalSteps | None = None,
    speed: Speed | None = None,
    faults: Faults | None = None,
    max_concurrent: int | None = None,
    batch_size: int = 32,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    eval_every: int = 10,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    max_time: float | None = None,
    record_arrivals: bool = False,
    progress: bool = True,
    eval_groups: str | np.ndarray | list[int] | None = None,
    eval_batch_size: int = 1024,
    restarts: Restarts | None = None,
    max_stall: int | None = None,
    on_stall: str = "raise",
) -> SimulationResult:
    """Run ``steps`` server steps of ``algorithm`` with ``num_workers`` anarchic workers.

    Only ``model``'s trainable parameters are federated (wrap it with ``lifelong.wrap``
    to federate an adapter); the model itself is used as the single worker instance
    and ends holding the final global parameters. ``checkpoint`` names a file that is
    written every ``checkpoint_every`` server steps (default: ``eval_every``) and
    resumed from when it exists and matches this configuration.

    Inputs may be tensors, the packed ``(N, 2, L)`` token tensors of a text stream
    (`lifelong.federated.text.text_data`) or dicts of tensors (tokenized Hugging Face
    batches); the model must return class scores (a tensor or an output with ``.logits``).
    Before any work the run checks that every worker holds data, that the model's head
    scores every class of the labels, and that an adapter on the model has trainable
    tensors. ``eval_groups`` (``"labels"``, or a group id per test sample such as its
    task) adds the accuracy of each group to every evaluation (``group_accuracy``).

    ``restarts`` (`Restarts`) randomises how workers restart (a jittered wait, a random
    service order of waiting jobs). A job whose model or ``loss_fn`` raises is a failed job
    (``result.failed``, its message in ``result.errors``). After ``max_stall`` events (rounds
    for synchronous servers) without a server step (default `default_max_stall`:
    ``100 + 10·num_workers``) the run raises `FederationStalled` with the reasons, or with
    ``on_stall="stop"`` warns and returns with ``stopped_early=True``.
    """
    positive_int("num_workers", num_workers)
    non_negative_int("steps", steps)
    positive_int("eval_every", eval_every)
    positive_int("eval_batch_size", eval_batch_size)
    optional(positive_int, "max_concurrent", max_concurrent)
    optional(positive_int, "checkpoint_every", checkpoint_every)
    optional(positive_int, "max_stall", max_stall)
    one_of("on_stall", on_stall, STALL_POLICIES)
    if restarts is not None and not isinstance(restarts, Restarts):
        raise ValueError(f"restarts must be a lifelong.federated.Restarts or None, got {restarts!r}")
    stall_limit = max_stall if max_stall is not None else default_max_stall(num_workers)
    participation = participation if participation is not None else Bernoulli(1.0)
    local_steps = local_steps if local_steps is not None else FixedSteps(5)
    speed = speed if speed is not None else Speed()

    inputs, labels = dataset_tensors(train_data)
    label_array = _labels_of(labels)
    if num_samples(inputs) != len(label_array):
        raise ValueError(f"the dataset has {num_samples(inputs)} inputs but {len(label_array)} labels")
    parts = partition.split(label_array, num_workers, seed)
    _check_parts(parts, num_workers, partition, len(label_array))
    test_x, test_y = dataset_tensors(test_data) if test_data is not None else (inputs, labels)
    groups = _groups_of(eval_groups, test_y)
    participation.bind(num_workers, seed)
    local_steps.bind(num_workers, seed, speed.bind(num_workers, seed))
    if faults is not None:
        faults.bind(num_workers, seed)
    if restarts is not None:
        restarts.bind(seed)

    x0 = trainable_params(model)
    check_adapter_trainable(model)
    _check_head(model, inputs, labels, test_y, parts[0])
    server = algorithm.init(x0, num_workers)
    trainer = LocalTrainer(model, inputs, labels, batch_size=batch_size, loss_fn=loss_fn)
    fed = _Federation(server, trainer, parts, participation=participation, local_steps=local_steps,
                      speed=speed, faults=faults, max_concurrent=max_concurrent, seed=seed,
                      record_arrivals=record_arrivals, restarts=restarts)
    config = {
        "algorithm": server.config(), "num_workers": num_workers, "seed": seed,
        "partition": partition.describe(), "participation": participation.describe(),
        "local_steps": local_steps.describe(), "speed": speed.describe(),
        "faults": faults.describe() if faults is not None else None,
        "max_concurrent": max_concurrent, "batch_size": batch_size,
        "loss_fn": getattr(loss_fn, "__name__", repr(loss_fn)), "eval_every": eval_every,
        "params": server.spec.describe(), "params_digest": tensor_digest(x0),
        "data": {"train": len(label_array), "labels_digest": digest(label_array.tobytes()),
                 "test": len(test_y)},
    }
    if groups is not None:   # only then: checkpoints of runs without groups keep their fingerprint
        config["eval_groups"] = digest(groups.astype(np.int64).tobytes())
    if restarts is not None and not restarts.is_default:   # likewise
        config["restarts"] = restarts.describe()
    fingerprint = config_fingerprint(config)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    every = checkpoint_every or eval_every

    def evaluate() -> None:
        hits, loss = trainer.predict(server.params, test_x, test_y, eval_batch_size)
        entry = {"step": server.version, "time": fed.time, **fed.counters,
                 "updates_received": server.stats["received"],
                 "updates_accepted": server.stats["accepted"],
                 "rejected": sum(server.stats["rejected"].values()),
                 "accuracy": float(hits.float().mean()), "loss": loss}
        if groups is not None:
            h = hits.cpu().numpy()
            entry["group_accuracy"] = {str(int(g)): float(h[groups == g].mean()) for g in np.unique(groups)}
        fed.history.append(entry)

    state = _read_checkpoint(ckpt) if ckpt is not None and ckpt.exists() else None
    if state is not None:
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"checkpoint {ckpt} was written by another configuration "
                             f"({_diff(state['config'], config)}); delete it or pass another path")
        fed.load_state_dict(state["sim"])
    else:
        _begin(fed, server, participation)
        evaluate()

    bar = tqdm(total=steps, initial=min(server.version, steps), disable=not progress,
               desc=server.name, unit="step")
    stopped_early = False
    while server.version < steps:
        if max_time is not None and fed.time >= max_time:
            stopped_early = True
            break
        if server.synchronous:
            if participation.exhausted(fed.time):
                stopped_early = True
                break
            stepped = fed.round_step(getattr(server.settings, "cohort_size", None))
        else:
            if not fed.queue:
                stopped_early = True   # nobody will ever upload again
                break
            stepped = fed.event()
        if not stepped:
            fed.stall += 1
            if fed.stall >= stall_limit:
                message = _stall_message(fed, server, stall_limit)
                if on_stall == "raise":
                    bar.close()
                    raise FederationStalled(message)
                warnings.warn(message + "; stopping (on_stall='stop')", RuntimeWarning, stacklevel=2)
                stopped_early = True
                break
            continue
        fed.stall = 0
        bar.update(1)
        if server.version % eval_every == 0 or server.version == steps:
            evaluate()
        if ckpt is not None and (server.version % every == 0 or server.version == steps):
            save_checkpoint(ckpt, {"fingerprint": fingerprint, "config": config,
                                   "sim": fed.state_dict()})
    bar.close()
    if fed.history[-1]["step"] != server.version:
        evaluate()
    trainer.load(server.params)
    stats = server.stats
    return SimulationResult(
        config=config, history=fed.history,
        staleness_histogram=dict(sorted(stats["staleness_consumed"].items())),
        staleness_at_arrival=dict(sorted(stats["staleness_arrival"].items())),
        participation=list(fed.accepted), jobs_started=list(fed.jobs),
        dropped_stale=stats["dropped_stale"], rejected=dict(stats["rejected"]),
        crashed=fed.counters["crashed"], steps=server.version, virtual_time=fed.time,
        stopped_early=stopped_early, label_histograms=label_histograms(label_array, parts),
        arrivals=fed.arrivals, final_params=server.params, failed=fed.counters["failed"],
        errors=list(fed.errors), slot_age_histogram=dict(sorted(stats.get("slot_age", {}).items())),
        kept_fresher_than_slot=int(stats.get("kept_fresher_than_slot", 0)),
        expired_slots=int(stats.get("expired_slots", 0)),
    )


def _stall_message(fed: _Federation, server: Server, limit: int) -> str:
    """Why a federation made no progress: what happened to the uploads since the last step."""
    stats = server.stats
    unit = "rounds" if server.synchronous else "events"
    parts = [f"{server.name}: no server step in {limit} {unit} (max_stall) at step {server.version}",
             f"uploads received {stats['received']}, accepted {stats['accepted']}, "
             f"dropped as stale {stats['dropped_stale']}, rejected {dict(stats['rejected'])}",
             f"jobs crashed {fed.counters['crashed']}, failed {fed.counters['failed']}"]
    if fed.errors:
        parts.append("first job error: " + fed.errors[0])
    note = server.stall_note()
    if note:
        parts.append(note)
    return "; ".join(parts)


def _begin(fed: _Federation, server: Server, participation: Participation) -> None:
    """Warm-start memory servers if asked, then schedule every worker's first job."""
    if server.needs_warm_start:
        jobs = [fed.run_job(w)[0] for w in range(server.num_workers)]
        server.warm_start(Update(j.worker, j.delta, j.base_version, j.steps, len(fed.parts[j.worker]))
                          for j in jobs if j.delta is not None)
        fed.counters["uplink_bytes"] += sum(nbytes(j.delta) for j in jobs if j.delta is not None)
    if not server.synchronous:
        for worker in range(server.num_workers):
            fed.schedule_next(worker)


def _read_checkpoint(path: Path) -> dict | None:
    """The checkpoint's state (:mod:`lifelong.checkpoint`: digest-checked, read without unpickling
    code), or None with a warning naming the file when it is empty or corrupt (an interrupted copy,
    a full disk): the run then starts over."""
    try:
        state = load_checkpoint(path)
        if not {"fingerprint", "config", "sim"} <= set(state):
            raise CheckpointError(path, "is not a simulation checkpoint")
    except CheckpointError as err:
        warnings.warn(f"checkpoint {str(path)!r} is empty or corrupt ({err}); starting the simulation over",
                      RuntimeWarning, stacklevel=3)
        return None
    return state


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "differs in: " + ", ".join(keys) if keys else "same settings, other code version"
