"""ClientApp: the AFA worker procedure (worker-chosen participation and local steps)."""
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from lifelong.federated.flower import FlowerWorker

from .task import data_fn, model_fn

app = ClientApp()
_workers: dict[tuple, FlowerWorker] = {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    key = (float(cfg["participation"]), int(cfg["seed"]))
    if key not in _workers:   # one per process; it caches each partition's model and data
        _workers[key] = FlowerWorker(model_fn, data_fn, participation=key[0], seed=key[1])
    return _workers[key](msg, context)
