"""Reading an adapter folder's files without ever opening anything outside its root.

Checking only the folder is not enough: a file inside it may be a symlink to ``/etc/passwd`` or to
another user's adapter. Every file is resolved first, refused unless the resolved path lies under
the root, and then opened by that resolved path with ``O_NOFOLLOW`` (so a symlink swapped in after
the check is not followed either) and read only when it is a regular file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lorax_mlflow.errors import InvalidRequestError


class OutsideRootError(InvalidRequestError):
    """A path (or a file in an adapter folder) resolves outside the configured root."""

    def __init__(self, message: str, *, param: str | None = "adapter_id", code: str | None = None) -> None:
        super().__init__(message, param=param, code=code)


def resolve_path(path: Path, *, param: str = "adapter_id") -> Path:
    """`path` with symlinks and ``..`` resolved; any OS-level refusal (a symlink loop, a NUL byte,
    a component over 255 bytes, ``~unknownuser``) is a 400 naming `param`, never a crash."""
    try:
        return path.expanduser().resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as error:  # RuntimeError: symlink loop / unknown ~user
        raise InvalidRequestError(f"cannot resolve the local path {str(path)!r}: {error}", param=param) from error


class ConfinedFolder:
    """An adapter folder whose files may be read only when they resolve under `root`."""

    def __init__(self, folder: Path, root: Path | None = None) -> None:
        self.folder = Path(folder)
        self.root = resolve_path(Path(root) if root is not None else self.folder)

    def path(self, name: str) -> Path | None:
        """The resolved path of `name` in the folder, None when there is no such entry.

        Raises OutsideRootError when the entry resolves outside the root (a symlink out, a loop)."""
        candidate = self.folder / name
        if not os.path.lexists(candidate):
            return None
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError) as error:
            raise OutsideRootError(f"{candidate.name} in the adapter folder cannot be resolved: {error}") from error
        if not resolved.is_relative_to(self.root):
            raise OutsideRootError(f"{candidate.name} in the adapter folder points outside the adapter root")
        return resolved

    def is_file(self, name: str) -> bool:
        resolved = self.path(name)
        return resolved is not None and resolved.is_file()

    def read_bytes(self, name: str, max_bytes: int | None = None) -> bytes:
        """The bytes of the regular file `name` (refused when it is anything else or too large)."""
        resolved = self.path(name)
        if resolved is None:
            raise FileNotFoundError(name)
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OutsideRootError(f"{name} in the adapter folder is not a regular file")
            if max_bytes is not None and info.st_size > max_bytes:
                raise InvalidRequestError(f"{name} is {info.st_size} bytes, above the limit of {max_bytes}")
            with os.fdopen(fd, "rb", closefd=True) as handle:
                fd = -1
                return handle.read()
        finally:
            if fd >= 0:
                os.close(fd)

    def check_entries(self) -> None:
        """Raise OutsideRootError if any top-level entry of the folder resolves outside the root.

        Run before handing the folder to a library that opens files by name (a tokenizer loader)."""
        try:
            names = sorted(os.listdir(self.folder))
        except OSError as error:
            raise InvalidRequestError(f"cannot list the adapter folder: {error}") from error
        for name in names:
            self.path(name)
