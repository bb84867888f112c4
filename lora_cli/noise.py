"""Library output a user cannot act on, filtered by message, so that every other warning (peft's and TRL's actionable
ones among them) still shows. --debug installs none of this and shows everything."""

from __future__ import annotations

import logging
import re
import warnings

# (message pattern, why a user cannot act on it). Matched anywhere in a log record or warning, whichever library
# logger or warning category carries it, so a module moving inside a library does not bring the line back.
MESSAGES = (
    (r"Failed to load CPU gemm_4bit_forward from kernels-community",
     "bitsandbytes, at import: an optional CPU kernel from the Hub it is not allowed to run; it uses its own"),
    (r"Skipping publisher trust check for 'kernels-community/",
     "kernels, offline, when bitsandbytes looks for that optional kernel"),
    (r"You are using a per_device_train_batch_size of 1 with padding-free training",
     "TRL: lora-train chose that micro-batch itself, to fit --tokens_per_batch"),
    (r"`is_gradient_checkpointing` is deprecated",
     "transformers' own Trainer calls the property it deprecated"),
    (r"Failed to read schema from '",
     "datasets, on a damaged Parquet file: lora_cli's own error line names the file and what is wrong"),
    (r"Paged optimizers are not supported on CPU",
     "bitsandbytes: the default --optim pages optimizer state out of GPU memory; on a CPU it is there already"),
)
_PATTERN = re.compile("|".join(f"(?:{pattern})" for pattern, _ in MESSAGES))


class NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _PATTERN.search(record.getMessage())


_FILTER = NoiseFilter()


def quiet() -> None:
    """Filter the noise from Python warnings and from libraries' log records: those of libraries without a handler
    of their own (printed by logging's last resort) and, via quiet_handlers, those with one."""
    for pattern, _ in MESSAGES:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
    if logging.lastResort is not None:
        _add_filter(logging.lastResort)
    quiet_handlers()


def quiet_handlers() -> None:
    """transformers, datasets and huggingface_hub print through handlers they create on import: filter every handler
    there is (call again once those libraries are imported)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            _add_filter(handler)


def _add_filter(handler: logging.Handler) -> None:
    if _FILTER not in handler.filters:
        handler.addFilter(_FILTER)
