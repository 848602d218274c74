"""run_stream under ``torchrun``: 2 gloo processes on the CPU train a short MiniLM text stream with a
registry adapter, for the Trainer engine and the native one.

The test launches this file with ``torchrun --nproc_per_node 2 test_distributed_stream.py ENGINE OUT``;
each rank writes its accuracy matrix and a digest of its trainable tensors to ``OUT/rank<r>.json``
and rank 0 saves ``result.model``. The test then checks the ranks agree, loads the saved model in
this (single) process with identical predictions, and compares with a single-process run of the
same global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORLD = 2
#: the stated tolerance against one process: the shards' losses are averaged as one global batch, so
#: only float summation order differs; one flipped test prediction moves an accuracy by 1/8
TOLERANCE = 0.126


def stream():
    import lifelong.continual as lc

    reviews = ["a wonderful film", "great acting and a fine story", "I loved every minute", "superb and moving",
               "a dull film", "terrible acting and a weak story", "I hated every minute", "boring and empty"]
    news = ["the team won the cup final", "a late goal decided the match", "the striker scored twice",
            "the coach praised the keeper", "the minister met leaders abroad", "elections were held in the capital",
            "the summit ended in talks", "parliament passed the budget"]
    return lc.text_stream([(reviews, ["Good"] * 4 + ["Bad"] * 4, reviews, ["Good"] * 4 + ["Bad"] * 4),
                           (news, ["Sports"] * 4 + ["World"] * 4, news, ["Sports"] * 4 + ["World"] * 4)],
                          names=["reviews", "news"])


def run(engine: str, checkpoint_dir: str | None = None, crash: bool = False, fsdp: bool = False):
    import lifelong.continual as lc
    from lifelong.models import load_minilm

    class RowCounter(lc.ContinualMethod):
        """Counts the training rows this process computes a loss on."""

        name = "rows"
        rows = 0

        def loss(self, ctx, loss):
            RowCounter.rows += len(ctx.targets)
            return loss

        def after_step(self, ctx):
            import torch.distributed as dist

            if crash and ctx.experience == 1 and dist.get_rank() == 1:
                os._exit(3)  # a process dies in the middle of the second experience

    model, tokenizer = load_minilm()
    methods = ["replay"] if fsdp else [lc.MIGU(start_task=0), RowCounter()]  # what shards (see the README)
    result = lc.run_stream(model, stream(), methods, tokenizer=tokenizer, fsdp=fsdp,
                         adapter="lora", adapter_options={"r": 4}, engine=engine, max_length=16, batch_size=8,
                         epochs=2, lr=3e-3, optimizer="adam", progress=False, checkpoint_dir=checkpoint_dir,
                         resume=checkpoint_dir is not None)
    result.rows = RowCounter.rows
    return result


def digest(module) -> str:
    """A hash of the trainable tensors (whole: a sharded one is gathered, which every process must call)."""
    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        if p.requires_grad:
            whole = p.full_tensor() if isinstance(p.data, DTensor) else p
            h.update(name.encode())
            h.update(whole.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def launch(engine: str, out: Path, mode: str = "") -> None:
    """``mode``: "" (plain), "crash" (rank 1 dies in the second experience) or "fsdp"."""
    crash = mode == "crash"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE)}
    args = [str(torchrun), "--standalone", f"--nproc_per_node={WORLD}", __file__, engine, str(out)]
    done = subprocess.run(args + ([mode] if mode else []), env=env, cwd=str(out), capture_output=True, text=True,
                          timeout=400)
    if crash:
        assert done.returncode != 0 and not (out / "rank0.json").exists(), "the crashed run did not stop"
    else:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["native", "trainer"])
def test_torchrun_replicas_agree_and_the_saved_model_loads_in_one_process(engine, tmp_path):
    import torch

    import lifelong.continual as lc
    from lifelong.models import load_minilm

    launch(engine, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["matrix"] == ranks[1]["matrix"]  # the gathered evaluation: one accuracy matrix
    assert ranks[0]["digest"] == ranks[1]["digest"]  # the replicas hold the same trained tensors
    assert ranks[0]["world"] == ranks[1]["world"] == WORLD
    assert (tmp_path / "model" / "continual_model.json").is_file() and not (tmp_path / "model1").exists()
    base, _ = load_minilm()
    loaded = lc.load_model(base, tmp_path / "model")
    texts = stream().tasks[1].test_texts
    assert loaded.predict(texts, task=1).tolist() == ranks[0]["predictions"]
    single = run(engine)
    diff = max(abs(a - b) for row_a, row_b in zip(single.accuracy_matrix, ranks[0]["matrix"])
               for a, b in zip(row_a, row_b) if a == a and b == b)
    assert diff <= TOLERANCE, (single.accuracy_matrix, ranks[0]["matrix"])
    assert single.train_steps == ranks[0]["steps"]  # the same global batches
    assert single.rows == 2 * 16 and ranks[0]["rows"] == ranks[1]["rows"] == 16  # each process: half of each
    torch.testing.assert_close(loaded.logits(texts, task=1).isfinite().float(),
                               single.model.logits(texts, task=1).isfinite().float())


@pytest.mark.slow
def test_a_killed_process_restarts_every_rank_from_the_last_checkpoint(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    launch("native", tmp_path / "a")
    launch("native", tmp_path / "b", mode="crash")
    assert (tmp_path / "b" / "ckpt" / "checkpoint.pt").is_file()  # written after the first experience
    launch("native", tmp_path / "b")  # the same command again: every rank resumes from it
    for r in range(WORLD):
        resumed = json.loads((tmp_path / "b" / f"rank{r}.json").read_text())
        full = json.loads((tmp_path / "a" / f"rank{r}.json").read_text())
        assert resumed["matrix"] == full["matrix"] and resumed["digest"] == full["digest"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["native", "trainer"])
def test_fsdp2_shards_the_model_and_saves_it_whole(engine, tmp_path):
    import lifelong.continual as lc
    from lifelong.models import load_minilm

    launch(engine, tmp_path, mode="fsdp")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["sharded"] and ranks[1]["sharded"]  # the backbone's tensors were DTensors
    assert ranks[0]["matrix"] == ranks[1]["matrix"] and ranks[0]["digest"] == ranks[1]["digest"]
    base, _ = load_minilm()
    loaded = lc.load_model(base, tmp_path / "model")
    assert loaded.predict(stream().tasks[1].test_texts, task=1).tolist() == ranks[0]["predictions"]
    model, tokenizer = load_minilm()
    single_replay = lc.run_stream(model, stream(), "replay", tokenizer=tokenizer, adapter="lora",
                                  adapter_options={"r": 4}, engine=engine, max_length=16, batch_size=8, epochs=2,
                                  lr=3e-3, optimizer="adam", progress=False)
    assert single_replay.train_steps == ranks[0]["steps"]  # the same global batches
    diff = max(abs(a - b) for row_a, row_b in zip(single_replay.accuracy_matrix, ranks[0]["matrix"])
               for a, b in zip(row_a, row_b) if a == a and b == b)
    assert diff <= TOLERANCE, (single_replay.accuracy_matrix, ranks[0]["matrix"])


def main(engine: str, out: str, mode: str = "") -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    out_dir = Path(out)
    result = run(engine, checkpoint_dir=str(out_dir / "ckpt"), crash=mode == "crash", fsdp=mode == "fsdp")
    rank = dist.get_rank()
    texts = stream().tasks[1].test_texts
    record = {"matrix": result.accuracy_matrix, "digest": digest(result.model.module), "world": dist.get_world_size(),
              "steps": result.train_steps, "rows": result.rows,
              "sharded": any(isinstance(p.data, DTensor) for p in result.model.module.parameters()), "predictions": result.model.predict(texts, task=1).tolist()}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    result.model.save_pretrained(out_dir / "model")
    if rank == 0:
        shutil.rmtree(out_dir / "ckpt", ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *sys.argv[3:])
