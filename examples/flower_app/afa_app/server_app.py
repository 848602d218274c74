"""ServerApp: AFA-CD / AFA-CS from lifelong.federated, round-based or event-driven."""
import json

from flwr.app import Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

import lifelong.federated as fl
from lifelong.federated.flower import AFAStrategy, params_to_record, record_to_params, run_async

from .task import task

app = ServerApp()


def _server(cfg: dict) -> fl.Server:
    common = dict(local_lr=float(cfg["local-lr"]), server_lr=float(cfg["server-lr"]),
                  max_staleness=int(cfg["max-staleness"]))
    if cfg["algorithm"] == "afa_cd":
        return fl.AFACD(buffer_size=int(cfg["buffer-size"]), **common)
    if cfg["algorithm"] == "afa_cs":   # η derived from the federation (stable when slots refresh in rotation)
        return fl.AFACS(local_lr=common["local_lr"], max_staleness=common["max_staleness"])
    raise ValueError(f"algorithm must be 'afa_cd' or 'afa_cs', got {cfg['algorithm']!r}")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    steps, server = int(cfg["num-server-steps"]), _server(cfg)
    model_fn, _, test_fn = task(cfg)
    model = model_fn()
    x0 = fl.trainable_params(model)
    x_test, y_test = test_fn()
    evaluator = fl.LocalTrainer(model, x_test, y_test)

    def _accuracy(params) -> float:
        return evaluator.evaluate(params, x_test, y_test)[0]

    num_workers = len(list(grid.get_node_ids()))
    if cfg["mode"] == "round":
        strategy = AFAStrategy(server, num_workers=num_workers,
                               max_local_steps=int(cfg["max-local-steps"]), seed=int(cfg["seed"]))
        strategy.start(grid, params_to_record(x0), num_rounds=steps,
                       evaluate_fn=lambda rnd, arrays: MetricRecord(
                           {"accuracy": _accuracy(record_to_params(arrays))}))
        # the server object holds the authoritative global model
        summary = {"mode": "round", "rounds": steps, "steps": server.version,
                   "staleness": dict(sorted(server.stats["staleness_consumed"].items())),
                   "accuracy": _accuracy(server.params)}
    else:
        server.init(x0, num_workers)
        out = run_async(grid, server, num_steps=steps, concurrency=int(cfg["concurrency"]),
                        max_local_steps=int(cfg["max-local-steps"]), poll_interval=0.05,
                        evaluate_fn=lambda step, params: _accuracy(params),
                        eval_every=int(cfg["eval-every"]), min_nodes=num_workers)
        summary = {"mode": "async", **out, "accuracy": _accuracy(server.params)}
    summary["algorithm"] = cfg["algorithm"]
    summary["task"] = str(cfg.get("task", "agnews"))
    summary["upload-bytes"] = fl.nbytes(x0)
    summary["nodes"] = num_workers
    print("AFA-RESULT " + json.dumps(summary, default=str))
