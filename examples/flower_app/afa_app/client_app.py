"""ClientApp: the AFA worker procedure (worker-chosen participation and local steps)."""
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from lifelong.federated.flower import FlowerWorker

from .task import task

app = ClientApp()
_workers: dict[tuple, FlowerWorker] = {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    key = tuple(sorted((k, str(v)) for k, v in cfg.items()))
    if key not in _workers:   # one per process and run config; it caches each partition's model and data
        model_fn, data_fn, _ = task(cfg)
        _workers[key] = FlowerWorker(model_fn, data_fn, participation=float(cfg["participation"]),
                                     seed=int(cfg["seed"]), batch_size=int(cfg.get("batch-size", 32)))
    return _workers[key](msg, context)
