"""Test doubles for the Flower bridge (`lifelong.federated.flower`), kept out of the library.

* `DirectGrid` — a Flower ``Grid`` that runs a ClientApp in this process, one call per
  message, without Ray: tests step through AFA-CD / AFA-CS on Flower's Message API with it.
* `PartitionedData` — a picklable ``data_fn`` for `FlowerWorker` (Ray ships the ClientApp to
  its actors by pickling, so functions defined in a test module cannot be used there).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from lifelong.federated.flower import ensure_task_identity


class PartitionedData:
    """A picklable ``data_fn`` for `FlowerWorker`: partition p gets ``inputs[parts[p]]``.

    Ray ships the ClientApp to its actors by pickling, so functions defined in a script
    or a test module cannot be used there; instances of this class can.
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, parts: list[np.ndarray]):
        self.inputs, self.labels, self.parts = inputs, labels, [np.array(p) for p in parts]

    def __call__(self, partition: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
        if num_partitions != len(self.parts):
            raise ValueError(f"the federation has {num_partitions} nodes but the data was split "
                             f"into {len(self.parts)} partitions")
        idx = torch.from_numpy(self.parts[partition])
        return self.inputs[idx], self.labels[idx]


class DirectGrid(Grid):
    """A Grid that runs a ClientApp in this process, one call per message, without Ray.

    For tests and for stepping through the bridge in a debugger. ``delays`` (node →
    number of pulls a reply waits) lets a test make some nodes slower than others.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, *, run_config: dict | None = None,
                 delays: Mapping[int, int] | None = None):
        ensure_task_identity()
        self.client_app = client_app
        # 64-bit unsigned ids on both sides of 2**63, like Flower's random node ids
        self.node_ids = [(12345 + i * (2**62 + 7919)) % 2**64 for i in range(num_nodes)]
        self.contexts = {nid: Context(run_id=1, node_id=nid,
                                      node_config={"partition-id": i, "num-partitions": num_nodes},
                                      state=RecordDict(), run_config=dict(run_config or {}))
                         for i, nid in enumerate(self.node_ids)}
        self.delays = dict(delays or {})
        self._pending: dict[str, tuple[int, Message]] = {}
        self._counter = 0

    def set_run(self, run) -> None:  # noqa: ANN001 - part of the Grid interface
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return getattr(self, "_run", None)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self._counter += 1
            mid = f"msg-{self._counter}"
            msg.metadata.__dict__["_message_id"] = mid   # what the in-memory grid does
            node = msg.metadata.dst_node_id
            reply = self.client_app(msg, self.contexts[node])
            self._pending[mid] = (self.delays.get(self.node_ids.index(node), 0), reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for mid in list(message_ids):
            if mid not in self._pending:
                continue
            wait, reply = self._pending[mid]
            if wait > 0:
                self._pending[mid] = (wait - 1, reply)
                continue
            del self._pending[mid]
            out.append(reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        replies: list[Message] = []
        while ids:
            got = list(self.pull_messages(ids))
            replies.extend(got)
            done = {r.metadata.reply_to_message_id for r in got}
            ids = [i for i in ids if i not in done]
        return replies
