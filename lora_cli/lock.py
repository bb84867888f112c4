"""One run per output folder: an exclusive fcntl lock on a file inside it, released by the OS when the holder dies.

The lock file always lives inside the folder (created first if need be): a place that depended on whether the folder
exists yet would let two runs started together lock two different files."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from .errors import UsageError

LOCK_FILE = ".lora_cli.lock"


class FolderBusy(UsageError):
    """Another live process holds the folder's lock (exit 2)."""


class OutputLock:
    """Held from before anything is written into `folder` until the run ends; the lock file goes with it."""

    def __init__(self, folder: Path, flag: str = "--output_dir"):
        self.folder = Path(folder)
        self.flag = flag
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> OutputLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"{self.flag} {self.folder}: exists and is not a folder")
        try:
            self.folder.mkdir(parents=True)
            self._created = True  # by this process: of two started together, mkdir succeeds for one
        except FileExistsError:
            pass
        except OSError as exc:
            raise UsageError(f"{self.flag} {self.folder}: cannot create it ({exc.strerror})") from None
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderBusy(f"{self.flag} {self.folder}: another lora-train run (PID {self._holder()}) is "
                                 "writing into it; wait for it to finish or choose another folder") from None
            if self._same_file(fd):
                break
            os.close(fd)  # the file we locked was removed and replaced meanwhile: lock the one there now
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file (a run waiting on the old one sees it gone and locks afresh), then unlock."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        if self._created:  # a run that failed before writing leaves no empty folder behind
            with contextlib.suppress(OSError):
                self.folder.rmdir()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"{self.flag} {self.folder}: not writable ({exc.strerror})") from None

    def _same_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _holder(self) -> str:
        for _ in range(20):  # the holder writes its PID right after locking: give it a moment
            try:
                pid = self.path.read_text(encoding="utf-8").strip()
            except OSError:
                pid = ""
            if pid:
                return pid
            time.sleep(0.05)
        return "unknown"
