"""Writing safetensors files so that a reader never sees half of one."""
from __future__ import annotations

import os


def check_path(path) -> str:
    """`path` as a str: a str, bytes or os.PathLike (TypeError naming `path` otherwise, where
    os.fspath's own message would not say which argument was wrong)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str, bytes or os.PathLike, got {type(path).__name__}")
    return os.fsdecode(os.fspath(path))


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (True when unsure: the caller then leaves its file alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True      # PermissionError: it exists, owned by someone else
    return True


def remove_stale_temporaries(path: str) -> None:
    """Remove `<path>.tmp-<pid>` files left beside `path` by saves that were killed (SIGKILL, power
    loss) before they could clean up: only those whose process `pid` no longer exists. A save in
    progress in another live process writes such a file too, and removing every `<path>.tmp-*`
    would pull it from under that save (its rename would then fail), so a file is only removed
    when its writer is gone. A reused pid keeps its stale file until that process ends (harmless:
    the target is never touched). POSIX only (os.kill(pid, 0) probes without signalling there)."""
    if os.name != "posix":
        return
    folder, base = os.path.split(os.path.abspath(path))
    prefix = base + ".tmp-"
    try:
        names = os.listdir(folder)
    except OSError:
        return
    me = os.getpid()
    for name in names:
        tail = name[len(prefix):] if name.startswith(prefix) else ""
        if not tail.isdigit() or not tail.isascii():
            continue
        pid = int(tail)
        if pid <= 0 or pid == me or _pid_alive(pid):
            continue
        try:
            os.remove(os.path.join(folder, name))
        except OSError:
            pass      # gone already (another save cleaned it) or not ours to remove


def save_safetensors(tensors, path, metadata) -> None:
    """Write `tensors` (name -> CPU tensor) with string `metadata` to `path`: the file is written
    beside its destination and renamed into place (atomic on POSIX), so an interrupted save leaves
    any previous file whole. Temporaries left by earlier saves that were killed are removed (see
    `remove_stale_temporaries`). FileNotFoundError when the directory does not exist."""
    from safetensors.torch import save_file
    path = check_path(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {path}: directory {folder} does not exist"
                                " (create it first: os.makedirs)")
    remove_stale_temporaries(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
