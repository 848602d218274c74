"""Every registered adapter under DistributedDataParallel: 2 gloo processes on the CPU train a
few steps on different data, rank 0 saves, every rank loads the checkpoint and checks it; then
bone and LaMDA under FSDP2 (``fully_shard``), saved from sharded DTensors.

The test launches this file as a script once per rank (``python test_ddp.py RANK WORLD PORT
OUT``); each rank writes its findings to ``OUT/rank<r>.json`` and the test reads them. LaMDA runs
past the step at which its schedule freezes B completely, which must not break DDP's reducer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORLD = 2
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_adapter_trains_saves_and_loads_under_ddp(tmp_path) -> None:
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(WORLD), port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(WORLD)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("DDP workers timed out:\n" + "\n".join(logs))
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-4000:] for log in logs)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    import lifelong as ll

    assert sorted(results[0]) == sorted([*ll.available(), "fsdp2"])
    for method in ll.available():
        found = results[0][method]
        assert found["moved"], f"{method}: training changed no adapter tensor"
        assert found["rank_diff"] == 0.0, f"{method}: the replicas diverged"
        for r in range(WORLD):
            assert results[r][method]["reload_diff"] <= 1e-6, f"{method}: rank {r} reload differs"
    assert results[0]["lamda"]["b_frozen"] and results[0]["lamda"]["b_in_graph"]
    for r in range(WORLD):
        assert set(results[r]["fsdp2"]) == {"bone", "lamda"} and max(results[r]["fsdp2"].values()) <= 1e-6


def worker(rank: int, world: int, port: str, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, str(HERE))
    from conftest import MODELS, run

    import lifelong as ll
    from lifelong.adapters import get_method

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    found = {}
    for method in ll.available():
        kind = "cnn" if method == "clr" else "mlp"
        spec, make = get_method(method), MODELS[kind].make
        base = make()
        options = dict(spec.adapter_cls.example_options(base, MODELS[kind].batches(2)))
        if "r" in {f.name for f in dataclasses.fields(spec.config_cls)}:
            options.setdefault("r", 4)
        if method == "lamda":
            options["total_steps"] = STEPS  # B is frozen for good after step 1
        adapted = ll.wrap(base, method, **options).train()
        start = {n: p.detach().clone() for n, p in adapted.named_trainable_parameters()}
        model = DDP(adapted)
        optimizer = torch.optim.SGD(adapted.trainable_parameters(), lr=0.05)
        for step in range(STEPS):
            batch = MODELS[kind].batches(1, seed=100 * rank + step + 10)[0]  # each rank its own data
            optimizer.zero_grad()
            run(model, batch).float().square().mean().backward()
            adapted.after_backward()
            optimizer.step()
            adapted.after_optimizer_step(optimizer)
        for buffer in adapted.buffers():  # BN statistics: DDP syncs them at the next forward; do it now
            dist.broadcast(buffer, 0)
        adapted.eval()
        probe = MODELS[kind].batches(1, seed=1)[0]
        with torch.no_grad():
            mine = run(adapted, probe)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        if rank == 0:
            adapted.save_pretrained(out / method)
        dist.barrier()
        reloaded = ll.load(make(), out / method).eval()
        with torch.no_grad():
            reload_diff = float((run(reloaded, probe) - mine).abs().max())
        now = dict(adapted.named_parameters())
        found[method] = {
            "moved": any(not torch.equal(now[n], p) for n, p in start.items()),
            "rank_diff": max(float((g - gathered[0]).abs().max()) for g in gathered),
            "reload_diff": reload_diff,
        }
        if method == "lamda":
            layers = [layer.adapters["default"] for layer in adapted.adapted_layers()]
            found[method]["b_frozen"] = all(bool(a.frozen_columns.all()) for a in layers)
            found[method]["b_in_graph"] = all(a.lora_B.requires_grad for a in layers)
    found["fsdp2"] = fsdp2_round_trip(rank, world, out, MODELS, run)
    (out / f"rank{rank}.json").write_text(json.dumps(found))
    dist.barrier()
    dist.destroy_process_group()


def fsdp2_round_trip(rank: int, world: int, out: Path, models: dict, run) -> dict:
    """FSDP2 (``fully_shard``, parameters become DTensors): train, save from every rank (the shards
    are gathered, rank 0 writes), load on every rank and compare with the sharded model."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lifelong as ll

    found = {}
    for method, options in (("bone", {"r": 4}), ("lamda", {"r": 4, "total_steps": STEPS})):
        adapted = ll.wrap(models["mlp"].make(), method, **options)
        fully_shard(adapted, mesh=init_device_mesh("cpu", (world,)))
        optimizer = torch.optim.SGD(adapted.trainable_parameters(), lr=0.05)
        for step in range(STEPS):
            optimizer.zero_grad()
            run(adapted, models["mlp"].batches(1, seed=100 * rank + step)[0]).square().mean().backward()
            adapted.after_backward()
            optimizer.step()
            adapted.after_optimizer_step(optimizer)
        adapted.save_pretrained(out / f"fsdp-{method}", is_main_process=rank == 0)
        dist.barrier()
        probe = models["mlp"].batches(1, seed=1)[0]
        reloaded = ll.load(models["mlp"].make(), out / f"fsdp-{method}")
        with torch.no_grad():
            found[method] = float((run(reloaded, probe) - run(adapted, probe)).abs().max())
    return found


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
