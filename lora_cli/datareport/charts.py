"""lora-data --report_dir: data_report.json and the two histograms."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .. import fsutil
from ..filenames import DATA_REPORT
from .report import FRACTION_PNG, LENGTHS_PNG, Report, tokens_text


def write_report_dir(report: Report, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / DATA_REPORT, folder / LENGTHS_PNG, folder / FRACTION_PNG]
    fsutil.atomic_write(paths[0], json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n")
    plot_lengths(report, paths[1])
    plot_fractions(report, paths[2])
    return paths


def plot_lengths(report: Report, path: Path) -> None:
    """Histogram of whole-row token lengths with the --max_seq_length line and the region past it shaded."""
    import numpy as np

    cfg, lengths = report.cfg, report.lengths()
    fig, ax = _figure()
    limit, log_scale = cfg.max_seq_length, False
    if lengths:
        longest = max(lengths + [1])
        # A limit far beyond the data would squash the bars into a sliver: use a log axis then.
        log_scale = limit > 3 * longest
        high = max(longest, limit) * 1.08
        bins = np.geomspace(max(min(lengths), 1), high, 50) if log_scale else np.linspace(0, high, 50)
        ax.hist(lengths, bins=bins, color="#4C72B0", edgecolor="white", linewidth=0.5, label="conversations")
        if log_scale:
            _plain_log_ticks(ax)
        ax.axvline(statistics.median(lengths), color="#555555", linestyle=":", linewidth=1.5,
                   label=f"median {tokens_text(statistics.median(lengths))} tokens")
        ax.set_xlim(right=high)
    else:
        _no_data(ax)
    over = report.stats.too_long
    ax.axvline(limit, color="#C44E52", linestyle="--", linewidth=2, label=f"--max_seq_length {limit:,}")
    ax.axvspan(limit, ax.get_xlim()[1], color="#C44E52", alpha=0.08,
               label=f"over the limit: {over:,} rows ({_fate_word(cfg.truncation)})")
    ax.set_title(f"Token length per conversation: {Path(cfg.train_path).name} ({len(lengths):,} rows)")
    ax.set_xlabel("tokens per conversation (chat template applied)" + (", log scale" if log_scale else ""))
    ax.set_ylabel("conversations")
    if ax.get_legend_handles_labels()[0]:  # no rows, no labelled artists: matplotlib would warn on stderr
        ax.legend(loc="best", frameon=True, framealpha=0.9, edgecolor="none")
    fig.savefig(path)


def plot_fractions(report: Report, path: Path) -> None:
    """Histogram of each trained row's trained-token share, with rows that train nothing marked at 0."""
    import numpy as np

    fractions = [100 * f for f in report.trained_fractions()]
    zero = report.stats.dropped_no_trained_tokens
    fig, ax = _figure()
    bins = np.linspace(0, 100, 41)
    if fractions:
        ax.hist(fractions, bins=bins, color="#55A868", edgecolor="white", linewidth=0.5, label="rows trained on")
        median = statistics.median(fractions)
        ax.axvline(median, color="#555555", linestyle=":", linewidth=1.5, label=f"median {median:.0f}%")
    if zero:
        ax.hist([0.0] * zero, bins=bins, color="#C44E52", label=f"no trained token: {zero:,} rows (dropped)")
    if not fractions and not zero:
        _no_data(ax)
    ax.set_xlim(0, 100)
    ax.xaxis.set_major_formatter("{x:.0f}%")
    what = "every token" if report.cfg.train_on_inputs else "assistant turns + end-of-turn"
    ax.set_title(f"Trained tokens per conversation ({what}): {Path(report.cfg.train_path).name}")
    ax.set_xlabel("tokens in the loss, as a share of the row's tokens")
    ax.set_ylabel("conversations")
    if ax.get_legend_handles_labels()[0]:  # no rows, no labelled artists: matplotlib would warn on stderr
        ax.legend(loc="best", frameon=True, framealpha=0.9, edgecolor="none")
    fig.savefig(path)


def _figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend and no global state, Agg renders the PNG

    fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _plain_log_ticks(ax: Any) -> None:
    """A log axis labelled 50, 100, 200, 500, ... rather than 10^2, 10^3."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no row can be trained on", transform=ax.transAxes, ha="center", va="center",
            color="#C44E52", fontsize=14)


def _fate_word(truncation: str) -> str:
    return "dropped" if truncation == "drop" else "truncated"
