"""Writing safetensors files so that a reader never sees half of one."""
from __future__ import annotations

import os


def save_safetensors(tensors, path, metadata) -> None:
    """Write `tensors` (name -> CPU tensor) with string `metadata` to `path`: the file is written
    beside its destination and renamed into place (atomic on POSIX), so an interrupted save leaves
    any previous file whole. FileNotFoundError when the directory does not exist."""
    from safetensors.torch import save_file
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {path}: directory {folder} does not exist")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
