"""Python started in the repository root (or as ``python benchmarks/<name>.py``) can load a
Hugging Face model: the repository's ``kernels/`` folder hands over to the PyPI package
``kernels`` that transformers imports, and ``benchmarks/`` holds no module of that name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lifelong

ROOT = Path(lifelong.__file__).resolve().parent
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_in_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_python_started_in_the_root_loads_minilm_and_both_kernels_packages() -> None:
    code = ("import kernels, lifelong.kernels, lifelong.models as m\n"
            "model, tok = m.load_minilm()\n"
            "print(type(model).__name__, kernels.__file__, lifelong.kernels.lora_linear.__module__)")
    done = run_in_root("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    name, pypi_file, ours = done.stdout.split()[-3:]
    assert name == "BertModel"
    assert Path(pypi_file).resolve().parent != ROOT / "kernels", "import kernels must give the PyPI package"
    assert ours == "lifelong.kernels.lora"


def test_a_script_in_benchmarks_loads_minilm() -> None:
    """``python benchmarks/<name>.py`` puts benchmarks/ first on sys.path, as done here."""
    code = "import sys; sys.path.insert(0, 'benchmarks'); import lifelong.models as m; m.load_minilm(); print('ok')"
    done = run_in_root("-c", code)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_benchmarks_hold_no_module_named_after_a_pypi_package_transformers_imports() -> None:
    assert not (ROOT / "benchmarks" / "kernels.py").exists()
    assert (ROOT / "benchmarks" / "kernel_speed.py").is_file()


@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_every_benchmark_help_runs_from_the_root(script: Path) -> None:
    done = run_in_root(str(script.relative_to(ROOT)), "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and script.name in done.stdout
