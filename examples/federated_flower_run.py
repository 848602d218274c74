"""Run the AFA Flower app (examples/flower_app) with `flwr run` on Flower's local simulation engine.

    python examples/federated_flower_run.py --mode async --algorithm afa_cs --supernodes 4 [--task digits]

The default task fine-tunes a LoRA adapter on the pretrained MiniLM over AG News (only the
adapter and head tensors travel); ``--task digits`` runs softmax regression in seconds.

`flwr run` starts a detached local SuperLink (Ray backend) that outlives the command;
this script gives Flower its own FLWR_HOME, runs the app inside the
current environment (no per-run dependency installation), streams the logs, and at
the end stops exactly the processes that carry its FLWR_HOME — never anything else.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = Path(__file__).resolve().parent / "flower_app"


def processes_with_env(marker: str) -> list[int]:
    """PIDs of our own processes whose environment contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    time.sleep(2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["async", "round"], default="async")
    parser.add_argument("--algorithm", choices=["afa_cd", "afa_cs"], default="afa_cs")
    parser.add_argument("--supernodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--task", choices=["agnews", "digits"], default="agnews")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    flwr = Path(sys.executable).with_name("flwr")
    with tempfile.TemporaryDirectory(prefix="lifelong-flwr-") as home:
        env = {**os.environ, "FLWR_HOME": home, "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "PATH": f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        cmd = [str(flwr), "run", str(APP), "local", "--stream",
               "--federation-config", f"num-supernodes={args.supernodes}",
               "--run-config", f'mode="{args.mode}" algorithm="{args.algorithm}" task="{args.task}" '
                               f"num-server-steps={args.steps}" + (" local-lr=0.1" if args.task == "digits" else "")]
        print("$", " ".join(cmd), flush=True)
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            print(f"flwr run did not finish within {args.timeout:.0f} s", file=sys.stderr)
            code = 124
        finally:
            leftovers = processes_with_env(f"FLWR_HOME={home}")
            if leftovers:
                print(f"stopping the local SuperLink processes {leftovers}", flush=True)
                stop(leftovers)
    return code


if __name__ == "__main__":
    sys.exit(main())
