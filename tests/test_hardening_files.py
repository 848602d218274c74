"""Files the library writes get the mode the umask asks for (``tempfile.mkstemp`` gave 0600)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import lifelong as ll
from lifelong import files


@pytest.fixture(params=[0o022, 0o027])
def umask(request) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_respect_the_umask(tmp_path: Path, umask: int) -> None:
    files.atomic_write_text(tmp_path / "a.json", "{}")
    files.atomic_write_bytes(tmp_path / "b.bin", b"\0")
    files.atomic_write(tmp_path / "c.pt", lambda tmp: torch.save({"x": torch.ones(2)}, tmp))
    for name in ("a.json", "b.bin", "c.pt"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "c.pt"], "no temporary file is left"


def test_saved_adapters_respect_the_umask(tmp_path: Path, umask: int) -> None:
    torch.manual_seed(0)
    model = ll.wrap(nn.Sequential(nn.Linear(4, 4)), "bone", r=2, target_modules=["0"])
    model.save_pretrained(tmp_path / "adapter")
    written = sorted((tmp_path / "adapter").iterdir())
    assert written and all(mode(p) == 0o666 & ~umask for p in written)


def test_a_failed_write_leaves_no_file(tmp_path: Path) -> None:
    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.atomic_write(tmp_path / "x.json", fail)
    assert list(tmp_path.iterdir()) == []


def test_umask_reads_the_process_umask_without_changing_it(umask: int) -> None:
    assert files.umask() == umask
    assert files.umask() == umask
