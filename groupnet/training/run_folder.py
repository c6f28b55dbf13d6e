"""The run folder: created atomically, locked for the whole run, written only through atomic replaces.

- :class:`RunFolder` creates the folder (a default name gets a ``-2``, ``-3``, ... suffix when another run took
  it in the same second), takes an exclusive ``fcntl.flock`` on its ``.lock`` file for as long as the run lasts
  (a second run on the same folder fails at once with a message), removes temporary files a killed save left, and
  on failure removes the folders it created when nothing was saved in them.
- :func:`atomic_write` writes every file of a run: a temporary file in the same folder, fsync, ``os.replace``.
  A reader or a crash sees the old file or the new one, never a partial one; a symlink at the destination is
  replaced, never followed; files get the mode the umask gives (0644 under the usual 022).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from groupnet.training.errors import ConfigError

LOCK = ".lock"
#: Temporary files of :func:`atomic_write` are named ``.<file name>.<random>.tmp``.
TEMP_SUFFIX = ".tmp"


class RunFolderBusy(ConfigError):
    """Another process holds the run folder's lock."""


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask."""
    return 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync it, then ``os.replace`` it onto ``path``.

    A crash at any point leaves either the old file or the new one; a failure removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; every file of a run follows the umask alike
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so ``json.dumps`` writes valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (no bare NaN or Infinity): non-finite floats become null."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def clean_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files that a save killed half-way left in ``folder``; returns them."""
    removed = []
    for p in Path(folder).iterdir():
        if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the folders this call created, outermost first."""
    missing = []
    p = path
    while not p.exists() and not p.is_symlink():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
            created.append(d)
        except FileExistsError:
            pass  # another process made it in between
    if not path.is_dir():
        raise ConfigError(f"run folder {path} is not a folder")
    return created


_HELD_LOCKS: set[int] = set()  # lock file descriptors of the folders this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker), close the inherited lock descriptors: a flock belongs to the open
    file, so a persistent worker that outlives the run would otherwise keep its folder locked."""
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunFolder:
    """An exclusively locked run folder; :meth:`release` unlocks it (and removes it when asked and unused)."""

    def __init__(self, path: Path, created: list[Path], fd: int) -> None:
        self.path, self.created, self._fd = path, created, fd

    @classmethod
    def open(cls, path: str | Path, *, unique: bool = False) -> RunFolder:
        """Lock ``path`` (made when missing). ``unique``: ``path`` is a generated name that must be new; when it
        exists, the first free ``path-2``, ``path-3``, ... is created instead (with ``mkdir``, atomic)."""
        path = Path(path)
        for _ in range(5):  # retried when the folder is removed between making it and locking it
            if unique:
                created = _make_dirs(path.parent)
                path, made = cls._new_name(path)
                created.append(made)
            else:
                created = _make_dirs(path)
            try:
                fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, file_mode())
            except OSError as e:
                _remove_dirs(created)
                if e.errno == errno.ELOOP:
                    raise ConfigError(f"run folder {path}: {LOCK} is a symbolic link; remove it") from None
                raise ConfigError(f"cannot write in run folder {path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                _remove_dirs(created)
                raise RunFolderBusy(
                    f"run folder {path} is in use by another run{f' (process {holder})' if holder else ''}: wait "
                    "for it to finish, or pass another --output-dir") from None
            try:
                same = os.stat(path / LOCK, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                _HELD_LOCKS.add(fd)
                return cls(path, created, fd)
            os.close(fd)  # the folder was removed (a failed run cleaning up) after we opened its lock file
        raise RunFolderBusy(f"run folder {path} keeps being removed by another process")

    @staticmethod
    def _new_name(path: Path) -> tuple[Path, Path]:
        for n in range(1, 10_000):
            candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
            try:
                candidate.mkdir()
                return candidate, candidate
            except FileExistsError:
                continue
        raise ConfigError(f"no free run folder name like {path}")

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def release(self, *, remove: bool = False) -> None:
        """Unlock. ``remove``: also delete the lock file and the folders this run created, if nothing else is in
        them (a failed run leaves no folder behind)."""
        if self._fd is None:
            return
        try:
            if remove and self.created:
                (self.path / LOCK).unlink(missing_ok=True)
                clean_temp_files(self.path)
                _remove_dirs(self.created)
        finally:
            _HELD_LOCKS.discard(self._fd)
            os.close(self._fd)
            self._fd = None


def _remove_dirs(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            break  # not empty: something else lives there


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return text if text.isdigit() else ""
