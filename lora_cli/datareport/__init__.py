"""lora-data: show exactly what lora-train will train on, before any GPU hour is spent.

The data goes through lora-train's own code: data.normalise_row for every row, the tokenizer and chat template as
lora-train resolves them, and encode.encode_row / EncodeStats.add for masking and --max_seq_length. Unlike
lora-train, which stops at the first bad row, every row is checked and every problem is listed. Errors (the data
cannot train as it is) end in exit 2; warnings (it can, but look) leave exit 0, so the command can guard a script.
"""

from .checks import build_report
from .command import run
from .config import DataConfig
from .rendering import bracket, decode, decoded_runs, render_plain, span_boundaries, token_runs
from .report import CHECKS, MASKED_STYLE, MAX_ERRORS_SHOWN, TRAINED_STYLE, Problem, Report, Row
from .terminal import heading, lines, make_console, print_report, styled

__all__ = ["CHECKS", "MASKED_STYLE", "MAX_ERRORS_SHOWN", "TRAINED_STYLE", "DataConfig", "Problem", "Report", "Row",
           "bracket", "build_report", "decode", "decoded_runs", "heading", "lines", "make_console", "print_report",
           "render_plain", "run", "span_boundaries", "styled", "token_runs"]
