"""Errors a user can cause, each mapped to an exit code by the CLI wrapper."""


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
