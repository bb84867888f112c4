"""Files and folders that appear whole or not at all, and the disk they are written to.

Everything lora_cli leaves for later runs or other tools (adapters, checkpoints, merged models, GGUF files, reports,
cached datasets) is written under a temporary name next to its destination and renamed into place: a run that is
killed, or fails, never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import LoraCliError, RunFailure

GIB = 2**30


def existing_ancestor(path: Path) -> Path:
    """The nearest folder at or above `path` that exists: where permissions and free space of a future path are
    decided."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path if path.is_dir() else path.parent


def check_free_space(path: Path, need: float, what: str, *, margin: float = 1.05,
                     error: type[LoraCliError] = RunFailure, hint: str = "") -> None:
    """Fail before writing when `need` bytes (times `margin`) do not fit on the disk `path` goes to. The message
    reads '{what} needs about N GiB, only M GiB free on that disk{hint}'."""
    free = shutil.disk_usage(existing_ancestor(path)).free
    if free < need * margin:
        raise error(f"{what} needs about {need / GIB:.2f} GiB, only {free / GIB:.2f} GiB free on that disk{hint}")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` (same suffix, so tools that go by it still read it), renamed to `path` when
    the block finishes and removed when it fails."""
    path = Path(path)
    # Named per process rather than by mkstemp, whose private 0600 mode the finished file would keep.
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, content: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` through a temporary file: readers see the old file or the new one, also
    after a crash of the machine (the data reaches the disk before the rename)."""
    with staged_file(path) as tmp, open(tmp, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def staged_folder(path: Path, *, replace: bool = False) -> Iterator[Path]:
    """An empty folder next to `path`, moved into place as `path` when the block finishes and deleted when it fails.
    replace=False: the move fails (OSError) when `path` already exists and is not empty, which keeps what another
    process finished first. replace=True: an existing `path` is replaced, and removed only once the new one is in
    place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the finished folder gets the usual permissions
        yield tmp
        if replace:
            replace_folder(tmp, path)
        else:
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, path: Path) -> None:
    """Move the folder `new` to `path`; an existing `path` is set aside first and deleted only after the move, and
    put back if the move fails."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rename(path, old / path.name)
    try:
        os.rename(new, path)
    except OSError:
        if old is not None:
            os.rename(old / path.name, path)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
