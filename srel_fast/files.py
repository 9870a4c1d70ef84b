"""Atomic, crash-safe file writes and small JSON helpers.

Every file a stage produces is written to a temporary name in the same
directory, fsynced and renamed over the final name, so an interrupted run
never leaves a truncated image, checkpoint or JSON behind: a file either
exists complete or not at all."""
from __future__ import annotations

import contextlib
import datetime as _dt
import io as _io
import json
import os
import platform
import tempfile
from typing import Any, Callable, Iterator


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it is fsynced and
    renamed to ``path``; on any exception it is removed."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_with(path: str, writer: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``writer(fileobj)`` on a temporary file, then move it into place."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            writer(f)


def write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def append_jsonl(path: str, obj: Any) -> None:
    """Append one JSON line and fsync: the progress log of a resumable stage.
    A torn last line (killed mid-write) is ignored by ``read_jsonl``."""
    line = json.dumps(obj, sort_keys=True, default=_json_default) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str) -> list[Any]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn tail of a killed run
    return out


def torch_save_atomic(obj: Any, path: str) -> None:
    import torch

    buf = _io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def environment() -> dict:
    """Versions and device, recorded in every config/results JSON."""
    import torch

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    from . import __version__

    env["srel_fast"] = __version__
    return env
