"""Errors a user can cause, each mapped to an exit code by the CLI wrapper, and library failures read as them."""

from __future__ import annotations

import contextlib
import errno
import re


class LoraCliError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    exit_code = 1


class UsageError(LoraCliError):
    """Bad flags, bad config, a missing file or model: the user must change the command (exit 2)."""

    exit_code = 2


class DataError(UsageError):
    """The training or evaluation data cannot be used as given (exit 2)."""


class RunFailure(LoraCliError):
    """Something went wrong while running (out of memory, disk full, a library failure) (exit 1)."""

    exit_code = 1


# A failed write in each library's own words: Python (errno), safetensors and tokenizers (Rust's "os error N"), and
# torch's zip writer, which ignores the failed write and then finds itself at the wrong position.
_WRITE_FAILED = re.compile(r"No space left on device|Disk quota exceeded|File too large|os error (28|27|122)\b|"
                           r"unexpected pos \d+ vs \d+|file write failed")
_DAMAGED = re.compile(r"Error while deserializing header|PytorchStreamReader failed|invalid load key")
_CPU_OUT_OF_MEMORY = re.compile(r"DefaultCPUAllocator: can't allocate memory|Cannot allocate memory")


def write_failed(exc: BaseException) -> bool:
    """True when `exc` says a write failed for want of space (a full disk, a quota, a file size limit)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return bool(_WRITE_FAILED.search(str(exc)))


@contextlib.contextmanager
def writing(what: str, then: str = "re-run"):
    """Turn a failed write inside the block, whichever library made it, into one line naming what was written."""
    try:
        yield
    except LoraCliError:
        raise
    except Exception as exc:
        if not write_failed(exc):
            raise
        raise RunFailure(f"{what}: the disk is full (or a quota or file size limit was reached): free space, then "
                         f"{then}") from exc


def from_library(exc: BaseException) -> LoraCliError | None:
    """A library's exception that a user can cause, as one line saying what to do; None when it is not one."""
    text = " ".join(str(exc).split())
    if write_failed(exc):
        return RunFailure("a write failed: the disk is full (or a quota or file size limit was reached); free space "
                          "and re-run")
    if _CPU_OUT_OF_MEMORY.search(text):
        return RunFailure("out of memory: lower --batch_size or --max_seq_length, or quantise the base (4-bit)")
    if _DAMAGED.search(text) or type(exc).__name__ == "UnpicklingError":  # where no caller knew the file to name
        return RunFailure(f"a file being loaded is damaged ({text[:200]}): copy or download it again (--debug shows "
                          "which file)")
    return None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type when the message is empty), for a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def one_line(exc: BaseException, limit: int | None = 200) -> str:
    """An exception's whole message with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(exc).split())[:limit]
