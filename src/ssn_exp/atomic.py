"""Replace a file atomically without following links, and file names from untrusted text (no torch, no Hydra: every
layer may use it)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
from pathlib import Path

__all__ = ["replace_file", "safe_name"]


def safe_name(value, limit: int = 36) -> str:
    """``value`` (any text read from a file: a data set, a method, a label) as one file-name component: letters,
    digits and ``. _ = -`` are kept, every run of other characters (and of two or more dots) becomes ``_``, a leading
    dot goes, and at most ``limit`` characters remain. A value that had to change gets ``-`` and 8 hex digits of its
    hash, so two different values never share a name; a plain short value (``cifar10``, ``uniform``) is kept as it
    is. Every name the report derives from a result file is built from these (never a path: no ``/``, no ``..``)."""
    text = str(value)
    name = re.sub(r"(?:[^A-Za-z0-9._=-]|\.\.+)+", "_", text).lstrip(".")
    if name == text and 0 < len(name) <= limit:
        return name
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{name[: max(limit - 9, 0)]}-{digest}"


def replace_file(path: Path, data: str | bytes, inside: Path | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``: a reader never sees half a
    file, and a symbolic link at ``path`` is replaced, never written through (nor one at the temporary name).

    ``inside``: the folder the file must lie in (after ``..`` and links in its folders are resolved); a path
    elsewhere is refused with ``PermissionError`` before anything is written."""
    path = Path(path)
    if inside is not None:
        root = Path(inside).resolve()
        folder = path.parent.resolve()
        if path.name in ("", ".", "..") or (folder != root and root not in folder.parents):
            raise PermissionError(errno.EACCES, f"outside the output folder {root}", str(path))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
