"""What every command shares: logging set-up and turning exceptions into one clear line and an exit code."""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from typing import Callable

from .. import noise
from ..errors import LoraCliError, from_library


def setup_logging(prog: str, debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(prog))
    logger = logging.getLogger("lora_cli")
    logger.handlers[:] = [handler]
    # Under torchrun/accelerate every process runs this: only the first one talks, unless something is wrong.
    main_process = os.environ.get("RANK", "0") == "0"
    logger.setLevel(logging.DEBUG if debug else logging.INFO if main_process else logging.WARNING)
    logger.propagate = False
    if not debug:  # library chatter that users cannot act on, by message (lora_cli/noise.py); --debug shows it
        noise.quiet()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_libraries() -> None:
    """Silence per-file loading/writing bars of transformers and datasets; the training bar stays."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    noise.quiet_handlers()


class _Formatter(logging.Formatter):
    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{self.prog}: {level}{record.getMessage()}"


def run_cli(prog: str, argv: list[str] | None, body: Callable[[list[str]], object]) -> int:
    """Run a command body; expected failures end in one line and exit 2 (usage/data) or 1 (runtime)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    setup_logging(prog, debug)
    try:
        body(argv)
        return 0
    except LoraCliError as exc:
        return _fail(prog, str(exc), exc.exit_code, debug)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130, debug)
    except MemoryError:
        return _fail(prog, "out of memory: lower --batch_size or --max_seq_length, or use --load_in_4bit", 1, debug)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return _fail(prog, f"disk full while writing {exc.filename or 'output'}: free space and re-run", 1, debug)
        return _fail(prog, f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 1, debug)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        known = from_library(exc)
        if known is not None:
            return _fail(prog, str(known), known.exit_code, debug)
        if type(exc).__name__ == "OutOfMemoryError":
            return _fail(prog, "out of GPU memory: lower --batch_size or --max_seq_length, keep "
                               "--gradient_checkpointing on, or use --load_in_4bit", 1, debug)
        message = " ".join(str(exc).split())[:500]
        return _fail(prog, f"unexpected {type(exc).__name__}: {message} (re-run with --debug for the traceback)",
                     1, debug)


def _fail(prog: str, message: str, code: int, debug: bool) -> int:
    _close_progress_bars()
    if debug:
        traceback.print_exc()
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def _close_progress_bars() -> None:
    """A bar left open by the failure would redraw itself at exit, below the error line: close it first."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
