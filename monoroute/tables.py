"""Small helpers shared by every report writer (analyze, compare, circuits, sweep, bench): one None-safe
number format, one CSV renderer and one peak-memory reading, so the tables agree on how a missing
number looks and the reports on what "peak RSS" means."""
from __future__ import annotations

import csv
import io
import resource


def fmt(value, digits: int = 3, none: str = "–") -> str:
    """A table cell: `none` for a missing number, floats to `digits` decimals, anything else as str."""
    if value is None:
        return none
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def csv_text(header: list[str], rows) -> str:
    """The CSV of a header and rows (Excel dialect, \\r\\n line ends as the csv module writes them)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
