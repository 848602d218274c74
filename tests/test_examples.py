"""The examples run end to end in their smoke mode (small sizes) and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CASES = {
    "kernel_direct.py": (["--smoke"], ["relative error vs float64", "dA (4, 48)"]),
    "migu_avalanche.py": (["--smoke"], ["after task 2:", "'forgetting'"]),
    "corda_then_kore.py": (["--smoke", "--out", "{tmp}"], ["corda: 73,728 trainable", "kore:"]),
    "hf_trainer_adapters.py": (["--smoke"], ["bone ", "lamda ", "ssf "]),
    "quickstart.py": (["--steps", "1", "--batch-size", "8"], ["adapter ", "bone ", "corda "]),
    "continual_text_stream.py": (["--smoke"], ["KORE sequential: ACC", "MIGU with the HF Trainer: ACC",
                                               "EWC with Avalanche: final accuracy per task"]),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script: str, tmp_path: Path) -> None:
    args, expected = CASES[script]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          env=env, cwd=EXAMPLES, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for text in expected:
        assert text in done.stdout, f"{text!r} missing from the output of {script}:\n{done.stdout[-2000:]}"
