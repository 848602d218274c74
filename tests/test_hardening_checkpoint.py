"""Damaged continual checkpoints: cut in half, empty, text, flipped bytes, an edited ``completed``
counter or NaN weights are never resumed; every error names the file (``lifelong.checkpoint``),
and the continual loop warns and starts over."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch

from lifelong import checkpoint

STATE = {"fingerprint": "abc", "config": "{}", "completed": 1, "elapsed": 0.5, "steps": 3, "step_time": 0.1,
         "matrix": torch.tensor([[0.5, float("nan")], [0.4, 0.6]]), "initial": torch.full((2,), float("nan")),
         "runner": {"model": {"w": torch.randn(64, 64)}, "optimizer": {"state": {}}}}


def resealed(path: Path, state: dict) -> None:
    """Rewrite ``path`` with ``state`` and a matching digest, as someone editing it on purpose would."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    path.write_bytes(checkpoint.MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:
    """Flip 200 bytes spread over the payload."""
    data = bytearray(path.read_bytes())
    step = (len(data) - checkpoint.HEADER_SIZE) // 200
    for i in range(200):
        data[checkpoint.HEADER_SIZE + i * step] ^= 0xFF
    path.write_bytes(bytes(data))


def plain_torch_save(path: Path) -> None:
    torch.save(STATE, path)


def nan_weights(path: Path) -> None:
    state = checkpoint.load(path)
    state["runner"]["model"]["w"][3, 5] = float("nan")
    resealed(path, state)


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "cut in half": (cut_in_half, "digest"),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "text": (lambda p: p.write_text("not a checkpoint\n"), "not a lifelong checkpoint"),
    "flipped bytes": (flip_bytes, "digest"),
    "plain torch.save": (plain_torch_save, "not a lifelong checkpoint"),
    "NaN weights": (nan_weights, r"NaN or infinite values in runner\.model\.w"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_every_damage_is_refused_naming_the_file_and_what_to_do(tmp_path: Path, name: str) -> None:
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, STATE)
    damage, why = DAMAGE[name]
    damage(path)
    with pytest.raises(checkpoint.CheckpointError, match=why) as err:
        checkpoint.load(path, finite=("runner",))
    assert str(path) in str(err.value) and "delete it" in str(err.value)
    assert err.value.path == path


def test_a_whole_checkpoint_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    checkpoint.save(path, STATE)
    state = checkpoint.load(path, finite=("runner",))
    assert state["completed"] == 1 and torch.equal(state["runner"]["model"]["w"], STATE["runner"]["model"]["w"])
    assert torch.isnan(state["matrix"][0, 1]), "NaN outside the finite keys (unmeasured accuracies) is kept"
    assert path.read_bytes().startswith(checkpoint.MAGIC)


def test_an_unreadable_or_foreign_payload_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    resealed(path, [1, 2])  # a digest that matches, but no dict inside
    with pytest.raises(checkpoint.CheckpointError, match="holds a list"):
        checkpoint.load(path)
    payload = b"garbage that torch cannot load"
    path.write_bytes(checkpoint.MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with pytest.raises(checkpoint.CheckpointError, match="cannot read safely"):
        checkpoint.load(path)
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "missing.pt")


# ---- the continual loop's checkpoint section ------------------------------------------------------

def saved_folder(tmp_path: Path, state: dict | None = None) -> Path:
    from lifelong.continual import loop

    loop.save_checkpoint(str(tmp_path), {**STATE, "fingerprint": loop.fingerprint({"a": 1}),
                                         "config": '{"a": 1}', **(state or {})})
    return tmp_path / loop.CHECKPOINT


@pytest.mark.parametrize("name", list(DAMAGE))
def test_the_loop_warns_and_starts_over_from_a_damaged_checkpoint(tmp_path: Path, name: str) -> None:
    from lifelong.continual.loop import load_checkpoint

    damage, why = DAMAGE[name]
    path = saved_folder(tmp_path)
    damage(path)
    with pytest.warns(RuntimeWarning, match=why) as caught:
        assert load_checkpoint(str(tmp_path), {"a": 1}, experiences=2) is None
    message = str(caught[0].message)
    assert str(path) in message and "starting the stream over" in message


@pytest.mark.parametrize("completed", [3, -1, 1.5, True])
def test_an_edited_completed_counter_is_not_resumed(tmp_path: Path, completed) -> None:
    from lifelong.continual.loop import load_checkpoint

    saved_folder(tmp_path, {"completed": completed})
    with pytest.warns(RuntimeWarning, match=f"completed={completed!r}"):
        assert load_checkpoint(str(tmp_path), {"a": 1}, experiences=2) is None


def test_missing_keys_are_named(tmp_path: Path) -> None:
    from lifelong.continual.loop import load_checkpoint

    path = saved_folder(tmp_path)
    state = checkpoint.load(path)
    del state["runner"]
    resealed(path, state)
    with pytest.warns(RuntimeWarning, match=r"missing \['runner'\]"):
        assert load_checkpoint(str(tmp_path), {"a": 1}) is None


def test_a_whole_checkpoint_resumes_and_another_configuration_is_refused(tmp_path: Path) -> None:
    from lifelong.continual.loop import load_checkpoint

    saved_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = load_checkpoint(str(tmp_path), {"a": 1}, experiences=2)
        assert state["completed"] == 1
        assert load_checkpoint(str(tmp_path), {"a": 1})["completed"] == 1, "experiences stays optional"
        assert load_checkpoint(str(tmp_path / "elsewhere"), {"a": 1}) is None
    with pytest.raises(ValueError, match="different configuration.*differs in: a"):
        load_checkpoint(str(tmp_path), {"a": 2}, experiences=2)


def test_run_stream_resumed_from_a_damaged_checkpoint_recomputes_the_same_numbers(tmp_path: Path) -> None:
    import lifelong.continual as lc
    from lifelong.models import digits_model

    def run(resume: bool):
        return lc.run_stream(digits_model("mlp", 0, hidden=16), lc.split_digits(n_tasks=2), "naive", epochs=1,
                             lr=0.1, batch_size=64, seed=0, checkpoint_dir=str(tmp_path), resume=resume,
                             progress=False)

    fresh = run(resume=False)
    flip_bytes(tmp_path / "checkpoint.pt")
    with pytest.warns(RuntimeWarning, match="does not match its SHA-256 digest.*starting the stream over"):
        again = run(resume=True)
    assert again.accuracy_matrix == fresh.accuracy_matrix
