"""Atomic file writes: write to a temporary name in the same folder, fsync, rename."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched, so a file that
    was already saved is never lost or half-overwritten.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600 whatever the umask
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


#: the file a command holds while it writes into a folder
LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str, say: Any = None) -> Iterator[Path]:
    """Hold ``folder/.lock`` while ``what`` (e.g. "mobile-vla study") writes into ``folder``:
    one writer per folder. The lock is an advisory ``flock`` on the file, which the kernel
    drops when its holder dies however it dies, so a lock left by a killed process is taken
    over (``say`` is told so, with the dead PID; a clean exit clears the record). A lock held
    by a live process raises :class:`~mobile_vla.errors.MobileVLAError` naming its PID, its
    command and how to go on."""
    import fcntl

    from mobile_vla.errors import MobileVLAError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock(fd)
            pid = holder.get("pid")
            raise MobileVLAError(
                f"'{folder}' is in use by PID {pid} ({holder.get('what', 'another command')}, "
                f"since {holder.get('since', '?')}): one writer per folder. Wait for it to "
                f"finish, or stop it (kill {pid}) and run this again; to run beside it, choose "
                "another output folder"
            ) from None
        before = _read_lock(fd)
        old = before.get("pid")
        if say is not None and isinstance(old, int) and old != os.getpid():
            state = "no longer running" if not _pid_alive(old) else "no longer holding it"
            say(f"taking over the lock on '{folder}' from PID {old} ({state})")
        import datetime as dt

        record = {
            "pid": os.getpid(),
            "what": what,
            "since": f"{dt.datetime.now():%Y-%m-%d %H:%M:%S}",
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder behind to be "taken over"
    finally:
        os.close(fd)  # releases the flock


def _read_lock(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
