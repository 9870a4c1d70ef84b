"""Atomic, crash-safe file writes, small JSON helpers, and what a stage does with an existing
output (``check_output``: the rules of --overwrite and resuming, the same for every stage).

Every file a stage produces is written to a temporary name in the same
directory, fsynced and renamed over the final name, so an interrupted run
never leaves a truncated image, checkpoint or JSON behind: a file either
exists complete or not at all."""
from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import io as _io
import json
import os
import platform
import tempfile
from typing import Any, Callable, Iterator

from .errors import UserError


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


def _tmp_prefix(path: str) -> str:
    """The name prefix of atomic_path's temporary files for ``path`` ('.NAME.')."""
    return "." + os.path.basename(path) + "."


def _host() -> str:
    return platform.node() or "host"


def _writer_tag() -> str:
    """'HOST.PID.': who writes a temporary file, so that a writer removes only the temporaries
    of writers that died (several processes may write the same record: recovery's ranks)."""
    return f"{_host()}.{os.getpid()}."


def _left_by_a_dead_writer(tmp_name: str, prefix: str) -> bool:
    """Whether a temporary file of atomic_path (its name: the prefix, 'HOST.PID.', mkstemp's random
    letters, '.tmp') was left by a writer that no longer runs: one of this host whose process is
    gone, or one without a tag (written before tags). Another host's, or a live process's, may
    still be in flight."""
    parts = tmp_name[len(prefix):-len(".tmp")].rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    host, pid = parts[0], int(parts[1])
    if host != _host():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:   # exists, another user's
        return False
    return False


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it is fsynced and
    renamed to ``path``, and the temporary files that killed earlier writers of the same
    ``path`` left behind are removed (those of live writers stay: ranks of one run may
    write the same record at once); on any exception it is removed."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    prefix = _tmp_prefix(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix + _writer_tag(), suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
        for stale in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*.tmp")):
            if _left_by_a_dead_writer(os.path.basename(stale), prefix):
                with contextlib.suppress(OSError):
                    os.remove(stale)
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


# -- what is already at a stage's output, and --overwrite: the same rules for every stage ---------------

NEW, RESUME, REPLACE = "new", "resume", "replace"


def result_config(config: dict, run_only) -> dict:
    """``config`` without its run-only fields (``RUN_ONLY_FIELDS`` of each stage's config: where the
    output goes, the device, progress bars, --overwrite, ...): the values that decide the result,
    compared to tell whether an existing output or resume file belongs to the same run."""
    return {k: v for k, v in config.items() if k not in run_only}


def config_differences(old: dict, new: dict, run_only=()) -> list[str]:
    """The fields, run-only ones aside, whose values differ between two configs (sorted)."""
    old, new = result_config(old, run_only), result_config(new, run_only)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def check_output(out: str, overwrite: bool, *, record: str | None = None, differences=None,
                 what: str = "run", processes: int = 1) -> str:
    """What a stage does with what is already at its output ``out``; the same rules for every stage.

    A finished output file (``record`` None: squeeze's checkpoint, train's student) is refused
    unless ``overwrite`` (then ``REPLACE``); none there is ``NEW``.

    An output directory holding a run of the stage (its ``record`` file, e.g. recover_config.json)
    is resumed (``RESUME``) when ``differences(old record)`` names no differing field, and refused
    otherwise, unless ``overwrite`` (``REPLACE``: the caller deletes the run's files). A non-empty
    directory that holds no such run is refused, with ``overwrite`` too: a stage deletes only what
    it wrote. An empty or missing directory is ``NEW``. ``overwrite`` with several processes is
    refused for a directory: one process would delete what the others are writing."""
    if record is None:
        if not os.path.exists(out):
            return NEW
        if not overwrite:
            raise UserError(f"{out} already exists; use --overwrite to replace it.")
        return REPLACE
    if overwrite and processes > 1:
        raise UserError("--overwrite cannot be combined with several processes; clear the output directory first.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"output path {out} exists and is not a directory.")
    # another process's record being written (atomic_path's temporary file) does not make the tree foreign
    tmp = _tmp_prefix(record)
    entries = os.path.isdir(out) and [f for f in os.listdir(out) if not (f.startswith(tmp) and f.endswith(".tmp"))]
    if not entries:
        return NEW
    if not os.path.exists(record):
        if overwrite:
            raise UserError(f"output directory {out} holds files that are not a {what}; refusing to delete them "
                            "even with --overwrite.")
        raise UserError(f"output directory {out} is not empty and holds no {what}; choose another --out.")
    if overwrite:
        return REPLACE
    diff = differences(read_json(record))
    if diff:
        raise UserError(f"output directory {out} holds a {what} made with a different config ({', '.join(diff)}); "
                        "use another --out or --overwrite.")
    return RESUME
