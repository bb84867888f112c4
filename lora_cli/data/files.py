"""Reading a data file's rows by its suffix, each with where it is ("path:line" or "path:row N"): .jsonl and .csv
(read here, so errors name the line), .json, and .parquet (via `datasets`)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, one_line

JSONL_SUFFIXES = (".jsonl", ".ndjson")
DATASETS_SUFFIXES = {".parquet": "parquet"}


def scan_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Every raw row of a data file with where it is, for checks that report all bad rows (lora-data): a JSON Lines
    line that does not parse is yielded as its DataError instead of ending the scan. A file that cannot be read
    at all (missing, wrong type, not UTF-8, broken CSV or JSON array) still raises DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES or (suffix == ".json" and not _decode(p).lstrip().startswith("[")):
        return _scan_jsonl(p)
    return iter(_read_rows(p, suffix))


def _read_rows(p: Path, suffix: str) -> Any:
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix == ".csv":
        return _read_csv(p)
    if suffix in DATASETS_SUFFIXES:
        return _read_with_datasets(p, DATASETS_SUFFIXES[suffix])
    raise DataError(f"{p}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .parquet or .csv")


def _decode(p: Path) -> str:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerates a UTF-8 byte-order mark
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "re-encode the file as UTF-8") from None
    return text


def _read_jsonl(p: Path) -> Iterator[tuple[str, Any]]:
    for where, row in _scan_jsonl(p):
        if isinstance(row, DataError):
            raise row
        yield where, row


def _scan_jsonl(p: Path) -> Iterator[tuple[str, Any]]:
    """Each line's row, or the DataError that line raises: a line that is not JSON does not end the scan."""
    text = _decode(p)
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()  # CRLF line ends and surrounding blanks
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            row = DataError(f"{p}:{number}: invalid JSON: {exc.msg} (column {exc.colno})")
        except (ValueError, RecursionError) as exc:
            row = DataError(f"{p}:{number}: invalid JSON: {_json_limit(exc)}")
        yield f"{p}:{number}", row


def _read_json(p: Path) -> list[tuple[str, Any]]:
    text = _decode(p)
    stripped = text.lstrip()
    if not stripped:
        return []
    if not stripped.startswith("["):  # many ".json" files are really JSON Lines
        return list(_read_jsonl(p))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{p}: invalid JSON: {_json_limit(exc)}") from None
    return [(f"{p}:row {i}", row) for i, row in enumerate(data, start=1)]


def _json_limit(exc: Exception) -> str:
    # json.loads raises these, not JSONDecodeError, for input it parses but cannot hold.
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return " ".join(str(exc).split(";")[0].split())  # e.g. an integer with more than 4300 digits


def _read_csv(p: Path) -> list[tuple[str, Any]]:
    # Read here, not with pandas: every cell stays text ("4", "NA" and "True" are answers, not a number, a missing
    # value and a boolean), and each row is named by the line it starts on, even after cells that span lines.
    text = _decode(p)
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # one cell may hold a long conversation
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"{p}:{start}: not valid CSV: {exc}") from None
        if not any(cell.strip() for cell in record):
            continue  # a blank line
        if header is None:
            header = record
            continue
        if len(record) > len(header):
            raise DataError(f"{p}:{start}: {len(record)} cells, but the header has {len(header)} columns")
        row: dict[str, Any] = dict(zip(header, record))  # an empty cell is "", as in the same row in JSON
        for key in ("messages", "conversations"):  # CSV cells hold message lists as JSON text
            if row.get(key) == "":
                del row[key]  # this row uses another format's columns
            elif key in row:
                try:
                    row[key] = json.loads(row[key])
                except (ValueError, RecursionError):
                    pass  # reported by normalise_row as a wrong type
        rows.append((f"{p}:{start}", row))
    return rows


def _read_with_datasets(p: Path, builder: str) -> list[tuple[str, Any]]:
    if p.stat().st_size == 0:
        return []
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as exc:  # pyarrow/pandas raise many types for a corrupt file
        raise DataError(f"{p}: cannot read as {builder}: {one_line(exc, 300)}") from None
    return [(f"{p}:row {i}", {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(ds, start=1)]
