"""Nothing lost: folder locks, stale-temp cleanup, atomic folder swaps and one-line OS errors.

Shared by ``train.py`` (a run folder) and ``data_prep`` (a prepared-corpus folder):

* :class:`FolderLock` — an exclusive ``fcntl.flock`` held for a process's whole life on a lock
  file. The kernel drops it when the process dies (kill -9 included), so a lock is never stale;
  the file records the holder's PID so that a second process can say who holds it.
* :func:`remove_stale_temp_files` — temp files a killed process left behind (only ever called
  while holding the folder's lock, so no live writer owns them).
* :func:`swap_in_folder` — replace a folder by a complete staging folder; the old one is deleted
  only after the new one is in place (atomically with ``renameat2(RENAME_EXCHANGE)`` where the
  kernel has it; otherwise two renames and a recovery step on the next start).
* :func:`create_temp_file` / :func:`create_temp_folder` — where an atomic write stages its output,
  with the permissions of any other file the user writes (``tempfile.mkstemp``/``mkdtemp`` make
  them 0600/0700, and the rename would carry that onto a checkpoint or an export meant to be shared).
* :func:`describe_os_error` — "no space left on <path>", "<path> is read-only", ... for the CLIs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import secrets
import shutil
from pathlib import Path

from lmmem.errors import LmmemError


class FolderBusy(LmmemError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """Exclusive, non-blocking (or ``wait=True``: blocking) flock on ``lock_path`` until :meth:`release`.

    The lock file is never deleted: deleting a flock file lets a third process lock a new inode
    while the second still waits on the old one."""

    def __init__(self, lock_path: str | Path, what: str, *, wait: bool = False):
        self.path = Path(lock_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _read_pid(self.fd)
            os.close(self.fd)
            who = f"process {holder}" if holder else "another process"
            raise FolderBusy(
                f"{what} is in use by {who} (lock {self.path}); wait for it to finish, stop it, or choose another --out"
            ) from None
        except BaseException:
            os.close(self.fd)
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def remove_stale_temp_files(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    """Delete files/folders in ``folder`` matching the glob ``patterns`` (call it holding the lock)."""
    removed = []
    if not folder.is_dir():
        return removed
    for pattern in patterns:
        for p in folder.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def retired_name(target: Path) -> Path:
    """Where :func:`swap_in_folder` parks the old folder until the new one is in place."""
    return target.with_name(f".{target.name}.old")


def swap_in_folder(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` at ``target``; the old ``target`` is removed only after."""
    _fsync_dir(staging)
    old = retired_name(target)
    if not target.exists():
        os.rename(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging)  # staging now holds the old folder
    else:
        # Two renames: a crash between them leaves the old folder at `old` and the new one at
        # `staging`; recover_swap() on the next start puts the old one back.
        if old.exists():
            shutil.rmtree(old)
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old)
    _fsync_dir(target.parent)


def recover_swap(target: Path) -> None:
    """After a crash mid-swap (no ``target`` but a retired copy): put the retired copy back."""
    old = retired_name(target)
    if old.is_dir():
        if not target.exists():
            os.rename(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
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


def is_inside(child: Path, parent: Path) -> bool:
    """Whether ``child`` is ``parent`` or below it (both resolved; symlinks followed)."""
    c, p = child.resolve(), parent.resolve()
    return c == p or p in c.parents


def describe_os_error(e: OSError, path: str | Path | None = None) -> str:
    """One line naming the path and what to do, for an OSError the user's environment caused."""
    where = e.filename if e.filename is not None else path
    where = f"{where}" if where is not None else "the output folder"
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return f"no space left on {where}; free some space or choose another --out (earlier checkpoints and corpora are kept)"
    if e.errno == errno.EROFS:
        return f"{where} is on a read-only file system; choose a writable --out"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}; choose a folder you can write to, or fix its permissions"
    if e.errno == errno.ENOTDIR:
        return f"{where}: a path component is a file, not a folder; choose another --out"
    if e.errno == errno.EEXIST:
        return f"{where} already exists and is not a folder; choose another --out"
    if e.errno == errno.EISDIR:
        return f"{where} is a folder; give a file path"
    if e.errno == errno.ENOENT:
        return f"{where} does not exist; check the path"
    return f"{e.strerror or type(e).__name__}: {where}"


def check_writable_folder(path: Path, flag: str = "--out") -> None:
    """Refuse a path that is an existing file (with a clear message) before anything is written."""
    if path.exists() and not path.is_dir():
        raise LmmemError(f"{flag} {path} is a file; give a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LmmemError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
            break


def create_temp_file(folder: str | Path, prefix: str, suffix: str = ".tmp") -> tuple[int, Path]:
    """``(fd, path)`` of a new, uniquely named file ``folder/PREFIX<random>SUFFIX`` open for reading
    and writing, created 0666 less the umask (as ``open()`` creates files), not mkstemp's 0600."""
    folder = Path(folder)
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder / prefix))


def create_temp_folder(parent: str | Path, prefix: str) -> Path:
    """A new, uniquely named folder ``parent/PREFIX<random>``, created 0777 less the umask (as
    ``mkdir`` creates folders), not mkdtemp's 0700."""
    parent = Path(parent)
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(parent / prefix))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and a rename: readers see the old or the new text."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # name the file the user asked for, not the temporary one
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
