"""Files the library writes, and how it recognises them again.

Atomic writes: every file the library writes goes through a temporary file in the same folder and
``os.replace``, so a crash or a full disk never leaves a half-written result. ``fingerprint`` is the
one hash of a configuration used by every checkpoint and output folder."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` only when it succeeded. The file
    gets the mode a plain ``open(path, "w")`` gives, 0666 less the umask (``mkstemp`` makes 0600
    files, and some writers, such as safetensors, make their own)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def umask() -> int:
    """The process's umask, read from ``/proc`` where the system shows it (setting it to read it
    back is not thread-safe), else set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def json_text(value: Any, indent: int | None = None) -> str:
    """Strict JSON of ``value``: NaN and infinities become ``null`` (``json.dumps`` would write the
    bare ``NaN`` that strict parsers refuse); values JSON cannot hold are written with ``str``."""
    return json.dumps(_finite_or_none(value), indent=indent, default=str, allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def digest(data: bytes) -> str:
    """A short (16 hex digits) SHA-256 content hash."""
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(config: Any) -> str:
    """The fingerprint of a JSON-like configuration: a hash of its canonical JSON (sorted keys;
    values JSON cannot hold are written with ``str``). Used to recognise the configuration that
    wrote a checkpoint or an output folder."""
    return digest(json.dumps(config, sort_keys=True, default=str).encode())


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and prove a file can be written in it; otherwise raise ``OSError``
    whose ``strerror`` says why (read-only file system, no permission, ...) and whose ``filename``
    is the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(folder)) from err
