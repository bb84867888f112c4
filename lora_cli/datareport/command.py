"""lora-data: check, print and (with --report_dir) write the report."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .charts import write_report_dir
from .checks import build_report
from .config import DataConfig
from .report import Report
from .terminal import make_console, print_report


def run(cfg: DataConfig) -> Report:
    """Check, print and (with --report_dir) write the report; DataError with a one-line summary when it cannot
    train."""
    from ..preference import report as preference_report, rows as preference_rows

    kind = preference_rows.file_kind(cfg.train_path)
    if kind:  # prompt/chosen/rejected or prompt/completion/label rows: checked as lora-train --method dpo/kto does
        return preference_report.run(cfg, kind)
    report = build_report(cfg)
    console = make_console(cfg.color)
    print_report(console, report)
    if cfg.report_dir:
        written = write_report_dir(report, Path(cfg.report_dir))
        console.print(f"\nreport written: {', '.join(str(p) for p in written)}", soft_wrap=True, markup=False)
    if not report.can_train:
        raise DataError(report.summary())
    console.print(f"\nlora-data: {report.summary()}", soft_wrap=True, markup=False)
    return report
